//! Connection tracking through the real programs (`BPF_PROG_TEST_RUN`), on a
//! small hand-built model: TCP/UDP/ICMP/other-protocol state and idle
//! timeouts (entries aged by rewriting `last_seen_ns`), replies admitted
//! whatever the rules say, ICMP errors related to tracked flows, per-pod
//! isolation, untracked flows, counters, IPv4 fragments, pod removal, and each
//! pod's allowance of flows and fragmented datagrams (a flood of one pod never
//! takes another's flows), given back by the sweep.
//! Every test loads its own `Kernel`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{
    BranchPod, Cidr, ConntrackTimeouts, Direction, EnforcingAction, EnforcingMode, L4Match, Model,
    NodeConfig, Peer, Rule, SecurityGroup, UnknownVlanAction,
};
use enforcer::policy::eval::{self, L4Query, Query, RuleRef};
use enforcer_common::{CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, Reason, ct_flag, ct_state};
use enforcer_tests::frame::{
    self, Fragment, Ip, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tag, other, tcp, udp,
};
use enforcer_tests::kernel::{Kernel, Outcome};
use enforcer_tests::oracle::{ct_key, l4_packet};

use Direction::{Egress, Ingress};

const TCP_PSH: u8 = 0x08;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Flows are stamped with CLOCK_MONOTONIC (time since boot), so a flow can be
/// aged by `seconds` only once the machine has been up longer than that: on a
/// freshly booted machine (CI), wait for it before the test makes its flows.
fn wait_for_uptime(seconds: u64) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    let up = std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
    let needed = std::time::Duration::from_secs(seconds + 5);
    if let Some(wait) = needed.checked_sub(up) {
        eprintln!("the machine has been up {up:?}: waiting {wait:?} to age flows by {seconds} s");
        std::thread::sleep(wait);
    }
}

/// NodeConfig timeouts, all different from the defaults so the kernel must read them.
/// (A 5-day TCP default could not be aged past on a machine up for less.)
const TCP_ESTABLISHED_TIMEOUT: u64 = 350;
const UDP_STREAM_TIMEOUT: u64 = 90;
const UDP_TIMEOUT: u64 = 45;

/// Pod A (`sg-app`): ingress TCP 8080 from the VPC; egress everything.
const A_VLAN: u16 = 10;
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 10);
const A6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f00, 0, 0, 0, 0, 0, 0xa);
/// Pod B (`sg-locked`): ingress TCP 8080 from the VPC; egress TCP 443 only.
const B_VLAN: u16 = 11;
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 11);
/// Pod C (`sg-open`): everything from and to 0.0.0.0/0 and ::/0.
const C_VLAN: u16 = 12;
const C: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 12);
const C6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f00, 0, 0, 0, 0, 0, 0xc);
/// Pod D (`sg-half`): ingress all TCP ports from 0.0.0.0/0; egress TCP 443 and UDP 53 to 0.0.0.0/0.
const D_VLAN: u16 = 13;
const D: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 13);

/// Peers: a server outside the VPC, a host in the VPC, routers on the path.
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 5);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn cidr(s: &str) -> Peer {
    Peer::Cidr(s.parse::<Cidr>().unwrap())
}

fn rule(l4: L4Match, peer: Peer) -> Rule {
    Rule {
        l4,
        peer,
        description: None,
    }
}

fn ports(protocol: u8, from: u16, to: u16) -> L4Match {
    L4Match::Ports { protocol, from, to }
}

fn group(id: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        id: id.to_string(),
        name: id.to_string(),
        description: String::new(),
        tags: BTreeMap::new(),
        ingress,
        egress,
    }
}

fn pod(name: &str, vlan: u16, ipv4: Ipv4Addr, ipv6: Ipv6Addr, group: &str) -> BranchPod {
    BranchPod {
        namespace: "shop".to_string(),
        name: name.to_string(),
        uid: format!("uid-{name}"),
        vlan,
        eni_id: format!("eni-{vlan}"),
        mac: format!("02:00:00:00:00:{vlan:02x}"),
        ipv4: Some(ipv4),
        ipv6: Some(ipv6),
        subnet_v4: Some("10.0.64.0/19".parse().unwrap()),
        subnet_v6: Some("2600:1f00::/64".parse().unwrap()),
        groups: vec![group.to_string()],
        mode: EnforcingMode::Strict,
        action: EnforcingAction::Enforce,
        facts: Default::default(),
    }
}

fn model() -> Model {
    let all_out = || {
        vec![
            rule(L4Match::All, cidr("0.0.0.0/0")),
            rule(L4Match::All, cidr("::/0")),
        ]
    };
    let from_vpc_8080 = || vec![rule(ports(6, 8080, 8080), cidr("10.0.0.0/16"))];
    let groups = vec![
        group("sg-app", from_vpc_8080(), all_out()),
        group(
            "sg-locked",
            from_vpc_8080(),
            vec![rule(ports(6, 443, 443), cidr("0.0.0.0/0"))],
        ),
        group("sg-open", all_out(), all_out()),
        group(
            "sg-half",
            vec![rule(ports(6, 0, 65535), cidr("0.0.0.0/0"))],
            vec![
                rule(ports(6, 443, 443), cidr("0.0.0.0/0")),
                rule(ports(17, 53, 53), cidr("0.0.0.0/0")),
            ],
        ),
        group(
            "sg-node",
            vec![rule(L4Match::All, cidr("10.0.0.0/16"))],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        ),
    ];
    let v6 = |low: u16| Ipv6Addr::new(0x2600, 0x1f00, 0, 0, 0, 0, 0, low);
    let pods = vec![
        pod("a", A_VLAN, A, A6, "sg-app"),
        pod("b", B_VLAN, B, v6(0xb), "sg-locked"),
        pod("c", C_VLAN, C, C6, "sg-open"),
        pod("d", D_VLAN, D, v6(0xd), "sg-half"),
    ];
    let node_ip: IpAddr = Ipv4Addr::new(10, 0, 1, 10).into();
    let mut node_local: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.addresses()).collect();
    node_local.insert(node_ip);
    let mut members: BTreeMap<String, BTreeSet<Cidr>> = BTreeMap::new();
    for p in &pods {
        members
            .entry(p.groups[0].clone())
            .or_default()
            .extend(p.addresses().map(Cidr::host));
    }
    members
        .entry("sg-node".into())
        .or_default()
        .insert(Cidr::host(node_ip));
    Model {
        node: NodeConfig {
            name: "ip-10-0-1-10.ec2.internal".to_string(),
            enforcing_mode: EnforcingMode::Strict,
            // Present in every namespace: source NAT is on (see `enforcer_tests::models`).
            trunk_interface: "lo".to_string(),
            primary_interface: "lo".to_string(),
            primary_ips: vec![node_ip],
            primary_security_groups: vec!["sg-node".to_string()],
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            external_snat: false,
            exclude_snat_cidrs: Vec::new(),
            snat_port_range: enforcer::model::DEFAULT_SNAT_PORT_RANGE,
            unknown_vlan: UnknownVlanAction::Drop,
            connection_tracking: ConntrackTimeouts {
                tcp_established: TCP_ESTABLISHED_TIMEOUT as u32,
                udp_stream: UDP_STREAM_TIMEOUT as u32,
                udp: UDP_TIMEOUT as u32,
            },
            instance_type: None,
            service_cidrs: Vec::new(),
            max_groups_per_pod: 16,
            max_rules_per_group: 60,
            enforcing_action: EnforcingAction::Enforce,
            tcp_early_demux_disabled: false,
            max_flows_per_pod: enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
            max_fragments_per_pod: enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
        },
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        prefix_lists: BTreeMap::new(),
        members,
        pods,
        node_local,
        warnings: Vec::new(),
        nlb_groups: Default::default(),
        cluster: Default::default(),
    }
}

