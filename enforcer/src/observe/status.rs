//! What the kernel enforces now, for `enforcer status`: the pinned maps, with the names
//! only the agent knows from its report (JSON under `/run/enforcer/`: bpffs holds no files).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use enforcer_common::{
    EnforcingMode, MAX_FLOWS, POD_AUDIT, POD_HAS_IPV4, POD_HAS_IPV6, Reason, counter_slot,
};
use serde::{Deserialize, Serialize};

use crate::kernel::ebpf::LinkState;
use crate::kernel::maps::{KernelMaps, MapsError, NatUse};
use crate::kernel::xdp::XdpState;
use crate::model::GroupsSource;
use crate::source::SourceHealth;

/// Directory of the agents' reports.
pub const REPORT_DIR: &str = "/run/enforcer";

/// Where the agent of `pin_path` writes its report: the path with `/` as `-`.
pub fn report_path(pin_path: &Path) -> PathBuf {
    let name: String = pin_path
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    Path::new(REPORT_DIR).join(format!("{name}.json"))
}

/// What the agent tells `status` besides the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub pid: u32,
    pub state_dir: PathBuf,
    pub trunk: Option<String>,
    pub node: Option<String>,
    pub enforcing_mode: Option<String>,
    /// Unix seconds of the last successful apply.
    pub applied_at: Option<u64>,
    /// Why the latest state was not applied (the kernel kept the previous one).
    pub error: Option<String>,
    pub error_at: Option<u64>,
    /// Why the programs could not be attached to the trunk the last time.
    #[serde(default)]
    pub attach_error: Option<String>,
    /// The applied state's findings (docs/isolation.md), one line each, its kind first.
    #[serde(default)]
    pub findings: Vec<String>,
    /// The live sources (`--source cluster`): each one's last success and error.
    #[serde(default)]
    pub sources: Vec<SourceReport>,
    pub pods: Vec<PodReport>,
}

/// One live source as the agent last saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceReport {
    pub name: String,
    /// Unix seconds of its last view; `None` before its first.
    pub last_success: Option<u64>,
    /// Why its latest attempt failed (its last view stays in use).
    pub error: Option<String>,
    pub error_at: Option<u64>,
}

impl From<&SourceHealth> for SourceReport {
    fn from(health: &SourceHealth) -> Self {
        let unix = |at: Option<SystemTime>| {
            at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        Self {
            name: health.name.clone(),
            last_success: unix(health.last_success),
            error: health.error.clone(),
            error_at: unix(health.error_at),
        }
    }
}

/// One pod as the agent applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    pub vlan: u16,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub mode: String,
    pub groups: Vec<String>,
    /// Where the groups come from: `branchEni`, `pinned` or `policies`.
    #[serde(default)]
    pub groups_source: GroupsSource,
    pub ingress_rules: usize,
    pub egress_rules: usize,
    /// Why the pod is quarantined, when it is (its VLAN drops what groups filter).
    #[serde(default)]
    pub quarantine: Option<String>,
}

impl AgentReport {
    /// Writes the report atomically (a reader never sees half of it), readable
    /// by root only: its errors may quote the state's files.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let temporary = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    }

