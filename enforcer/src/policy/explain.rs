//! `enforcer explain`: the evaluator's verdict on a new flow of a pod, told for a person (the
//! rules in EC2 console terms, hints on common mistakes) and as the JSON object of the contract.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use crate::model::{BranchPod, Direction, EnforcingMode, GroupsSource, L4Match, Model, Peer};
use crate::policy::eval::{
    self, Evaluation, L4Packet, L4Query, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Query,
    Reason, Refused, RuleRef, Side,
};

/// Why the command line does not describe a flow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("unknown protocol {0:?}: use tcp, udp, icmp, icmpv6, all or a number 0-255")]
    Protocol(String),
    #[error("--port is required for {0}")]
    PortRequired(&'static str),
    #[error("--port only applies to tcp and udp")]
    PortNotApplicable,
    #[error("--icmp-type is required for {0}")]
    IcmpTypeRequired(&'static str),
    #[error("--icmp-type and --icmp-code only apply to icmp and icmpv6")]
    IcmpNotApplicable,
    #[error("{protocol} does not go with the peer {peer}: use {instead}")]
    IcmpFamily {
        protocol: &'static str,
        peer: IpAddr,
        instead: &'static str,
    },
}

/// A query from the command line's words: `protocol` is tcp, udp, icmp, icmpv6, all (or -1)
/// or a number; TCP/UDP need a port, ICMP a type (the code defaults to 0).
pub fn parse_query(
    direction: Direction,
    peer: IpAddr,
    protocol: &str,
    port: Option<u16>,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
) -> Result<Query, QueryError> {
    let number = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "icmp" => Some(PROTO_ICMP),
        "icmpv6" => Some(PROTO_ICMPV6),
        "all" | "-1" => None,
        other => Some(
            other
                .parse::<u8>()
                .map_err(|_| QueryError::Protocol(protocol.to_string()))?,
        ),
    };
    let icmp_given = icmp_type.is_some() || icmp_code.is_some();
    let l4 = match number {
        Some(p @ (PROTO_TCP | PROTO_UDP)) => {
            if icmp_given {
                return Err(QueryError::IcmpNotApplicable);
            }
            let name = if p == PROTO_TCP { "tcp" } else { "udp" };
            let port = port.ok_or(QueryError::PortRequired(name))?;
            L4Query::Packet(L4Packet::new(p, port, 0, 0))
        }
        Some(p @ (PROTO_ICMP | PROTO_ICMPV6)) => {
            let (name, v6, instead) = if p == PROTO_ICMP {
                ("icmp", false, "icmpv6")
            } else {
                ("icmpv6", true, "icmp")
            };
            if port.is_some() {
                return Err(QueryError::PortNotApplicable);
            }
            if peer.is_ipv6() != v6 {
                return Err(QueryError::IcmpFamily {
                    protocol: name,
                    peer,
                    instead,
                });
            }
            let icmp_type = icmp_type.ok_or(QueryError::IcmpTypeRequired(name))?;
            L4Query::Packet(L4Packet::new(p, 0, icmp_type, icmp_code.unwrap_or(0)))
        }
        other => {
            if port.is_some() {
                return Err(QueryError::PortNotApplicable);
            }
            if icmp_given {
                return Err(QueryError::IcmpNotApplicable);
            }
            match other {
                Some(p) => L4Query::Packet(L4Packet::new(p, 0, 0, 0)),
                None => L4Query::AllTraffic,
            }
        }
    };
    Ok(Query {
        direction,
        peer,
        l4,
    })
}

/// One allowing rule, as the JSON output lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchedRule {
    pub group_id: String,
    pub group_name: String,
    pub direction: &'static str,
    pub rule_index: usize,
    /// `branch` (the pod's groups) or `primary` (the node's, standard mode).
    pub side: &'static str,
    /// The rule in EC2 console terms, e.g. `TCP 443 from 0.0.0.0/0`.
    pub rule: String,
}

/// Where a translated flow leaves the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatJson {
    pub to: std::net::Ipv4Addr,
    pub interface: String,
}

