//! The benchmarks' floor: the least any VLAN-keyed enforcer must do per
//! packet — Ethernet, the VLAN tag and IPv4 parsed with the enforcer's own
//! parser, then one hash lookup by VLAN. Not loaded by the agent.
#![no_std]
#![no_main]

// The enforcer's own parser, so the floor pays exactly the enforcer's parsing
// cost; the floor reads only its L2/L3 half.
#[path = "../parse.rs"]
#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    btf_maps::HashMap,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use enforcer_common::{MAX_PODS, PodEntry};

use crate::parse::{Frame, L3, Packet};

#[btf_map]
static FLOOR_PODS: HashMap<u16, PodEntry, { MAX_PODS as usize }> = HashMap::new();

#[classifier]
pub fn floor_ingress(ctx: TcContext) -> i32 {
    match floor(&ctx) {
        Some(()) => TC_ACT_UNSPEC,
        None => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn floor<F: Frame>(frame: &F) -> Option<()> {
    let l2 = parse::parse_l2(frame).ok()??;
    let mut packet = Packet::default();
    match parse::parse_l3(frame, l2, &mut packet).ok()? {
        L3::Ip => {}
        L3::Arp { .. } => return None,
    }
    // SAFETY: presence check only.
    unsafe { FLOOR_PODS.get(l2.vlan) }.map(|_| ())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
