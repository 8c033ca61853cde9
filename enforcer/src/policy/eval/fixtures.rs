//! Small models for the tests of the evaluator and of the compiler, flow table and explainer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{
    BranchPod, Cidr, ConntrackTimeouts, EnforcingMode, L4Match, Model, NodeConfig, Peer, Rule,
    SecurityGroup, UnknownVlanAction,
};

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) fn cidr(s: &str) -> Peer {
    Peer::Cidr(s.parse::<Cidr>().unwrap())
}

pub(crate) fn rule(l4: L4Match, peer: Peer) -> Rule {
    Rule {
        l4,
        peer,
        description: None,
    }
}

pub(crate) fn tcp(from: u16, to: u16) -> L4Match {
    L4Match::Ports {
        protocol: 6,
        from,
        to,
    }
}

pub(crate) fn udp(from: u16, to: u16) -> L4Match {
    L4Match::Ports {
        protocol: 17,
        from,
        to,
    }
}

pub(crate) fn group(id: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        id: id.to_string(),
        name: format!("{id}-name"),
        description: String::new(),
        tags: BTreeMap::new(),
        ingress,
        egress,
    }
}

pub(crate) fn pod(vlan: u16, ipv4: &str, groups: &[&str], mode: EnforcingMode) -> BranchPod {
    BranchPod {
        namespace: "default".to_string(),
        name: format!("pod{vlan}"),
        uid: format!("uid-{vlan}"),
        vlan,
        eni_id: format!("eni-{vlan}"),
        mac: format!("02:00:00:00:00:{vlan:02x}"),
        ipv4: Some(ipv4.parse().unwrap()),
        ipv6: Some(format!("2600:1f00::{vlan:x}").parse().unwrap()),
        subnet_v4: Some("10.0.64.0/19".parse().unwrap()),
        subnet_v6: Some("2600:1f00::/64".parse().unwrap()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        mode,
        action: Default::default(),
        facts: Default::default(),
    }
}

pub(crate) fn node(mode: EnforcingMode, primary_groups: &[&str]) -> NodeConfig {
    NodeConfig {
        name: "ip-10-0-1-10.ec2.internal".to_string(),
        enforcing_mode: mode,
        trunk_interface: "eth1".to_string(),
        primary_interface: "eth0".to_string(),
        primary_ips: vec![ip("10.0.1.10")],
        primary_security_groups: primary_groups.iter().map(|g| g.to_string()).collect(),
        vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
        external_snat: false,
        exclude_snat_cidrs: Vec::new(),
        snat_port_range: crate::model::DEFAULT_SNAT_PORT_RANGE,
        unknown_vlan: UnknownVlanAction::Drop,
        connection_tracking: ConntrackTimeouts::default(),
        instance_type: None,
        service_cidrs: Vec::new(),
        max_groups_per_pod: 16,
        max_rules_per_group: 60,
        enforcing_action: Default::default(),
        audit_namespaces: Vec::new(),
        tcp_early_demux_disabled: false,
        max_flows_per_pod: enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
        max_fragments_per_pod: enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
    }
}

/// Groups, pods, the node's primary groups `sg-node`; node-local: the node and pods.
pub(crate) fn model(groups: Vec<SecurityGroup>, pods: Vec<BranchPod>) -> Model {
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.insert(ip("10.0.1.10"));
    Model {
        node: node(EnforcingMode::Strict, &["sg-node"]),
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        prefix_lists: BTreeMap::new(),
        members: BTreeMap::new(),
        pods,
        node_local,
        findings: Vec::new(),
        nlb_groups: BTreeSet::new(),
        cluster: Default::default(),
    }
}
