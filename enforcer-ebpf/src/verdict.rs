//! The decision for one frame on the trunk, in the order of
//! sg-semantics.md: VLAN -> pod, anti-spoofing, fragments, conntrack, traffic
//! never filtered, same-node (standard), then the branch and primary groups.

use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use enforcer_common::{
    AddrKey, EnforcingMode, FragmentKey, FragmentVerdict, NO_POLICY, POD_AUDIT, PodEntry,
    PortVerdict, Reason, Settings, V4_MAPPED_PREFIX, VERDICT_UNTRACKED, policy_slot,
};

use crate::Direction;
use crate::conntrack;
use crate::maps::{FRAGMENTS, NODE_LOCAL, POD_TRACKED, PODS, SETTINGS};
use crate::nat;
use crate::parse::{
    self, Embedded, Fragment, Frame, IPPROTO_ICMPV6, IPPROTO_UDP, L3, Packet, ParseError,
};
use crate::policy;

/// What a verdict was about, filled in as the frame is read, for the
/// counters and events of `observe`.
#[repr(C)]
#[derive(Default)]
pub struct Subject {
    pub packet: Packet,
    pub vlan: u16,
    /// The VLAN has a pod.
    pub pod: bool,
    /// `packet` holds a parsed IP header.
    pub ip: bool,
    /// The pod is audited ([`POD_AUDIT`]).
    pub audit: bool,
    pub admitted: Admission,
}

/// What admitted a flow, beyond the verdict.
#[repr(C)]
#[derive(Default)]
pub struct Admission {
    /// Rule IDs ([`PortVerdict::rule`]) of the branch and primary rules
    /// that allowed a new flow; 0 where none did.
    pub rules: [u32; 2],
    /// An egress frame of a source-NATed flow: its translated port (`nat.rs`); else 0.
    pub nat_port: u16,
    /// A new flow whose tracking waits for [`crate::nat::track`].
    pub deferred: Deferred,
}

/// Tracking left to [`crate::nat::track`]: a standard-mode pod's new IPv4 flow
/// that may leave the VPC, which decides whether it is translated.
#[repr(u8)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Deferred {
    #[default]
    No,
    /// Tracked whatever happens.
    Tracked,
    /// Its rules make it untracked, unless it is translated.
    Untracked,
}

impl Subject {
    /// Whether a frame judged `reason` passes only because its pod is audited: the
    /// groups refused it ([`Reason::is_audited`]). Judging never looks at audit, so
    /// such a flow creates no conntrack entry (its first fragment is remembered as
    /// refused): switched to enforce, the pod drops its next packet.
    #[inline(always)]
    pub fn would_drop(&self, reason: Reason) -> bool {
        self.audit && reason.is_audited()
    }
}

/// Who judges a frame (ARCHITECTURE.md, "XDP and TC").
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TC: the verdict with every effect (flows tracked, fragments remembered).
    Judge,
    /// XDP, before TC: the same decision without effects, whose drops are
    /// final; a pass leaves the frame to TC. A decision that an earlier frame
    /// of the same batch could still change (a later fragment, whose first
    /// fragment TC has not remembered yet) is left to TC as a pass.
    Screen,
}

