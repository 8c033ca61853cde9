//! A stand-in for the Kubernetes API server (none can be installed here): list and
//! watch of Pods, ServiceAccounts and SecurityGroupPolicies over plain HTTP, with
//! resource versions, `410 Gone` for a version older than the kept history, and
//! bookmarks, fed by the test.
//!
//! Its limits, so that no test relies on more: no validation, defaulting, admission,
//! authentication or RBAC; one page per list (`limit`/`continue` ignored); only the
//! `spec.nodeName=` field selector, applied to what is listed and sent (an object
//! leaving the selector by an update is not turned into a `DELETED`); label selectors
//! and namespaced paths are not served.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A resource the server serves: its path, and the kind of its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    ServiceAccount,
    SecurityGroupPolicy,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Pod => "/api/v1/pods",
            Kind::ServiceAccount => "/api/v1/serviceaccounts",
            Kind::SecurityGroupPolicy => "/apis/vpcresources.k8s.aws/v1beta1/securitygrouppolicies",
        }
    }

    /// The API group and resource, as RBAC names them.
    pub fn resource(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("", "pods"),
            Kind::ServiceAccount => ("", "serviceaccounts"),
            Kind::SecurityGroupPolicy => ("vpcresources.k8s.aws", "securitygrouppolicies"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::SecurityGroupPolicy => "vpcresources.k8s.aws/v1beta1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::SecurityGroupPolicy => "SecurityGroupPolicy",
        }
    }

    /// The kind of an object, from its `kind`.
    pub fn of(object: &Value) -> Option<Self> {
        match object["kind"].as_str()? {
            "Pod" => Some(Kind::Pod),
            "ServiceAccount" => Some(Kind::ServiceAccount),
            "SecurityGroupPolicy" => Some(Kind::SecurityGroupPolicy),
            _ => None,
        }
    }
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
struct Event {
    kind: Kind,
    version: u64,
    action: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Changes after `oldest`, for watches that resume.
    history: Vec<Event>,
    /// Versions at or below this are gone: a watch from one gets 410.
    oldest: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    /// Watches and lists served, for tests that check a relist happened.
    lists: BTreeMap<Kind, usize>,
    /// What clients asked for: (kind, `list` or `watch`).
    reads: BTreeSet<(Kind, &'static str)>,
    /// Requests for anything else (method and path), answered 404.
    unserved: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Option<Event>>,
}

/// The running server; stops with the test process (its thread serves forever).
pub struct KubeApi {
    pub addr: SocketAddr,
    shared: Shared,
}

impl KubeApi {
    /// Serves on `listener` (bound by the caller, e.g. inside a network namespace).
    pub fn serve(listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1024);
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            events,
        };
        let app = axum::Router::new()
            .route(Kind::Pod.path(), get(handle_pods))
            .route(Kind::ServiceAccount.path(), get(handle_accounts))
            .route(Kind::SecurityGroupPolicy.path(), get(handle_policies))
            .fallback(unserved)
            .with_state(shared.clone());
        std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fake API server");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("the fake API server's listener");
                    axum::serve(listener, app)
                        .await
                        .expect("serving the fake API");
                });
            })?;
        Ok(Self { addr, shared })
    }

    /// A kubeconfig in `dir` naming this server.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\n\
             users:\n- name: test\n  user: {{token: not-checked}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test}}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces `object` (its `kind` says which resource), as a watch sees it.
    pub fn apply(&self, object: Value) {
        self.change(object, true, true);
    }

    /// Deletes the object of `kind` named `namespace/name`.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let key = (kind, namespace.to_string(), name.to_string());
        let Some(mut object) = store.objects.remove(&key) else {
            panic!("no {} {namespace}/{name} to delete", kind.name());
        };
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let event = Event {
            kind,
            version,
            action: "DELETED",
            object,
        };
        store.history.push(event.clone());
        let _ = self.shared.events.send(Some(event));
    }

    /// Changes `object` with no event and forgets the history, then ends every watch:
    /// a client only learns of the change by listing again after its watch's `410 Gone`.
    pub fn apply_behind_a_compaction(&self, object: Value) {
        self.change(object, false, false);
        let mut store = self.shared.store.lock().unwrap();
        store.oldest = store.version;
        store.history.clear();
        store.epoch += 1;
        let _ = self.shared.events.send(None);
    }

    /// Lists served of `kind` so far (a first list, then one per relist).
    pub fn lists(&self, kind: Kind) -> usize {
        let store = self.shared.store.lock().unwrap();
        store.lists.get(&kind).copied().unwrap_or(0)
    }

    /// What clients read: (kind, `list` or `watch`).
    pub fn reads(&self) -> BTreeSet<(Kind, &'static str)> {
        self.shared.store.lock().unwrap().reads.clone()
    }

    /// Requests for what this server does not serve (method and path), so far.
    pub fn unserved(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().unserved.clone()
    }

    fn change(&self, mut object: Value, send: bool, keep: bool) {
        let kind = Kind::of(&object).expect("a Pod, ServiceAccount or SecurityGroupPolicy");
        object["apiVersion"] = json!(kind.api_version());
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = metadata["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let mut store = self.shared.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{namespace}-{name}"));
        }
        let key = (kind, namespace, name);
        let action = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        let event = Event {
            kind,
            version,
            action,
            object,
        };
        if keep {
            store.history.push(event.clone());
        }
        if send {
            let _ = self.shared.events.send(Some(event));
        }
    }
}

