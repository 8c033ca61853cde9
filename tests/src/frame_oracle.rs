//! What the frame stage must decide, read from a frame's bytes by the
//! standards, not by the kernel's parser (`enforcer-ebpf/src/parse.rs`,
//! `verdict.rs`): the one evaluator the project keeps twice, on purpose, so
//! that the differential test can catch the parser's mistakes.
//!
//! Sources: IEEE 802.1Q (tags, VLAN ID 0 is a priority tag, not a VLAN),
//! RFC 826 (ARP), RFC 791 (IPv4 header and fragments), RFC 8200 (IPv6,
//! extension headers: hop-by-hop only first, one fragment header, a later
//! fragment's payload is not headers; reassembly by source, destination and
//! identification), RFC 4302 (AH length), RFC 793/768/792/4443 (the fixed
//! L4 headers), RFC 6980 (fragmented neighbour discovery is not discovery),
//! RFC 1858 (a first fragment must carry the transport header), and
//! sg-semantics.md §5 (`eval::neighbour_discovery`), §4 (`enforcer::policy::flow`).
//! Two choices are the implementation's, stated here: the parser follows at
//! most [`EXTENSION_BOUND`] IPv6 extension headers, and an ICMP error's quoted
//! packet is read without its own extension headers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{BranchPod, Direction, Model, UnknownVlanAction};
use enforcer::policy::eval;
use enforcer::policy::flow::{
    EmbeddedHeader, FlowTable, FlowVerdict, PacketMeta, embedded_key, flow_key,
};
use enforcer_common::{CtKey, Reason};

/// IPv6 extension headers the fast path follows before it gives up (fail closed).
pub const EXTENSION_BOUND: usize = 4;

/// Every way a frame can go through the frame stage; the differential test
/// fails unless each was taken.
pub const PATHS: &[&str] = &[
    "untagged",
    "priority tag alone",
    "priority tag, pod VLAN inside",
    "priority tag, unknown VLAN inside",
    "priority tag, inner tag cut short",
    "tag cut short",
    "stacked tags on a pod VLAN",
    "stacked tags, unknown VLAN",
    "unknown VLAN",
    "unsupported ethertype",
    "ARP",
    "ARP spoofed",
    "ARP cut short",
    "IPv4 header cut short",
    "IPv4 bad version or IHL",
    "IPv4 total length below header",
    "IPv4 options",
    "IPv6 header cut short",
    "IPv6 bad version",
    "IPv6 extension headers",
    "IPv6 extension header cut short",
    "IPv6 extensions past the bound",
    "IPv6 hop-by-hop not first",
    "IPv6 two fragment headers",
    "L4 header cut short",
    "TCP data offset below 5",
    "neighbour discovery",
    "neighbour discovery refused",
    "spoofed",
    "later fragment of an allowed datagram",
    "later fragment without an allowed first",
    "IPv4 first fragment",
    "IPv6 first fragment",
    "fragment allowance spent",
    "flow stage",
];

/// The frame stage's outcome for one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub reason: Reason,
    /// One of [`PATHS`].
    pub path: &'static str,
    /// The conntrack key, when the flow stage judged the packet.
    pub flow: Option<CtKey>,
    /// A passed egress frame of a source-NATed flow, or an ICMP error about one:
    /// the port it leaves from (the kernel translates it and sends it out of the
    /// primary interface); else 0.
    pub nat_port: u16,
}

fn done(reason: Reason, path: &'static str) -> Judgement {
    Judgement {
        reason,
        path,
        flow: None,
        nat_port: 0,
    }
}

/// Reassembly identity of a datagram: RFC 791 for IPv4 (with the protocol),
/// RFC 8200 §4.5 for IPv6 (without), per pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DatagramKey {
    vlan: u16,
    src: IpAddr,
    dst: IpAddr,
    protocol: Option<u8>,
    id: u32,
}

