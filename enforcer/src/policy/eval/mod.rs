//! The reference evaluator: whether a pod's security groups allow a new flow, which rules allow
//! it and why not. It is the oracle the compiled maps, the kernel and `enforcer explain` agree with.

use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    BranchPod, Direction, EnforcingAction, EnforcingMode, GroupId, L4Match, Model, Peer,
};

mod query;
mod unfiltered;

pub use query::{L4Packet, L4Query, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Query};
pub use unfiltered::{
    NEIGHBOUR_DISCOVERY_TYPES, Unfiltered, neighbour_discovery, node_unfiltered, pod_unfiltered,
    unfiltered, unfiltered_l4,
};

/// One rule of one group, as EC2 lists it. The derived order (group, direction, index) is
/// the order of the compiler's rule IDs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub group_id: GroupId,
    pub direction: Direction,
    pub index: usize,
}

/// The two sets of groups a pod's traffic may be checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The branch ENI's groups (the pod's).
    Branch,
    /// The node's primary ENI groups (standard mode only).
    Primary,
}

/// Which set refused a denied flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    Branch,
    Primary,
    Both,
}

/// Why the verdict is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Never filtered (§5); no rule was consulted.
    Unfiltered(Unfiltered),
    /// Standard mode and the peer is on this node: not checked (§6).
    SameNode,
    /// Every checked set has a rule allowing it.
    Allowed,
    /// No rule of the refusing set(s) allows it.
    NoRule { refused: Refused },
}

/// The verdict on a new flow and everything that led to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// The groups' verdict; what happens to the packet is [`Evaluation::passes`].
    pub allowed: bool,
    pub mode: EnforcingMode,
    /// The pod's action: audited, a flow the groups refuse passes all the same.
    pub action: EnforcingAction,
    pub reason: Reason,
    /// Rules of the branch groups allowing the flow, in rule-ID order (also on deny,
    /// when only the primary set refused). Empty when no rule was consulted.
    pub branch: Vec<RuleRef>,
    /// Same for the primary groups; always empty in strict mode.
    pub primary: Vec<RuleRef>,
    /// The flow takes no conntrack entry: untracked (§4), unfiltered, or same-node.
    pub untracked: bool,
    /// Standard mode's source NAT of an allowed flow leaving the VPC (§6): the
    /// address it leaves from. A translated flow is tracked whatever its rules
    /// (`untracked` says what the rules alone make it).
    pub nat: Option<SourceNat>,
}

/// Where a translated flow leaves the node: from `address` (`primaryIPs[0]`,
/// at a port of `snatPortRange`) out of `interface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceNat {
    pub address: Ipv4Addr,
    pub interface: String,
}

/// The address standard mode translates a pod's IPv4 flows to `peer` to: the
/// node's first IPv4 primary address, unless external SNAT is on (sg-semantics.md
/// §6), `peer` is IPv6 (EC2 translates no IPv6), or it is inside the VPC or an
/// `excludeSnatCidrs` entry.
pub fn snat_address(node: &crate::model::NodeConfig, peer: IpAddr) -> Option<Ipv4Addr> {
    let exempt = node
        .vpc_cidrs
        .iter()
        .chain(&node.exclude_snat_cidrs)
        .any(|cidr| cidr.contains(peer));
    if node.external_snat || !peer.is_ipv4() || exempt {
        return None;
    }
    node.primary_ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

/// The source NAT of a new flow the groups allowed: a standard-mode pod's TCP,
/// UDP or ICMP echo request to an address [`snat_address`] translates.
fn source_nat(model: &Model, pod: &BranchPod, query: &Query) -> Option<SourceNat> {
    let L4Query::Packet(packet) = query.l4 else {
        return None;
    };
    let translatable = match packet.protocol {
        PROTO_TCP | PROTO_UDP => true,
        PROTO_ICMP => packet.selector >> 8 == 8,
        _ => false,
    };
    if pod.mode != EnforcingMode::Standard || query.direction != Direction::Egress || !translatable
    {
        return None;
    }
    Some(SourceNat {
        address: snat_address(&model.node, query.peer)?,
        interface: model.node.primary_interface.clone(),
    })
}

impl Evaluation {
    /// The groups refuse the flow and the pod is audited: it passes, reported as
    /// "would drop", and is not tracked (the next packet is judged again).
    pub fn would_deny(&self) -> bool {
        !self.allowed && self.action == EnforcingAction::Audit
    }

    /// Whether the packet passes: allowed, or audited ([`Evaluation::would_deny`]).
    pub fn passes(&self) -> bool {
        self.allowed || self.would_deny()
    }
}

/// The result of one set of groups in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetEvaluation {
    /// The allowing rules, in rule-ID order.
    pub matched: Vec<RuleRef>,
    /// Allowed and eligible for untracked handling (§4).
    pub untracked: bool,
}