/// The verdict on one new flow with everything a person or a script needs to act on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub pod: String,
    pub vlan: u16,
    pub direction: &'static str,
    pub peer: IpAddr,
    /// IP protocol number; absent for "all traffic".
    pub protocol: Option<u8>,
    pub port: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// `allow` or `deny`: the groups' verdict.
    pub verdict: &'static str,
    /// `strict` or `standard`: the pod's mode, pinned at its creation.
    pub mode: &'static str,
    /// `enforce` or `audit`: the pod's action.
    pub action: &'static str,
    /// Denied, but the pod is audited: the flow passes, reported as "would drop".
    pub would_deny: bool,
    pub reason: String,
    /// `unfiltered`, `sameNode`, `allowed` or `noRule`.
    pub reason_code: &'static str,
    /// On deny, which groups refused: `branch`, `primary` or `both`.
    pub side: Option<&'static str>,
    /// Allowed without a conntrack entry.
    pub untracked: bool,
    /// Standard mode's source NAT: `{"to": IP, "interface": NAME}`, null when not translated.
    pub nat: Option<NatJson>,
    /// The rules allowing the flow (every checked side); empty on deny.
    pub matched: Vec<MatchedRule>,
    /// On deny in standard mode, the rules of the side that did allow it.
    pub other_side_matched: Vec<MatchedRule>,
    pub hints: Vec<String>,
    /// The pod's groups, and where they come from: `branchEni` (the ENI data),
    /// `pinned` (as the agent first enforced the pod) or `policies` (the
    /// SecurityGroupPolicies selecting it now).
    pub groups: Vec<String>,
    pub groups_source: GroupsSource,
    /// Why the pod is quarantined (enforced with no group), when it is.
    pub quarantine: Option<String>,
}

/// Evaluates `query` for `pod` and explains the verdict.
pub fn explain(model: &Model, pod: &BranchPod, query: &Query) -> Explanation {
    let evaluation = eval::evaluate(model, pod, query);
    explanation(model, pod, query, &evaluation)
}

/// Explains an evaluation already made.
pub fn explanation(
    model: &Model,
    pod: &BranchPod,
    query: &Query,
    evaluation: &Evaluation,
) -> Explanation {
    let matched_side = |rules: &[RuleRef], side| {
        rules
            .iter()
            .map(|r| matched_rule(model, r, side))
            .collect::<Vec<_>>()
    };
    let all_matched = || {
        let mut all = matched_side(&evaluation.branch, Side::Branch);
        all.extend(matched_side(&evaluation.primary, Side::Primary));
        all
    };
    let (matched, other_side_matched) = match evaluation.reason {
        Reason::Allowed => (all_matched(), Vec::new()),
        Reason::NoRule { .. } => (Vec::new(), all_matched()),
        Reason::Unfiltered(_) | Reason::SameNode => (Vec::new(), Vec::new()),
    };
    let (protocol, port, icmp_type, icmp_code) = match query.l4 {
        L4Query::AllTraffic => (None, None, None, None),
        L4Query::Packet(p) if p.has_ports() => (Some(p.protocol), Some(p.selector), None, None),
        L4Query::Packet(p) if p.is_icmp() => (
            Some(p.protocol),
            None,
            Some(p.icmp_type()),
            Some(p.icmp_code()),
        ),
        L4Query::Packet(p) => (Some(p.protocol), None, None, None),
    };
    Explanation {
        pod: pod.key(),
        vlan: pod.vlan,
        direction: query.direction.as_str(),
        peer: query.peer,
        protocol,
        port,
        icmp_type,
        icmp_code,
        verdict: if evaluation.allowed { "allow" } else { "deny" },
        mode: evaluation.mode.name(),
        action: evaluation.action.name(),
        would_deny: evaluation.would_deny(),
        reason: reason_text(model, pod, query, evaluation),
        reason_code: match evaluation.reason {
            Reason::Unfiltered(_) => "unfiltered",
            Reason::SameNode => "sameNode",
            Reason::Allowed => "allowed",
            Reason::NoRule { .. } => "noRule",
        },
        side: match evaluation.reason {
            Reason::NoRule { refused } => Some(match refused {
                Refused::Branch => "branch",
                Refused::Primary => "primary",
                Refused::Both => "both",
            }),
            _ => None,
        },
        untracked: evaluation.untracked && evaluation.nat.is_none(),
        nat: evaluation.nat.as_ref().map(|nat| NatJson {
            to: nat.address,
            interface: nat.interface.clone(),
        }),
        matched,
        other_side_matched,
        hints: hints(model, pod, query, evaluation),
        groups: pod.groups.clone(),
        groups_source: pod.facts.groups_source,
        quarantine: pod.facts.quarantine.as_ref().map(|q| q.reason.clone()),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let preposition = if self.direction == "ingress" {
            "from"
        } else {
            "to"
        };
        writeln!(
            f,
            "{} {} {} {} {preposition} {} ({} mode): {}",
            self.verdict.to_uppercase(),
            self.pod,
            self.direction,
            self.flow_text(),
            self.peer,
            self.mode,
            self.reason
        )?;
        if self.would_deny {
            writeln!(
                f,
                "  audit: would deny (the pod is audited: the flow passes, and `enforcer flows` \
                 reports it as would drop)"
            )?;
        }
        let (heading, rules) = if self.matched.is_empty() {
            ("though allowed by", &self.other_side_matched)
        } else {
            ("allowed by", &self.matched)
        };
        if !rules.is_empty() {
            writeln!(f, "  {heading}:")?;
        }
        for rule in rules {
            let side = if rule.side == "primary" {
                " [node group]"
            } else {
                ""
            };
            writeln!(
                f,
                "    {} ({}) {} #{}: {}{side}",
                rule.group_id, rule.group_name, rule.direction, rule.rule_index, rule.rule
            )?;
        }
        if let Some(nat) = &self.nat {
            writeln!(
                f,
                "  source NAT: leaves {} from {} (a port of snatPortRange); replies come back to the pod",
                nat.interface, nat.to
            )?;
        }
        if let Some(reason) = &self.quarantine {
            writeln!(
                f,
                "  the pod is QUARANTINED, enforced with no group (its VLAN drops what security \
                 groups filter): {reason}"
            )?;
        }
        writeln!(
            f,
            "  the pod's groups {} come from {}",
            self.groups.join(", "),
            match self.groups_source {
                GroupsSource::BranchEni => "its branch ENI",
                GroupsSource::Pinned => "the agent, as it first enforced the pod",
                GroupsSource::Policies => "the SecurityGroupPolicies that select it now",
            }
        )?;
        for hint in &self.hints {
            writeln!(f, "  hint: {hint}")?;
        }
        Ok(())
    }
}

