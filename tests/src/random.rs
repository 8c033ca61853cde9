//! Seeded generation of models and packets for the differential tests:
//! overlapping CIDRs of every length in both families, port ranges, ICMP,
//! other protocols, referenced groups and prefix lists, pods in both modes;
//! packets biased towards the addresses and ports the rules name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{
    BranchPod, Cidr, Direction, EnforcingAction, EnforcingMode, L4Match, Model, Peer, Rule,
    SecurityGroup,
};

use crate::frame::{self, Ip, L4, Tag};

/// SplitMix64: small, seedable, good enough to spread test cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn u16_in(&mut self, from: u16, to: u16) -> u16 {
        from + self.below(u64::from(to - from) + 1) as u16
    }
}

/// The address neighbourhoods rules and packets draw from, so they meet often.
const V4_BASES: [[u8; 4]; 4] = [[10, 0, 1, 0], [10, 0, 2, 0], [10, 1, 0, 0], [54, 230, 7, 0]];
const V6_BASES: [[u16; 4]; 3] = [
    [0x2600, 0x1f18, 0x4a3, 0x6901],
    [0x2600, 0x1f18, 0x4a3, 0x6902],
    [0x2a05, 0xd014, 0, 0],
];

const POD_SUBNET_V4: &str = "10.0.1.0/24";
const POD_SUBNET_V6: &str = "2600:1f18:4a3:6901::/64";

fn random_v4(rng: &mut Rng) -> Ipv4Addr {
    let base = rng.pick(&V4_BASES);
    Ipv4Addr::new(
        base[0],
        base[1],
        base[2].wrapping_add(rng.below(2) as u8),
        rng.below(256) as u8,
    )
}

fn random_v6(rng: &mut Rng) -> Ipv6Addr {
    let b = rng.pick(&V6_BASES);
    Ipv6Addr::new(b[0], b[1], b[2], b[3], 0, 0, 0, rng.below(64) as u16)
}

pub fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(random_v6(rng))
    } else {
        IpAddr::V4(random_v4(rng))
    }
}

fn random_cidr(rng: &mut Rng, v6: bool) -> Cidr {
    let addr = random_addr(rng, v6);
    let len = if rng.chance(5) {
        0
    } else if v6 {
        *rng.pick(&[32, 48, 56, 64, 96, 120, 124, 127, 128])
    } else {
        rng.u16_in(8, 32) as u8
    };
    Cidr::new(addr, len).expect("valid prefix length")
}

/// A member of a referenced group as ENI data gives it: an address, or a
/// delegated prefix (prefix mode, IPv6 clusters).
fn random_member(rng: &mut Rng) -> Cidr {
    let v6 = rng.chance(30);
    let addr = random_addr(rng, v6);
    let len = match (rng.chance(30), v6) {
        (false, false) => 32,
        (false, true) => 128,
        (true, false) => 28,
        (true, true) => 80,
    };
    Cidr::new(addr, len).expect("valid prefix length")
}

/// An address inside a member: the address itself, or one in the prefix.
fn inside(member: &Cidr) -> IpAddr {
    match member.prefix_len() {
        32 | 128 => member.addr(),
        _ => member.nth(3),
    }
}

fn random_l4(rng: &mut Rng) -> L4Match {
    match rng.below(10) {
        0 => L4Match::All,
        1..=4 => {
            let protocol = *rng.pick(&[6u8, 17]);
            let (from, to) = match rng.below(4) {
                0 => (0, u16::MAX),
                1 => {
                    let p = *rng.pick(&[22u16, 53, 80, 443, 5432, 8080]);
                    (p, p)
                }
                _ => {
                    let a = rng.next_u64() as u16;
                    let b = rng.next_u64() as u16;
                    (a.min(b), a.max(b))
                }
            };
            L4Match::Ports { protocol, from, to }
        }
        5..=7 => {
            let v6 = rng.chance(50);
            let icmp_type = match rng.below(3) {
                0 => None,
                _ => Some(*rng.pick(&[0u8, 3, 8, 11, 128, 129, 1, 2])),
            };
            let code = match icmp_type {
                Some(_) if rng.chance(50) => Some(rng.below(5) as u8),
                _ => None,
            };
            L4Match::Icmp {
                v6,
                icmp_type,
                code,
            }
        }
        _ => L4Match::Protocol(*rng.pick(&[50u8, 47, 132, 4])),
    }
}

