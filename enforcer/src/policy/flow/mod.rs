//! A deterministic model of the kernel's connection tracker (sg-semantics.md §4), driven by
//! explicit timestamps: what the fast path's `CONNTRACK` map must do, packet by packet.
//!
//! Per packet of a pod (VLAN), in this order:
//! 1. Key: [`CtKey`] = (VLAN, protocol, pod address, peer address, pod port, peer port),
//!    normalised to the pod so both directions find one entry. TCP/UDP: the ports; ICMP echo
//!    (v4 types 8/0, v6 128/129): pod port = echo identifier, peer port 0; anything else 0/0.
//!    Addresses are 16 bytes, IPv4 as `::ffff:a.b.c.d`.
//! 2. Live entry (`now - last_seen <= timeout(state)`): pass, record the packet (flags,
//!    state, last seen, counters of its direction). Rules are not consulted: changing a rule
//!    does not cut a tracked flow. Except a SYN without ACK on a CLOSING TCP entry: a new
//!    connection reusing the ports, handled as a miss (step 4).
//! 3. ICMP error (v4 types 3, 4, 11, 12; v6 types 1 to 4) whose embedded header is a live
//!    flow of this pod: pass, nothing recorded (errors do not keep a flow alive). The
//!    embedded packet travelled the other way: an error reaching the pod reports on a packet
//!    the pod sent (pod = embedded source), an error the pod sends on one it received.
//! 4. Otherwise (miss, expired, or an unrelated error) evaluate as a new flow
//!    ([`crate::policy::eval::evaluate`]). Denied: drop, nothing recorded (an audited pod
//!    passes it as "would drop", still recording nothing). Allowed and untracked
//!    (untracked rules, never-filtered traffic, same-node): pass, no entry. Allowed and
//!    tracked: create (or overwrite an expired) entry with the packet recorded, the
//!    direction of origin and the lowest allowing rule of each side.
//! 5. Source NAT (standard mode, sg-semantics.md §6): an allowed new flow the evaluator
//!    translates ([`Evaluation::nat`]), unless its packet is a first fragment (the
//!    fragments that follow could not be translated), is tracked whatever its rules, and maps to a port of
//!    `snatPortRange` before its entry is made: the port of its own (expired or reopened)
//!    entry if that mapping is still its own, else the first free of
//!    [`NatSettings::candidate_port`]'s `min(range, NAT_PROBES)` candidates. None
//!    free: [`FlowVerdict::NatExhausted`], nothing recorded. A mapping taken for a flow then
//!    refused by the allowance is given back. Mappings leave with their entries. The pod's
//!    packets of a translated flow, and the errors it sends about one (step 3), leave
//!    translated to the port its entry holds.
//!
//! Recording a packet: set `SEEN_<direction>`, and for TCP FIN set `FIN_<direction>`; then
//! TCP: CLOSING if already CLOSING, or the packet has RST, or both FIN bits are set; else
//! ESTABLISHED if both SEEN bits are set; else OPENING. UDP counts request-response
//! transactions by the packet's side (the origin's or the other): ONE_WAY until a response,
//! then ANSWERED (one transaction); a packet from the origin after that is ASKED_AGAIN, and
//! its response makes BOTH_WAYS, a stream (more than one transaction), which it stays. Other
//! protocols: BOTH_WAYS if both SEEN bits are set, else ONE_WAY. CLOSING is final for the
//! entry (until a new SYN, above).
//!
//! Idle timeouts: TCP OPENING `ct_timeouts::TCP_OPENING`, ESTABLISHED the node's
//! `tcp_established`, CLOSING `ct_timeouts::TCP_CLOSING`; UDP BOTH_WAYS (a stream) the
//! node's `udp_stream`, every other UDP state `udp`; ICMP/ICMPv6 `ct_timeouts::ICMP`; others `ct_timeouts::OTHER`.

mod entry;
mod packet;

use std::collections::BTreeMap;

use enforcer_common::{CtKey, NatKey, NatSettings, nat_port_hash};

pub use entry::{CtState, FlowEntry, kernel_entry_live, timeout_secs};
pub use packet::{EmbeddedHeader, PacketMeta, embedded_key, flow_key, tcp_flags};

use crate::model::{BranchPod, ConntrackTimeouts, Model};
use crate::policy::eval::{self, Evaluation, L4Query, Query};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    /// A packet of a live tracked flow; its state after the packet.
    Established(CtState),
    /// An ICMP error about a live tracked flow of this pod.
    Related,
    /// The first packet of an allowed flow; `tracked`: an entry was created.
    New {
        evaluation: Evaluation,
        tracked: bool,
    },
    /// A packet of a flow the groups deny. It creates no entry: on an audited pod
    /// it passes ([`Evaluation::would_deny`]) and the next packet is judged again, so
    /// switching the pod to enforce drops the flow's next packet.
    Denied(Evaluation),
    /// The first packet of a flow the rules allow, dropped because the pod holds
    /// its whole allowance of entries (`maxFlowsPerPod`): nothing recorded.
    OverLimit(Evaluation),
    /// The first packet of a flow the rules allow and standard mode translates,
    /// dropped because no port of `snatPortRange` was free for it.
    NatExhausted(Evaluation),
}

