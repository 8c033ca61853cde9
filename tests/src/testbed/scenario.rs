//! Flows to drive through the virtual node: the bundled example's, with the verdicts a person
//! expects per mode, or flows derived from any state's rules, judged by the evaluator.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use enforcer::model::{Cidr, Direction, EnforcingMode, L4Match, Model, Peer};
use enforcer::policy::eval;

use super::traffic::Probe;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    /// The node itself (kubelet, host-network pods), from its primary IP.
    Node,
    /// A branch pod of the node, by its pod name; `label` is how the demo shows it.
    Pod { name: String, label: String },
    /// A pod of the node without a branch ENI.
    LocalPod { name: String, addr: IpAddr },
    /// An address in the VPC or beyond it.
    Peer { name: String, addr: IpAddr },
}

impl Endpoint {
    fn pod(name: &str, label: &str) -> Self {
        Self::Pod {
            name: name.to_string(),
            label: label.to_string(),
        }
    }

    fn local_pod(name: &str, addr: IpAddr) -> Self {
        Self::LocalPod {
            name: name.to_string(),
            addr,
        }
    }

    fn peer(name: &str, addr: IpAddr) -> Self {
        Self::Peer {
            name: name.to_string(),
            addr,
        }
    }

    /// The address, for ends that have exactly one.
    fn addr(&self) -> Option<IpAddr> {
        match self {
            Self::LocalPod { addr, .. } | Self::Peer { addr, .. } => Some(*addr),
            Self::Node | Self::Pod { .. } => None,
        }
    }

    /// The branch pod's name, if this end is one.
    pub fn branch_pod(&self) -> Option<&str> {
        match self {
            Self::Pod { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node => f.write_str("node"),
            Self::Pod { label, .. } => f.write_str(label),
            Self::LocalPod { name, addr } | Self::Peer { name, addr } => {
                write!(f, "{name} {addr}")
            }
        }
    }
}

/// What a flow should come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Allow,
    Deny,
    /// Whatever the reference evaluator (`enforcer explain`) says.
    Evaluator,
}

/// A flow: one probe from one end to the other, and its expected verdict per mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub from: Endpoint,
    pub to: Endpoint,
    pub probe: Probe,
    /// What the flow shows, in a few words.
    pub story: String,
    pub strict: Expect,
    pub standard: Expect,
}

impl Flow {
    fn new(from: Endpoint, to: Endpoint, probe: Probe, story: &str) -> Self {
        Self {
            from,
            to,
            probe,
            story: story.to_string(),
            strict: Expect::Evaluator,
            standard: Expect::Evaluator,
        }
    }

    fn expect(mut self, strict: Expect, standard: Expect) -> Self {
        self.strict = strict;
        self.standard = standard;
        self
    }

    /// IPv6 when one end is given by an IPv6 address.
    pub fn ipv6(&self) -> bool {
        self.from
            .addr()
            .or(self.to.addr())
            .is_some_and(|a| a.is_ipv6())
    }

    pub fn expected(&self, mode: EnforcingMode) -> Expect {
        match mode {
            EnforcingMode::Strict => self.strict,
            EnforcingMode::Standard => self.standard,
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.from, self.to, self.probe)
    }
}

/// The addresses the VPC namespace must hold for `flows`.
pub fn vpc_peers(flows: &[Flow]) -> Vec<IpAddr> {
    let peers: BTreeSet<IpAddr> = flows
        .iter()
        .flat_map(|f| [&f.from, &f.to])
        .filter_map(|e| match e {
            Endpoint::Peer { addr, .. } => Some(*addr),
            _ => None,
        })
        .collect();
    peers.into_iter().collect()
}

/// The bundled example state (`tests/fixtures/state`).
pub fn example_state() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/state")
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const fn v6(s: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
    ))
}

/// Pods and peers of the bundled example (see its README).
pub mod example {
    use super::*;

    pub const WEB: &str = "web-6f7c9d8b5-x2x7q";
    pub const ORDERS: &str = "orders-5b8d7c6f4-k9m2p";
    pub const PAYMENTS: &str = "payments-7c9f8d6b5-z8w4n";
    pub const WEB_VLAN: u16 = 1;
    pub const ORDERS_VLAN: u16 = 2;

