//! Standard mode's source NAT (sg-semantics.md §6): a standard-mode pod's new
//! flow to an IPv4 address outside the VPC (and `excludeSnatCidrs`) leaves the
//! primary interface from `primaryIPs[0]` at a port of `snatPortRange`, and
//! its replies, ICMP errors included, go back to the pod on its VLAN. The
//! mapping lives in `NAT_PORTS` beside the flow's `CONNTRACK` entry, which
//! holds the port: the established path needs no second lookup.

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_skb_vlan_pop, bpf_skb_vlan_push},
    programs::TcContext,
};
use enforcer_common::{
    CtKey, NAT_PROBES, NatKey, NatSettings, NatTarget, Reason, Settings, nat_port_hash,
};

use crate::Direction;
use crate::conntrack;
use crate::maps::{CONNTRACK, NAT_PORTS, SETTINGS};
use crate::parse::{self, Embedded, Fragment, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, L2, Packet};
use crate::verdict::{Deferred, FlowContext, Stage, Subject};

/// TC_ACT_UNSPEC (TCX_NEXT): not a translated flow's frame; the node's stack has it.
const NOT_OURS: i32 = TC_ACT_UNSPEC;
const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const IPV4_CSUM: usize = 10;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

/// Whether a new flow the groups allowed may be translated: a whole IPv4 TCP,
/// UDP or ICMP echo request packet from a standard-mode pod (the caller checks
/// the mode and direction), with translation on. [`track`] then asks whether
/// an exemption covers its destination.
#[inline(always)]
pub fn may_apply(packet: &Packet, settings: &Settings) -> bool {
    let translatable = match packet.protocol {
        IPPROTO_TCP | IPPROTO_UDP => true,
        IPPROTO_ICMP => packet.icmp_type == ICMP_ECHO_REQUEST,
        _ => false,
    };
    translatable && settings.nat.enabled() && !packet.ipv6 && packet.fragment == Fragment::Whole
}

/// Tracks a new flow [`may_apply`] deferred, translated unless its
/// destination is exempt: maps a port, then creates the flow's entry with it.
/// Returns the frame's reason: `PassNew`, or the drop of an exhausted port
/// range or a spent flow allowance (nothing recorded then). Out of line, after
/// the verdict, so that the verifier walks it once per verdict rather than
/// once per path through the policy lookups.
#[inline(never)]
pub fn track(ctx: &TcContext, subject: &mut Subject) -> Reason {
    let Some(settings) = SETTINGS.get(0) else {
        return Reason::DropFlowLimit;
    };
    let packet = &subject.packet;
    let flow = FlowContext {
        vlan: subject.vlan,
        direction: Direction::Egress,
        len: ctx.len(),
        now: conntrack::now_ns(),
        settings,
        stage: Stage::Judge,
    };
    let key = conntrack::key(flow.vlan, packet, Direction::Egress);
    let admitted = &mut subject.admitted;
    let translated = !settings.nat.exempts(v4(&packet.dst));
    if !translated && admitted.deferred == Deferred::Untracked {
        return Reason::PassNew;
    }
    let nat_port = if translated { map(ctx, &key, &flow) } else { 0 };
    if translated && nat_port == 0 {
        return Reason::DropNatExhausted;
    }
    if !conntrack::create(&key, packet, &flow, admitted.rules, nat_port) {
        if translated {
            unmap(&key, nat_port);
        }
        return Reason::DropFlowLimit;
    }
    admitted.nat_port = nat_port;
    Reason::PassNew
}

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

#[inline(always)]
fn nat_key(flow: &CtKey, nat_port: u16) -> NatKey {
    NatKey {
        peer_addr: v4(&flow.peer_addr),
        peer_port: flow.peer_port,
        nat_port,
        protocol: flow.protocol,
        _pad: [0; 3],
    }
}