impl FlowVerdict {
    /// Whether the groups (or the tracker) admit the packet.
    pub fn allowed(&self) -> bool {
        !matches!(
            self,
            Self::Denied(_) | Self::OverLimit(_) | Self::NatExhausted(_)
        )
    }

    /// Whether the packet passes: admitted, or denied on an audited pod (the
    /// allowance is no policy verdict: audit never passes a flow over it).
    pub fn passes(&self) -> bool {
        match self {
            Self::Denied(evaluation) => evaluation.would_deny(),
            Self::OverLimit(_) | Self::NatExhausted(_) => false,
            _ => true,
        }
    }
}

/// The connection tracker of a node: every pod's flows, keyed by VLAN and tuple.
/// Like the kernel's table, entries stay until [`FlowTable::expire`] (the
/// agent's sweep) or [`FlowTable::remove_vlan`] removes them, and each counts
/// against its pod's allowance until then, expired or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    entries: BTreeMap<CtKey, FlowEntry>,
    /// Entries per VLAN.
    held: BTreeMap<u16, u32>,
    /// Source NAT mappings: the translated tuple -> the pod's flow.
    nat: BTreeMap<NatKey, CtKey>,
}

/// The mapping key of `flow` translated to `nat_port` (the kernel's `NAT_PORTS` key).
pub fn nat_key(flow: &CtKey, nat_port: u16) -> NatKey {
    NatKey {
        peer_addr: [
            flow.peer_addr[12],
            flow.peer_addr[13],
            flow.peer_addr[14],
            flow.peer_addr[15],
        ],
        peer_port: flow.peer_port,
        nat_port,
        protocol: flow.protocol,
        _pad: [0; 3],
    }
}

