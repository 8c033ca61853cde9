//! Seeded generation of models and packets for the differential tests:
//! overlapping CIDRs of every length in both families, port ranges, ICMP,
//! other protocols, referenced groups and prefix lists, pods in both modes;
//! packets biased towards the addresses and ports the rules name.
//!
//! Frames ([`CaseGenerator::next`], shares of 100): replies to earlier flows
//! 16, ICMP errors quoting them 4, plain packets 40 (of which untagged 4%,
//! unknown VLAN 4%, ARP 2%, cut inside the headers 3%), IPv4 fragments 6 and
//! IPv6 fragments 6 (first, later out of order, overlapping, retransmitted
//! firsts, later ones whose first never came), IPv6 extension header chains 6
//! (hop-by-hop, routing, destination options, AH, fragment, in any order, 0 to
//! 6 headers: up to and past the parser's bound of 4), tag tricks 4 (stacked
//! tags, VLAN ID 0 alone or before a pod's or another VLAN, tags cut short),
//! frames of every kind cut at any byte 5, malformed IP fields 3 (IHL, version,
//! total length, IPv4 options whole or cut, TCP data offset), unknown VLANs 3,
//! (tag tricks include ethertypes other than IP and ARP on a pod's VLAN)
//! neighbour discovery 5 (hop limits, the pod's side own, link-local, groups,
//! unspecified, others), ARP 2 (whole, other address sizes, cut). The first
//! twelve frames of a generator take one kind each, so every kind occurs at
//! any packet count.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{
    BranchPod, Cidr, Direction, EnforcingAction, EnforcingMode, L4Match, Model, Peer, Rule,
    SecurityGroup,
};

use crate::frame::{self, ExtHeader, Ip, L4, Tag};

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
/// `model` with the ports of one rule changed (a rule drawn among all groups' rules; the
/// model as it is if it has none): the change an apply makes by switching port tables in
/// place (`compile::compile_with`).
pub fn change_ports(rng: &mut Rng, model: &Model) -> Model {
    let mut changed = model.clone();
    let rules: Vec<&mut Rule> = changed
        .groups
        .values_mut()
        .flat_map(|g| g.ingress.iter_mut().chain(g.egress.iter_mut()))
        .collect();
    if !rules.is_empty() {
        let i = rng.below(rules.len() as u64) as usize;
        let l4 = random_l4(rng);
        if let Some(rule) = rules.into_iter().nth(i) {
            rule.l4 = l4;
        }
    }
    changed
}

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
            // A pod without a group is how a quarantined pod is enforced
            // (docs/isolation.md): only what is never filtered passes.
            let count = if rng.chance(10) { 0 } else { 1 + rng.below(3) };
            let groups = (0..count)
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
        findings: Vec::new(),
        nlb_groups: Default::default(),
        cluster: Default::default(),
    }
}

/// What a generated frame is meant to exercise ([`CaseGenerator::next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Reply,
    IcmpError,
    Plain,
    Ipv4Fragment,
    Ipv6Fragment,
    ExtensionChain,
    TagTrick,
    Cut,
    BadIpFields,
    UnknownVlan,
    NeighbourDiscovery,
    Arp,
}

impl Kind {
    /// Every kind, each with its share of 100 frames.
    pub const SHARES: [(Kind, u64); 12] = [
        (Kind::Reply, 16),
        (Kind::IcmpError, 4),
        (Kind::Plain, 40),
        (Kind::Ipv4Fragment, 6),
        (Kind::Ipv6Fragment, 6),
        (Kind::ExtensionChain, 6),
        (Kind::TagTrick, 4),
        (Kind::Cut, 5),
        (Kind::BadIpFields, 3),
        (Kind::UnknownVlan, 3),
        (Kind::NeighbourDiscovery, 5),
        (Kind::Arp, 2),
    ];
}

/// One generated frame with what the test needs to predict its verdict.
#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    /// The outer tag is to reach the fast path in skb metadata, as the
    /// receive path puts it, rather than inline (`Kernel::run_tag_in_metadata`).
    pub metadata: bool,
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

/// A datagram whose fragments the generator sends.
#[derive(Clone, Debug)]
struct Datagram {
    base: Case,
    id: u16,
}

/// Generates cases for one model: fresh flows, replies to earlier ones, and
/// ICMP errors quoting earlier ones, fragments, header chains and malformed frames.
pub struct CaseGenerator {
    history: Vec<Case>,
    datagrams: Vec<Datagram>,
    next_id: u16,
    count: u64,
}