const GROUPS: usize = 7;
const PREFIX_LISTS: [&str; 2] = ["pl-0aaaa", "pl-0bbbb"];

fn group_id(i: usize) -> String {
    format!("sg-{i:017x}")
}

/// A node's worth of random state: groups, members, prefix lists and pods.
pub fn random_model(rng: &mut Rng) -> Model {
    let mut groups = BTreeMap::new();
    for i in 0..GROUPS {
        let rules = |rng: &mut Rng| {
            (0..rng.below(9))
                .map(|_| {
                    let v6 = rng.chance(35);
                    let peer = match rng.below(10) {
                        0..=5 => Peer::Cidr(random_cidr(rng, v6)),
                        6 => Peer::PrefixList(rng.pick(&PREFIX_LISTS).to_string()),
                        // Two IDs past the defined groups: references the state does not
                        // define (another account, a deleted group), one with members.
                        _ => Peer::Group(group_id(rng.below(GROUPS as u64 + 2) as usize)),
                    };
                    Rule {
                        l4: random_l4(rng),
                        peer,
                        description: None,
                    }
                })
                .collect::<Vec<_>>()
        };
        let id = group_id(i);
        let ingress = rules(rng);
        let egress = rules(rng);
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
    let prefix_lists = PREFIX_LISTS
        .iter()
        .map(|id| {
            let cidrs = (0..1 + rng.below(3))
                .map(|_| {
                    let v6 = rng.chance(30);
                    random_cidr(rng, v6)
                })
                .collect();
            (id.to_string(), cidrs)
        })
        .collect();
    let members = (0..=GROUPS)
        .map(|i| {
            let cidrs = (0..rng.below(5))
                .map(|_| random_member(rng))
                .collect::<BTreeSet<_>>();
            (group_id(i), cidrs)
        })
        .collect();
    let primary_security_groups = vec![group_id(rng.below(GROUPS as u64) as usize)];
    let mut vlans = BTreeSet::new();
    while vlans.len() < 4 {
        vlans.insert(rng.u16_in(1, 4094));
    }
    let pods: Vec<BranchPod> = vlans
        .into_iter()
        .enumerate()
        .map(|(i, vlan)| {
            let has_v6 = rng.chance(60);
            let groups = (0..1 + rng.below(3))
                .map(|_| group_id(rng.below(GROUPS as u64) as usize))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            BranchPod {
                namespace: "random".into(),
                name: format!("pod-{i}"),
                uid: format!("uid-{i}"),
                vlan,
                eni_id: format!("eni-{i:017x}"),
                mac: format!("0a:00:00:00:00:{i:02x}"),
                ipv4: Some(Ipv4Addr::new(10, 0, 1, 100 + i as u8)),
                ipv6: has_v6.then(|| {
                    Ipv6Addr::new(0x2600, 0x1f18, 0x4a3, 0x6901, 0, 0, 0, 0x100 + i as u16)
                }),
                subnet_v4: Some(POD_SUBNET_V4.parse().expect("subnet")),
                subnet_v6: has_v6.then(|| POD_SUBNET_V6.parse().expect("subnet")),
                groups,
                mode: if rng.chance(50) {
                    EnforcingMode::Strict
                } else {
                    EnforcingMode::Standard
                },
                // Audited pods pass what their groups refuse: the kernel must still
                // say why, frame by frame, and track nothing for it.
                action: if rng.chance(30) {
                    EnforcingAction::Audit
                } else {
                    EnforcingAction::Enforce
                },
                facts: Default::default(),
            }
        })
        .collect();
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.insert(IpAddr::V4(crate::models::NODE_IP));
    node_local.insert(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 200)));
    Model {
        node: crate::models::node_config(primary_security_groups),
        groups,
        prefix_lists,
        members,
        pods,
        node_local,
        warnings: Vec::new(),
        nlb_groups: Default::default(),
        cluster: Default::default(),
    }
}

