//! A tracked flow: its state machine, its idle timeouts and its kernel form.

use enforcer_common::{CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, ct_flag, ct_state, ct_timeouts};

use super::packet::{PacketMeta, tcp_flags};
use crate::model::{ConntrackTimeouts, Direction};
use crate::policy::eval::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RuleRef};

pub(super) const NS_PER_SEC: u64 = 1_000_000_000;

/// [`ct_state`] of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP, packets seen in one direction only.
    Opening,
    /// TCP, packets seen in both directions.
    Established,
    /// TCP, FIN from both sides or a RST.
    Closing,
    /// Not TCP, packets seen in one direction only.
    OneWay,
    /// UDP: one request and its response.
    Answered,
    /// UDP: a second request after a response.
    AskedAgain,
    /// Not UDP nor TCP: packets seen in both directions. UDP: a stream, more
    /// than one request-response transaction.
    BothWays,
}

impl CtState {
    /// The kernel's [`ct_state`] code.
    pub fn code(self) -> u8 {
        match self {
            Self::Opening => ct_state::OPENING,
            Self::Established => ct_state::ESTABLISHED,
            Self::Closing => ct_state::CLOSING,
            Self::OneWay => ct_state::ONE_WAY,
            Self::Answered => ct_state::ANSWERED,
            Self::AskedAgain => ct_state::ASKED_AGAIN,
            Self::BothWays => ct_state::BOTH_WAYS,
        }
    }

    /// The state after a packet whose [`ct_flag`] bits are now `flags`, sent
    /// by the flow's origin (`from_origin`) or by the other side.
    pub(super) fn next(
        state: Option<Self>,
        protocol: u8,
        flags: u8,
        tcp: u8,
        from_origin: bool,
    ) -> Self {
        let both_seen = ct_flag::SEEN_INGRESS | ct_flag::SEEN_EGRESS;
        let both_fin = ct_flag::FIN_INGRESS | ct_flag::FIN_EGRESS;
        if protocol == PROTO_TCP {
            if state == Some(Self::Closing)
                || tcp & tcp_flags::RST != 0
                || flags & both_fin == both_fin
            {
                Self::Closing
            } else if flags & both_seen == both_seen {
                Self::Established
            } else {
                Self::Opening
            }
        } else if protocol == PROTO_UDP {
            match (state, from_origin) {
                (Some(Self::BothWays), _) | (Some(Self::AskedAgain), false) => Self::BothWays,
                (Some(Self::Answered | Self::AskedAgain), true) => Self::AskedAgain,
                (_, false) => Self::Answered,
                (_, true) => Self::OneWay,
            }
        } else if flags & both_seen == both_seen {
            Self::BothWays
        } else {
            Self::OneWay
        }
    }

    /// Idle timeout of a `protocol` entry in this state, in seconds.
    pub fn timeout_secs(self, protocol: u8, timeouts: &ConntrackTimeouts) -> u32 {
        timeout_secs(protocol, self.code(), timeouts)
    }
}

/// Idle timeout in seconds of a `protocol` entry in state `code` ([`ct_state`]),
/// whatever the code (the kernel's own arms: an unknown state is not established).
pub fn timeout_secs(protocol: u8, code: u8, timeouts: &ConntrackTimeouts) -> u32 {
    match (protocol, code) {
        (PROTO_TCP, ct_state::ESTABLISHED) => timeouts.tcp_established,
        (PROTO_TCP, ct_state::CLOSING) => ct_timeouts::TCP_CLOSING,
        (PROTO_TCP, _) => ct_timeouts::TCP_OPENING,
        (PROTO_UDP, ct_state::BOTH_WAYS) => timeouts.udp_stream,
        (PROTO_UDP, _) => timeouts.udp,
        (PROTO_ICMP | PROTO_ICMPV6, _) => ct_timeouts::ICMP,
        _ => ct_timeouts::OTHER,
    }
}

/// Whether a kernel entry is live at `now_ns`, as the kernel judges it
/// (`now - last_seen <= timeout`); the sweep deletes the others.
pub fn kernel_entry_live(
    key: &CtKey,
    entry: &CtEntry,
    timeouts: &ConntrackTimeouts,
    now_ns: u64,
) -> bool {
    let timeout = u64::from(timeout_secs(key.protocol, entry.state, timeouts)) * NS_PER_SEC;
    now_ns.saturating_sub(entry.last_seen_ns) <= timeout
}

/// A tracked flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// By [`DIR_INGRESS`] / [`DIR_EGRESS`].
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// The lowest rule of the branch groups that admitted the flow.
    pub rule: Option<RuleRef>,
    /// Same for the primary groups (standard mode).
    pub primary_rule: Option<RuleRef>,
    pub state: CtState,
    /// Direction of the first packet.
    pub origin: Direction,
    /// [`ct_flag`] bits.
    pub flags: u8,
    /// The translated port of a source-NATed flow; 0: not translated.
    pub nat_port: u16,
}

impl FlowEntry {
    pub(super) fn live(&self, protocol: u8, timeouts: &ConntrackTimeouts, now_ns: u64) -> bool {
        let timeout = u64::from(self.state.timeout_secs(protocol, timeouts)) * NS_PER_SEC;
        now_ns.saturating_sub(self.last_seen_ns) <= timeout
    }

    /// A SYN (without ACK) on a closing TCP flow starts a new connection on
    /// the same ports, judged by the rules like any new flow.
    pub(super) fn reopened_by(&self, protocol: u8, packet: &PacketMeta) -> bool {
        protocol == PROTO_TCP
            && self.state == CtState::Closing
            && packet.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    pub(super) fn record(&mut self, protocol: u8, packet: &PacketMeta, now_ns: u64) {
        let (seen, fin, dir) = match packet.direction {
            Direction::Ingress => (ct_flag::SEEN_INGRESS, ct_flag::FIN_INGRESS, DIR_INGRESS),
            Direction::Egress => (ct_flag::SEEN_EGRESS, ct_flag::FIN_EGRESS, DIR_EGRESS),
        };
        self.flags |= seen;
        if protocol == PROTO_TCP && packet.tcp_flags & tcp_flags::FIN != 0 {
            self.flags |= fin;
        }
        let from_origin = packet.direction == self.origin;
        self.state = CtState::next(
            Some(self.state),
            protocol,
            self.flags,
            packet.tcp_flags,
            from_origin,
        );
        self.last_seen_ns = now_ns;
        self.packets[dir] += 1;
        self.bytes[dir] += u64::from(packet.len);
    }

    /// The entry as the kernel stores it, rules by the IDs `rule_id` gives them (the
    /// compiled state's; 0 = none).
    pub fn to_kernel(&self, rule_id: impl Fn(&RuleRef) -> Option<u32>) -> CtEntry {
        let id = |rule: &Option<RuleRef>| rule.as_ref().and_then(&rule_id);
        CtEntry {
            created_ns: self.created_ns,
            last_seen_ns: self.last_seen_ns,
            packets: self.packets,
            bytes: self.bytes,
            rule: id(&self.rule).unwrap_or(0),
            primary_rule: id(&self.primary_rule).unwrap_or(0),
            state: self.state.code(),
            origin: match self.origin {
                Direction::Ingress => DIR_INGRESS as u8,
                Direction::Egress => DIR_EGRESS as u8,
            },
            flags: self.flags,
            _pad: 0,
            nat_port: self.nat_port,
            _pad2: [0; 2],
        }
    }
}
