//! `enforcer lint`: the pitfalls of security groups for pods (EKS best
//! practices guide, sg-semantics.md §8) found in a resolved state before they
//! break anything. One check per pitfall, each finding with a stable ID.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use crate::model::{
    BranchPod, Cidr, Direction, EnforcingMode, FindingKind, GroupsSource, InstanceLimits, L4Match,
    Model, Peer, Rule,
};
use crate::policy::eval::{self, L4Packet, L4Query, Query, Reason, Refused};

/// How bad a finding is: `--severity` keeps those at or above a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One pitfall found in the state (the `--json` contract: design.md, `lint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable: `SGP` and a number, never reused for another check.
    pub id: &'static str,
    pub severity: Severity,
    /// What it concerns: `pod ns/name`, `policy ns/name`, `group sg-…`, `rule sg-… ingress #n`.
    pub objects: Vec<String>,
    pub message: String,
    pub fix: String,
    /// Where the advice comes from.
    pub reference: &'static str,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        writeln!(f, "{severity} {}: {}", self.id, self.message)?;
        writeln!(f, "  concerns: {}", self.objects.join(", "))?;
        writeln!(f, "  fix: {}", self.fix)?;
        write!(f, "  see: {}", self.reference)
    }
}

const GUIDE: &str = "EKS Best Practices Guide, Networking, Security Groups per Pod";
/// NodeLocal DNSCache's link-local listen address.
const NODE_LOCAL_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 20, 10));
/// The tag the AWS Load Balancer Controller looks for among a pod's groups.
const CLUSTER_TAG: &str = "kubernetes.io/cluster/";

/// Every finding of the state, pod by pod, then cluster-wide.
pub fn lint(model: &Model) -> Vec<Finding> {
    let mut findings = Vec::new();
    early_demux(model, &mut findings);
    branch_capacity(model, &mut findings);
    for pod in &model.pods {
        probes(model, pod, &mut findings);
        dns(model, pod, &mut findings);
        internet(model, pod, &mut findings);
        primary_refuses(model, pod, &mut findings);
        grace_period(pod, &mut findings);
        policies(pod, &mut findings);
        cluster_tag(model, pod, &mut findings);
        drift(pod, &mut findings);
    }
    for policy in &model.cluster.idle_policies {
        findings.push(Finding {
            id: "SGP009",
            severity: Severity::Warning,
            objects: vec![format!("policy {policy}")],
            message: format!("SecurityGroupPolicy {policy} selects no pod"),
            fix: "check its podSelector and serviceAccountSelector against the pods' and service \
                  accounts' labels (both selectors must match when both are set)"
                .to_string(),
            reference: GUIDE,
        });
    }
    for found in &model.findings {
        let (id, severity, fix) = match found.kind {
            FindingKind::Warning => (
                "SGP011",
                Severity::Warning,
                "if a rule names a deleted group, remove the rule; if it is another account's or \
                 a peered VPC's, its members are unknown here; raise maxRulesPerGroup or \
                 maxSecurityGroupsPerPod to the account's quotas",
            ),
            FindingKind::Ignored => (
                "SGP015",
                Severity::Warning,
                "fix or remove the annotation; to let a namespace's pods choose audit, list it \
                 in the NodeConfig's auditNamespaces",
            ),
            FindingKind::Skipped => (
                "SGP015",
                Severity::Error,
                "fix the object: until then it is set aside and what depends on it is quarantined",
            ),
            FindingKind::Quarantined => (
                "SGP015",
                Severity::Error,
                "fix what the reason names (or wait for EC2 to list a new group); the pod's VLAN \
                 drops what security groups filter until then",
            ),
        };
        findings.push(Finding {
            id,
            severity,
            objects: vec![found.at.object.clone()],
            message: found.to_string(),
            fix: fix.to_string(),
            reference: "docs/isolation.md",
        });
    }
    findings
}

fn pod_object(pod: &BranchPod) -> String {
    format!("pod {}", pod.key())
}

/// The verdict on a new flow of `pod`.
fn verdict(
    model: &Model,
    pod: &BranchPod,
    direction: Direction,
    peer: IpAddr,
    packet: L4Packet,
) -> eval::Evaluation {
    let query = Query {
        direction,
        peer,
        l4: L4Query::Packet(packet),
    };
    eval::evaluate(model, pod, &query)
}

