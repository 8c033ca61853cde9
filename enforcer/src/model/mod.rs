//! The resolved security-group model: what parsing and SGP matching produce,
//! and what the reference evaluator and the map compiler consume.

mod instance_limits;
pub mod sgp;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;

pub use enforcer_common::EnforcingMode;

/// An EC2 security group ID (`sg-…`).
pub type GroupId = String;

/// Direction of a flow as seen by the pod: `Ingress` is peer -> pod, `Egress` pod -> peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn opposite(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// An IPv4 or IPv6 prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a string is not a CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}")]
pub struct CidrError(pub String);

impl Cidr {
    /// A prefix of `addr`; host bits beyond `prefix_len` are cleared.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        (prefix_len <= max).then(|| Self {
            addr: mask(addr, prefix_len),
            prefix_len,
        })
    }

    /// The /32 or /128 of one address.
    pub fn host(addr: IpAddr) -> Self {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix_len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// `0.0.0.0/0` or `::/0`.
    pub fn is_everything(&self) -> bool {
        self.prefix_len == 0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// The address at `offset` from the network address (base + 1 is the VPC router).
    pub fn nth(&self, offset: u32) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(offset))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a).wrapping_add(u128::from(offset)),
            )),
        }
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Accepts `a.b.c.d/n`, `x::y/n`, and a bare address (a host prefix).
    /// Host bits set beyond the prefix are an error, as EC2 rejects them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_string());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => {
                let addr: IpAddr = a.parse().map_err(|_| err())?;
                if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                (addr, l.parse::<u8>().map_err(|_| err())?)
            }
            None => {
                let addr: IpAddr = s.parse().map_err(|_| err())?;
                return Ok(Self::host(addr));
            }
        };
        let cidr = Self::new(addr, len).ok_or_else(err)?;
        if cidr.addr != addr {
            return Err(err());
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// What a rule allows at layer 4 (EC2 `IpProtocol` with `FromPort`/`ToPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Match {
    /// `IpProtocol: "-1"`: every protocol, every port.
    All,
    /// TCP (6) or UDP (17) destination ports `from..=to`.
    Ports { protocol: u8, from: u16, to: u16 },
    /// ICMP (`v6: false`, protocol 1) or ICMPv6 (`v6: true`, 58); `None` = any.
    /// A `None` type always comes with a `None` code.
    Icmp {
        v6: bool,
        icmp_type: Option<u8>,
        code: Option<u8>,
    },
    /// Any other protocol number: ports are ignored.
    Protocol(u8),
}

/// The other end of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// `IpRanges[].CidrIp` or `Ipv6Ranges[].CidrIpv6`.
    Cidr(Cidr),
    /// `PrefixListIds[].PrefixListId`: the CIDRs of that managed prefix list.
    PrefixList(String),
    /// `UserIdGroupPairs[].GroupId`: the private addresses and delegated prefixes of every
    /// ENI carrying that group.
    Group(GroupId),
}

/// One security-group rule: one peer of one EC2 `IpPermission`, as the EC2
/// console lists them and as the rule quota counts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub l4: L4Match,
    pub peer: Peer,
    pub description: Option<String>,
}

/// An EC2 security group. Rules are indexed in order: for each
/// `IpPermission`, its `IpRanges`, `Ipv6Ranges`, `PrefixListIds`, then
/// `UserIdGroupPairs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: GroupId,
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl SecurityGroup {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What the enforcer does with a frame a pod's groups refuse (`enforcingAction`, the pod's
/// annotation `enforcer.sgp.dev/action`): drop it, or pass it and report it ("would drop").
/// Unlike the mode, it is not fixed at pod creation: switching is the point of audit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnforcingAction {
    #[default]
    Enforce,
    Audit,
}

impl EnforcingAction {
    /// `enforce` or `audit`, as the NodeConfig and the annotation spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }

    /// The action spelled `name`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "enforce" => Some(Self::Enforce),
            "audit" => Some(Self::Audit),
            _ => None,
        }
    }
}

/// What happens to tagged frames whose VLAN has no pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownVlanAction {
    Drop,
    Pass,
}

