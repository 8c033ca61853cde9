//! `enforcer controller`: one EC2 poller for the whole cluster. The leader (a Lease,
//! `lease`) reads the groups every node needs — the SecurityGroupPolicies' and the
//! groups of the nodes' ENIs, with what their rules reference — and publishes each as
//! SecurityGroupView objects (`view`), by server-side apply, only when their content
//! changed; their status's read time is restamped every `refresh` so that agents can
//! tell a stale view. Agents watch the views instead of polling EC2 (`follow`), so
//! EC2's calls no longer grow with the nodes.

pub mod follow;
pub mod lease;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::kube::api::{DeleteParams, Patch, PatchParams};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::{WatchStreamExt as _, watcher};
use ::kube::{Api, Resource, ResourceExt as _};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;

use super::ec2::schedule::{self, Poller, Wanted};
use super::ec2::{self, Ec2Error, GroupRead};
use super::hub::LiveError;
use super::kube::SecurityGroupPolicy;
use super::view::{
    self, FIELD_MANAGER, MANAGED_BY, MAX_SPEC_BYTES, SecurityGroupView, SecurityGroupViewSpec,
    SecurityGroupViewStatus, ViewError,
};
pub use lease::{Elector, LeaseConfig};

/// How `enforcer controller` is configured.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config` or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// The EC2 region, unless `AWS_REGION`/`AWS_DEFAULT_REGION` names it.
    pub region: Option<String>,
    /// Mean time between EC2 polls (jittered).
    pub interval: Duration,
    /// How often an unchanged view's read time is restamped.
    pub refresh: Duration,
    pub lease: LeaseConfig,
}

/// A failed write of the views (the next poll tries again).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("writing SecurityGroupView {name}")]
    Write {
        name: String,
        #[source]
        source: ::kube::Error,
    },
}

/// The controller, started: its caches follow the cluster; [`Controller::run`] competes
/// for the lease and publishes while it leads.
pub struct Controller {
    elector: Elector,
    publisher: Publisher,
}

/// What the leader reads and writes.
struct Publisher {
    ec2: aws_sdk_ec2::Client,
    views: Api<SecurityGroupView>,
    policies: Store<SecurityGroupPolicy>,
    nodes: Store<Node>,
    stored: Store<SecurityGroupView>,
    /// Woken by every change of the caches.
    changed: Arc<Notify>,
    interval: Duration,
    refresh: Duration,
}

/// Connects to the cluster and EC2 and starts following the policies, the nodes and
/// the views.
pub async fn start(config: &ControllerConfig) -> Result<Controller, LiveError> {
    let client = super::kube::client(config.kubeconfig.as_ref()).await?;
    let changed = Arc::new(Notify::new());
    let publisher = Publisher {
        ec2: ec2::client(config.region.as_deref()).await,
        views: Api::all(client.clone()),
        policies: reflect(Api::all(client.clone()), changed.clone()),
        nodes: reflect(Api::all(client.clone()), changed.clone()),
        stored: reflect(Api::all(client.clone()), changed.clone()),
        changed,
        interval: config.interval,
        refresh: config.refresh,
    };
    let leases = Api::namespaced(client, &config.lease.namespace);
    Ok(Controller {
        elector: Elector::new(leases, config.lease.clone()),
        publisher,
    })
}

/// A reflector whose store the returned handle reads; every event wakes `changed`.
fn reflect<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => log::warn!(
                    "watching {}: {}",
                    K::plural(&()),
                    crate::error_chain(&error)
                ),
            }
        }
    });
    store
}

impl Controller {
    /// Competes for the lease and, while leading, polls EC2 and publishes; until the
    /// runtime ends.
    pub async fn run(&self) {
        for (what, ready) in [
            (
                "securitygrouppolicies",
                self.publisher.policies.wait_until_ready().await,
            ),
            ("nodes", self.publisher.nodes.wait_until_ready().await),
            (
                "securitygroupviews",
                self.publisher.stored.wait_until_ready().await,
            ),
        ] {
            if ready.is_err() {
                log::error!("the {what} cache ended before its first list");
                return;
            }
        }
        // Polls and publishes until dropped (leadership lost).
        let publisher = &self.publisher;
        self.elector
            .lead(|| schedule::run(publisher, publisher.interval))
            .await;
    }

    /// Gives up the lease, for a stopping controller.
    pub async fn release(&self) -> Result<(), ::kube::Error> {
        self.elector.release().await
    }
}

/// What the cluster needs from EC2: the nodes' instances and the policies' groups.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Needs {
    instances: BTreeSet<String>,
    groups: BTreeSet<String>,
}

impl Wanted for Needs {
    fn covers(&self, other: &Needs) -> bool {
        other.instances.is_subset(&self.instances) && other.groups.is_subset(&self.groups)
    }
}

/// The instance ID of a node's `spec.providerID` (`aws:///<zone>/<instance>`).
fn instance_of(node: &Node) -> Option<String> {
    let provider = node.spec.as_ref()?.provider_id.as_deref()?;
    let instance = provider.strip_prefix("aws://")?.rsplit('/').next()?;
    instance.starts_with("i-").then(|| instance.to_string())
}