/// Maps the pod's flow `key` to a translated port and returns it; 0 when no
/// port is free. The flow's own mapping (an expired or reopened entry being
/// replaced) is kept; otherwise ports are tried from
/// [`NatSettings::candidate_port`] on, and a port whose mapping exists (live
/// or not yet swept) is never taken over. Out of line for the stack.
#[inline(never)]
fn map(frame: &TcContext, key: &CtKey, flow: &FlowContext) -> u16 {
    let nat = &flow.settings.nat;
    // SAFETY: read-only look at plain data.
    if let Some(entry) = unsafe { CONNTRACK.get(key) }
        && entry.nat_port != 0
        // SAFETY: as above.
        && let Some(target) = unsafe { NAT_PORTS.get(nat_key(key, entry.nat_port)) }
        && target.flow == *key
    {
        return entry.nat_port;
    }
    let Ok(macs) = frame.load::<[u8; 12]>(0) else {
        return 0;
    };
    let mut target = NatTarget {
        created_ns: flow.now,
        flow: *key,
        pod_mac: [0; 6],
        router_mac: [0; 6],
        _pad: [0; 4],
    };
    target.router_mac.copy_from_slice(&macs[..6]);
    target.pod_mac.copy_from_slice(&macs[6..]);
    let (hash, probes) = (nat_port_hash(key), nat.probes());
    for attempt in 0..NAT_PROBES {
        if attempt >= probes {
            break;
        }
        let port = nat.candidate_port(hash, attempt);
        if NAT_PORTS
            .insert(nat_key(key, port), target, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return port;
        }
    }
    0
}

/// Gives back a port [`map`] took for a flow that could not be tracked.
#[inline(always)]
fn unmap(key: &CtKey, nat_port: u16) {
    let _ = NAT_PORTS.remove(nat_key(key, nat_port));
}