/// Idle timeouts in seconds (EC2 `ConnectionTrackingSpecification`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_established: u32,
    pub udp_stream: u32,
    pub udp: u32,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: 432_000,
            udp_stream: 180,
            udp: 30,
        }
    }
}

/// Instance families built on Nitro v6, where EC2's default TCP established
/// timeout is 350 s instead of 432000 s. Sources: EC2 API Reference,
/// `ConnectionTrackingSpecificationRequest.TcpEstablishedTimeout` ("350 seconds
/// for Nitro v6 instance types (excluding P6e-GB200); 432000 seconds for all
/// other instance types"), and the Nitro version in each family's platform
/// summary (EC2 instance types guide, "Instances built on the AWS Nitro
/// System"), as of 2025. EC2's `DescribeInstanceTypes` reports the default of
/// any type (`DefaultConnectionTrackingConfiguration`): an explicit
/// `connectionTracking.tcpEstablishedTimeout` overrides this table.
const NITRO_V6_FAMILIES: &[&str] = &["c8i", "c8i-flex", "m8i", "m8i-flex", "r8i", "r8i-flex"];

impl ConntrackTimeouts {
    /// EC2's defaults on `instance_type` (`family.size`), when it is known.
    pub fn defaults_for(instance_type: Option<&str>) -> Self {
        let family = instance_type
            .and_then(|t| t.split_once('.'))
            .map(|(f, _)| f);
        let nitro_v6 = family.is_some_and(|f| NITRO_V6_FAMILIES.contains(&f));
        Self {
            tcp_established: if nitro_v6 { 350 } else { 432_000 },
            ..Self::default()
        }
    }
}

/// What EC2 allows one instance type, from the VPC resource controller's table
/// (`instance_limits.rs`, its source and date there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Branch ENIs, so pods with security groups; 0: the type has no trunking.
    pub branch_interfaces: u32,
    pub interfaces: u32,
    pub ipv4_per_interface: u32,
}

impl InstanceLimits {
    /// The limits of `instance_type` (`m5.large`), if the table knows it.
    pub fn of(instance_type: &str) -> Option<Self> {
        let table = instance_limits::INSTANCE_LIMITS;
        let i = table
            .binary_search_by(|(name, ..)| (*name).cmp(instance_type))
            .ok()?;
        let (_, branch, interfaces, ipv4) = table[i];
        Some(Self {
            branch_interfaces: branch.into(),
            interfaces: interfaces.into(),
            ipv4_per_interface: ipv4.into(),
        })
    }

    /// The VPC CNI's default max-pods (EKS `eni-max-pods.txt`): interfaces × (IPv4
    /// addresses per interface − 1) + 2. It counts secondary IPs only, yet the kubelet
    /// counts pods with branch ENIs against it too.
    pub fn default_max_pods(&self) -> u32 {
        self.interfaces * self.ipv4_per_interface.saturating_sub(1) + 2
    }
}

/// `snatPortRange` unless the NodeConfig says otherwise: above Linux's default
/// `ip_local_port_range` (32768-60999), so translated flows never take a port
/// the node's own connections may use.
pub const DEFAULT_SNAT_PORT_RANGE: RangeInclusive<u16> = 61000..=65535;

