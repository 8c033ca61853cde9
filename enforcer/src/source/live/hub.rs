//! Where the live sources publish: what Kubernetes, EC2 and IMDS currently hold,
//! combined into one virtual state directory ([`Documents`]) that the file source's
//! parser and resolver read, and that `enforcer snapshot` writes out as files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::source::SourceHealth;
use crate::source::state::Documents;

/// What errors of the live view name as its directory.
pub const ORIGIN: &str = "cluster";
/// The NodeConfig document the live view builds.
pub const NODE_CONFIG_FILE: &str = "node-config.json";
/// The environment variable aws-node reads the enforcing mode from.
pub const ENFORCING_MODE_VAR: &str = "POD_SECURITY_GROUP_ENFORCING_MODE";

/// Why the live sources could not start.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("reading the Kubernetes configuration")]
    KubeConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("asking the API server whether it serves SecurityGroupViews (--ec2 auto)")]
    Discovery(#[source] ::kube::Error),
    #[error("reading the NodeConfig file {path}")]
    NodeConfigFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the NodeConfig file {path} is not a NodeConfig with a spec")]
    NotANodeConfig { path: PathBuf },
    #[error("{0} is not strict or standard ({ENFORCING_MODE_VAR})")]
    EnforcingMode(String),
    #[error("the live view is not complete after {waited:?}: {}", .sources.join("; "))]
    FirstView {
        sources: Vec<String>,
        waited: Duration,
    },
}

/// What the NodeConfig takes from flags and files rather than from IMDS and EC2.
#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    /// `--trunk-interface`: else the local interface with the trunk ENI's MAC.
    pub trunk_interface: Option<String>,
    /// `--primary-interface`: else the local interface with the primary ENI's MAC.
    pub primary_interface: Option<String>,
    /// `POD_SECURITY_GROUP_ENFORCING_MODE`: else the file's, else strict.
    pub enforcing_mode: Option<String>,
    /// The `spec` of a NodeConfig file (`--node-config`): the settings IMDS cannot
    /// tell (unknownVlan, connectionTracking, externalSnat, …). Identity fields in it
    /// are replaced by what the node's metadata says.
    pub spec: serde_json::Map<String, Value>,
}

impl NodeSettings {
    /// Reads the `spec` of the NodeConfig file at `path` (YAML or JSON).
    pub fn read_spec(path: &Path) -> Result<serde_json::Map<String, Value>, LiveError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| LiveError::NodeConfigFile {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(|e| failed(e.into()))?;
        let value: Value = serde_yaml::from_str(&text).map_err(|e| failed(e.into()))?;
        match value.get("spec") {
            Some(Value::Object(spec)) if value.get("kind") == Some(&json!("NodeConfig")) => {
                Ok(spec.clone())
            }
            _ => Err(LiveError::NotANodeConfig {
                path: path.to_path_buf(),
            }),
        }
    }

    /// The enforcing mode as aws-node reads it from its environment (unset: not given).
    pub fn enforcing_mode_from_env() -> Result<Option<String>, LiveError> {
        match std::env::var(ENFORCING_MODE_VAR) {
            Ok(mode) if mode.is_empty() => Ok(None),
            Ok(mode) => match mode.to_ascii_lowercase().as_str() {
                m @ ("strict" | "standard") => Ok(Some(m.to_string())),
                _ => Err(LiveError::EnforcingMode(mode)),
            },
            Err(_) => Ok(None),
        }
    }
}

/// This instance as IMDS describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    /// The primary ENI's MAC address, lower case.
    pub mac: String,
    pub primary_ips: Vec<IpAddr>,
    pub security_groups: Vec<String>,
    pub vpc_cidrs: Vec<String>,
}