/// One generated frame with what the test needs to predict its verdict.
#[derive(Clone, Debug)]
pub struct Case {
    pub direction: Direction,
    pub tag: Tag,
    /// The IP packet inside (absent for ARP).
    pub ip: Option<Ip>,
    /// For an ICMP error, the packet it quotes.
    pub quoted: Option<Ip>,
    pub frame: Vec<u8>,
    /// Set when the frame was cut inside its headers.
    pub truncated: bool,
}

/// Recent IP cases, so that replies and ICMP errors of earlier flows come up.
const HISTORY: usize = 64;

/// Generates cases for one model: fresh flows, replies to earlier ones, and
/// ICMP errors quoting earlier ones.
pub struct CaseGenerator {
    history: Vec<Case>,
}

impl CaseGenerator {
    pub fn new() -> Self {
        Self {
            history: Vec::with_capacity(HISTORY),
        }
    }

    pub fn next(&mut self, rng: &mut Rng, model: &Model) -> Case {
        let case = match rng.below(100) {
            0..=19 if !self.history.is_empty() => {
                let original = rng.pick(&self.history).clone();
                reply_to(rng, original)
            }
            20..=23 if !self.history.is_empty() => {
                let original = rng.pick(&self.history).clone();
                icmp_error_about(rng, &original)
            }
            _ => random_case(rng, model),
        };
        if case.ip.is_some() && !case.truncated && case.quoted.is_none() {
            if self.history.len() == HISTORY {
                self.history.remove(0);
            }
            self.history.push(case.clone());
        }
        case
    }
}

impl Default for CaseGenerator {
    fn default() -> Self {
        Self::new()
    }
}

/// The other side's answer to `case`.
fn reply_to(rng: &mut Rng, case: Case) -> Case {
    let flags = *rng.pick(&[
        frame::TCP_SYN | frame::TCP_ACK,
        frame::TCP_ACK,
        frame::TCP_FIN | frame::TCP_ACK,
        frame::TCP_RST,
    ]);
    let reply = case.ip.expect("history holds IP cases").reply(flags);
    Case {
        direction: case.direction.opposite(),
        tag: case.tag,
        frame: frame::ip_frame(case.tag, &reply),
        ip: Some(reply),
        quoted: None,
        truncated: false,
    }
}

/// An ICMP error travelling back towards the sender of `original`.
fn icmp_error_about(rng: &mut Rng, original: &Case) -> Case {
    let quoted = original.ip.expect("history holds IP cases");
    let v6 = quoted.src.is_ipv6();
    let (icmp_type, code) = if v6 {
        *rng.pick(&[(1u8, 4u8), (2, 0), (3, 0)])
    } else {
        *rng.pick(&[(3u8, 3u8), (3, 4), (11, 0)])
    };
    let error = Ip {
        src: quoted.dst,
        dst: quoted.src,
        l4: L4::Icmp {
            icmp_type,
            code,
            id: 0,
        },
    };
    Case {
        direction: original.direction.opposite(),
        tag: original.tag,
        frame: frame::icmp_error_frame(
            original.tag,
            error.src,
            error.dst,
            icmp_type,
            code,
            &quoted,
        ),
        ip: Some(error),
        quoted: Some(quoted),
        truncated: false,
    }
}

