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

    /// The same packet travelling back: addresses and ports swapped, an echo
    /// request answered, `tcp_flags` on a TCP packet.
    pub fn reply(&self, tcp_flags: u8) -> Ip {
        let l4 = match self.l4 {
            L4::Tcp { src, dst, .. } => L4::Tcp {
                src: dst,
                dst: src,
                flags: tcp_flags,
            },
            L4::Udp { src, dst } => L4::Udp { src: dst, dst: src },
            L4::Icmp {
                icmp_type,
                code,
                id,
            } => L4::Icmp {
                icmp_type: match icmp_type {
                    8 => 0,
                    128 => 129,
                    other => other,
                },
                code,
                id,
            },
            other => other,
        };
        Ip {
            src: self.dst,
            dst: self.src,
            l4,
        }
    }

    /// Bytes after the headers the fast path must read (a cut there is not a truncated header).
    pub fn payload_len(&self) -> usize {
        match self.l4 {
            L4::Udp { .. } => 4,
            L4::Other { .. } => 8,
            L4::Tcp { .. } | L4::Icmp { .. } => 0,
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

/// A TCP packet from `src`:`sport` to `dst`:`dport` with `flags`.
pub fn tcp(
    src: impl Into<IpAddr>,
    sport: u16,
    dst: impl Into<IpAddr>,
    dport: u16,
    flags: u8,
) -> Ip {
    Ip {
        src: src.into(),
        dst: dst.into(),
        l4: L4::Tcp {
            src: sport,
            dst: dport,
            flags,
        },
    }
}

/// A UDP datagram from `src`:`sport` to `dst`:`dport`.
pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Ip {
    Ip {
        src: src.into(),
        dst: dst.into(),
        l4: L4::Udp {
            src: sport,
            dst: dport,
        },
    }
}

/// A packet of any other IP protocol.
pub fn other(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, protocol: u8) -> Ip {
    Ip {
        src: src.into(),
        dst: dst.into(),
        l4: L4::Other { protocol },
    }
}

/// How the frame carries its VLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Untagged,
    /// One inline 802.1Q tag.
    Vlan(u16),
    /// Two stacked tags (QinQ): outer 802.1ad, inner 802.1Q.
    Stacked(u16, u16),
    /// An 802.1p priority tag (802.1Q, VLAN ID 0), then an inner 802.1Q tag if given.
    Priority(Option<u16>),
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
        Tag::Priority(inner) => {
            // PCP 5, VLAN ID 0.
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&(5u16 << 13).to_be_bytes());
            if let Some(inner) = inner {
                f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
                f.extend_from_slice(&inner.to_be_bytes());
            }
        }
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Bytes before layer 3 in a frame built with `tag`.
pub fn l2_len(tag: Tag) -> usize {
    match tag {
        Tag::Untagged => 14,
        Tag::Vlan(_) | Tag::Priority(None) => 18,
        Tag::Stacked(..) | Tag::Priority(Some(_)) => 22,
    }
}

/// Sets the IPv4 TTL (the header checksum follows) or the IPv6 hop limit of a
/// frame this module built with `tag`.
pub fn set_hop_limit(frame: &mut [u8], tag: Tag, hop_limit: u8) {
    let l3 = l2_len(tag);
    match frame[l3] >> 4 {
        4 => {
            frame[l3 + 8] = hop_limit;
            let header_len = usize::from(frame[l3] & 0x0f) * 4;
            frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let sum = checksum(&frame[l3..l3 + header_len]);
            frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        }
        6 => frame[l3 + 7] = hop_limit,
        version => panic!("not an IP frame (version {version})"),
    }
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
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// Builders for the conntrack and scenario tests: payloads, ICMP errors quoting
// another packet, IPv4 fragments.

impl Ip {
    /// The L4 header (with its few payload bytes) that [`Ip::to_bytes`] puts after the IP header.
    pub fn transport_bytes(&self) -> Vec<u8> {
        self.l4_bytes()
    }
}

/// An IP header from `src` to `dst` for `payload_len` bytes of `protocol`; for IPv4,
/// `id` and `flags_offset` (flags in the top 3 bits, offset in 8-byte units) fill the
/// fragmentation fields, and the header checksum is set.
fn ip_header(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    payload_len: usize,
    id: u16,
    flags_offset: u16,
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&flags_offset.to_be_bytes());
            h.extend_from_slice(&[64, protocol, 0, 0]);
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(payload_len as u16).to_be_bytes());
            h.extend_from_slice(&[protocol, 64]);
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
            h
        }
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

fn ethertype_of(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    }
}

/// A frame carrying `ip` followed by `payload` (application data), lengths adjusted.
pub fn ip_frame_with_payload(tag: Tag, ip: &Ip, payload: &[u8]) -> Vec<u8> {
    let mut l4 = ip.transport_bytes();
    l4.extend_from_slice(payload);
    let mut packet = ip_header(ip.src, ip.dst, ip.protocol(), l4.len(), 0x1234, 0x4000);
    packet.extend_from_slice(&l4);
    ethernet(tag, ethertype_of(ip.src), &packet)
}

