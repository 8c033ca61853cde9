//! Header parsing for frames on the trunk: Ethernet, one 802.1Q tag (skb
//! metadata or inline), IPv4/IPv6 with bounded extension headers, and L4.
//! Every read is a bounds-checked load, so a short frame is an error value.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const VLAN_VID_MASK: u16 = 0x0fff;
const VLAN_TAG_LEN: usize = 4;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers skipped before giving up (Cilium uses the same bound).
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Why a frame of a pod's VLAN cannot be judged.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// A header is cut short or inconsistent.
    Malformed,
    /// Stacked tags (QinQ) or an ethertype that is neither IP nor ARP.
    UnsupportedL2,
}

/// Read access to a frame's bytes and to the tag the kernel may have moved
/// out of them; XDP will provide the same over its context.
pub trait Frame {
    fn load<T>(&self, offset: usize) -> Result<T, ParseError>;
    /// The VLAN ID carried in metadata (`vlan_present`/`vlan_tci`), if any.
    fn vlan_metadata(&self) -> Option<u16>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, ParseError> {
        TcContext::load(self, offset).map_err(|_| ParseError::Malformed)
    }

    #[inline(always)]
    fn vlan_metadata(&self) -> Option<u16> {
        // SAFETY: `skb` is the context pointer the kernel passed to the program.
        let skb = unsafe { &*self.skb.skb };
        (skb.vlan_present != 0).then_some(skb.vlan_tci as u16 & VLAN_VID_MASK)
    }
}

/// The layer-2 view: which VLAN, which protocol, where layer 3 starts.
#[derive(Clone, Copy)]
pub struct L2 {
    pub vlan: u16,
    pub ethertype: u16,
    pub l3_offset: usize,
}

/// Finds the frame's VLAN. `Ok(None)` is an untagged frame (not branch traffic).
/// On `Err`, the VLAN (if it could be read) is returned so the caller can
/// decide whether the frame belongs to a pod at all.
#[inline(always)]
pub fn parse_l2<F: Frame>(frame: &F) -> Result<Option<L2>, (Option<u16>, ParseError)> {
    let meta = frame.vlan_metadata();
    let eth: EthHdr = frame.load(0).map_err(|e| (meta, e))?;
    let ethertype = u16::from_be(eth.ether_type);
    let (vlan, ethertype, l3_offset) = match meta {
        Some(vlan) => (vlan, ethertype, EthHdr::LEN),
        None if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD => {
            let tag: [u8; 4] = frame.load(EthHdr::LEN).map_err(|e| (None, e))?;
            let vlan = u16::from_be_bytes([tag[0], tag[1]]) & VLAN_VID_MASK;
            let inner = u16::from_be_bytes([tag[2], tag[3]]);
            (vlan, inner, EthHdr::LEN + VLAN_TAG_LEN)
        }
        None => return Ok(None),
    };
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err((Some(vlan), ParseError::UnsupportedL2));
    }
    Ok(Some(L2 {
        vlan,
        ethertype,
        l3_offset,
    }))
}

/// Where in a datagram a packet sits, for IPv4/IPv6 fragments.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more to come: carries the L4 header.
    First,
    /// A later fragment: no L4 header, judged by the first one's verdict.
    Later,
}

/// The fields a verdict is made of. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one key layout serves both families.
#[derive(Clone, Copy)]
pub struct Packet {
    pub ipv6: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    pub fragment: Fragment,
    /// IPv4 identification or IPv6 fragment identification (low 16 bits).
    pub fragment_id: u16,
    /// TCP/UDP ports; for ICMP echo the identifier is in `src_port`.
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
}

/// What a tagged frame carries.
pub enum Payload {
    Ip(Packet),
    Arp,
}

/// Parses layer 3 and 4 of a tagged frame.
#[inline(always)]
pub fn parse_l3<F: Frame>(frame: &F, l2: L2) -> Result<Payload, ParseError> {
    match l2.ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, l2).map(Payload::Ip),
        ETH_P_IPV6 => parse_ipv6(frame, l2).map(Payload::Ip),
        ETH_P_ARP => Ok(Payload::Arp),
        _ => Err(ParseError::UnsupportedL2),
    }
}

#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, l2: L2) -> Result<Packet, ParseError> {
    let ip: Ipv4Hdr = frame.load(l2.l3_offset)?;
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    if usize::from(u16::from_be_bytes(ip.tot_len)) < header_len {
        return Err(ParseError::Malformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let more_fragments = frags & 0x2000 != 0;
    let fragment = match (frags & 0x1fff, more_fragments) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    let mut packet = Packet {
        ipv6: false,
        src: v4_mapped(ip.src_addr),
        dst: v4_mapped(ip.dst_addr),
        protocol: ip.proto,
        fragment,
        fragment_id: u16::from_be_bytes(ip.id),
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
    };
    if fragment != Fragment::Later {
        parse_l4(frame, l2.l3_offset + header_len, &mut packet)?;
    }
    Ok(packet)
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, l2: L2) -> Result<Packet, ParseError> {
    let ip: Ipv6Hdr = frame.load(l2.l3_offset)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let mut packet = Packet {
        ipv6: true,
        src: ip.src_addr,
        dst: ip.dst_addr,
        protocol: ip.next_hdr,
        fragment: Fragment::Whole,
        fragment_id: 0,
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
    };
    let mut offset = l2.l3_offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let header_len = match packet.protocol {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: [u8; 2] = frame.load(offset)?;
                packet.protocol = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            IPV6_AUTH => {
                let ext: [u8; 2] = frame.load(offset)?;
                packet.protocol = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            IPV6_FRAGMENT => {
                let ext: [u8; 8] = frame.load(offset)?;
                packet.protocol = ext[0];
                let offset_flags = u16::from_be_bytes([ext[2], ext[3]]);
                packet.fragment = match (offset_flags & 0xfff8, offset_flags & 1 != 0) {
                    (0, false) => Fragment::Whole,
                    (0, true) => Fragment::First,
                    _ => Fragment::Later,
                };
                packet.fragment_id = u16::from_be_bytes([ext[6], ext[7]]);
                8
            }
            _ => break,
        };
        offset += header_len;
    }
    match packet.protocol {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
            Err(ParseError::Malformed)
        }
        _ if packet.fragment == Fragment::Later => Ok(packet),
        _ => {
            parse_l4(frame, offset, &mut packet)?;
            Ok(packet)
        }
    }
}

#[inline(always)]
fn parse_l4<F: Frame>(frame: &F, offset: usize, packet: &mut Packet) -> Result<(), ParseError> {
    match packet.protocol {
        IPPROTO_TCP => {
            // Ports, then data offset and flags at bytes 12..14.
            let tcp: [u8; 20] = frame.load(offset)?;
            if tcp[12] >> 4 < 5 {
                return Err(ParseError::Malformed);
            }
            packet.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            packet.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            packet.tcp_flags = tcp[13];
        }
        IPPROTO_UDP => {
            let udp: [u8; 8] = frame.load(offset)?;
            packet.src_port = u16::from_be_bytes([udp[0], udp[1]]);
            packet.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp: [u8; 8] = frame.load(offset)?;
            packet.icmp_type = icmp[0];
            packet.icmp_code = icmp[1];
            packet.src_port = u16::from_be_bytes([icmp[4], icmp[5]]);
        }
        _ => {}
    }
    Ok(())
}