    pub const CART_CACHE: IpAddr = v4(10, 0, 1, 57);
    pub const COREDNS_HERE: IpAddr = v4(10, 0, 1, 31);
    pub const COREDNS_THERE: IpAddr = v4(10, 0, 2, 44);
    pub const OTHER_NODE: IpAddr = v4(10, 0, 2, 20);
    pub const WEB_THERE: IpAddr = v4(10, 0, 2, 101);
    pub const WEB_THERE_V6: IpAddr = v6([0x2600, 0x1f18, 0x4a3, 0x6902, 0x5c1e, 0, 0, 1]);
    pub const RDS: IpAddr = v4(10, 0, 3, 25);
    pub const ALB: IpAddr = v4(10, 0, 101, 17);
    pub const IMDS: IpAddr = v4(169, 254, 169, 254);
    pub const AMAZON_DNS_V6: IpAddr = v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x253]);
    pub const PARTNER_API: IpAddr = v4(203, 0, 113, 10);
    pub const PARTNER_GATEWAY: IpAddr = v4(198, 51, 100, 10);
    pub const PARTNER_V6: IpAddr = v6([0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10]);
    pub const INTERNET: IpAddr = v4(198, 51, 100, 77);
    pub const INTERNET_V6: IpAddr = v6([0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0x10]);

    pub fn web() -> Endpoint {
        Endpoint::pod(WEB, "web")
    }

    pub fn orders() -> Endpoint {
        Endpoint::pod(ORDERS, "orders")
    }

    pub fn payments() -> Endpoint {
        Endpoint::pod(PAYMENTS, "payments")
    }

    pub fn cart_cache() -> Endpoint {
        Endpoint::local_pod("cart-cache", CART_CACHE)
    }

    pub fn coredns_here() -> Endpoint {
        Endpoint::local_pod("coredns", COREDNS_HERE)
    }

    pub fn rds() -> Endpoint {
        Endpoint::peer("rds", RDS)
    }

    pub fn alb() -> Endpoint {
        Endpoint::peer("alb", ALB)
    }

    pub fn internet() -> Endpoint {
        Endpoint::peer("internet", INTERNET)
    }

    pub fn partner_api() -> Endpoint {
        Endpoint::peer("partner-api", PARTNER_API)
    }
}

