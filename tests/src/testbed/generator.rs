//! The throughput bench's traffic: frames sent into the trunk from the VPC's end of its
//! veth pair through a packet socket's transmit ring (`PACKET_TX_RING`, past the queueing
//! discipline), a ring of frames per system call. The trunk receives them as a NIC's driver
//! hands frames up (its native XDP program, when attached, runs first), and the node's path,
//! the filter, routing and delivery to the pod all run on the sender's CPU, in its system
//! call or that CPU's softirq thread.
//!
//! Why not `BPF_PROG_TEST_RUN` in live-frames mode, which injects with no sender at all: the
//! kernel these nodes run refuses it (`EPERM`). The sender's share of each frame (an skb
//! built and handed to the veth) is the same for every filter, so it narrows their ratios.

use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::Namespace;
use super::throughput::set_option;

/// Bytes of one ring slot: the slot's header, then the frame.
const SLOT: usize = 256;
/// Where a slot's frame starts (`TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)`).
const DATA: usize = 32;
/// Slots of the ring: what one system call sends.
const SLOTS: usize = 1024;
const BLOCK: usize = 1 << 16;
/// `tp_status` values (linux/if_packet.h).
const AVAILABLE: u32 = 0;
const SEND_REQUEST: u32 = 1;
const WRONG_FORMAT: u32 = 4;

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

/// A packet socket on the VPC's end of the trunk, with its transmit ring mapped.
pub struct Generator {
    socket: OwnedFd,
    ring: *mut u8,
    /// The ring slot the kernel sends next: it goes round the ring, send after send.
    head: usize,
    /// Every frame stored, in order.
    stored: Vec<Vec<u8>>,
}

// SAFETY: the ring is memory of the socket's own, touched only by the thread that sends.
unsafe impl Send for Generator {}

impl Generator {
    /// Opens the sender on `link` in `vpc`.
    pub fn load(vpc: &Namespace, link: &str) -> Result<Self> {
        let link = link.to_string();
        let socket = vpc.enter(move || open(&link))??;
        let ring = map_ring(&socket)?;
        Ok(Self {
            socket,
            ring,
            head: 0,
            stored: Vec::new(),
        })
    }

    /// Stores `frames` after those already stored.
    pub fn store(&mut self, frames: &[Vec<u8>]) -> Result<Frames> {
        if let Some(frame) = frames.iter().find(|f| f.len() > SLOT - DATA) {
            bail!("a frame of {} bytes does not fit a ring slot", frame.len());
        }
        let first = self.stored.len();
        self.stored.extend_from_slice(frames);
        Ok(Frames(first..self.stored.len()))
    }