/// The sources, by the name status and metrics give them.
pub mod names {
    pub const PODS: &str = "kubernetes/pods";
    pub const SERVICE_ACCOUNTS: &str = "kubernetes/serviceaccounts";
    pub const POLICIES: &str = "kubernetes/securitygrouppolicies";
    pub const EC2: &str = "ec2";
    pub const IMDS: &str = "imds";
    pub const ALL: [&str; 5] = [PODS, SERVICE_ACCOUNTS, POLICIES, EC2, IMDS];
}

/// One source's current contribution.
#[derive(Clone, Debug, Default)]
struct Part {
    /// `None` until its first view.
    documents: Option<Documents>,
    last_success: Option<SystemTime>,
    error: Option<(SystemTime, String)>,
}

/// What the EC2 source learnt that the NodeConfig needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ec2Node {
    /// The trunk ENI's MAC (lower case), if this instance has one.
    pub trunk_mac: Option<String>,
    pub trunk_id: Option<String>,
    /// The EC2 source has listed this instance's ENIs at least once.
    pub listed: bool,
}

#[derive(Default)]
struct Parts {
    parts: BTreeMap<&'static str, Part>,
    identity: Option<Identity>,
    ec2_node: Ec2Node,
}

/// The live view at one moment.
#[derive(Clone, Debug, Default)]
pub struct LiveView {
    /// Every source's documents and the NodeConfig, once all are there.
    pub documents: Documents,
    pub sources: Vec<SourceHealth>,
    /// Why the view is not complete (sources without a first view, no trunk);
    /// empty once it is.
    pub incomplete: Vec<String>,
}

/// Where the sources publish and the agent (or `snapshot`) reads.
pub struct Hub {
    parts: Mutex<Parts>,
    settings: NodeSettings,
    node_name: String,
    /// Local interfaces by MAC; a test may swap the lookup.
    interfaces: fn() -> BTreeMap<String, String>,
    view: watch::Sender<Arc<LiveView>>,
    /// Where the applied state's findings go to become Events (`findings::spawn`).
    findings: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<crate::model::Finding>>>>,
}

impl Hub {
    pub fn new(node_name: String, settings: NodeSettings) -> Arc<Self> {
        Self::with_interfaces(node_name, settings, local_interfaces)
    }

    fn with_interfaces(
        node_name: String,
        settings: NodeSettings,
        interfaces: fn() -> BTreeMap<String, String>,
    ) -> Arc<Self> {
        let parts = Parts {
            parts: names::ALL.iter().map(|n| (*n, Part::default())).collect(),
            ..Parts::default()
        };
        let hub = Self {
            parts: Mutex::new(parts),
            settings,
            node_name,
            interfaces,
            view: watch::Sender::new(Arc::default()),
            findings: Mutex::new(None),
        };
        hub.update(|_| {});
        Arc::new(hub)
    }

    pub(super) fn set_findings_sink(
        &self,
        sink: tokio::sync::mpsc::UnboundedSender<Vec<crate::model::Finding>>,
    ) {
        *self.findings.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// The findings of the state just applied from this hub's view: each becomes
    /// an Event on its object (rate-limited), where Events are published.
    pub fn report_findings(&self, findings: &[crate::model::Finding]) {
        if let Some(sink) = &*self.findings.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = sink.send(findings.to_vec());
        }
    }