fn icmp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, icmp_type: u8, id: u16) -> Ip {
    Ip {
        src: src.into(),
        dst: dst.into(),
        l4: L4::Icmp {
            icmp_type,
            code: 0,
            id,
        },
    }
}

/// The model in the kernel, and helpers to drive and inspect it.
struct Ct {
    model: Model,
    kernel: Kernel,
}

impl Ct {
    fn new() -> Self {
        let model = model();
        let kernel = Kernel::load(&model);
        Self { model, kernel }
    }

    /// Runs a built frame and checks the reason the kernel gives.
    fn frame(&self, what: &str, direction: Direction, frame: &[u8], reason: Reason) {
        let outcome = self.kernel.run(direction, frame);
        assert_eq!(outcome.reason, reason, "{what}: {direction:?}");
        assert_eq!(outcome.passed, !reason.is_drop(), "{what}");
    }

    /// Runs `ip` tagged `vlan` and checks the reason.
    fn send(&self, what: &str, vlan: u16, direction: Direction, ip: &Ip, reason: Reason) {
        let frame = frame::ip_frame(Tag::Vlan(vlan), ip);
        self.frame(
            &format!("{what} ({ip:?} on VLAN {vlan})"),
            direction,
            &frame,
            reason,
        );
    }

    /// Sends each allowed new flow and checks that it is tracked or not, as
    /// the evaluator says and the conntrack map shows.
    fn assert_tracking(&self, what: &str, vlan: u16, cases: &[(Direction, Ip, bool)]) {
        for (direction, ip, untracked) in cases {
            let e = self.evaluate(vlan, *direction, ip);
            assert!(e.allowed, "{ip:?}");
            assert_eq!(e.untracked, *untracked, "oracle on {ip:?}");
            self.send(what, vlan, *direction, ip, Reason::PassNew);
            let entry = self.entry(&ct_key(vlan, *direction, ip));
            assert_eq!(
                entry.is_none(),
                *untracked,
                "entry of {direction:?} {ip:?}: {entry:?}"
            );
        }
    }

    fn flows(&self) -> Vec<(CtKey, CtEntry)> {
        self.kernel.maps.flows().expect("read conntrack")
    }

    fn entry(&self, key: &CtKey) -> Option<CtEntry> {
        self.flows()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e)
    }

    fn expect_entry(&self, what: &str, key: &CtKey) -> CtEntry {
        self.entry(key)
            .unwrap_or_else(|| panic!("{what}: no conntrack entry for {key:?}"))
    }

    fn vlan_flows(&self, vlan: u16) -> usize {
        self.flows().iter().filter(|(k, _)| k.vlan == vlan).count()
    }

    /// Pretends the flow has been idle `seconds` longer than it has (moves its
    /// CLOCK_MONOTONIC stamp back: see [`wait_for_uptime`]).
    fn age(&mut self, key: &CtKey, seconds: u64) {
        let mut entry = self.expect_entry("ageing", key);
        entry.last_seen_ns = entry
            .last_seen_ns
            .checked_sub(seconds * NS_PER_SEC)
            .unwrap_or_else(|| {
                panic!(
                    "CLOCK_MONOTONIC is below {seconds} s: call wait_for_uptime before making the flow"
                )
            });
        self.kernel
            .maps
            .set_flow(key, &entry)
            .expect("rewrite the entry");
    }

    fn rule_of(&self, entry: &CtEntry) -> Option<&RuleRef> {
        self.kernel.compiled.rule(entry.rule)
    }

    /// The reference evaluator on `ip` as a new flow of the pod on `vlan`.
    fn evaluate(&self, vlan: u16, direction: Direction, ip: &Ip) -> eval::Evaluation {
        let pod = self.model.pods.iter().find(|p| p.vlan == vlan).unwrap();
        let peer = match direction {
            Ingress => ip.src,
            Egress => ip.dst,
        };
        let query = Query {
            direction,
            peer,
            l4: L4Query::Packet(l4_packet(ip)),
        };
        eval::evaluate(&self.model, pod, &query)
    }
}

fn rref(group: &str, direction: Direction, index: usize) -> RuleRef {
    RuleRef {
        group_id: group.to_string(),
        direction,
        index,
    }
}

/// Opens A:`port` -> SERVER:443 (SYN out, SYN-ACK in); returns the SYN and its key.
fn handshake(ct: &Ct, port: u16) -> (Ip, CtKey) {
    let syn = tcp(A, port, SERVER, 443, TCP_SYN);
    ct.send("SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    ct.send(
        "SYN-ACK",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );
    (syn, ct_key(A_VLAN, Egress, &syn))
}

/// Handshake, then FIN from both sides: the flow is closing.
fn closed(ct: &Ct, port: u16) -> (Ip, CtKey) {
    let (syn, key) = handshake(ct, port);
    let fin_out = tcp(A, port, SERVER, 443, TCP_FIN | TCP_ACK);
    ct.send("FIN out", A_VLAN, Egress, &fin_out, Reason::PassEstablished);
    ct.send(
        "FIN in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_FIN | TCP_ACK),
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("closed", &key).state, ct_state::CLOSING);
    (syn, key)
}