/// Judges one frame at `stage`: the reason says pass or drop, and why (audit
/// aside: [`Subject::would_drop`]); `subject` says what about.
#[inline(always)]
pub fn judge<F: Frame>(
    frame: &F,
    direction: Direction,
    len: u32,
    subject: &mut Subject,
    stage: Stage,
) -> Reason {
    let Some(settings) = SETTINGS.get(0) else {
        return Reason::DropUnknownVlan;
    };
    let l2 = match parse::parse_l2(frame) {
        Ok(Some(l2)) => l2,
        Ok(None) => return Reason::PassUntagged,
        // A frame announcing a tag it does not carry: junk, whoever it was for.
        Err((None, _)) => return Reason::DropMalformed,
        Err((Some(vlan), error)) => {
            subject.vlan = vlan;
            return match pod(vlan) {
                Some(_) => {
                    subject.pod = true;
                    parse_failure(error)
                }
                None => unknown_vlan(settings),
            };
        }
    };
    subject.vlan = l2.vlan;
    let Some(pod) = pod(l2.vlan) else {
        return unknown_vlan(settings);
    };
    subject.pod = true;
    subject.audit = pod.flags & POD_AUDIT != 0;
    match parse::parse_l3(frame, l2, &mut subject.packet) {
        Ok(L3::Ip) => subject.ip = true,
        Ok(L3::Arp { sender }) => {
            return match direction {
                Direction::Egress if !owns_v4(pod, sender) => Reason::DropSpoofed,
                _ => Reason::PassLinkLayer,
            };
        }
        Err(error) => return parse_failure(error),
    }
    let packet = &subject.packet;
    // Discovery that fails EC2's checks is ordinary ICMPv6: spoofing check, then the groups.
    if is_neighbour_discovery(packet) && neighbour_discovery_passes(pod, packet, direction) {
        return Reason::PassLinkLayer;
    }
    let pod_addr = match direction {
        Direction::Ingress => &packet.dst,
        Direction::Egress => &packet.src,
    };
    if !pod.owns(pod_addr, packet.ipv6) {
        return Reason::DropSpoofed;
    }
    if packet.fragment == Fragment::Later {
        return if stage == Stage::Screen || first_fragment_allowed(packet, l2.vlan) {
            Reason::PassFragment
        } else {
            Reason::DropFragment
        };
    }
    let flow = FlowContext {
        vlan: l2.vlan,
        direction,
        len,
        now: conntrack::now_ns(),
        settings,
        stage,
    };
    let reason = judge_flow(frame, pod, packet, &flow, &mut subject.admitted);
    if packet.fragment == Fragment::First
        && stage == Stage::Judge
        && !reason.is_drop()
        && !remember_first_fragment(packet, l2.vlan, &flow)
    {
        // Its later fragments would find no verdict: the datagram cannot pass whole.
        return Reason::DropFragmentLimit;
    }
    reason
}

#[inline(always)]
fn fragment_key(packet: &Packet, vlan: u16) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        vlan,
        // RFC 791 reassembles by protocol too; RFC 8200 does not, and an IPv6
        // first fragment's upper-layer protocol may sit behind more headers.
        protocol: if packet.ipv6 { 0 } else { packet.protocol },
        _pad: 0,
    }
}

/// Whether the datagram of a later fragment was allowed at its first fragment.
#[inline(never)]
fn first_fragment_allowed(packet: &Packet, vlan: u16) -> bool {
    // SAFETY: presence check only.
    unsafe { FRAGMENTS.get(fragment_key(packet, vlan)).is_some() }
}

/// Records an allowed first fragment for the rest of its datagram, within the
/// pod's allowance of datagrams in flight; false when there is no room.
#[inline(never)]
fn remember_first_fragment(packet: &Packet, vlan: u16, flow: &FlowContext) -> bool {
    let key = fragment_key(packet, vlan);
    let verdict = FragmentVerdict {
        created_ns: flow.now,
    };
    let Some(count) = POD_TRACKED.get_ptr_mut(u32::from(vlan)) else {
        return false;
    };
    // SAFETY: an element of an array map lives as long as the map.
    conntrack::insert_counted(
        unsafe { &raw mut (*count).fragments },
        flow.settings.max_fragments_per_pod,
        || FRAGMENTS.insert(key, verdict, u64::from(BPF_EXIST)).is_ok(),
        || {
            FRAGMENTS
                .insert(key, verdict, u64::from(BPF_NOEXIST))
                .is_ok()
        },
    )
}

/// What every stage of a flow's verdict needs besides the packet.
pub struct FlowContext<'a> {
    pub vlan: u16,
    pub direction: Direction,
    /// Frame length, for the flow's byte counters.
    pub len: u32,
    pub now: u64,
    pub settings: &'a Settings,
    pub stage: Stage,
}

