//! Connection tracking: flows keyed per pod (VLAN) and normalised to the pod,
//! so replies find their request's entry; the TCP/UDP state machine and idle
//! timeouts that `enforcer/src/flow.rs` models (sg-semantics.md §4).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use enforcer_common::{
    CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, Settings, ct_flag, ct_state, ct_timeouts,
};

use crate::Direction;
use crate::maps::{CONNTRACK, POD_TRACKED};
use crate::parse::{
    Embedded, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Packet, is_icmp_echo,
};
use crate::verdict::FlowContext;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;

/// The key of the flow `packet` belongs to, seen from the pod on `vlan`.
#[inline(always)]
pub fn key(vlan: u16, packet: &Packet, direction: Direction) -> CtKey {
    let endpoints = Endpoints {
        src: packet.src,
        dst: packet.dst,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
    };
    // The parser leaves the echo identifier in `src_port`.
    normalised(
        vlan,
        packet.protocol,
        is_icmp_echo(packet),
        endpoints,
        direction,
    )
}

/// The key of the flow an ICMP error travelling in `direction` reports on:
/// an error reaching the pod is about a packet the pod sent, and vice versa.
#[inline(always)]
pub fn embedded_key(vlan: u16, embedded: &Embedded, direction: Direction) -> CtKey {
    let endpoints = Endpoints {
        src: embedded.src,
        dst: embedded.dst,
        src_port: embedded.src_port,
        dst_port: embedded.dst_port,
    };
    // The embedded packet travelled the other way; only an echo is keyed by an
    // ICMP identifier, and the parser only reads one for an echo.
    let is_echo = embedded.src_port != 0;
    normalised(
        vlan,
        embedded.protocol,
        is_echo,
        endpoints,
        direction.reverse(),
    )
}

/// Source and destination of a packet, before normalisation to the pod.
struct Endpoints {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
}

/// A key oriented to the pod: the egress source, or the ingress destination, is the pod.
#[inline(always)]
fn normalised(vlan: u16, protocol: u8, is_echo: bool, e: Endpoints, direction: Direction) -> CtKey {
    let (pod_addr, peer_addr, pod_port, peer_port) = match direction {
        Direction::Egress => (e.src, e.dst, e.src_port, e.dst_port),
        Direction::Ingress => (e.dst, e.src, e.dst_port, e.src_port),
    };
    let (pod_port, peer_port) = match protocol {
        IPPROTO_TCP | IPPROTO_UDP => (pod_port, peer_port),
        // Both ends of an echo carry the same identifier in the source slot.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if is_echo => (e.src_port, 0),
        _ => (0, 0),
    };
    CtKey {
        pod_addr,
        peer_addr,
        pod_port,
        peer_port,
        vlan,
        protocol,
        _pad: 0,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Idle timeout of an entry in its current state.
#[inline(always)]
fn timeout_ns(entry: &CtEntry, protocol: u8, settings: &Settings) -> u64 {
    let seconds = match (protocol, entry.state) {
        (IPPROTO_TCP, ct_state::ESTABLISHED) => settings.tcp_established_timeout,
        (IPPROTO_TCP, ct_state::CLOSING) => ct_timeouts::TCP_CLOSING,
        (IPPROTO_TCP, _) => ct_timeouts::TCP_OPENING,
        (IPPROTO_UDP, ct_state::BOTH_WAYS) => settings.udp_stream_timeout,
        (IPPROTO_UDP, _) => settings.udp_timeout,
        (IPPROTO_ICMP | IPPROTO_ICMPV6, _) => ct_timeouts::ICMP,
        _ => ct_timeouts::OTHER,
    };
    u64::from(seconds) * NS_PER_SEC
}

/// A SYN on a closing TCP flow starts a new connection on the same ports:
/// it is judged by the rules again, like any new flow.
#[inline(always)]
fn reopens(entry: &CtEntry, packet: &Packet) -> bool {
    packet.protocol == IPPROTO_TCP
        && entry.state == ct_state::CLOSING
        && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn live(entry: &CtEntry, protocol: u8, settings: &Settings, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) <= timeout_ns(entry, protocol, settings)
}

/// The translated port (0: none) of the live flow `key` names, if it does
/// (for ICMP errors: no state change).
#[inline(always)]
pub fn tracked(key: &CtKey, settings: &Settings, now: u64) -> Option<u16> {
    // SAFETY: read-only look at plain data; a concurrent update only makes it stale.
    let entry = unsafe { CONNTRACK.get(key) }?;
    live(entry, key.protocol, settings, now).then_some(entry.nat_port)
}

#[inline(always)]
fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

#[inline(always)]
fn seen_flag(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => ct_flag::SEEN_INGRESS,
        Direction::Egress => ct_flag::SEEN_EGRESS,
    }
}

#[inline(always)]
fn fin_flag(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => ct_flag::FIN_INGRESS,
        Direction::Egress => ct_flag::FIN_EGRESS,
    }
}

