//! Header parsing for frames on the trunk: Ethernet, one 802.1Q tag (skb
//! metadata or inline), IPv4/IPv6 with bounded extension headers, and L4.
//! Every read is a bounds-checked load, so a short frame is an error value.
//!
//! Fields are loaded straight into their destination (`Frame::load_into`):
//! BPF has a 512-byte stack, and a temporary per header would exceed it.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The VLAN ID of an 802.1p priority tag: the frame belongs to no VLAN.
const PRIORITY_TAG_VID: u16 = 0;

const ETH_HEADER_LEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
const VLAN_VID_MASK: u16 = 0x0fff;
const VLAN_TAG_LEN: usize = 4;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// No header the parser reads starts past this offset: two tags, an IPv6
/// header and the extension headers it follows, each at most 2048 bytes.
const MAX_HEADER_OFFSET: usize = 0x3fff;

/// IPv6 extension headers skipped before giving up (Cilium uses the same bound).
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Why a frame of a pod's VLAN cannot be judged.
#[repr(u8)]
#[derive(Clone, Copy)]
pub enum ParseError {
    /// A header is cut short or inconsistent.
    Malformed,
    /// Stacked tags (QinQ) or an ethertype that is neither IP nor ARP.
    UnsupportedL2,
}

/// Read access to a frame's bytes and to the tag the kernel may have moved
/// out of them; TC and XDP provide the same over their contexts.
pub trait Frame {
    /// Copies `size_of::<T>()` bytes at `offset` into `dst`, or fails if the frame is shorter.
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), ParseError>;
    /// The VLAN ID carried in metadata (`vlan_present`/`vlan_tci`), if any.
    fn vlan_metadata(&self) -> Option<u16>;

    #[inline(always)]
    fn load<T: Default>(&self, offset: usize) -> Result<T, ParseError> {
        let mut value = T::default();
        self.load_into(offset, &mut value)?;
        Ok(value)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), ParseError> {
        if read_in_place(self.data(), self.data_end(), offset, dst)? {
            return Ok(());
        }
        // Past the linear part: the helper reads the paged data too.
        // SAFETY: `dst` is valid for `size_of::<T>()` bytes of writes, and the
        // helper fails without writing past the frame's end.
        loaded(unsafe {
            bpf_skb_load_bytes(
                self.as_ptr(),
                offset as u32,
                (dst as *mut T).cast(),
                size_of::<T>() as u32,
            )
        })
    }

    #[inline(always)]
    fn vlan_metadata(&self) -> Option<u16> {
        // SAFETY: `skb` is the context pointer the kernel passed to the program.
        let skb = unsafe { &*self.skb.skb };
        // Read whether or not a tag is present (a volatile load LLVM cannot
        // sink into the `Some` branch): an `Option`'s payload left unset for
        // `None` may be spilled across a helper call as an uninitialised
        // register, which the verifier refuses.
        // SAFETY: a field of the context, always readable.
        let tci = unsafe { core::ptr::read_volatile(&skb.vlan_tci) };
        let vlan = tci as u16 & VLAN_VID_MASK;
        (skb.vlan_present != 0).then_some(vlan)
    }
}

/// Reads `dst` at `offset` straight from the packet when it lies within
/// `data..data_end` (the headers, almost always), without a helper call;
/// `Ok(false)` when it does not (a helper must read it). An offset past any
/// header chain the parser follows is refused first, which also bounds it for
/// the verifier.
#[inline(always)]
fn read_in_place<T>(
    data: usize,
    data_end: usize,
    offset: usize,
    dst: &mut T,
) -> Result<bool, ParseError> {
    if offset > MAX_HEADER_OFFSET {
        return Err(ParseError::Malformed);
    }
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return Ok(false);
    }
    // SAFETY: `start..start + size_of::<T>()` was just checked to lie within
    // the packet's directly readable bytes; `dst` is valid for the write.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, (dst as *mut T).cast(), size_of::<T>())
    };
    Ok(true)
}

/// A load helper's result: the frame is shorter than the load.
#[inline(always)]
fn loaded(ret: i64) -> Result<(), ParseError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(ParseError::Malformed)
    }
}