impl Explanation {
    /// `TCP 443`, `ICMP type 8 code 0`, `protocol 50`, `all traffic`.
    fn flow_text(&self) -> String {
        match (self.protocol, self.port, self.icmp_type, self.icmp_code) {
            (None, ..) => "all traffic".to_string(),
            (Some(p), Some(port), _, _) => format!("{} {port}", protocol_name(p)),
            (Some(p), None, Some(t), Some(c)) => {
                format!("{} type {t} code {c}", protocol_name(p))
            }
            (Some(p), ..) => protocol_name(p),
        }
    }
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        PROTO_TCP => "TCP".to_string(),
        PROTO_UDP => "UDP".to_string(),
        PROTO_ICMP => "ICMP".to_string(),
        PROTO_ICMPV6 => "ICMPv6".to_string(),
        4 => "protocol 4 (IP-in-IP)".to_string(),
        47 => "protocol 47 (GRE)".to_string(),
        50 => "protocol 50 (ESP)".to_string(),
        51 => "protocol 51 (AH)".to_string(),
        132 => "protocol 132 (SCTP)".to_string(),
        n => format!("protocol {n}"),
    }
}

fn matched_rule(model: &Model, rule: &RuleRef, side: Side) -> MatchedRule {
    MatchedRule {
        group_id: rule.group_id.clone(),
        group_name: model
            .groups
            .get(&rule.group_id)
            .map(|g| g.name.clone())
            .unwrap_or_default(),
        direction: rule.direction.as_str(),
        rule_index: rule.index,
        side: match side {
            Side::Branch => "branch",
            Side::Primary => "primary",
        },
        rule: describe_rule(model, rule).unwrap_or_default(),
    }
}

