//! A stand-in for the Kubernetes API server (none can be installed here), over plain
//! HTTP, fed by the test: list and watch of Pods, ServiceAccounts,
//! SecurityGroupPolicies, Nodes and SecurityGroupViews, with resource versions,
//! `410 Gone` for a version older than the kept history, and bookmarks; the
//! SecurityGroupView CRD's discovery (once [`KubeApi::install_views_crd`]), server-side
//! apply of a view and of its status, and its deletion; get, create and
//! `resourceVersion`-conditional update of Leases (`409 Conflict` on a stale version);
//! creation and patch of events.
//!
//! Its limits, so that no test relies on more: no validation, defaulting, admission,
//! authentication or RBAC; one page per list (`limit`/`continue` ignored); only the
//! `spec.nodeName=` field selector, applied to what is listed and sent (an object
//! leaving the selector by an update is not turned into a `DELETED`); label selectors
//! are not served; server-side apply replaces the applied object's `spec` and labels (or
//! its `status`) whole, as one field manager owning every field would (no managed
//! fields, no merge of other managers' fields), and is a no-op when nothing differs;
//! `metadata.generation` counts spec changes; an object over etcd's 1.5 MiB is
//! refused (`413`); events are kept, not listed or watched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::Method;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A resource the server serves: its path, and the kind of its objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    ServiceAccount,
    SecurityGroupPolicy,
    Node,
    SecurityGroupView,
    Lease,
    Event,
}

/// The API group and version of the SecurityGroupViews.
const VIEWS_API: &str = "enforcer.sgp.dev/v1alpha1";
/// The largest object etcd stores (its default `--max-request-bytes`).
pub const ETCD_LIMIT: usize = 1536 * 1024;

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Pod,
        Kind::ServiceAccount,
        Kind::SecurityGroupPolicy,
        Kind::Node,
        Kind::SecurityGroupView,
        Kind::Lease,
        Kind::Event,
    ];

    /// The API group and resource, as RBAC names them.
    pub fn resource(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("", "pods"),
            Kind::ServiceAccount => ("", "serviceaccounts"),
            Kind::SecurityGroupPolicy => ("vpcresources.k8s.aws", "securitygrouppolicies"),
            Kind::Node => ("", "nodes"),
            Kind::SecurityGroupView => ("enforcer.sgp.dev", "securitygroupviews"),
            Kind::Lease => ("coordination.k8s.io", "leases"),
            Kind::Event => ("events.k8s.io", "events"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::SecurityGroupPolicy => "vpcresources.k8s.aws/v1beta1",
            Kind::SecurityGroupView => VIEWS_API,
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::SecurityGroupView)
    }

    /// The path of its objects, of every namespace.
    fn path(self) -> String {
        match self.resource() {
            ("", resource) => format!("/api/v1/{resource}"),
            (_, resource) => format!("/apis/{}/{resource}", self.api_version()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::SecurityGroupPolicy => "SecurityGroupPolicy",
            Kind::Node => "Node",
            Kind::SecurityGroupView => "SecurityGroupView",
            Kind::Lease => "Lease",
            Kind::Event => "Event",
        }
    }

    /// The kind of an object, from its `kind`.
    pub fn of(object: &Value) -> Option<Self> {
        let kind = object["kind"].as_str()?;
        Self::ALL.into_iter().find(|k| k.name() == kind)
    }
}