/// The verdict for a whole packet or a first fragment of a pod; what
/// admitted its flow goes to `admitted`. Not inlined, like the rarer paths
/// below, so that each keeps its own stack frame within BPF's 512 bytes.
#[inline(never)]
fn judge_flow<F: Frame>(
    frame: &F,
    pod: &PodEntry,
    packet: &Packet,
    flow: &FlowContext,
    admitted: &mut Admission,
) -> Reason {
    let (vlan, direction) = (flow.vlan, flow.direction);
    let peer = match direction {
        Direction::Ingress => &packet.src,
        Direction::Egress => &packet.dst,
    };
    let key = conntrack::key(vlan, packet, direction);
    if flow.stage == Stage::Screen && conntrack::takes(&key, packet, flow) {
        return Reason::PassEstablished;
    }
    if flow.stage == Stage::Judge
        && let Some(nat_port) = conntrack::track_existing(&key, packet, flow)
    {
        if let Direction::Egress = direction {
            admitted.nat_port = nat_port;
        }
        return Reason::PassEstablished;
    }
    if parse::is_icmp_error(packet) {
        let related = related(frame, packet, flow);
        if related != NOT_RELATED {
            if let Direction::Egress = direction {
                // An error the pod sends about a translated flow leaves translated too.
                admitted.nat_port = related as u16;
            }
            return Reason::PassRelated;
        }
    }
    if is_unfiltered(pod, packet, peer, direction) {
        return Reason::PassUnfiltered;
    }
    let standard = pod.mode() == Some(EnforcingMode::Standard);
    if standard && is_node_local(peer, packet.ipv6) {
        return Reason::PassSameNode;
    }
    // Constant indexes, so the verifier sees every access in bounds.
    let (branch_policy, primary_policy) = match direction {
        Direction::Ingress => (
            pod.policies[policy_slot::BRANCH_INGRESS],
            pod.policies[policy_slot::PRIMARY_INGRESS],
        ),
        Direction::Egress => (
            pod.policies[policy_slot::BRANCH_EGRESS],
            pod.policies[policy_slot::PRIMARY_EGRESS],
        ),
    };
    let mut branch = PortVerdict::default();
    if !policy::allowed(branch_policy, packet, peer, &mut branch) {
        return Reason::DropPolicy;
    };
    admitted.rules[0] = branch.rule;
    let (primary_rule, untracked) = if primary_policy == NO_POLICY {
        (0, branch.flags & VERDICT_UNTRACKED != 0)
    } else {
        let mut primary = PortVerdict::default();
        if !policy::allowed(primary_policy, packet, peer, &mut primary) {
            return Reason::DropPrimaryPolicy;
        }
        admitted.rules[1] = primary.rule;
        (
            primary.rule,
            branch.flags & primary.flags & VERDICT_UNTRACKED != 0,
        )
    };
    if flow.stage == Stage::Screen {
        return Reason::PassNew;
    }
    if standard && matches!(direction, Direction::Egress) && nat::may_apply(packet, flow.settings) {
        // Tracked (and translated, off the VPC) by `nat::track` once the
        // frame's verdict is in: kept out of here for the verifier's sake.
        admitted.deferred = if untracked {
            Deferred::Untracked
        } else {
            Deferred::Tracked
        };
        return Reason::PassNew;
    }
    if !untracked && !conntrack::create(&key, packet, flow, [branch.rule, primary_rule], 0) {
        return Reason::DropFlowLimit;
    }
    Reason::PassNew
}

/// [`related`]'s answer for an error about no live flow of this pod.
const NOT_RELATED: u32 = u32::MAX;

/// The translated port (0: none) of the live flow of this pod an ICMP error
/// reports on, or [`NOT_RELATED`]. Out of line for the stack; plain integers
/// in and out keep its BTF plain.
#[inline(never)]
fn related<F: Frame>(frame: &F, packet: &Packet, flow: &FlowContext) -> u32 {
    let mut embedded = Embedded::default();
    if parse::parse_embedded(frame, packet, &mut embedded).is_err() {
        return NOT_RELATED;
    }
    let key = conntrack::embedded_key(flow.vlan, &embedded, flow.direction);
    conntrack::tracked(&key, flow.settings, flow.now).map_or(NOT_RELATED, u32::from)
}

#[inline(always)]
fn pod(vlan: u16) -> Option<&'static PodEntry> {
    // SAFETY: hash map updates replace elements (RCU), so the entry read here
    // stays whole for the rest of the program run.
    unsafe { PODS.get(vlan) }
}

#[inline(always)]
fn unknown_vlan(settings: &Settings) -> Reason {
    if settings.unknown_vlan_pass != 0 {
        Reason::PassUnknownVlan
    } else {
        Reason::DropUnknownVlan
    }
}

#[inline(always)]
fn parse_failure(error: ParseError) -> Reason {
    match error {
        ParseError::Malformed => Reason::DropMalformed,
        ParseError::UnsupportedL2 => Reason::DropUnsupportedL2,
    }
}

#[inline(always)]
fn owns_v4(pod: &PodEntry, addr: [u8; 4]) -> bool {
    let mut mapped = [0u8; 16];
    mapped[..12].copy_from_slice(&V4_MAPPED_PREFIX);
    mapped[12..].copy_from_slice(&addr);
    pod.owns(&mapped, false)
}