/// A rule as the EC2 console shows it: `TCP 443 from 0.0.0.0/0`, `All traffic to sg-0db (db)`.
pub fn describe_rule(model: &Model, rule: &RuleRef) -> Option<String> {
    let group = model.groups.get(&rule.group_id)?;
    let r = group.rules(rule.direction).get(rule.index)?;
    let l4 = match r.l4 {
        L4Match::All => "All traffic".to_string(),
        L4Match::Ports { protocol, from, to } => match (from, to) {
            (0, u16::MAX) => format!("All {}", protocol_name(protocol)),
            _ if from == to => format!("{} {from}", protocol_name(protocol)),
            _ => format!("{} {from}-{to}", protocol_name(protocol)),
        },
        L4Match::Icmp {
            v6,
            icmp_type,
            code,
        } => {
            let name = if v6 { "ICMPv6" } else { "ICMP" };
            match (icmp_type, code) {
                (None, _) => format!("All {name}"),
                (Some(t), None) => format!("{name} type {t}{}", icmp_type_name(v6, t)),
                (Some(t), Some(c)) => {
                    format!("{name} type {t}{} code {c}", icmp_type_name(v6, t))
                }
            }
        }
        L4Match::Protocol(p) => protocol_name(p),
    };
    let peer = match &r.peer {
        Peer::Cidr(cidr) => cidr.to_string(),
        Peer::PrefixList(id) => match model.prefix_lists.get(id) {
            Some(cidrs) => format!("{id} ({} CIDRs)", cidrs.len()),
            None => format!("{id} (unknown prefix list)"),
        },
        Peer::Group(id) => match model.groups.get(id) {
            Some(g) => format!("{id} ({})", g.name),
            None => format!("{id} (security group)"),
        },
    };
    let preposition = match rule.direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let description = r
        .description
        .as_deref()
        .filter(|d| !d.is_empty())
        .map(|d| format!(" \"{d}\""))
        .unwrap_or_default();
    Some(format!("{l4} {preposition} {peer}{description}"))
}

fn icmp_type_name(v6: bool, icmp_type: u8) -> &'static str {
    match (v6, icmp_type) {
        (false, 0) | (true, 129) => " (echo reply)",
        (false, 8) | (true, 128) => " (echo request)",
        (false, 3) | (true, 1) => " (destination unreachable)",
        (false, 11) | (true, 3) => " (time exceeded)",
        (true, 2) => " (packet too big)",
        _ => "",
    }
}

fn side_text(side: Side, direction: Direction) -> String {
    let groups = match side {
        Side::Branch => "the pod's groups",
        Side::Primary => "the node's primary groups",
    };
    format!("no {} rule of {groups} allows it", direction.as_str())
}

fn reason_text(model: &Model, pod: &BranchPod, query: &Query, e: &Evaluation) -> String {
    match e.reason {
        Reason::Unfiltered(kind) => format!(
            "{} traffic is never filtered by security groups",
            kind.describe()
        ),
        Reason::SameNode => format!(
            "{} is on this node; standard mode does not check traffic within the node",
            query.peer
        ),
        Reason::Allowed if e.untracked => {
            "allowed, untracked (all traffic both ways with 0.0.0.0/0 or ::/0): no conntrack entry"
                .to_string()
        }
        Reason::Allowed => "allowed; replies follow through connection tracking".to_string(),
        Reason::NoRule { refused } => {
            let groups = |ids: &[String]| match ids.len() {
                0 => "none".to_string(),
                _ => ids.join(", "),
            };
            let branch = format!(
                "{} ({})",
                side_text(Side::Branch, query.direction),
                groups(&pod.groups)
            );
            let primary = format!(
                "{} ({})",
                side_text(Side::Primary, query.direction),
                groups(&model.node.primary_security_groups)
            );
            match refused {
                Refused::Branch => branch,
                Refused::Primary => format!("the pod's groups allow it, but {primary}"),
                Refused::Both => format!("{branch}, and {primary}"),
            }
        }
    }
}

