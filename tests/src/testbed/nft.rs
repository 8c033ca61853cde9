//! One branch pod's security groups as the nftables rulesets an operator would write, for
//! the throughput benchmark: in the node's `inet` forward hook (where conntrack is), keyed by
//! the pod's VLAN link, stateful (`ct state established,related accept` first), either one
//! rule per (group, rule, peer) or named concatenated interval sets.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{BranchPod, Cidr, Direction, L4Match, Model, Peer};
use enforcer::policy::eval;

/// The named counter of the `ct state established,related accept` rule.
pub const ESTABLISHED_COUNTER: &str = "established";

/// How the pod's rules are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One rule per (group, rule, peer), in order.
    Linear,
    /// Per direction and family: interval sets keyed by address, address . protocol . port,
    /// address . ICMP type . code, address . protocol; one lookup rule each.
    Sets,
}

/// A ruleset and its size.
pub struct Ruleset {
    pub text: String,
    /// Rules in the pod's chains.
    pub rules: usize,
    /// Elements in its sets.
    pub elements: usize,
}

/// The table `table` judging `pod`'s traffic on its VLAN link `link` (ingress: arriving on
/// it, towards the pod; egress: leaving on it).
pub fn ruleset(model: &Model, pod: &BranchPod, link: &str, table: &str, layout: Layout) -> Ruleset {
    let mut out = Ruleset {
        text: String::new(),
        rules: 0,
        elements: 0,
    };
    let mut chains = String::new();
    let mut sets = String::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        let name = chain_name(direction);
        let mut rules = header_rules(model, pod, direction);
        match layout {
            Layout::Linear => rules.extend(linear_rules(model, pod, direction)),
            Layout::Sets => {
                for v6 in [false, true] {
                    for (set, rule, elements) in set_rules(model, pod, direction, v6) {
                        out.elements += elements;
                        sets.push_str(&set);
                        rules.push(rule);
                    }
                }
            }
        }
        rules.push("drop".into());
        out.rules += rules.len();
        let _ = writeln!(chains, "  chain {name} {{");
        for rule in rules {
            let _ = writeln!(chains, "    {rule}");
        }
        chains.push_str("  }\n");
    }
    let _ = write!(
        out.text,
        "table inet {table} {{\n  counter {ESTABLISHED_COUNTER} {{ }}\n{sets}  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related counter name \"{ESTABLISHED_COUNTER}\" accept\n    iifname vmap {{ \"{link}\" : jump {} }}\n    oifname vmap {{ \"{link}\" : jump {} }}\n  }}\n{chains}}}\n",
        chain_name(Direction::Ingress),
        chain_name(Direction::Egress),
    );
    out
}

fn chain_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "pod_ingress",
        Direction::Egress => "pod_egress",
    }
}

fn family(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

/// `saddr` for the peer of an ingress packet, `daddr` for egress.
fn peer_field(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    }
}

fn pod_field(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "daddr",
        Direction::Egress => "saddr",
    }
}

/// What the enforcer checks before the rules: the pod's own address (anti-spoofing), peers
/// never filtered, DHCP and IPv6 neighbour discovery.
fn header_rules(model: &Model, pod: &BranchPod, direction: Direction) -> Vec<String> {
    let mut rules = Vec::new();
    for (v6, own) in [
        (false, pod.ipv4.map(IpAddr::V4)),
        (true, pod.ipv6.map(IpAddr::V6)),
    ] {
        rules.push(match own {
            Some(own) => format!("{} {} != {own} drop", family(v6), pod_field(direction)),
            None => format!("meta nfproto {} drop", if v6 { "ipv6" } else { "ipv4" }),
        });
    }
    let unfiltered: Vec<IpAddr> = eval::node_unfiltered(model)
        .into_iter()
        .map(|(addr, _)| addr)
        .chain(eval::pod_unfiltered(pod))
        .collect();
    for v6 in [false, true] {
        let addrs: Vec<String> = unfiltered
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if !addrs.is_empty() {
            rules.push(format!(
                "{} {} {{ {} }} accept",
                family(v6),
                peer_field(direction),
                addrs.join(", ")
            ));
        }
    }
    let (dhcp_v4, dhcp_v6) = match direction {
        Direction::Ingress => (68, 546),
        Direction::Egress => (67, 547),
    };
    rules.push(format!("meta nfproto ipv4 udp dport {dhcp_v4} accept"));
    rules.push(format!("meta nfproto ipv6 udp dport {dhcp_v6} accept"));
    rules.push("icmpv6 type 133-137 accept".into());
    rules
}