    /// The report of the agent of `pin_path`, if one was written.
    pub fn read(pin_path: &Path) -> Option<Self> {
        let text = std::fs::read(report_path(pin_path)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// `namespace/name` of the pod on `vlan`.
    pub fn pod_name(&self, vlan: u16) -> Option<String> {
        self.pods
            .iter()
            .find(|p| p.vlan == vlan)
            .map(|p| format!("{}/{}", p.namespace, p.name))
    }
}

/// A pod the kernel enforces.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub vlan: u16,
    /// From the agent's report; absent if the agent never reported this VLAN.
    pub pod: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// As the kernel enforces it.
    pub mode: String,
    /// `enforce` or `audit`, as the kernel enforces it.
    pub action: &'static str,
    pub groups: Vec<String>,
    /// Why the pod is quarantined, when the agent reported it so.
    pub quarantine: Option<String>,
    pub ingress_rules: Option<usize>,
    pub egress_rules: Option<usize>,
    /// Tracked flows of this VLAN.
    pub flows: usize,
    /// Tracked flows and fragment verdicts as the kernel counts them against
    /// the pod's allowances (`max_flows_per_pod`, `max_fragments_per_pod`).
    pub tracked_flows: u64,
    pub tracked_fragments: u64,
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
    /// Frames the groups refused that audit passed.
    pub would_drop_packets: u64,
    pub would_drop_bytes: u64,
}

/// Everything `enforcer status` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_path: PathBuf,
    /// Both programs are attached to the trunk ahead of any other program
    /// (read from the kernel: the links' programs among the trunk's).
    pub attached: bool,
    /// Where each program's link stands on the trunk: `first`, `behind N`,
    /// `not on the trunk`, `not pinned` (ingress, egress).
    pub links: [String; 2],
    /// Where the XDP program runs on the trunk: `native`, `generic`, `off`
    /// (not pinned), or `not on the trunk (MODE)`.
    pub xdp: String,
    pub agent_pid: Option<u32>,
    pub agent_running: bool,
    pub node: Option<String>,
    pub enforcing_mode: Option<String>,
    pub trunk: Option<String>,
    pub unknown_vlan: &'static str,
    pub applied_at: Option<u64>,
    pub error: Option<String>,
    pub error_at: Option<u64>,
    /// Why the agent could not attach the programs the last time it tried.
    pub attach_error: Option<String>,
    pub findings: Vec<String>,
    /// The live sources' last success and error, as the agent last reported them.
    pub sources: Vec<SourceReport>,
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    /// `maxFlowsPerPod` and `maxFragmentsPerPod`, as the kernel enforces them.
    pub max_flows_per_pod: u32,
    pub max_fragments_per_pod: u32,
    /// Standard mode's source NAT: address, port range and its use.
    pub nat: NatUse,
    pub pods: Vec<PodStatus>,
    /// Frames by verdict reason since the maps were created.
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Frames audit passed, by the reason that would have dropped them.
    pub would_drop: BTreeMap<&'static str, u64>,
    pub suppressed_events: u64,
}

impl Status {
    /// Reads the maps pinned under `pin_path` and the agent's report.
    pub fn read(pin_path: &Path) -> Result<Self, MapsError> {
        let maps = KernelMaps::open_pinned(pin_path)?;
        let report = AgentReport::read(pin_path).unwrap_or_default();
        let flows = maps.flows()?;
        let mut pods = Vec::new();
        for (vlan, entry) in maps.pods()? {
            let reported = report.pods.iter().find(|p| p.vlan == vlan);
            let traffic = maps.pod_traffic(vlan)?;
            let tracked = maps.tracked(vlan);
            pods.push(PodStatus {
                vlan,
                pod: reported.map(|p| format!("{}/{}", p.namespace, p.name)),
                ipv4: (entry.flags & POD_HAS_IPV4 != 0).then(|| Ipv4Addr::from(entry.ipv4)),
                ipv6: (entry.flags & POD_HAS_IPV6 != 0).then(|| Ipv6Addr::from(entry.ipv6)),
                mode: entry
                    .mode()
                    .map_or("invalid", EnforcingMode::name)
                    .to_string(),
                action: if entry.flags & POD_AUDIT != 0 {
                    "audit"
                } else {
                    "enforce"
                },
                groups: reported.map(|p| p.groups.clone()).unwrap_or_default(),
                quarantine: reported.and_then(|p| p.quarantine.clone()),
                ingress_rules: reported.map(|p| p.ingress_rules),
                egress_rules: reported.map(|p| p.egress_rules),
                flows: flows.iter().filter(|(k, _)| k.vlan == vlan).count(),
                tracked_flows: tracked.flows,
                tracked_fragments: tracked.fragments,
                allowed_packets: traffic.allowed_packets,
                allowed_bytes: traffic.allowed_bytes,
                denied_packets: traffic.denied_packets,
                denied_bytes: traffic.denied_bytes,
                would_drop_packets: traffic.would_drop_packets,
                would_drop_bytes: traffic.would_drop_bytes,
            });
        }
        let counters = maps.counters()?;
        let settings = maps.settings()?;
        let links = report
            .trunk
            .as_deref()
            .map(|trunk| crate::kernel::ebpf::link_states(pin_path, trunk));
        let described = |i: usize| match &links {
            None => "trunk unknown (no agent report)".to_string(),
            Some(Err(e)) => crate::error_chain(e),
            Some(Ok(states)) => link_text(states[i]),
        };
        let xdp = match report.trunk.as_deref() {
            None => "trunk unknown (no agent report)".to_string(),
            Some(trunk) => match crate::kernel::xdp::xdp_state(pin_path, trunk) {
                Ok(XdpState::Attached(mode)) => mode.name().to_string(),
                Ok(XdpState::Elsewhere(mode)) => format!("not on the trunk ({})", mode.name()),
                Ok(XdpState::Missing) => "off".to_string(),
                Err(e) => crate::error_chain(&e),
            },
        };
        Ok(Self {
            pin_path: pin_path.to_path_buf(),
            xdp,
            attached: matches!(&links, Some(Ok(states)) if states.iter().all(|s| *s == LinkState::First)),
            links: [described(0), described(1)],
            agent_pid: (report.pid != 0).then_some(report.pid),
            agent_running: report.pid != 0 && is_running(report.pid),
            node: report.node,
            enforcing_mode: report.enforcing_mode,
            trunk: report.trunk,
            unknown_vlan: if settings.unknown_vlan_pass != 0 {
                "pass"
            } else {
                "drop"
            },
            applied_at: report.applied_at,
            error: report.error,
            error_at: report.error_at,
            attach_error: report.attach_error,
            findings: report.findings,
            sources: report.sources,
            conntrack_entries: flows.len(),
            conntrack_capacity: MAX_FLOWS,
            max_flows_per_pod: settings.max_flows_per_pod,
            max_fragments_per_pod: settings.max_fragments_per_pod,
            nat: maps.nat_use()?,
            pods,
            verdicts: Reason::ALL
                .iter()
                .map(|&r| (r.name(), counters[r as usize]))
                .collect(),
            would_drop: Reason::ALL
                .iter()
                .filter(|r| r.is_audited())
                .map(|&r| (r.name(), counters[counter_slot(r, true) as usize]))
                .collect(),
            suppressed_events: maps.suppressed_events()?,
        })
    }
}

