//! What the fuzz targets share: the example state they put fuzzed files into,
//! a decoder of bytes into models and queries for the compiler, and the
//! frame-stage oracle with its replay model (borrowed from `tests/src`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use enforcer::model::{
    BranchPod, Cidr, ConntrackTimeouts, Direction, EnforcingAction, EnforcingMode, L4Match, Model,
    NodeConfig, Peer, Rule, SecurityGroup, UnknownVlanAction,
};
use enforcer::policy::eval::{L4Packet, L4Query, Query};

#[path = "../../tests/src/frame_oracle.rs"]
pub mod frame_oracle;
#[path = "../../tests/src/replay.rs"]
pub mod replay;

/// The example state (`deploy/agent/example-state`), file by file.
pub const EXAMPLE_STATE: [(&str, &str); 7] = [
    (
        "network-interfaces.json",
        include_str!("../../deploy/agent/example-state/network-interfaces.json"),
    ),
    (
        "node-config.yaml",
        include_str!("../../deploy/agent/example-state/node-config.yaml"),
    ),
    (
        "pods.yaml",
        include_str!("../../deploy/agent/example-state/pods.yaml"),
    ),
    (
        "prefix-list-partner-apis.json",
        include_str!("../../deploy/agent/example-state/prefix-list-partner-apis.json"),
    ),
    (
        "security-group-policies.yaml",
        include_str!("../../deploy/agent/example-state/security-group-policies.yaml"),
    ),
    (
        "security-groups.json",
        include_str!("../../deploy/agent/example-state/security-groups.json"),
    ),
    (
        "service-accounts.yaml",
        include_str!("../../deploy/agent/example-state/service-accounts.yaml"),
    ),
];

/// Loads the example state with one file replaced: the first byte of `input`
/// picks which of `candidates` (file names of [`EXAMPLE_STATE`]) and the rest
/// is its text, read as JSON or YAML by `extension`, and the state is parsed
/// and resolved as `enforcer check` reads a directory: no input may panic.
pub fn load_with_fuzzed_file(input: &[u8], candidates: &[&str], extension: &str) {
    let Some((&pick, text)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let replaced = candidates[usize::from(pick) % candidates.len()];
    let stem = replaced.rsplit_once('.').map_or(replaced, |(stem, _)| stem);
    let name = format!("{stem}.{extension}");
    let mut documents = enforcer::source::state::Documents::default();
    for (file, contents) in EXAMPLE_STATE.iter().filter(|(file, _)| *file != replaced) {
        documents.insert(*file, *contents);
    }
    documents.insert(name, text);
    // Errors are fine (they name file, object and field); a panic is the finding.
    let _ = enforcer::source::load_documents(Path::new("/fuzz/state"), &documents);
}

/// Bytes read one at a time; zeros once they run out.
pub struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn below(&mut self, n: u8) -> u8 {
        self.u8() % n
    }
}

/// Addresses from a small space, so prefixes, peers and packets overlap often.
fn addr(b: &mut Bytes, v6: bool) -> IpAddr {
    if v6 {
        let segment = u16::from(b.below(4));
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            segment,
            0,
            0,
            0,
            0,
            u16::from(b.below(16)),
            b.u16(),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, b.below(4), b.below(16), b.u8()))
    }
}

fn cidr(b: &mut Bytes, v6: bool) -> Cidr {
    let address = addr(b, v6);
    let len = b.u8() % if v6 { 129 } else { 33 };
    Cidr::new(address, len).expect("a length in range")
}

fn group_id(i: u8) -> String {
    format!("sg-{i:017x}")
}

fn l4_match(b: &mut Bytes) -> L4Match {
    let optional = |b: &mut Bytes| (b.u8() % 3 != 0).then(|| b.u8());
    match b.below(5) {
        0 => L4Match::All,
        1 | 2 => {
            let (from, span) = (b.u16(), b.u16() % 2048);
            L4Match::Ports {
                protocol: if b.below(2) == 0 { 6 } else { 17 },
                from,
                to: from.saturating_add(span),
            }
        }
        3 => {
            let v6 = b.below(2) == 0;
            let icmp_type = optional(b);
            L4Match::Icmp {
                v6,
                icmp_type,
                code: icmp_type.and_then(|_| optional(b)),
            }
        }
        _ => L4Match::Protocol(b.u8()),
    }
}

fn peer(b: &mut Bytes, groups: u8) -> Peer {
    match b.below(8) {
        0..=4 => {
            let v6 = b.below(3) == 0;
            Peer::Cidr(cidr(b, v6))
        }
        5 => Peer::PrefixList("pl-0fuzz".into()),
        // One past the defined groups: a reference the state does not define.
        _ => Peer::Group(group_id(b.below(groups + 1))),
    }
}

