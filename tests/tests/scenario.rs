//! The bundled example state (`tests/fixtures/state`, see its README) through
//! the real programs, in strict mode as the NodeConfig says and in standard
//! mode (node and every pod switched): each case is a hand-written
//! expectation, checked against the kernel's verdict and reason, against the
//! conntrack entry a new flow leaves (and the rule it records), and against
//! the reference evaluator `enforcer::policy::eval::evaluate`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use enforcer::model::{BranchPod, Direction, EnforcingMode, Model, UnknownVlanAction};
use enforcer::policy::eval::{self, Evaluation, L4Query, Query, Refused, RuleRef};
use enforcer_common::{CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, Reason, ct_state};
use enforcer_tests::frame::{self, Ip, L4, Tag, other, udp};
use enforcer_tests::kernel::Kernel;
use enforcer_tests::oracle::{ct_key, l4_packet};

use Direction::{Egress, Ingress};

const WEB_VLAN: u16 = 1;
const ORDERS_VLAN: u16 = 2;
const PAYMENTS_VLAN: u16 = 4;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);
const WEB_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f18, 0x4a3, 0x6901, 0x8a2f, 0, 0, 1);
const ORDERS: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 102);
const PAYMENTS: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 104);
const PAYMENTS_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f18, 0x4a3, 0x6901, 0x8a2f, 0, 0, 4);

/// This node's primary IP (kubelet), the other node's.
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 20);
const RDS: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 25);
const ALB: Ipv4Addr = Ipv4Addr::new(10, 0, 101, 17);
const COREDNS_HERE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 31);
const COREDNS_THERE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 44);
const VPC_RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const PARTNER_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

const SG_WEB: &str = "sg-0web00000000000001";
const SG_DB_CLIENT: &str = "sg-0dbc00000000000001";
const SG_NODE: &str = "sg-0node0000000000001";
const SG_IPSEC: &str = "sg-0vpn00000000000001";

const ESP: u8 = 50;
const STRICT: EnforcingMode = EnforcingMode::Strict;
const STANDARD: EnforcingMode = EnforcingMode::Standard;

fn rule(group: &str, direction: Direction, index: usize) -> RuleRef {
    RuleRef {
        group_id: group.to_string(),
        direction,
        index,
    }
}

fn web_in(index: usize) -> RuleRef {
    rule(SG_WEB, Direction::Ingress, index)
}

fn web_out(index: usize) -> RuleRef {
    rule(SG_WEB, Direction::Egress, index)
}

/// `sg-0node…` ingress: 0 all from 10.0.0.0/16, 1 all from the VPC's IPv6 /56, 2 all from itself.
fn node_in(index: usize) -> RuleRef {
    rule(SG_NODE, Direction::Ingress, index)
}

/// `sg-0node…` egress: 0 all to 0.0.0.0/0, 1 all to ::/0.
fn node_out(index: usize) -> RuleRef {
    rule(SG_NODE, Direction::Egress, index)
}

/// A TCP SYN: the first packet of a connection.
fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Ip {
    frame::tcp(src, sport, dst, dport, frame::TCP_SYN)
}

fn echo_request(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, id: u16) -> Ip {
    let (src, dst) = (src.into(), dst.into());
    Ip {
        src,
        dst,
        l4: L4::Icmp {
            icmp_type: if src.is_ipv4() { 8 } else { 128 },
            code: 0,
            id,
        },
    }
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// What a case expects of the kernel.
#[derive(Clone, Debug)]
enum Expect {
    /// `PassNew`, and a conntrack entry recording these branch and primary (standard) rules.
    New {
        branch: RuleRef,
        primary: Option<RuleRef>,
    },
    /// `PassEstablished`: a reply of a flow an earlier case opened.
    Established,
    /// Any other reason; no conntrack entry is created.
    Verdict(Reason),
}

fn new(branch: RuleRef) -> Expect {
    Expect::New {
        branch,
        primary: None,
    }
}

fn new_both(branch: RuleRef, primary: RuleRef) -> Expect {
    Expect::New {
        branch,
        primary: Some(primary),
    }
}

fn verdict(reason: Reason) -> Expect {
    Expect::Verdict(reason)
}

/// The bundled example, as the state loader resolves it.
fn fixture() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state");
    enforcer::source::load(&dir).unwrap_or_else(|e| panic!("the bundled state loads: {e}"))
}

/// The fixture with the node and every pod in `mode`.
fn fixture_in(mode: EnforcingMode) -> Model {
    let mut model = fixture();
    model.node.enforcing_mode = mode;
    for pod in &mut model.pods {
        pod.mode = mode;
    }
    model
}