/// SGP002: strict-mode probes also need TCP early demux off on the node
/// (`NodeConfig.spec.tcpEarlyDemuxDisabled` says whether it is).
fn early_demux(model: &Model, findings: &mut Vec<Finding>) {
    let probed: Vec<String> = model
        .pods
        .iter()
        .filter(|p| p.mode == EnforcingMode::Strict && !p.facts.probes.is_empty())
        .map(pod_object)
        .collect();
    if probed.is_empty() {
        return;
    }
    let finding = if model.node.tcp_early_demux_disabled {
        Finding {
            id: "SGP002",
            severity: Severity::Info,
            objects: probed,
            message: "strict-mode pods with kubelet probes: TCP early demux is off on the node \
                      (tcpEarlyDemuxDisabled), as their probes need"
                .to_string(),
            fix: "nothing; keep DISABLE_TCP_EARLY_DEMUX=true on aws-node's init container"
                .to_string(),
            reference: GUIDE,
        }
    } else {
        Finding {
            id: "SGP002",
            severity: Severity::Warning,
            objects: probed,
            message: "strict-mode pods with kubelet probes: the probes fail while TCP early \
                      demux is on (the NodeConfig's tcpEarlyDemuxDisabled is not true)"
                .to_string(),
            fix: "set DISABLE_TCP_EARLY_DEMUX=true on aws-node's init container \
                  (aws-vpc-cni-init), then tcpEarlyDemuxDisabled: true in the NodeConfig"
                .to_string(),
            reference: GUIDE,
        }
    };
    findings.push(finding);
}

/// SGP013/SGP014: branch ENIs per instance type (the VPC resource controller's
/// table); pods with one count against max-pods, which only counts secondary IPs.
fn branch_capacity(model: &Model, findings: &mut Vec<Finding>) {
    let awaiting = &model.cluster.awaiting_branch;
    let wanting = model.pods.len() + awaiting.len();
    if wanting == 0 {
        return;
    }
    let objects = || {
        model
            .pods
            .iter()
            .map(pod_object)
            .chain(awaiting.iter().map(|p| format!("pod {p}")))
            .collect::<Vec<_>>()
    };
    let instance_type = model.node.instance_type.as_deref();
    let Some(limits) = instance_type.and_then(InstanceLimits::of) else {
        findings.push(Finding {
            id: "SGP013",
            severity: Severity::Info,
            objects: objects(),
            message: format!(
                "{wanting} pod(s) want a branch ENI on this node; its capacity is unknown: {}",
                match instance_type {
                    Some(t) => format!("instance type {t} is not in the table"),
                    None => "the NodeConfig names no instanceType".to_string(),
                }
            ),
            fix: "set the NodeConfig's instanceType (the table is the VPC resource \
                  controller's, pkg/aws/vpc/limits.go)"
                .to_string(),
            reference: "sg-semantics.md §1",
        });
        return;
    };
    let instance_type = instance_type.unwrap_or_default();
    let branch = limits.branch_interfaces as usize;
    if wanting > branch {
        findings.push(Finding {
            id: "SGP013",
            severity: Severity::Error,
            objects: objects(),
            message: format!(
                "{wanting} pod(s) want a branch ENI on this node ({} with one, {} waiting), and \
                 {instance_type} has {}: {} will not start",
                model.pods.len(),
                awaiting.len(),
                if branch == 0 {
                    "none (no trunking)".to_string()
                } else {
                    branch.to_string()
                },
                wanting - branch
            ),
            fix: "run these pods on instance types with more branch ENIs (the scheduler counts \
                  vpc.amazonaws.com/pod-eni), or fewer of them per node"
                .to_string(),
            reference: GUIDE,
        });
    }
    // Max-pods, not the branch ENIs, limits the node when its pods plus the branch ENIs
    // still free exceed it.
    let max_pods = limits.default_max_pods() as usize;
    let free = branch.saturating_sub(wanting);
    let pods = model.cluster.pods_on_node;
    if free > 0 && pods + free > max_pods {
        findings.push(Finding {
            id: "SGP014",
            severity: Severity::Info,
            objects: vec![format!("node {}", model.node.name)],
            message: format!(
                "max-pods stops this node before its branch ENIs run out: {instance_type}'s \
                 default max-pods ({max_pods}) counts secondary IPs only, yet its {pods} pods, \
                 {wanting} with branch ENIs, count against it; {free} branch ENI(s) are free"
            ),
            fix: "raise the node's max-pods by the branch ENIs you use, or accept fewer pods"
                .to_string(),
            reference: GUIDE,
        });
    }
}