/// One kind of request a client made: its user (the kubeconfig's token, see
/// [`KubeApi::kubeconfig_as`]) and the API group, resource and verb RBAC would check.
pub type Access = (String, &'static str, &'static str, &'static str);

/// The user of a kubeconfig from [`KubeApi::kubeconfig`].
pub const DEFAULT_USER: &str = "not-checked";

/// A request that changed (or tried to change) an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub kind: Kind,
    pub name: String,
    /// `create`, `update`, `apply` (a spec), `status`, `delete`, or `refused` (a
    /// conflict or an object over the limit).
    pub what: &'static str,
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
    /// What clients asked for: (user, API group, resource, verb), as RBAC names them.
    reads: BTreeSet<Access>,
    /// Requests for anything else (method and path), answered 404.
    unserved: Vec<String>,
    /// The SecurityGroupView CRD is installed.
    views_crd: bool,
    /// Writes that changed something, and refused ones, in order.
    writes: Vec<Write>,
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
            .fallback(dispatch)
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
        self.kubeconfig_as(dir, DEFAULT_USER)
    }

    /// A kubeconfig in `dir` naming this server, whose requests count as `user`'s.
    pub fn kubeconfig_as(&self, dir: &Path, user: &str) -> Result<PathBuf> {
        let path = match user {
            DEFAULT_USER => dir.join("kubeconfig"),
            _ => dir.join(format!("kubeconfig-{user}")),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\n\
             users:\n- name: test\n  user: {{token: {user}}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: test}}\n\
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
        if store.remove(&self.shared.events, &key).is_none() {
            panic!("no {} {namespace}/{name} to delete", kind.name());
        }
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

    /// Serves the SecurityGroupView CRD from now on (discovery, list, watch, apply).
    pub fn install_views_crd(&self) {
        self.shared.store.lock().unwrap().views_crd = true;
    }

    /// The objects of `kind`, ordered by namespace and name.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The writes so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.store.lock().unwrap().writes.clone()
    }

    /// Lists served of `kind` so far (a first list, then one per relist).
    pub fn lists(&self, kind: Kind) -> usize {
        let store = self.shared.store.lock().unwrap();
        store.lists.get(&kind).copied().unwrap_or(0)
    }

    /// What `user`'s clients asked for: (API group, resource, verb), as RBAC names them.
    pub fn reads_by(&self, user: &str) -> BTreeSet<(&'static str, &'static str, &'static str)> {
        let store = self.shared.store.lock().unwrap();
        store
            .reads
            .iter()
            .filter(|(u, ..)| u == user)
            .map(|(_, group, resource, verb)| (*group, *resource, *verb))
            .collect()
    }

    /// Requests for what this server does not serve (method and path), so far.
    pub fn unserved(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().unserved.clone()
    }

    fn change(&self, mut object: Value, send: bool, keep: bool) {
        let kind = Kind::of(&object).expect("a kind this server serves");
        object["apiVersion"] = json!(kind.api_version());
        let metadata = &object["metadata"];
        let namespace = match kind.namespaced() {
            true => metadata["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            false => String::new(),
        };
        let name = metadata["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let mut store = self.shared.store.lock().unwrap();
        store.put(
            &self.shared.events,
            kind,
            namespace,
            name,
            object,
            send,
            keep,
        );
    }
}

impl Store {
    /// Stores `object` under a new version, as a watch sees it if `send` (and a
    /// resumed one if `keep`).
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        events: &broadcast::Sender<Option<Event>>,
        kind: Kind,
        namespace: String,
        name: String,
        mut object: Value,
        send: bool,
        keep: bool,
    ) -> Value {
        let store = self;
        store.version += 1;
        let version = store.version;
        if kind.namespaced() {
            object["metadata"]["namespace"] = json!(namespace);
        }
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
            object: object.clone(),
        };
        if keep {
            store.history.push(event.clone());
        }
        if send {
            let _ = events.send(Some(event));
        }
        object
    }

    /// Removes an object, as a watch sees it; `None` if there is none.
    fn remove(
        &mut self,
        events: &broadcast::Sender<Option<Event>>,
        key: &(Kind, String, String),
    ) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let event = Event {
            kind: key.0,
            version: self.version,
            action: "DELETED",
            object: object.clone(),
        };
        self.history.push(event.clone());
        let _ = events.send(Some(event));
        Some(object)
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

fn failure(code: StatusCode, reason: &str, message: String) -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "message": message, "code": code.as_u16()});
    json_response(code, &status)
}

