//! What the evaluator is asked: the first packet of a flow, seen from a branch pod.

use std::net::IpAddr;

use crate::model::Direction;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Layer 4 of one packet, as the fast path keys it: the IP protocol and a 16-bit selector,
/// the destination port for TCP/UDP, `type << 8 | code` for ICMP/ICMPv6, 0 otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L4Packet {
    pub protocol: u8,
    pub selector: u16,
}

impl L4Packet {
    /// A packet of `protocol`; `port` counts for TCP/UDP, type and code for ICMP/ICMPv6.
    pub fn new(protocol: u8, port: u16, icmp_type: u8, icmp_code: u8) -> Self {
        let selector = match protocol {
            PROTO_TCP | PROTO_UDP => port,
            PROTO_ICMP | PROTO_ICMPV6 => u16::from_be_bytes([icmp_type, icmp_code]),
            _ => 0,
        };
        Self { protocol, selector }
    }

    pub fn tcp(port: u16) -> Self {
        Self::new(PROTO_TCP, port, 0, 0)
    }

    pub fn udp(port: u16) -> Self {
        Self::new(PROTO_UDP, port, 0, 0)
    }

    pub fn icmp(icmp_type: u8, icmp_code: u8) -> Self {
        Self::new(PROTO_ICMP, 0, icmp_type, icmp_code)
    }

    pub fn icmpv6(icmp_type: u8, icmp_code: u8) -> Self {
        Self::new(PROTO_ICMPV6, 0, icmp_type, icmp_code)
    }

    /// TCP or UDP: the selector is a port.
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, PROTO_TCP | PROTO_UDP)
    }

    /// ICMP or ICMPv6: the selector is type and code.
    pub fn is_icmp(&self) -> bool {
        matches!(self.protocol, PROTO_ICMP | PROTO_ICMPV6)
    }

    pub fn icmp_type(&self) -> u8 {
        self.selector.to_be_bytes()[0]
    }

    pub fn icmp_code(&self) -> u8 {
        self.selector.to_be_bytes()[1]
    }
}

/// Layer 4 of a query: one packet, or "all traffic" (`--protocol all`), which only
/// rules allowing every protocol and port allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Query {
    Packet(L4Packet),
    AllTraffic,
}

/// The first packet of a flow, seen from a branch pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Query {
    /// `Ingress`: from `peer` to the pod; `Egress`: from the pod to `peer`.
    pub direction: Direction,
    pub peer: IpAddr,
    pub l4: L4Query,
}
