//! TC programs on the trunk interface: every frame of a branch-ENI pod is
//! judged by its VLAN. Entry points only compose the modules below.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write types (conntrack.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod maps;
mod observe;
mod parse;
mod policy;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};

use crate::verdict::Subject;

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

/// Network -> pod: frames arriving on the trunk.
#[aya_ebpf::macros::classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Ingress)
}

/// Pod -> network: frames leaving on the trunk.
#[aya_ebpf::macros::classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Direction::Egress)
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, direction: Direction) -> i32 {
    let mut subject = Subject::default();
    let reason = verdict::judge(ctx, direction, ctx.len(), &mut subject);
    observe::record(&subject, reason, direction, ctx.len());
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
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
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