/// This node, from the `NodeConfig` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub enforcing_mode: EnforcingMode,
    /// `enforcingAction`: the action of pods without an `enforcer.sgp.dev/action` annotation.
    pub enforcing_action: EnforcingAction,
    /// `auditNamespaces`: the namespaces whose pods may choose `audit` with the
    /// `enforcer.sgp.dev/action` annotation (none by default): a pod's own metadata
    /// never loosens its enforcement unless the node allows it.
    pub audit_namespaces: Vec<String>,
    pub trunk_interface: String,
    pub primary_interface: String,
    pub primary_ips: Vec<IpAddr>,
    pub primary_security_groups: Vec<GroupId>,
    pub vpc_cidrs: Vec<Cidr>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`: standard mode leaves source NAT to
    /// something else (a NAT gateway); the enforcer translates nothing.
    pub external_snat: bool,
    /// `excludeSnatCidrs` (`AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`): destinations
    /// outside the VPC that standard mode reaches untranslated.
    pub exclude_snat_cidrs: Vec<Cidr>,
    /// `snatPortRange`: the ports translated flows leave from, disjoint from the
    /// node's `net.ipv4.ip_local_port_range` (the agent refuses an overlap).
    pub snat_port_range: RangeInclusive<u16>,
    pub unknown_vlan: UnknownVlanAction,
    pub connection_tracking: ConntrackTimeouts,
    /// The instance type (`m5.large`), when the NodeConfig names it: it sets
    /// the default TCP established timeout.
    pub instance_type: Option<String>,
    /// The cluster's Service CIDRs, when known: `explain` tells a ClusterIP
    /// from an address security groups see.
    pub service_cidrs: Vec<Cidr>,
    /// Security groups allowed on one branch ENI (EC2 quota: 5 by default, at most 16).
    pub max_groups_per_pod: usize,
    /// Rules per group and direction (EC2 quota: 60 by default).
    pub max_rules_per_group: usize,
    /// `tcpEarlyDemuxDisabled`: aws-node runs with `DISABLE_TCP_EARLY_DEMUX=true` (default
    /// false, the VPC CNI's default). Strict-mode kubelet probes need it (`lint` SGP002).
    pub tcp_early_demux_disabled: bool,
    /// Tracked flows one pod may hold (`maxFlowsPerPod`); a new flow beyond it is
    /// dropped, so one pod's flood never takes another's room (EC2's per-ENI
    /// tracked-connection allowance).
    pub max_flows_per_pod: u32,
    /// Allowed fragmented datagrams one pod may have in flight (`maxFragmentsPerPod`).
    pub max_fragments_per_pod: u32,
}

/// A pod of this node with a branch ENI: the unit the fast path enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub vlan: u16,
    pub eni_id: String,
    pub mac: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// The branch ENI's subnets (annotation `subnetCidr`, `subnetV6Cidr`); base + 1 is the router.
    pub subnet_v4: Option<Cidr>,
    pub subnet_v6: Option<Cidr>,
    /// The branch ENI's groups, in SGP order (or the node's groups when no SGP matched).
    pub groups: Vec<GroupId>,
    pub mode: EnforcingMode,
    /// Audit or enforce: the NodeConfig's `enforcingAction`, or the pod's annotation
    /// where `auditNamespaces` lets its namespace choose.
    pub action: EnforcingAction,
    /// What `explain` and `lint` report; enforcement never reads it.
    pub facts: PodFacts,
}

/// Where a pod's groups come from (sg-semantics.md §2: fixed when the pod is created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupsSource {
    /// The branch ENI's groups, as `describe-network-interfaces` lists them.
    BranchEni,
    /// Those the agent resolved when it first enforced the pod (by UID).
    Pinned,
    /// The SecurityGroupPolicies selecting the pod now (or the node's groups
    /// when none does): a pod the agent has not enforced yet.
    #[default]
    Policies,
}

/// What `explain` and `lint` need of a pod beyond enforcement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub groups_source: GroupsSource,
    /// The groups the policies give the pod now (they differ from its groups
    /// when a policy changed after the pod was created).
    pub policy_groups: Vec<GroupId>,
    /// TCP ports the kubelet probes (named ports resolved).
    pub probes: Vec<Probe>,
    /// `spec.dnsConfig.nameservers`.
    pub dns_nameservers: Vec<IpAddr>,
    /// `spec.terminationGracePeriodSeconds`, when set.
    pub termination_grace_seconds: Option<i64>,
    /// The SecurityGroupPolicies that select the pod, as `namespace/name`.
    pub policies: Vec<String>,
    /// Why the pod's groups cannot be known, when they cannot: its VLAN then drops
    /// everything security groups filter.
    pub quarantine: Option<Quarantine>,
    /// The state file the pod was read from (findings about it name it).
    pub file: PathBuf,
}

/// A pod of this node whose groups cannot be known (docs/isolation.md): it is
/// enforced with no group at all, so its VLAN drops everything security groups
/// filter, and only it; every other pod keeps its verdicts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantine {
    pub reason: String,
    pub cause: QuarantineCause,
    /// The action the pod has once released (its groups known again).
    pub action: EnforcingAction,
}

/// What can release a quarantined pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuarantineCause {
    /// The policies that select the pod now cannot give its groups (a policy that
    /// cannot be read, a group EC2 does not list yet, more groups than a branch ENI
    /// takes): the groups the agent kept from the pod's first enforcement release it,
    /// as EC2 keeps a running pod's groups whatever the policies say now.
    Policies,
    /// The pod itself (its annotation, a VLAN another pod claims, a group its branch
    /// ENI or its kept groups name that the state does not define): only a change of
    /// the state releases it.
    Pod,
}

/// A liveness, readiness or startup probe over TCP (`httpGet`, `tcpSocket`, `grpc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub kind: &'static str,
    pub container: String,
    pub port: u16,
}