/// The bundled example's flows, with the verdicts sg-semantics.md gives them.
pub fn example_flows() -> Vec<Flow> {
    use Expect::{Allow, Deny};
    use Probe::{Ping, Tcp, Udp};
    use example::*;
    let peer = Endpoint::peer;
    let internet_v6 = || peer("internet", INTERNET_V6);
    vec![
        Flow::new(alb(), web(), Tcp(80), "HTTP from the load balancer's group")
            .expect(Allow, Allow),
        Flow::new(
            internet(),
            web(),
            Tcp(80),
            "HTTP only from the load balancer",
        )
        .expect(Deny, Deny),
        Flow::new(
            internet(),
            web(),
            Tcp(443),
            "public HTTPS; standard: node groups refuse",
        )
        .expect(Allow, Deny),
        Flow::new(internet_v6(), web(), Tcp(443), "public HTTPS over IPv6").expect(Allow, Deny),
        Flow::new(
            Endpoint::Node,
            web(),
            Tcp(8080),
            "kubelet probe, allowed by a rule",
        )
        .expect(Allow, Allow),
        Flow::new(
            Endpoint::Node,
            web(),
            Tcp(9090),
            "kubelet probe without a rule",
        )
        .expect(Deny, Allow),
        Flow::new(
            peer("web@node2", WEB_THERE),
            orders(),
            Tcp(8080),
            "web group member",
        )
        .expect(Allow, Allow),
        Flow::new(alb(), orders(), Tcp(8080), "not a web group member").expect(Deny, Deny),
        Flow::new(
            peer("node2", OTHER_NODE),
            web(),
            Ping,
            "ICMP echo from the VPC",
        )
        .expect(Allow, Allow),
        Flow::new(internet(), web(), Ping, "ICMP echo from outside").expect(Deny, Deny),
        Flow::new(
            peer("web@node2", WEB_THERE_V6),
            web(),
            Ping,
            "ICMPv6 echo from the VPC",
        )
        .expect(Allow, Allow),
        Flow::new(
            peer("partner-vpn", PARTNER_GATEWAY),
            payments(),
            Ping,
            "ICMP from the IPsec peer",
        )
        .expect(Allow, Deny),
        Flow::new(
            web(),
            rds(),
            Tcp(5432),
            "database group; replies by conntrack",
        )
        .expect(Allow, Allow),
        Flow::new(web(), rds(), Tcp(22), "no rule for ssh").expect(Deny, Deny),
        Flow::new(orders(), rds(), Tcp(5432), "database group").expect(Allow, Allow),
        Flow::new(rds(), web(), Tcp(5432), "a new flow the other way").expect(Deny, Deny),
        Flow::new(
            web(),
            peer("coredns@node2", COREDNS_THERE),
            Udp(53),
            "DNS in the VPC",
        )
        .expect(Allow, Allow),
        Flow::new(
            orders(),
            coredns_here(),
            Udp(53),
            "DNS to a pod on this node",
        )
        .expect(Allow, Allow),
        Flow::new(
            web(),
            peer("amazon-dns", AMAZON_DNS_V6),
            Udp(53),
            "never filtered",
        )
        .expect(Allow, Allow),
        Flow::new(orders(), peer("imds", IMDS), Tcp(80), "never filtered").expect(Allow, Allow),
        Flow::new(
            web(),
            partner_api(),
            Tcp(443),
            "prefix list; standard: from the node's address",
        )
        .expect(Allow, Allow),
        Flow::new(web(), internet(), Tcp(443), "no rule for the internet").expect(Deny, Deny),
        Flow::new(
            payments(),
            peer("partner", PARTNER_V6),
            Ping,
            "ICMPv6 to the partner (IPv6: no source NAT)",
        )
        .expect(Allow, Allow),
        Flow::new(web(), orders(), Tcp(8080), "pod to pod: both pods' groups").expect(Allow, Allow),
        Flow::new(orders(), web(), Tcp(443), "pod to pod: no egress rule").expect(Deny, Allow),
        Flow::new(
            web(),
            payments(),
            Tcp(8080),
            "pod to pod: both pods' groups",
        )
        .expect(Allow, Allow),
        Flow::new(
            web(),
            cart_cache(),
            Tcp(6379),
            "to a regular pod: no egress rule",
        )
        .expect(Deny, Allow),
        Flow::new(
            cart_cache(),
            web(),
            Tcp(8080),
            "a regular pod is in the node group",
        )
        .expect(Allow, Allow),
    ]
}

/// Where the derived flows' outside peers live: documentation ranges, outside any VPC.
const OUTSIDE_V4: IpAddr = v4(198, 51, 100, 200);
const OUTSIDE_V6: IpAddr = v6([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x200]);

/// Flows exercising every probe-able rule of every branch pod of `model` (TCP and UDP
/// ports, ICMP echo), plus a port no rule should open; verdicts from the evaluator.
pub fn derived_flows(model: &Model) -> Vec<Flow> {
    let mut flows: Vec<Flow> = Vec::new();
    for pod in &model.pods {
        let me = Endpoint::pod(&pod.name, &pod.name);
        for group_id in &pod.groups {
            let Some(group) = model.groups.get(group_id) else {
                continue;
            };
            for direction in [Direction::Ingress, Direction::Egress] {
                for (index, rule) in group.rules(direction).iter().enumerate() {
                    let Some(probe) = probe_for(&rule.l4) else {
                        continue;
                    };
                    for v6 in [false, true] {
                        if !pod.addresses().any(|a| a.is_ipv6() == v6) {
                            continue;
                        }
                        let Some(addr) = representative(model, &rule.peer, v6) else {
                            continue;
                        };
                        let other = endpoint_at(model, addr);
                        if other == me {
                            continue;
                        }
                        let story = format!("{group_id} {} #{index}", direction.as_str());
                        let flow = match direction {
                            Direction::Ingress => Flow::new(other, me.clone(), probe, &story),
                            Direction::Egress => Flow::new(me.clone(), other, probe, &story),
                        };
                        push_new(&mut flows, flow);
                    }
                }
            }
        }
        let outside = Endpoint::peer(
            "outside",
            if pod.ipv4.is_some() {
                OUTSIDE_V4
            } else {
                OUTSIDE_V6
            },
        );
        push_new(
            &mut flows,
            Flow::new(outside.clone(), me.clone(), Probe::Tcp(9), "no rule"),
        );
        push_new(&mut flows, Flow::new(me, outside, Probe::Tcp(9), "no rule"));
    }
    flows
}