/// The state after seeing a packet with `flags` already recorded, sent by
/// the flow's origin (`from_origin`) or by the other side.
#[inline(always)]
fn next_state(protocol: u8, flags: u8, tcp_flags: u8, state: u8, from_origin: bool) -> u8 {
    let both_seen = ct_flag::SEEN_INGRESS | ct_flag::SEEN_EGRESS;
    let both_fin = ct_flag::FIN_INGRESS | ct_flag::FIN_EGRESS;
    if protocol == IPPROTO_TCP {
        if state == ct_state::CLOSING || tcp_flags & TCP_RST != 0 || flags & both_fin == both_fin {
            ct_state::CLOSING
        } else if flags & both_seen == both_seen {
            ct_state::ESTABLISHED
        } else {
            ct_state::OPENING
        }
    } else if protocol == IPPROTO_UDP {
        udp_next_state(state, from_origin)
    } else if flags & both_seen == both_seen {
        ct_state::BOTH_WAYS
    } else {
        ct_state::ONE_WAY
    }
}

/// UDP counts request-response transactions: a response after a second
/// request makes the flow a stream (BOTH_WAYS); one request and its response
/// stay ANSWERED (sg-semantics.md §4).
#[inline(always)]
fn udp_next_state(state: u8, from_origin: bool) -> u8 {
    match (state, from_origin) {
        (ct_state::BOTH_WAYS, _) | (ct_state::ASKED_AGAIN, false) => ct_state::BOTH_WAYS,
        (ct_state::ANSWERED | ct_state::ASKED_AGAIN, true) => ct_state::ASKED_AGAIN,
        (_, false) => ct_state::ANSWERED,
        (_, true) => ct_state::ONE_WAY,
    }
}

#[inline(always)]
fn packet_flags(packet: &Packet, direction: Direction) -> u8 {
    let mut flags = seen_flag(direction);
    if packet.protocol == IPPROTO_TCP && packet.tcp_flags & TCP_FIN != 0 {
        flags |= fin_flag(direction);
    }
    flags
}

/// Whether the flow has a live entry that would take the packet, as
/// [`track_existing`] decides, without recording anything (XDP's screen).
#[inline(always)]
pub fn takes(key: &CtKey, packet: &Packet, flow: &FlowContext) -> bool {
    // SAFETY: read-only look at plain data; a concurrent update only makes it stale.
    unsafe { CONNTRACK.get(key) }.is_some_and(|entry| {
        live(entry, key.protocol, flow.settings, flow.now) && !reopens(entry, packet)
    })
}