impl FlowTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one packet of `pod` at time `now_ns` (see the module documentation).
    pub fn process(
        &mut self,
        model: &Model,
        pod: &BranchPod,
        packet: PacketMeta,
        now_ns: u64,
    ) -> FlowVerdict {
        let timeouts = &model.node.connection_tracking;
        let key = flow_key(pod.vlan, &packet);
        if let Some(entry) = self.entries.get_mut(&key)
            && entry.live(key.protocol, timeouts, now_ns)
            && !entry.reopened_by(key.protocol, &packet)
        {
            entry.record(key.protocol, &packet, now_ns);
            return FlowVerdict::Established(entry.state);
        }
        if packet.is_icmp_error()
            && let Some(embedded) = &packet.embedded
        {
            let related = embedded_key(pod.vlan, packet.direction, embedded);
            let live = self
                .entries
                .get(&related)
                .is_some_and(|e| e.live(related.protocol, timeouts, now_ns));
            if live {
                return FlowVerdict::Related;
            }
        }
        let (_, peer) = packet.pod_and_peer();
        let query = Query {
            direction: packet.direction,
            peer,
            l4: L4Query::Packet(packet.l4()),
        };
        let evaluation = eval::evaluate(model, pod, &query);
        if !evaluation.allowed {
            return FlowVerdict::Denied(evaluation);
        }
        let translated = evaluation.nat.is_some() && !packet.first_fragment;
        let tracked = !evaluation.untracked || translated;
        let nat_port = if translated {
            match self.map_port(model, &key) {
                Some(port) => port,
                None => return FlowVerdict::NatExhausted(evaluation),
            }
        } else {
            0
        };
        if tracked {
            // The flow's own (expired or reopened) entry is overwritten at no cost;
            // a new one needs room in the pod's allowance.
            let held = self.held.get(&pod.vlan).copied().unwrap_or(0);
            if !self.entries.contains_key(&key) {
                if held >= model.node.max_flows_per_pod {
                    if nat_port != 0 {
                        self.nat.remove(&nat_key(&key, nat_port));
                    }
                    return FlowVerdict::OverLimit(evaluation);
                }
                self.held.insert(pod.vlan, held + 1);
            }
            let mut entry = FlowEntry {
                created_ns: now_ns,
                last_seen_ns: now_ns,
                packets: [0; 2],
                bytes: [0; 2],
                rule: evaluation.branch.first().cloned(),
                primary_rule: evaluation.primary.first().cloned(),
                state: CtState::next(None, key.protocol, 0, 0, true),
                origin: packet.direction,
                flags: 0,
                nat_port,
            };
            entry.record(key.protocol, &packet, now_ns);
            self.entries.insert(key, entry);
        }
        FlowVerdict::New {
            evaluation,
            tracked,
        }
    }

    /// The port a translated new flow `key` leaves from: its own entry's, if
    /// that mapping is still its own, else the first free candidate (taken).
    fn map_port(&mut self, model: &Model, key: &CtKey) -> Option<u16> {
        if let Some(entry) = self.entries.get(key)
            && entry.nat_port != 0
            && self.nat.get(&nat_key(key, entry.nat_port)) == Some(key)
        {
            return Some(entry.nat_port);
        }
        let range = &model.node.snat_port_range;
        let ports = NatSettings {
            port_first: *range.start(),
            port_last: *range.end(),
            ..NatSettings::default()
        };
        let hash = nat_port_hash(key);
        (0..ports.probes())
            .map(|attempt| ports.candidate_port(hash, attempt))
            .find(|&port| {
                let mapping = nat_key(key, port);
                let free = !self.nat.contains_key(&mapping);
                if free {
                    self.nat.insert(mapping, *key);
                }
                free
            })
    }

    pub fn get(&self, key: &CtKey) -> Option<&FlowEntry> {
        self.entries.get(key)
    }

    /// The pod's flow a translated tuple maps to.
    pub fn nat_target(&self, key: &NatKey) -> Option<&CtKey> {
        self.nat.get(key)
    }

    /// Every source NAT mapping.
    pub fn nat_mappings(&self) -> &BTreeMap<NatKey, CtKey> {
        &self.nat
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries the pod on `vlan` holds against its allowance.
    pub fn held(&self, vlan: u16) -> u32 {
        self.held.get(&vlan).copied().unwrap_or(0)
    }

    /// Forgets every flow of a VLAN: a deleted pod's flows must not serve its VLAN's next pod.
    pub fn remove_vlan(&mut self, vlan: u16) {
        self.entries.retain(|key, _| key.vlan != vlan);
        self.held.remove(&vlan);
        self.nat.retain(|_, flow| flow.vlan != vlan);
    }

    /// Drops the entries idle past their timeout at `now_ns` (the agent's sweep).
    pub fn expire(&mut self, timeouts: &ConntrackTimeouts, now_ns: u64) {
        self.entries
            .retain(|key, entry| entry.live(key.protocol, timeouts, now_ns));
        self.held.clear();
        for key in self.entries.keys() {
            *self.held.entry(key.vlan).or_default() += 1;
        }
        let entries = &self.entries;
        self.nat.retain(|mapping, flow| {
            entries
                .get(flow)
                .is_some_and(|entry| entry.nat_port == mapping.nat_port)
        });
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::{DIR_EGRESS, ct_flag, ct_state};

    use super::entry::NS_PER_SEC;
    use super::tcp_flags::{ACK, FIN, RST, SYN};
    use super::*;
    use crate::compile::compile;
    use crate::model::{Direction, EnforcingMode, L4Match, SecurityGroup};
    use crate::policy::eval::Reason;
    use crate::policy::eval::fixtures::*;
    use crate::policy::eval::{PROTO_ICMP, PROTO_TCP};

    const IN: Direction = Direction::Ingress;
    const OUT: Direction = Direction::Egress;
    const SEC: u64 = NS_PER_SEC;

    /// Pod 5 (10.0.64.5): ingress TCP 80 from 10.1/16; egress UDP 53 and ICMP echo to
    /// 192.0.2.0/24, GRE to 203.0.113.0/24. Pod 6 (10.0.64.6): nothing allowed.
    fn setup() -> Model {
        let web = group(
            "sg-web",
            vec![rule(tcp(80, 80), cidr("10.1.0.0/16"))],
            vec![
                rule(udp(53, 53), cidr("192.0.2.0/24")),
                rule(
                    L4Match::Icmp {
                        v6: false,
                        icmp_type: Some(8),
                        code: None,
                    },
                    cidr("192.0.2.0/24"),
                ),
                rule(L4Match::Protocol(47), cidr("203.0.113.0/24")),
                rule(tcp(443, 443), cidr("192.0.2.0/24")),
            ],
        );
        let mut m = model(
            vec![web, group("sg-none", vec![], vec![])],
            vec![
                pod(5, "10.0.64.5", &["sg-web"], EnforcingMode::Strict),
                pod(6, "10.0.64.6", &["sg-none"], EnforcingMode::Strict),
            ],
        );
        m.node.connection_tracking = ConntrackTimeouts {
            tcp_established: 100,
            udp_stream: 90,
            udp: 30,
        };
        m
    }

    fn pod5(m: &Model) -> &BranchPod {
        &m.pods[0]
    }

    fn web_tcp(direction: Direction, flags: u8) -> PacketMeta {
        let (pod, peer) = (ip("10.0.64.5"), ip("10.1.2.3"));
        match direction {
            IN => PacketMeta::tcp(IN, peer, pod, 40000, 80, flags),
            OUT => PacketMeta::tcp(OUT, pod, peer, 80, 40000, flags),
        }
    }

    fn state(verdict: &FlowVerdict) -> Option<CtState> {
        match verdict {
            FlowVerdict::Established(state) => Some(*state),
            _ => None,
        }
    }

    #[test]
    fn tcp_handshake_reply_and_close() {
        let m = setup();
        let mut t = FlowTable::new();
        let v = t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        assert!(matches!(v, FlowVerdict::New { tracked: true, .. }), "{v:?}");
        let key = flow_key(5, &web_tcp(IN, SYN));
        assert_eq!(key, flow_key(5, &web_tcp(OUT, SYN | ACK)));
        let e = t.get(&key).unwrap();
        assert_eq!((e.state, e.origin), (CtState::Opening, IN));
        assert_eq!(e.rule.as_ref().unwrap().group_id, "sg-web");
        assert_eq!(e.primary_rule, None);

        // The reply passes on the entry alone: sg-web has no egress rule for it.
        let v = t.process(&m, pod5(&m), web_tcp(OUT, SYN | ACK), SEC);
        assert_eq!(state(&v), Some(CtState::Established));
        let v = t.process(&m, pod5(&m), web_tcp(IN, ACK), 2 * SEC);
        assert_eq!(state(&v), Some(CtState::Established));
        let e = t.get(&key).unwrap();
        assert_eq!((e.packets, e.bytes), ([2, 1], [200, 100]));
        assert_eq!((e.created_ns, e.last_seen_ns), (0, 2 * SEC));

        // Established lives the node's tcp_established (100 s) from the last packet.
        let v = t.process(&m, pod5(&m), web_tcp(OUT, ACK), 102 * SEC);
        assert_eq!(state(&v), Some(CtState::Established));

        let v = t.process(&m, pod5(&m), web_tcp(OUT, FIN | ACK), 103 * SEC);
        assert_eq!(state(&v), Some(CtState::Established));
        let v = t.process(&m, pod5(&m), web_tcp(IN, FIN | ACK), 104 * SEC);
        assert_eq!(state(&v), Some(CtState::Closing));
        let v = t.process(&m, pod5(&m), web_tcp(OUT, ACK), 114 * SEC);
        assert_eq!(state(&v), Some(CtState::Closing));
        // Closing: 10 s after the last packet the reply direction is judged anew, and denied.
        let v = t.process(&m, pod5(&m), web_tcp(OUT, ACK), 124 * SEC + 1);
        assert!(matches!(v, FlowVerdict::Denied(_)), "{v:?}");
    }

    #[test]
    fn an_audited_pod_passes_refused_packets_without_tracking_them() {
        let mut m = setup();
        m.pods[0].action = crate::model::EnforcingAction::Audit;
        let mut t = FlowTable::new();
        let ssh = |direction, flags| match direction {
            IN => PacketMeta::tcp(IN, ip("10.1.2.3"), ip("10.0.64.5"), 40001, 22, flags),
            _ => PacketMeta::tcp(OUT, ip("10.0.64.5"), ip("10.1.2.3"), 22, 40001, flags),
        };
        // Refused both ways (no rule for 22 in, nor for its replies out): passed, untracked.
        for (direction, flags) in [(IN, SYN), (OUT, SYN | ACK), (IN, ACK)] {
            let v = t.process(&m, pod5(&m), ssh(direction, flags), SEC);
            assert!(
                matches!(&v, FlowVerdict::Denied(e) if e.would_deny()),
                "{v:?}"
            );
            assert!(v.passes() && !v.allowed());
        }
        assert!(t.is_empty(), "a would-drop creates no entry");
        // An allowed flow of the audited pod is tracked as ever.
        assert!(matches!(
            t.process(&m, pod5(&m), web_tcp(IN, SYN), SEC),
            FlowVerdict::New { tracked: true, .. }
        ));
        // Enforce again: the refused flow's next packet drops, the allowed flow lives on.
        m.pods[0].action = crate::model::EnforcingAction::Enforce;
        let v = t.process(&m, pod5(&m), ssh(IN, ACK), 2 * SEC);
        assert!(!v.passes(), "{v:?}");
        let v = t.process(&m, pod5(&m), web_tcp(OUT, SYN | ACK), 2 * SEC);
        assert_eq!(state(&v), Some(CtState::Established));
    }

    #[test]
    fn tcp_timeouts_by_state() {
        let m = setup();
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        // Opening: 60 s, inclusive.
        assert!(
            t.process(&m, pod5(&m), web_tcp(IN, SYN), 60 * SEC)
                .allowed()
        );
        let late = t.process(&m, pod5(&m), web_tcp(OUT, SYN | ACK), 120 * SEC + 1);
        assert!(!late.allowed());

        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        t.process(&m, pod5(&m), web_tcp(OUT, SYN | ACK), 0);
        assert!(
            t.process(&m, pod5(&m), web_tcp(OUT, ACK), 100 * SEC)
                .allowed()
        );
        assert!(
            !t.process(&m, pod5(&m), web_tcp(OUT, ACK), 200 * SEC + 1)
                .allowed()
        );

        // Any RST closes at once.
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        let v = t.process(&m, pod5(&m), web_tcp(OUT, RST | ACK), SEC);
        assert_eq!(state(&v), Some(CtState::Closing));
        assert!(
            !t.process(&m, pod5(&m), web_tcp(OUT, ACK), 11 * SEC + 1)
                .allowed()
        );
    }

    #[test]
    fn expired_entries_are_judged_again_with_the_rules() {
        let m = setup();
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        // A new SYN after expiry is a new flow the rules allow.
        let v = t.process(&m, pod5(&m), web_tcp(IN, SYN), 61 * SEC);
        assert!(matches!(v, FlowVerdict::New { tracked: true, .. }));
        assert_eq!(
            t.get(&flow_key(5, &web_tcp(IN, SYN))).unwrap().created_ns,
            61 * SEC
        );
    }

    #[test]
    fn udp_request_response_and_stream() {
        let m = setup();
        let (pod, dns) = (ip("10.0.64.5"), ip("192.0.2.53"));
        let query = PacketMeta::udp(OUT, pod, dns, 33000, 53);
        let answer = PacketMeta::udp(IN, dns, pod, 53, 33000);
        let mut t = FlowTable::new();
        assert!(matches!(
            t.process(&m, pod5(&m), query, 0),
            FlowVerdict::New { tracked: true, .. }
        ));
        assert_eq!(t.get(&flow_key(5, &query)).unwrap().state, CtState::OneWay);
        // One way: the node's udp timeout (30 s).
        let v = t.process(&m, pod5(&m), answer, 30 * SEC);
        assert_eq!(state(&v), Some(CtState::Answered));
        // One request and its response are no stream: still 30 s.
        assert!(t.process(&m, pod5(&m), answer, 60 * SEC).allowed());
        assert!(!t.process(&m, pod5(&m), answer, 90 * SEC + 1).allowed());

        // A second transaction makes a stream: udp_stream (90 s).
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), query, 0);
        t.process(&m, pod5(&m), answer, SEC);
        let v = t.process(&m, pod5(&m), query, 2 * SEC);
        assert_eq!(state(&v), Some(CtState::AskedAgain));
        let v = t.process(&m, pod5(&m), query, 3 * SEC);
        assert_eq!(state(&v), Some(CtState::AskedAgain));
        let v = t.process(&m, pod5(&m), answer, 4 * SEC);
        assert_eq!(state(&v), Some(CtState::BothWays));
        let v = t.process(&m, pod5(&m), query, 5 * SEC);
        assert_eq!(state(&v), Some(CtState::BothWays));
        assert!(t.process(&m, pod5(&m), answer, 95 * SEC).allowed());
        assert!(!t.process(&m, pod5(&m), answer, 185 * SEC + 1).allowed());

        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), query, 0);
        let v = t.process(&m, pod5(&m), answer, 30 * SEC + 1);
        assert!(matches!(v, FlowVerdict::Denied(_)));
        // A different peer port is another flow.
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), query, 0);
        let other = PacketMeta::udp(IN, dns, pod, 54, 33000);
        assert!(!t.process(&m, pod5(&m), other, SEC).allowed());
    }

    #[test]
    fn icmp_echo_is_keyed_by_identifier() {
        let m = setup();
        let (pod, peer) = (ip("10.0.64.5"), ip("192.0.2.7"));
        let request = PacketMeta::icmp(OUT, pod, peer, 8, 0, 77);
        let reply = PacketMeta::icmp(IN, peer, pod, 0, 0, 77);
        let mut t = FlowTable::new();
        assert!(t.process(&m, pod5(&m), request, 0).allowed());
        let key = flow_key(5, &request);
        assert_eq!((key.pod_port, key.peer_port), (77, 0));
        assert_eq!(key, flow_key(5, &reply));
        let v = t.process(&m, pod5(&m), reply, SEC);
        assert_eq!(state(&v), Some(CtState::BothWays));
        let stranger = PacketMeta::icmp(IN, peer, pod, 0, 0, 78);
        assert!(!t.process(&m, pod5(&m), stranger, SEC).allowed());
        // ICMP lives 30 s and is always tracked.
        assert!(t.process(&m, pod5(&m), reply, 31 * SEC).allowed());
        assert!(!t.process(&m, pod5(&m), reply, 61 * SEC + 1).allowed());
    }

    #[test]
    fn icmp_errors_about_tracked_flows_are_related() {
        let m = setup();
        let (pod, server, router) = (ip("10.0.64.5"), ip("192.0.2.9"), ip("198.51.100.1"));
        let syn = PacketMeta::tcp(OUT, pod, server, 41000, 443, SYN);
        let embedded = EmbeddedHeader {
            src: pod,
            dst: server,
            protocol: PROTO_TCP,
            src_port: 41000,
            dst_port: 443,
            icmp_type: 0,
            icmp_id: 0,
        };
        let unreachable = PacketMeta {
            embedded: Some(embedded),
            ..PacketMeta::icmp(IN, router, pod, 3, 1, 0)
        };
        let mut t = FlowTable::new();
        // Before the flow exists the error is ordinary ICMP, which no rule allows.
        assert!(!t.process(&m, pod5(&m), unreachable, 0).allowed());
        t.process(&m, pod5(&m), syn, 0);
        assert_eq!(
            t.process(&m, pod5(&m), unreachable, SEC),
            FlowVerdict::Related
        );
        // Related errors record nothing.
        assert_eq!(t.get(&flow_key(5, &syn)).unwrap().last_seen_ns, 0);
        // Another flow's header, an error on another pod, or a non-error type: not related.
        let other = EmbeddedHeader {
            dst_port: 444,
            ..embedded
        };
        let unrelated = PacketMeta {
            embedded: Some(other),
            ..unreachable
        };
        assert!(!t.process(&m, pod5(&m), unrelated, SEC).allowed());
        let to_pod6 = PacketMeta {
            dst: ip("10.0.64.6"),
            ..unreachable
        };
        assert!(!t.process(&m, &m.pods[1], to_pod6, SEC).allowed());
        let not_error = PacketMeta {
            icmp_type: 5,
            ..unreachable
        };
        assert!(!t.process(&m, pod5(&m), not_error, SEC).allowed());

        // An error about an echo, and an error the pod sends about a flow it received.
        let ping = PacketMeta::icmp(OUT, pod, server, 8, 0, 9);
        t.process(&m, pod5(&m), ping, 0);
        let ttl = PacketMeta {
            embedded: Some(EmbeddedHeader {
                src: pod,
                dst: server,
                protocol: PROTO_ICMP,
                src_port: 0,
                dst_port: 0,
                icmp_type: 8,
                icmp_id: 9,
            }),
            ..PacketMeta::icmp(IN, router, pod, 11, 0, 0)
        };
        assert_eq!(t.process(&m, pod5(&m), ttl, SEC), FlowVerdict::Related);
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        let port_unreachable = PacketMeta {
            embedded: Some(EmbeddedHeader {
                src: ip("10.1.2.3"),
                dst: pod,
                protocol: PROTO_TCP,
                src_port: 40000,
                dst_port: 80,
                icmp_type: 0,
                icmp_id: 0,
            }),
            ..PacketMeta::icmp(OUT, pod, ip("10.1.2.3"), 3, 3, 0)
        };
        assert_eq!(
            t.process(&m, pod5(&m), port_unreachable, SEC),
            FlowVerdict::Related
        );
    }

    #[test]
    fn flows_never_admit_traffic_to_another_pod() {
        let m = setup();
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        // Pod 6's VLAN carrying the same tuple (even with pod 5's address) is another key.
        let pod6 = &m.pods[1];
        let spoofed = web_tcp(OUT, SYN | ACK);
        assert_ne!(flow_key(6, &spoofed), flow_key(5, &spoofed));
        assert!(!t.process(&m, pod6, spoofed, SEC).allowed());
        let to_pod6 = PacketMeta::tcp(IN, ip("10.1.2.3"), ip("10.0.64.6"), 40000, 80, ACK);
        assert!(!t.process(&m, pod6, to_pod6, SEC).allowed());
        // A deleted pod's flows go with it.
        t.remove_vlan(5);
        assert!(t.is_empty());
    }

    #[test]
    fn untracked_and_unfiltered_flows_leave_no_entry() {
        let open: SecurityGroup = group(
            "sg-open",
            vec![rule(tcp(443, 443), cidr("0.0.0.0/0"))],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        let mut m = model(
            vec![open],
            vec![pod(5, "10.0.64.5", &["sg-open"], EnforcingMode::Strict)],
        );
        let mut t = FlowTable::new();
        let syn = PacketMeta::tcp(IN, ip("192.0.2.1"), ip("10.0.64.5"), 5000, 443, SYN);
        let v = t.process(&m, &m.pods[0], syn, 0);
        assert!(
            matches!(v, FlowVerdict::New { tracked: false, .. }),
            "{v:?}"
        );
        let dns = PacketMeta::udp(OUT, ip("10.0.64.5"), ip("10.0.0.2"), 5000, 53);
        let v = t.process(&m, &m.pods[0], dns, 0);
        let FlowVerdict::New {
            evaluation,
            tracked,
        } = v
        else {
            panic!("{v:?}");
        };
        assert!(!tracked);
        assert!(matches!(evaluation.reason, Reason::Unfiltered(_)));
        // ICMP is always tracked.
        let ping = PacketMeta::icmp(OUT, ip("10.0.64.5"), ip("192.0.2.1"), 8, 0, 1);
        assert!(matches!(
            t.process(&m, &m.pods[0], ping, 0),
            FlowVerdict::New { tracked: true, .. }
        ));
        assert_eq!(t.len(), 1);

        // Untracked flows are cut as soon as their rule goes; tracked ones are not.
        m.groups.get_mut("sg-open").unwrap().ingress.clear();
        assert!(!t.process(&m, &m.pods[0], syn, SEC).allowed());
        let pong = PacketMeta::icmp(IN, ip("192.0.2.1"), ip("10.0.64.5"), 0, 0, 1);
        m.groups.get_mut("sg-open").unwrap().egress.clear();
        assert!(t.process(&m, &m.pods[0], pong, SEC).allowed());
    }

    #[test]
    fn a_pod_holds_at_most_its_allowance_and_never_takes_another_pods_room() {
        let mut m = setup();
        m.node.max_flows_per_pod = 3;
        m.groups.get_mut("sg-none").unwrap().egress = vec![rule(udp(53, 53), cidr("192.0.2.0/24"))];
        let (pod5_addr, pod6_addr, dns) = (ip("10.0.64.5"), ip("10.0.64.6"), ip("192.0.2.53"));
        let query = |pod, port| PacketMeta::udp(OUT, pod, dns, port, 53);
        let mut t = FlowTable::new();
        for port in 1..=3 {
            assert!(matches!(
                t.process(&m, pod5(&m), query(pod5_addr, port), 0),
                FlowVerdict::New { tracked: true, .. }
            ));
        }
        // Allowed by the rules, but pod 5 holds its three entries.
        let v = t.process(&m, pod5(&m), query(pod5_addr, 4), 0);
        assert!(
            matches!(v, FlowVerdict::OverLimit(_)) && !v.allowed(),
            "{v:?}"
        );
        assert_eq!((t.held(5), t.len()), (3, 3));
        // Its own flows go on, and pod 6 has its own allowance.
        assert!(t.process(&m, pod5(&m), query(pod5_addr, 1), SEC).allowed());
        assert!(
            t.process(&m, &m.pods[1], query(pod6_addr, 1), SEC)
                .allowed()
        );
        // An expired entry still holds its slot until it is swept, but the flow
        // that owns it reuses it.
        assert!(matches!(
            t.process(&m, pod5(&m), query(pod5_addr, 2), 100 * SEC),
            FlowVerdict::New { tracked: true, .. }
        ));
        assert!(matches!(
            t.process(&m, pod5(&m), query(pod5_addr, 4), 100 * SEC),
            FlowVerdict::OverLimit(_)
        ));
        t.expire(&m.node.connection_tracking, 100 * SEC);
        assert_eq!(t.held(5), 1);
        assert!(
            t.process(&m, pod5(&m), query(pod5_addr, 4), 100 * SEC)
                .allowed()
        );
        assert_eq!(t.held(5), 2);
        t.remove_vlan(5);
        assert_eq!(t.held(5), 0);
    }

    #[test]
    fn other_protocols_use_addresses_only() {
        let m = setup();
        let (pod, peer) = (ip("10.0.64.5"), ip("203.0.113.4"));
        let mut t = FlowTable::new();
        assert!(
            t.process(&m, pod5(&m), PacketMeta::other(OUT, pod, peer, 47), 0)
                .allowed()
        );
        let back = PacketMeta::other(IN, peer, pod, 47);
        assert!(t.process(&m, pod5(&m), back, 600 * SEC).allowed());
        assert!(!t.process(&m, pod5(&m), back, 1200 * SEC + 1).allowed());
    }

    #[test]
    fn expire_and_kernel_form() {
        let m = setup();
        let mut t = FlowTable::new();
        t.process(&m, pod5(&m), web_tcp(IN, SYN), 0);
        let ping = PacketMeta::icmp(OUT, ip("10.0.64.5"), ip("192.0.2.7"), 8, 0, 1);
        t.process(&m, pod5(&m), ping, 50 * SEC);
        t.expire(&m.node.connection_tracking, 61 * SEC);
        assert_eq!(t.len(), 1);

        let compiled = compile(&m).unwrap();
        let entry = t
            .get(&flow_key(5, &ping))
            .unwrap()
            .to_kernel(|r| compiled.rule_id(r));
        let rule = compiled.rule(entry.rule).unwrap();
        assert_eq!((rule.group_id.as_str(), rule.index), ("sg-web", 1));
        assert_eq!(entry.primary_rule, 0);
        assert_eq!(entry.state, ct_state::ONE_WAY);
        assert_eq!(entry.origin, DIR_EGRESS as u8);
        assert_eq!(entry.flags, ct_flag::SEEN_EGRESS);
        assert_eq!(entry.packets, [0, 1]);
    }

    /// Standard mode's source NAT: pod 5 in standard mode, the node's group allowing all
    /// egress, a range of two ports: two flows to one peer endpoint take both, a third is
    /// refused; another peer has the range to itself; a mapping leaves with its flow, and
    /// a flow replacing its own expired entry keeps its port.
    #[test]
    fn translated_flows_take_free_ports_and_give_them_back_with_their_flows() {
        let mut m = setup();
        m.pods[0].mode = EnforcingMode::Standard;
        m.pods[0].groups.push("sg-all".to_string());
        m.node.primary_security_groups = vec!["sg-all".to_string()];
        let everywhere = vec![
            rule(L4Match::All, cidr("0.0.0.0/0")),
            rule(L4Match::All, cidr("::/0")),
        ];
        m.groups
            .insert("sg-all".to_string(), group("sg-all", vec![], everywhere));
        m.node.snat_port_range = 61000..=61001;
        let https = |pod_port, peer: &str| {
            PacketMeta::tcp(OUT, ip("10.0.64.5"), ip(peer), pod_port, 443, SYN)
        };
        let mut t = FlowTable::new();
        let mut ports = Vec::new();
        for pod_port in [40000, 40001] {
            let v = t.process(&m, pod5(&m), https(pod_port, "192.0.2.7"), 0);
            assert!(matches!(v, FlowVerdict::New { tracked: true, .. }), "{v:?}");
            let entry = t.get(&flow_key(5, &https(pod_port, "192.0.2.7"))).unwrap();
            ports.push(entry.nat_port);
        }
        ports.sort();
        assert_eq!(ports, [61000, 61001]);
        let v = t.process(&m, pod5(&m), https(40002, "192.0.2.7"), 0);
        assert!(matches!(v, FlowVerdict::NatExhausted(_)), "{v:?}");
        assert!(!v.passes());
        assert!(t.get(&flow_key(5, &https(40002, "192.0.2.7"))).is_none());
        let v = t.process(&m, pod5(&m), https(40002, "192.0.2.8"), 0);
        assert!(matches!(v, FlowVerdict::New { .. }), "{v:?}");
        assert_eq!(t.nat_mappings().len(), 3);
        for (mapping, flow) in t.nat_mappings() {
            assert_eq!(t.get(flow).unwrap().nat_port, mapping.nat_port);
        }

        // An opening TCP flow lives 60 s: the first one is refreshed, the others expire.
        let first = https(40000, "192.0.2.7");
        let port = t.get(&flow_key(5, &first)).unwrap().nat_port;
        t.process(
            &m,
            pod5(&m),
            PacketMeta {
                tcp_flags: ACK,
                ..first
            },
            50 * SEC,
        );
        t.expire(&m.node.connection_tracking, 61 * SEC);
        assert_eq!((t.len(), t.nat_mappings().len()), (1, 1));
        let v = t.process(&m, pod5(&m), https(40003, "192.0.2.7"), 61 * SEC);
        assert!(
            matches!(v, FlowVerdict::New { .. }),
            "a freed port is free: {v:?}"
        );
        // Expired but not swept: the flow's new packet keeps its own mapping.
        let v = t.process(&m, pod5(&m), first, 200 * SEC);
        assert!(matches!(v, FlowVerdict::New { .. }), "{v:?}");
        assert_eq!(t.get(&flow_key(5, &first)).unwrap().nat_port, port);

        // IPv6, the VPC, excluded CIDRs and external SNAT are never translated.
        m.node.exclude_snat_cidrs = vec!["198.51.100.0/24".parse().unwrap()];
        for peer in ["2001:db8::7", "10.0.9.9", "198.51.100.7"] {
            let pod = if peer.contains(':') {
                "2600:1f00::5"
            } else {
                "10.0.64.5"
            };
            let packet = PacketMeta::tcp(OUT, ip(pod), ip(peer), 40000, 443, SYN);
            let v = t.process(&m, pod5(&m), packet, 300 * SEC);
            assert!(
                matches!(&v, FlowVerdict::New { evaluation, .. } if evaluation.nat.is_none()),
                "{peer}: {v:?}"
            );
        }
        m.node.external_snat = true;
        let v = t.process(&m, pod5(&m), https(40009, "192.0.2.9"), 300 * SEC);
        assert!(
            matches!(&v, FlowVerdict::New { evaluation, .. } if evaluation.nat.is_none()),
            "{v:?}"
        );
    }
}