impl CaseGenerator {
    pub fn new() -> Self {
        Self {
            history: Vec::with_capacity(HISTORY),
            datagrams: Vec::new(),
            next_id: 1,
            count: 0,
        }
    }

    pub fn next(&mut self, rng: &mut Rng, model: &Model) -> Case {
        let kind = if (self.count as usize) < Kind::SHARES.len() {
            Kind::SHARES[self.count as usize].0
        } else {
            let mut roll = rng.below(100);
            Kind::SHARES
                .iter()
                .find(|(_, share)| {
                    let hit = roll < *share;
                    roll = roll.saturating_sub(*share);
                    hit
                })
                .expect("shares sum to 100")
                .0
        };
        self.count += 1;
        let mut case = match kind {
            Kind::Reply if !self.history.is_empty() => {
                let original = rng.pick(&self.history).clone();
                reply_to(rng, original)
            }
            Kind::IcmpError if !self.history.is_empty() => {
                let original = rng.pick(&self.history).clone();
                icmp_error_about(rng, &original)
            }
            Kind::Ipv4Fragment => self.fragment(rng, model, false),
            Kind::Ipv6Fragment => self.fragment(rng, model, true),
            Kind::ExtensionChain => extension_chain(rng, model),
            Kind::TagTrick => tag_trick(rng, model),
            Kind::Cut => {
                let mut case = match rng.below(4) {
                    0 => extension_chain(rng, model),
                    1 => {
                        let v6 = rng.chance(50);
                        self.fragment(rng, model, v6)
                    }
                    2 => tag_trick(rng, model),
                    _ => random_case(rng, model),
                };
                // Untagged IP frames cut inside the IP header are refused by
                // BPF_PROG_TEST_RUN (and passed unread by the fast path anyway).
                if case.tag != Tag::Untagged && case.frame.len() > 15 {
                    let at = 14 + rng.below(case.frame.len() as u64 - 14) as usize;
                    case.frame.truncate(at);
                    case.truncated = true;
                }
                case
            }
            Kind::BadIpFields => bad_ip_fields(rng, model),
            Kind::UnknownVlan => unknown_vlan(rng, model),
            Kind::NeighbourDiscovery => neighbour_discovery(rng, model),
            Kind::Arp => arp_case(rng, model),
            _ => random_case(rng, model),
        };
        case.kind = kind;
        // A third of the frames with a whole outer tag carry it in metadata.
        // (The helper that moves it also moves a second tag, so that one must
        // be whole too: the receive path itself leaves a cut inner tag alone.)
        let be16 = |at: usize| {
            case.frame
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        let is_tag = |t: Option<u16>| matches!(t, Some(0x8100 | 0x88a8));
        case.metadata = is_tag(be16(12))
            && case.frame.len() >= 18
            && (!is_tag(be16(16)) || case.frame.len() >= 22)
            && rng.chance(33);
        if case.ip.is_some() && !case.truncated && case.quoted.is_none() && kind == Kind::Plain {
            if self.history.len() == HISTORY {
                self.history.remove(0);
            }
            self.history.push(case.clone());
        }
        case
    }

    /// A fragment of a datagram of the family `v6`: a new datagram's first
    /// fragment, a later one of a datagram seen before (any offset, so out of
    /// order and overlapping), a first fragment again, or a later fragment
    /// whose first never came.
    fn fragment(&mut self, rng: &mut Rng, model: &Model, v6: bool) -> Case {
        let roll = rng.below(100);
        let datagram = match roll {
            0..=34 => None,
            35..=79 if !self.datagrams.is_empty() => Some(rng.pick(&self.datagrams).clone()),
            _ => None,
        };
        let datagram = match datagram {
            Some(datagram) => datagram,
            None => {
                let base = ip_case(rng, model, v6);
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1).max(1);
                let datagram = Datagram { base, id };
                if !(35..90).contains(&roll) {
                    if self.datagrams.len() == HISTORY {
                        self.datagrams.remove(0);
                    }
                    self.datagrams.push(datagram.clone());
                }
                datagram
            }
        };
        let ip = datagram.base.ip.expect("an IP case");
        let first = roll < 35 || (roll >= 90 && rng.chance(50));
        let (fragment, payload) = if first {
            let mut payload = ip.transport_bytes();
            payload.resize(payload.len().div_ceil(8) * 8 + 8, 0xab);
            let fragment = frame::Fragment {
                id: datagram.id,
                offset: 0,
                more: true,
            };
            (fragment, payload)
        } else {
            let fragment = frame::Fragment {
                id: datagram.id,
                offset: rng.u16_in(1, 8),
                more: rng.chance(50),
            };
            (fragment, vec![0xcd; 8 * (1 + rng.below(3) as usize)])
        };
        let tag = datagram.base.tag;
        Case {
            frame: frame::fragment_frame(tag, &ip, fragment, &payload),
            ip: Some(ip),
            ..datagram.base
        }
    }
}

