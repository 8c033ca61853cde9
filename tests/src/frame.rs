//! Building Ethernet frames (optionally 802.1Q-tagged) around IPv4/IPv6 and
//! TCP/UDP/ICMP headers, for `BPF_PROG_TEST_RUN` and raw sockets.

use std::net::IpAddr;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Layer 4 of a test packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// ICMP or ICMPv6 (chosen by the address family) with type, code and echo id.
    Icmp {
        icmp_type: u8,
        code: u8,
        id: u16,
    },
    /// Any other protocol number, with a few payload bytes.
    Other {
        protocol: u8,
    },
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// An IP packet to wrap in a frame.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
}

impl Ip {
    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } if self.src.is_ipv4() => 1,
            L4::Icmp { .. } => 58,
            L4::Other { protocol } => protocol,
        }
    }

    /// The L3 header and payload, without Ethernet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let total = 20 + l4.len();
                let mut h = vec![0x45, 0];
                h.extend_from_slice(&(total as u16).to_be_bytes());
                h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, self.protocol(), 0, 0]);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&l4);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut h = vec![0x60, 0, 0, 0];
                h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                h.extend_from_slice(&[self.protocol(), 64]);
                h.extend_from_slice(&src.octets());
                h.extend_from_slice(&dst.octets());
                h.extend_from_slice(&l4);
                h
            }
            _ => panic!("mixed address families in {self:?}"),
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match self.l4 {
            L4::Tcp { src, dst, flags } => {
                let mut t = Vec::with_capacity(20);
                t.extend_from_slice(&src.to_be_bytes());
                t.extend_from_slice(&dst.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                t
            }
            L4::Udp { src, dst } => {
                let mut u = Vec::with_capacity(12);
                u.extend_from_slice(&src.to_be_bytes());
                u.extend_from_slice(&dst.to_be_bytes());
                u.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
                u
            }
            L4::Icmp {
                icmp_type,
                code,
                id,
            } => {
                let mut i = vec![icmp_type, code, 0, 0];
                i.extend_from_slice(&id.to_be_bytes());
                i.extend_from_slice(&[0, 1]);
                i
            }
            L4::Other { .. } => vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0],
        }
    }
}

/// How the frame carries its VLAN.
#[derive(Clone, Copy, Debug)]
pub enum Tag {
    Untagged,
    /// One inline 802.1Q tag.
    Vlan(u16),
    /// Two stacked tags (QinQ): outer 802.1ad, inner 802.1Q.
    Stacked(u16, u16),
}

const POD_MAC: [u8; 6] = [0x0a, 0x00, 0x00, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x0a, 0x00, 0x00, 0x00, 0x00, 0x02];

/// An Ethernet frame with `tag` around `payload` of type `ethertype`.
pub fn ethernet(tag: Tag, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(22 + payload.len());
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&PEER_MAC);
    match tag {
        Tag::Untagged => {}
        Tag::Vlan(vlan) => {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&vlan.to_be_bytes());
        }
        Tag::Stacked(outer, inner) => {
            f.extend_from_slice(&ETH_P_8021AD.to_be_bytes());
            f.extend_from_slice(&outer.to_be_bytes());
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&inner.to_be_bytes());
        }
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A frame carrying `ip`.
pub fn ip_frame(tag: Tag, ip: &Ip) -> Vec<u8> {
    let ethertype = if ip.src.is_ipv4() {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    };
    ethernet(tag, ethertype, &ip.to_bytes())
}

/// An ARP request (who-has `target` tell `sender`) in a frame.
pub fn arp_frame(tag: Tag, sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&POD_MAC);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    ethernet(tag, ETH_P_ARP, &a)
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
