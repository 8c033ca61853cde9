//! Programs on the trunk interface: every frame of a branch-ENI pod is judged
//! by its VLAN, once. XDP judges what the trunk receives before the kernel
//! builds a packet; TC judges what it sends, and what it receives when XDP did
//! not judge it. Entry points only compose the modules below.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types (conntrack.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod maps;
mod nat;
mod observe;
mod parse;
mod policy;
mod subject;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_xdp_adjust_meta, bpf_xdp_get_buff_len},
    programs::{TcContext, XdpContext},
};
use enforcer_common::Reason;

use crate::maps::SUBJECTS;
use crate::parse::Frame as _;
use crate::subject::{Deferred, Subject};

/// Which way a frame crosses the trunk, as seen by the pod.
#[derive(Clone, Copy)]
pub enum Direction {
    /// Network -> pod.
    Ingress,
    /// Pod -> network.
    Egress,
}

impl Direction {
    #[inline(always)]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    #[inline(always)]
    pub fn reverse(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }
}

/// XDP's mark in a frame's metadata: this frame was judged as VLAN `vlan`'s,
/// counted and passed. Only an XDP program can write metadata, and ours is
/// the trunk's.
#[repr(C)]
#[derive(Clone, Copy)]
struct JudgedAtXdp {
    magic: u32,
    vlan: u16,
    _pad: u16,
}

const JUDGED_MAGIC: u32 = u32::from_be_bytes(*b"SGJ1");

/// Network -> pod, before the kernel builds a packet: a denied frame costs no
/// more than its verdict. XDP judges the frames whose tag it can see (inline:
/// a Nitro trunk's NIC strips no tags); an untagged-looking frame may carry a
/// tag the NIC moved aside, so it goes to TC unjudged. A passed frame is
/// marked so that TC does not judge (and count) it again; where the driver
/// keeps no metadata, TC judges it again and finds what XDP left (its flow
/// tracked, its fragments' verdict).
#[aya_ebpf::macros::xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    // SAFETY: the context pointer the kernel passed to the program.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let mut subject = Subject::default();
    let reason = verdict::judge(&ctx, Direction::Ingress, len, &mut subject);
    if reason == Reason::PassUntagged {
        return xdp_action::XDP_PASS;
    }
    if !settle(&subject, reason, Direction::Ingress, len) {
        return xdp_action::XDP_DROP;
    }
    mark_judged(&ctx, subject.vlan);
    xdp_action::XDP_PASS
}

/// Counts and reports the verdict on one frame; whether the frame passes (an
/// audited pod's policy drop passes, as a "would drop").
#[inline(always)]
fn settle(subject: &Subject, reason: Reason, direction: Direction, len: u32) -> bool {
    let would_drop = subject.would_drop(reason);
    observe::record(subject, reason, would_drop, direction, len);
    !reason.is_drop() || would_drop
}

#[inline(always)]
fn mark_judged(ctx: &XdpContext, vlan: u16) {
    let size = size_of::<JudgedAtXdp>();
    // SAFETY: as above; on failure the frame is unchanged.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size as i32)) } != 0 {
        return;
    }
    let meta = ctx.metadata();
    if meta + size > ctx.data() {
        return;
    }
    let mark = JudgedAtXdp {
        magic: JUDGED_MAGIC,
        vlan,
        _pad: 0,
    };
    // SAFETY: `meta..meta + size` was just checked to lie before the frame's data.
    unsafe { (meta as *mut JudgedAtXdp).write_unaligned(mark) };
}

/// Whether XDP already judged (and passed) this frame as TC would: the tag XDP
/// judged is the one the stack moved into the skb's metadata, and no other tag
/// follows it inline (a tag the NIC hid from XDP would leave XDP's tag inline).
#[inline(always)]
fn judged_at_xdp(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to the program.
    let skb = unsafe { &*ctx.skb.skb };
    let (meta, data) = (skb.data_meta as usize, skb.data as usize);
    if meta + size_of::<JudgedAtXdp>() > data {
        return false;
    }
    // SAFETY: the metadata was just checked to hold a mark.
    let mark = unsafe { (meta as *const JudgedAtXdp).read_unaligned() };
    mark.magic == JUDGED_MAGIC
        && ctx.vlan_metadata() == Some(mark.vlan)
        && !parse::starts_with_tag(ctx)
}

/// Network -> pod: frames arriving on the trunk that XDP did not judge.
#[aya_ebpf::macros::classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    if judged_at_xdp(&ctx) {
        return TC_ACT_UNSPEC;
    }
    tc_verdict(&ctx, Direction::Ingress)
}

/// Pod -> network: frames leaving on the trunk.
#[aya_ebpf::macros::classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Egress)
}

/// Primary interface -> node: replies of standard mode's source-NATed flows
/// go back to their pods through the trunk (`nat.rs`); the node's own traffic passes.
#[aya_ebpf::macros::classifier]
pub fn tc_primary_ingress(ctx: TcContext) -> i32 {
    nat::arrive(&ctx)
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, direction: Direction) -> i32 {
    // The subject lives in a per-CPU map, not on the stack: the verifier then
    // knows nothing of its contents, so the paths through the policy lookups
    // meet again after the verdict instead of each walking what follows
    // (the source NAT's port search) on its own. TC runs one program at a
    // time per CPU (softirq or BH-disabled), so the slot is this run's.
    let Some(subject) = SUBJECTS.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: a per-CPU slot no other program run uses meanwhile (above).
    let subject = unsafe { &mut *subject };
    *subject = Subject::default();
    let mut reason = verdict::judge(ctx, direction, ctx.len(), subject);
    // Only egress defers (a constant here: ingress has no such call).
    if matches!(direction, Direction::Egress)
        && reason == Reason::PassNew
        && subject.admitted.deferred != Deferred::No
    {
        reason = nat::track(ctx, subject);
    }
    let passes = settle(subject, reason, direction, ctx.len());
    // Off unless the agent runs at debug level (it sets AYA_LOG_LEVEL at load):
    // then the cost is one load of a global.
    aya_log_ebpf::debug!(
        ctx,
        "{} VLAN {}: reason {}",
        direction.label(),
        subject.vlan,
        reason as u32
    );
    // A pass hands the frame on (TCX_NEXT / TC_ACT_UNSPEC), so programs
    // attached after the enforcer on the trunk still run; a drop is final.
    // A source-NATed flow's frame leaves by the primary interface instead.
    match (passes, subject.admitted.nat_port) {
        (false, _) => TC_ACT_SHOT,
        (true, 0) => TC_ACT_UNSPEC,
        (true, nat_port) => nat::leave(ctx, &subject.packet, nat_port),
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