    /// The latest view, and its changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<LiveView>> {
        self.view.subscribe()
    }

    pub fn view(&self) -> Arc<LiveView> {
        self.view.borrow().clone()
    }

    /// The identity IMDS gave, once it has.
    pub fn identity(&self) -> Option<Identity> {
        self.lock().identity.clone()
    }

    /// The documents of `source`, once it has published.
    pub fn documents_of(&self, source: &str) -> Option<Documents> {
        self.lock().parts.get(source)?.documents.clone()
    }

    /// `source` has a new view: it replaces the last.
    pub fn publish(&self, source: &'static str, documents: Documents) {
        self.update(|parts| succeeded(parts, source, Some(documents)));
    }

    pub fn publish_identity(&self, identity: Identity) {
        self.update(|parts| {
            parts.identity = Some(identity);
            succeeded(parts, names::IMDS, Some(Documents::default()));
        });
    }

    pub fn publish_ec2(&self, documents: Documents, node: Ec2Node) {
        self.update(|parts| {
            parts.ec2_node = Ec2Node {
                listed: true,
                ..node
            };
            succeeded(parts, names::EC2, Some(documents));
        });
    }

    /// EC2's documents as the controller's views hold them: dated by when EC2 was
    /// read (`read_at`), not when they arrived, so that the source's staleness is theirs.
    pub fn publish_ec2_read(&self, documents: Documents, node: Ec2Node, read_at: SystemTime) {
        self.update(|parts| {
            parts.ec2_node = Ec2Node {
                listed: true,
                ..node
            };
            succeeded(parts, names::EC2, Some(documents));
            if let Some(part) = parts.parts.get_mut(names::EC2) {
                part.last_success = Some(read_at);
            }
        });
    }

    /// `source` failed: its last view stays, the error is shown until it succeeds.
    pub fn failed(&self, source: &'static str, message: String) {
        log::warn!("source {source}: {message}");
        self.update(|parts| {
            let part = parts.parts.entry(source).or_default();
            part.error = Some((SystemTime::now(), message));
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parts> {
        // A panicking source leaves consistent parts: every update replaces whole values.
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Parts)) {
        let mut parts = self.lock();
        change(&mut parts);
        let view = self.combine(&parts);
        self.view.send_replace(Arc::new(view));
    }

    fn combine(&self, parts: &Parts) -> LiveView {
        let mut view = LiveView::default();
        for (name, part) in &parts.parts {
            view.sources.push(SourceHealth {
                name: (*name).to_string(),
                last_success: part.last_success,
                error: part.error.as_ref().map(|(_, m)| m.clone()),
                error_at: part.error.as_ref().map(|(at, _)| *at),
            });
            match &part.documents {
                Some(documents) => view.documents.extend(documents),
                None => view
                    .incomplete
                    .push(format!("no first view from {name} yet")),
            }
        }
        if let Some(identity) = &parts.identity {
            match self.node_config(identity, &parts.ec2_node) {
                Ok(config) => view.documents.insert(NODE_CONFIG_FILE, config),
                Err(Some(why)) => view.incomplete.push(why),
                // Waits for EC2's first view, which `incomplete` already names.
                Err(None) => {}
            }
        }
        view
    }

    /// The NodeConfig document: identity from IMDS and EC2, interfaces by MAC
    /// unless the flags name them, the rest from the NodeConfig file.
    /// `Err(None)`: the trunk waits for EC2's first view.
    fn node_config(&self, identity: &Identity, ec2: &Ec2Node) -> Result<String, Option<String>> {
        let interfaces = (self.interfaces)();
        let by_mac = |mac: &str| interfaces.get(&mac.to_ascii_lowercase()).cloned();
        let primary = match &self.settings.primary_interface {
            Some(name) => name.clone(),
            None => by_mac(&identity.mac).ok_or_else(|| {
                Some(format!(
                    "no local interface has the primary ENI's MAC {} (--primary-interface names it)",
                    identity.mac
                ))
            })?,
        };
        let trunk = match (&self.settings.trunk_interface, &ec2.trunk_mac) {
            (Some(name), _) => name.clone(),
            (None, Some(mac)) => by_mac(mac).ok_or_else(|| {
                Some(format!(
                    "no local interface has the trunk ENI's MAC {mac} (--trunk-interface names it)"
                ))
            })?,
            (None, None) if ec2.listed => {
                return Err(Some(format!(
                    "EC2 lists no trunk ENI attached to {} (security groups for pods not enabled on this node?)",
                    identity.instance_id
                )));
            }
            (None, None) => return Err(None),
        };
        let mut spec = self.settings.spec.clone();
        let mode = self
            .settings
            .enforcing_mode
            .clone()
            .or_else(|| spec.get("enforcingMode")?.as_str().map(str::to_string))
            .unwrap_or_else(|| "strict".to_string());
        for (key, value) in [
            ("enforcingMode", json!(mode)),
            ("trunkInterface", json!(trunk)),
            ("primaryInterface", json!(primary)),
            ("primaryIPs", json!(identity.primary_ips)),
            ("primarySecurityGroups", json!(identity.security_groups)),
            ("vpcCidrs", json!(identity.vpc_cidrs)),
        ] {
            spec.insert(key.to_string(), value);
        }
        let document = json!({
            "apiVersion": "enforcer.sgp.dev/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {
                "name": self.node_name,
                "annotations": {
                    "enforcer.sgp.dev/instance-id": identity.instance_id,
                    "enforcer.sgp.dev/region": identity.region,
                },
            },
            "spec": spec,
        });
        Ok(pretty(&document))
    }

    /// Waits until every source has produced a first view (and the view is complete),
    /// at most `timeout`.
    pub async fn first_view(&self, timeout: Duration) -> Result<Arc<LiveView>, LiveError> {
        let mut views = self.subscribe();
        let complete = tokio::time::timeout(timeout, views.wait_for(|v| v.incomplete.is_empty()));
        match complete.await {
            Ok(Ok(view)) => Ok(view.clone()),
            _ => Err(LiveError::FirstView {
                sources: self.view().incomplete.clone(),
                waited: timeout,
            }),
        }
    }
}

