//! TC programs on the trunk interface: every frame of a branch-ENI pod is
//! judged by its VLAN. Entry points only compose the modules below.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod parse;
mod policy;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use enforcer_common::Reason;

use crate::maps::COUNTERS;

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
    let reason = verdict::judge(ctx, direction, ctx.len());
    count(reason);
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
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
