//! Kernel half of the virtual Nitro node (`tests/src/testbed.rs`): tagging and untagging in
//! place of the node's `vlan.eth.N` links and of the VPC fabric, and a witness on the trunk.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    btf_maps::{HashMap, PerCpuArray, ProgramArray},
    helpers::{bpf_skb_vlan_pop, bpf_skb_vlan_push},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_TYPE_OFFSET: usize = 12;
const ETH_HEADER_LEN: usize = 14;
const IPV4_DST_OFFSET: usize = ETH_HEADER_LEN + 16;
const IPV6_DST_OFFSET: usize = ETH_HEADER_LEN + 24;
const VLAN_VID_MASK: u16 = 0x0fff;
const VLAN_TAG_LEN: usize = 4;
const VLAN_IDS: u32 = 4096;

/// A TCX program's "next": let the following program (the enforcer) judge the frame.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;

/// `vlan.eth.N` ifindex (node namespace) -> N.
#[btf_map]
static VLAN_LINKS: HashMap<u32, u16, 4096> = HashMap::new();

/// Branch ENI address (IPv6, or IPv4-mapped) -> its VLAN on the trunk.
#[btf_map]
static BRANCH_ADDRESSES: HashMap<[u8; 16], u16, 4096> = HashMap::new();

/// Frames seen on the trunk, at `direction * 4096 + VLAN ID` (direction 0 ingress,
/// 1 egress; VLAN ID 0 for untagged frames): `[tag in metadata, tag inline, untagged]`.
#[btf_map]
static TRUNK_FRAMES: PerCpuArray<[u64; 3], 8192> = PerCpuArray::new();

/// The enforcer's programs under test (0 ingress, 1 egress), for [`metadata_tag_ingress`]
/// and [`metadata_tag_egress`].
#[btf_map]
static ENFORCER: ProgramArray<2> = ProgramArray::new();

/// What the metadata programs return when they could not hand the frame on:
/// no complete outer tag, a helper failed, or the tail call did.
const NOT_HANDED_ON: i32 = 0x7a67;

/// Where the witness found a frame's tag.
#[derive(Clone, Copy)]
enum Placement {
    Metadata,
    Inline,
    Untagged,
}

