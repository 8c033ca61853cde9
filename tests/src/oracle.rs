//! Generated packets as the reference models see them: the fields the
//! kernel's parser reads, so tests ask `enforcer::policy::flow` and `enforcer::policy::eval`
//! the same question the kernel answers.

use enforcer::model::Direction;
use enforcer::policy::eval::L4Packet;
use enforcer::policy::flow::{EmbeddedHeader, PacketMeta, flow_key};
use enforcer_common::CtKey;

use crate::frame::{Ip, L4};

/// The parser reads any protocol 1/58 payload as an ICMP header; the
/// generated payload of [`L4::Other`] starts `de ad be ef 00 00`.
const OTHER_AS_ICMP: (u8, u8) = (0xde, 0xad);

/// What the parser reads of `ip` travelling in `direction` (ingress: to the
/// pod), with `quoted` for an ICMP error and `len` the frame's length.
pub fn packet_meta(direction: Direction, ip: &Ip, quoted: Option<&Ip>, len: u32) -> PacketMeta {
    let mut meta = match ip.l4 {
        L4::Tcp { src, dst, flags } => PacketMeta::tcp(direction, ip.src, ip.dst, src, dst, flags),
        L4::Udp { src, dst } => PacketMeta::udp(direction, ip.src, ip.dst, src, dst),
        L4::Icmp {
            icmp_type,
            code,
            id,
        } => PacketMeta::icmp(direction, ip.src, ip.dst, icmp_type, code, id),
        L4::Other { protocol } => {
            let mut meta = PacketMeta::other(direction, ip.src, ip.dst, protocol);
            if matches!(protocol, 1 | 58) {
                (meta.icmp_type, meta.icmp_code) = OTHER_AS_ICMP;
            }
            meta
        }
    };
    meta.len = len;
    meta.embedded = quoted.map(embedded_header);
    meta
}

/// What the parser reads of the packet an ICMP error quotes.
pub fn embedded_header(quoted: &Ip) -> EmbeddedHeader {
    let (src_port, dst_port, icmp_type, icmp_id) = match quoted.l4 {
        L4::Tcp { src, dst, .. } | L4::Udp { src, dst } => (src, dst, 0, 0),
        L4::Icmp { icmp_type, id, .. } => (0, 0, icmp_type, id),
        L4::Other { protocol: 1 | 58 } => (0, 0, OTHER_AS_ICMP.0, 0),
        L4::Other { .. } => (0, 0, 0, 0),
    };
    EmbeddedHeader {
        src: quoted.src,
        dst: quoted.dst,
        protocol: quoted.protocol(),
        src_port,
        dst_port,
        icmp_type,
        icmp_id,
    }
}

/// The conntrack key the kernel files `ip` under for the pod on `vlan`.
pub fn ct_key(vlan: u16, direction: Direction, ip: &Ip) -> CtKey {
    flow_key(vlan, &packet_meta(direction, ip, None, 0))
}

/// Layer 4 of `ip` as the evaluator takes it.
pub fn l4_packet(ip: &Ip) -> L4Packet {
    let meta = packet_meta(Direction::Egress, ip, None, 0);
    L4Packet::new(meta.protocol, meta.dst_port, meta.icmp_type, meta.icmp_code)
}