/// A model decoded from `b`: groups with rules of every kind, members, a prefix
/// list, one to three pods in either mode, on a node with primary groups.
pub fn model(b: &mut Bytes) -> Model {
    let group_count = 1 + b.below(4);
    let mut groups = BTreeMap::new();
    for i in 0..group_count {
        let rules = |b: &mut Bytes| {
            (0..b.below(6))
                .map(|_| Rule {
                    l4: l4_match(b),
                    peer: peer(b, group_count),
                    description: None,
                })
                .collect::<Vec<_>>()
        };
        let (ingress, egress) = (rules(b), rules(b));
        let id = group_id(i);
        groups.insert(
            id.clone(),
            SecurityGroup {
                id,
                name: format!("group-{i}"),
                description: String::new(),
                tags: BTreeMap::new(),
                ingress,
                egress,
            },
        );
    }
    let members = (0..=group_count)
        .map(|i| {
            let cidrs = (0..b.below(3))
                .map(|_| {
                    let v6 = b.below(3) == 0;
                    Cidr::host(addr(b, v6))
                })
                .collect::<BTreeSet<_>>();
            (group_id(i), cidrs)
        })
        .collect();
    let prefix_list = (0..b.below(3))
        .map(|_| {
            let v6 = b.below(3) == 0;
            cidr(b, v6)
        })
        .collect();
    let pods: Vec<BranchPod> = (0..1 + b.below(3))
        .map(|i| BranchPod {
            namespace: "fuzz".into(),
            name: format!("pod-{i}"),
            uid: format!("uid-{i}"),
            vlan: 1 + u16::from(i),
            eni_id: format!("eni-{i:017x}"),
            mac: "0a:00:00:00:00:01".into(),
            ipv4: Some(Ipv4Addr::new(10, 0, 64, i)),
            ipv6: (b.below(2) == 0)
                .then(|| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x64, u16::from(i))),
            subnet_v4: Some("10.0.64.0/24".parse().expect("a CIDR")),
            subnet_v6: None,
            groups: (0..1 + b.below(3))
                .map(|_| group_id(b.below(group_count)))
                .collect(),
            mode: if b.below(2) == 0 {
                EnforcingMode::Strict
            } else {
                EnforcingMode::Standard
            },
            // Audit changes what passes, not what the compiled tables say.
            action: EnforcingAction::Enforce,
            facts: Default::default(),
        })
        .collect();
    let node_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 10));
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.insert(node_ip);
    Model {
        node: NodeConfig {
            name: "fuzz".into(),
            enforcing_mode: EnforcingMode::Strict,
            trunk_interface: "eth1".into(),
            primary_interface: "eth0".into(),
            primary_ips: vec![node_ip],
            primary_security_groups: vec![group_id(b.below(group_count))],
            vpc_cidrs: vec!["10.0.0.0/16".parse().expect("a CIDR")],
            external_snat: false,
            exclude_snat_cidrs: Vec::new(),
            snat_port_range: enforcer::model::DEFAULT_SNAT_PORT_RANGE,
            unknown_vlan: UnknownVlanAction::Drop,
            connection_tracking: ConntrackTimeouts::default(),
            instance_type: None,
            service_cidrs: Vec::new(),
            enforcing_action: EnforcingAction::Enforce,
            audit_namespaces: Vec::new(),
            tcp_early_demux_disabled: false,
            max_groups_per_pod: 16,
            max_rules_per_group: 60,
            max_flows_per_pod: enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
            max_fragments_per_pod: enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
        },
        groups,
        prefix_lists: BTreeMap::from([("pl-0fuzz".to_string(), prefix_list)]),
        members,
        pods,
        node_local,
        findings: Vec::new(),
        nlb_groups: BTreeSet::new(),
        cluster: Default::default(),
    }
}

/// The first packet of a flow of one of `model`'s pods, decoded from `b`.
pub fn query<'m>(b: &mut Bytes, model: &'m Model) -> (&'m BranchPod, Query) {
    let pod = &model.pods[usize::from(b.u8()) % model.pods.len()];
    let direction = if b.below(2) == 0 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let v6 = b.below(3) == 0;
    let peer = match b.below(8) {
        0 => "169.254.169.254".parse().expect("an address"),
        1 => "255.255.255.255".parse().expect("an address"),
        2 => "ff02::1:2".parse().expect("an address"),
        3 => "fe80::1".parse().expect("an address"),
        _ => addr(b, v6),
    };
    let protocol = match b.below(6) {
        0 | 1 => 6,
        2 => 17,
        3 => 1,
        4 => 58,
        _ => b.u8(),
    };
    let packet = L4Packet::new(protocol, b.u16(), b.u8(), b.u8());
    let query = Query {
        direction,
        peer,
        l4: L4Query::Packet(packet),
    };
    (pod, query)
}