/// The datagrams whose first fragment was allowed, as the fast path keeps
/// them: each pod holds at most its allowance (`maxFragmentsPerPod`).
#[derive(Default)]
pub struct FrameOracle {
    allowed: BTreeSet<DatagramKey>,
    held: BTreeMap<u16, u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    Whole,
    First,
    Later,
}

/// What the IP layer says of a packet.
struct IpView {
    src: IpAddr,
    dst: IpAddr,
    hop_limit: u8,
    /// The upper-layer protocol (for a later fragment: what the fragment header announces).
    protocol: u8,
    position: Position,
    fragment_id: u32,
    /// Where the upper-layer header starts.
    l4: usize,
    path: &'static str,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    frame
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, 0x8100 | 0x88a8)
}

fn v4(bytes: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

fn v6(bytes: &[u8]) -> IpAddr {
    let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
    IpAddr::V6(Ipv6Addr::from(octets))
}

impl FrameOracle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every datagram (the kernel's fragment table was emptied).
    pub fn clear(&mut self) {
        self.allowed.clear();
        self.held.clear();
    }

    /// Judges `frame` travelling in `direction` (ingress: towards the pod),
    /// its tag in skb metadata if `metadata` holds a VLAN ID; the flow stage
    /// is `flows`, updated as the kernel updates its tracker.
    pub fn judge(
        &mut self,
        model: &Model,
        flows: &mut FlowTable,
        frame: &[u8],
        metadata: Option<u16>,
        direction: Direction,
        now_ns: u64,
    ) -> Judgement {
        let pod_of = |vlan: u16| model.pods.iter().find(|p| p.vlan == vlan);
        let unknown = |path| {
            if model.node.unknown_vlan == UnknownVlanAction::Pass {
                done(Reason::PassUnknownVlan, path)
            } else {
                done(Reason::DropUnknownVlan, path)
            }
        };
        // IEEE 802.1Q: the outer tag is in metadata (the NIC or kernel took it) or inline.
        let (vid, ethertype, l3) = match metadata {
            Some(vid) => match be16(frame, 12) {
                Some(ethertype) => (vid, ethertype, 14),
                None => {
                    return match pod_of(vid) {
                        Some(_) => done(Reason::DropMalformed, "tag cut short"),
                        None => unknown("tag cut short"),
                    };
                }
            },
            None => {
                let outer = be16(frame, 12).expect("frames have an Ethernet header");
                if !is_tag(outer) {
                    return done(Reason::PassUntagged, "untagged");
                }
                match (be16(frame, 14), be16(frame, 16)) {
                    (Some(tci), Some(inner)) => (tci & 0x0fff, inner, 18),
                    _ => return done(Reason::DropMalformed, "tag cut short"),
                }
            }
        };
        if vid == 0 {
            // A priority tag: no VLAN. Linux delivers by the tag inside, if any.
            if !is_tag(ethertype) {
                return done(Reason::PassUntagged, "priority tag alone");
            }
            let Some(inner) = be16(frame, l3) else {
                return done(Reason::DropMalformed, "priority tag, inner tag cut short");
            };
            return match pod_of(inner & 0x0fff) {
                Some(_) => done(Reason::DropUnsupportedL2, "priority tag, pod VLAN inside"),
                None => unknown("priority tag, unknown VLAN inside"),
            };
        }
        if is_tag(ethertype) {
            return match pod_of(vid) {
                Some(_) => done(Reason::DropUnsupportedL2, "stacked tags on a pod VLAN"),
                None => unknown("stacked tags, unknown VLAN"),
            };
        }
        let Some(pod) = pod_of(vid) else {
            return unknown("unknown VLAN");
        };
        let ip = match ethertype {
            0x0806 => return arp(pod, frame, l3, direction),
            0x0800 => ipv4(frame, l3),
            0x86dd => ipv6(frame, l3),
            _ => return done(Reason::DropUnsupportedL2, "unsupported ethertype"),
        };
        let ip = match ip {
            Ok(ip) => ip,
            Err(path) => return done(Reason::DropMalformed, path),
        };
        let mut meta = PacketMeta::other(direction, ip.src, ip.dst, ip.protocol);
        meta.len = frame.len() as u32;
        meta.first_fragment = ip.position == Position::First;
        if ip.position != Position::Later
            && let Err(path) = transport(frame, ip.l4, &mut meta)
        {
            return done(Reason::DropMalformed, path);
        }
        // RFC 6980: discovery is never fragmented, and sg-semantics §5 says how it passes.
        if let (IpAddr::V6(src), IpAddr::V6(dst), 58, Position::Whole) =
            (ip.src, ip.dst, ip.protocol, ip.position)
            && eval::NEIGHBOUR_DISCOVERY_TYPES.contains(&meta.icmp_type)
        {
            if eval::neighbour_discovery(pod, direction, src, dst, ip.hop_limit, meta.icmp_type) {
                return done(Reason::PassLinkLayer, "neighbour discovery");
            }
            if !owns(pod, direction, &ip) {
                return done(Reason::DropSpoofed, "neighbour discovery refused");
            }
        }
        if !owns(pod, direction, &ip) {
            return done(Reason::DropSpoofed, "spoofed");
        }
        let datagram = DatagramKey {
            vlan: pod.vlan,
            src: ip.src,
            dst: ip.dst,
            protocol: ip.src.is_ipv4().then_some(ip.protocol),
            id: ip.fragment_id,
        };
        if ip.position == Position::Later {
            return if self.allowed.contains(&datagram) {
                done(
                    Reason::PassFragment,
                    "later fragment of an allowed datagram",
                )
            } else {
                done(
                    Reason::DropFragment,
                    "later fragment without an allowed first",
                )
            };
        }
        let key = flow_key(pod.vlan, &meta);
        let reason = flow_reason(flows.process(model, pod, meta, now_ns));
        if ip.position == Position::First && !reason.is_drop() {
            let held = self.held.get(&pod.vlan).copied().unwrap_or(0);
            if !self.allowed.contains(&datagram) {
                if held >= model.node.max_fragments_per_pod {
                    return Judgement {
                        reason: Reason::DropFragmentLimit,
                        path: "fragment allowance spent",
                        flow: Some(key),
                        nat_port: 0,
                    };
                }
                self.allowed.insert(datagram);
                self.held.insert(pod.vlan, held + 1);
            }
        }
        // What leaves translated: the pod's packets of a translated flow, and the
        // errors it sends about one (keyed by the packet they quote).
        let translated = match (direction, reason, &meta.embedded) {
            (Direction::Egress, Reason::PassNew | Reason::PassEstablished, _) => Some(key),
            (Direction::Egress, Reason::PassRelated, Some(quoted)) => {
                Some(embedded_key(pod.vlan, direction, quoted))
            }
            _ => None,
        };
        Judgement {
            reason,
            path: ip.path,
            flow: Some(key),
            nat_port: translated
                .and_then(|key| flows.get(&key))
                .map_or(0, |entry| entry.nat_port),
        }
    }
}

/// The flow stage's verdict as the kernel counts it.
fn flow_reason(verdict: FlowVerdict) -> Reason {
    match verdict {
        FlowVerdict::Established(_) => Reason::PassEstablished,
        FlowVerdict::Related => Reason::PassRelated,
        FlowVerdict::New { evaluation, .. } => match evaluation.reason {
            eval::Reason::Unfiltered(_) => Reason::PassUnfiltered,
            eval::Reason::SameNode => Reason::PassSameNode,
            eval::Reason::Allowed => Reason::PassNew,
            eval::Reason::NoRule { .. } => unreachable!("an allowed flow"),
        },
        FlowVerdict::OverLimit(_) => Reason::DropFlowLimit,
        FlowVerdict::NatExhausted(_) => Reason::DropNatExhausted,
        FlowVerdict::Denied(evaluation) => match evaluation.reason {
            eval::Reason::NoRule {
                refused: eval::Refused::Primary,
            } => Reason::DropPrimaryPolicy,
            _ => Reason::DropPolicy,
        },
    }
}

/// Egress: the source is the pod's; ingress: the destination is (same family).
fn owns(pod: &BranchPod, direction: Direction, ip: &IpView) -> bool {
    let pod_side = match direction {
        Direction::Ingress => ip.dst,
        Direction::Egress => ip.src,
    };
    match pod_side {
        IpAddr::V4(a) => pod.ipv4 == Some(a),
        IpAddr::V6(a) => pod.ipv6 == Some(a),
    }
}

/// RFC 826 for Ethernet/IPv4 (address sizes 6 and 4): the sender must be the pod when it sends.
fn arp(pod: &BranchPod, frame: &[u8], l3: usize, direction: Direction) -> Judgement {
    let (Some(sizes), Some(sender)) = (frame.get(l3 + 4..l3 + 6), frame.get(l3 + 14..l3 + 18))
    else {
        return done(Reason::DropMalformed, "ARP cut short");
    };
    if sizes != [6, 4] {
        return done(Reason::DropMalformed, "ARP cut short");
    }
    let sender = Ipv4Addr::new(sender[0], sender[1], sender[2], sender[3]);
    if direction == Direction::Egress && pod.ipv4 != Some(sender) {
        return done(Reason::DropSpoofed, "ARP spoofed");
    }
    done(Reason::PassLinkLayer, "ARP")
}

/// RFC 791: a 20-byte header at least, IHL >= 5, the whole header (options
/// included) present, and a total length that covers it.
fn ipv4(frame: &[u8], l3: usize) -> Result<IpView, &'static str> {
    let header = frame.get(l3..l3 + 20).ok_or("IPv4 header cut short")?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || ihl < 20 {
        return Err("IPv4 bad version or IHL");
    }
    if usize::from(u16::from_be_bytes([header[2], header[3]])) < ihl {
        return Err("IPv4 total length below header");
    }
    if frame.len() < l3 + ihl {
        return Err("IPv4 header cut short");
    }
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let (more, offset) = (flags_offset & 0x2000 != 0, flags_offset & 0x1fff);
    let position = match (offset, more) {
        (0, false) => Position::Whole,
        (0, true) => Position::First,
        _ => Position::Later,
    };
    Ok(IpView {
        src: v4(&header[12..16]),
        dst: v4(&header[16..20]),
        hop_limit: header[8],
        protocol: header[9],
        position,
        fragment_id: u32::from(u16::from_be_bytes([header[4], header[5]])),
        l4: l3 + ihl,
        path: if ihl > 20 {
            "IPv4 options"
        } else if position == Position::First {
            "IPv4 first fragment"
        } else {
            "flow stage"
        },
    })
}