/// Pitfalls users hit (sg-semantics.md §8), when they apply to a denied flow.
fn hints(model: &Model, pod: &BranchPod, query: &Query, e: &Evaluation) -> Vec<String> {
    let mut hints = Vec::new();
    let in_vpc = model.node.vpc_cidrs.iter().any(|c| c.contains(query.peer));
    if !in_vpc
        && model
            .node
            .service_cidrs
            .iter()
            .any(|c| c.contains(query.peer))
    {
        hints.push(format!(
            "{} is a Service ClusterIP: kube-proxy translates it to an endpoint before the \
             packet reaches the trunk, so security groups judge the endpoint (a pod or node \
             address), never the ClusterIP; explain the endpoint's address instead",
            query.peer
        ));
    }
    let Reason::NoRule { refused } = e.reason else {
        return hints;
    };
    let strict = e.mode == EnforcingMode::Strict;
    if strict && model.node.primary_ips.contains(&query.peer) {
        hints.push(
            "the peer is this node: in strict mode kubelet probes need a rule allowing the node \
             (its primary IP or its security group) on the probe ports"
                .to_string(),
        );
    }
    if strict && query.peer == IpAddr::V4(Ipv4Addr::new(169, 254, 20, 10)) {
        hints.push(
            "NodeLocal DNSCache (169.254.20.10) does not work in strict mode: use the cluster \
             DNS service, or standard mode"
                .to_string(),
        );
    }
    let dns = matches!(query.l4, L4Query::Packet(p) if p.has_ports() && p.selector == 53);
    if dns && query.direction == Direction::Egress {
        hints.push(
            "DNS needs egress TCP and UDP 53 to the CoreDNS pods (their addresses or their \
             security group; the kube-dns Service address is never what groups see) in the \
             pod's groups"
                .to_string(),
        );
    }
    if query.direction == Direction::Ingress {
        hints.extend(nlb_notes(model, pod, refused));
    }
    let unknown: Vec<&str> = pod
        .groups
        .iter()
        .filter(|g| !model.groups.contains_key(*g))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        hints.push(format!(
            "groups without rules in the state: {}",
            unknown.join(", ")
        ));
    }
    let sides: &[(Side, &[String])] = match refused {
        Refused::Branch => &[(Side::Branch, &pod.groups)],
        Refused::Primary => &[(Side::Primary, &model.node.primary_security_groups)],
        Refused::Both => &[
            (Side::Branch, &pod.groups),
            (Side::Primary, &model.node.primary_security_groups),
        ],
    };
    for (side, groups) in sides {
        let for_peer = eval::peer_rules(model, groups, query.direction, query.peer);
        if !for_peer.is_empty() {
            let rules: Vec<String> = for_peer
                .iter()
                .take(5)
                .map(|r| {
                    let rule = describe_rule(model, r).unwrap_or_default();
                    format!("{} #{}: {rule}", r.group_id, r.index)
                })
                .collect();
            let whose = match side {
                Side::Branch => "the pod's",
                Side::Primary => "the node's",
            };
            hints.push(format!(
                "{whose} rules for this peer allow only other traffic: {}{}",
                rules.join("; "),
                if for_peer.len() > 5 { "; …" } else { "" }
            ));
        }
    }
    hints
}