/// Every rule of the pod's groups in `direction` with each of its peers' prefixes.
fn rules_with_peers(model: &Model, pod: &BranchPod, direction: Direction) -> Vec<(Cidr, L4Match)> {
    let mut out = Vec::new();
    for group in eval::sorted_set(&pod.groups)
        .iter()
        .filter_map(|id| model.groups.get(id))
    {
        for rule in group.rules(direction) {
            let peers: Vec<Cidr> = match &rule.peer {
                Peer::Cidr(cidr) => vec![*cidr],
                Peer::PrefixList(id) => model.prefix_lists.get(id).cloned().unwrap_or_default(),
                Peer::Group(id) => model
                    .members
                    .get(id)
                    .map(|m| m.iter().copied().collect())
                    .unwrap_or_default(),
            };
            out.extend(peers.into_iter().map(|peer| (peer, rule.l4)));
        }
    }
    out
}

fn range<T: std::fmt::Display + PartialEq>(from: T, to: T) -> String {
    if from == to {
        from.to_string()
    } else {
        format!("{from}-{to}")
    }
}

/// The L4 part of a linear rule, `None` when the rule cannot match a packet of the peer's
/// family (ICMP rules of the other family).
fn l4_expression(l4: L4Match, v6: bool) -> Option<String> {
    Some(match l4 {
        L4Match::All => String::new(),
        L4Match::Ports { protocol, from, to } => {
            let name = match protocol {
                eval::PROTO_TCP => "tcp".to_string(),
                eval::PROTO_UDP => "udp".to_string(),
                other => format!("meta l4proto {other} th"),
            };
            if from == 0 && to == u16::MAX {
                format!("meta l4proto {protocol}")
            } else {
                format!("{name} dport {}", range(from, to))
            }
        }
        L4Match::Icmp {
            v6: rule_v6,
            icmp_type,
            code,
        } => {
            if rule_v6 != v6 {
                return None;
            }
            let icmp = if v6 { "icmpv6" } else { "icmp" };
            match (icmp_type, code) {
                (None, _) => format!("meta l4proto {}", if v6 { "ipv6-icmp" } else { "icmp" }),
                (Some(t), None) => format!("{icmp} type {t}"),
                (Some(t), Some(c)) => format!("{icmp} type {t} {icmp} code {c}"),
            }
        }
        L4Match::Protocol(protocol) => format!("meta l4proto {protocol}"),
    })
}

fn linear_rules(model: &Model, pod: &BranchPod, direction: Direction) -> Vec<String> {
    rules_with_peers(model, pod, direction)
        .into_iter()
        .filter_map(|(peer, l4)| {
            let v6 = !peer.is_ipv4();
            let l4 = l4_expression(l4, v6)?;
            Some(format!(
                "{} {} {peer} {l4}{}accept",
                family(v6),
                peer_field(direction),
                if l4.is_empty() { "" } else { " " }
            ))
        })
        .collect()
}

/// An N-dimensional box: an inclusive range per dimension.
type Region = Vec<(u128, u128)>;

/// Disjoint boxes covering exactly the union of `boxes` (pipapo sets refuse overlapping
/// elements): elementary intervals of the first dimension, each with the disjoint union of
/// the rest of the boxes covering it, neighbours with the same rest merged.
fn disjoint(boxes: &[Region]) -> Vec<Region> {
    if boxes.is_empty() {
        return Vec::new();
    }
    let mut bounds: Vec<u128> = boxes
        .iter()
        .flat_map(|b| [b[0].0, b[0].1.saturating_add(1)])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<Region> = Vec::new();
    let mut previous: Option<((u128, u128), Vec<Region>)> = None;
    let flush = |span: (u128, u128), rests: Vec<Region>, out: &mut Vec<Region>| {
        if rests.is_empty() {
            out.push(vec![span]);
        }
        for rest in rests {
            let mut b = vec![span];
            b.extend(rest);
            out.push(b);
        }
    };
    for pair in bounds.windows(2) {
        let span = (pair[0], pair[1] - 1);
        let covering: Vec<&Region> = boxes
            .iter()
            .filter(|b| b[0].0 <= span.0 && span.1 <= b[0].1)
            .collect();
        if covering.is_empty() {
            if let Some((s, r)) = previous.take() {
                flush(s, r, &mut out);
            }
            continue;
        }
        let rests = if boxes[0].len() == 1 {
            Vec::new()
        } else {
            let tails: Vec<Region> = covering.iter().map(|b| b[1..].to_vec()).collect();
            disjoint(&tails)
        };
        previous = match previous.take() {
            Some((s, r)) if r == rests && s.1 + 1 == span.0 => Some(((s.0, span.1), r)),
            Some((s, r)) => {
                flush(s, r, &mut out);
                Some((span, rests))
            }
            None => Some((span, rests)),
        };
    }
    if let Some((s, r)) = previous {
        flush(s, r, &mut out);
    }
    out
}