/// SGP001: in strict mode the kubelet's probes come from the node and cross
/// the trunk like any peer's traffic.
fn probes(model: &Model, pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.mode != EnforcingMode::Strict || pod.facts.probes.is_empty() {
        return;
    }
    let Some(&node) = model.node.primary_ips.first() else {
        return;
    };
    for probe in &pod.facts.probes {
        let e = verdict(
            model,
            pod,
            Direction::Ingress,
            node,
            L4Packet::tcp(probe.port),
        );
        if !e.allowed {
            findings.push(Finding {
                id: "SGP001",
                severity: Severity::Error,
                objects: vec![pod_object(pod)],
                message: format!(
                    "the {} of container {} (TCP {}) will fail: no ingress rule of the pod's \
                     groups ({}) allows it from the node ({node})",
                    probe.kind,
                    probe.container,
                    probe.port,
                    pod.groups.join(", ")
                ),
                fix: format!(
                    "allow TCP {} from the node's security group (or its primary IP) in one of \
                     the pod's groups",
                    probe.port
                ),
                reference: GUIDE,
            });
        }
    }
}

/// SGP003/SGP004: DNS goes to the cluster DNS endpoints (the VPC resolver is never filtered).
fn dns(model: &Model, pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.mode == EnforcingMode::Strict && pod.facts.dns_nameservers.contains(&NODE_LOCAL_DNS) {
        findings.push(Finding {
            id: "SGP004",
            severity: Severity::Error,
            objects: vec![pod_object(pod)],
            message: format!(
                "the pod resolves through NodeLocal DNSCache ({NODE_LOCAL_DNS}), which strict \
                 mode cannot reach"
            ),
            fix: "use the cluster DNS service in strict mode, or standard mode".to_string(),
            reference: GUIDE,
        });
    }
    let endpoints = &model.cluster.dns_endpoints;
    if endpoints.is_empty() {
        return;
    }
    for (protocol, packet) in [("UDP", L4Packet::udp(53)), ("TCP", L4Packet::tcp(53))] {
        let reachable = endpoints
            .iter()
            .any(|&dns| verdict(model, pod, Direction::Egress, dns, packet).allowed);
        if !reachable {
            findings.push(Finding {
                id: "SGP003",
                severity: Severity::Error,
                objects: vec![pod_object(pod)],
                message: format!(
                    "DNS will fail: no egress rule of the pod's groups allows {protocol} 53 to \
                     the cluster DNS endpoints ({})",
                    join(endpoints)
                ),
                fix: "allow TCP and UDP 53 to the CoreDNS pods (their security group or \
                      addresses) in the pod's groups"
                    .to_string(),
                reference: GUIDE,
            });
        }
    }
}

/// SGP005: strict mode has no source NAT: the internet needs a NAT gateway.
fn internet(model: &Model, pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.mode != EnforcingMode::Strict {
        return;
    }
    let open_egress = pod
        .groups
        .iter()
        .filter_map(|g| model.groups.get(g))
        .flat_map(|g| &g.egress)
        .any(|rule| matches!(&rule.peer, Peer::Cidr(c) if c.is_everything()));
    if open_egress {
        findings.push(Finding {
            id: "SGP005",
            severity: Severity::Info,
            objects: vec![pod_object(pod)],
            message: "strict mode does not source-NAT: the pod reaches the internet with its own \
                      address, only through a NAT gateway (not from a public subnet's internet \
                      gateway)"
                .to_string(),
            fix: "route the pod subnet's default route to a NAT gateway".to_string(),
            reference: GUIDE,
        });
    }
}

