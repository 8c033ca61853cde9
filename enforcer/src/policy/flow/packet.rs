//! One packet as the tracker sees it, and the key of the flow it belongs to.

use std::net::IpAddr;

use enforcer_common::CtKey;

use crate::model::Direction;
use crate::policy::eval::{L4Packet, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// TCP header flag bits, as in [`PacketMeta::tcp_flags`].
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The header embedded in an ICMP error: the packet it reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
    pub icmp_id: u16,
}

/// What the fast path parses out of one packet of a branch pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// `Ingress`: to the pod; `Egress`: from the pod.
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// TCP/UDP ports, else 0.
    pub src_port: u16,
    pub dst_port: u16,
    /// [`tcp_flags`] bits.
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// ICMP echo identifier.
    pub icmp_id: u16,
    /// For ICMP errors, the embedded header, if it could be read.
    pub embedded: Option<EmbeddedHeader>,
    /// Frame length, for the byte counters.
    pub len: u32,
    /// The first fragment of a datagram: its flow is never source-NATed (the
    /// kernel cannot translate the fragments that follow).
    pub first_fragment: bool,
}

impl PacketMeta {
    fn blank(direction: Direction, src: IpAddr, dst: IpAddr, protocol: u8) -> Self {
        Self {
            direction,
            src,
            dst,
            protocol,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            icmp_id: 0,
            embedded: None,
            len: 100,
            first_fragment: false,
        }
    }

    pub fn tcp(
        direction: Direction,
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
        flags: u8,
    ) -> Self {
        Self {
            src_port,
            dst_port,
            tcp_flags: flags,
            ..Self::blank(direction, src, dst, PROTO_TCP)
        }
    }

    pub fn udp(
        direction: Direction,
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
    ) -> Self {
        Self {
            src_port,
            dst_port,
            ..Self::blank(direction, src, dst, PROTO_UDP)
        }
    }

    /// ICMP or, between IPv6 addresses, ICMPv6.
    pub fn icmp(
        direction: Direction,
        src: IpAddr,
        dst: IpAddr,
        icmp_type: u8,
        icmp_code: u8,
        icmp_id: u16,
    ) -> Self {
        let protocol = if src.is_ipv6() {
            PROTO_ICMPV6
        } else {
            PROTO_ICMP
        };
        Self {
            icmp_type,
            icmp_code,
            icmp_id,
            ..Self::blank(direction, src, dst, protocol)
        }
    }

    /// Any other IP protocol.
    pub fn other(direction: Direction, src: IpAddr, dst: IpAddr, protocol: u8) -> Self {
        Self::blank(direction, src, dst, protocol)
    }

    /// (pod address, peer address) for the packet's direction.
    pub(super) fn pod_and_peer(&self) -> (IpAddr, IpAddr) {
        match self.direction {
            Direction::Ingress => (self.dst, self.src),
            Direction::Egress => (self.src, self.dst),
        }
    }

    pub(super) fn l4(&self) -> L4Packet {
        L4Packet::new(self.protocol, self.dst_port, self.icmp_type, self.icmp_code)
    }

    pub(super) fn is_icmp_error(&self) -> bool {
        match self.protocol {
            PROTO_ICMP => matches!(self.icmp_type, 3 | 4 | 11 | 12),
            PROTO_ICMPV6 => matches!(self.icmp_type, 1..=4),
            _ => false,
        }
    }
}

fn is_echo(protocol: u8, icmp_type: u8) -> bool {
    match protocol {
        PROTO_ICMP => matches!(icmp_type, 0 | 8),
        PROTO_ICMPV6 => matches!(icmp_type, 128 | 129),
        _ => false,
    }
}

fn octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A packet's fields normalised to the pod: the parts of a key before the protocol rules.
struct Tuple {
    protocol: u8,
    pod: IpAddr,
    peer: IpAddr,
    pod_port: u16,
    peer_port: u16,
    icmp_type: u8,
    icmp_id: u16,
}

impl Tuple {
    fn key(self, vlan: u16) -> CtKey {
        let (pod_port, peer_port) = match self.protocol {
            PROTO_TCP | PROTO_UDP => (self.pod_port, self.peer_port),
            _ if is_echo(self.protocol, self.icmp_type) => (self.icmp_id, 0),
            _ => (0, 0),
        };
        CtKey {
            pod_addr: octets(self.pod),
            peer_addr: octets(self.peer),
            pod_port,
            peer_port,
            vlan,
            protocol: self.protocol,
            _pad: 0,
        }
    }
}

/// The key of the flow `packet` belongs to, for the pod on `vlan`.
pub fn flow_key(vlan: u16, packet: &PacketMeta) -> CtKey {
    let (pod, peer) = packet.pod_and_peer();
    let (pod_port, peer_port) = match packet.direction {
        Direction::Ingress => (packet.dst_port, packet.src_port),
        Direction::Egress => (packet.src_port, packet.dst_port),
    };
    Tuple {
        protocol: packet.protocol,
        pod,
        peer,
        pod_port,
        peer_port,
        icmp_type: packet.icmp_type,
        icmp_id: packet.icmp_id,
    }
    .key(vlan)
}

/// The key of the flow an ICMP error travelling in `direction` reports on.
pub fn embedded_key(vlan: u16, direction: Direction, embedded: &EmbeddedHeader) -> CtKey {
    let e = embedded;
    let (pod, peer, pod_port, peer_port) = match direction {
        // The error reaches the pod: the embedded packet is one the pod sent.
        Direction::Ingress => (e.src, e.dst, e.src_port, e.dst_port),
        Direction::Egress => (e.dst, e.src, e.dst_port, e.src_port),
    };
    Tuple {
        protocol: e.protocol,
        pod,
        peer,
        pod_port,
        peer_port,
        icmp_type: e.icmp_type,
        icmp_id: e.icmp_id,
    }
    .key(vlan)
}