/// At XDP the kernel has not yet moved the tag anywhere: it is always inline.
impl Frame for XdpContext {
    #[inline(always)]
    fn load_into<T>(&self, offset: usize, dst: &mut T) -> Result<(), ParseError> {
        if read_in_place(self.data(), self.data_end(), offset, dst)? {
            return Ok(());
        }
        // SAFETY: as for TC; the helper also reads across the fragments of a
        // multi-buffer frame, so the bounds are the frame's, not the first buffer's.
        loaded(unsafe {
            bpf_xdp_load_bytes(
                self.as_ptr().cast(),
                offset as u32,
                (dst as *mut T).cast(),
                size_of::<T>() as u32,
            )
        })
    }

    #[inline(always)]
    fn vlan_metadata(&self) -> Option<u16> {
        None
    }
}

/// The layer-2 view: which VLAN, which protocol, where layer 3 starts.
#[derive(Clone, Copy)]
pub struct L2 {
    pub vlan: u16,
    pub ethertype: u16,
    pub l3_offset: usize,
}

#[inline(always)]
fn load_be16<F: Frame>(frame: &F, offset: usize) -> Result<u16, ParseError> {
    frame.load::<[u8; 2]>(offset).map(u16::from_be_bytes)
}

/// Finds the frame's VLAN. `Ok(None)` is an untagged frame (not branch traffic).
/// On `Err`, the VLAN (if it could be read) is returned so the caller can
/// decide whether the frame belongs to a pod at all.
#[inline(always)]
pub fn parse_l2<F: Frame>(frame: &F) -> Result<Option<L2>, (Option<u16>, ParseError)> {
    let meta = frame.vlan_metadata();
    let ethertype = load_be16(frame, ETH_TYPE_OFFSET).map_err(|e| (meta, e))?;
    let (vlan, ethertype, l3_offset) = match meta {
        Some(vlan) => (vlan, ethertype, ETH_HEADER_LEN),
        None if is_tag(ethertype) => {
            let tag: [u8; 4] = frame.load(ETH_HEADER_LEN).map_err(|e| (None, e))?;
            let vlan = u16::from_be_bytes([tag[0], tag[1]]) & VLAN_VID_MASK;
            let inner = u16::from_be_bytes([tag[2], tag[3]]);
            (vlan, inner, ETH_HEADER_LEN + VLAN_TAG_LEN)
        }
        None => return Ok(None),
    };
    if vlan == PRIORITY_TAG_VID {
        // An 802.1p priority tag is no VLAN: Linux hands the frame to its inner
        // tag's VLAN device, or to the trunk itself when there is none. A pod's
        // VLAN behind it is stacked tags for that pod, never an unknown VLAN.
        if !is_tag(ethertype) {
            return Ok(None);
        }
        let inner: [u8; 2] = frame.load(l3_offset).map_err(|e| (None, e))?;
        let inner = u16::from_be_bytes(inner) & VLAN_VID_MASK;
        return Err((Some(inner), ParseError::UnsupportedL2));
    }
    if is_tag(ethertype) {
        return Err((Some(vlan), ParseError::UnsupportedL2));
    }
    Ok(Some(L2 {
        vlan,
        ethertype,
        l3_offset,
    }))
}

/// Whether `ethertype` announces an 802.1Q or 802.1ad tag.
#[inline(always)]
fn is_tag(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Where in a datagram a packet sits, for IPv4/IPv6 fragments.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub enum Fragment {
    /// Not fragmented.
    #[default]
    Whole,
    /// Offset 0 with more to come: carries the L4 header.
    First,
    /// A later fragment: no L4 header, judged by the first one's verdict.
    Later,
}

/// The fields a verdict is made of. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one key layout serves both families.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification or IPv6 fragment identification.
    pub fragment_id: u32,
    /// TCP/UDP ports; for ICMP echo the identifier is in `src_port`.
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the L4 header starts (meaningful unless a later fragment).
    pub l4_offset: u16,
    pub protocol: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
    pub ipv6: bool,
    pub fragment: Fragment,
    /// IPv4 TTL or IPv6 hop limit: neighbour discovery is only link-layer
    /// plumbing at 255 (RFC 4861 §6.1, §7.1), which no router forwards.
    pub hop_limit: u8,
}

/// What a tagged frame carries.
pub enum L3 {
    /// IP, parsed into the caller's [`Packet`].
    Ip,
    /// ARP, with the sender's IPv4 address.
    Arp { sender: [u8; 4] },
}

/// Outcome of the out-of-line parsers. Functions the compiler keeps as
/// separate BPF functions take and return only plain C-like types: BTF cannot
/// describe Rust's niche-packed `Result`s.
#[repr(u8)]
#[derive(PartialEq, Eq)]
pub enum ParseStatus {
    Ok,
    Malformed,
}