fn address_range(cidr: &Cidr) -> (u128, u128) {
    let bits = if cidr.is_ipv4() { 32 } else { 128 };
    let base = match cidr.addr() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let host_bits = bits - u32::from(cidr.prefix_len());
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (base, base + span)
}

fn address(v6: bool, value: u128) -> String {
    if v6 {
        Ipv6Addr::from(value).to_string()
    } else {
        Ipv4Addr::from(value as u32).to_string()
    }
}

/// The sets of one direction and family, each with the rule that looks it up and its size.
fn set_rules(
    model: &Model,
    pod: &BranchPod,
    direction: Direction,
    v6: bool,
) -> Vec<(String, String, usize)> {
    let mut all = Vec::new();
    let mut ports = Vec::new();
    let mut icmp = Vec::new();
    let mut protocols = Vec::new();
    for (peer, l4) in rules_with_peers(model, pod, direction) {
        if peer.is_ipv4() == v6 {
            continue;
        }
        let addr = address_range(&peer);
        match l4 {
            L4Match::All => all.push(vec![addr]),
            L4Match::Ports { protocol, from, to } => ports.push(vec![
                addr,
                (u128::from(protocol), u128::from(protocol)),
                (u128::from(from), u128::from(to)),
            ]),
            L4Match::Icmp {
                v6: rule_v6,
                icmp_type,
                code,
            } if rule_v6 == v6 => {
                let (types, codes) = match (icmp_type, code) {
                    (None, _) => ((0, 255), (0, 255)),
                    (Some(t), None) => ((u128::from(t), u128::from(t)), (0, 255)),
                    (Some(t), Some(c)) => (
                        (u128::from(t), u128::from(t)),
                        (u128::from(c), u128::from(c)),
                    ),
                };
                icmp.push(vec![addr, types, codes]);
            }
            L4Match::Icmp { .. } => {}
            L4Match::Protocol(p) => protocols.push(vec![addr, (u128::from(p), u128::from(p))]),
        }
    }
    let fam = family(v6);
    let field = peer_field(direction);
    let dir = match direction {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    };
    let ip_type = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    let (icmp_expr, icmp_types) = if v6 {
        ("icmpv6 type . icmpv6 code", "icmpv6_type . icmpv6_code")
    } else {
        ("icmp type . icmp code", "icmp_type . icmp_code")
    };
    let kinds = [
        ("all", all, String::new(), String::new()),
        (
            "ports",
            ports,
            " . inet_proto . inet_service".to_string(),
            " . meta l4proto . th dport".to_string(),
        ),
        (
            "icmp",
            icmp,
            format!(" . {icmp_types}"),
            format!(" . {icmp_expr}"),
        ),
        (
            "proto",
            protocols,
            " . inet_proto".to_string(),
            " . meta l4proto".to_string(),
        ),
    ];
    let mut out = Vec::new();
    for (kind, boxes, key_type, key_expr) in kinds {
        let elements = disjoint(&boxes);
        if elements.is_empty() {
            continue;
        }
        let name = format!("{dir}_{fam}_{kind}");
        let text: Vec<String> = elements
            .iter()
            .map(|b| {
                let mut parts = vec![range(address(v6, b[0].0), address(v6, b[0].1))];
                parts.extend(b[1..].iter().map(|(lo, hi)| range(*lo, *hi)));
                parts.join(" . ")
            })
            .collect();
        let set = format!(
            "  set {name} {{\n    type {ip_type}{key_type}\n    flags interval\n    elements = {{ {} }}\n  }}\n",
            text.join(", ")
        );
        let rule = format!("{fam} {field}{key_expr} @{name} accept");
        out.push((set, rule, elements.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_boxes_cover_the_union_once() {
        let boxes = vec![
            vec![(0, 255), (80, 80)],
            vec![(10, 20), (0, 1000)],
            vec![(300, 400), (5, 6)],
        ];
        let out = disjoint(&boxes);
        for x in 0..500u128 {
            for y in 0..1100u128 {
                let inside = |b: &Region| b[0].0 <= x && x <= b[0].1 && b[1].0 <= y && y <= b[1].1;
                let wanted = boxes.iter().any(inside);
                let hits = out.iter().filter(|b| inside(b)).count();
                assert_eq!(hits, usize::from(wanted), "({x}, {y}) in {out:?}");
            }
        }
    }

    #[test]
    fn icmp_of_the_other_family_never_matches() {
        let l4 = L4Match::Icmp {
            v6: true,
            icmp_type: Some(128),
            code: None,
        };
        assert_eq!(l4_expression(l4, false), None);
        assert_eq!(l4_expression(l4, true).as_deref(), Some("icmpv6 type 128"));
    }
}