#[test]
fn tcp_handshake_data_and_close_follow_the_state_machine() {
    let ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let key = ct_key(A_VLAN, Egress, &syn);
    ct.send("SYN out", A_VLAN, Egress, &syn, Reason::PassNew);
    let entry = ct.expect_entry("after SYN", &key);
    assert_eq!(entry.state, ct_state::OPENING);
    assert_eq!(entry.flags, ct_flag::SEEN_EGRESS);
    assert_eq!(usize::from(entry.origin), DIR_EGRESS);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-app", Egress, 0)));
    assert_eq!(entry.created_ns, entry.last_seen_ns);

    // A's ingress rules admit only TCP 8080 from the VPC: the same SYN-ACK to a
    // port with no flow is dropped.
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    let stray = tcp(SERVER, 443, A, 40001, TCP_SYN | TCP_ACK);
    ct.send(
        "SYN-ACK without a flow",
        A_VLAN,
        Ingress,
        &stray,
        Reason::DropPolicy,
    );
    assert!(!ct.evaluate(A_VLAN, Ingress, &synack).allowed);
    ct.send(
        "SYN-ACK in",
        A_VLAN,
        Ingress,
        &synack,
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("after SYN-ACK", &key);
    assert_eq!(entry.state, ct_state::ESTABLISHED);
    assert_eq!(entry.flags, ct_flag::SEEN_EGRESS | ct_flag::SEEN_INGRESS);

    let ack = tcp(A, 40000, SERVER, 443, TCP_ACK);
    ct.send("ACK out", A_VLAN, Egress, &ack, Reason::PassEstablished);
    let data_out = tcp(A, 40000, SERVER, 443, TCP_ACK | TCP_PSH);
    ct.send(
        "data out",
        A_VLAN,
        Egress,
        &data_out,
        Reason::PassEstablished,
    );
    ct.send(
        "data in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("data", &key).state, ct_state::ESTABLISHED);

    let fin_out = tcp(A, 40000, SERVER, 443, TCP_FIN | TCP_ACK);
    ct.send("FIN out", A_VLAN, Egress, &fin_out, Reason::PassEstablished);
    let entry = ct.expect_entry("after one FIN", &key);
    assert_eq!(entry.state, ct_state::ESTABLISHED, "one FIN is not closing");
    assert_ne!(entry.flags & ct_flag::FIN_EGRESS, 0);
    assert_eq!(entry.flags & ct_flag::FIN_INGRESS, 0);
    ct.send(
        "FIN in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_FIN | TCP_ACK),
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("after both FINs", &key);
    assert_eq!(entry.state, ct_state::CLOSING);
    assert_ne!(entry.flags & ct_flag::FIN_INGRESS, 0);
    ct.send("last ACK", A_VLAN, Egress, &ack, Reason::PassEstablished);
    assert_eq!(ct.expect_entry("last ACK", &key).state, ct_state::CLOSING);
    assert_eq!(ct.vlan_flows(A_VLAN), 1, "one flow, one entry");
}

#[test]
fn tcp_reset_closes_the_flow_at_once() {
    let ct = Ct::new();
    let (syn, key) = handshake(&ct, 40000);
    ct.send(
        "RST in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_RST | TCP_ACK),
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("after RST", &key).state, ct_state::CLOSING);
}

#[test]
fn tcp_opening_flow_expires_after_60_seconds() {
    let mut ct = Ct::new();
    let young = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let old = tcp(A, 40001, SERVER, 443, TCP_SYN);
    for syn in [&young, &old] {
        ct.send("SYN", A_VLAN, Egress, syn, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 55);
    ct.age(&ct_key(A_VLAN, Egress, &old), 61);
    let synack = TCP_SYN | TCP_ACK;
    ct.send(
        "SYN-ACK 55 s after the SYN",
        A_VLAN,
        Ingress,
        &young.reply(synack),
        Reason::PassEstablished,
    );
    ct.send(
        "SYN-ACK 61 s after the SYN",
        A_VLAN,
        Ingress,
        &old.reply(synack),
        Reason::DropPolicy,
    );
}

#[test]
fn tcp_established_flow_expires_after_the_configured_timeout() {
    wait_for_uptime(TCP_ESTABLISHED_TIMEOUT + 1);
    let mut ct = Ct::new();
    let (young, young_key) = handshake(&ct, 40000);
    let (old, old_key) = handshake(&ct, 40001);
    // Far past the opening timeout, within the established one.
    ct.age(&young_key, TCP_ESTABLISHED_TIMEOUT - 10);
    ct.age(&old_key, TCP_ESTABLISHED_TIMEOUT + 1);
    ct.send(
        "data within tcpEstablishedTimeout",
        A_VLAN,
        Ingress,
        &young.reply(TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "data past tcpEstablishedTimeout",
        A_VLAN,
        Ingress,
        &old.reply(TCP_ACK),
        Reason::DropPolicy,
    );
    // The pod's own packet is judged as a new flow, which its egress rules allow.
    ct.send(
        "the pod's next segment",
        A_VLAN,
        Egress,
        &tcp(A, 40001, SERVER, 443, TCP_ACK),
        Reason::PassNew,
    );
    let entry = ct.expect_entry("recreated", &old_key);
    assert_eq!(entry.state, ct_state::OPENING);
    assert_eq!(entry.packets, [0, 1]);
}

#[test]
fn tcp_closing_flow_expires_after_10_seconds() {
    let mut ct = Ct::new();
    let (young, young_key) = closed(&ct, 40000);
    let (old, old_key) = closed(&ct, 40001);
    ct.age(&young_key, 8);
    ct.age(&old_key, 11);
    ct.send(
        "last ACK 8 s after closing",
        A_VLAN,
        Ingress,
        &young.reply(TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "last ACK 11 s after closing",
        A_VLAN,
        Ingress,
        &old.reply(TCP_ACK),
        Reason::DropPolicy,
    );
}

#[test]
fn udp_becomes_a_stream_after_more_than_one_transaction() {
    let ct = Ct::new();
    let query = udp(A, 5000, SERVER, 53);
    let key = ct_key(A_VLAN, Egress, &query);
    ct.send("request", A_VLAN, Egress, &query, Reason::PassNew);
    let entry = ct.expect_entry("request", &key);
    assert_eq!(entry.state, ct_state::ONE_WAY);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-app", Egress, 0)));
    ct.send(
        "second request",
        A_VLAN,
        Egress,
        &query,
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("requests", &key).state, ct_state::ONE_WAY);
    let steps = [
        ("response", Ingress, ct_state::ANSWERED),
        ("another response", Ingress, ct_state::ANSWERED),
        (
            "a request after the response",
            Egress,
            ct_state::ASKED_AGAIN,
        ),
        (
            "its response: two transactions",
            Ingress,
            ct_state::BOTH_WAYS,
        ),
        ("a request on the stream", Egress, ct_state::BOTH_WAYS),
    ];
    for (step, direction, state) in steps {
        let ip = match direction {
            Ingress => query.reply(0),
            Egress => query,
        };
        ct.send(step, A_VLAN, direction, &ip, Reason::PassEstablished);
        assert_eq!(ct.expect_entry(step, &key).state, state, "{step}");
    }
    ct.send(
        "the server from another port",
        A_VLAN,
        Ingress,
        &udp(SERVER, 54, A, 5000),
        Reason::DropPolicy,
    );
}

#[test]
fn udp_one_way_flow_expires_after_udp_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_TIMEOUT + 1);
    ct.send(
        "response within udpTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "response past udpTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

/// One request and its response (a DNS lookup) are no stream: the flow
/// keeps the UDP timeout, not the stream timeout.
#[test]
fn one_udp_transaction_keeps_the_udp_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
        ct.send(
            "response",
            A_VLAN,
            Ingress,
            &q.reply(0),
            Reason::PassEstablished,
        );
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_TIMEOUT + 1);
    ct.send(
        "a late response within udpTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "a late response past udpTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn udp_stream_outlives_udp_timeout_until_udp_stream_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
        for (step, direction, ip) in [
            ("response", Ingress, q.reply(0)),
            ("second request", Egress, *q),
            ("second response", Ingress, q.reply(0)),
        ] {
            ct.send(step, A_VLAN, direction, &ip, Reason::PassEstablished);
        }
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_STREAM_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_STREAM_TIMEOUT + 1);
    const { assert!(UDP_STREAM_TIMEOUT - 5 > UDP_TIMEOUT) };
    ct.send(
        "stream past udpTimeout, within udpStreamTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "stream past udpStreamTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn icmp_echo_reply_is_matched_by_identifier() {
    let mut ct = Ct::new();
    for (pod, server, request_type) in [
        (IpAddr::from(A), IpAddr::from(SERVER), 8),
        (A6.into(), SERVER6.into(), 128),
    ] {
        let request = icmp(pod, server, request_type, 0x77);
        let key = ct_key(A_VLAN, Egress, &request);
        assert_eq!(key.pod_port, 0x77);
        ct.send("echo request", A_VLAN, Egress, &request, Reason::PassNew);
        assert_eq!(ct.expect_entry("request", &key).state, ct_state::ONE_WAY);
        let answer = request.reply(0);
        ct.send(
            "echo reply",
            A_VLAN,
            Ingress,
            &answer,
            Reason::PassEstablished,
        );
        assert_eq!(ct.expect_entry("reply", &key).state, ct_state::BOTH_WAYS);
        let mut other_id = answer;
        other_id.l4 = match answer.l4 {
            L4::Icmp {
                icmp_type, code, ..
            } => L4::Icmp {
                icmp_type,
                code,
                id: 0x78,
            },
            l4 => l4,
        };
        ct.send(
            "echo reply with another identifier",
            A_VLAN,
            Ingress,
            &other_id,
            Reason::DropPolicy,
        );
    }
    // ICMP flows idle out after 30 s.
    let young = icmp(A, SERVER, 8, 0x79);
    let old = icmp(A, SERVER, 8, 0x7a);
    for request in [&young, &old] {
        ct.send("echo request", A_VLAN, Egress, request, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 25);
    ct.age(&ct_key(A_VLAN, Egress, &old), 31);
    ct.send(
        "reply after 25 s",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "reply after 31 s",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn icmp_errors_quoting_a_tracked_flow_are_related() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // Port unreachable from the server about a UDP query.
    let query = udp(A, 5353, SERVER, 53);
    ct.send("UDP query", A_VLAN, Egress, &query, Reason::PassNew);
    let unreachable = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &query);
    ct.frame(
        "port unreachable",
        Ingress,
        &unreachable,
        Reason::PassRelated,
    );
    // Fragmentation needed from a router on the path about a TCP segment.
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let frag_needed = frame::icmp_error_frame(tag, ROUTER.into(), A.into(), 3, 4, &syn);
    ct.frame(
        "fragmentation needed",
        Ingress,
        &frag_needed,
        Reason::PassRelated,
    );
    // Time exceeded about an echo request (traceroute).
    let echo = icmp(A, SERVER, 8, 0x42);
    ct.send("echo request", A_VLAN, Egress, &echo, Reason::PassNew);
    let ttl = frame::icmp_error_frame(tag, ROUTER.into(), A.into(), 11, 0, &echo);
    ct.frame("time exceeded", Ingress, &ttl, Reason::PassRelated);
    // IPv6 packet too big from a router about a TCP segment.
    let syn6 = tcp(A6, 40000, SERVER6, 443, TCP_SYN);
    ct.send("SYN over IPv6", A_VLAN, Egress, &syn6, Reason::PassNew);
    let too_big = frame::icmp_error_frame(tag, ROUTER6.into(), A6.into(), 2, 0, &syn6);
    ct.frame("packet too big", Ingress, &too_big, Reason::PassRelated);
    // Related errors open no flow of their own.
    let flows = ct.flows();
    assert!(
        !flows
            .iter()
            .any(|(k, _)| matches!(k.protocol, 1 | 58) && k.pod_port == 0),
        "an ICMP error left an entry: {flows:?}"
    );
    assert_eq!(ct.vlan_flows(A_VLAN), 4);
}

#[test]
fn icmp_errors_quoting_an_untracked_or_expired_flow_are_judged_by_rules() {
    let mut ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    let never_sent = udp(A, 5354, SERVER, 53);
    let error = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &never_sent);
    ct.frame(
        "port unreachable about nothing",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
    let six = tcp(A6, 40000, SERVER6, 443, TCP_SYN);
    let error = frame::icmp_error_frame(tag, ROUTER6.into(), A6.into(), 2, 0, &six);
    ct.frame(
        "packet too big about nothing",
        Ingress,
        &error,
        Reason::DropPolicy,
    );

    let query = udp(A, 5355, SERVER, 53);
    ct.send("UDP query", A_VLAN, Egress, &query, Reason::PassNew);
    ct.age(&ct_key(A_VLAN, Egress, &query), UDP_TIMEOUT + 1);
    let error = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &query);
    ct.frame(
        "port unreachable about an expired flow",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
}

#[test]
fn icmp_errors_sent_by_the_pod_about_a_tracked_flow_are_related() {
    let ct = Ct::new();
    let tag = Tag::Vlan(B_VLAN);
    // B may send only TCP 443; the connection comes in on 8080.
    let syn = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN);
    ct.send("SYN to B", B_VLAN, Ingress, &syn, Reason::PassNew);
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    assert!(!ct.evaluate(B_VLAN, Egress, &synack).allowed);
    ct.send(
        "B's SYN-ACK",
        B_VLAN,
        Egress,
        &synack,
        Reason::PassEstablished,
    );
    let error = frame::icmp_error_frame(tag, B.into(), VPC_HOST.into(), 3, 1, &syn);
    ct.frame(
        "B's host unreachable about the flow",
        Egress,
        &error,
        Reason::PassRelated,
    );
    let other = tcp(VPC_HOST, 40001, B, 8080, TCP_SYN);
    let error = frame::icmp_error_frame(tag, B.into(), VPC_HOST.into(), 3, 1, &other);
    ct.frame(
        "B's host unreachable about no flow",
        Egress,
        &error,
        Reason::DropPolicy,
    );
}

#[test]
fn a_flow_tracked_for_one_pod_never_admits_traffic_to_another() {
    let ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let to_b = tcp(SERVER, 443, B, 40000, TCP_SYN | TCP_ACK);
    ct.send(
        "the SYN-ACK to B",
        B_VLAN,
        Ingress,
        &to_b,
        Reason::DropPolicy,
    );
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "A's SYN-ACK tagged with B's VLAN",
        B_VLAN,
        Ingress,
        &synack,
        Reason::DropSpoofed,
    );
    let error = frame::icmp_error_frame(Tag::Vlan(B_VLAN), SERVER.into(), B.into(), 3, 3, &syn);
    ct.frame(
        "an error to B quoting A's flow",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
    assert_eq!(ct.vlan_flows(B_VLAN), 0);
    ct.send(
        "A's SYN-ACK",
        A_VLAN,
        Ingress,
        &synack,
        Reason::PassEstablished,
    );

    // Where B's rules allow the packet it is a new flow of B's, not A's reply.
    let from_a = tcp(A, 8080, VPC_HOST, 40000, TCP_SYN);
    ct.send(
        "A to the VPC host",
        A_VLAN,
        Egress,
        &from_a,
        Reason::PassNew,
    );
    let to_b = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN | TCP_ACK);
    ct.send("the VPC host to B", B_VLAN, Ingress, &to_b, Reason::PassNew);
    let entry = ct.expect_entry("B's flow", &ct_key(B_VLAN, Ingress, &to_b));
    assert_eq!(usize::from(entry.origin), DIR_INGRESS);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-locked", Ingress, 0)));
}

#[test]
fn flows_allowed_from_everywhere_with_the_reverse_all_open_are_untracked() {
    let ct = Ct::new();
    let cases = [
        (Ingress, tcp(CLIENT, 50000, C, 443, TCP_SYN), true),
        (
            Ingress,
            tcp(IpAddr::from(SERVER6), 50001, C6, 22, TCP_SYN),
            true,
        ),
        (Egress, tcp(C, 40000, SERVER, 443, TCP_SYN), true),
        (Egress, udp(C, 5000, SERVER, 53), true),
        (Ingress, udp(CLIENT, 5000, C, 5001), true),
        // ICMP and other protocols are always tracked.
        (Egress, icmp(C, SERVER, 8, 1), false),
        (Egress, other(C, SERVER, 47), false),
    ];
    ct.assert_tracking("C's flow", C_VLAN, &cases);
    assert_eq!(ct.vlan_flows(C_VLAN), 2);
    // The untracked flow's next packet is judged (and allowed) again, still without an entry.
    let answer = tcp(C, 443, CLIENT, 50000, TCP_SYN | TCP_ACK);
    ct.send("C's answer", C_VLAN, Egress, &answer, Reason::PassNew);
    assert_eq!(ct.vlan_flows(C_VLAN), 2);
}

#[test]
fn untracked_needs_the_reverse_direction_open_on_all_ports() {
    // D: ingress every TCP port from 0.0.0.0/0; egress TCP 443 and UDP 53 to 0.0.0.0/0.
    let ct = Ct::new();
    let cases = [
        // Egress does not open every TCP port: tracked.
        (Ingress, tcp(CLIENT, 50000, D, 22, TCP_SYN), false),
        // Ingress opens every TCP port from everywhere: untracked.
        (Egress, tcp(D, 40000, SERVER, 443, TCP_SYN), true),
        // Ingress opens no UDP: tracked.
        (Egress, udp(D, 5000, SERVER, 53), false),
    ];
    ct.assert_tracking("D's flow", D_VLAN, &cases);
    assert_eq!(ct.vlan_flows(D_VLAN), 2);
}

#[test]
fn entries_count_packets_and_bytes_per_direction() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let key = ct_key(A_VLAN, Egress, &syn);
    let frames = [
        (Egress, frame::ip_frame(tag, &syn), Reason::PassNew),
        (
            Ingress,
            frame::ip_frame(tag, &syn.reply(TCP_SYN | TCP_ACK)),
            Reason::PassEstablished,
        ),
        (
            Egress,
            frame::ip_frame_with_payload(tag, &tcp(A, 40000, SERVER, 443, TCP_ACK), &[7; 100]),
            Reason::PassEstablished,
        ),
        (
            Ingress,
            frame::ip_frame_with_payload(tag, &syn.reply(TCP_ACK), &[8; 1000]),
            Reason::PassEstablished,
        ),
        (
            Ingress,
            frame::ip_frame_with_payload(tag, &syn.reply(TCP_ACK | TCP_PSH), &[9; 500]),
            Reason::PassEstablished,
        ),
    ];
    let mut packets = [0u64; 2];
    let mut bytes = [0u64; 2];
    let mut last_seen = 0;
    for (direction, frame, reason) in &frames {
        ct.frame("segment", *direction, frame, *reason);
        let index = match direction {
            Ingress => DIR_INGRESS,
            Egress => DIR_EGRESS,
        };
        packets[index] += 1;
        bytes[index] += frame.len() as u64;
        let entry = ct.expect_entry("counting", &key);
        assert_eq!(entry.packets, packets, "packets");
        assert_eq!(entry.bytes, bytes, "bytes");
        assert!(entry.last_seen_ns >= last_seen && entry.last_seen_ns >= entry.created_ns);
        last_seen = entry.last_seen_ns;
    }
    // Dropped packets and other flows do not count.
    ct.send(
        "another port",
        A_VLAN,
        Ingress,
        &tcp(SERVER, 443, A, 40001, TCP_ACK),
        Reason::DropPolicy,
    );
    let entry = ct.expect_entry("after a drop", &key);
    assert_eq!((entry.packets, entry.bytes), (packets, bytes));
    // Ethernet + 802.1Q + IPv4 + TCP headers are 58 bytes a frame.
    assert_eq!(packets, [3, 2]);
    assert_eq!(bytes, [3 * 58 + 1000 + 500, 2 * 58 + 100]);
}

#[test]
fn later_fragments_follow_an_allowed_first_fragment() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // A large UDP datagram out (egress allows everything), 0x4242, in three fragments.
    let datagram = udp(A, 5000, SERVER, 9999);
    let mut first_payload = datagram.transport_bytes();
    first_payload.resize(24, 0xaa);
    let fragment = |offset, more| Fragment {
        id: 0x4242,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(tag, &datagram, fragment(0, true), &first_payload);
    ct.frame("first fragment", Egress, &first, Reason::PassNew);
    assert!(ct.entry(&ct_key(A_VLAN, Egress, &datagram)).is_some());
    let middle = frame::ipv4_fragment_frame(tag, &datagram, fragment(3, true), &[0xbb; 24]);
    ct.frame("middle fragment", Egress, &middle, Reason::PassFragment);
    let last = frame::ipv4_fragment_frame(tag, &datagram, fragment(6, false), &[0xcc; 8]);
    ct.frame("last fragment", Egress, &last, Reason::PassFragment);
    let other_id = Fragment {
        id: 0x4243,
        ..fragment(3, true)
    };
    let stranger = frame::ipv4_fragment_frame(tag, &datagram, other_id, &[0xbb; 24]);
    ct.frame(
        "a fragment of another datagram",
        Egress,
        &stranger,
        Reason::DropFragment,
    );

    // An allowed first fragment coming in (TCP 8080 from the VPC).
    let syn = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    let in_fragment = |offset, more| Fragment {
        id: 0x77,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(tag, &syn, in_fragment(0, true), &syn.transport_bytes());
    ct.frame("first fragment in", Ingress, &first, Reason::PassNew);
    let later = frame::ipv4_fragment_frame(tag, &syn, in_fragment(3, false), &[1; 16]);
    ct.frame("later fragment in", Ingress, &later, Reason::PassFragment);
    // The same datagram ID towards another pod belongs to another datagram.
    let to_b = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN);
    let later_b =
        frame::ipv4_fragment_frame(Tag::Vlan(B_VLAN), &to_b, in_fragment(3, false), &[1; 16]);
    ct.frame(
        "later fragment to B",
        Ingress,
        &later_b,
        Reason::DropFragment,
    );
}

#[test]
fn later_fragments_of_a_denied_datagram_are_dropped() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // A admits only TCP 8080: a UDP datagram to 8080 is denied at its first fragment.
    let datagram = udp(VPC_HOST, 5000, A, 8080);
    let fragment = |offset, more| Fragment {
        id: 0x99,
        offset,
        more,
    };
    let mut payload = datagram.transport_bytes();
    payload.resize(16, 0);
    let first = frame::ipv4_fragment_frame(tag, &datagram, fragment(0, true), &payload);
    ct.frame("first fragment", Ingress, &first, Reason::DropPolicy);
    let later = frame::ipv4_fragment_frame(tag, &datagram, fragment(2, false), &[2; 8]);
    ct.frame("later fragment", Ingress, &later, Reason::DropFragment);
    assert_eq!(ct.vlan_flows(A_VLAN), 0);
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_and_matches_no_port_rule() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // Whole, this segment is allowed (TCP 8080 from the VPC) ...
    let syn = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    ct.send(
        "the whole segment",
        A_VLAN,
        Ingress,
        &tcp(VPC_HOST, 40001, A, 8080, TCP_SYN),
        Reason::PassNew,
    );
    // ... but as a later fragment its bytes are not a TCP header, and its first
    // fragment was never seen (lost, or sent after it).
    let fragment = Fragment {
        id: 0x55,
        offset: 1,
        more: false,
    };
    let later = frame::ipv4_fragment_frame(tag, &syn, fragment, &syn.transport_bytes());
    ct.frame(
        "a later fragment that looks like TCP 8080",
        Ingress,
        &later,
        Reason::DropFragment,
    );
    assert!(ct.entry(&ct_key(A_VLAN, Ingress, &syn)).is_none());
    // The first fragment arriving afterwards does not revive the earlier drop, but
    // later fragments after it pass.
    let first = frame::ipv4_fragment_frame(
        tag,
        &syn,
        Fragment {
            offset: 0,
            more: true,
            ..fragment
        },
        &[syn.transport_bytes(), vec![0; 4]].concat(),
    );
    ct.frame("the first fragment, late", Ingress, &first, Reason::PassNew);
    ct.frame(
        "the later fragment again",
        Ingress,
        &later,
        Reason::PassFragment,
    );
}

#[test]
fn other_protocols_are_tracked_by_addresses_for_600_seconds() {
    wait_for_uptime(601);
    let mut ct = Ct::new();
    const GRE: u8 = 47;
    let young = other(A, SERVER, GRE);
    let old = other(A, Ipv4Addr::new(192, 0, 2, 11), GRE);
    for ip in [&young, &old] {
        ct.send("GRE out", A_VLAN, Egress, ip, Reason::PassNew);
        let key = ct_key(A_VLAN, Egress, ip);
        assert_eq!(ct.expect_entry("GRE", &key).state, ct_state::ONE_WAY);
        ct.send(
            "GRE back",
            A_VLAN,
            Ingress,
            &ip.reply(0),
            Reason::PassEstablished,
        );
        assert_eq!(ct.expect_entry("GRE", &key).state, ct_state::BOTH_WAYS);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 590);
    ct.age(&ct_key(A_VLAN, Egress, &old), 601);
    ct.send(
        "GRE back after 590 s",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "GRE back after 601 s",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn removing_a_pod_deletes_its_flows_and_a_reused_vlan_inherits_none() {
    let mut ct = Ct::new();
    let a_syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let b_syn = tcp(B, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &a_syn, Reason::PassNew);
    ct.send(
        "A's query",
        A_VLAN,
        Egress,
        &udp(A, 5000, SERVER, 53),
        Reason::PassNew,
    );
    ct.send("B's SYN", B_VLAN, Egress, &b_syn, Reason::PassNew);
    assert_eq!(ct.vlan_flows(A_VLAN), 2);

    let mut without_a = ct.model.clone();
    without_a.pods.retain(|p| p.vlan != A_VLAN);
    ct.kernel.apply(&without_a);
    assert_eq!(ct.vlan_flows(A_VLAN), 0, "A's flows: {:?}", ct.flows());
    assert_eq!(ct.vlan_flows(B_VLAN), 1);
    let synack = a_syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "A's SYN-ACK, A gone",
        A_VLAN,
        Ingress,
        &synack,
        Reason::DropUnknownVlan,
    );
    ct.send(
        "B's SYN-ACK",
        B_VLAN,
        Ingress,
        &b_syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );

    // A new pod gets the VLAN (and, here, the same address and groups): no old flow.
    ct.kernel.apply(&ct.model);
    ct.send(
        "A's SYN-ACK to the new pod",
        A_VLAN,
        Ingress,
        &synack,
        Reason::DropPolicy,
    );
}

#[test]
fn rule_changes_keep_tracked_flows_and_cut_untracked_ones() {
    let mut ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let client = tcp(CLIENT, 50000, C, 443, TCP_SYN);
    ct.send("to C, untracked", C_VLAN, Ingress, &client, Reason::PassNew);

    let mut changed = ct.model.clone();
    changed.groups.get_mut("sg-app").unwrap().egress.clear();
    changed.groups.get_mut("sg-open").unwrap().ingress.clear();
    ct.kernel.apply(&changed);
    ct.send(
        "A's SYN-ACK",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "A's ACK",
        A_VLAN,
        Egress,
        &tcp(A, 40000, SERVER, 443, TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "A's new flow",
        A_VLAN,
        Egress,
        &tcp(A, 40001, SERVER, 443, TCP_SYN),
        Reason::DropPolicy,
    );
    ct.send(
        "C's client, next segment",
        C_VLAN,
        Ingress,
        &tcp(CLIENT, 50000, C, 443, TCP_ACK),
        Reason::DropPolicy,
    );
}

#[test]
fn a_new_syn_on_a_closed_flow_reopens_it() {
    // The pod reuses its source port for a new connection to the same server
    // while the old one's entry is still closing (within 10 s of the FINs). The
    // SYN is a new connection, judged by the rules again, and the new flow gets
    // the established timeout, as Linux conntrack reopens a closed flow on a
    // SYN, instead of staying on the 10 s closing one.
    let mut ct = Ct::new();
    let (syn, key) = closed(&ct, 40000);
    ct.send("new SYN, same ports", A_VLAN, Egress, &syn, Reason::PassNew);
    ct.send(
        "new SYN-ACK",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "new ACK",
        A_VLAN,
        Egress,
        &tcp(A, 40000, SERVER, 443, TCP_ACK),
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("reopened", &key);
    assert_eq!(
        entry.state,
        ct_state::ESTABLISHED,
        "state after a new handshake"
    );
    // Idle 30 s, far within tcpEstablishedTimeout.
    ct.age(&key, 30);
    ct.send(
        "the server's data after 30 s idle",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
}

/// Audit (`enforcer.sgp.dev/action: audit`): a flow pod A's groups refuse passes
/// as a would-drop under its reason and leaves no entry, and so do the later
/// fragments of a refused datagram; what is not a policy verdict (a spoofed
/// source) still drops. Switching A to enforce (one `PODS` update) drops the
/// refused flow's next packet at once and keeps the flows A's groups allowed.
#[test]
fn an_audited_pod_passes_refused_flows_untracked_until_it_enforces() {
    let mut ct = Ct::new();
    let audit = |ct: &mut Ct, action| {
        ct.model
            .pods
            .iter_mut()
            .find(|p| p.vlan == A_VLAN)
            .unwrap()
            .action = action;
        ct.kernel.apply(&ct.model);
    };
    audit(&mut ct, EnforcingAction::Audit);
    let run = |ct: &Ct, direction, frame: &[u8]| ct.kernel.run(direction, frame);
    let would_drop = |reason| Outcome::expected(reason, true);
    // A admits only TCP 8080 in: UDP to 8080 is refused.
    let refused = udp(VPC_HOST, 5000, A, 8080);
    let refused_frame = frame::ip_frame(Tag::Vlan(A_VLAN), &refused);
    for _ in 0..2 {
        assert_eq!(
            run(&ct, Ingress, &refused_frame),
            would_drop(Reason::DropPolicy)
        );
    }
    assert!(ct.entry(&ct_key(A_VLAN, Ingress, &refused)).is_none());
    let fragment = |offset, more| Fragment {
        id: 0x5a,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(
        Tag::Vlan(A_VLAN),
        &refused,
        fragment(0, true),
        &refused.transport_bytes(),
    );
    assert_eq!(run(&ct, Ingress, &first), would_drop(Reason::DropPolicy));
    let later =
        frame::ipv4_fragment_frame(Tag::Vlan(A_VLAN), &refused, fragment(3, false), &[7; 8]);
    assert_eq!(run(&ct, Ingress, &later), would_drop(Reason::DropFragment));
    let spoofed = frame::ip_frame(Tag::Vlan(A_VLAN), &udp(B, 5000, VPC_HOST, 53));
    assert_eq!(
        run(&ct, Egress, &spoofed),
        Outcome::expected(Reason::DropSpoofed, true)
    );
    assert!(
        !run(&ct, Egress, &spoofed).passed,
        "audit never passes spoofing"
    );
    let allowed = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    ct.send("allowed SYN", A_VLAN, Ingress, &allowed, Reason::PassNew);
    assert_eq!(ct.vlan_flows(A_VLAN), 1, "only the allowed flow is tracked");
    let traffic = ct.kernel.maps.pod_traffic(A_VLAN).expect("POD_TRAFFIC");
    assert_eq!(
        (
            traffic.would_drop_packets,
            traffic.denied_packets,
            traffic.allowed_packets
        ),
        (4, 2, 1)
    );

    audit(&mut ct, EnforcingAction::Enforce);
    assert_eq!(
        run(&ct, Ingress, &refused_frame),
        Outcome::expected(Reason::DropPolicy, false)
    );
    let reply = allowed.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "the allowed flow's reply",
        A_VLAN,
        Egress,
        &reply,
        Reason::PassEstablished,
    );
}

/// Counter totals by reason, for floods run through [`Kernel::passes`].
fn counted(ct: &Kernel) -> BTreeMap<&'static str, u64> {
    let totals = ct.maps.counters().expect("read counters");
    Reason::ALL
        .iter()
        .zip(totals)
        .map(|(reason, total)| (reason.name(), total))
        .collect()
}

fn delta(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .map(|(name, n)| (*name, n - before[name]))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// sg-semantics §4 / EC2's tracked-connection allowance: 300k new flows from pod
/// A (far more than the whole table) leave pod B's established TCP flow and its
/// UDP stream passing; A keeps its allowance of flows and its excess is
/// dropped as `drop_flow_limit`, counted, and A's own flows keep working. The
/// sweep gives the allowance back once the flows expire.
#[test]
fn a_flood_of_new_flows_from_one_pod_never_evicts_another_pods_flows() {
    let mut model = model();
    // Pod B may also ask UDP 53 of anyone; nothing may reach it unasked.
    let locked = model.groups.get_mut("sg-locked").unwrap();
    locked
        .egress
        .push(rule(ports(17, 53, 53), cidr("0.0.0.0/0")));
    let allowance = model.node.max_flows_per_pod;
    assert_eq!(allowance, enforcer_common::DEFAULT_MAX_FLOWS_PER_POD);
    let mut ct = Ct {
        kernel: Kernel::load(&model),
        model,
    };
    // B: an established TCP connection and a UDP stream (two transactions).
    let syn = tcp(B, 41000, SERVER, 443, TCP_SYN);
    ct.send("B SYN", B_VLAN, Egress, &syn, Reason::PassNew);
    let syn_ack = syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "B SYN-ACK",
        B_VLAN,
        Ingress,
        &syn_ack,
        Reason::PassEstablished,
    );
    let ack = tcp(B, 41000, SERVER, 443, TCP_ACK);
    ct.send("B ACK", B_VLAN, Egress, &ack, Reason::PassEstablished);
    let query = udp(B, 53000, SERVER, 53);
    ct.send("B query", B_VLAN, Egress, &query, Reason::PassNew);
    for round in 0..2 {
        ct.send(
            "B answer",
            B_VLAN,
            Ingress,
            &query.reply(0),
            Reason::PassEstablished,
        );
        if round == 0 {
            ct.send(
                "B query again",
                B_VLAN,
                Egress,
                &query,
                Reason::PassEstablished,
            );
        }
    }
    let stream = ct.expect_entry("B's stream", &ct_key(B_VLAN, Egress, &query));
    assert_eq!(stream.state, ct_state::BOTH_WAYS);

    // A: 300k new UDP flows (5 destination ports x 60k source ports).
    let before = counted(&ct.kernel);
    let (mut passed, mut flows) = (0u64, 0u64);
    for dport in 1000..1005u16 {
        for sport in 1..=60_000u16 {
            let f = frame::ip_frame(Tag::Vlan(A_VLAN), &udp(A, sport, SERVER, dport));
            passed += u64::from(ct.kernel.passes(Egress, &f));
            flows += 1;
        }
    }
    let flood = delta(&before, &counted(&ct.kernel));
    eprintln!("flood of {flows} new flows from pod A: {flood:?}");
    let cap = u64::from(allowance);
    assert_eq!(passed, cap, "A's allowance passes, no more");
    assert_eq!(
        flood,
        BTreeMap::from([("pass_new", cap), ("drop_flow_limit", flows - cap)]),
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, cap);
    assert_eq!(ct.vlan_flows(A_VLAN), cap as usize);

    // B's flows are all there and pass, though B's groups let neither in.
    ct.send(
        "B data in",
        B_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
    ct.send(
        "B answer after",
        B_VLAN,
        Ingress,
        &query.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "B query after",
        B_VLAN,
        Egress,
        &query,
        Reason::PassEstablished,
    );
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).flows, 2);
    // B still opens new flows: its allowance is its own.
    ct.send(
        "B new",
        B_VLAN,
        Egress,
        &tcp(B, 41001, SERVER, 443, TCP_SYN),
        Reason::PassNew,
    );
    // A's admitted flows go on; a new one is refused with its own reason.
    ct.send(
        "A old",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 1000),
        Reason::PassEstablished,
    );
    ct.send(
        "A new",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 2000),
        Reason::DropFlowLimit,
    );

    // Once expired and swept, A's slots are its again (B's flows expire too).
    let later = enforcer::observe::events::monotonic().as_nanos() as u64 + 1_000 * NS_PER_SEC;
    let swept = ct.kernel.maps.sweep(later).expect("sweep");
    assert_eq!(swept.flows, cap + 3);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, 0);
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).flows, 0);
    assert!(ct.flows().is_empty());
    ct.send(
        "A new after the sweep",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 2000),
        Reason::PassNew,
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, 1);
}