/// An ICMP (IPv4) or ICMPv6 error of `icmp_type`/`code` from `src` to `dst`
/// quoting `original` whole (its IP header and L4 header), as a host or router
/// reporting on that packet sends it. Bytes 4..8 carry an MTU of 1280 (used by
/// "fragmentation needed" and "packet too big", ignored by the others).
pub fn icmp_error_frame(
    tag: Tag,
    src: IpAddr,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    original: &Ip,
) -> Vec<u8> {
    let protocol = if src.is_ipv4() { 1 } else { 58 };
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(&original.to_bytes());
    let mut packet = ip_header(src, dst, protocol, icmp.len(), 0x4321, 0);
    packet.extend_from_slice(&icmp);
    ethernet(tag, ethertype_of(src), &packet)
}

/// Where an IPv4 fragment sits in its datagram.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    /// IPv4 identification, shared by every fragment of the datagram.
    pub id: u16,
    /// Fragment offset in 8-byte units (0: the first fragment).
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// One IPv4 fragment of a datagram from `ip.src` to `ip.dst` of `ip`'s protocol,
/// carrying `payload` (for a first fragment, [`Ip::transport_bytes`] and more; for a
/// later one, whatever bytes follow in the datagram).
pub fn ipv4_fragment_frame(tag: Tag, ip: &Ip, fragment: Fragment, payload: &[u8]) -> Vec<u8> {
    assert!(ip.src.is_ipv4(), "IPv4 fragments only: {ip:?}");
    let flags_offset = (fragment.offset & 0x1fff) | if fragment.more { 0x2000 } else { 0 };
    let mut packet = ip_header(
        ip.src,
        ip.dst,
        ip.protocol(),
        payload.len(),
        fragment.id,
        flags_offset,
    );
    packet.extend_from_slice(payload);
    ethernet(tag, ETH_P_IPV4, &packet)
}

/// An IPv6 extension header, as [`ipv6_chain_frame`] writes it (RFC 8200 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// Hop-by-hop options (next header 0), `units` extra 8-byte units of padding.
    HopByHop { units: u8 },
    /// Routing (43), type 0 header with no addresses left.
    Routing { units: u8 },
    /// Destination options (60).
    DestOptions { units: u8 },
    /// Authentication header (51, RFC 4302): length in 4-byte units minus 2.
    Auth { words: u8 },
    /// Fragment header (44): offset in 8-byte units, more-fragments flag, identification.
    Fragment { id: u32, offset: u16, more: bool },
}

impl ExtHeader {
    /// The Next Header value that announces this header.
    pub fn number(self) -> u8 {
        match self {
            Self::HopByHop { .. } => 0,
            Self::Routing { .. } => 43,
            Self::DestOptions { .. } => 60,
            Self::Auth { .. } => 51,
            Self::Fragment { .. } => 44,
        }
    }

    /// The header's bytes, announcing `next`.
    pub fn bytes(self, next: u8) -> Vec<u8> {
        let padded = |len_field: u8, total: usize| {
            let mut h = vec![next, len_field];
            // PadN option (type 1) filling the rest: a valid options area.
            h.push(1);
            h.push((total - 4) as u8);
            h.resize(total, 0);
            h
        };
        match self {
            Self::HopByHop { units } | Self::DestOptions { units } => {
                padded(units, (usize::from(units) + 1) * 8)
            }
            Self::Routing { units } => {
                let mut h = vec![next, units, 0, 0];
                h.resize((usize::from(units) + 1) * 8, 0);
                h
            }
            Self::Auth { words } => {
                let mut h = vec![next, words, 0, 0];
                h.extend_from_slice(&0x0000_1234u32.to_be_bytes());
                h.resize((usize::from(words) + 2) * 4, 0);
                h
            }
            Self::Fragment { id, offset, more } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 frame from `ip.src` to `ip.dst` whose extension headers are `chain`
/// (in order) before `payload`, which the last header announces as `ip`'s
/// protocol (for a later fragment, `payload` is any part of the datagram).
pub fn ipv6_chain_frame(tag: Tag, ip: &Ip, chain: &[ExtHeader], payload: &[u8]) -> Vec<u8> {
    let mut rest = payload.to_vec();
    let mut next = ip.protocol();
    for header in chain.iter().rev() {
        let mut bytes = header.bytes(next);
        bytes.extend_from_slice(&rest);
        rest = bytes;
        next = header.number();
    }
    let mut packet = ip_header(ip.src, ip.dst, next, rest.len(), 0, 0);
    packet.extend_from_slice(&rest);
    ethernet(tag, ETH_P_IPV6, &packet)
}

/// One IPv6 fragment (a fragment header right after the fixed header) of a
/// datagram of `ip`'s protocol, carrying `payload`.
pub fn ipv6_fragment_frame(tag: Tag, ip: &Ip, fragment: Fragment, payload: &[u8]) -> Vec<u8> {
    assert!(ip.src.is_ipv6(), "IPv6 fragments only: {ip:?}");
    let header = ExtHeader::Fragment {
        id: u32::from(fragment.id) | 0x5000_0000,
        offset: fragment.offset,
        more: fragment.more,
    };
    ipv6_chain_frame(tag, ip, &[header], payload)
}

/// One fragment of either family (IPv4 or IPv6 by `ip`'s addresses).
pub fn fragment_frame(tag: Tag, ip: &Ip, fragment: Fragment, payload: &[u8]) -> Vec<u8> {
    if ip.src.is_ipv4() {
        ipv4_fragment_frame(tag, ip, fragment, payload)
    } else {
        ipv6_fragment_frame(tag, ip, fragment, payload)
    }
}