/// A model loaded into the programs, cases run one after the other (a case
/// may rely on the flows earlier ones opened).
struct Scenario {
    model: Model,
    kernel: Kernel,
}

impl Scenario {
    fn new(model: Model) -> Self {
        let kernel = Kernel::load(&model);
        Self { model, kernel }
    }

    fn of(mode: EnforcingMode) -> Self {
        Self::new(fixture_in(mode))
    }

    fn mode(&self) -> EnforcingMode {
        self.model.node.enforcing_mode
    }

    fn pod(&self, vlan: u16) -> Option<&BranchPod> {
        self.model.pods.iter().find(|p| p.vlan == vlan)
    }

    /// Runs `ip` tagged `vlan` in `direction` and checks every expectation.
    fn case(&self, name: &str, vlan: u16, direction: Direction, ip: Ip, expect: Expect) {
        let ctx = format!(
            "{:?} mode, {name}: {direction:?} {ip:?} on VLAN {vlan}",
            self.mode()
        );
        let key = ct_key(vlan, direction, &ip);
        let before = self.flow(&key);
        let frame = frame::ip_frame(Tag::Vlan(vlan), &ip);
        let outcome = self.kernel.run(direction, &frame);
        let reason = match &expect {
            Expect::New { .. } => Reason::PassNew,
            Expect::Established => Reason::PassEstablished,
            Expect::Verdict(reason) => *reason,
        };
        assert_eq!(outcome.reason, reason, "{ctx}: kernel reason");
        assert_eq!(outcome.passed, !reason.is_drop(), "{ctx}: kernel verdict");
        self.check_oracle(&ctx, vlan, direction, &ip, &expect);
        let after = self.flow(&key);
        match &expect {
            Expect::New { branch, primary } => {
                assert!(before.is_none(), "{ctx}: the flow existed before the case");
                let entry = after.unwrap_or_else(|| panic!("{ctx}: no conntrack entry"));
                let compiled = &self.kernel.compiled;
                assert_eq!(
                    compiled.rule(entry.rule),
                    Some(branch),
                    "{ctx}: branch rule of the entry (ID {})",
                    entry.rule
                );
                match primary {
                    Some(primary) => assert_eq!(
                        compiled.rule(entry.primary_rule),
                        Some(primary),
                        "{ctx}: primary rule of the entry (ID {})",
                        entry.primary_rule
                    ),
                    None => assert_eq!(entry.primary_rule, 0, "{ctx}: no primary rule"),
                }
                let index = direction_index(direction);
                let opening = match ip.l4 {
                    L4::Tcp { .. } => ct_state::OPENING,
                    _ => ct_state::ONE_WAY,
                };
                assert_eq!(entry.state, opening, "{ctx}: state of a new flow");
                assert_eq!(usize::from(entry.origin), index, "{ctx}: origin");
                assert_eq!(entry.packets[index], 1, "{ctx}: packets");
                assert_eq!(entry.packets[1 - index], 0, "{ctx}: packets");
                assert_eq!(entry.bytes[index], frame.len() as u64, "{ctx}: bytes");
            }
            Expect::Established => {
                let before = before.unwrap_or_else(|| panic!("{ctx}: no flow to reply to"));
                let after = after.unwrap_or_else(|| panic!("{ctx}: the entry vanished"));
                let index = direction_index(direction);
                assert_eq!(after.packets[index], before.packets[index] + 1, "{ctx}");
            }
            Expect::Verdict(_) => {
                assert_eq!(after, before, "{ctx}: conntrack entry changed");
                assert!(after.is_none(), "{ctx}: a conntrack entry exists");
            }
        }
    }

    /// Asks the reference evaluator about the same packet as a new flow; frame-level
    /// verdicts (unknown VLAN, spoofing) are checked to be frame-level indeed.
    fn check_oracle(&self, ctx: &str, vlan: u16, direction: Direction, ip: &Ip, expect: &Expect) {
        let (pod_addr, peer) = match direction {
            Direction::Ingress => (ip.dst, ip.src),
            Direction::Egress => (ip.src, ip.dst),
        };
        let Some(pod) = self.pod(vlan) else {
            assert!(
                matches!(
                    expect,
                    Expect::Verdict(Reason::DropUnknownVlan | Reason::PassUnknownVlan)
                ),
                "{ctx}: VLAN {vlan} has no pod"
            );
            return;
        };
        if !pod.addresses().any(|a| a == pod_addr) {
            assert!(
                matches!(expect, Expect::Verdict(Reason::DropSpoofed)),
                "{ctx}: {pod_addr} is not {}'s",
                pod.key()
            );
            return;
        }
        if matches!(expect, Expect::Established) {
            return;
        }
        let query = Query {
            direction,
            peer,
            l4: L4Query::Packet(l4_packet(ip)),
        };
        let evaluation = eval::evaluate(&self.model, pod, &query);
        assert_eq!(
            oracle_reason(&evaluation),
            match expect {
                Expect::New { .. } => Reason::PassNew,
                Expect::Verdict(reason) => *reason,
                Expect::Established => unreachable!(),
            },
            "{ctx}: the oracle disagrees with the case: {evaluation:?}"
        );
        if let Expect::New { branch, primary } = expect {
            assert!(!evaluation.untracked, "{ctx}: the oracle says untracked");
            assert_eq!(
                evaluation.branch.first(),
                Some(branch),
                "{ctx}: oracle's lowest branch rule"
            );
            assert_eq!(
                evaluation.primary.first(),
                primary.as_ref(),
                "{ctx}: oracle's lowest primary rule"
            );
        }
    }

