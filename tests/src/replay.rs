//! Frames as the `frame_oracle` fuzz corpus stores them, and the model they
//! are judged against, shared by the fuzz target (`fuzz/`) and the replay test
//! (`tests/tests/replay.rs`) that runs them through the kernel. Only `enforcer`
//! and the standard library, so that the fuzz crate can borrow the file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{
    BranchPod, Cidr, ConntrackTimeouts, Direction, EnforcingAction, EnforcingMode, L4Match, Model,
    NodeConfig, Peer, Rule, SecurityGroup, UnknownVlanAction,
};

/// The two VLANs of [`model`]'s pods.
pub const VLANS: [u16; 2] = [100, 200];

/// One frame to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub direction: Direction,
    /// The outer tag reaches the fast path in skb metadata.
    pub metadata: bool,
    pub frame: Vec<u8>,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    frame
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn is_tag(ethertype: Option<u16>) -> bool {
    matches!(ethertype, Some(0x8100 | 0x88a8))
}

/// A corpus input: byte 0 says the direction (bit 0: egress) and whether the
/// outer tag goes in metadata (bit 1, when the frame has a whole outer tag and,
/// behind it, no cut second one: what the test's tag mover can do); the rest
/// is the frame, zero-padded to an Ethernet header, and an untagged frame to
/// Ethernet's 60-byte minimum (the kernel's test runs refuse some shorter ones).
pub fn decode(input: &[u8]) -> Replayed {
    let (flags, frame) = input.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    let mut frame = frame.to_vec();
    if frame.len() < 14 {
        frame.resize(14, 0);
    }
    if !is_tag(be16(&frame, 12)) && frame.len() < 60 {
        frame.resize(60, 0);
    }
    let metadata = flags & 2 != 0
        && is_tag(be16(&frame, 12))
        && frame.len() >= 18
        && (!is_tag(be16(&frame, 16)) || frame.len() >= 22);
    Replayed {
        direction: if flags & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        metadata,
        frame,
    }
}

/// The corpus input for a frame ([`decode`] gives it back).
pub fn encode(direction: Direction, metadata: bool, frame: &[u8]) -> Vec<u8> {
    let mut input = vec![u8::from(direction == Direction::Egress) | (u8::from(metadata) << 1)];
    input.extend_from_slice(frame);
    input
}

impl Replayed {
    /// What the fast path sees: the bytes, and the VLAN ID in metadata (the
    /// outer tag taken out of the bytes), if it goes there.
    pub fn as_seen(&self) -> (Vec<u8>, Option<u16>) {
        if !self.metadata {
            return (self.frame.clone(), None);
        }
        let vid = be16(&self.frame, 14).expect("a whole tag") & 0x0fff;
        let mut seen = self.frame.clone();
        seen.drain(12..16);
        (seen, Some(vid))
    }
}

/// Two pods: VLAN 100 (10.0.1.20, 2600:1f14:0:1::20) takes TCP 443 from
/// anywhere and sends anything; VLAN 200 (10.0.1.21) takes ICMP from the VPC
/// and sends UDP 53. The node's IP is 10.0.1.10.
pub fn model() -> Model {
    let cidr = |s: &str| Peer::Cidr(s.parse::<Cidr>().expect("a CIDR"));
    let rule = |l4, peer| Rule {
        l4,
        peer,
        description: None,
    };
    let https = L4Match::Ports {
        protocol: 6,
        from: 443,
        to: 443,
    };
    let dns = L4Match::Ports {
        protocol: 17,
        from: 53,
        to: 53,
    };
    let any_icmp = L4Match::Icmp {
        v6: false,
        icmp_type: None,
        code: None,
    };
    let group = |id: &str, ingress, egress| SecurityGroup {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        tags: BTreeMap::new(),
        ingress,
        egress,
    };
    let groups = [
        group(
            "sg-0web",
            vec![rule(https, cidr("0.0.0.0/0")), rule(https, cidr("::/0"))],
            vec![
                rule(L4Match::All, cidr("0.0.0.0/0")),
                rule(L4Match::All, cidr("::/0")),
            ],
        ),
        group(
            "sg-0dns",
            vec![rule(any_icmp, cidr("10.0.0.0/16"))],
            vec![rule(dns, cidr("0.0.0.0/0"))],
        ),
    ];
    let pod = |name: &str, vlan, ipv4, ipv6, group: &str| BranchPod {
        namespace: "replay".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        vlan,
        eni_id: format!("eni-{vlan:017x}"),
        mac: "0a:00:00:00:00:01".into(),
        ipv4: Some(ipv4),
        ipv6,
        subnet_v4: Some("10.0.1.0/24".parse().expect("a CIDR")),
        subnet_v6: None,
        groups: vec![group.into()],
        mode: EnforcingMode::Strict,
        action: EnforcingAction::Enforce,
        facts: Default::default(),
    };
    let pods = vec![
        pod(
            "web",
            VLANS[0],
            Ipv4Addr::new(10, 0, 1, 20),
            Some(Ipv6Addr::new(0x2600, 0x1f14, 0, 1, 0, 0, 0, 0x20)),
            "sg-0web",
        ),
        pod(
            "dns",
            VLANS[1],
            Ipv4Addr::new(10, 0, 1, 21),
            None,
            "sg-0dns",
        ),
    ];
    let node_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 10));
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.insert(node_ip);
    Model {
        node: NodeConfig {
            name: "replay".into(),
            enforcing_mode: EnforcingMode::Strict,
            // Interfaces every network namespace has: the kernel translates (source
            // NAT) only while it finds both, and these programs run under BPF_PROG_TEST_RUN.
            trunk_interface: "lo".into(),
            primary_interface: "lo".into(),
            primary_ips: vec![node_ip],
            primary_security_groups: vec!["sg-0web".into()],
            vpc_cidrs: vec!["10.0.0.0/16".parse().expect("a CIDR")],
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
        },
        members: groups
            .iter()
            .map(|g| (g.id.clone(), BTreeSet::new()))
            .collect(),
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        prefix_lists: BTreeMap::new(),
        pods,
        node_local,
        findings: Vec::new(),
        nlb_groups: BTreeSet::new(),
        cluster: Default::default(),
    }
}