/// Addresses a packet's peer is drawn from, to hit rules, members and specials.
fn peer_candidates(model: &Model, v6: bool) -> Vec<IpAddr> {
    let family = |ip: &IpAddr| ip.is_ipv6() == v6;
    let mut out: Vec<IpAddr> = model
        .members
        .values()
        .flatten()
        .flat_map(|c| [inside(c), c.nth(1)])
        .filter(family)
        .collect();
    out.extend(model.node_local.iter().copied().filter(family));
    for group in model.groups.values() {
        for rule in group.ingress.iter().chain(&group.egress) {
            if let Peer::Cidr(cidr) = &rule.peer
                && cidr.is_ipv4() != v6
            {
                out.push(cidr.addr());
                out.push(cidr.nth(1));
            }
        }
    }
    for cidrs in model.prefix_lists.values() {
        out.extend(cidrs.iter().filter(|c| c.is_ipv4() != v6).map(|c| c.nth(3)));
    }
    let specials: &[&str] = if v6 {
        &["fd00:ec2::253", "fd00:ec2::254", "2600:1f18:4a3:6901::1"]
    } else {
        &[
            "10.0.0.2",
            "169.254.169.254",
            "169.254.169.123",
            "169.254.169.250",
            "169.254.170.2",
            "169.254.169.249",
            "10.0.1.1",
        ]
    };
    out.extend(
        specials
            .iter()
            .map(|s| s.parse::<IpAddr>().expect("address")),
    );
    out
}

fn random_l4_packet(rng: &mut Rng, v6: bool) -> L4 {
    let port = |rng: &mut Rng| {
        if rng.chance(50) {
            *rng.pick(&[22u16, 53, 67, 68, 80, 443, 546, 547, 5432, 8080, 0, 65535])
        } else {
            rng.next_u64() as u16
        }
    };
    match rng.below(10) {
        0..=3 => L4::Tcp {
            src: port(rng),
            dst: port(rng),
            flags: *rng.pick(&[
                frame::TCP_SYN,
                frame::TCP_SYN | frame::TCP_ACK,
                frame::TCP_ACK,
                frame::TCP_FIN | frame::TCP_ACK,
                frame::TCP_RST,
            ]),
        },
        4..=6 => L4::Udp {
            src: port(rng),
            dst: port(rng),
        },
        7 | 8 => L4::Icmp {
            icmp_type: if v6 {
                *rng.pick(&[128u8, 129, 1, 2, 3, 4, 135, 136, 0])
            } else {
                *rng.pick(&[8u8, 0, 3, 11, 5, 13])
            },
            code: rng.below(4) as u8,
            id: rng.below(4) as u16,
        },
        _ => L4::Other {
            protocol: *rng.pick(&[50u8, 47, 132, 4, 1, 58]),
        },
    }
}

/// A peer and L4 header that one of the pod's rules in `direction` allows
/// (so that allowed flows are common), if it has a rule of that family.
fn aim_at_a_rule(
    rng: &mut Rng,
    model: &Model,
    pod: &BranchPod,
    direction: Direction,
    v6: bool,
) -> Option<(IpAddr, L4)> {
    let mut groups: Vec<&str> = pod.groups.iter().map(String::as_str).collect();
    if pod.mode == EnforcingMode::Standard && rng.chance(50) {
        groups.extend(
            model
                .node
                .primary_security_groups
                .iter()
                .map(String::as_str),
        );
    }
    let rules: Vec<&Rule> = groups
        .iter()
        .filter_map(|id| model.groups.get(*id))
        .flat_map(|g| g.rules(direction))
        .collect();
    if rules.is_empty() {
        return None;
    }
    let rule = *rng.pick(&rules);
    let peers: Vec<IpAddr> = match &rule.peer {
        Peer::Cidr(cidr) => vec![cidr.addr(), cidr.nth(1), cidr.nth(5)],
        Peer::PrefixList(id) => model.prefix_lists[id].iter().map(|c| c.nth(2)).collect(),
        Peer::Group(id) => model
            .members
            .get(id)
            .into_iter()
            .flatten()
            .map(inside)
            .collect(),
    };
    let peers: Vec<IpAddr> = peers.into_iter().filter(|p| p.is_ipv6() == v6).collect();
    if peers.is_empty() {
        return None;
    }
    let peer = *rng.pick(&peers);
    Some((peer, l4_for_rule(rng, rule, v6)?))
}