impl ParseStatus {
    #[inline(always)]
    fn of(result: Result<(), ParseError>) -> Self {
        match result {
            Ok(()) => Self::Ok,
            Err(_) => Self::Malformed,
        }
    }
}

/// Parses layer 3 and 4 of a tagged frame into `packet`.
#[inline(always)]
pub fn parse_l3<F: Frame>(frame: &F, l2: L2, packet: &mut Packet) -> Result<L3, ParseError> {
    match l2.ethertype {
        ETH_P_IPV4 | ETH_P_IPV6 => match parse_ip(frame, l2, packet) {
            ParseStatus::Ok => Ok(L3::Ip),
            ParseStatus::Malformed => Err(ParseError::Malformed),
        },
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP: hardware and protocol address sizes at 4..6,
            // the sender's IPv4 address at 14..18.
            let sizes: [u8; 2] = frame.load(l2.l3_offset + 4)?;
            if sizes != [6, 4] {
                return Err(ParseError::Malformed);
            }
            Ok(L3::Arp {
                sender: frame.load(l2.l3_offset + 14)?,
            })
        }
        _ => Err(ParseError::UnsupportedL2),
    }
}

/// The IP parsers are a separate BPF function for the stack's sake.
#[inline(never)]
fn parse_ip<F: Frame>(frame: &F, l2: L2, packet: &mut Packet) -> ParseStatus {
    ParseStatus::of(if l2.ethertype == ETH_P_IPV4 {
        parse_ipv4(frame, l2.l3_offset, packet)
    } else {
        parse_ipv6(frame, l2.l3_offset, packet)
    })
}

#[inline(always)]
fn v4_mapped(addr: &mut [u8; 16]) {
    addr[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
}

#[inline(always)]
fn fragment_of(offset: u16, more_fragments: bool) -> Fragment {
    match (offset, more_fragments) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, l3: usize, packet: &mut Packet) -> Result<(), ParseError> {
    // Version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol.
    let head: [u8; 10] = frame.load(l3)?;
    let header_len = usize::from(head[0] & 0x0f) * 4;
    if head[0] >> 4 != 4 || header_len < IPV4_HEADER_LEN {
        return Err(ParseError::Malformed);
    }
    if usize::from(u16::from_be_bytes([head[2], head[3]])) < header_len {
        return Err(ParseError::Malformed);
    }
    // The whole header, options included, must be there (a later fragment reads nothing after it).
    let _: [u8; 1] = frame.load(l3 + header_len - 1)?;
    let frags = u16::from_be_bytes([head[6], head[7]]);
    packet.ipv6 = false;
    packet.hop_limit = head[8];
    packet.protocol = head[9];
    packet.fragment_id = u32::from(u16::from_be_bytes([head[4], head[5]]));
    packet.fragment = fragment_of(frags & 0x1fff, frags & 0x2000 != 0);
    v4_mapped(&mut packet.src);
    v4_mapped(&mut packet.dst);
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    frame.load_into(l3 + 12, &mut src)?;
    frame.load_into(l3 + 16, &mut dst)?;
    packet.src[12..].copy_from_slice(&src);
    packet.dst[12..].copy_from_slice(&dst);
    packet.l4_offset = (l3 + header_len) as u16;
    if packet.fragment != Fragment::Later {
        parse_l4(frame, packet)?;
    }
    Ok(())
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, l3: usize, packet: &mut Packet) -> Result<(), ParseError> {
    let head: [u8; 8] = frame.load(l3)?;
    if head[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    packet.ipv6 = true;
    packet.protocol = head[6];
    packet.hop_limit = head[7];
    frame.load_into(l3 + 8, &mut packet.src)?;
    frame.load_into(l3 + 24, &mut packet.dst)?;
    let mut offset = l3 + IPV6_HEADER_LEN;
    let mut fragment_headers = 0u8;
    for index in 0..MAX_IPV6_EXT_HEADERS {
        let ext: [u8; 2] = match packet.protocol {
            // RFC 8200 §4.1: hop-by-hop options only right after the fixed header.
            IPV6_HOP_BY_HOP if index > 0 => return Err(ParseError::Malformed),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
                frame.load(offset)?
            }
            _ => break,
        };
        let header_len = match packet.protocol {
            IPV6_AUTH => (usize::from(ext[1]) + 2) * 4,
            IPV6_FRAGMENT => {
                // One fragment header per packet: a second could make a later
                // fragment look like a whole packet with headers of our choosing.
                if fragment_headers > 0 {
                    return Err(ParseError::Malformed);
                }
                fragment_headers += 1;
                let fragment: [u8; 8] = frame.load(offset)?;
                let offset_flags = u16::from_be_bytes([fragment[2], fragment[3]]);
                packet.fragment = fragment_of(offset_flags & 0xfff8, offset_flags & 1 != 0);
                packet.fragment_id =
                    u32::from_be_bytes([fragment[4], fragment[5], fragment[6], fragment[7]]);
                if packet.fragment == Fragment::Later {
                    // What follows a later fragment's header is payload, not headers.
                    packet.protocol = ext[0];
                    return Ok(());
                }
                8
            }
            _ => (usize::from(ext[1]) + 1) * 8,
        };
        // The whole header must be there, not only its first bytes.
        let _: [u8; 1] = frame.load(offset + header_len - 1)?;
        packet.protocol = ext[0];
        offset += header_len;
    }
    match packet.protocol {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
            Err(ParseError::Malformed)
        }
        _ => {
            packet.l4_offset = offset as u16;
            if packet.fragment != Fragment::Later {
                parse_l4(frame, packet)?;
            }
            Ok(())
        }
    }
}