/// Rules of the refusing side that name a Network Load Balancer's group: with
/// client IP preservation the NLB relays the client's own address, which such a
/// rule cannot match here (the trunk sees the client, not the path it took).
fn nlb_notes(model: &Model, pod: &BranchPod, refused: Refused) -> Vec<String> {
    let branch = matches!(refused, Refused::Branch | Refused::Both).then_some(&pod.groups);
    let primary = matches!(refused, Refused::Primary | Refused::Both)
        .then_some(&model.node.primary_security_groups);
    branch
        .into_iter()
        .chain(primary)
        .flatten()
        .filter_map(|id| model.groups.get(id))
        .flat_map(|group| {
            group
                .ingress
                .iter()
                .enumerate()
                .filter_map(move |(index, rule)| match &rule.peer {
                    Peer::Group(nlb) if model.nlb_groups.contains(nlb) => Some(format!(
                        "{} #{index} allows {nlb}, a Network Load Balancer's group: with client IP \
                     preservation the NLB relays the client's own address, which no rule naming \
                     the NLB's group can match; allow the clients' addresses, or turn client IP \
                     preservation off",
                        group.id
                    )),
                    _ => None,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rule;
    use crate::policy::eval::fixtures::*;

    fn setup(mode: EnforcingMode) -> Model {
        let mut https = rule(tcp(443, 443), cidr("0.0.0.0/0"));
        https.description = Some("HTTPS".to_string());
        let web = group(
            "sg-0abc",
            vec![
                rule(tcp(8080, 8090), Peer::Group("sg-0abc".to_string())),
                rule(tcp(0, 65535), cidr("10.9.0.0/16")),
                https,
                rule(
                    L4Match::Icmp {
                        v6: false,
                        icmp_type: Some(8),
                        code: None,
                    },
                    cidr("10.0.0.0/8"),
                ),
            ],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        let node_sg: crate::model::SecurityGroup = group(
            "sg-node",
            vec![rule(tcp(443, 443), cidr("10.0.0.0/8"))],
            vec![Rule {
                l4: L4Match::All,
                peer: cidr("0.0.0.0/0"),
                description: None,
            }],
        );
        let mut m = model(
            vec![web, node_sg],
            vec![pod(5, "10.0.64.5", &["sg-0abc"], mode)],
        );
        m.groups.get_mut("sg-0abc").unwrap().name = "web".to_string();
        m
    }

    fn query(dir: Direction, peer: &str, protocol: &str, port: Option<u16>) -> Query {
        parse_query(dir, ip(peer), protocol, port, None, None).unwrap()
    }

    #[test]
    fn parses_command_line_queries() {
        let peer = ip("192.0.2.1");
        let q = |p, port, t, c| parse_query(Direction::Ingress, peer, p, port, t, c);
        assert_eq!(
            q("TCP", Some(443), None, None).unwrap().l4,
            L4Query::Packet(L4Packet::tcp(443))
        );
        assert_eq!(
            q("icmp", None, Some(8), None).unwrap().l4,
            L4Query::Packet(L4Packet::icmp(8, 0))
        );
        assert_eq!(q("all", None, None, None).unwrap().l4, L4Query::AllTraffic);
        assert_eq!(
            q("50", None, None, None).unwrap().l4,
            L4Query::Packet(L4Packet::new(50, 0, 0, 0))
        );
        assert_eq!(
            q("17", Some(53), None, None).unwrap().l4,
            L4Query::Packet(L4Packet::udp(53))
        );
        assert_eq!(
            q("sctp", None, None, None),
            Err(QueryError::Protocol("sctp".to_string()))
        );
        assert_eq!(
            q("udp", None, None, None),
            Err(QueryError::PortRequired("udp"))
        );
        assert_eq!(
            q("icmp", Some(1), Some(8), None),
            Err(QueryError::PortNotApplicable)
        );
        assert_eq!(
            q("icmp", None, None, None),
            Err(QueryError::IcmpTypeRequired("icmp"))
        );
        assert_eq!(
            q("tcp", Some(1), Some(8), None),
            Err(QueryError::IcmpNotApplicable)
        );
        assert!(matches!(
            q("icmpv6", None, Some(128), None),
            Err(QueryError::IcmpFamily { .. })
        ));
        assert_eq!(
            q("all", Some(1), None, None),
            Err(QueryError::PortNotApplicable)
        );
    }

    #[test]
    fn standard_mode_says_when_a_flow_is_source_natted_and_to_what() {
        let m = setup(EnforcingMode::Standard);
        let pod = &m.pods[0];
        let out = explain(
            &m,
            pod,
            &query(Direction::Egress, "192.0.2.7", "tcp", Some(443)),
        );
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["nat"]["to"], "10.0.1.10");
        assert_eq!(json["nat"]["interface"], "eth0");
        assert!(
            out.to_string()
                .contains("source NAT: leaves eth0 from 10.0.1.10"),
            "{out}"
        );
        for (dir, peer) in [
            (Direction::Egress, "10.0.9.9"),
            (Direction::Ingress, "192.0.2.7"),
        ] {
            let out = explain(&m, pod, &query(dir, peer, "tcp", Some(443)));
            assert_eq!(
                serde_json::to_value(&out).unwrap()["nat"],
                serde_json::Value::Null
            );
        }
        let strict = setup(EnforcingMode::Strict);
        let out = explain(
            &strict,
            &strict.pods[0],
            &query(Direction::Egress, "192.0.2.7", "tcp", Some(443)),
        );
        assert_eq!(out.nat, None, "strict mode never translates");
    }

    #[test]
    fn rules_in_console_terms() {
        let m = setup(EnforcingMode::Strict);
        let d = |dir, index| {
            describe_rule(
                &m,
                &RuleRef {
                    group_id: "sg-0abc".to_string(),
                    direction: dir,
                    index,
                },
            )
            .unwrap()
        };
        assert_eq!(d(Direction::Ingress, 0), "TCP 8080-8090 from sg-0abc (web)");
        assert_eq!(d(Direction::Ingress, 1), "All TCP from 10.9.0.0/16");
        assert_eq!(d(Direction::Ingress, 2), "TCP 443 from 0.0.0.0/0 \"HTTPS\"");
        assert_eq!(
            d(Direction::Ingress, 3),
            "ICMP type 8 (echo request) from 10.0.0.0/8"
        );
        assert_eq!(d(Direction::Egress, 0), "All traffic to 0.0.0.0/0");
    }

    #[test]
    fn allowed_flow_lists_its_rules() {
        let m = setup(EnforcingMode::Strict);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "10.9.1.1", "tcp", Some(443)),
        );
        let text = x.to_string();
        assert!(
            text.starts_with("ALLOW default/pod5 ingress TCP 443 from 10.9.1.1 (strict mode)"),
            "{text}"
        );
        assert!(
            text.contains("sg-0abc (web) ingress #1: All TCP from 10.9.0.0/16"),
            "{text}"
        );
        assert!(
            text.contains("sg-0abc (web) ingress #2: TCP 443 from 0.0.0.0/0"),
            "{text}"
        );
        let json = serde_json::to_value(&x).unwrap();
        assert_eq!(json["verdict"], "allow");
        assert_eq!(json["mode"], "strict");
        assert_eq!(json["reasonCode"], "allowed");
        assert_eq!(json["matched"].as_array().unwrap().len(), 2);
        assert_eq!(json["matched"][0]["groupId"], "sg-0abc");
        assert_eq!(json["matched"][0]["direction"], "ingress");
        assert_eq!(json["matched"][0]["ruleIndex"], 1);
        assert_eq!(json["side"], serde_json::Value::Null);
        // 443 from 0.0.0.0/0 with all traffic out to 0.0.0.0/0: untracked.
        assert_eq!(json["untracked"], true);
        assert!(json["reason"].is_string());
    }

    #[test]
    fn an_audited_pods_denied_flow_would_be_denied() {
        let mut m = setup(EnforcingMode::Strict);
        let denied = query(Direction::Ingress, "10.0.1.10", "tcp", Some(10250));
        let enforced = explain(&m, &m.pods[0], &denied);
        assert_eq!((enforced.action, enforced.would_deny), ("enforce", false));
        assert!(!enforced.to_string().contains("audit"));
        m.pods[0].action = crate::model::EnforcingAction::Audit;
        let audited = explain(&m, &m.pods[0], &denied);
        assert_eq!(
            (audited.verdict, audited.action, audited.would_deny),
            ("deny", "audit", true)
        );
        let text = audited.to_string();
        assert!(text.starts_with("DENY default/pod5"), "{text}");
        assert!(text.contains("\n  audit: would deny"), "{text}");
        let json = serde_json::to_value(&audited).unwrap();
        assert_eq!(
            (json["action"].as_str(), json["wouldDeny"].as_bool()),
            (Some("audit"), Some(true))
        );
        // An allowed flow of an audited pod is just allowed.
        let allowed = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "192.0.2.1", "tcp", Some(443)),
        );
        assert_eq!((allowed.verdict, allowed.would_deny), ("allow", false));
        assert!(!allowed.to_string().contains("would deny"));
    }

    #[test]
    fn a_quarantined_pod_says_why() {
        let mut m = setup(EnforcingMode::Strict);
        let https = query(Direction::Ingress, "192.0.2.1", "tcp", Some(443));
        assert_eq!(explain(&m, &m.pods[0], &https).verdict, "allow");
        m.quarantine(
            0,
            "SecurityGroupPolicy default/x cannot be read".into(),
            crate::model::QuarantineCause::Policies,
        );
        let held = explain(&m, &m.pods[0], &https);
        assert_eq!(held.verdict, "deny");
        assert!(held.groups.is_empty());
        let text = held.to_string();
        assert!(
            text.contains("QUARANTINED") && text.contains("default/x cannot be read"),
            "{text}"
        );
        let json = serde_json::to_value(&held).unwrap();
        assert_eq!(
            json["quarantine"].as_str(),
            Some("SecurityGroupPolicy default/x cannot be read")
        );
    }

    #[test]
    fn denied_flow_says_who_refused_and_why() {
        let m = setup(EnforcingMode::Strict);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "10.0.1.10", "tcp", Some(10250)),
        );
        assert_eq!(x.verdict, "deny");
        assert_eq!(x.side, Some("branch"));
        assert!(x.matched.is_empty());
        let text = x.to_string();
        assert!(
            text.starts_with("DENY default/pod5 ingress TCP 10250 from 10.0.1.10"),
            "{text}"
        );
        assert!(
            text.contains("no ingress rule of the pod's groups allows it (sg-0abc)"),
            "{text}"
        );
        assert!(
            text.contains("kubelet probes need a rule allowing the node"),
            "{text}"
        );
        assert!(
            text.contains("sg-0abc #3: ICMP type 8 (echo request) from 10.0.0.0/8"),
            "{text}"
        );

        let m = setup(EnforcingMode::Standard);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "192.0.2.1", "tcp", Some(443)),
        );
        assert_eq!((x.verdict, x.side), ("deny", Some("primary")));
        assert_eq!(x.other_side_matched.len(), 1);
        assert_eq!(
            serde_json::to_value(&x).unwrap()["matched"],
            serde_json::json!([])
        );
        let text = x.to_string();
        assert!(
            text.contains(
                "the pod's groups allow it, but no ingress rule of the node's primary groups"
            ),
            "{text}"
        );
        assert!(text.contains("though allowed by"), "{text}");
    }

    #[test]
    fn unfiltered_same_node_and_untracked() {
        let m = setup(EnforcingMode::Standard);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Egress, "169.254.169.254", "tcp", Some(80)),
        );
        assert_eq!((x.verdict, x.reason_code), ("allow", "unfiltered"));
        assert!(x.reason.contains("instance metadata"), "{}", x.reason);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "10.0.1.10", "tcp", Some(10250)),
        );
        assert_eq!((x.verdict, x.reason_code), ("allow", "sameNode"));
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Egress, "192.0.2.1", "all", None),
        );
        assert_eq!((x.verdict, x.protocol), ("allow", None));
        assert!(
            x.to_string().contains("egress all traffic to 192.0.2.1"),
            "{x}"
        );

        let m = setup(EnforcingMode::Strict);
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Ingress, "192.0.2.1", "tcp", Some(443)),
        );
        assert!(x.untracked);
        assert!(x.reason.contains("untracked"));
        let x = explain(
            &m,
            &m.pods[0],
            &parse_query(
                Direction::Ingress,
                ip("10.1.1.1"),
                "icmp",
                None,
                Some(8),
                Some(0),
            )
            .unwrap(),
        );
        assert_eq!((x.icmp_type, x.icmp_code, x.port), (Some(8), Some(0), None));
        assert!(
            x.to_string().contains("ICMP type 8 code 0 from 10.1.1.1"),
            "{x}"
        );
    }

    #[test]
    fn dns_hint() {
        let mut m = setup(EnforcingMode::Strict);
        m.groups.get_mut("sg-0abc").unwrap().egress.clear();
        let x = explain(
            &m,
            &m.pods[0],
            &query(Direction::Egress, "172.20.0.10", "udp", Some(53)),
        );
        assert!(
            x.hints.iter().any(|h| h.contains("TCP and UDP 53")),
            "{:?}",
            x.hints
        );
        assert!(
            !x.hints.iter().any(|h| h.contains("pods or service")),
            "no service address to open in a group: {:?}",
            x.hints
        );
    }

    #[test]
    fn a_service_cluster_ip_is_not_what_groups_see() {
        let mut m = setup(EnforcingMode::Strict);
        m.node.service_cidrs = vec!["172.20.0.0/16".parse().unwrap()];
        let cluster_ip = explain(
            &m,
            &m.pods[0],
            &query(Direction::Egress, "172.20.0.10", "tcp", Some(443)),
        );
        assert!(
            cluster_ip
                .hints
                .iter()
                .any(|h| h.contains("Service ClusterIP")),
            "{:?}",
            cluster_ip.hints
        );
        // An address of the VPC inside a (misconfigured) service range is judged as it is.
        m.node.service_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        let in_vpc = explain(
            &m,
            &m.pods[0],
            &query(Direction::Egress, "10.0.1.20", "tcp", Some(443)),
        );
        assert!(!in_vpc.hints.iter().any(|h| h.contains("ClusterIP")));
    }

    #[test]
    fn a_rule_naming_a_network_load_balancers_group_is_explained() {
        let mut m = setup(EnforcingMode::Strict);
        m.groups
            .get_mut("sg-0abc")
            .unwrap()
            .ingress
            .push(rule(tcp(9000, 9000), Peer::Group("sg-0nlb".to_string())));
        m.groups
            .insert("sg-0nlb".to_string(), group("sg-0nlb", vec![], vec![]));
        let client = query(Direction::Ingress, "198.51.100.7", "tcp", Some(9000));
        let without = explain(&m, &m.pods[0], &client);
        assert_eq!(without.verdict, "deny");
        assert!(
            !without
                .hints
                .iter()
                .any(|h| h.contains("Network Load Balancer"))
        );
        m.nlb_groups.insert("sg-0nlb".to_string());
        let with = explain(&m, &m.pods[0], &client);
        assert!(
            with.hints
                .iter()
                .any(|h| h.contains("sg-0abc #4 allows sg-0nlb, a Network Load Balancer's group")),
            "{:?}",
            with.hints
        );
    }
}