/// Passes every frame: what a driver's XDP hook costs with nothing to judge, for the
/// throughput bench to tell it from the enforcer's screen.
#[xdp]
pub fn xdp_pass_all(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// What a `vlan.eth.N` link transmits leaves on the trunk tagged N. (The kernel here has no
/// 802.1Q module: the link is a macvlan on the trunk, and this program its tagging.)
#[classifier]
pub fn vlan_link_transmit(ctx: TcContext) -> i32 {
    match link_vlan(&ctx) {
        Some(vlan) if push_tag(&ctx, vlan) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// A `vlan.eth.N` link receives only frames tagged N, and untagged.
#[classifier]
pub fn vlan_link_receive(ctx: TcContext) -> i32 {
    match (link_vlan(&ctx), metadata_tag(&ctx)) {
        (Some(link), Some(tag)) if link == tag && pop_tag(&ctx) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// The VPC receives what the branch ENIs send: untagged, into its routing.
#[classifier]
pub fn fabric_receive(ctx: TcContext) -> i32 {
    match metadata_tag(&ctx) {
        Some(_) if pop_tag(&ctx) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// The VPC delivers to a branch ENI on the trunk with the ENI's VLAN; nothing else goes
/// down this trunk. The tag is inline, as a Nitro trunk's NIC hands it over (ENA strips no
/// tags), so the enforcer's XDP program sees it.
#[classifier]
pub fn fabric_deliver(ctx: TcContext) -> i32 {
    match branch_vlan(&ctx) {
        Some(vlan) if push_tag_inline(&ctx, vlan) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// Passes every frame and ends the chain (TCX_PASS), as another tool on the
/// trunk might: the agent tests show it can neither go ahead of the enforcer
/// nor undo the enforcer's drops.
#[classifier]
pub fn trunk_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Counts a frame arriving on the trunk, as the enforcer's ingress program will see it.
#[classifier]
pub fn trunk_witness_ingress(ctx: TcContext) -> i32 {
    witness(&ctx, 0);
    TCX_NEXT
}

/// Counts a frame leaving on the trunk, as the enforcer's egress program will see it.
#[classifier]
pub fn trunk_witness_egress(ctx: TcContext) -> i32 {
    witness(&ctx, 1);
    TCX_NEXT
}

#[inline(always)]
fn skb(ctx: &TcContext) -> &aya_ebpf::bindings::__sk_buff {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    unsafe { &*ctx.skb.skb }
}

/// For `BPF_PROG_TEST_RUN` (`tests/src/kernel.rs`), which cannot set an skb's VLAN
/// metadata: moves the frame's outer inline tag into the metadata, as a receiving
/// NIC or the kernel does, then tail-calls the enforcer's ingress program.
#[classifier]
pub fn metadata_tag_ingress(ctx: TcContext) -> i32 {
    tag_in_metadata_then_enforce(&ctx, 0)
}

/// As [`metadata_tag_ingress`], into the enforcer's egress program.
#[classifier]
pub fn metadata_tag_egress(ctx: TcContext) -> i32 {
    tag_in_metadata_then_enforce(&ctx, 1)
}

#[inline(always)]
fn tag_in_metadata_then_enforce(ctx: &TcContext, slot: u32) -> i32 {
    let (Ok(tpid), Ok(tci)) = (
        ctx.load::<u16>(ETH_TYPE_OFFSET),
        ctx.load::<u16>(ETH_HEADER_LEN),
    ) else {
        return NOT_HANDED_ON;
    };
    let tpid = u16::from_be(tpid);
    if !matches!(tpid, ETH_P_8021Q | ETH_P_8021AD) {
        return NOT_HANDED_ON;
    }
    // Pop takes the tag out of the bytes (and a second tag, if any, into the
    // metadata); push puts ours in the metadata and any tag there back inline.
    if !pop_tag(ctx) {
        return NOT_HANDED_ON;
    }
    // SAFETY: the helper takes the context pointer.
    if unsafe { bpf_skb_vlan_push(ctx.skb.skb, tpid.to_be(), u16::from_be(tci)) } != 0 {
        return NOT_HANDED_ON;
    }
    // SAFETY: the slot holds a classifier of the same type, or the call fails and returns.
    unsafe { ENFORCER.tail_call(ctx, slot) };
    NOT_HANDED_ON
}

/// The VLAN of the link the frame is on (`vlan.eth.N`), if it is one.
#[inline(always)]
fn link_vlan(ctx: &TcContext) -> Option<u16> {
    // SAFETY: a plain read of a value the map holds.
    unsafe { VLAN_LINKS.get(skb(ctx).ifindex) }.copied()
}

/// The VLAN ID of the tag the kernel holds in the skb's metadata.
#[inline(always)]
fn metadata_tag(ctx: &TcContext) -> Option<u16> {
    let skb = skb(ctx);
    (skb.vlan_present != 0).then_some(skb.vlan_tci as u16 & VLAN_VID_MASK)
}

#[inline(always)]
fn push_tag(ctx: &TcContext, vlan: u16) -> bool {
    // SAFETY: the helper takes the context pointer; it moves any tag already present inline.
    unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), vlan) == 0 }
}

/// Inserts a tag into the frame's bytes after the MAC addresses (`push_tag` would put it in
/// the skb's metadata). IP frames only: the room is made between layers 2 and 3.
#[inline(always)]
fn push_tag_inline(ctx: &TcContext, vlan: u16) -> bool {
    let Ok(ethertype) = ctx.load::<[u8; 2]>(ETH_TYPE_OFFSET) else {
        return false;
    };
    if ctx
        .adjust_room(VLAN_TAG_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return false;
    }
    let tci = vlan.to_be_bytes();
    let tpid = ETH_P_8021Q.to_be_bytes();
    let header = [tpid[0], tpid[1], tci[0], tci[1], ethertype[0], ethertype[1]];
    ctx.store(ETH_TYPE_OFFSET, &header, 0).is_ok()
}

#[inline(always)]
fn pop_tag(ctx: &TcContext) -> bool {
    // SAFETY: the helper takes the context pointer.
    unsafe { bpf_skb_vlan_pop(ctx.skb.skb) == 0 }
}

/// The VLAN of the branch ENI an IP frame is addressed to.
#[inline(always)]
fn branch_vlan(ctx: &TcContext) -> Option<u16> {
    let ethertype = u16::from_be(ctx.load::<u16>(ETH_TYPE_OFFSET).ok()?);
    let mut addr = [0u8; 16];
    match ethertype {
        ETH_P_IPV4 => {
            addr[10] = 0xff;
            addr[11] = 0xff;
            let dst: [u8; 4] = ctx.load(IPV4_DST_OFFSET).ok()?;
            addr[12..].copy_from_slice(&dst);
        }
        ETH_P_IPV6 => addr = ctx.load(IPV6_DST_OFFSET).ok()?,
        _ => return None,
    }
    // SAFETY: a plain read of a value the map holds.
    unsafe { BRANCH_ADDRESSES.get(addr) }.copied()
}

#[inline(always)]
fn witness(ctx: &TcContext, direction: u32) {
    let (vlan, placement) = match metadata_tag(ctx) {
        Some(vlan) => (vlan, Placement::Metadata),
        None => match ctx.load::<u16>(ETH_TYPE_OFFSET).map(u16::from_be) {
            Ok(ETH_P_8021Q | ETH_P_8021AD) => match ctx.load::<u16>(ETH_HEADER_LEN) {
                Ok(tci) => (u16::from_be(tci) & VLAN_VID_MASK, Placement::Inline),
                Err(_) => (0, Placement::Untagged),
            },
            _ => (0, Placement::Untagged),
        },
    };
    let index = direction * VLAN_IDS + u32::from(vlan);
    if let Some(counts) = TRUNK_FRAMES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        let counts = unsafe { &mut *counts };
        match placement {
            Placement::Metadata => counts[0] += 1,
            Placement::Inline => counts[1] += 1,
            Placement::Untagged => counts[2] += 1,
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