/// Looks the flow up; on a live entry, records the packet and returns the
/// entry's translated port (0: not source-NATed).
#[inline(always)]
pub fn track_existing(key: &CtKey, packet: &Packet, flow: &FlowContext) -> Option<u16> {
    let (direction, now) = (flow.direction, flow.now);
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; fields are plain
    // data, and racing updates from other CPUs only lose a state refresh.
    let entry = unsafe { &mut *entry };
    if !live(entry, key.protocol, flow.settings, now) || reopens(entry, packet) {
        return None;
    }
    let flags = entry.flags | packet_flags(packet, direction);
    let from_origin = entry.origin == direction_index(direction) as u8;
    entry.state = next_state(
        key.protocol,
        flags,
        packet.tcp_flags,
        entry.state,
        from_origin,
    );
    entry.flags = flags;
    entry.last_seen_ns = now;
    // Plain adds: two CPUs on one flow at once may lose an increment, which
    // costs less than an atomic on every packet and only blurs statistics.
    // Constant indexes, so the verifier sees every access in bounds.
    let bytes = u64::from(flow.len);
    match direction {
        Direction::Ingress => {
            entry.packets[DIR_INGRESS] += 1;
            entry.bytes[DIR_INGRESS] += bytes;
        }
        Direction::Egress => {
            entry.packets[DIR_EGRESS] += 1;
            entry.bytes[DIR_EGRESS] += bytes;
        }
    }
    Some(entry.nat_port)
}

/// Starts tracking a flow the rules admitted; `rules` are the branch and
/// primary rule IDs that allowed it, `nat_port` its translated port (or 0). False when the pod's allowance
/// (`max_flows_per_pod`) is spent or the table is full: the flow is not tracked.
#[inline(never)]
pub fn create(
    key: &CtKey,
    packet: &Packet,
    flow: &FlowContext,
    rules: [u32; 2],
    nat_port: u16,
) -> bool {
    let (direction, now) = (flow.direction, flow.now);
    let flags = packet_flags(packet, direction);
    let mut entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        rule: rules[0],
        primary_rule: rules[1],
        state: next_state(key.protocol, flags, packet.tcp_flags, 0, true),
        origin: direction_index(direction) as u8,
        flags,
        nat_port,
        ..CtEntry::default()
    };
    let bytes = u64::from(flow.len);
    match direction {
        Direction::Ingress => {
            entry.packets[DIR_INGRESS] = 1;
            entry.bytes[DIR_INGRESS] = bytes;
        }
        Direction::Egress => {
            entry.packets[DIR_EGRESS] = 1;
            entry.bytes[DIR_EGRESS] = bytes;
        }
    }
    let Some(count) = POD_TRACKED.get_ptr_mut(u32::from(key.vlan)) else {
        return false;
    };
    // SAFETY: an element of an array map lives as long as the map.
    insert_counted(
        unsafe { &raw mut (*count).flows },
        flow.settings.max_flows_per_pod,
        || CONNTRACK.insert(key, entry, u64::from(BPF_EXIST)).is_ok(),
        || CONNTRACK.insert(key, entry, u64::from(BPF_NOEXIST)).is_ok(),
    )
}

/// Stores an entry within a pod's allowance: over the flow's own entry (an
/// expired or reopened one) at no cost, else in a new slot counted in `count`
/// first, so that two CPUs never both take the last one (at worst both lose
/// it). A failed insert (the table full, or another CPU created the key
/// meanwhile) gives the slot back.
#[inline(always)]
pub fn insert_counted(
    count: *mut u64,
    allowance: u32,
    overwrite: impl Fn() -> bool,
    create: impl Fn() -> bool,
) -> bool {
    if overwrite() {
        return true;
    }
    add(count, 1);
    // SAFETY: `count` points into a live map element; a racing add only makes this conservative.
    let held = unsafe { core::ptr::read_volatile(count) };
    // Signed: a count the agent's release raced below zero means room, never a lockout.
    if held as i64 > i64::from(allowance) {
        add(count, u64::MAX);
        return false;
    }
    if create() {
        return true;
    }
    add(count, u64::MAX);
    overwrite()
}

/// An atomic add (`BPF_ATOMIC | BPF_ADD`) of `delta` (wrapping: `u64::MAX`
/// subtracts one) whose result is unused, which every BPF CPU version has; the
/// target offers no `AtomicU64::fetch_add`. The agent's sweep subtracts
/// through the memory-mapped map with the same instruction's userspace twin.
#[inline(always)]
fn add(count: *mut u64, delta: u64) {
    // SAFETY: callers pass a pointer into a live map element, 8-byte aligned.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta);
    }
}