    fn flow(&self, key: &CtKey) -> Option<CtEntry> {
        self.kernel
            .maps
            .flows()
            .expect("read conntrack")
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e)
    }
}

/// The kernel reason the oracle's verdict on a new flow stands for.
fn oracle_reason(e: &Evaluation) -> Reason {
    let reason = match e.reason {
        eval::Reason::Unfiltered(_) => Reason::PassUnfiltered,
        eval::Reason::SameNode => Reason::PassSameNode,
        eval::Reason::Allowed => Reason::PassNew,
        eval::Reason::NoRule {
            refused: Refused::Branch | Refused::Both,
        } => Reason::DropPolicy,
        eval::Reason::NoRule {
            refused: Refused::Primary,
        } => Reason::DropPrimaryPolicy,
    };
    assert_eq!(
        e.allowed,
        !reason.is_drop(),
        "oracle verdict and reason: {e:?}"
    );
    reason
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

#[test]
fn rds_is_reached_through_the_referenced_group_only() {
    for mode in [STRICT, STANDARD] {
        // A pod whose only group (the IPsec one) does not reference the RDS group.
        let mut model = fixture_in(mode);
        let gateway = Ipv4Addr::new(10, 0, 1, 103);
        model.pods.push(BranchPod {
            namespace: "shop".into(),
            name: "ipsec-gateway-0".into(),
            uid: "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b".into(),
            vlan: 3,
            eni_id: "eni-0b7c1d2e3f4a50003".into(),
            mac: "0a:1b:2c:3d:4e:03".into(),
            ipv4: Some(gateway),
            ipv6: None,
            subnet_v4: Some("10.0.1.0/24".parse().unwrap()),
            subnet_v6: None,
            groups: vec![SG_IPSEC.into()],
            mode,
            action: Default::default(),
            facts: Default::default(),
        });
        model.pods.sort_by_key(|p| p.vlan);
        model.node_local.insert(gateway.into());
        let primary = |r| (mode == STANDARD).then_some(r);
        let s = Scenario::new(model);
        s.case(
            "web to RDS: sg-0web egress 5432 to sg-0rds",
            WEB_VLAN,
            Egress,
            tcp(WEB, 41000, RDS, 5432),
            Expect::New {
                branch: web_out(3),
                primary: primary(node_out(0)),
            },
        );
        s.case(
            "orders to RDS: sg-0dbc egress 5432 to sg-0rds",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 41001, RDS, 5432),
            Expect::New {
                branch: rule(SG_DB_CLIENT, Egress, 2),
                primary: primary(node_out(0)),
            },
        );
        s.case(
            "payments to RDS through sg-0dbc, its lowest group",
            PAYMENTS_VLAN,
            Egress,
            tcp(PAYMENTS, 41002, RDS, 5432),
            Expect::New {
                branch: rule(SG_DB_CLIENT, Egress, 2),
                primary: primary(node_out(0)),
            },
        );
        s.case(
            "a pod without a group referencing sg-0rds",
            3,
            Egress,
            tcp(gateway, 41003, RDS, 5432),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "an address of the VPC that is not an sg-0rds member",
            WEB_VLAN,
            Egress,
            tcp(WEB, 41004, Ipv4Addr::new(10, 0, 3, 26), 5432),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "RDS on another port",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 41005, RDS, 5433),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "the database's reply",
            WEB_VLAN,
            Ingress,
            Ip {
                l4: L4::Tcp {
                    src: 5432,
                    dst: 41000,
                    flags: frame::TCP_SYN | frame::TCP_ACK,
                },
                ..tcp(RDS, 0, WEB, 0)
            },
            Expect::Established,
        );
        s.case(
            "RDS opening a connection to the pod",
            WEB_VLAN,
            Ingress,
            tcp(RDS, 41006, WEB, 5432),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn kubelet_probes_need_the_rule_in_strict_mode_only() {
    let s = Scenario::of(STRICT);
    s.case(
        "kubelet to web 8080: sg-0web ingress 8080 from sg-0node",
        WEB_VLAN,
        Ingress,
        tcp(NODE, 50000, WEB, 8080),
        new(web_in(3)),
    );
    s.case(
        "kubelet to orders 8080: sg-0dbc ingress 8080 from sg-0node",
        ORDERS_VLAN,
        Ingress,
        tcp(NODE, 50001, ORDERS, 8080),
        new(rule(SG_DB_CLIENT, Ingress, 0)),
    );
    s.case(
        "kubelet probing a port no rule opens",
        WEB_VLAN,
        Ingress,
        tcp(NODE, 50002, WEB, 9090),
        verdict(Reason::DropPolicy),
    );
    s.case(
        "the other node's kubelet-range address (an sg-0node member)",
        WEB_VLAN,
        Ingress,
        tcp(OTHER_NODE, 50003, WEB, 8080),
        new(web_in(3)),
    );

    let s = Scenario::of(STANDARD);
    for (vlan, pod, port) in [
        (WEB_VLAN, WEB, 8080),
        (ORDERS_VLAN, ORDERS, 8080),
        (WEB_VLAN, WEB, 9090),
    ] {
        s.case(
            "kubelet on this node: not checked",
            vlan,
            Ingress,
            tcp(NODE, 50000 + port, pod, port),
            verdict(Reason::PassSameNode),
        );
    }
    s.case(
        "the other node: both sets checked",
        WEB_VLAN,
        Ingress,
        tcp(OTHER_NODE, 50003, WEB, 8080),
        new_both(web_in(3), node_in(0)),
    );
    s.case(
        "the other node on a port only the node groups open",
        WEB_VLAN,
        Ingress,
        tcp(OTHER_NODE, 50004, WEB, 9090),
        verdict(Reason::DropPolicy),
    );
}

#[test]
fn dns_to_the_vpc_resolver_is_unfiltered_and_to_coredns_needs_rules() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        let standard = mode == STANDARD;
        s.case(
            "VPC resolver, base + 2",
            WEB_VLAN,
            Egress,
            udp(WEB, 40001, VPC_RESOLVER, 53),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "VPC resolver from a pod whose groups have no DNS rule to it",
            PAYMENTS_VLAN,
            Egress,
            tcp(PAYMENTS, 40002, VPC_RESOLVER, 53),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "link-local resolver",
            ORDERS_VLAN,
            Egress,
            udp(ORDERS, 40003, Ipv4Addr::new(169, 254, 169, 253), 53),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "IPv6 resolver",
            WEB_VLAN,
            Egress,
            udp(WEB_V6, 40004, v6("fd00:ec2::253"), 53),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "CoreDNS on this node",
            WEB_VLAN,
            Egress,
            udp(WEB, 40005, COREDNS_HERE, 53),
            if standard {
                verdict(Reason::PassSameNode)
            } else {
                new(web_out(1))
            },
        );
        s.case(
            "CoreDNS on the other node over TCP",
            WEB_VLAN,
            Egress,
            tcp(WEB, 40006, COREDNS_THERE, 53),
            if standard {
                new_both(web_out(0), node_out(0))
            } else {
                new(web_out(0))
            },
        );
        s.case(
            "CoreDNS on the other node from payments (sg-0dbc + sg-0vpn)",
            PAYMENTS_VLAN,
            Egress,
            udp(PAYMENTS, 40007, COREDNS_THERE, 53),
            if standard {
                new_both(rule(SG_DB_CLIENT, Egress, 1), node_out(0))
            } else {
                new(rule(SG_DB_CLIENT, Egress, 1))
            },
        );
        s.case(
            "CoreDNS's answer",
            PAYMENTS_VLAN,
            Ingress,
            udp(COREDNS_THERE, 53, PAYMENTS, 40007),
            Expect::Established,
        );
        s.case(
            "CoreDNS on this node, not a DNS port",
            WEB_VLAN,
            Egress,
            udp(WEB, 40008, COREDNS_HERE, 5353),
            verdict(if standard {
                Reason::PassSameNode
            } else {
                Reason::DropPolicy
            }),
        );
        s.case(
            "CoreDNS on the other node, not a DNS port",
            WEB_VLAN,
            Egress,
            udp(WEB, 40009, COREDNS_THERE, 5353),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn prefix_list_destinations_are_allowed_on_443_only() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        let allowed = |branch| match mode {
            STANDARD => new_both(branch, node_out(0)),
            _ => new(branch),
        };
        s.case(
            "shipping partner API",
            WEB_VLAN,
            Egress,
            tcp(WEB, 42000, Ipv4Addr::new(192, 0, 2, 10), 443),
            allowed(web_out(4)),
        );
        s.case(
            "payments partner API",
            WEB_VLAN,
            Egress,
            tcp(WEB, 42001, Ipv4Addr::new(203, 0, 113, 200), 443),
            allowed(web_out(4)),
        );
        s.case(
            "outside the prefix list",
            WEB_VLAN,
            Egress,
            tcp(WEB, 42002, Ipv4Addr::new(198, 18, 0, 1), 443),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "in the prefix list, another port",
            WEB_VLAN,
            Egress,
            tcp(WEB, 42003, Ipv4Addr::new(192, 0, 2, 10), 80),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "a pod whose groups do not use the prefix list",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 42004, Ipv4Addr::new(192, 0, 2, 10), 443),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn esp_with_the_partner_gateway() {
    for mode in [STRICT, STANDARD] {
        let standard = mode == STANDARD;
        // The gateway opens the tunnel: the node's groups only admit the VPC.
        let s = Scenario::of(mode);
        s.case(
            "ESP from the partner gateway",
            PAYMENTS_VLAN,
            Ingress,
            other(PARTNER_GATEWAY, PAYMENTS, ESP),
            if standard {
                verdict(Reason::DropPrimaryPolicy)
            } else {
                new(rule(SG_IPSEC, Ingress, 0))
            },
        );
        s.case(
            "IPsec NAT traversal from the partner gateway",
            PAYMENTS_VLAN,
            Ingress,
            udp(PARTNER_GATEWAY, 4500, PAYMENTS, 4500),
            if standard {
                verdict(Reason::DropPrimaryPolicy)
            } else {
                new(rule(SG_IPSEC, Ingress, 2))
            },
        );
        s.case(
            "ESP from another address",
            PAYMENTS_VLAN,
            Ingress,
            other(Ipv4Addr::new(198, 51, 100, 11), PAYMENTS, ESP),
            verdict(Reason::DropPolicy),
        );

        // The pod opens the tunnel: its reply admits the gateway's ESP.
        let s = Scenario::of(mode);
        s.case(
            "ESP from web, which has no IPsec group",
            WEB_VLAN,
            Egress,
            other(WEB, PARTNER_GATEWAY, ESP),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "ESP to the partner gateway",
            PAYMENTS_VLAN,
            Egress,
            other(PAYMENTS, PARTNER_GATEWAY, ESP),
            if standard {
                new_both(rule(SG_IPSEC, Egress, 0), node_out(0))
            } else {
                new(rule(SG_IPSEC, Egress, 0))
            },
        );
        s.case(
            "the gateway's ESP, now a tracked flow",
            PAYMENTS_VLAN,
            Ingress,
            other(PARTNER_GATEWAY, PAYMENTS, ESP),
            Expect::Established,
        );
    }
}

#[test]
fn ipv6_flows() {
    let vpc_peer = v6("2600:1f18:4a3:6902::99");
    let internet_v6 = v6("2001:db8::1");
    let partner_v6 = v6("2001:db8:77::1");
    for mode in [STRICT, STANDARD] {
        let standard = mode == STANDARD;
        let s = Scenario::of(mode);
        s.case(
            "HTTPS from the IPv6 internet",
            WEB_VLAN,
            Ingress,
            tcp(internet_v6, 50000, WEB_V6, 443),
            if standard {
                verdict(Reason::DropPrimaryPolicy)
            } else {
                new(web_in(2))
            },
        );
        s.case(
            "HTTPS from the VPC's IPv6 range",
            WEB_VLAN,
            Ingress,
            tcp(vpc_peer, 50001, WEB_V6, 443),
            if standard {
                new_both(web_in(2), node_in(1))
            } else {
                new(web_in(2))
            },
        );
        s.case(
            "echo request from the VPC",
            WEB_VLAN,
            Ingress,
            echo_request(vpc_peer, WEB_V6, 7),
            if standard {
                new_both(web_in(5), node_in(1))
            } else {
                new(web_in(5))
            },
        );
        s.case(
            "echo request from the internet",
            WEB_VLAN,
            Ingress,
            echo_request(internet_v6, WEB_V6, 8),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "DNS to an IPv6 address of the VPC",
            WEB_VLAN,
            Egress,
            udp(WEB_V6, 40000, v6("2600:1f18:4a3:6902::53"), 53),
            if standard {
                new_both(web_out(2), node_out(1))
            } else {
                new(web_out(2))
            },
        );
        s.case(
            "echo request to the partner's IPv6 network",
            PAYMENTS_VLAN,
            Egress,
            echo_request(PAYMENTS_V6, partner_v6, 9),
            if standard {
                new_both(rule(SG_IPSEC, Egress, 3), node_out(1))
            } else {
                new(rule(SG_IPSEC, Egress, 3))
            },
        );
        s.case(
            "TCP to the partner's IPv6 network",
            PAYMENTS_VLAN,
            Egress,
            tcp(PAYMENTS_V6, 40001, partner_v6, 443),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "DNS to the web pod's IPv6 address (same node)",
            PAYMENTS_VLAN,
            Egress,
            udp(PAYMENTS_V6, 40002, WEB_V6, 53),
            verdict(if standard {
                Reason::PassSameNode
            } else {
                // sg-0dbc allows DNS to 10.0.0.0/16 only, an IPv4 peer.
                Reason::DropPolicy
            }),
        );
    }
}

#[test]
fn denied_flows_and_pod_to_pod_on_the_node() {
    for mode in [STRICT, STANDARD] {
        let standard = mode == STANDARD;
        let s = Scenario::of(mode);
        s.case(
            "SSH to orders from the other node",
            ORDERS_VLAN,
            Ingress,
            tcp(OTHER_NODE, 50000, ORDERS, 22),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "HTTP from the ALB: sg-0web ingress 80 from sg-0alb",
            WEB_VLAN,
            Ingress,
            tcp(ALB, 50001, WEB, 80),
            if standard {
                new_both(web_in(0), node_in(0))
            } else {
                new(web_in(0))
            },
        );
        s.case(
            "HTTP from the internet, not through the ALB",
            WEB_VLAN,
            Ingress,
            tcp(INTERNET, 50002, WEB, 80),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "web to orders 8080 (sg-0web egress to sg-0dbc)",
            WEB_VLAN,
            Egress,
            tcp(WEB, 50003, ORDERS, 8080),
            if standard {
                verdict(Reason::PassSameNode)
            } else {
                new(web_out(5))
            },
        );
        s.case(
            "orders from web 8080 (sg-0dbc ingress from sg-0web)",
            ORDERS_VLAN,
            Ingress,
            tcp(WEB, 50003, ORDERS, 8080),
            if standard {
                verdict(Reason::PassSameNode)
            } else {
                new(rule(SG_DB_CLIENT, Ingress, 1))
            },
        );
        s.case(
            "orders to web: no egress rule",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 50004, WEB, 8080),
            verdict(if standard {
                Reason::PassSameNode
            } else {
                Reason::DropPolicy
            }),
        );
        s.case(
            "ping from the internet",
            WEB_VLAN,
            Ingress,
            echo_request(INTERNET, WEB, 1),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn standard_mode_drops_what_only_the_branch_groups_allow() {
    let s = Scenario::of(STANDARD);
    s.case(
        "public HTTPS: sg-0web allows 0.0.0.0/0, sg-0node only the VPC",
        WEB_VLAN,
        Ingress,
        tcp(INTERNET, 50000, WEB, 443),
        verdict(Reason::DropPrimaryPolicy),
    );
    s.case(
        "the partner's ICMP: sg-0vpn allows it, sg-0node does not",
        PAYMENTS_VLAN,
        Ingress,
        echo_request(PARTNER_GATEWAY, PAYMENTS, 3),
        verdict(Reason::DropPrimaryPolicy),
    );
    s.case(
        "public HTTPS from inside the VPC passes both",
        WEB_VLAN,
        Ingress,
        tcp(Ipv4Addr::new(10, 0, 9, 9), 50001, WEB, 443),
        new_both(web_in(1), node_in(0)),
    );
    // And the same packets in strict mode, where only the branch counts.
    let s = Scenario::of(STRICT);
    s.case(
        "public HTTPS in strict mode",
        WEB_VLAN,
        Ingress,
        tcp(INTERNET, 50000, WEB, 443),
        new(web_in(1)),
    );
    s.case(
        "the partner's ICMP in strict mode",
        PAYMENTS_VLAN,
        Ingress,
        echo_request(PARTNER_GATEWAY, PAYMENTS, 3),
        new(rule(SG_IPSEC, Ingress, 3)),
    );
}

/// DHCP passes as DHCP only (sg-semantics.md §5): a client to the broadcast
/// server address; the same ports with anyone else go through the groups.
#[test]
fn dhcp_is_unfiltered_only_as_dhcp() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        s.case(
            "DHCP discover to the broadcast address",
            WEB_VLAN,
            Egress,
            udp(WEB, 68, Ipv4Addr::BROADCAST, 67),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "the internet to the pod's DHCP client port",
            WEB_VLAN,
            Ingress,
            udp(INTERNET, 67, WEB, 68),
            verdict(Reason::DropPolicy),
        );
        s.case(
            "the pod to someone's DHCP server port",
            WEB_VLAN,
            Egress,
            udp(WEB, 68, INTERNET, 67),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn instance_metadata_and_time_sync_are_unfiltered() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        for (vlan, pod) in [
            (WEB_VLAN, WEB),
            (ORDERS_VLAN, ORDERS),
            (PAYMENTS_VLAN, PAYMENTS),
        ] {
            s.case(
                "IMDS",
                vlan,
                Egress,
                tcp(pod, 43000, IMDS, 80),
                verdict(Reason::PassUnfiltered),
            );
        }
        s.case(
            "IMDS's answer",
            WEB_VLAN,
            Ingress,
            udp(IMDS, 80, WEB, 43001),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "IMDS over IPv6",
            WEB_VLAN,
            Egress,
            tcp(WEB_V6, 43002, v6("fd00:ec2::254"), 80),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "Amazon Time Sync",
            ORDERS_VLAN,
            Egress,
            udp(ORDERS, 43003, Ipv4Addr::new(169, 254, 169, 123), 123),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "the pod subnet's router, base + 1",
            ORDERS_VLAN,
            Egress,
            udp(ORDERS, 43004, Ipv4Addr::new(10, 0, 1, 1), 53),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "Windows license activation",
            WEB_VLAN,
            Egress,
            tcp(WEB, 43006, Ipv4Addr::new(169, 254, 169, 251), 1688),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "the ECS task metadata endpoint",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 43007, Ipv4Addr::new(169, 254, 170, 2), 80),
            verdict(Reason::PassUnfiltered),
        );
        s.case(
            "a neighbour of IMDS is filtered",
            WEB_VLAN,
            Egress,
            tcp(WEB, 43005, Ipv4Addr::new(169, 254, 169, 249), 80),
            verdict(Reason::DropPolicy),
        );
    }
}

// `::ffff:a.b.c.d` in an IPv6 packet is an IPv6 address, not the IPv4 one: the
// evaluator (and `compile::interpret`, which says so) judge it by the rules.

#[test]
fn ipv6_to_the_ipv4_mapped_imds_address_is_filtered() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        s.case(
            "IPv6 to ::ffff:169.254.169.254",
            WEB_VLAN,
            Egress,
            tcp(WEB_V6, 44000, IMDS.to_ipv6_mapped(), 80),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn ipv6_from_the_ipv4_mapped_node_address_is_not_same_node() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        s.case(
            "IPv6 from ::ffff:10.0.1.10 (the node, mapped) to a port no rule opens",
            WEB_VLAN,
            Ingress,
            tcp(NODE.to_ipv6_mapped(), 44001, WEB_V6, 9090),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn unknown_vlans_are_dropped_or_passed_as_configured() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        for (vlan, direction) in [(3, Ingress), (3, Egress), (5, Egress), (4094, Ingress)] {
            s.case(
                "a VLAN no pod of this node uses",
                vlan,
                direction,
                tcp(WEB, 45000, IMDS, 80),
                verdict(Reason::DropUnknownVlan),
            );
        }
        let mut model = fixture_in(mode);
        model.node.unknown_vlan = UnknownVlanAction::Pass;
        let s = Scenario::new(model);
        s.case(
            "unknownVlan: pass",
            3,
            Egress,
            tcp(WEB, 45001, RDS, 5432),
            verdict(Reason::PassUnknownVlan),
        );
        s.case(
            "a known VLAN is still enforced",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 45002, INTERNET, 22),
            verdict(Reason::DropPolicy),
        );
    }
}

#[test]
fn spoofed_addresses_are_dropped() {
    for mode in [STRICT, STANDARD] {
        let s = Scenario::of(mode);
        s.case(
            "web's VLAN with orders' source",
            WEB_VLAN,
            Egress,
            tcp(ORDERS, 46000, RDS, 5432),
            verdict(Reason::DropSpoofed),
        );
        s.case(
            "orders' source on its own VLAN passes",
            ORDERS_VLAN,
            Egress,
            tcp(ORDERS, 46000, RDS, 5432),
            if mode == STANDARD {
                new_both(rule(SG_DB_CLIENT, Egress, 2), node_out(0))
            } else {
                new(rule(SG_DB_CLIENT, Egress, 2))
            },
        );
        s.case(
            "the reply to orders delivered on web's VLAN",
            WEB_VLAN,
            Ingress,
            Ip {
                l4: L4::Tcp {
                    src: 5432,
                    dst: 46000,
                    flags: frame::TCP_SYN | frame::TCP_ACK,
                },
                ..tcp(RDS, 0, ORDERS, 0)
            },
            verdict(Reason::DropSpoofed),
        );
        s.case(
            "an IPv6 source for orders, which has none",
            ORDERS_VLAN,
            Egress,
            udp(
                v6("2600:1f18:4a3:6901:8a2f::2"),
                46001,
                v6("fd00:ec2::253"),
                53,
            ),
            verdict(Reason::DropSpoofed),
        );
        s.case(
            "web's IPv6 source on payments' VLAN",
            PAYMENTS_VLAN,
            Egress,
            udp(WEB_V6, 46002, v6("fd00:ec2::253"), 53),
            verdict(Reason::DropSpoofed),
        );
        s.case(
            "the node's address as a pod source, even to IMDS",
            WEB_VLAN,
            Egress,
            tcp(NODE, 46003, IMDS, 80),
            verdict(Reason::DropSpoofed),
        );
    }
}

/// A copy of the bundled state with more files, removed when dropped.
struct ExtendedState(std::path::PathBuf);

impl ExtendedState {
    fn new(name: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("enforcer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the state copy");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state");
        for entry in std::fs::read_dir(&fixture).expect("read the fixture") {
            let path = entry.expect("fixture entry").path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).expect("copy");
        }
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write a state file");
        }
        Self(dir)
    }

    fn model(&self) -> Model {
        enforcer::source::load(&self.0).unwrap_or_else(|e| panic!("the state loads: {e}"))
    }
}