fn succeeded(parts: &mut Parts, source: &'static str, documents: Option<Documents>) {
    let part = parts.parts.entry(source).or_default();
    part.documents = documents;
    part.last_success = Some(SystemTime::now());
    part.error = None;
}

/// JSON as the documents hold it: stable and readable in a snapshot.
pub(crate) fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value serialises");
    text.push('\n');
    text
}

/// This network namespace's interfaces, by MAC address (lower case). Asked of the
/// kernel (`if_nameindex`, `SIOCGIFHWADDR`), not read from /sys/class/net: sysfs
/// shows the namespace it was mounted in, which a process moved by setns(2) left.
fn local_interfaces() -> BTreeMap<String, String> {
    let mut interfaces = BTreeMap::new();
    // SAFETY: a plain socket for the ioctl, closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return interfaces;
    }
    // SAFETY: the list is walked up to its zero entry and freed once.
    let list = unsafe { libc::if_nameindex() };
    if !list.is_null() {
        let mut entry = list;
        // SAFETY: entries up to the terminating one (index 0) are valid.
        while unsafe { (*entry).if_index } != 0 {
            // SAFETY: if_name is a NUL-terminated name of at most IFNAMSIZ bytes.
            let name = unsafe { std::ffi::CStr::from_ptr((*entry).if_name) };
            if let Some(mac) = hardware_address(socket, name) {
                interfaces
                    .entry(mac)
                    .or_insert_with(|| name.to_string_lossy().into_owned());
            }
            // SAFETY: still within the list (the current entry was not the last).
            entry = unsafe { entry.add(1) };
        }
        // SAFETY: the list if_nameindex returned.
        unsafe { libc::if_freenameindex(list) };
    }
    // SAFETY: the socket opened above.
    unsafe { libc::close(socket) };
    interfaces
}