/// What `enforcer lint` needs of the cluster beyond this node's pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// Addresses of the cluster DNS endpoints (pods labelled `k8s-app: kube-dns`).
    pub dns_endpoints: Vec<IpAddr>,
    /// SecurityGroupPolicies that select no pod of the state, as `namespace/name`.
    pub idle_policies: Vec<String>,
    /// Pods of this node that a SecurityGroupPolicy selects but that have no branch ENI
    /// yet (no `vpc.amazonaws.com/pod-eni`), as `namespace/name`: they wait for one.
    pub awaiting_branch: Vec<String>,
    /// Every pod of this node, host-network ones included (what max-pods counts).
    pub pods_on_node: usize,
}

impl BranchPod {
    /// `namespace/name`, how users name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What tells this pod from another of the same name or VLAN: its UID, or
    /// `namespace/name` for an object without one. One longer than the kernel's
    /// key holds is given as its digest, so that no pod is refused for its name.
    pub fn identity(&self) -> String {
        let identity = if self.uid.is_empty() {
            self.key()
        } else {
            self.uid.clone()
        };
        if identity.len() <= enforcer_common::POD_IDENTITY_BYTES {
            return identity;
        }
        // FNV-1a: stable across builds, so an upgraded agent finds what it kept.
        let digest = identity
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        format!("fnv1a64:{digest:016x}")
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// Everything the evaluator and the compiler need, resolved from a state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    pub node: NodeConfig,
    pub groups: BTreeMap<GroupId, SecurityGroup>,
    /// Managed prefix list ID -> its CIDRs.
    pub prefix_lists: BTreeMap<String, Vec<Cidr>>,
    /// Group ID -> the private addresses (host prefixes) and delegated prefixes of every
    /// ENI carrying it (for `UserIdGroupPairs` peers), as sg-semantics.md §3 builds them.
    pub members: BTreeMap<GroupId, BTreeSet<Cidr>>,
    /// Branch pods of this node, sorted by VLAN.
    pub pods: Vec<BranchPod>,
    /// Addresses that are "on the node" (sg-semantics.md §6): the node's primary
    /// IPs and every pod whose `spec.nodeName` is this node, branch or not.
    pub node_local: BTreeSet<IpAddr>,
    /// What the resolver noticed, set aside or quarantined, each with the object,
    /// field and reason (docs/isolation.md): reported, never a refusal.
    pub findings: Vec<Finding>,
    /// Groups carried by a Network Load Balancer's ENIs (`ELB net/…`): with
    /// client IP preservation, relayed traffic keeps the client's address, so
    /// a rule naming such a group cannot match it on the pod's side.
    pub nlb_groups: BTreeSet<GroupId>,
    /// What `enforcer lint` looks at beyond this node.
    pub cluster: ClusterFacts,
}

impl Model {
    /// The enforced pod called `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&BranchPod> {
        self.pods.iter().find(|p| p.key() == key)
    }

    /// Findings of one kind.
    pub fn findings_of(&self, kind: FindingKind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }

    /// Enforces `self.pods[index]` with no group, for `reason` (a finding names it).
    pub fn quarantine(&mut self, index: usize, reason: String, cause: QuarantineCause) {
        let pod = &mut self.pods[index];
        let action = match &pod.facts.quarantine {
            Some(held) => held.action,
            None => pod.action,
        };
        self.findings.retain(|f| !is_quarantine_of(f, pod));
        self.findings.push(Finding {
            kind: FindingKind::Quarantined,
            at: StateError {
                file: pod.facts.file.clone(),
                object: format!("Pod {}", pod.key()),
                field: None,
                message: format!(
                    "VLAN {} drops what security groups filter: {reason}",
                    pod.vlan
                ),
            },
        });
        pod.groups.clear();
        // The node's own action still holds: a node in audit never drops.
        pod.action = self.node.enforcing_action;
        pod.facts.quarantine = Some(Quarantine {
            reason,
            cause,
            action,
        });
    }

    /// Ends `self.pods[index]`'s quarantine: it takes `groups` and its own action.
    pub fn release(&mut self, index: usize, groups: Vec<GroupId>) {
        let pod = &mut self.pods[index];
        if let Some(held) = pod.facts.quarantine.take() {
            pod.action = held.action;
        }
        pod.groups = groups;
        self.findings.retain(|f| !is_quarantine_of(f, pod));
    }
}

fn is_quarantine_of(finding: &Finding, pod: &BranchPod) -> bool {
    finding.kind == FindingKind::Quarantined
        && finding.at.object.strip_prefix("Pod ") == Some(pod.key().as_str())
}

/// One problem in a state directory: where it is, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateError {
    pub file: PathBuf,
    /// The object, e.g. `SecurityGroup sg-0abc`, `Pod default/web`, `NodeConfig`.
    pub object: String,
    /// The field inside the object, e.g. `IpPermissions[2].FromPort`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if !self.object.is_empty() {
            write!(f, "{}: ", self.object)?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for StateError {}

/// What the resolver did with an object that is not as it should be: the unit of
/// failure is the object, so each is reported (`check`, `status`, metrics, Events)
/// and the rest of the state is enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    pub at: StateError,
}

/// How far an object's problem reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// Accepted as it is, worth a look: EC2 accepts it too (a rule naming a group
    /// the state does not define, a group over the default rule quota).
    Warning,
    /// An annotation not applied (an action the node does not let the pod choose,
    /// a value that is not one), or an object of another node that cannot be read.
    Ignored,
    /// An object set aside: a policy, group, prefix list, interface or service account
    /// that cannot be read or used; what depends on it is quarantined.
    Skipped,
    /// A pod of this node whose groups cannot be known: its VLAN drops what security
    /// groups filter ([`Quarantine`]).
    Quarantined,
}

impl FindingKind {
    pub const ALL: [Self; 4] = [
        Self::Warning,
        Self::Ignored,
        Self::Skipped,
        Self::Quarantined,
    ];

    /// As status, metrics labels and `check` spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Ignored => "ignored",
            Self::Skipped => "skipped",
            Self::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_limits_as_the_vpc_resource_controller_has_them() {
        let limits =
            |t: &str| InstanceLimits::of(t).map(|l| (l.branch_interfaces, l.default_max_pods()));
        // sg-semantics.md §1, and the EKS guide's m5.large: 9 branch ENIs, max-pods 29.
        assert_eq!(limits("m5.large"), Some((9, 29)));
        assert_eq!(limits("m5.xlarge").map(|l| l.0), Some(18));
        assert_eq!(limits("m5.2xlarge").map(|l| l.0), Some(38));
        assert_eq!(limits("m5.4xlarge").map(|l| l.0), Some(54));
        assert_eq!(limits("m5.24xlarge").map(|l| l.0), Some(107));
        assert_eq!(
            limits("t3.large").map(|l| l.0),
            Some(0),
            "t3 has no trunking"
        );
        assert_eq!(limits("m5.huge"), None);
        let table = instance_limits::INSTANCE_LIMITS;
        assert!(
            table.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted for the binary search"
        );
        assert_eq!(
            table.iter().map(|r| r.1).max(),
            Some(120),
            "the trunk's VLAN range"
        );
    }
}