/// A random frame for one of `model`'s pods, an unknown VLAN, or untagged.
fn random_case(rng: &mut Rng, model: &Model) -> Case {
    let direction = if rng.chance(50) {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let pod = rng.pick(&model.pods).clone();
    let tag = match rng.below(100) {
        0..=3 => Tag::Untagged,
        4..=7 => Tag::Vlan(if pod.vlan == 4094 { 1 } else { pod.vlan + 1 }),
        _ => Tag::Vlan(pod.vlan),
    };
    if rng.chance(2) {
        let sender = match (direction, rng.chance(80)) {
            (Direction::Egress, true) => pod.ipv4.expect("pods have IPv4").octets(),
            _ => random_v4(rng).octets(),
        };
        let frame = frame::arp_frame(tag, sender, [10, 0, 1, 1]);
        return Case {
            direction,
            tag,
            ip: None,
            quoted: None,
            frame,
            truncated: false,
        };
    }
    let v6 = pod.ipv6.is_some() && rng.chance(40);
    let pod_addr = if rng.chance(96) {
        if v6 {
            IpAddr::V6(pod.ipv6.expect("checked"))
        } else {
            IpAddr::V4(pod.ipv4.expect("pods have IPv4"))
        }
    } else {
        random_addr(rng, v6)
    };
    let aimed = rng
        .chance(35)
        .then(|| aim_at_a_rule(rng, model, &pod, direction, v6))
        .flatten();
    let (peer, l4) = match aimed {
        Some(aimed) => aimed,
        None => {
            let peer = if rng.chance(85) {
                *rng.pick(&peer_candidates(model, v6))
            } else {
                random_addr(rng, v6)
            };
            (peer, random_l4_packet(rng, v6))
        }
    };
    let (src, dst) = match direction {
        Direction::Egress => (pod_addr, peer),
        Direction::Ingress => (peer, pod_addr),
    };
    let ip = Ip { src, dst, l4 };
    let mut frame = frame::ip_frame(tag, &ip);
    // BPF_PROG_TEST_RUN refuses untagged IP frames cut inside the IP header,
    // and the fast path passes untagged frames unread anyway.
    let truncated = tag != Tag::Untagged && rng.chance(3);
    if truncated {
        let headers = frame.len() - ip.payload_len();
        frame.truncate(14 + rng.below((headers - 14) as u64) as usize);
    }
    Case {
        direction,
        tag,
        ip: Some(ip),
        quoted: None,
        frame,
        truncated,
    }
}

/// The benchmarks' node: `pods` branch pods in strict mode, each with
/// `groups_per_pod` groups of `rules_per_group` rules in each direction (a
/// mix of CIDR sizes, referenced groups, port ranges, ICMP, IPv4 and IPv6).
/// Group 0 is on every pod, so changing it touches every pod's policy.
pub fn scale_model(
    rng: &mut Rng,
    pods: usize,
    groups_per_pod: usize,
    rules_per_group: usize,
) -> Model {
    let group_count = (groups_per_pod * 4).max(1);
    let rules = |rng: &mut Rng| -> Vec<Rule> {
        (0..rules_per_group)
            .map(|_| {
                let v6 = rng.chance(30);
                // No 0.0.0.0/0 peers: the deny probe must find no rule.
                let peer = if rng.chance(15) {
                    Peer::Group(group_id(rng.below(group_count as u64) as usize))
                } else {
                    let mut cidr = random_cidr(rng, v6);
                    while cidr.is_everything() {
                        cidr = random_cidr(rng, v6);
                    }
                    Peer::Cidr(cidr)
                };
                Rule {
                    l4: random_l4(rng),
                    peer,
                    description: None,
                }
            })
            .collect()
    };
    let groups: BTreeMap<String, SecurityGroup> = (0..group_count)
        .map(|i| {
            let id = group_id(i);
            let group = SecurityGroup {
                id: id.clone(),
                name: format!("group-{i}"),
                description: String::new(),
                tags: BTreeMap::new(),
                ingress: rules(rng),
                egress: rules(rng),
            };
            (id, group)
        })
        .collect();
    let members = (0..group_count)
        .map(|i| {
            let ips = (0..4)
                .map(|_| {
                    let v6 = rng.chance(30);
                    Cidr::host(random_addr(rng, v6))
                })
                .collect::<BTreeSet<_>>();
            (group_id(i), ips)
        })
        .collect();
    let pods: Vec<BranchPod> = (0..pods)
        .map(|i| {
            let mut groups = vec![group_id(0)];
            while groups.len() < groups_per_pod {
                let id = group_id(rng.below(group_count as u64) as usize);
                if !groups.contains(&id) {
                    groups.push(id);
                }
            }
            BranchPod {
                namespace: "bench".into(),
                name: format!("pod-{i}"),
                uid: format!("uid-{i}"),
                vlan: 1 + i as u16,
                eni_id: format!("eni-{i:017x}"),
                mac: "0a:00:00:00:00:01".into(),
                ipv4: Some(Ipv4Addr::new(
                    10,
                    0,
                    100 + (i / 250) as u8,
                    1 + (i % 250) as u8,
                )),
                ipv6: Some(Ipv6Addr::new(
                    0x2600, 0x1f18, 0x4a3, 0x6901, 0, 0, 1, i as u16,
                )),
                subnet_v4: None,
                subnet_v6: None,
                groups,
                mode: EnforcingMode::Strict,
                action: EnforcingAction::Enforce,
                facts: Default::default(),
            }
        })
        .collect();
    let node_local = pods.iter().flat_map(|p| p.addresses()).collect();
    Model {
        node: crate::models::node_config(vec![group_id(0)]),
        groups,
        prefix_lists: BTreeMap::new(),
        members,
        pods,
        node_local,
        warnings: Vec::new(),
        nlb_groups: Default::default(),
        cluster: Default::default(),
    }
}

/// A peer and L4 header that `rule` allows, if its peer has an address of
/// the rule's family (ICMP rules answer with an echo or their type).
pub fn packet_for_rule(rng: &mut Rng, model: &Model, rule: &Rule) -> Option<(IpAddr, L4)> {
    let peer = match &rule.peer {
        Peer::Cidr(cidr) => cidr.nth(1),
        Peer::PrefixList(id) => model.prefix_lists[id].first()?.nth(1),
        Peer::Group(id) => inside(model.members.get(id)?.iter().next()?),
    };
    Some((peer, l4_for_rule(rng, rule, peer.is_ipv6())?))
}

/// An L4 header `rule` allows in a packet of the family `v6`, if any.
fn l4_for_rule(rng: &mut Rng, rule: &Rule, v6: bool) -> Option<L4> {
    let l4 = match rule.l4 {
        L4Match::All => L4::Tcp {
            src: 40000,
            dst: 443,
            flags: frame::TCP_SYN,
        },
        L4Match::Ports {
            protocol: 6,
            from,
            to,
        } => L4::Tcp {
            src: rng.next_u64() as u16,
            dst: rng.u16_in(from, to),
            flags: frame::TCP_SYN,
        },
        L4Match::Ports { from, to, .. } => L4::Udp {
            src: rng.next_u64() as u16,
            dst: rng.u16_in(from, to),
        },
        L4Match::Icmp {
            v6: rule_v6,
            icmp_type,
            code,
        } if rule_v6 == v6 => L4::Icmp {
            icmp_type: icmp_type.unwrap_or(if v6 { 128 } else { 8 }),
            code: code.unwrap_or(0),
            id: rng.below(4) as u16,
        },
        L4Match::Icmp { .. } => return None,
        L4Match::Protocol(protocol) => L4::Other { protocol },
    };
    Some(l4)
}