/// The query parameters a reflector sends that this server reads.
#[derive(Debug, Default)]
struct Params {
    watch: Option<bool>,
    resource_version: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
}

impl Params {
    fn parse(query: Option<String>) -> Self {
        let mut params = Self::default();
        let query = query.unwrap_or_default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            match key.as_ref() {
                "watch" => params.watch = Some(value == "true" || value == "1"),
                "resourceVersion" => params.resource_version = Some(value),
                "fieldSelector" => params.field_selector = Some(value),
                "allowWatchBookmarks" => params.allow_watch_bookmarks = Some(value == "true"),
                "timeoutSeconds" => params.timeout_seconds = value.parse().ok(),
                _ => {}
            }
        }
        params
    }
}

async fn handle_pods(state: State<Shared>, query: RawQuery) -> Response {
    handle(Kind::Pod, state.0, Params::parse(query.0)).await
}

async fn handle_accounts(state: State<Shared>, query: RawQuery) -> Response {
    handle(Kind::ServiceAccount, state.0, Params::parse(query.0)).await
}

async fn handle_policies(state: State<Shared>, query: RawQuery) -> Response {
    handle(Kind::SecurityGroupPolicy, state.0, Params::parse(query.0)).await
}

async fn unserved(state: State<Shared>, request: axum::extract::Request) -> Response {
    let what = format!("{} {}", request.method(), request.uri());
    state.0.store.lock().unwrap().unserved.push(what);
    StatusCode::NOT_FOUND.into_response()
}

/// `spec.nodeName=NAME`, the one field selector served.
fn selected(selector: &Option<String>, object: &Value) -> bool {
    match selector
        .as_deref()
        .and_then(|s| s.strip_prefix("spec.nodeName="))
    {
        Some(node) => object["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn handle(kind: Kind, shared: Shared, params: Params) -> Response {
    if params
        .field_selector
        .as_deref()
        .is_some_and(|s| !s.is_empty() && !s.starts_with("spec.nodeName="))
    {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the fake API server serves only spec.nodeName=", "code": 400});
        return json_response(StatusCode::BAD_REQUEST, &status);
    }
    let verb = if params.watch == Some(true) {
        "watch"
    } else {
        "list"
    };
    shared.store.lock().unwrap().reads.insert((kind, verb));
    if verb == "watch" {
        return watch(kind, shared, params);
    }
    let mut store = shared.store.lock().unwrap();
    *store.lists.entry(kind).or_default() += 1;
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((k, _, _), object)| *k == kind && selected(&params.field_selector, object))
        .map(|(_, object)| object.clone())
        .collect();
    let list = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": store.version.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn line(value: &Value) -> bytes::Bytes {
    let mut text = value.to_string();
    text.push('\n');
    bytes::Bytes::from(text)
}

/// A watch from `resourceVersion`: the kept changes after it, then new ones as they
/// come, bookmarks every second when asked for, until its timeout or the next
/// compaction. A version older than the history gets `410 Gone` as an ERROR event.
fn watch(kind: Kind, shared: Shared, params: Params) -> Response {
    let from: u64 = params
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (sender, receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let mut live = shared.events.subscribe();
    let (backlog, gone, epoch) = {
        let store = shared.store.lock().unwrap();
        let backlog: Vec<Event> = store
            .history
            .iter()
            .filter(|e| e.kind == kind && e.version > from)
            .cloned()
            .collect();
        (backlog, from < store.oldest, store.epoch)
    };
    let store = shared.store.clone();
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(290));
    let bookmarks = params.allow_watch_bookmarks == Some(true);
    let selector = params.field_selector.clone();
    tokio::spawn(async move {
        let event_line = |e: &Event| line(&json!({"type": e.action, "object": e.object}));
        if gone {
            let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from}")}});
            let _ = sender.send(line(&status)).await;
            return;
        }
        // Events already in the backlog may come again from the live channel.
        let mut last = backlog.last().map_or(from, |e| e.version);
        for event in backlog.iter().filter(|e| selected(&selector, &e.object)) {
            if sender.send(event_line(event)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = &mut end => return,
                _ = ticks.tick(), if bookmarks => {
                    let version = store.lock().unwrap().version;
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": version.to_string()}}});
                    if sender.send(line(&bookmark)).await.is_err() {
                        return;
                    }
                }
                event = live.recv() => match event {
                    Ok(Some(e)) if e.kind == kind && e.version > last && selected(&selector, &e.object) => {
                        last = e.version;
                        if sender.send(event_line(&e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    // A compaction ends the watch; a lagging receiver too (it missed events).
                    Ok(None) | Err(_) => {
                        if store.lock().unwrap().epoch != epoch || live.is_empty() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .expect("a watch response")
}