impl Drop for ExtendedState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A second ENI of this node with a delegated prefix, a node of another node group
/// (its ENI carries another group) with a pod in its prefix, and a Fargate pod.
const OTHER_NODE_GROUPS: &str = r#"{"NetworkInterfaces": [
    {"NetworkInterfaceId": "eni-0node0000000001011", "PrivateDnsName": "ip-10-0-1-11.ec2.internal",
     "Groups": [{"GroupId": "sg-0node0000000000001"}], "PrivateIpAddress": "10.0.1.11",
     "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.1.64/28"}]},
    {"NetworkInterfaceId": "eni-0ngb000000000230", "PrivateDnsName": "ip-10-0-2-30.ec2.internal",
     "Groups": [{"GroupId": "sg-0ngb00000000000001"}], "PrivateIpAddress": "10.0.2.30",
     "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.2.48/28"}]},
    {"NetworkInterfaceId": "eni-0fargate00000509", "Description": "[Fargate] shop/batch",
     "Groups": [{"GroupId": "sg-0cluster000000001"}], "PrivateIpAddress": "10.0.5.9"}]}"#;

const OTHER_NODE_PODS: &str = r#"{"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "batch-b", "namespace": "shop", "uid": "uid-batch-b"},
     "spec": {"nodeName": "ip-10-0-2-30.ec2.internal"}, "status": {"podIPs": [{"ip": "10.0.2.50"}]}},
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "batch-f", "namespace": "shop", "uid": "uid-batch-f"},
     "spec": {"nodeName": "fargate-ip-10-0-5-9.ec2.internal"}, "status": {"podIPs": [{"ip": "10.0.5.9"}]}}]}"#;

