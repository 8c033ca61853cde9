//! The hand-built model, its pods and peers, and helpers to drive the kernel and read its table.

pub use std::collections::{BTreeMap, BTreeSet};
pub use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use enforcer::model::{
    BranchPod, Cidr, ConntrackTimeouts, Direction, EnforcingAction, EnforcingMode, L4Match, Model,
    NodeConfig, Peer, Rule, SecurityGroup, UnknownVlanAction,
};
pub use enforcer::policy::eval::{self, L4Query, Query, RuleRef};
pub use enforcer_common::{CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, Reason, ct_flag, ct_state};
pub use enforcer_tests::frame::{
    self, Fragment, Ip, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tag, other, tcp, udp,
};
pub use enforcer_tests::kernel::{Kernel, Outcome};
pub use enforcer_tests::oracle::{ct_key, l4_packet};

pub use Direction::{Egress, Ingress};

pub const TCP_PSH: u8 = 0x08;
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Flows are stamped with CLOCK_MONOTONIC (time since boot), so a flow can be
/// aged by `seconds` only once the machine has been up longer than that: on a
/// freshly booted machine (CI), wait for it before the test makes its flows.
pub fn wait_for_uptime(seconds: u64) {
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
pub const TCP_ESTABLISHED_TIMEOUT: u64 = 350;
pub const UDP_STREAM_TIMEOUT: u64 = 90;
pub const UDP_TIMEOUT: u64 = 45;

/// Pod A (`sg-app`): ingress TCP 8080 from the VPC; egress everything.
pub const A_VLAN: u16 = 10;
pub const A: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 10);
pub const A6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f00, 0, 0, 0, 0, 0, 0xa);
/// Pod B (`sg-locked`): ingress TCP 8080 from the VPC; egress TCP 443 only.
pub const B_VLAN: u16 = 11;
pub const B: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 11);
/// Pod C (`sg-open`): everything from and to 0.0.0.0/0 and ::/0.
pub const C_VLAN: u16 = 12;
pub const C: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 12);
pub const C6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f00, 0, 0, 0, 0, 0, 0xc);
/// Pod D (`sg-half`): ingress all TCP ports from 0.0.0.0/0; egress TCP 443 and UDP 53 to 0.0.0.0/0.
pub const D_VLAN: u16 = 13;
pub const D: Ipv4Addr = Ipv4Addr::new(10, 0, 64, 13);

/// Peers: a server outside the VPC, a host in the VPC, routers on the path.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 5);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

pub fn cidr(s: &str) -> Peer {
    Peer::Cidr(s.parse::<Cidr>().unwrap())
}

pub fn rule(l4: L4Match, peer: Peer) -> Rule {
    Rule {
        l4,
        peer,
        description: None,
    }
}

pub fn ports(protocol: u8, from: u16, to: u16) -> L4Match {
    L4Match::Ports { protocol, from, to }
}

pub fn group(id: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        id: id.to_string(),
        name: id.to_string(),
        description: String::new(),
        tags: BTreeMap::new(),
        ingress,
        egress,
    }
}

pub fn pod(name: &str, vlan: u16, ipv4: Ipv4Addr, ipv6: Ipv6Addr, group: &str) -> BranchPod {
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

pub fn model() -> Model {
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
            audit_namespaces: Vec::new(),
            tcp_early_demux_disabled: false,
            max_flows_per_pod: enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
            max_fragments_per_pod: enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
        },
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        prefix_lists: BTreeMap::new(),
        members,
        pods,
        node_local,
        findings: Vec::new(),
        nlb_groups: Default::default(),
        cluster: Default::default(),
    }
}

pub fn icmp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, icmp_type: u8, id: u16) -> Ip {
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
pub struct Ct {
    pub model: Model,
    pub kernel: Kernel,
}

impl Ct {
    pub fn new() -> Self {
        let model = model();
        let kernel = Kernel::load(&model);
        Self { model, kernel }
    }

    /// Runs a built frame and checks the reason the kernel gives.
    pub fn frame(&self, what: &str, direction: Direction, frame: &[u8], reason: Reason) {
        let outcome = self.kernel.run(direction, frame);
        assert_eq!(outcome.reason, reason, "{what}: {direction:?}");
        assert_eq!(outcome.passed, !reason.is_drop(), "{what}");
    }

    /// Runs `ip` tagged `vlan` and checks the reason.
    pub fn send(&self, what: &str, vlan: u16, direction: Direction, ip: &Ip, reason: Reason) {
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
    pub fn assert_tracking(&self, what: &str, vlan: u16, cases: &[(Direction, Ip, bool)]) {
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

    pub fn flows(&self) -> Vec<(CtKey, CtEntry)> {
        self.kernel.maps.flows().expect("read conntrack")
    }

    pub fn entry(&self, key: &CtKey) -> Option<CtEntry> {
        self.flows()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e)
    }

    pub fn expect_entry(&self, what: &str, key: &CtKey) -> CtEntry {
        self.entry(key)
            .unwrap_or_else(|| panic!("{what}: no conntrack entry for {key:?}"))
    }

    pub fn vlan_flows(&self, vlan: u16) -> usize {
        self.flows().iter().filter(|(k, _)| k.vlan == vlan).count()
    }

    /// Pretends the flow has been idle `seconds` longer than it has (moves its
    /// CLOCK_MONOTONIC stamp back: see [`wait_for_uptime`]).
    pub fn age(&mut self, key: &CtKey, seconds: u64) {
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

    pub fn rule_of(&self, entry: &CtEntry) -> Option<&RuleRef> {
        self.kernel.compiled.rule(entry.rule)
    }

    /// The reference evaluator on `ip` as a new flow of the pod on `vlan`.
    pub fn evaluate(&self, vlan: u16, direction: Direction, ip: &Ip) -> eval::Evaluation {
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

pub fn rref(group: &str, direction: Direction, index: usize) -> RuleRef {
    RuleRef {
        group_id: group.to_string(),
        direction,
        index,
    }
}

/// Opens A:`port` -> SERVER:443 (SYN out, SYN-ACK in); returns the SYN and its key.
pub fn handshake(ct: &Ct, port: u16) -> (Ip, CtKey) {
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
pub fn closed(ct: &Ct, port: u16) -> (Ip, CtKey) {
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