fn link_text(state: LinkState) -> String {
    match state {
        LinkState::First => "first".to_string(),
        LinkState::Behind { ahead } => format!("behind {ahead} other program(s)"),
        LinkState::Elsewhere => "not on the trunk".to_string(),
        LinkState::Missing => "not pinned".to_string(),
    }
}

fn is_running(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn when(unix: Option<u64>) -> String {
    let Some(at) = unix else {
        return "never".to_string();
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} s ago (unix {at})", now.saturating_sub(at))
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = "unknown".to_string();
        writeln!(
            f,
            "pin path {}: {}; agent {}",
            self.pin_path.display(),
            if self.attached {
                "programs attached first on the trunk".to_string()
            } else {
                format!(
                    "NOT enforcing on the trunk (ingress {}, egress {})",
                    self.links[0], self.links[1]
                )
            },
            match (self.agent_pid, self.agent_running) {
                (Some(pid), true) => format!("running (pid {pid})"),
                (Some(pid), false) => format!("not running (last pid {pid})"),
                (None, _) => "never reported".to_string(),
            }
        )?;
        writeln!(
            f,
            "node {}: {} mode, trunk {} (XDP {}), unknown VLANs {}",
            self.node.as_ref().unwrap_or(&unknown),
            self.enforcing_mode.as_ref().unwrap_or(&unknown),
            self.trunk.as_ref().unwrap_or(&unknown),
            self.xdp,
            self.unknown_vlan,
        )?;
        writeln!(f, "last apply: {}", when(self.applied_at))?;
        match &self.error {
            Some(error) => writeln!(
                f,
                "last error ({}): the kernel keeps the previous state\n  {}",
                when(self.error_at),
                error.replace('\n', "\n  ")
            )?,
            None => writeln!(f, "last error: none")?,
        }
        if let Some(error) = &self.attach_error {
            writeln!(
                f,
                "cannot attach to the trunk (the agent keeps trying): {error}"
            )?;
        }
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        for source in &self.sources {
            writeln!(
                f,
                "source {}: last view {}{}",
                source.name,
                when(source.last_success),
                match &source.error {
                    Some(error) => format!("; failing since {}: {error}", when(source.error_at)),
                    None => String::new(),
                }
            )?;
        }
        writeln!(
            f,
            "conntrack: {} of {} flows; each pod at most {} flows, {} fragment verdicts",
            self.conntrack_entries,
            self.conntrack_capacity,
            self.max_flows_per_pod,
            self.max_fragments_per_pod
        )?;
        let nat = &self.nat;
        match nat.address {
            Some(address) => writeln!(
                f,
                "source NAT: to {address}, ports {}-{}: {} translated flows, the busiest peer holds {} of {} ports",
                nat.ports.0,
                nat.ports.1,
                nat.mappings,
                nat.busiest_peer,
                u32::from(nat.ports.1 - nat.ports.0) + 1
            )?,
            None => writeln!(
                f,
                "source NAT: off (externalSnat, no IPv4 primary IP, or an interface missing)"
            )?,
        }
        writeln!(f, "pods: {}", self.pods.len())?;
        for pod in &self.pods {
            let addresses: Vec<String> = pod
                .ipv4
                .map(|a| a.to_string())
                .into_iter()
                .chain(pod.ipv6.map(|a| a.to_string()))
                .collect();
            let count = |n: Option<usize>| n.map_or("?".to_string(), |n| n.to_string());
            let quarantine = match &pod.quarantine {
                Some(reason) => format!("  QUARANTINED: {reason}"),
                None => String::new(),
            };
            let audit = if pod.action == "audit" {
                format!(
                    "  AUDIT: would drop {} pkts {} B",
                    pod.would_drop_packets, pod.would_drop_bytes
                )
            } else {
                String::new()
            };
            writeln!(
                f,
                "  VLAN {:>4}  {}  {}  {}  groups {}  rules {} in / {} out  flows {} (counted {}, fragments {})  allowed {} pkts {} B  denied {} pkts {} B{audit}{quarantine}",
                pod.vlan,
                pod.pod.as_deref().unwrap_or("?"),
                addresses.join(", "),
                pod.mode,
                if pod.quarantine.is_some() {
                    "none".to_string()
                } else if pod.groups.is_empty() {
                    "?".to_string()
                } else {
                    pod.groups.join(",")
                },
                count(pod.ingress_rules),
                count(pod.egress_rules),
                pod.flows,
                pod.tracked_flows,
                pod.tracked_fragments,
                pod.allowed_packets,
                pod.allowed_bytes,
                pod.denied_packets,
                pod.denied_bytes,
            )?;
        }
        let counted: Vec<String> = self
            .verdicts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        writeln!(
            f,
            "verdicts: {}",
            if counted.is_empty() {
                "none yet".to_string()
            } else {
                counted.join(", ")
            }
        )?;
        let would_drop: Vec<String> = self
            .would_drop
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        if !would_drop.is_empty() {
            writeln!(f, "audit, passed but would drop: {}", would_drop.join(", "))?;
        }
        writeln!(f, "events suppressed: {}", self.suppressed_events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_shows_each_pods_tracked_counts_and_the_allowances() {
        let status = Status {
            pin_path: PathBuf::from("/sys/fs/bpf/enforcer"),
            attached: true,
            links: ["first".to_string(), "first".to_string()],
            xdp: "native".to_string(),
            agent_pid: None,
            agent_running: false,
            node: None,
            enforcing_mode: None,
            trunk: None,
            unknown_vlan: "drop",
            applied_at: None,
            error: None,
            error_at: None,
            attach_error: None,
            findings: Vec::new(),
            sources: Vec::new(),
            conntrack_entries: 3,
            conntrack_capacity: MAX_FLOWS,
            max_flows_per_pod: 512,
            max_fragments_per_pod: 64,
            nat: NatUse::default(),
            pods: vec![PodStatus {
                vlan: 7,
                pod: Some("shop/web".to_string()),
                ipv4: Some(Ipv4Addr::new(10, 0, 1, 50)),
                ipv6: None,
                mode: "strict".to_string(),
                action: "enforce",
                groups: vec!["sg-app".to_string()],
                quarantine: None,
                ingress_rules: Some(1),
                egress_rules: Some(1),
                flows: 3,
                tracked_flows: 3,
                tracked_fragments: 2,
                allowed_packets: 0,
                allowed_bytes: 0,
                denied_packets: 0,
                denied_bytes: 0,
                would_drop_packets: 0,
                would_drop_bytes: 0,
            }],
            verdicts: BTreeMap::new(),
            would_drop: BTreeMap::new(),
            suppressed_events: 0,
        };
        let text = status.to_string();
        for expected in [
            "each pod at most 512 flows, 64 fragment verdicts",
            "flows 3 (counted 3, fragments 2)",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        let json = serde_json::to_value(&status).expect("status as JSON");
        assert_eq!(json["max_flows_per_pod"], 512);
        assert_eq!(json["max_fragments_per_pod"], 64);
        assert_eq!(json["pods"][0]["tracked_flows"], 3);
        assert_eq!(json["pods"][0]["tracked_fragments"], 2);
    }
}