/// A plain case of the family `v6` carrying IP (the pod's family if it lacks `v6`).
fn ip_case(rng: &mut Rng, model: &Model, v6: bool) -> Case {
    for _ in 0..32 {
        let case = random_case(rng, model);
        if case.truncated || case.tag == Tag::Untagged {
            continue;
        }
        if let Some(ip) = case.ip
            && ip.src.is_ipv6() == v6
        {
            return case;
        }
    }
    let mut case = random_case(rng, model);
    while case.ip.is_none() || case.truncated {
        case = random_case(rng, model);
    }
    case
}

/// An IPv6 packet behind a chain of 0 to 6 extension headers in any order.
fn extension_chain(rng: &mut Rng, model: &Model) -> Case {
    let base = ip_case(rng, model, true);
    let ip = base.ip.expect("an IP case");
    if ip.src.is_ipv4() {
        return base;
    }
    let mut chain = Vec::new();
    if rng.chance(50) {
        chain.push(ExtHeader::HopByHop {
            units: rng.below(3) as u8,
        });
    }
    for _ in 0..rng.below(6) {
        let units = rng.below(3) as u8;
        chain.push(match rng.below(9) {
            0 => ExtHeader::HopByHop { units },
            1 | 2 => ExtHeader::Routing { units },
            3 | 4 => ExtHeader::DestOptions { units },
            5 | 6 => ExtHeader::Auth {
                words: 1 + rng.below(4) as u8,
            },
            _ => ExtHeader::Fragment {
                id: rng.below(4) as u32,
                offset: if rng.chance(70) { 0 } else { rng.u16_in(1, 4) },
                more: rng.chance(50),
            },
        });
    }
    let mut payload = ip.transport_bytes();
    payload.extend_from_slice(&[0x11; 8]);
    Case {
        frame: frame::ipv6_chain_frame(base.tag, &ip, &chain, &payload),
        ..base
    }
}

/// Stacked tags, priority tags (VLAN ID 0) alone or before a pod's or another
/// VLAN, and tags cut short.
fn tag_trick(rng: &mut Rng, model: &Model) -> Case {
    let base = {
        let v6 = rng.chance(30);
        ip_case(rng, model, v6)
    };
    let ip = base.ip.expect("an IP case");
    let pod_vlan = rng.pick(&model.pods).vlan;
    let other = |rng: &mut Rng| rng.u16_in(1, 4094);
    let tag = match rng.below(7) {
        6 => {
            // Neither IP nor ARP on a pod's VLAN: MPLS, LLDP, PPPoE.
            let tag = Tag::Vlan(pod_vlan);
            let ethertype = *rng.pick(&[0x8847, 0x88cc, 0x8864]);
            return Case {
                tag,
                frame: frame::ethernet(tag, ethertype, &ip.to_bytes()),
                ..base
            };
        }
        0 => Tag::Stacked(pod_vlan, other(rng)),
        1 => Tag::Stacked(other(rng), pod_vlan),
        2 => Tag::Priority(None),
        3 => Tag::Priority(Some(pod_vlan)),
        4 => Tag::Priority(Some(other(rng))),
        _ => {
            // A tag, or a priority tag's inner tag, announced but cut short.
            let outer = if rng.chance(50) {
                Tag::Priority(None)
            } else {
                Tag::Untagged
            };
            let len = 1 + rng.below(3) as usize;
            return Case {
                tag: outer,
                frame: frame::ethernet(outer, frame::ETH_P_8021Q, &[0; 3][..len]),
                truncated: true,
                ..base
            };
        }
    };
    Case {
        tag,
        frame: frame::ip_frame(tag, &ip),
        ..base
    }
}