impl SetEvaluation {
    pub fn allowed(&self) -> bool {
        !self.matched.is_empty()
    }
}

/// Judges a new flow of `pod` (no conntrack): §5, then §6 same-node, then the rules (§3).
pub fn evaluate(model: &Model, pod: &BranchPod, query: &Query) -> Evaluation {
    let mode = pod.mode;
    let unchecked = |reason| Evaluation {
        allowed: true,
        mode,
        action: pod.action,
        reason,
        branch: Vec::new(),
        primary: Vec::new(),
        untracked: true,
        nat: None,
    };
    if let Some(kind) = unfiltered(model, pod, query) {
        return unchecked(Reason::Unfiltered(kind));
    }
    if mode == EnforcingMode::Standard && model.node_local.contains(&query.peer) {
        return unchecked(Reason::SameNode);
    }
    let branch = evaluate_set(model, &pod.groups, query.direction, query.peer, query.l4);
    let primary = (mode == EnforcingMode::Standard).then(|| {
        evaluate_set(
            model,
            &model.node.primary_security_groups,
            query.direction,
            query.peer,
            query.l4,
        )
    });
    let refused = match (
        branch.allowed(),
        primary.as_ref().map(SetEvaluation::allowed),
    ) {
        (true, None | Some(true)) => None,
        (false, None | Some(true)) => Some(Refused::Branch),
        (true, Some(false)) => Some(Refused::Primary),
        (false, Some(false)) => Some(Refused::Both),
    };
    let untracked =
        refused.is_none() && branch.untracked && primary.as_ref().is_none_or(|p| p.untracked);
    let primary = primary.map(|p| p.matched).unwrap_or_default();
    let nat = refused
        .is_none()
        .then(|| source_nat(model, pod, query))
        .flatten();
    Evaluation {
        allowed: refused.is_none(),
        mode,
        action: pod.action,
        reason: refused.map_or(Reason::Allowed, |refused| Reason::NoRule { refused }),
        branch: branch.matched,
        primary,
        untracked,
        nat,
    }
}

/// Evaluates one set of groups (duplicates and order do not matter) in one direction.
/// Group IDs absent from the model contribute no rules.
pub fn evaluate_set(
    model: &Model,
    groups: &[GroupId],
    direction: Direction,
    peer: IpAddr,
    l4: L4Query,
) -> SetEvaluation {
    let groups = sorted_set(groups);
    let mut matched = Vec::new();
    let mut from_everything = false;
    for group in groups.iter().filter_map(|id| model.groups.get(id)) {
        for (index, rule) in group.rules(direction).iter().enumerate() {
            if l4_matches(&rule.l4, l4) && peer_matches(model, &rule.peer, peer) {
                from_everything |= everything_family(&rule.peer) == Some(peer.is_ipv6());
                matched.push(RuleRef {
                    group_id: group.id.clone(),
                    direction,
                    index,
                });
            }
        }
    }
    let untracked = match l4 {
        L4Query::Packet(packet) if packet.has_ports() => {
            from_everything
                && opens_all_ports(
                    model,
                    &groups,
                    direction.opposite(),
                    peer.is_ipv6(),
                    packet.protocol,
                )
        }
        _ => false,
    };
    SetEvaluation { matched, untracked }
}

/// The rules of `groups` in `direction` whose peer contains `peer`, whatever they allow at
/// layer 4 (to tell a user which ports a peer may use when the one asked for is refused).
pub fn peer_rules(
    model: &Model,
    groups: &[GroupId],
    direction: Direction,
    peer: IpAddr,
) -> Vec<RuleRef> {
    let mut out = Vec::new();
    for group in sorted_set(groups)
        .iter()
        .filter_map(|id| model.groups.get(id))
    {
        for (index, rule) in group.rules(direction).iter().enumerate() {
            if peer_matches(model, &rule.peer, peer) {
                out.push(RuleRef {
                    group_id: group.id.clone(),
                    direction,
                    index,
                });
            }
        }
    }
    out
}

