//! The throughput bench's traffic: the node's trunk is a TAP device, and the generator
//! writes the VPC's frames into it, a frame per `write(2)`. The kernel receives each one
//! as a NIC's driver does: the frame is copied into a page, the trunk's native XDP program
//! (when attached) judges it there, before any skb exists, and only a frame it passes gets
//! an skb and goes up the stack (`tun_build_skb` in drivers/net/tun.c). The node's whole
//! path, XDP, the filter, routing and delivery to the pod, runs in the writing thread's
//! system call or that CPU's softirq thread.
//!
//! Why not `BPF_PROG_TEST_RUN` in live-frames mode, which injects with no sender at all: the
//! kernel these nodes run refuses it (`EPERM`). Why not a veth: a frame sent into a veth
//! already has an skb, which the veth copies again for a native XDP program, so XDP could
//! save nothing and would cost a copy no NIC makes. The system call's share of each frame is
//! the same for every filter, so it narrows their ratios.

use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::Namespace;

/// `TUNSETIFF` (linux/if_tun.h) and the flags of a TAP device whose frames carry no header.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Frames stored in the generator, to be sent by [`Generator::send`].
#[derive(Clone, Debug)]
pub struct Frames(Range<usize>);

impl Frames {
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The trunk's TAP device, held open: the device lives as long as the generator.
pub struct Generator {
    tap: OwnedFd,
    /// Every frame stored, in order.
    stored: Vec<Vec<u8>>,
}

impl Generator {
    /// Creates the TAP device `trunk` in `node` (down, without an address: the caller
    /// configures it like any link).
    pub fn create(node: &Namespace, trunk: &str) -> Result<Self> {
        let name = trunk.to_string();
        let tap = node.enter(move || create_tap(&name))??;
        Ok(Self {
            tap,
            stored: Vec::new(),
        })
    }

    /// Stores `frames` after those already stored.
    pub fn store(&mut self, frames: &[Vec<u8>]) -> Result<Frames> {
        let first = self.stored.len();
        self.stored.extend_from_slice(frames);
        Ok(Frames(first..self.stored.len()))
    }

    /// Writes `count` of `frames` (cycling through them) into the trunk, or as many as take
    /// `budget` of CPU time, from a thread pinned to the last CPU: the node's softirq work
    /// runs there too, in the writing thread or the CPU's `ksoftirqd`, whose CPU times are
    /// the cost of the whole path on one CPU.
    pub fn send(&mut self, frames: &Frames, count: u64, budget: Duration) -> Result<Sent> {
        if frames.is_empty() {
            bail!("no frames to send");
        }
        let tap = self.tap.as_raw_fd();
        let stored = &self.stored[frames.0.clone()];
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<Sent> {
                    let cpu = pin_to_last_cpu();
                    let softirq = softirq_clock(cpu)?;
                    let started = (thread_time(), clock_time(softirq));
                    let mut sent = Sent {
                        frames: 0,
                        busy: Duration::ZERO,
                    };
                    let mut next = stored.iter().cycle();
                    while sent.frames < count && sent.busy < budget {
                        // Clocks are read once per batch: they cost a system call each.
                        let batch = (count - sent.frames).min(256);
                        for _ in 0..batch {
                            write_frame(tap, next.next().expect("cycled"))?;
                        }
                        sent.frames += batch;
                        sent.busy = (thread_time() - started.0) + (clock_time(softirq) - started.1);
                    }
                    Ok(sent)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?
        })
    }
}

/// What [`Generator::send`] sent, and the CPU time the node took for it.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub busy: Duration,
}

/// A TAP device named `name` in the calling thread's namespace, gone when the descriptor
/// closes. Non-blocking, as the kernel receives a written frame into a page (and runs native
/// XDP on it) only for a non-blocking writer.
fn create_tap(name: &str) -> Result<OwnedFd> {
    // SAFETY: open(2) of a path given as a C string; the descriptor is owned from here on.
    let tap = unsafe {
        let fd = libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: a zeroed ifreq is valid; the name is set below, shorter than IFNAMSIZ.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        bail!("the interface name {name} is too long");
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &raw mut request) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating the TAP device {name}"));
    }
    Ok(tap)
}

/// Writes one frame into the TAP device: the trunk receives it.
fn write_frame(tap: i32, frame: &[u8]) -> Result<()> {
    // SAFETY: write(2) of a buffer of the length given.
    let n = unsafe { libc::write(tap, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("writing a frame into the trunk");
    }
    if n as usize != frame.len() {
        bail!("the trunk took {n} of a frame's {} bytes", frame.len());
    }
    Ok(())
}

/// Pins the calling thread to the last CPU, and returns that CPU.
fn pin_to_last_cpu() -> usize {
    let cpu = std::thread::available_parallelism().map_or(1, usize::from) - 1;
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET on an index below its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    cpu
}

/// The CPU-time clock of `ksoftirqd/<cpu>`, where that CPU's softirq work goes when the
/// sender's own system calls leave it pending.
fn softirq_clock(cpu: usize) -> Result<libc::clockid_t> {
    let name = format!("ksoftirqd/{cpu}");
    let pid = std::fs::read_dir("/proc")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .with_context(|| format!("no {name} thread"))?;
    let mut clock = 0;
    // SAFETY: writes the clock ID of an existing process.
    let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("clock_getcpuclockid");
    }
    Ok(clock)
}

fn clock_time(clock: libc::clockid_t) -> Duration {
    // SAFETY: a zeroed timespec filled by clock_gettime.
    let mut time: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(clock, &mut time) };
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

fn thread_time() -> Duration {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID)
}
