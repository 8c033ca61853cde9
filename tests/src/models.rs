//! Small hand-built models for tests that need one precise policy rather
//! than the bundled example state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{
    BranchPod, Cidr, ConntrackTimeouts, EnforcingAction, EnforcingMode, L4Match, Model, NodeConfig,
    Peer, Rule, SecurityGroup, UnknownVlanAction,
};

/// The node's primary IP in every hand-built model.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

/// A node in strict mode with `primary_groups`, VPC 10.0.0.0/16.
pub fn node_config(primary_groups: Vec<String>) -> NodeConfig {
    NodeConfig {
        name: "ip-10-0-1-10.ec2.internal".into(),
        enforcing_mode: EnforcingMode::Strict,
        // Interfaces every network namespace has: the kernel translates (source
        // NAT) only while it finds both, and these programs run under BPF_PROG_TEST_RUN.
        trunk_interface: "lo".into(),
        primary_interface: "lo".into(),
        primary_ips: vec![IpAddr::V4(NODE_IP)],
        primary_security_groups: primary_groups,
        vpc_cidrs: vec!["10.0.0.0/16".parse().expect("cidr")],
        external_snat: false,
        exclude_snat_cidrs: Vec::new(),
        snat_port_range: enforcer::model::DEFAULT_SNAT_PORT_RANGE,
        unknown_vlan: UnknownVlanAction::Drop,
        connection_tracking: ConntrackTimeouts::default(),
        instance_type: None,
        service_cidrs: Vec::new(),
        max_groups_per_pod: 16,
        max_rules_per_group: 60,
        enforcing_action: EnforcingAction::Enforce,
        audit_namespaces: Vec::new(),
        tcp_early_demux_disabled: false,
        max_flows_per_pod: enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
        max_fragments_per_pod: enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
    }
}

/// A rule allowing `l4` from/to `peer`.
pub fn rule(l4: L4Match, peer: &str) -> Rule {
    Rule {
        l4,
        peer: Peer::Cidr(peer.parse::<Cidr>().expect("cidr")),
        description: None,
    }
}

/// A group with the given rules.
pub fn group(id: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        id: id.into(),
        name: id.trim_start_matches("sg-").into(),
        description: String::new(),
        tags: BTreeMap::new(),
        ingress,
        egress,
    }
}

/// A branch pod of this node in strict mode.
pub fn branch_pod(
    name: &str,
    vlan: u16,
    ipv4: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    groups: &[&str],
) -> BranchPod {
    BranchPod {
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        vlan,
        eni_id: format!("eni-{vlan:017x}"),
        mac: "0a:00:00:00:00:01".into(),
        ipv4: Some(ipv4),
        ipv6,
        subnet_v4: None,
        subnet_v6: None,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        mode: EnforcingMode::Strict,
        action: EnforcingAction::Enforce,
        facts: Default::default(),
    }
}

/// A model of `groups` and `pods`, with the pods and the node's IP on the node.
pub fn model(node: NodeConfig, groups: Vec<SecurityGroup>, pods: Vec<BranchPod>) -> Model {
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.extend(node.primary_ips.iter().copied());
    Model {
        members: groups
            .iter()
            .map(|g| (g.id.clone(), BTreeSet::new()))
            .collect(),
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        prefix_lists: BTreeMap::new(),
        pods,
        node_local,
        findings: Vec::new(),
        nlb_groups: Default::default(),
        node,
        cluster: Default::default(),
    }
}