/// SGP006: standard mode needs the node's groups to allow what the pod's do.
fn primary_refuses(model: &Model, pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.mode != EnforcingMode::Standard {
        return;
    }
    for group in pod.groups.iter().filter_map(|g| model.groups.get(g)) {
        for direction in [Direction::Ingress, Direction::Egress] {
            for (index, rule) in group.rules(direction).iter().enumerate() {
                let Some((peer, packet)) = example(model, rule) else {
                    continue;
                };
                let e = verdict(model, pod, direction, peer, packet);
                if e.reason
                    == (Reason::NoRule {
                        refused: Refused::Primary,
                    })
                {
                    findings.push(Finding {
                        id: "SGP006",
                        severity: Severity::Warning,
                        objects: vec![
                            pod_object(pod),
                            format!("rule {} {} #{index}", group.id, direction.as_str()),
                        ],
                        message: format!(
                            "standard mode: {} #{index} allows {} {peer} {}, but the node's \
                             groups ({}) refuse it",
                            group.id,
                            direction.as_str(),
                            describe(packet),
                            model.node.primary_security_groups.join(", ")
                        ),
                        fix: "allow the same traffic in the node's groups, or use strict mode"
                            .to_string(),
                        reference: GUIDE,
                    });
                }
            }
        }
    }
}

/// A flow `rule` allows: its peer's first address and its first port or type.
fn example(model: &Model, rule: &Rule) -> Option<(IpAddr, L4Packet)> {
    let cidr: Cidr = match &rule.peer {
        Peer::Cidr(c) => *c,
        Peer::PrefixList(id) => *model.prefix_lists.get(id)?.first()?,
        Peer::Group(id) => *model.members.get(id)?.first()?,
    };
    let host_len = if cidr.is_ipv4() { 32 } else { 128 };
    let peer = if cidr.is_everything() {
        // The whole internet: a documentation address stands for it.
        if cidr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))
        } else {
            "2001:db8::1".parse().ok()?
        }
    } else {
        // The first host of a network, the address itself of a host.
        cidr.nth(u32::from(cidr.prefix_len() < host_len))
    };
    let packet = match rule.l4 {
        L4Match::All => L4Packet::tcp(443),
        L4Match::Ports { protocol, from, .. } => L4Packet::new(protocol, from, 0, 0),
        L4Match::Icmp {
            v6,
            icmp_type,
            code,
        } => {
            let (t, c) = (icmp_type.unwrap_or(8), code.unwrap_or(0));
            if v6 {
                L4Packet::icmpv6(t, c)
            } else {
                L4Packet::icmp(t, c)
            }
        }
        L4Match::Protocol(protocol) => L4Packet::new(protocol, 0, 0, 0),
    };
    Some((peer, packet))
}

fn describe(packet: L4Packet) -> String {
    match packet.protocol {
        6 => format!("TCP {}", packet.selector),
        17 => format!("UDP {}", packet.selector),
        1 | 58 => format!("ICMP type {}", packet.icmp_type()),
        other => format!("protocol {other}"),
    }
}

/// SGP007: a pod killed at once leaves its branch ENI to be cleaned up late.
fn grace_period(pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.facts.termination_grace_seconds == Some(0) {
        findings.push(Finding {
            id: "SGP007",
            severity: Severity::Warning,
            objects: vec![pod_object(pod)],
            message: "terminationGracePeriodSeconds is 0 on a pod with a branch ENI: the ENI may \
                      be released before the pod's networking is torn down"
                .to_string(),
            fix: "leave terminationGracePeriodSeconds above 0 (the default is 30)".to_string(),
            reference: GUIDE,
        });
    }
}

/// SGP008: legal, but the union surprises.
fn policies(pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.facts.policies.len() > 1 {
        findings.push(Finding {
            id: "SGP008",
            severity: Severity::Info,
            objects: std::iter::once(pod_object(pod))
                .chain(pod.facts.policies.iter().map(|p| format!("policy {p}")))
                .collect(),
            message: format!(
                "{} SecurityGroupPolicies select the pod: its groups are their union ({})",
                pod.facts.policies.len(),
                pod.groups.join(", ")
            ),
            fix: "nothing, if the union is intended".to_string(),
            reference: "sg-semantics.md §2",
        });
    }
}