/// RFC 8200: the fixed header, then extension headers until the upper layer;
/// hop-by-hop only right after the fixed header, one fragment header, and after
/// a later fragment's fragment header only fragment payload.
fn ipv6(frame: &[u8], l3: usize) -> Result<IpView, &'static str> {
    let header = frame.get(l3..l3 + 40).ok_or("IPv6 header cut short")?;
    if header[0] >> 4 != 6 {
        return Err("IPv6 bad version");
    }
    let mut view = IpView {
        src: v6(&header[8..24]),
        dst: v6(&header[24..40]),
        hop_limit: header[7],
        protocol: header[6],
        position: Position::Whole,
        fragment_id: 0,
        l4: l3 + 40,
        path: "flow stage",
    };
    let mut seen = 0;
    let mut fragment_header = false;
    while matches!(view.protocol, 0 | 43 | 44 | 51 | 60) {
        if seen == EXTENSION_BOUND {
            return Err("IPv6 extensions past the bound");
        }
        if view.protocol == 0 && seen > 0 {
            return Err("IPv6 hop-by-hop not first");
        }
        let at = view.l4;
        let fixed = frame
            .get(at..at + 2)
            .ok_or("IPv6 extension header cut short")?;
        let len = match view.protocol {
            51 => (usize::from(fixed[1]) + 2) * 4,
            44 => 8,
            _ => (usize::from(fixed[1]) + 1) * 8,
        };
        let whole = frame
            .get(at..at + len)
            .ok_or("IPv6 extension header cut short")?;
        let next = whole[0];
        view.path = "IPv6 extension headers";
        if view.protocol == 44 {
            if fragment_header {
                return Err("IPv6 two fragment headers");
            }
            fragment_header = true;
            let offset_flags = u16::from_be_bytes([whole[2], whole[3]]);
            view.fragment_id = u32::from_be_bytes([whole[4], whole[5], whole[6], whole[7]]);
            view.position = match (offset_flags >> 3, offset_flags & 1 != 0) {
                (0, false) => Position::Whole,
                (0, true) => Position::First,
                _ => Position::Later,
            };
            if view.position == Position::Later {
                view.protocol = next;
                view.l4 = at + len;
                return Ok(view);
            }
            if view.position == Position::First {
                view.path = "IPv6 first fragment";
            }
        }
        view.protocol = next;
        view.l4 = at + len;
        seen += 1;
    }
    Ok(view)
}