    /// Sends `count` of `frames` (cycling through them) into the trunk, or as many as take
    /// `budget` of CPU time, from a thread pinned to the last CPU: the node's softirq work
    /// runs there too, in the sending thread or the CPU's `ksoftirqd`, whose CPU times are
    /// the cost of the whole path on one CPU.
    pub fn send(&mut self, frames: &Frames, count: u64, budget: Duration) -> Result<Sent> {
        if frames.is_empty() {
            bail!("no frames to send");
        }
        let (socket, ring) = (self.socket.as_raw_fd(), self.ring as usize);
        let stored = &self.stored[frames.0.clone()];
        let head = &mut self.head;
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
                        let batch = usize::try_from(count - sent.frames)
                            .map_or(SLOTS, |left| left.min(SLOTS));
                        let slots: Vec<usize> = (0..batch).map(|i| (*head + i) % SLOTS).collect();
                        for &slot in &slots {
                            let frame = next.next().expect("cycled");
                            // SAFETY: slot < SLOTS, within the mapped ring; the kernel gave
                            // every slot back before the previous batch's flush returned.
                            unsafe { fill(ring as *mut u8, slot, frame) };
                        }
                        flush(socket, ring as *mut u8, &slots)?;
                        *head = (*head + batch) % SLOTS;
                        sent.frames += batch as u64;
                        sent.busy = (thread_time() - started.0) + (clock_time(softirq) - started.1);
                    }
                    Ok(sent)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?
        })
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map_ring`, unmapped once.
        unsafe { libc::munmap(self.ring.cast(), SLOTS * SLOT) };
    }
}

/// What [`Generator::send`] sent, and the CPU time the node took for it.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub busy: Duration,
}

/// A raw packet socket bound to `link`, sending past the qdisc through a version 2 ring.
fn open(link: &str) -> Result<OwnedFd> {
    // SAFETY: plain socket calls; the descriptor is owned from here on.
    let socket = unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        OwnedFd::from_raw_fd(fd)
    };
    let ifindex = super::datapath::ifindex(link)?;
    set_option(
        &socket,
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &libc::tpacket_versions::TPACKET_V2,
    )
    .context("PACKET_VERSION")?;
    set_option(&socket, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &1i32)
        .context("PACKET_QDISC_BYPASS")?;
    let request = libc::tpacket_req {
        tp_block_size: BLOCK as u32,
        tp_block_nr: (SLOTS * SLOT / BLOCK) as u32,
        tp_frame_size: SLOT as u32,
        tp_frame_nr: SLOTS as u32,
    };
    set_option(&socket, libc::SOL_PACKET, libc::PACKET_TX_RING, &request)
        .context("PACKET_TX_RING")?;
    // SAFETY: a zeroed sockaddr_ll with family, protocol and interface set is valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = i32::try_from(ifindex)?;
    // SAFETY: bind with an address of the size given.
    if unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {link}"));
    }
    Ok(socket)
}

fn map_ring(socket: &OwnedFd) -> Result<*mut u8> {
    // SAFETY: a shared mapping of the socket's ring, of the size it was set up with.
    let ring = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOTS * SLOT,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            socket.as_raw_fd(),
            0,
        )
    };
    if ring == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mapping the transmit ring");
    }
    Ok(ring.cast())
}

/// The status word of ring slot `slot`.
///
/// # Safety
/// `ring` is the mapped ring and `slot < SLOTS`.
unsafe fn status<'a>(ring: *mut u8, slot: usize) -> &'a std::sync::atomic::AtomicU32 {
    // SAFETY: the slot's header starts with its 4-byte-aligned status, shared with the kernel.
    unsafe { std::sync::atomic::AtomicU32::from_ptr(ring.add(slot * SLOT).cast()) }
}

/// Writes `frame` into ring slot `slot` and hands the slot to the kernel.
///
/// # Safety
/// As [`status`], and the slot is the sender's (not handed to the kernel).
unsafe fn fill(ring: *mut u8, slot: usize, frame: &[u8]) {
    // SAFETY: the caller's; the frame fits the slot (checked when stored).
    unsafe {
        let header = ring.add(slot * SLOT).cast::<libc::tpacket2_hdr>();
        std::ptr::copy_nonoverlapping(frame.as_ptr(), ring.add(slot * SLOT + DATA), frame.len());
        (*header).tp_len = frame.len() as u32;
        status(ring, slot).store(SEND_REQUEST, std::sync::atomic::Ordering::Release);
    }
}

/// Sends `slots` (from the ring's head on) and waits until the kernel gave every one back.
fn flush(socket: i32, ring: *mut u8, slots: &[usize]) -> Result<()> {
    // SAFETY: send with no buffer: the kernel takes the frames from the ring.
    if unsafe { libc::send(socket, std::ptr::null(), 0, 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("sending the ring");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for &slot in slots {
        // SAFETY: slot < SLOTS.
        let status = unsafe { status(ring, slot) };
        loop {
            match status.load(std::sync::atomic::Ordering::Acquire) {
                AVAILABLE => break,
                WRONG_FORMAT => bail!("the kernel refused ring slot {slot}'s frame"),
                _ if std::time::Instant::now() > deadline => {
                    bail!("the kernel kept ring slot {slot} for 5 s")
                }
                _ => std::thread::yield_now(),
            }
        }
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