#[test]
fn the_node_group_is_its_eni_data_not_every_pod() {
    let state = ExtendedState::new(
        "node-groups",
        &[
            ("other-node-groups.json", OTHER_NODE_GROUPS),
            ("other-node-pods.json", OTHER_NODE_PODS),
        ],
    );
    let s = Scenario::new(state.model());
    s.case(
        "a pod in this node's delegated prefix: an sg-0node member",
        WEB_VLAN,
        Ingress,
        tcp(Ipv4Addr::new(10, 0, 1, 70), 50010, WEB, 8080),
        new(web_in(3)),
    );
    s.case(
        "a pod of another node group: its node's ENI carries another group",
        WEB_VLAN,
        Ingress,
        tcp(Ipv4Addr::new(10, 0, 2, 50), 50011, WEB, 8080),
        verdict(Reason::DropPolicy),
    );
    s.case(
        "a Fargate pod: its ENI carries the cluster group",
        WEB_VLAN,
        Ingress,
        tcp(Ipv4Addr::new(10, 0, 5, 9), 50012, WEB, 8080),
        verdict(Reason::DropPolicy),
    );
    s.case(
        "the cache on this node's ENI is still a member",
        WEB_VLAN,
        Ingress,
        tcp(Ipv4Addr::new(10, 0, 1, 57), 50013, WEB, 8080),
        new(web_in(3)),
    );
}