/// Every request: the collections' lists and watches, the views' discovery, apply and
/// delete, the Leases and the events; anything else is 404 and recorded.
async fn dispatch(state: State<Shared>, request: axum::extract::Request) -> Response {
    let shared = state.0;
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let query = request.uri().query().map(str::to_string);
    let body = match axum::body::to_bytes(request.into_body(), 16 << 20).await {
        Ok(body) => body,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let views_crd = shared.store.lock().unwrap().views_crd;
    if method == Method::GET {
        if path == format!("/apis/{VIEWS_API}") {
            if !views_crd {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{path} not found"),
                );
            }
            let list = json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": VIEWS_API,
                "resources": [{"name": "securitygroupviews", "singularName": "securitygroupview",
                    "namespaced": false, "kind": "SecurityGroupView",
                    "verbs": ["delete", "get", "list", "patch", "watch"]},
                    {"name": "securitygroupviews/status", "singularName": "", "namespaced": false,
                    "kind": "SecurityGroupView", "verbs": ["get", "patch"]}]});
            return json_response(StatusCode::OK, &list);
        }
        let listed = [
            Kind::Pod,
            Kind::ServiceAccount,
            Kind::SecurityGroupPolicy,
            Kind::Node,
            Kind::SecurityGroupView,
        ];
        if let Some(kind) = listed
            .into_iter()
            .find(|k| k.path() == path && (*k != Kind::SecurityGroupView || views_crd))
        {
            return handle(kind, shared, Params::parse(query), user).await;
        }
    }
    let views = Kind::SecurityGroupView.path();
    let object_path = |kind: Kind| -> Option<(String, String)> {
        // .../namespaces/NS/RESOURCE/NAME for namespaced kinds, .../RESOURCE/NAME else.
        let (_, resource) = kind.resource();
        let rest = path.strip_prefix(&format!("/apis/{}/", kind.api_version()))?;
        let (namespace, rest) = match kind.namespaced() {
            true => {
                let rest = rest.strip_prefix("namespaces/")?;
                let (ns, rest) = rest.split_once('/')?;
                (ns.to_string(), rest)
            }
            false => (String::new(), rest),
        };
        let name = rest
            .strip_prefix(resource)?
            .strip_prefix('/')
            .unwrap_or_default();
        Some((namespace, name.to_string()))
    };
    let record = |resource: (&'static str, &'static str), verb: &'static str| {
        let access = (user.clone(), resource.0, resource.1, verb);
        shared.store.lock().unwrap().reads.insert(access);
    };
    let parsed = || serde_json::from_slice::<Value>(&body);
    if views_crd && path.starts_with(&format!("{views}/")) {
        let name = path[views.len() + 1..].to_string();
        let (name, status) = match name.strip_suffix("/status") {
            Some(name) => (name.to_string(), true),
            None => (name, false),
        };
        if method == Method::PATCH {
            let resource = match status {
                true => ("enforcer.sgp.dev", "securitygroupviews/status"),
                false => Kind::SecurityGroupView.resource(),
            };
            // Kubernetes authorizes a server-side apply that creates its object as
            // `create` ("Patch and apply" in the API concepts), otherwise as `patch`.
            let key = (Kind::SecurityGroupView, String::new(), name.clone());
            let exists = shared.store.lock().unwrap().objects.contains_key(&key);
            record(resource, if exists || status { "patch" } else { "create" });
            let Ok(object) = parsed() else {
                return failure(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
            };
            return apply_view(&shared, name, object, status);
        }
        if method == Method::DELETE && !status {
            record(Kind::SecurityGroupView.resource(), "delete");
            let mut store = shared.store.lock().unwrap();
            let key = (Kind::SecurityGroupView, String::new(), name.clone());
            return match store.remove(&shared.events, &key) {
                Some(object) => {
                    store.writes.push(Write {
                        kind: key.0,
                        name,
                        what: "delete",
                    });
                    json_response(StatusCode::OK, &object)
                }
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            };
        }
    }
    for kind in [Kind::Lease, Kind::Event] {
        let Some((namespace, name)) = object_path(kind) else {
            continue;
        };
        let named = !name.is_empty();
        let verb = if method == Method::GET && named && kind == Kind::Lease {
            "get"
        } else if method == Method::PUT && named && kind == Kind::Lease {
            "update"
        } else if method == Method::POST && !named {
            "create"
        } else if method == Method::PATCH && named && kind == Kind::Event {
            "patch"
        } else {
            break;
        };
        record(kind.resource(), verb);
        let mut store = shared.store.lock().unwrap();
        let key = (kind, namespace.clone(), name.clone());
        if verb == "get" {
            return match store.objects.get(&key) {
                Some(object) => json_response(StatusCode::OK, object),
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            };
        }
        let Ok(mut object) = parsed() else {
            return failure(StatusCode::BAD_REQUEST, "BadRequest", "not JSON".into());
        };
        object["kind"] = json!(kind.name());
        let name = match verb {
            "create" => object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            _ => name,
        };
        let key = (kind, namespace.clone(), name.clone());
        let current = store.objects.get(&key).cloned();
        let conflict = match verb {
            "create" => current.is_some(),
            "update" => {
                current.as_ref().map(|c| &c["metadata"]["resourceVersion"])
                    != Some(&object["metadata"]["resourceVersion"])
            }
            _ => current.is_none(),
        };
        if conflict {
            store.writes.push(Write {
                kind,
                name: name.clone(),
                what: "refused",
            });
            let (reason, message) = match current {
                Some(_) if verb == "create" => ("AlreadyExists", format!("{name} already exists")),
                Some(_) => ("Conflict", format!("the object {name} has been modified")),
                None => ("NotFound", format!("{name} not found")),
            };
            let code = match current {
                Some(_) => StatusCode::CONFLICT,
                None => StatusCode::NOT_FOUND,
            };
            return failure(code, reason, message);
        }
        if verb == "patch" {
            let mut merged = current.unwrap_or_default();
            merge(&mut merged, object);
            object = merged;
        }
        object["metadata"]["name"] = json!(name);
        store.writes.push(Write {
            kind,
            name: name.clone(),
            what: verb,
        });
        let stored = store.put(&shared.events, kind, namespace, name, object, true, true);
        let code = if verb == "create" {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return json_response(code, &stored);
    }
    let what = format!("{method} {path}");
    shared.store.lock().unwrap().unserved.push(what);
    StatusCode::NOT_FOUND.into_response()
}

/// A JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                if value.is_null() {
                    target.as_object_mut().expect("an object").remove(&key);
                } else {
                    merge(&mut target[&key], value);
                }
            }
        }
        other => *target = other,
    }
}

