//! A new flow against one side's compiled groups: the peer's class, a binary
//! search on prefix lengths (`enforcer_common::lengths`), then the class's
//! verdict for the protocol and port, a binary search of its port table
//! (`enforcer_common::ranges`): a fixed number of probes, whatever the number
//! of rules.

use enforcer_common::lengths::{self, PeerV4, PeerV6};
use enforcer_common::{
    NO_CLASS, NO_RULE, PeerKeyV4, PeerKeyV6, PortTable, PortVerdict, port_word, ranges,
};

use crate::maps::{PEERS_V4, PEERS_V6, PORT_RANGES, PORT_TABLES};
use crate::parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, Packet};

/// Whether `policy` allows `packet` with `peer` as the other end; if so the
/// verdict is written to `verdict`. Out of line (it runs once per side) with
/// plain types in its signature, which BTF can describe.
#[inline(never)]
pub fn allowed(policy: u32, packet: &Packet, peer: &[u8; 16], verdict: &mut PortVerdict) -> bool {
    let class = peer_class(policy, packet.ipv6, peer);
    if class == NO_CLASS {
        return false;
    }
    let port = match packet.protocol {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => u16::from_be_bytes([packet.icmp_type, packet.icmp_code]),
        _ => packet.dst_port,
    };
    match port_verdict(class, port_word(packet.protocol, port)) {
        Some(found) if found.rule != NO_RULE => {
            *verdict = found;
            true
        }
        _ => false,
    }
}

#[inline(always)]
fn port_verdict(class: u32, word: u32) -> Option<PortVerdict> {
    let slot = PORT_TABLES.get_ptr(class)?;
    // SAFETY: an aligned 8-byte slot of the array, read whole with one load: the agent may
    // switch it to another run meanwhile (`PortTable::word`).
    let table = PortTable::from_word(unsafe { core::ptr::read_volatile(slot.cast::<u64>()) });
    if table.count == 0 {
        return None;
    }
    let first = table.first;
    let found = ranges::search(table.count, word, |i| {
        PORT_RANGES.get(first.wrapping_add(i)).map(|r| r.start)
    })?;
    PORT_RANGES
        .get(first.wrapping_add(found))
        .map(|r| r.verdict)
}

#[inline(always)]
fn peer_class(policy: u32, ipv6: bool, peer: &[u8; 16]) -> u32 {
    let class = if ipv6 {
        lengths::search::<PeerV6, _>(|len| {
            // SAFETY: a copy of plain data.
            unsafe { PEERS_V6.get(PeerKeyV6::new(policy, peer, len)) }.map(|c| c.class)
        })
    } else {
        let addr = [peer[12], peer[13], peer[14], peer[15]];
        lengths::search::<PeerV4, _>(|len| {
            // SAFETY: a copy of plain data.
            unsafe { PEERS_V4.get(PeerKeyV4::new(policy, addr, len)) }.map(|c| c.class)
        })
    };
    class.unwrap_or(NO_CLASS)
}