/// The fixed transport header (RFC 793, 768, 792, 4443) of a whole packet or
/// first fragment: the ports, flags, ICMP type, code and echo identifier, and
/// for an ICMP error the flow it quotes.
fn transport(frame: &[u8], at: usize, meta: &mut PacketMeta) -> Result<(), &'static str> {
    let cut = "L4 header cut short";
    match meta.protocol {
        6 => {
            let tcp = frame.get(at..at + 20).ok_or(cut)?;
            if tcp[12] >> 4 < 5 {
                return Err("TCP data offset below 5");
            }
            meta.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            meta.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            meta.tcp_flags = tcp[13];
        }
        17 => {
            let udp = frame.get(at..at + 8).ok_or(cut)?;
            meta.src_port = u16::from_be_bytes([udp[0], udp[1]]);
            meta.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
        }
        1 | 58 => {
            let icmp = frame.get(at..at + 8).ok_or(cut)?;
            (meta.icmp_type, meta.icmp_code) = (icmp[0], icmp[1]);
            meta.icmp_id = u16::from_be_bytes([icmp[4], icmp[5]]);
            let error = match meta.protocol {
                1 => matches!(meta.icmp_type, 3 | 4 | 11 | 12),
                _ => matches!(meta.icmp_type, 1..=4),
            };
            if error {
                meta.embedded = quoted(frame, at + 8, meta.src.is_ipv6());
            }
        }
        _ => {}
    }
    Ok(())
}

/// The packet an ICMP error quotes (its header and first bytes), if all of what
/// names its flow is there: addresses, protocol, ports or echo identifier.
fn quoted(frame: &[u8], at: usize, v6_error: bool) -> Option<EmbeddedHeader> {
    let (src, dst, protocol, l4) = if v6_error {
        let h = frame.get(at..at + 40)?;
        (v6(&h[8..24]), v6(&h[24..40]), h[6], at + 40)
    } else {
        let h = frame.get(at..at + 20)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        (v4(&h[12..16]), v4(&h[16..20]), h[9], at + ihl)
    };
    let mut embedded = EmbeddedHeader {
        src,
        dst,
        protocol,
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_id: 0,
    };
    match protocol {
        6 | 17 => {
            let ports = frame.get(l4..l4 + 4)?;
            embedded.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            embedded.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        1 | 58 => {
            let icmp = frame.get(l4..l4 + 8)?;
            embedded.icmp_type = icmp[0];
            embedded.icmp_id = u16::from_be_bytes([icmp[4], icmp[5]]);
        }
        _ => {}
    }
    Some(embedded)
}