impl Publisher {
    fn needs(&self) -> Needs {
        Needs {
            instances: self
                .nodes
                .state()
                .iter()
                .filter_map(|n| instance_of(n))
                .collect(),
            groups: self
                .policies
                .state()
                .iter()
                .filter_map(|p| p.spec.security_groups.as_ref())
                .flat_map(|g| g.group_ids.iter().cloned())
                .collect(),
        }
    }

    /// Writes the views of one poll: a spec only when it changed, a status when its
    /// spec did or its read time is `refresh` old; deletes the views of groups no
    /// longer read. A group that cannot be published keeps its views.
    async fn write(&self, reads: Vec<GroupRead>) -> Result<(), PublishError> {
        let read_at = SystemTime::now();
        let mut desired: BTreeMap<String, SecurityGroupViewSpec> = BTreeMap::new();
        let mut kept: BTreeSet<String> = BTreeSet::new();
        for read in reads {
            let id = read.group["GroupId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match specs(read) {
                Ok(specs) => desired.extend(
                    specs
                        .into_iter()
                        .map(|s| (view::object_name(&s.group_id, s.part), s)),
                ),
                Err(error) => {
                    log::error!(
                        "security group {id} not published: {}",
                        crate::error_chain(&error)
                    );
                    kept.insert(id);
                }
            }
        }
        let mut written = 0;
        for (name, spec) in &desired {
            let stored = self.stored.get(&ObjectRef::new(name));
            let (generation, status) = match &stored {
                Some(view) if &view.spec == spec => (view.metadata.generation, view.status.clone()),
                _ => {
                    let mut object = SecurityGroupView::new(name, spec.clone());
                    object.metadata.labels =
                        Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into());
                    let applied = self
                        .views
                        .patch(name, &apply(), &Patch::Apply(&object))
                        .await
                        .map_err(|source| PublishError::Write {
                            name: name.clone(),
                            source,
                        })?;
                    written += 1;
                    (applied.metadata.generation, None)
                }
            };
            let generation = generation.unwrap_or(0);
            let due = status.is_none_or(|s| {
                s.observed_generation != generation
                    || read_at
                        .duration_since(SystemTime::from(s.read_at.0))
                        .is_ok_and(|age| age >= self.refresh)
            });
            if due {
                let status = SecurityGroupViewStatus {
                    read_at: Time(Timestamp::try_from(read_at).unwrap_or(Timestamp::UNIX_EPOCH)),
                    observed_generation: generation,
                    rules: spec.security_group.as_ref().map_or(0, |g| {
                        let count = |p: &Option<Vec<_>>| p.as_ref().map_or(0, Vec::len);
                        u32::try_from(count(&g.ip_permissions) + count(&g.ip_permissions_egress))
                            .unwrap_or(u32::MAX)
                    }),
                    members: u32::try_from(spec.members.len()).unwrap_or(u32::MAX),
                };
                let patch = json!({
                    "apiVersion": SecurityGroupView::api_version(&()),
                    "kind": SecurityGroupView::kind(&()),
                    "status": status,
                });
                self.views
                    .patch_status(name, &apply(), &Patch::Apply(&patch))
                    .await
                    .map_err(|source| PublishError::Write {
                        name: name.clone(),
                        source,
                    })?;
            }
        }
        for view in self.stored.state() {
            let name = view.name_any();
            let ours = view.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1);
            if ours && !desired.contains_key(&name) && !kept.contains(&view.spec.group_id) {
                match self.views.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => written += 1,
                    Err(::kube::Error::Api(status)) if status.code == 404 => {}
                    Err(source) => return Err(PublishError::Write { name, source }),
                }
            }
        }
        if written > 0 {
            log::info!(
                "{written} SecurityGroupView(s) written or deleted ({} published)",
                desired.len()
            );
        }
        Ok(())
    }
}

impl Poller for &Publisher {
    type Wanted = Needs;
    type Read = Vec<GroupRead>;

    fn wanted(&self) -> Option<Needs> {
        Some(self.needs())
    }

    async fn poll(&self, needs: &Needs) -> Result<Vec<GroupRead>, Ec2Error> {
        ec2::poll_cluster(&self.ec2, &needs.instances, &needs.groups).await
    }

    async fn publish(&self, reads: Vec<GroupRead>) {
        if let Err(error) = self.write(reads).await {
            log::warn!("{} (the next poll tries again)", crate::error_chain(&error));
        }
    }

    fn failed(&self, error: &Ec2Error, wait: Duration) {
        log::warn!(
            "EC2: {} (the views stay; next try in {wait:?})",
            crate::error_chain(error)
        );
    }

    async fn changed(&mut self) -> bool {
        self.changed.notified().await;
        true
    }
}

fn apply() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The specs of one group read from EC2.
fn specs(read: GroupRead) -> Result<Vec<SecurityGroupViewSpec>, ViewError> {
    let group = view::from_cli("security group", read.group)?;
    let members = read
        .members
        .into_iter()
        .map(|m| view::from_cli("network interface", m))
        .collect::<Result<_, _>>()?;
    let lists = read
        .prefix_lists
        .into_iter()
        .map(|l| view::from_cli("prefix list", l))
        .collect::<Result<_, _>>()?;
    view::split(group, members, lists, MAX_SPEC_BYTES)
}