/// Server-side apply of a view's spec and labels, or of its status: the applied
/// fields replace the stored ones; nothing differing, nothing is written.
fn apply_view(shared: &Shared, name: String, applied: Value, status: bool) -> Response {
    let mut store = shared.store.lock().unwrap();
    let key = (Kind::SecurityGroupView, String::new(), name.clone());
    let current = store.objects.get(&key).cloned();
    let mut object = match (&current, status) {
        (Some(current), _) => current.clone(),
        (None, true) => {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{name} not found"),
            );
        }
        (None, false) => json!({"apiVersion": VIEWS_API, "kind": "SecurityGroupView",
            "metadata": {"name": name, "generation": 0}}),
    };
    if status {
        object["status"] = applied["status"].clone();
    } else {
        if object["spec"] != applied["spec"] {
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(0);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        object["spec"] = applied["spec"].clone();
        object["metadata"]["labels"] = applied["metadata"]["labels"].clone();
    }
    if current.as_ref() == Some(&object) {
        return json_response(StatusCode::OK, &object);
    }
    let bytes = object.to_string().len();
    if bytes > ETCD_LIMIT {
        store.writes.push(Write {
            kind: key.0,
            name,
            what: "refused",
        });
        return failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("etcdserver: request is too large ({bytes} bytes)"),
        );
    }
    let what = match (status, current.is_some()) {
        (true, _) => "status",
        (false, true) => "apply",
        (false, false) => "create",
    };
    store.writes.push(Write {
        kind: key.0,
        name: name.clone(),
        what,
    });
    let stored = store.put(
        &shared.events,
        key.0,
        String::new(),
        name,
        object,
        true,
        true,
    );
    json_response(StatusCode::OK, &stored)
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

async fn handle(kind: Kind, shared: Shared, params: Params, user: String) -> Response {
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
    let (group, resource) = kind.resource();
    let access = (user, group, resource, verb);
    shared.store.lock().unwrap().reads.insert(access);
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