/// Translates a judged egress frame of a mapped flow (its source becomes the
/// NAT address and port) and sends it out of the primary interface, untagged,
/// with the Ethernet addresses of the route there. `TC_ACT_SHOT` if a helper
/// fails on the frame.
#[inline(never)]
pub fn leave(ctx: &TcContext, packet: &Packet, nat_port: u16) -> i32 {
    let Some(settings) = SETTINGS.get(0) else {
        return TC_ACT_SHOT;
    };
    if translate_source(ctx, packet, nat_port, &settings.nat).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: no parameters: the kernel's FIB and neighbour tables give the next hop.
    unsafe { bpf_redirect_neigh(settings.nat.primary_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// A helper refused the frame.
pub struct Refused;

#[inline(always)]
fn helper(ret: i64) -> Result<(), Refused> {
    if ret == 0 { Ok(()) } else { Err(Refused) }
}

#[inline(always)]
fn raw32(bytes: [u8; 4]) -> u64 {
    u64::from(u32::from_ne_bytes(bytes))
}

#[inline(always)]
fn raw16(value: u16) -> u64 {
    u64::from(u16::from_ne_bytes(value.to_be_bytes()))
}

/// Where the L4 checksum of `protocol` sits in its header, and the flags its
/// updates take (UDP's 0 means "none" and must stay so).
#[inline(always)]
fn l4_checksum(protocol: u8) -> (usize, u64) {
    match protocol {
        IPPROTO_TCP => (16, 0),
        IPPROTO_UDP => (6, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (2, 0),
    }
}

/// The IPv4 header's length at `l3`.
#[inline(always)]
fn header_len(ctx: &TcContext, l3: usize) -> Result<usize, Refused> {
    let first: [u8; 1] = ctx.load(l3).map_err(|_| Refused)?;
    Ok(usize::from(first[0] & 0x0f) * 4)
}

/// Replaces an IPv4 address at `l3 + field`, keeping the header checksum
/// and, where the L4 checksum covers the address (TCP, UDP), that one.
#[inline(always)]
fn set_address(
    ctx: &TcContext,
    l3: usize,
    field: usize,
    l4_csum: Option<(usize, u64)>,
    from: [u8; 4],
    to: [u8; 4],
) -> Result<(), Refused> {
    ctx.store(l3 + field, &to, 0).map_err(|_| Refused)?;
    ctx.l3_csum_replace(l3 + IPV4_CSUM, raw32(from), raw32(to), 4)
        .map_err(|_| Refused)?;
    if let Some((offset, flags)) = l4_csum {
        pseudo_address(ctx, (offset, flags), from, to)?;
    }
    Ok(())
}

/// Keeps a TCP or UDP checksum (at `csum`, with `flags`) over an address of
/// its pseudo header that changed.
#[inline(always)]
fn pseudo_address(
    ctx: &TcContext,
    (csum, flags): (usize, u64),
    from: [u8; 4],
    to: [u8; 4],
) -> Result<(), Refused> {
    ctx.l4_csum_replace(
        csum,
        raw32(from),
        raw32(to),
        flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|_| Refused)
}

/// Replaces a 16-bit port or identifier at `offset`, keeping the checksum at `csum`.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    offset: usize,
    (csum, flags): (usize, u64),
    from: u16,
    to: u16,
) -> Result<(), Refused> {
    ctx.store(offset, &to.to_be_bytes(), 0)
        .map_err(|_| Refused)?;
    ctx.l4_csum_replace(csum, raw16(from), raw16(to), flags | 2)
        .map_err(|_| Refused)
}

/// Where a TCP/UDP port or an ICMP echo identifier sits in its header:
/// the source (`source`) or destination one.
#[inline(always)]
fn port_field(protocol: u8, source: bool) -> usize {
    match (protocol, source) {
        (IPPROTO_TCP | IPPROTO_UDP, true) => 0,
        (IPPROTO_TCP | IPPROTO_UDP, false) => 2,
        _ => 4,
    }
}

/// The pod's address (and port, or the quoted packet's destination for an
/// ICMP error the pod sends about a translated flow) become the NAT address
/// and port, without the tag.
#[inline(always)]
fn translate_source(
    ctx: &TcContext,
    packet: &Packet,
    nat_port: u16,
    nat: &NatSettings,
) -> Result<(), Refused> {
    // SAFETY: the context pointer the kernel passed to the program.
    helper(unsafe { bpf_skb_vlan_pop(ctx.skb.skb) })?;
    let ethertype: [u8; 2] = ctx.load(12).map_err(|_| Refused)?;
    if u16::from_be_bytes(ethertype) != ETH_P_IPV4 {
        return Err(Refused);
    }
    let l3 = ETH_HEADER_LEN;
    let l4 = l3 + header_len(ctx, l3)?;
    let pod_addr = v4(&packet.src);
    if parse::is_icmp_error(packet) {
        set_address(ctx, l3, IPV4_SRC, None, pod_addr, nat.address)?;
        let quoted = Quoted {
            at: l4 + 8,
            source: false,
            from: pod_addr,
            to: nat.address,
            to_port: nat_port,
        };
        return rewrite_quoted(ctx, l4, &quoted);
    }
    let (csum, flags) = l4_checksum(packet.protocol);
    let pseudo = (packet.protocol != IPPROTO_ICMP).then_some((l4 + csum, flags));
    set_address(ctx, l3, IPV4_SRC, pseudo, pod_addr, nat.address)?;
    set_port(
        ctx,
        l4 + port_field(packet.protocol, true),
        (l4 + csum, flags),
        packet.src_port,
        nat_port,
    )
}

/// Return path, on the primary interface: a reply or ICMP error of a
/// translated flow gets the pod's address and port back (the error's quoted
/// header too) and goes on to the pod tagged with its VLAN, as if it had
/// arrived on the trunk, whose programs judge it as the flow's. Anything else
/// is the node's own traffic and is left alone.
#[inline(never)]
pub fn arrive(ctx: &TcContext) -> i32 {
    let Some(settings) = SETTINGS.get(0) else {
        return NOT_OURS;
    };
    if !settings.nat.enabled() {
        return NOT_OURS;
    }
    let mut packet = Packet::default();
    let Some(reply) = reply_of(ctx, settings, &mut packet) else {
        return NOT_OURS;
    };
    // SAFETY: read-only copy of plain data.
    let Some(target) = (unsafe { NAT_PORTS.get(reply.key) }).copied() else {
        return NOT_OURS;
    };
    if restore(ctx, &packet, &reply, &target).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain arguments; the frame goes in on the trunk as the pod's VLAN's.
    unsafe { bpf_redirect(settings.nat.trunk_ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}

/// What arrived for a translated flow: its mapping's key, and whether it is
/// an ICMP error quoting the flow's packet (at `quoted`, the quoted IPv4 header).
struct Reply {
    key: NatKey,
    quoted: usize,
}

#[inline(always)]
fn reply_of(ctx: &TcContext, settings: &Settings, packet: &mut Packet) -> Option<Reply> {
    let ethertype: [u8; 2] = ctx.load(12).ok()?;
    let l2 = L2 {
        vlan: 0,
        ethertype: u16::from_be_bytes(ethertype),
        l3_offset: ETH_HEADER_LEN,
    };
    if l2.ethertype != ETH_P_IPV4 {
        return None;
    }
    parse::parse_l3(ctx, l2, packet).ok()?;
    if v4(&packet.dst) != settings.nat.address || packet.fragment != Fragment::Whole {
        return None;
    }
    let direct = |peer_port, nat_port| Reply {
        key: NatKey {
            peer_addr: v4(&packet.src),
            peer_port,
            nat_port,
            protocol: packet.protocol,
            _pad: [0; 3],
        },
        quoted: 0,
    };
    match packet.protocol {
        IPPROTO_TCP | IPPROTO_UDP => Some(direct(packet.src_port, packet.dst_port)),
        IPPROTO_ICMP if packet.icmp_type == ICMP_ECHO_REPLY => Some(direct(0, packet.src_port)),
        IPPROTO_ICMP if parse::is_icmp_error(packet) => {
            let mut embedded = Embedded::default();
            if !quoted(ctx, packet, &mut embedded) || v4(&embedded.src) != settings.nat.address {
                return None;
            }
            Some(Reply {
                key: NatKey {
                    peer_addr: v4(&embedded.dst),
                    peer_port: embedded.dst_port,
                    nat_port: embedded.src_port,
                    protocol: embedded.protocol,
                    _pad: [0; 3],
                },
                quoted: usize::from(packet.l4_offset) + 8,
            })
        }
        _ => None,
    }
}

/// Reads the header an ICMP error quotes. Out of line, like `verdict.rs`'s
/// `is_related`, for the stack and so that the verifier sees its bounds checks
/// on the registers it reads through; `bool` keeps its BTF plain.
#[inline(never)]
fn quoted(ctx: &TcContext, packet: &Packet, embedded: &mut Embedded) -> bool {
    parse::parse_embedded(ctx, packet, embedded).is_ok()
}

/// Gives the frame the pod's side of the flow back, its trunk Ethernet
/// addresses and its VLAN tag.
#[inline(always)]
fn restore(
    ctx: &TcContext,
    packet: &Packet,
    reply: &Reply,
    target: &NatTarget,
) -> Result<(), Refused> {
    let flow = &target.flow;
    let pod_addr = v4(&flow.pod_addr);
    let l3 = ETH_HEADER_LEN;
    let l4 = usize::from(packet.l4_offset);
    if reply.quoted == 0 {
        let (csum, flags) = l4_checksum(packet.protocol);
        let pseudo = (packet.protocol != IPPROTO_ICMP).then_some((l4 + csum, flags));
        set_address(ctx, l3, IPV4_DST, pseudo, v4(&packet.dst), pod_addr)?;
        let (field, from) = match packet.protocol {
            IPPROTO_ICMP => (port_field(IPPROTO_ICMP, false), packet.src_port),
            _ => (port_field(packet.protocol, false), packet.dst_port),
        };
        set_port(ctx, l4 + field, (l4 + csum, flags), from, flow.pod_port)?;
    } else {
        set_address(ctx, l3, IPV4_DST, None, v4(&packet.dst), pod_addr)?;
        let quoted = Quoted {
            at: reply.quoted,
            source: true,
            from: v4(&packet.dst),
            to: pod_addr,
            to_port: flow.pod_port,
        };
        rewrite_quoted(ctx, l4, &quoted)?;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&target.pod_mac);
    macs[6..].copy_from_slice(&target.router_mac);
    ctx.store(0, &macs, 0).map_err(|_| Refused)?;
    // SAFETY: the context pointer the kernel passed to the program.
    helper(unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), flow.vlan) })
}

/// The side of the packet an ICMP error quotes that translation changes: its
/// source (an error reaching the pod: the NAT address and port become the
/// pod's) or its destination (an error the pod sends: the other way).
struct Quoted {
    /// Where the quoted IPv4 header starts.
    at: usize,
    source: bool,
    /// The address before and after; the port (or echo identifier) after.
    from: [u8; 4],
    to: [u8; 4],
    to_port: u16,
}

/// Rewrites an ICMP error's quoted address and port, and every checksum
/// covering them: the quoted IPv4 header's, the quoted transport checksum when
/// it was quoted (TCP's lies past the 8 bytes RFC 792 guarantees), and the ICMP
/// checksum (at `icmp` + 2), which covers all the quoted bytes.
#[inline(always)]
fn rewrite_quoted(ctx: &TcContext, icmp: usize, quoted: &Quoted) -> Result<(), Refused> {
    let at = quoted.at;
    let protocol: [u8; 1] = ctx.load(at + 9).map_err(|_| Refused)?;
    let protocol = protocol[0];
    let icmp_csum = icmp + 2;
    let (from, to) = (quoted.from, quoted.to);
    let to_port = quoted.to_port;
    let quoted_l4 = at + header_len(ctx, at)?;
    let port_at = quoted_l4 + port_field(protocol, quoted.source);
    let from_port = load16(ctx, port_at)?;
    let (csum, flags) = l4_checksum(protocol);
    let quoted_csum = quoted_l4 + csum;
    if (quoted_csum + 2) as u32 <= ctx.len() {
        let before = load16(ctx, quoted_csum)?;
        if protocol != IPPROTO_ICMP {
            pseudo_address(ctx, (quoted_csum, flags), from, to)?;
        }
        ctx.l4_csum_replace(quoted_csum, raw16(from_port), raw16(to_port), flags | 2)
            .map_err(|_| Refused)?;
        let after = load16(ctx, quoted_csum)?;
        covered(ctx, icmp_csum, before, after)?;
    }
    let field = if quoted.source { IPV4_SRC } else { IPV4_DST };
    let before = load16(ctx, at + IPV4_CSUM)?;
    set_address(ctx, at, field, None, from, to)?;
    ctx.l4_csum_replace(icmp_csum, raw32(from), raw32(to), 4)
        .map_err(|_| Refused)?;
    let after = load16(ctx, at + IPV4_CSUM)?;
    covered(ctx, icmp_csum, before, after)?;
    set_port(ctx, port_at, (icmp_csum, 0), from_port, to_port)
}

#[inline(always)]
fn load16(ctx: &TcContext, offset: usize) -> Result<u16, Refused> {
    let bytes: [u8; 2] = ctx.load(offset).map_err(|_| Refused)?;
    Ok(u16::from_be_bytes(bytes))
}

/// Keeps the checksum at `csum` over a 16-bit word that changed from `before` to `after`.
#[inline(always)]
fn covered(ctx: &TcContext, csum: usize, before: u16, after: u16) -> Result<(), Refused> {
    ctx.l4_csum_replace(csum, raw16(before), raw16(after), 2)
        .map_err(|_| Refused)
}