/// The MAC of interface `name` as `aa:bb:…`, if it has one of six bytes.
fn hardware_address(socket: libc::c_int, name: &std::ffi::CStr) -> Option<String> {
    // SAFETY: ifreq is plain data; zeroed is a valid request.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return None;
    }
    for (to, from) in request.ifr_name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // The request's type is c_ulong with glibc and c_int with musl (the image's).
    #[allow(clippy::unnecessary_cast)]
    let get_address = libc::SIOCGIFHWADDR as libc::Ioctl;
    // SAFETY: SIOCGIFHWADDR fills the request's hardware address.
    if unsafe { libc::ioctl(socket, get_address, &mut request) } != 0 {
        return None;
    }
    // SAFETY: the union member SIOCGIFHWADDR wrote.
    let address = unsafe { request.ifr_ifru.ifru_hwaddr };
    if address.sa_family != libc::ARPHRD_ETHER {
        return None;
    }
    let octets: Vec<String> = address.sa_data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect();
    Some(octets.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interfaces() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("0a:00:00:00:00:01".to_string(), "ens5".to_string()),
            ("0a:00:00:00:00:02".to_string(), "ens6".to_string()),
        ])
    }

    fn identity() -> Identity {
        Identity {
            instance_id: "i-1".into(),
            region: "eu-west-1".into(),
            mac: "0A:00:00:00:00:01".into(),
            primary_ips: vec!["10.0.1.10".parse().unwrap()],
            security_groups: vec!["sg-0node".into()],
            vpc_cidrs: vec!["10.0.0.0/16".into()],
        }
    }

    #[test]
    fn the_view_is_incomplete_until_every_source_has_spoken() {
        let settings = NodeSettings {
            spec: serde_json::from_value(json!({"unknownVlan": "pass", "trunkInterface": "x"}))
                .unwrap(),
            ..NodeSettings::default()
        };
        let hub = Hub::with_interfaces("node-1".into(), settings, interfaces);
        assert_eq!(hub.view().incomplete.len(), names::ALL.len());
        for name in [names::PODS, names::SERVICE_ACCOUNTS, names::POLICIES] {
            hub.publish(name, Documents::default());
        }
        hub.failed(names::EC2, "throttled".into());
        hub.publish_identity(identity());
        let view = hub.view();
        assert_eq!(view.incomplete, ["no first view from ec2 yet"]);
        let ec2 = view.sources.iter().find(|s| s.name == "ec2").unwrap();
        assert_eq!(ec2.error.as_deref(), Some("throttled"));
        assert!(ec2.last_success.is_none());
        hub.publish_ec2(
            Documents::default(),
            Ec2Node {
                trunk_mac: Some("0a:00:00:00:00:02".into()),
                trunk_id: Some("eni-trunk".into()),
                listed: true,
            },
        );
        let view = hub.view();
        assert!(view.incomplete.is_empty(), "{:?}", view.incomplete);
        let (_, config) = view.documents.files().next().unwrap();
        let config: Value = serde_json::from_str(config).unwrap();
        assert_eq!(config["metadata"]["name"], "node-1");
        let spec = &config["spec"];
        assert_eq!(
            spec["trunkInterface"], "ens6",
            "found by the trunk ENI's MAC"
        );
        assert_eq!(spec["primaryInterface"], "ens5", "found by IMDS's MAC");
        assert_eq!(spec["unknownVlan"], "pass", "kept from the file");
        assert_eq!(spec["enforcingMode"], "strict");
        assert_eq!(spec["primarySecurityGroups"], json!(["sg-0node"]));
    }

    #[test]
    fn a_node_without_trunk_or_interface_says_why() {
        let hub = Hub::with_interfaces("n".into(), NodeSettings::default(), interfaces);
        hub.publish_identity(identity());
        hub.publish_ec2(Documents::default(), Ec2Node::default());
        assert!(
            hub.view()
                .incomplete
                .iter()
                .any(|w| w.contains("no trunk ENI attached to i-1"))
        );
        let settings = NodeSettings {
            trunk_interface: Some("eth1".into()),
            ..NodeSettings::default()
        };
        let hub = Hub::with_interfaces("n".into(), settings, BTreeMap::new);
        hub.publish_identity(identity());
        assert!(
            hub.view()
                .incomplete
                .iter()
                .any(|w| w.contains("primary ENI's MAC 0A:00:00:00:00:01"))
        );
    }
}
