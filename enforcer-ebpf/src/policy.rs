//! A new flow against one side's compiled groups: two longest-prefix lookups
//! (peer -> class, then class/protocol/port -> verdict), whatever the number
//! of rules.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{PORT_KEY_BITS, PeerKeyV4, PeerKeyV6, PortKey, PortVerdict};

use crate::maps::{PEERS_V4, PEERS_V6, PORTS};
use crate::parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, Packet};

/// Policy id bits before the address in a peer key.
const POLICY_BITS: u32 = 32;

/// Whether `policy` allows `packet` with `peer` as the other end; if so the
/// verdict is written to `verdict`. Out of line (it runs once per side) with
/// plain types in its signature, which BTF can describe.
#[inline(never)]
pub fn allowed(policy: u32, packet: &Packet, peer: &[u8; 16], verdict: &mut PortVerdict) -> bool {
    match lookup(policy, packet, peer) {
        Some(found) => {
            *verdict = found;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn lookup(policy: u32, packet: &Packet, peer: &[u8; 16]) -> Option<PortVerdict> {
    let policy_be = policy.to_be_bytes();
    let class = if packet.ipv6 {
        let key = Key::new(
            POLICY_BITS + 128,
            PeerKeyV6 {
                policy: policy_be,
                addr: *peer,
            },
        );
        PEERS_V6.get(&key)?.class
    } else {
        let key = Key::new(
            POLICY_BITS + 32,
            PeerKeyV4 {
                policy: policy_be,
                addr: [peer[12], peer[13], peer[14], peer[15]],
            },
        );
        PEERS_V4.get(&key)?.class
    };
    let port = match packet.protocol {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => [packet.icmp_type, packet.icmp_code],
        _ => packet.dst_port.to_be_bytes(),
    };
    let key = Key::new(
        PORT_KEY_BITS,
        PortKey {
            class: class.to_be_bytes(),
            protocol: packet.protocol,
            port,
            _pad: 0,
        },
    );
    PORTS.get(&key).copied()
}