fn push_new(flows: &mut Vec<Flow>, flow: Flow) {
    let seen = flows
        .iter()
        .any(|f| f.from == flow.from && f.to == flow.to && f.probe == flow.probe);
    if !seen {
        flows.push(flow);
    }
}

fn probe_for(l4: &L4Match) -> Option<Probe> {
    match *l4 {
        L4Match::All => Some(Probe::Tcp(443)),
        L4Match::Ports { protocol, from, to } => {
            let port = if from == 0 { to.min(443) } else { from };
            match protocol {
                eval::PROTO_TCP => Some(Probe::Tcp(port)),
                eval::PROTO_UDP => Some(Probe::Udp(port)),
                _ => None,
            }
        }
        L4Match::Icmp { icmp_type, .. } => {
            matches!(icmp_type, None | Some(8) | Some(128)).then_some(Probe::Ping)
        }
        L4Match::Protocol(_) => None,
    }
}

/// An address a rule's peer matches, of the wanted family.
fn representative(model: &Model, peer: &Peer, v6: bool) -> Option<IpAddr> {
    let in_cidr = |c: &Cidr| {
        if c.is_ipv4() == v6 {
            return None;
        }
        if c.is_everything() {
            return Some(if v6 { OUTSIDE_V6 } else { OUTSIDE_V4 });
        }
        let host_bits = if v6 { 128 } else { 32 } - u32::from(c.prefix_len());
        Some(c.nth(match host_bits {
            0 => 0,
            1..=3 => 1,
            _ => 10,
        }))
    };
    match peer {
        Peer::Cidr(c) => in_cidr(c),
        Peer::PrefixList(id) => model.prefix_lists.get(id)?.iter().find_map(in_cidr),
        Peer::Group(id) => model
            .members
            .get(id)?
            .iter()
            .find(|a| a.is_ipv4() != v6)
            .map(|a| a.addr()),
    }
}

/// Which end of the virtual node holds `addr`.
fn endpoint_at(model: &Model, addr: IpAddr) -> Endpoint {
    if model.node.primary_ips.contains(&addr) {
        return Endpoint::Node;
    }
    if let Some(pod) = model.pods.iter().find(|p| p.addresses().any(|a| a == addr)) {
        return Endpoint::pod(&pod.name, &pod.name);
    }
    if model.node_local.contains(&addr) {
        return Endpoint::local_pod("pod", addr);
    }
    let name = if model.node.vpc_cidrs.iter().any(|c| c.contains(addr)) {
        "vpc"
    } else {
        "outside"
    };
    Endpoint::peer(name, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_model() -> Model {
        enforcer::source::load(&example_state()).expect("the bundled state loads")
    }

    #[test]
    fn example_flows_name_pods_and_peers_of_the_example() {
        let model = example_model();
        for flow in example_flows() {
            for end in [&flow.from, &flow.to] {
                match end {
                    Endpoint::Pod { name, .. } => {
                        assert!(model.pods.iter().any(|p| &p.name == name), "{flow}")
                    }
                    Endpoint::LocalPod { addr, .. } => {
                        assert!(model.node_local.contains(addr), "{flow}")
                    }
                    Endpoint::Node | Endpoint::Peer { .. } => {}
                }
            }
        }
    }

    #[test]
    fn derived_flows_cover_every_pod_and_judge_off_vpc_egress() {
        let model = example_model();
        let flows = derived_flows(&model);
        for pod in &model.pods {
            assert!(
                flows.iter().any(|f| f.to.branch_pod() == Some(&pod.name)),
                "{}",
                pod.name
            );
        }
        let to_partner = flows
            .iter()
            .find(|f| matches!(f.to, Endpoint::Peer { addr, .. } if addr == v4(192, 0, 2, 10)))
            .expect("web's rule to the partner prefix list");
        assert_eq!(to_partner.probe, Probe::Tcp(443));
        assert_eq!(to_partner.strict, Expect::Evaluator);
        assert_eq!(to_partner.standard, Expect::Evaluator);
        let probe = flows
            .iter()
            .find(|f| f.from == Endpoint::Node && f.probe == Probe::Tcp(8080))
            .expect("the kubelet rule, through the node group's member");
        assert_eq!(probe.standard, Expect::Evaluator);
    }
}