/// SGP010: with several groups, the AWS Load Balancer Controller needs exactly
/// one tagged for the cluster.
fn cluster_tag(model: &Model, pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.groups.len() < 2 {
        return;
    }
    let tagged: Vec<&str> = pod
        .groups
        .iter()
        .filter(|g| {
            model
                .groups
                .get(*g)
                .is_some_and(|g| g.tags.keys().any(|k| k.starts_with(CLUSTER_TAG)))
        })
        .map(String::as_str)
        .collect();
    if tagged.len() != 1 {
        findings.push(Finding {
            id: "SGP010",
            severity: Severity::Warning,
            objects: std::iter::once(pod_object(pod))
                .chain(pod.groups.iter().map(|g| format!("group {g}")))
                .collect(),
            message: format!(
                "the pod has {} groups and {} of them tagged {CLUSTER_TAG}<cluster>: the AWS \
                 Load Balancer Controller needs exactly one to add its rules to",
                pod.groups.len(),
                tagged.len()
            ),
            fix: format!("tag exactly one of the pod's groups {CLUSTER_TAG}<cluster name>"),
            reference: GUIDE,
        });
    }
}

/// SGP012: groups are fixed when a pod is created; a policy edited since then
/// applies to the pod only once it is recreated.
fn drift(pod: &BranchPod, findings: &mut Vec<Finding>) {
    if pod.facts.groups_source == GroupsSource::Policies
        || eval::sorted_set(&pod.groups) == eval::sorted_set(&pod.facts.policy_groups)
    {
        return;
    }
    findings.push(Finding {
        id: "SGP012",
        severity: Severity::Warning,
        objects: std::iter::once(pod_object(pod))
            .chain(pod.facts.policies.iter().map(|p| format!("policy {p}")))
            .collect(),
        message: format!(
            "the pod has {}, its policies now give {}: a running pod keeps the groups it was \
             created with",
            pod.groups.join(", "),
            pod.facts.policy_groups.join(", ")
        ),
        fix: "recreate the pod (roll its deployment) to take the policies' groups".to_string(),
        reference: "sg-semantics.md §2",
    });
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Probe, SecurityGroup};
    use crate::policy::eval::fixtures::*;

    const STRICT: EnforcingMode = EnforcingMode::Strict;
    const STANDARD: EnforcingMode = EnforcingMode::Standard;

    /// One pod in `sg-app` (ingress TCP 8080 from the VPC, egress UDP 53 to the
    /// VPC), the node in `sg-node` (everything from 10.0.0.0/8 in, all out).
    fn setup(mode: EnforcingMode) -> Model {
        let app = group(
            "sg-app",
            vec![rule(tcp(8080, 8080), cidr("10.0.0.0/16"))],
            vec![rule(udp(53, 53), cidr("10.0.0.0/16"))],
        );
        let node = group(
            "sg-node",
            vec![rule(L4Match::All, cidr("10.0.0.0/8"))],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        let mut m = model(
            vec![app, node],
            vec![pod(5, "10.0.64.5", &["sg-app"], mode)],
        );
        m.node.enforcing_mode = mode;
        // 9 branch ENIs, max-pods 29: room for the tests' pods.
        m.node.instance_type = Some("m5.large".to_string());
        m
    }

    fn ids(model: &Model) -> Vec<&'static str> {
        lint(model).iter().map(|f| f.id).collect()
    }

    fn probe(port: u16) -> Probe {
        Probe {
            kind: "readinessProbe",
            container: "app".to_string(),
            port,
        }
    }

    #[test]
    fn probes_the_pods_groups_refuse_from_the_node_fail_in_strict_mode() {
        let mut m = setup(STRICT);
        m.pods[0].facts.probes = vec![probe(8080)];
        assert_eq!(
            ids(&m),
            ["SGP002"],
            "8080 is allowed from the VPC, the node included"
        );
        m.pods[0].facts.probes.push(probe(9090));
        let findings = lint(&m);
        let failing: Vec<_> = findings.iter().filter(|f| f.id == "SGP001").collect();
        assert_eq!(failing.len(), 1, "{findings:#?}");
        assert!(
            failing[0].message.contains("TCP 9090"),
            "{}",
            failing[0].message
        );
        assert_eq!(failing[0].severity, Severity::Error);
        // Standard mode does not check traffic from the node.
        let mut m = setup(STANDARD);
        m.pods[0].facts.probes = vec![probe(9090)];
        assert!(!ids(&m).contains(&"SGP001"));
    }

    #[test]
    fn early_demux_is_a_warning_until_the_node_config_says_it_is_off() {
        let mut m = setup(STRICT);
        m.pods[0].facts.probes = vec![probe(8080)];
        let demux = |m: &Model| {
            let findings = lint(m);
            assert_eq!(findings.len(), 1, "{findings:#?}");
            assert_eq!(findings[0].id, "SGP002");
            (findings[0].severity, findings[0].message.clone())
        };
        let (severity, message) = demux(&m);
        assert_eq!(severity, Severity::Warning, "{message}");
        assert!(message.contains("fail"), "{message}");
        m.node.tcp_early_demux_disabled = true;
        let (severity, message) = demux(&m);
        assert_eq!(severity, Severity::Info, "{message}");
        assert!(message.contains("is off"), "{message}");
        // Standard mode does not send the kubelet's probes through the trunk.
        m.node.tcp_early_demux_disabled = false;
        m.pods[0].mode = STANDARD;
        assert_eq!(ids(&m), Vec::<&str>::new());
    }

    #[test]
    fn branch_enis_beyond_the_instance_types_capacity() {
        let mut m = setup(STRICT);
        let capacity = |m: &Model| -> Vec<(&'static str, Severity, String)> {
            lint(m)
                .into_iter()
                .filter(|f| matches!(f.id, "SGP013" | "SGP014"))
                .map(|f| (f.id, f.severity, f.message))
                .collect()
        };
        assert_eq!(capacity(&m), [], "1 of 9");
        // 1 with a branch ENI and 8 waiting: full, not over.
        m.cluster.awaiting_branch = (0..8).map(|i| format!("default/waiting-{i}")).collect();
        assert_eq!(capacity(&m), []);
        m.cluster
            .awaiting_branch
            .push("default/one-too-many".to_string());
        let found = capacity(&m);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!((found[0].0, found[0].1), ("SGP013", Severity::Error));
        assert!(
            found[0].2.contains("10 pod(s) want a branch ENI on this node (1 with one, 9 waiting), and m5.large has 9: 1 will not start"),
            "{}",
            found[0].2
        );
        m.cluster.awaiting_branch.clear();
        m.node.instance_type = Some("t3.large".to_string());
        let found = capacity(&m);
        assert!(found[0].2.contains("has none (no trunking)"), "{found:#?}");
        for (instance_type, says) in [
            (
                Some("m9z.large"),
                "instance type m9z.large is not in the table",
            ),
            (None, "names no instanceType"),
        ] {
            m.node.instance_type = instance_type.map(str::to_string);
            let found = capacity(&m);
            assert_eq!((found[0].0, found[0].1), ("SGP013", Severity::Info));
            assert!(found[0].2.contains("capacity is unknown") && found[0].2.contains(says));
        }
        // Max-pods (29) stops an m5.large with 27 pods before its 8 free branch ENIs.
        m.node.instance_type = Some("m5.large".to_string());
        m.cluster.pods_on_node = 21;
        assert_eq!(capacity(&m), [], "21 + 8 free = 29");
        m.cluster.pods_on_node = 27;
        let found = capacity(&m);
        assert_eq!((found[0].0, found[0].1), ("SGP014", Severity::Info));
        assert!(
            found[0].2.contains("default max-pods (29)"),
            "{}",
            found[0].2
        );
    }

    #[test]
    fn dns_needs_udp_and_tcp_53_to_the_cluster_dns_endpoints() {
        let mut m = setup(STRICT);
        assert_eq!(
            ids(&m),
            Vec::<&str>::new(),
            "no endpoints known: nothing to say"
        );
        m.cluster.dns_endpoints = vec![ip("10.0.5.5")];
        let findings = lint(&m);
        let dns: Vec<_> = findings.iter().filter(|f| f.id == "SGP003").collect();
        assert_eq!(dns.len(), 1, "UDP is allowed, TCP is not: {findings:#?}");
        assert!(dns[0].message.contains("TCP 53"));
        m.pods[0].facts.dns_nameservers = vec![ip("169.254.20.10")];
        assert!(ids(&m).contains(&"SGP004"));
        let mut standard = m.clone();
        standard.pods[0].mode = STANDARD;
        assert!(!ids(&standard).contains(&"SGP004"));
    }

    #[test]
    fn strict_pods_open_to_the_internet_need_a_nat_gateway() {
        let mut m = setup(STRICT);
        m.groups
            .get_mut("sg-app")
            .unwrap()
            .egress
            .push(rule(L4Match::All, cidr("0.0.0.0/0")));
        assert_eq!(ids(&m), ["SGP005"]);
    }

    #[test]
    fn standard_mode_names_a_flow_the_node_refuses() {
        let mut m = setup(STANDARD);
        m.node.primary_security_groups = vec!["sg-node".to_string()];
        m.groups
            .get_mut("sg-app")
            .unwrap()
            .ingress
            .push(rule(tcp(443, 443), cidr("0.0.0.0/0")));
        let findings = lint(&m);
        let refused: Vec<_> = findings.iter().filter(|f| f.id == "SGP006").collect();
        assert_eq!(refused.len(), 1, "{findings:#?}");
        assert!(
            refused[0].message.contains("ingress 198.51.100.1 TCP 443"),
            "{}",
            refused[0].message
        );
        assert!(
            refused[0]
                .objects
                .contains(&"rule sg-app ingress #1".to_string())
        );
    }

    #[test]
    fn grace_policies_and_tags() {
        let mut m = setup(STRICT);
        m.pods[0].facts.termination_grace_seconds = Some(0);
        m.pods[0].facts.policies = vec!["shop/a".to_string(), "shop/b".to_string()];
        m.cluster.idle_policies = vec!["shop/nobody".to_string()];
        assert_eq!(ids(&m), ["SGP007", "SGP008", "SGP009"]);
        // Two groups, none tagged for the cluster; then exactly one.
        m.pods[0].groups.push("sg-node".to_string());
        assert!(ids(&m).contains(&"SGP010"));
        let tag = |g: &mut SecurityGroup| {
            g.tags.insert(
                "kubernetes.io/cluster/shop-prod".to_string(),
                "owned".to_string(),
            );
        };
        tag(m.groups.get_mut("sg-app").unwrap());
        assert!(!ids(&m).contains(&"SGP010"));
        tag(m.groups.get_mut("sg-node").unwrap());
        assert!(ids(&m).contains(&"SGP010"), "two tagged is as bad as none");
    }

    #[test]
    fn a_pod_whose_policies_changed_since_it_was_created_is_reported() {
        let mut m = setup(STRICT);
        m.pods[0].facts.policy_groups = vec!["sg-node".to_string()];
        assert_eq!(
            ids(&m),
            Vec::<&str>::new(),
            "policies are the source: no drift"
        );
        m.pods[0].facts.groups_source = GroupsSource::BranchEni;
        let findings = lint(&m);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].id, "SGP012");
        assert!(
            findings[0]
                .message
                .contains("has sg-app, its policies now give sg-node")
        );
        m.pods[0].facts.policy_groups = vec!["sg-app".to_string()];
        assert_eq!(ids(&m), Vec::<&str>::new());
    }

    #[test]
    fn findings_serialize_as_the_contract_says() {
        let mut m = setup(STRICT);
        m.pods[0].facts.termination_grace_seconds = Some(0);
        let json = serde_json::to_value(lint(&m)).unwrap();
        assert_eq!(json[0]["id"], "SGP007");
        assert_eq!(json[0]["severity"], "warning");
        assert_eq!(json[0]["objects"][0], "pod default/pod5");
        for key in ["message", "fix", "reference"] {
            assert!(
                json[0][key].as_str().is_some_and(|s| !s.is_empty()),
                "{key}"
            );
        }
    }
}
