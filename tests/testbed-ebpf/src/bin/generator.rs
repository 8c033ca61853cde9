//! The throughput bench's traffic generator (`tests/src/testbed/generator.rs`): an XDP
//! program run by `BPF_PROG_TEST_RUN` in live-frames mode on the node's trunk, never
//! attached. Each run turns the test frame into the next of the frames stored in
//! [`FRAMES`] and passes it up the trunk's receive path, as the trunk's driver would: the
//! node's whole path is measured, without a sender's system call, socket or copy per frame.
//! A program in [`DRIVER_XDP`] runs on each frame next, as a native XDP program runs in the
//! trunk's driver.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, ProgramArray},
    helpers::{bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Room for one frame: the test frame is this long, and shortened to the stored frame's.
const FRAME_ROOM: usize = 128;
/// Frames the generator can hold.
const CAPACITY: usize = 1 << 18;

/// A stored frame: its length, then its bytes.
#[repr(C)]
pub struct Frame {
    len: u32,
    bytes: [u8; FRAME_ROOM],
}

/// Which frame goes next: `next` in `first..end`, back to `first` after the last.
#[repr(C)]
pub struct Cursor {
    next: u32,
    first: u32,
    end: u32,
}

#[btf_map]
static FRAMES: Array<Frame, CAPACITY> = Array::new();

/// One cursor, not one per CPU: a test run goes on the CPU of the thread that started it,
/// and the bench runs one at a time.
#[btf_map]
static CURSOR: Array<Cursor, 1> = Array::new();

/// The XDP program attached "in the driver" (slot 0), if any.
#[btf_map]
static DRIVER_XDP: ProgramArray<1> = ProgramArray::new();

#[xdp]
pub fn generate(ctx: XdpContext) -> u32 {
    if next_frame(&ctx).is_none() {
        return XDP_DROP;
    }
    // SAFETY: a tail call with our own context; it returns only if the slot is empty.
    unsafe { DRIVER_XDP.tail_call(&ctx, 0) };
    XDP_PASS
}

#[inline(always)]
fn next_frame(ctx: &XdpContext) -> Option<()> {
    // SAFETY: the only writer is this program, which never runs concurrently (see CURSOR).
    let cursor = unsafe { &mut *CURSOR.get_ptr_mut(0)? };
    let index = cursor.next;
    cursor.next = if index + 1 >= cursor.end {
        cursor.first
    } else {
        index + 1
    };
    let frame = FRAMES.get(index)?;
    let len = frame.len as usize;
    if len > FRAME_ROOM {
        return None;
    }
    // SAFETY: the helpers take the context pointer, and a source of the length given; the
    // test frame is FRAME_ROOM long, and shrinks to the stored frame's length.
    unsafe {
        (bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            frame.bytes.as_ptr().cast_mut().cast(),
            FRAME_ROOM as u32,
        ) == 0
            && bpf_xdp_adjust_tail(ctx.ctx, len as i32 - FRAME_ROOM as i32) == 0)
            .then_some(())
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
