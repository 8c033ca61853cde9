//! TC programs on the trunk interface: every frame of a branch-ENI pod is
//! judged by its VLAN. Entry points only compose the modules below.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use enforcer_common::{COUNTER_SLOTS, Counter, MAX_PODS, PodEntry};

use crate::parse::{Frame, ParseError, Payload};

#[btf_map]
static PODS: HashMap<u16, PodEntry, { MAX_PODS as usize }> = HashMap::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Network -> pod: frames arriving on the trunk.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    judge(&ctx, Direction::Ingress)
}

/// Pod -> network: frames leaving on the trunk.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    judge(&ctx, Direction::Egress)
}

/// Which way a frame crosses the trunk, as seen by the pod.
#[derive(Clone, Copy)]
enum Direction {
    Ingress,
    Egress,
}

#[inline(always)]
fn judge<F: Frame>(frame: &F, direction: Direction) -> i32 {
    let counter = classify(frame, direction);
    count(counter);
    match counter {
        Counter::PassUntagged | Counter::PassPod => TC_ACT_OK,
        Counter::DropUnknownVlan
        | Counter::DropMalformed
        | Counter::DropUnsupportedL2
        | Counter::DropSpoofed => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn classify<F: Frame>(frame: &F, direction: Direction) -> Counter {
    let l2 = match parse::parse_l2(frame) {
        Ok(Some(l2)) => l2,
        Ok(None) | Err((None, _)) => return Counter::PassUntagged,
        Err((Some(vlan), error)) => {
            return match pod(vlan) {
                Some(_) => drop_reason(error),
                None => Counter::DropUnknownVlan,
            };
        }
    };
    let Some(pod) = pod(l2.vlan) else {
        return Counter::DropUnknownVlan;
    };
    match parse::parse_l3(frame, l2) {
        Ok(Payload::Ip(packet)) => {
            let pod_side = match direction {
                Direction::Ingress => &packet.dst,
                Direction::Egress => &packet.src,
            };
            if pod.owns(pod_side, packet.ipv6) {
                Counter::PassPod
            } else {
                Counter::DropSpoofed
            }
        }
        Ok(Payload::Arp) => Counter::PassPod,
        Err(error) => drop_reason(error),
    }
}

#[inline(always)]
fn pod(vlan: u16) -> Option<PodEntry> {
    // SAFETY: the entry is copied out at once; a concurrent update can only
    // make the copy stale, never invalid (PodEntry is plain data).
    unsafe { PODS.get(vlan).copied() }
}

#[inline(always)]
fn drop_reason(error: ParseError) -> Counter {
    match error {
        ParseError::Malformed => Counter::DropMalformed,
        ParseError::UnsupportedL2 => Counter::DropUnsupportedL2,
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
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