/// Whether some rule of `groups` in `direction` allows every port of `protocol` (TCP/UDP)
/// to or from `0.0.0.0/0` (`::/0` when `v6`): the reverse half of the untracked condition (§4).
pub fn opens_all_ports(
    model: &Model,
    groups: &[GroupId],
    direction: Direction,
    v6: bool,
    protocol: u8,
) -> bool {
    groups
        .iter()
        .filter_map(|id| model.groups.get(id))
        .flat_map(|group| group.rules(direction))
        .any(|rule| {
            everything_family(&rule.peer) == Some(v6)
                && match rule.l4 {
                    L4Match::All => true,
                    L4Match::Ports {
                        protocol: p,
                        from,
                        to,
                    } => p == protocol && from == 0 && to == u16::MAX,
                    L4Match::Protocol(p) => p == protocol,
                    L4Match::Icmp { .. } => false,
                }
        })
}

/// For a `0.0.0.0/0` or `::/0` peer, whether it is the IPv6 one; `None` for any other peer.
pub fn everything_family(peer: &Peer) -> Option<bool> {
    match peer {
        Peer::Cidr(cidr) if cidr.is_everything() => Some(!cidr.is_ipv4()),
        _ => None,
    }
}

/// Sorted, de-duplicated group IDs: the identity of a set of groups.
pub fn sorted_set(groups: &[GroupId]) -> Vec<GroupId> {
    let mut set = groups.to_vec();
    set.sort();
    set.dedup();
    set
}

fn l4_matches(rule: &L4Match, query: L4Query) -> bool {
    let packet = match (rule, query) {
        (L4Match::All, _) => return true,
        (_, L4Query::AllTraffic) => return false,
        (_, L4Query::Packet(packet)) => packet,
    };
    match *rule {
        L4Match::All => true,
        L4Match::Ports { protocol, from, to } => {
            packet.protocol == protocol && (from..=to).contains(&packet.selector)
        }
        L4Match::Icmp {
            v6,
            icmp_type,
            code,
        } => {
            let protocol = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
            // Any type implies any code (§3), whatever `code` says.
            packet.protocol == protocol
                && icmp_type.is_none_or(|t| {
                    t == packet.icmp_type() && code.is_none_or(|c| c == packet.icmp_code())
                })
        }
        L4Match::Protocol(protocol) => packet.protocol == protocol,
    }
}