#[inline(always)]
fn parse_l4<F: Frame>(frame: &F, packet: &mut Packet) -> Result<(), ParseError> {
    let offset = usize::from(packet.l4_offset);
    match packet.protocol {
        IPPROTO_TCP => {
            // Ports, then data offset and flags at 12..14; the header is at least 20 bytes.
            let tcp: [u8; 14] = frame.load(offset)?;
            let _: [u8; 1] = frame.load(offset + 19)?;
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

/// The flow an ICMP error is about: the embedded header of the packet that
/// caused it, as sent (so its source is the original sender).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Embedded {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

/// ICMP and ICMPv6 messages that report on another packet (RFC 792, RFC 4443),
/// by protocol number whatever the IP version, as `enforcer/src/flow.rs` models it.
#[inline(always)]
pub fn is_icmp_error(packet: &Packet) -> bool {
    match packet.protocol {
        IPPROTO_ICMP => matches!(packet.icmp_type, 3 | 4 | 11 | 12),
        IPPROTO_ICMPV6 => matches!(packet.icmp_type, 1..=4),
        _ => false,
    }
}

/// Whether an ICMP message is an echo request or reply, keyed by its identifier.
#[inline(always)]
pub fn is_icmp_echo(packet: &Packet) -> bool {
    match packet.protocol {
        IPPROTO_ICMP => matches!(packet.icmp_type, 0 | 8),
        IPPROTO_ICMPV6 => matches!(packet.icmp_type, 128 | 129),
        _ => false,
    }
}

/// Reads the header embedded in an ICMP error (after the 8-byte ICMP header).
#[inline(always)]
pub fn parse_embedded<F: Frame>(
    frame: &F,
    packet: &Packet,
    embedded: &mut Embedded,
) -> Result<(), ParseError> {
    let offset = usize::from(packet.l4_offset) + 8;
    let l4_offset = if packet.ipv6 {
        let head: [u8; 8] = frame.load(offset)?;
        embedded.protocol = head[6];
        frame.load_into(offset + 8, &mut embedded.src)?;
        frame.load_into(offset + 24, &mut embedded.dst)?;
        offset + IPV6_HEADER_LEN
    } else {
        let head: [u8; 10] = frame.load(offset)?;
        let header_len = usize::from(head[0] & 0x0f) * 4;
        if header_len < IPV4_HEADER_LEN {
            return Err(ParseError::Malformed);
        }
        embedded.protocol = head[9];
        v4_mapped(&mut embedded.src);
        v4_mapped(&mut embedded.dst);
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        frame.load_into(offset + 12, &mut src)?;
        frame.load_into(offset + 16, &mut dst)?;
        embedded.src[12..].copy_from_slice(&src);
        embedded.dst[12..].copy_from_slice(&dst);
        offset + header_len
    };
    match embedded.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u8; 4] = frame.load(l4_offset)?;
            embedded.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            embedded.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Only an embedded echo names a flow (by its identifier).
            let icmp: [u8; 8] = frame.load(l4_offset)?;
            let echo = match embedded.protocol {
                IPPROTO_ICMP => matches!(icmp[0], 0 | 8),
                _ => matches!(icmp[0], 128 | 129),
            };
            if echo {
                embedded.src_port = u16::from_be_bytes([icmp[4], icmp[5]]);
            }
        }
        _ => {}
    }
    Ok(())
}
