//! The throughput bench's traffic, made on the node's trunk itself: frames stored in the
//! generator's map (`tests/testbed-ebpf/src/bin/generator.rs`) are injected into the trunk's
//! receive path by `BPF_PROG_TEST_RUN` in live-frames mode, as the trunk's driver would pass
//! them up. No sender pays a system call, a socket or an skb of its own per frame: what the
//! CPU spends is the node's receive path, the filter, routing and delivery to the pod.

use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::Array;
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};

use super::netns::Namespace;

const PROGRAM: &str = "generate";
/// Map layouts, as `tests/testbed-ebpf/src/bin/generator.rs` declares them.
const FRAMES: &str = "FRAMES";
const CURSOR: &str = "CURSOR";
const DRIVER_XDP: &str = "DRIVER_XDP";
const FRAME_ROOM: usize = 128;
/// Frames per test run's batch: what a driver's NAPI poll passes up at once.
const BATCH: u32 = 64;
/// Frames per test run, at most: the budget is checked between runs, and each run waits
/// (idle, untimed) for RCU grace periods as it enters and leaves the XDP dispatcher.
const RUN: u32 = 1 << 15;

#[repr(C)]
#[derive(Clone, Copy)]
struct Frame {
    len: u32,
    bytes: [u8; FRAME_ROOM],
}

// SAFETY: plain integers, no padding (4 + 128 bytes, 4-aligned).
unsafe impl aya::Pod for Frame {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Cursor {
    next: u32,
    first: u32,
    end: u32,
}

// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Cursor {}

/// Frames stored in the generator, to be sent by [`Generator::send`].
#[derive(Clone, Debug)]
pub struct Frames(Range<u32>);

impl Frames {
    pub fn len(&self) -> u64 {
        u64::from(self.0.end - self.0.start)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The loaded generator for one trunk.
pub struct Generator {
    ebpf: Ebpf,
    /// The trunk's interface index, in its namespace.
    ifindex: u32,
    /// Entries of FRAMES in use.
    stored: u32,
}

impl Generator {
    /// Loads the generator for `trunk` in `node`.
    pub fn load(node: &Namespace, trunk: &str) -> Result<Self> {
        let path = crate::staged::object("testbed-generator");
        let mut ebpf = Ebpf::load_file(&path).with_context(|| {
            format!(
                "loading {} (run `{}`)",
                path.display(),
                crate::staged::build_command(crate::staged::PROFILE)
            )
        })?;
        program(&mut ebpf)?
            .load()
            .context("the verifier rejected the generator")?;
        let ifindex = node.enter(|| super::datapath::ifindex(trunk))??;
        Ok(Self {
            ebpf,
            ifindex,
            stored: 0,
        })
    }

    /// Runs `program` (an XDP program) on every frame after the generator made it, as a
    /// native XDP program runs in the trunk's driver; `None` removes it.
    pub fn set_driver_xdp(&mut self, program: Option<&aya::programs::ProgramFd>) -> Result<()> {
        let mut slots: aya::maps::ProgramArray<_> = aya::maps::ProgramArray::try_from(
            self.ebpf.map_mut(DRIVER_XDP).context("map DRIVER_XDP")?,
        )?;
        match program {
            Some(fd) => slots.set(0, fd, 0)?,
            None => slots.clear_index(&0)?,
        }
        Ok(())
    }

    /// Stores `frames` after those already stored.
    pub fn store(&mut self, frames: &[Vec<u8>]) -> Result<Frames> {
        let mut map: Array<_, Frame> =
            Array::try_from(self.ebpf.map_mut(FRAMES).context("map FRAMES")?)?;
        let first = self.stored;
        let end = u32::try_from(frames.len())
            .ok()
            .and_then(|n| first.checked_add(n))
            .filter(|end| *end <= map.len())
            .with_context(|| {
                format!(
                    "{} frames do not fit in the generator ({} of {} stored)",
                    frames.len(),
                    first,
                    map.len()
                )
            })?;
        for (index, bytes) in (first..end).zip(frames) {
            let mut frame = Frame {
                len: bytes.len() as u32,
                bytes: [0; FRAME_ROOM],
            };
            frame
                .bytes
                .get_mut(..bytes.len())
                .with_context(|| format!("a frame of {} bytes", bytes.len()))?
                .copy_from_slice(bytes);
            map.set(index, frame, 0)?;
        }
        self.stored = end;
        Ok(Frames(first..end))
    }

    /// Passes `count` of `frames` (cycling through them) up the trunk, or as many as take
    /// `budget` of CPU time, from a thread in `node` pinned to the last CPU: the node's softirq
    /// work runs there too, so what the kernel times is the cost of the whole path on one CPU.
    pub fn send(
        &mut self,
        node: &Namespace,
        frames: &Frames,
        count: u64,
        budget: Duration,
    ) -> Result<Sent> {
        if frames.is_empty() {
            bail!("no frames to send");
        }
        let mut cursor: Array<_, Cursor> =
            Array::try_from(self.ebpf.map_mut(CURSOR).context("map CURSOR")?)?;
        cursor.set(
            0,
            Cursor {
                next: frames.0.start,
                first: frames.0.start,
                end: frames.0.end,
            },
            0,
        )?;
        let program = program(&mut self.ebpf)?;
        let test_frame = [0u8; FRAME_ROOM];
        // struct xdp_md: the whole test frame as data, received on the trunk.
        let context: Vec<u8> = [0, FRAME_ROOM as u32, 0, self.ifindex, 0, 0]
            .iter()
            .flat_map(|field| field.to_ne_bytes())
            .collect();
        node.enter(|| {
            pin_to_last_cpu();
            let mut sent = Sent {
                frames: 0,
                busy: Duration::ZERO,
            };
            while sent.frames < count && sent.busy < budget {
                let run = u32::try_from(count - sent.frames).map_or(RUN, |left| left.min(RUN));
                let mut options = TestRunOptions::new();
                options.data_in = Some(&test_frame);
                options.ctx_in = Some(&context);
                options.repeat = run;
                options.attrs = TestRunAttrs::new().xdp_live_frames(BATCH);
                let result = program
                    .test_run(options)
                    .context("BPF_PROG_TEST_RUN of the generator")?;
                // The kernel's mean time per frame, over the run's batches and the softirq
                // work they caused; time the thread spent preempted between batches, or
                // asleep before and after them, is not in it.
                sent.busy += result.duration * run;
                sent.frames += u64::from(run);
            }
            Ok(sent)
        })?
    }
}

/// What [`Generator::send`] sent, and the CPU time the node took for it.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub busy: Duration,
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROGRAM)
        .context("program generate")?
        .try_into()?)
}

fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET on an index below its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}