fn peer_matches(model: &Model, peer: &Peer, ip: IpAddr) -> bool {
    match peer {
        Peer::Cidr(cidr) => cidr.contains(ip),
        Peer::PrefixList(id) => model
            .prefix_lists
            .get(id)
            .is_some_and(|cidrs| cidrs.iter().any(|c| c.contains(ip))),
        Peer::Group(id) => model
            .members
            .get(id)
            .is_some_and(|m| m.iter().any(|c| c.contains(ip))),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::model::{Cidr, L4Match, Model};

    const STRICT: EnforcingMode = EnforcingMode::Strict;
    const STANDARD: EnforcingMode = EnforcingMode::Standard;

    fn q(direction: Direction, peer: &str, packet: L4Packet) -> Query {
        Query {
            direction,
            peer: ip(peer),
            l4: L4Query::Packet(packet),
        }
    }

    fn ingress(peer: &str, packet: L4Packet) -> Query {
        q(Direction::Ingress, peer, packet)
    }

    fn egress(peer: &str, packet: L4Packet) -> Query {
        q(Direction::Egress, peer, packet)
    }

    fn eval(model: &Model, query: Query) -> Evaluation {
        evaluate(model, &model.pods[0], &query)
    }

    fn rref(group: &str, direction: Direction, index: usize) -> RuleRef {
        RuleRef {
            group_id: group.to_string(),
            direction,
            index,
        }
    }

    fn web_model(mode: EnforcingMode) -> Model {
        let web = group(
            "sg-web",
            vec![
                rule(tcp(443, 443), cidr("0.0.0.0/0")),
                rule(tcp(8000, 8999), cidr("10.1.0.0/16")),
                rule(udp(53, 53), cidr("2600:1f00::/56")),
            ],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        let node_sg = group(
            "sg-node",
            vec![rule(tcp(0, 65535), cidr("10.0.0.0/8"))],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        model(
            vec![web, node_sg],
            vec![pod(5, "10.0.64.5", &["sg-web"], mode)],
        )
    }

    #[test]
    fn tcp_port_ranges_are_inclusive() {
        let m = web_model(STRICT);
        for (port, allowed) in [(7999, false), (8000, true), (8999, true), (9000, false)] {
            let e = eval(&m, ingress("10.1.2.3", L4Packet::tcp(port)));
            assert_eq!(e.allowed, allowed, "port {port}");
        }
        let e = eval(&m, ingress("10.1.2.3", L4Packet::tcp(8080)));
        assert_eq!(e.branch, vec![rref("sg-web", Direction::Ingress, 1)]);
        assert_eq!(e.reason, Reason::Allowed);
        assert!(e.primary.is_empty());
    }

    #[test]
    fn protocol_must_match_ports_rule() {
        let m = web_model(STRICT);
        assert!(!eval(&m, ingress("10.1.2.3", L4Packet::udp(8080))).allowed);
        assert!(!eval(&m, ingress("10.1.2.3", L4Packet::new(50, 8080, 0, 0))).allowed);
    }

    #[test]
    fn families_only_match_their_own_prefixes() {
        let m = web_model(STRICT);
        assert!(eval(&m, ingress("2600:1f00::99", L4Packet::udp(53))).allowed);
        // 0.0.0.0/0 is not ::/0.
        assert!(!eval(&m, ingress("2600:1f01::1", L4Packet::tcp(443))).allowed);
        assert!(eval(&m, ingress("192.0.2.1", L4Packet::tcp(443))).allowed);
    }

    #[test]
    fn all_and_other_protocols() {
        let g = group(
            "sg-a",
            vec![
                rule(L4Match::Protocol(50), cidr("192.0.2.0/24")),
                rule(L4Match::All, cidr("198.51.100.7/32")),
            ],
            vec![],
        );
        let m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-a"], STRICT)]);
        assert!(eval(&m, ingress("192.0.2.9", L4Packet::new(50, 0, 0, 0))).allowed);
        assert!(!eval(&m, ingress("192.0.2.9", L4Packet::new(51, 0, 0, 0))).allowed);
        assert!(!eval(&m, ingress("192.0.2.9", L4Packet::tcp(1))).allowed);
        for packet in [
            L4Packet::tcp(1),
            L4Packet::icmp(8, 0),
            L4Packet::new(132, 0, 0, 0),
        ] {
            assert!(eval(&m, ingress("198.51.100.7", packet)).allowed);
        }
        let all = Query {
            direction: Direction::Ingress,
            peer: ip("198.51.100.7"),
            l4: L4Query::AllTraffic,
        };
        assert!(eval(&m, all).allowed);
        let all_other = Query {
            peer: ip("192.0.2.9"),
            ..all
        };
        assert!(!eval(&m, all_other).allowed);
        // An SG with no outbound rules lets nothing out.
        assert!(!eval(&m, egress("192.0.2.9", L4Packet::tcp(80))).allowed);
    }

    #[test]
    fn icmp_type_and_code() {
        let icmp = |v6, icmp_type, code| L4Match::Icmp {
            v6,
            icmp_type,
            code,
        };
        let g = group(
            "sg-i",
            vec![
                rule(icmp(false, Some(8), None), cidr("0.0.0.0/0")),
                rule(icmp(false, Some(3), Some(4)), cidr("0.0.0.0/0")),
                rule(icmp(true, None, None), cidr("::/0")),
            ],
            vec![],
        );
        let m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-i"], STRICT)]);
        let peer = "192.0.2.1";
        assert!(eval(&m, ingress(peer, L4Packet::icmp(8, 0))).allowed);
        assert!(eval(&m, ingress(peer, L4Packet::icmp(8, 9))).allowed);
        assert!(eval(&m, ingress(peer, L4Packet::icmp(3, 4))).allowed);
        assert!(!eval(&m, ingress(peer, L4Packet::icmp(3, 3))).allowed);
        assert!(!eval(&m, ingress(peer, L4Packet::icmp(0, 0))).allowed);
        assert!(eval(&m, ingress("2001:db8::1", L4Packet::icmpv6(128, 0))).allowed);
        // ICMPv6 rules do not allow ICMP, and ICMP is never untracked.
        assert!(!eval(&m, ingress(peer, L4Packet::new(58, 0, 8, 0))).allowed);
        assert!(!eval(&m, ingress(peer, L4Packet::icmp(8, 0))).untracked);
    }

    #[test]
    fn prefix_lists_and_referenced_groups() {
        let g = group(
            "sg-a",
            vec![
                rule(tcp(22, 22), Peer::PrefixList("pl-1".to_string())),
                rule(tcp(80, 80), Peer::Group("sg-b".to_string())),
            ],
            vec![],
        );
        let mut m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-a"], STRICT)]);
        m.prefix_lists.insert(
            "pl-1".to_string(),
            vec![
                "203.0.113.0/24".parse::<Cidr>().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
        );
        m.members.insert(
            "sg-b".to_string(),
            [ip("10.0.9.9"), ip("2600:1f00::99")].map(Cidr::host).into(),
        );
        assert!(eval(&m, ingress("203.0.113.77", L4Packet::tcp(22))).allowed);
        assert!(eval(&m, ingress("2001:db8:1::1", L4Packet::tcp(22))).allowed);
        assert!(!eval(&m, ingress("203.0.114.1", L4Packet::tcp(22))).allowed);
        assert!(eval(&m, ingress("10.0.9.9", L4Packet::tcp(80))).allowed);
        assert!(eval(&m, ingress("2600:1f00::99", L4Packet::tcp(80))).allowed);
        assert!(!eval(&m, ingress("10.0.9.8", L4Packet::tcp(80))).allowed);
    }

    #[test]
    fn union_over_groups_lists_every_allowing_rule_in_order() {
        let a = group("sg-a", vec![rule(tcp(0, 1000), cidr("10.0.0.0/8"))], vec![]);
        let b = group(
            "sg-b",
            vec![
                rule(tcp(443, 443), cidr("10.2.0.0/16")),
                rule(tcp(1, 1), cidr("10.2.0.0/16")),
                rule(L4Match::All, cidr("10.2.3.4/32")),
            ],
            vec![],
        );
        let m = model(
            vec![a, b],
            vec![pod(1, "10.0.64.1", &["sg-b", "sg-a", "sg-b"], STRICT)],
        );
        let e = eval(&m, ingress("10.2.3.4", L4Packet::tcp(443)));
        assert_eq!(
            e.branch,
            vec![
                rref("sg-a", Direction::Ingress, 0),
                rref("sg-b", Direction::Ingress, 0),
                rref("sg-b", Direction::Ingress, 2),
            ]
        );
    }

    #[test]
    fn standard_mode_needs_both_sets() {
        let m = web_model(STANDARD);
        // Branch allows 443 from anywhere, primary only from 10/8.
        let e = eval(&m, ingress("192.0.2.1", L4Packet::tcp(443)));
        assert!(!e.allowed);
        assert_eq!(
            e.reason,
            Reason::NoRule {
                refused: Refused::Primary
            }
        );
        assert_eq!(e.branch.len(), 1);
        let e = eval(&m, ingress("10.9.0.1", L4Packet::tcp(443)));
        assert!(e.allowed);
        assert_eq!(e.primary, vec![rref("sg-node", Direction::Ingress, 0)]);
        let e = eval(&m, ingress("10.9.0.1", L4Packet::tcp(22)));
        assert_eq!(
            e.reason,
            Reason::NoRule {
                refused: Refused::Branch
            }
        );
        let e = eval(&m, ingress("192.0.2.1", L4Packet::tcp(22)));
        assert_eq!(
            e.reason,
            Reason::NoRule {
                refused: Refused::Both
            }
        );
        // Strict mode ignores the primary set.
        assert!(eval(&web_model(STRICT), ingress("192.0.2.1", L4Packet::tcp(443))).allowed);
    }

    #[test]
    fn same_node_is_unchecked_only_in_standard_mode() {
        for (mode, allowed) in [(STANDARD, true), (STRICT, false)] {
            let m = web_model(mode);
            let e = eval(&m, ingress("10.0.1.10", L4Packet::tcp(10250)));
            assert_eq!(e.allowed, allowed);
            if allowed {
                assert_eq!(e.reason, Reason::SameNode);
                assert!(e.untracked);
            }
        }
    }

    #[test]
    fn unfiltered_addresses_and_protocols() {
        let m = web_model(STRICT);
        let cases = [
            ("10.0.0.2", Unfiltered::AmazonDns),
            ("169.254.169.253", Unfiltered::AmazonDns),
            ("fd00:ec2::253", Unfiltered::AmazonDns),
            ("169.254.169.254", Unfiltered::Imds),
            ("fd00:ec2::254", Unfiltered::Imds),
            ("169.254.169.123", Unfiltered::TimeSync),
            ("fd00:ec2::123", Unfiltered::TimeSync),
            ("10.0.64.1", Unfiltered::SubnetRouter),
            ("2600:1f00::1", Unfiltered::SubnetRouter),
            ("169.254.169.250", Unfiltered::WindowsActivation),
            ("169.254.169.251", Unfiltered::WindowsActivation),
            ("169.254.170.2", Unfiltered::EcsTaskMetadata),
        ];
        for (peer, kind) in cases {
            let e = eval(&m, ingress(peer, L4Packet::udp(9999)));
            assert_eq!(e.reason, Reason::Unfiltered(kind), "{peer}");
            assert!(e.allowed && e.untracked);
        }
        for filtered in [
            "10.0.0.3",
            "169.254.169.249",
            "169.254.170.3",
            "fd00:ec2::250",
        ] {
            assert!(
                !eval(&m, ingress(filtered, L4Packet::udp(9999))).allowed,
                "{filtered}"
            );
        }
        let dhcp = [
            (egress("255.255.255.255", L4Packet::udp(67)), true),
            (egress("ff02::1:2", L4Packet::udp(547)), true),
            (ingress("fe80::1", L4Packet::udp(546)), true),
            (ingress("fe80::1", L4Packet::tcp(546)), false),
            (egress("255.255.255.255", L4Packet::udp(68)), false),
            // UDP 67/68 with anyone but the DHCP server is ordinary traffic: the
            // internet cannot reach a pod's client port, nor a pod anyone's server port.
            (ingress("10.0.64.9", L4Packet::udp(68)), false),
            (ingress("198.51.100.7", L4Packet::udp(68)), false),
            (egress("192.0.2.1", L4Packet::udp(67)), false),
            (egress("192.0.2.1", L4Packet::udp(547)), false),
            (ingress("2001:db8::7", L4Packet::udp(546)), false),
        ];
        for (query, is_dhcp) in dhcp {
            let e = eval(&m, query);
            assert_eq!(
                e.reason == Reason::Unfiltered(Unfiltered::Dhcp),
                is_dhcp,
                "{query:?}"
            );
        }
        // Discovery is decided per packet (`neighbour_discovery`), never as a flow:
        // what reaches the groups is ordinary ICMPv6.
        for t in [128, 133, 135, 137, 138] {
            assert!(!eval(&m, ingress("fe80::1", L4Packet::icmpv6(t, 0))).allowed);
        }
    }

    #[test]
    fn untracked_needs_everything_both_ways() {
        let m = web_model(STRICT);
        // Ingress 443 from 0.0.0.0/0, egress all to 0.0.0.0/0: untracked.
        assert!(eval(&m, ingress("192.0.2.1", L4Packet::tcp(443))).untracked);
        // Allowed, but from 10.1/16 only: tracked.
        assert!(!eval(&m, ingress("10.1.0.1", L4Packet::tcp(8000))).untracked);
        // Egress to 0.0.0.0/0, but ingress has no all-ports rule from 0.0.0.0/0.
        assert!(!eval(&m, egress("192.0.2.1", L4Packet::tcp(80))).untracked);
        // Egress ICMP is always tracked.
        assert!(!eval(&m, egress("192.0.2.1", L4Packet::icmp(8, 0))).untracked);

        let g = group(
            "sg-u",
            vec![
                rule(udp(0, 65535), cidr("::/0")),
                rule(tcp(0, 65534), cidr("0.0.0.0/0")),
            ],
            vec![
                rule(udp(53, 53), cidr("::/0")),
                rule(tcp(80, 80), cidr("0.0.0.0/0")),
            ],
        );
        let m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-u"], STRICT)]);
        assert!(eval(&m, egress("2001:db8::1", L4Packet::udp(53))).untracked);
        // The reverse rule covers UDP only, and only not all TCP ports.
        assert!(!eval(&m, egress("192.0.2.1", L4Packet::tcp(80))).untracked);

        // Standard: both sides must be untracked.
        let mut m = web_model(STANDARD);
        m.groups.get_mut("sg-node").unwrap().ingress = vec![rule(tcp(443, 443), cidr("0.0.0.0/0"))];
        assert!(eval(&m, ingress("192.0.2.1", L4Packet::tcp(443))).untracked);
        m.groups.get_mut("sg-node").unwrap().ingress =
            vec![rule(tcp(443, 443), cidr("192.0.2.0/24"))];
        let e = eval(&m, ingress("192.0.2.1", L4Packet::tcp(443)));
        assert!(e.allowed && !e.untracked);
    }

    #[test]
    fn unknown_groups_contribute_nothing() {
        let m = model(vec![], vec![pod(1, "10.0.64.1", &["sg-gone"], STRICT)]);
        let e = eval(&m, egress("192.0.2.1", L4Packet::tcp(80)));
        assert!(!e.allowed && e.branch.is_empty());
    }
}