/// The fragment table has the same allowance per pod: A's flood of first
/// fragments stops at its allowance (`drop_fragment_limit`), B's fragmented
/// datagram still passes whole; the sweep frees A's slots after the
/// reassembly timeout.
#[test]
fn a_flood_of_fragmented_datagrams_from_one_pod_leaves_room_for_another() {
    let mut ct = Ct::new();
    let cap = u64::from(ct.model.node.max_fragments_per_pod);
    let datagram = udp(A, 5000, SERVER, 9999);
    let first_payload = [0u8; 24];
    let first = |id: u16, tag: Tag, ip: &Ip| {
        let fragment = Fragment {
            id,
            offset: 0,
            more: true,
        };
        let mut payload = ip.transport_bytes();
        payload.resize(first_payload.len().max(payload.len()), 0xaa);
        frame::ipv4_fragment_frame(tag, ip, fragment, &payload)
    };
    let before = counted(&ct.kernel);
    let total = cap + 1_000;
    for id in 0..total as u16 {
        ct.kernel
            .passes(Egress, &first(id, Tag::Vlan(A_VLAN), &datagram));
    }
    let flood = delta(&before, &counted(&ct.kernel));
    eprintln!("flood of {total} first fragments from pod A: {flood:?}");
    // One flow: the first fragment creates it, the others are its packets.
    assert_eq!(
        flood,
        BTreeMap::from([
            ("pass_new", 1),
            ("pass_established", cap - 1),
            ("drop_fragment_limit", total - cap),
        ])
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, cap);
    // A retransmitted first fragment reuses its datagram's slot.
    ct.frame(
        "A again",
        Egress,
        &first(0, Tag::Vlan(A_VLAN), &datagram),
        Reason::PassEstablished,
    );
    // B's datagram: first and later fragment pass.
    let b = tcp(B, 40000, SERVER, 443, TCP_SYN);
    ct.frame(
        "B first",
        Egress,
        &first(7, Tag::Vlan(B_VLAN), &b),
        Reason::PassNew,
    );
    let later = Fragment {
        id: 7,
        offset: 3,
        more: false,
    };
    let b_later = frame::ipv4_fragment_frame(Tag::Vlan(B_VLAN), &b, later, &[1; 16]);
    ct.frame("B later", Egress, &b_later, Reason::PassFragment);
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).fragments, 1);

    let now = enforcer::observe::events::monotonic().as_nanos() as u64;
    let swept = ct.kernel.maps.sweep(now).expect("sweep");
    assert_eq!(
        swept.fragments, 0,
        "nothing is older than the reassembly timeout yet"
    );
    let swept = ct.kernel.maps.sweep(now + 61 * NS_PER_SEC).expect("sweep");
    assert_eq!(swept.fragments, cap + 1);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, 0);
    // The flow expired with its datagrams (UDP timeout 45 s): a new flow.
    let fresh = first(u16::MAX, Tag::Vlan(A_VLAN), &datagram);
    ct.frame("A after the sweep", Egress, &fresh, Reason::PassNew);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, 1);
}