/// A pod's packet with a header field out of the standards' bounds, or with IPv4 options.
fn bad_ip_fields(rng: &mut Rng, model: &Model) -> Case {
    let mut case = {
        let v6 = rng.chance(30);
        ip_case(rng, model, v6)
    };
    let ip = case.ip.expect("an IP case");
    let l3 = frame::l2_len(case.tag);
    let f = &mut case.frame;
    let v4 = ip.src.is_ipv4();
    match (rng.below(6), v4) {
        (0, true) => f[l3] = 0x40 | rng.below(5) as u8,
        (1, _) => f[l3] = (f[l3] & 0x0f) | if v4 { 0x60 } else { 0x40 },
        (2, true) => f[l3 + 2..l3 + 4].copy_from_slice(&(rng.below(20) as u16).to_be_bytes()),
        (3, true) => {
            // Valid options (four no-ops), or an IHL whose options are not all there.
            let words = if rng.chance(50) { 1 } else { 10 };
            f[l3] = 0x45 + words;
            let total = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) + 4;
            f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            f.splice(l3 + 20..l3 + 20, [1, 1, 1, 1]);
        }
        _ if matches!(ip.l4, L4::Tcp { .. }) => {
            let tcp = l3 + if v4 { 20 } else { 40 };
            f[tcp + 12] = (rng.below(5) as u8) << 4;
        }
        _ => f[l3] = (f[l3] & 0x0f) | 0x50,
    }
    case
}

/// A frame tagged with a VLAN no pod has.
fn unknown_vlan(rng: &mut Rng, model: &Model) -> Case {
    let mut case = {
        let v6 = rng.chance(30);
        ip_case(rng, model, v6)
    };
    let mut vlan = rng.u16_in(1, 4094);
    while model.pods.iter().any(|p| p.vlan == vlan) {
        vlan = rng.u16_in(1, 4094);
    }
    case.tag = Tag::Vlan(vlan);
    case.frame = frame::ip_frame(case.tag, &case.ip.expect("an IP case"));
    case
}

/// Router and neighbour discovery (and the types around it) with every kind
/// of pod side and hop limit.
fn neighbour_discovery(rng: &mut Rng, model: &Model) -> Case {
    let Some(pod) = model.pods.iter().find(|p| p.ipv6.is_some()).cloned() else {
        return random_case(rng, model);
    };
    let own = pod.ipv6.expect("checked");
    let low = own.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(low[13]),
        u16::from_be_bytes([low[14], low[15]]),
    );
    let candidates = [
        own,
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, rng.below(9) as u16 + 1),
        solicited,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff12, 0x3456),
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::UNSPECIFIED,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb),
        Ipv6Addr::new(0xff05, 0, 0, 0, 0, 1, 0xff00, 5),
        random_v6(rng),
    ];
    let pod_side = IpAddr::V6(*rng.pick(&candidates));
    let peer = IpAddr::V6(*rng.pick(&candidates));
    let direction = if rng.chance(50) {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let (src, dst) = match direction {
        Direction::Ingress => (peer, pod_side),
        Direction::Egress => (pod_side, peer),
    };
    let icmp_type = *rng.pick(&[132u8, 133, 134, 135, 136, 137, 137, 138]);
    let ip = Ip {
        src,
        dst,
        l4: L4::Icmp {
            icmp_type,
            code: 0,
            id: 0,
        },
    };
    let tag = Tag::Vlan(pod.vlan);
    let mut frame = frame::ip_frame(tag, &ip);
    let hop_limit = *rng.pick(&[255u8, 255, 255, 254, 64, 1]);
    frame::set_hop_limit(&mut frame, tag, hop_limit);
    Case {
        kind: Kind::NeighbourDiscovery,
        metadata: false,
        direction,
        tag,
        ip: Some(ip),
        quoted: None,
        frame,
        truncated: false,
    }
}

/// ARP of a pod's VLAN: the pod's or another sender, other address sizes, cut short.
fn arp_case(rng: &mut Rng, model: &Model) -> Case {
    let pod = rng.pick(&model.pods).clone();
    let tag = Tag::Vlan(pod.vlan);
    let sender = if rng.chance(60) {
        pod.ipv4.expect("pods have IPv4").octets()
    } else {
        random_v4(rng).octets()
    };
    let mut frame = frame::arp_frame(tag, sender, [10, 0, 1, 1]);
    match rng.below(4) {
        0 => frame[18 + 5] = 16,
        1 => frame.truncate(18 + 6 + rng.below(12) as usize),
        _ => {}
    }
    Case {
        kind: Kind::Arp,
        metadata: false,
        direction: if rng.chance(50) {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        tag,
        ip: None,
        quoted: None,
        frame,
        truncated: false,
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
        kind: Kind::Reply,
        metadata: false,
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
        kind: Kind::IcmpError,
        metadata: false,
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
            kind: Kind::Plain,
            metadata: false,
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
        kind: Kind::Plain,
        metadata: false,
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
        findings: Vec::new(),
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
