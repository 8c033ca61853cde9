//! Programs on the trunk interface: every frame of a branch-ENI pod is judged
//! by its VLAN and counted once. XDP screens what the trunk receives before
//! the kernel builds a packet and drops what TC would drop; TC judges what it
//! sends, and what it receives that XDP did not drop. Entry points only
//! compose the modules below.
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
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_xdp_get_buff_len,
    programs::{TcContext, XdpContext},
};
use enforcer_common::Reason;

use crate::maps::SUBJECTS;
use crate::verdict::{Deferred, Stage, Subject};

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

/// Network -> pod, before the kernel builds a packet: a frame TC would drop
/// costs no more than its verdict. XDP screens what the trunk receives with
/// TC's decision, without its effects ([`Stage::Screen`]): a drop is final
/// and counted here; anything else goes on to TC, which judges and counts it.
/// XDP sees inline tags only: a tag the NIC moved aside makes a frame look
/// untagged, and TC judges it with its tag.
#[aya_ebpf::macros::xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    // SAFETY: the context pointer the kernel passed to the program.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let mut subject = Subject::default();
    let reason = verdict::judge(&ctx, Direction::Ingress, len, &mut subject, Stage::Screen);
    if !reason.is_drop() || subject.would_drop(reason) {
        return xdp_action::XDP_PASS;
    }
    observe::record(&subject, reason, false, Direction::Ingress, len);
    xdp_action::XDP_DROP
}

/// Counts and reports the verdict on one frame; whether the frame passes (an
/// audited pod's policy drop passes, as a "would drop").
#[inline(always)]
fn settle(subject: &Subject, reason: Reason, direction: Direction, len: u32) -> bool {
    let would_drop = subject.would_drop(reason);
    observe::record(subject, reason, would_drop, direction, len);
    !reason.is_drop() || would_drop
}

/// Network -> pod: every frame arriving on the trunk that XDP did not drop.
#[aya_ebpf::macros::classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
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
    let mut reason = verdict::judge(ctx, direction, ctx.len(), subject, Stage::Judge);
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