/// ICMPv6 router/neighbour discovery (types 133..=137): link-layer plumbing,
/// never fragmented (RFC 6980: a fragmented one is not discovery).
#[inline(always)]
fn is_neighbour_discovery(packet: &Packet) -> bool {
    packet.ipv6
        && packet.protocol == IPPROTO_ICMPV6
        && packet.fragment == Fragment::Whole
        && matches!(packet.icmp_type, 133..=137)
}

/// Discovery as EC2 passes it (sg-semantics.md §5): hop limit 255 (RFC 4861
/// drops anything else, so it never crossed a router), and the pod's side its
/// own address, link-local, unspecified (DAD, from the pod) or a discovery
/// multicast group (to the pod): all-nodes, all-routers, solicited-node.
#[inline(always)]
fn neighbour_discovery_passes(pod: &PodEntry, packet: &Packet, direction: Direction) -> bool {
    if packet.hop_limit != 255 {
        return false;
    }
    let pod_side = match direction {
        Direction::Ingress => &packet.dst,
        Direction::Egress => &packet.src,
    };
    let link_local = pod_side[0] == 0xfe && pod_side[1] & 0xc0 == 0x80;
    let allowed = match direction {
        Direction::Ingress => link_local || is_discovery_multicast(pod_side),
        Direction::Egress => link_local || *pod_side == [0; 16],
    };
    allowed || pod.owns(pod_side, true)
}

/// `ff02::1` (all nodes), `ff02::2` (all routers) or `ff02::1:ff00:0/104`
/// (solicited-node, RFC 4291 §2.7.1): the groups discovery is sent to.
#[inline(always)]
fn is_discovery_multicast(addr: &[u8; 16]) -> bool {
    const LINK_SCOPE: [u8; 2] = [0xff, 0x02];
    if addr[..2] != LINK_SCOPE || addr[2..11] != [0; 9] {
        return false;
    }
    match addr[11] {
        0 => addr[12..15] == [0; 3] && matches!(addr[15], 1 | 2),
        1 => addr[12] == 0xff,
        _ => false,
    }
}

/// DHCP server ports per family: a pod's client talks to them, hears back on the client port.
const DHCP_V4: (u16, u16) = (67, 68);
const DHCP_V6: (u16, u16) = (547, 546);
/// Where a DHCP client sends without knowing its server: `255.255.255.255`
/// (IPv4-mapped) and `ff02::1:2` (All_DHCP_Relay_Agents_and_Servers).
const DHCP_BROADCAST_V4: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 255, 255, 255, 255];
const DHCP_SERVERS_V6: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];

/// Traffic security groups never filter (sg-semantics.md §5). Out of line for the stack.
#[inline(never)]
fn is_unfiltered(pod: &PodEntry, packet: &Packet, peer: &[u8; 16], direction: Direction) -> bool {
    if packet.protocol == IPPROTO_UDP && is_dhcp(packet, peer, direction) {
        return true;
    }
    pod.never_filters(peer, packet.ipv6)
}

/// DHCP as DHCP only (sg-semantics.md §5): to the server port at the
/// broadcast or servers' multicast address, and DHCPv6 replies from a
/// link-local server. DHCP with the subnet router passes as the router's
/// traffic; UDP 67/68 with anyone else is ordinary traffic.
#[inline(always)]
fn is_dhcp(packet: &Packet, peer: &[u8; 16], direction: Direction) -> bool {
    let (server, client) = if packet.ipv6 { DHCP_V6 } else { DHCP_V4 };
    match direction {
        Direction::Egress if packet.ipv6 => packet.dst_port == server && *peer == DHCP_SERVERS_V6,
        Direction::Egress => packet.dst_port == server && *peer == DHCP_BROADCAST_V4,
        Direction::Ingress => {
            packet.ipv6 && packet.dst_port == client && peer[0] == 0xfe && peer[1] & 0xc0 == 0x80
        }
    }
}

/// Whether `addr` is on this node (standard mode does not check same-node traffic).
#[inline(always)]
fn is_node_local(addr: &[u8; 16], ipv6: bool) -> bool {
    // The set stores IPv4 addresses IPv4-mapped: an IPv6 packet from
    // `::ffff:a.b.c.d` must not pass as that IPv4 address.
    if ipv6 && addr[..12] == V4_MAPPED_PREFIX {
        return false;
    }
    let key = AddrKey {
        vlan: 0,
        _pad: [0; 2],
        addr: *addr,
    };
    // SAFETY: presence check only.
    unsafe { NODE_LOCAL.get(key).is_some() }
}
