//! The throughput bench's node: a namespace for the VPC (the primary ENI's other end), the
//! node (trunk `eth1`, the pod's `vlan.eth.N` link from the test bed), and one branch pod
//! behind it. The trunk is a TAP device: tagged frames arrive on it from the generator
//! (`generator.rs`: written into it, received as a NIC's driver receives them), cross the
//! filter under test (the enforcer on the trunk, or nftables in the node's forward hook),
//! are untagged and routed to the pod, whose `eth0` counts them. The node addresses them to
//! a MAC the pod does not have, so the pod drops them silently: no reply loads the path.
//! What the node sends out of the trunk (the one reply that establishes a flow) goes to the
//! TAP device's queue, unread.

use std::collections::HashSet;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{SchedClassifier, Xdp, XdpMode};
use enforcer::compile;
use enforcer::kernel::ebpf::{CLASSIFIERS, TC_INGRESS};
use enforcer::kernel::maps::KernelMaps;
use enforcer::kernel::xdp::XDP_INGRESS;
use enforcer::model::{BranchPod, Direction, L4Match, Model, Peer};
use enforcer::policy::eval::{self, L4Packet, L4Query, Query};
use enforcer_common::Reason;

use super::NAME_PREFIX;
use super::datapath::Datapath;
use super::generator::{Frames, Generator, Sent};
use super::netns::{Namespace, output, run};
use super::nft::{self, ESTABLISHED_COUNTER, Layout};
use super::wiring::{self, Mac};
use crate::frame::{self, Ip, L4, Tag};
use crate::random::{Rng, packet_for_rule, random_addr};

/// The node's trunk and primary interface (the model's NodeConfig names are not needed here).
const TRUNK: &str = "eth1";
const PRIMARY: &str = "eth0";
/// Where the node sends the pod's frames: not the pod's MAC, so the pod drops them unanswered.
const ELSEWHERE: Mac = Mac([0x02, 0x73, 0x67, 8, 0, 0]);
/// The nftables table (one per node namespace).
const TABLE: &str = "sgbench";

/// What filters the trunk's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Unfiltered,
    /// The enforcer's TC programs alone (`--xdp off`).
    Enforcer,
    /// The enforcer's XDP program in the trunk's driver, then its TC programs.
    EnforcerXdp,
    /// The enforcer's TC programs behind an XDP program that passes everything: what the
    /// driver's XDP hook costs, apart from the enforcer's screen.
    EnforcerXdpHook,
    NftLinear,
    NftSets,
}

impl Filter {
    pub const ALL: [Filter; 6] = [
        Filter::Unfiltered,
        Filter::Enforcer,
        Filter::EnforcerXdp,
        Filter::EnforcerXdpHook,
        Filter::NftLinear,
        Filter::NftSets,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Filter::Unfiltered => "unfiltered",
            Filter::Enforcer => "enforcer",
            Filter::EnforcerXdp => "enforcer + xdp",
            Filter::EnforcerXdpHook => "enforcer + xdp pass-all",
            Filter::NftLinear => "nftables linear",
            Filter::NftSets => "nftables sets",
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub sent: u64,
    pub received: u64,
    /// CPU time the node took for the frames, as the kernel timed it.
    pub busy: Duration,
}

impl Run {
    /// Packets per second of one CPU's time.
    pub fn pps(&self) -> f64 {
        self.received as f64 / self.busy.as_secs_f64()
    }

    /// Frames sent per second of one CPU's time (a flood the filter drops).
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.busy.as_secs_f64()
    }
}

/// The enforcer loaded over a compiled model, attached to the trunk while enforcing.
struct Enforcer {
    ebpf: Ebpf,
    maps: KernelMaps,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    xdp_link: Option<XdpLinkId>,
}

/// The bench's node; dropping it tears everything down.
pub struct Bed {
    vpc: Option<Namespace>,
    node: Option<Namespace>,
    pod_ns: Option<Namespace>,
    datapath: Option<Datapath>,
    enforcer: Option<Enforcer>,
    pod: BranchPod,
    link: String,
    /// The trunk's traffic.
    generator: Option<Generator>,
    /// The pass-all XDP program's link, while [`Filter::EnforcerXdpHook`] is installed.
    xdp_pass_all: Option<XdpLinkId>,
    /// nftables rulesets by layout, with their sizes.
    pub linear: nft::Ruleset,
    pub sets: nft::Ruleset,
}

impl Bed {
    /// Builds the node for the model's first pod; the enforcer is loaded with the whole model.
    pub fn build(model: &Model) -> Result<Self> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = format!(
            "{NAME_PREFIX}{}-tput{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let pod = model.pods.first().context("the model has no pod")?.clone();
        let link = wiring::vlan_link(pod.vlan);
        let mut bed = Self {
            vpc: None,
            node: None,
            pod_ns: None,
            datapath: None,
            enforcer: None,
            linear: nft::ruleset(model, &pod, &link, TABLE, Layout::Linear),
            sets: nft::ruleset(model, &pod, &link, TABLE, Layout::Sets),
            pod,
            link,
            generator: None,
            xdp_pass_all: None,
        };
        bed.wire(&run)?;
        bed.enforcer = Some(Enforcer::load(model)?);
        Ok(bed)
    }

    fn wire(&mut self, name: &str) -> Result<()> {
        let run_of = |role: &str| format!("{name}-{role}");
        let vpc = self.vpc.insert(Namespace::create(&run_of("vpc"))?);
        vpc.sysctl(wiring::COMMON_SYSCTLS)?;
        let node = self.node.insert(Namespace::create(&run_of("node"))?);
        node.sysctl(wiring::COMMON_SYSCTLS)?;
        node.sysctl(wiring::ROUTER_SYSCTLS)?;
        let pod_ns = self.pod_ns.insert(Namespace::create(&run_of("pod"))?);
        pod_ns.sysctl(wiring::COMMON_SYSCTLS)?;
        let vpc = self.vpc.as_ref().expect("created");
        let node = self.node.as_ref().expect("created");
        let pod_ns = self.pod_ns.as_ref().expect("created");

        node.ip(&wiring::node(vpc.name(), PRIMARY, &[]))?;
        self.generator = Some(Generator::create(node, TRUNK)?);
        node.sysctl(&[(&format!("net.ipv6.conf.{TRUNK}.disable_ipv6"), "1")])?;
        run(node.command("ip").args([
            "link",
            "set",
            TRUNK,
            "address",
            &Mac::NODE_TRUNK.to_string(),
            "up",
        ]))?;
        let addresses: Vec<IpAddr> = self.pod.addresses().collect();
        let host = wiring::host_link("vlan", &self.pod.name);
        let pod_mac = Mac::parse(&self.pod.mac).context("the pod's MAC")?;
        node.ip(&wiring::node_side_of_pod(
            0,
            pod_ns.name(),
            &host,
            pod_mac,
            &addresses,
            Some(&self.pod),
            TRUNK,
        ))?;
        pod_ns.ip(&wiring::pod(&addresses, Mac::host_side(0)))?;
        for addr in &addresses {
            run(node.command("ip").args([
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &ELSEWHERE.to_string(),
                "dev",
                &host,
                "nud",
                "permanent",
            ]))?;
        }
        let mut datapath = Datapath::load()?;
        datapath.attach_vlan_link(node, &self.link, self.pod.vlan)?;
        self.datapath = Some(datapath);
        Ok(())
    }

    /// Stores `frames` in the generator, to be sent by [`Bed::run`] and [`Bed::deliveries`].
    pub fn store(&mut self, frames: &[Vec<u8>]) -> Result<Frames> {
        self.generator
            .as_mut()
            .expect("loaded at build")
            .store(frames)
    }

    /// Passes `count` of `frames` (cycled) up the trunk, or as many as take `budget` of CPU.
    fn send(&mut self, frames: &Frames, count: u64, budget: Duration) -> Result<Sent> {
        self.generator
            .as_mut()
            .expect("loaded at build")
            .send(frames, count, budget)
    }

    fn node(&self) -> &Namespace {
        self.node.as_ref().expect("node namespace")
    }

    fn pod_ns(&self) -> &Namespace {
        self.pod_ns.as_ref().expect("pod namespace")
    }

    /// Puts `filter` on the node (after [`Bed::remove`] of the previous one).
    pub fn install(&mut self, filter: Filter) -> Result<()> {
        match filter {
            Filter::Unfiltered => Ok(()),
            Filter::Enforcer => {
                let node = self.node.as_ref().expect("node namespace");
                self.enforcer
                    .as_mut()
                    .expect("loaded at build")
                    .attach(node)
            }
            Filter::EnforcerXdp => {
                self.install(Filter::Enforcer)?;
                let node = self.node.as_ref().expect("node namespace");
                self.enforcer
                    .as_mut()
                    .expect("loaded at build")
                    .attach_xdp(node)
            }
            Filter::EnforcerXdpHook => {
                self.install(Filter::Enforcer)?;
                let node = self.node.as_ref().expect("node namespace");
                let datapath = self.datapath.as_mut().expect("loaded at build");
                self.xdp_pass_all = Some(datapath.attach_xdp_pass_all(node, TRUNK)?);
                Ok(())
            }
            Filter::NftLinear => nft_load(self.node(), &self.linear.text),
            Filter::NftSets => nft_load(self.node(), &self.sets.text),
        }
    }

    pub fn remove(&mut self, filter: Filter) -> Result<()> {
        match filter {
            Filter::Unfiltered => Ok(()),
            Filter::Enforcer => self.enforcer.as_mut().expect("loaded").detach(),
            Filter::EnforcerXdp => {
                self.enforcer.as_mut().expect("loaded").detach_xdp()?;
                self.remove(Filter::Enforcer)
            }
            Filter::EnforcerXdpHook => {
                if let Some(link) = self.xdp_pass_all.take() {
                    let datapath = self.datapath.as_mut().expect("loaded at build");
                    datapath.detach_xdp_pass_all(link)?;
                }
                self.remove(Filter::Enforcer)
            }
            Filter::NftLinear | Filter::NftSets => run(self
                .node()
                .command("nft")
                .args(["delete", "table", "inet", TABLE])),
        }
    }

    /// Forgets every tracked flow (the enforcer's and the node's conntrack).
    pub fn forget_flows(&mut self) -> Result<()> {
        self.enforcer
            .as_mut()
            .expect("loaded")
            .maps
            .forget_flows(|_| true)?;
        self.node().enter(flush_conntrack)?
    }

    /// How many flows the enforcer tracks now.
    pub fn tracked_flows(&self) -> Result<usize> {
        Ok(self.enforcer.as_ref().expect("loaded").maps.flow_count()?)
    }

    /// What the filter counted as passing tracked flows (enforcer: `PassEstablished`;
    /// nftables: the established rule), and as new flows allowed (enforcer only).
    pub fn tracked_counts(&self, filter: Filter) -> Result<(u64, u64)> {
        match filter {
            Filter::Unfiltered => Ok((0, 0)),
            Filter::Enforcer | Filter::EnforcerXdp | Filter::EnforcerXdpHook => {
                let counters = self.enforcer.as_ref().expect("loaded").maps.counters()?;
                Ok((
                    counters[Reason::PassEstablished as usize],
                    counters[Reason::PassNew as usize],
                ))
            }
            Filter::NftLinear | Filter::NftSets => {
                let out = output(self.node().command("nft").args([
                    "-j",
                    "list",
                    "counter",
                    "inet",
                    TABLE,
                    ESTABLISHED_COUNTER,
                ]))?;
                let json: serde_json::Value = serde_json::from_str(&out)?;
                let packets = json["nftables"]
                    .as_array()
                    .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
                    .context("no counter in `nft -j list counter`")?;
                Ok((packets, 0))
            }
        }
    }

    /// The run time and run count (kept while `aya::sys::enable_stats` holds) of the
    /// enforcer's program that meets a trunk frame first under `filter`: XDP with XDP on,
    /// else TC ingress.
    pub fn first_program_runs(&mut self, filter: Filter) -> Result<(Duration, u64)> {
        let ebpf = &mut self.enforcer.as_mut().expect("loaded at build").ebpf;
        let info = match filter {
            Filter::EnforcerXdp => xdp(ebpf)?.info()?,
            Filter::Enforcer => classifier(ebpf, TC_INGRESS)?.info()?,
            _ => bail!("{} runs no program of the enforcer's first", filter.name()),
        };
        Ok((info.run_time(), info.run_count()))
    }

    /// Frames the pod's `eth0` received so far.
    fn received(&self) -> Result<u64> {
        let out = output(
            self.pod_ns()
                .command("ip")
                .args(["-s", "-j", "link", "show", "dev", "eth0"]),
        )?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        json[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packets in `ip -s -j link`")
    }

    /// Sends `frames` (cycling through them if `repeat`, else each once) for up to `budget`
    /// of CPU time, on one pinned CPU, and counts what reached the pod.
    pub fn run(&mut self, frames: &Frames, repeat: bool, budget: Duration) -> Result<Run> {
        let before = self.received()?;
        let count = if repeat { u64::MAX } else { frames.len() };
        let sent = self.send(frames, count, budget)?;
        // Delivery is synchronous (softirq on the generator's CPU); leave a moment for a backlog.
        std::thread::sleep(Duration::from_millis(20));
        let received = self.received()? - before;
        Ok(Run {
            sent: sent.frames,
            received,
            busy: sent.busy,
        })
    }

    /// Sends `frames` once and returns those the pod received (by flow key).
    pub fn deliveries(&mut self, frames: &Frames) -> Result<HashSet<Vec<u8>>> {
        let receiver = self.pod_ns().enter(|| receiver("eth0", frames.len()))??;
        self.send(frames, frames.len(), Duration::from_secs(5))?;
        let mut seen = HashSet::new();
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: a zeroed sockaddr_ll is valid; recvfrom fills it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom into a buffer and address of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    receiver.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                break;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if let Some(key) = flow_key(&buf[..n as usize], 14) {
                seen.insert(key);
            }
        }
        Ok(seen)
    }

    /// Makes `frame`'s UDP flow established (`stored`: `frame` in the generator): the pod
    /// answers it once.
    pub fn establish(&mut self, frame: &[u8], stored: &Frames) -> Result<()> {
        self.send(stored, 1, Duration::from_secs(1))?;
        let ip = &frame[18..];
        let (peer, pod) = match ip[0] >> 4 {
            4 => (
                IpAddr::from(<[u8; 4]>::try_from(&ip[12..16])?),
                IpAddr::from(<[u8; 4]>::try_from(&ip[16..20])?),
            ),
            _ => bail!("the established flow is IPv4"),
        };
        let sport = u16::from_be_bytes([ip[20], ip[21]]);
        let dport = u16::from_be_bytes([ip[22], ip[23]]);
        self.pod_ns().enter(|| -> Result<()> {
            let socket = UdpSocket::bind(SocketAddr::new(pod, dport))?;
            socket.send_to(b"reply", SocketAddr::new(peer, sport))?;
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.enforcer = None;
        self.datapath = None;
        for ns in [self.pod_ns.take(), self.node.take(), self.vpc.take()]
            .into_iter()
            .flatten()
        {
            let name = ns.name().to_string();
            if let Err(e) = ns.delete() {
                eprintln!("removing namespace {name}: {e:#}");
            }
        }
    }
}

impl Enforcer {
    fn load(model: &Model) -> Result<Self> {
        let mut ebpf = enforcer::kernel::ebpf::load()?;
        for (name, _) in CLASSIFIERS {
            classifier(&mut ebpf, name)?.load()?;
        }
        xdp(&mut ebpf)?.load()?;
        let mut maps = KernelMaps::take(&mut ebpf)?;
        let compiled = compile::compile(model)?;
        maps.apply(&compiled, &model.node)?;
        Ok(Self {
            ebpf,
            maps,
            links: Vec::new(),
            xdp_link: None,
        })
    }

    fn attach(&mut self, node: &Namespace) -> Result<()> {
        for (name, hook) in CLASSIFIERS {
            let program = classifier(&mut self.ebpf, name)?;
            let link = node
                .enter(|| program.attach(TRUNK, hook))?
                .with_context(|| format!("attaching {name} to {TRUNK}"))?;
            self.links.push((name, link));
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<()> {
        for (name, link) in self.links.drain(..) {
            classifier(&mut self.ebpf, name)?.detach(link)?;
        }
        Ok(())
    }

    /// Attaches the XDP program to the trunk in its driver (the TAP driver's native XDP).
    fn attach_xdp(&mut self, node: &Namespace) -> Result<()> {
        let program = xdp(&mut self.ebpf)?;
        let link = node
            .enter(|| program.attach(TRUNK, XdpMode::Driver))?
            .with_context(|| format!("attaching {XDP_INGRESS} to {TRUNK}"))?;
        self.xdp_link = Some(link);
        Ok(())
    }

    fn detach_xdp(&mut self) -> Result<()> {
        if let Some(link) = self.xdp_link.take() {
            xdp(&mut self.ebpf)?.detach(link)?;
        }
        Ok(())
    }
}

fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(XDP_INGRESS)
        .context("the XDP program")?
        .try_into()?)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name}"))?
        .try_into()?)
}

fn nft_load(node: &Namespace, ruleset: &str) -> Result<()> {
    let mut nft = node.command("nft");
    nft.args(["-f", "-"]);
    if let Err(stderr) = super::netns::run_with_input(nft, ruleset)? {
        bail!(
            "nft -f refused the ruleset: {}",
            stderr.lines().take(8).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// An AF_PACKET socket receiving every frame of `dev` (in the calling thread's namespace),
/// with room for `frames` frames, waiting up to 200 ms for each.
fn receiver(dev: &str, frames: u64) -> Result<OwnedFd> {
    const ETH_P_ALL: u16 = 0x0003;
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("no interface {dev}"));
    }
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the size given.
    if unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {dev}"));
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout).context("SO_RCVTIMEO")?;
    // The generator's frames arrive all at once, each in a page of its own (the truesize a
    // receive buffer is charged): beyond the default buffer, most would be dropped.
    let room = i32::try_from(frames * 8192).unwrap_or(i32::MAX);
    set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &room).context("SO_RCVBUFFORCE")?;
    Ok(socket)
}

/// Sets option `name` of `level` (`SOL_SOCKET`, `SOL_PACKET`, …) to `value`.
pub(super) fn set_option<T>(
    socket: &OwnedFd,
    level: i32,
    name: i32,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads a `T` from a valid reference on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes every conntrack entry of the calling thread's namespace (ctnetlink
/// `IPCTNL_MSG_CT_DELETE` without a tuple, as `conntrack -F` does).
fn flush_conntrack() -> Result<()> {
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    // SAFETY: plain socket(2); owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("netfilter netlink socket");
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut message = Vec::with_capacity(20);
    message.extend_from_slice(&20u32.to_ne_bytes());
    message.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    message.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, version 0, resource 0.
    message.extend_from_slice(&[0, 0, 0, 0]);
    // SAFETY: zeroed sockaddr_nl addresses the kernel once its family is set.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and address of the sizes given.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("sending the conntrack flush");
    }
    let mut reply = [0u8; 256];
    // SAFETY: recv into a buffer of the size given.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if n < 20 {
        return Err(std::io::Error::last_os_error())
            .context("reading the conntrack flush's answer");
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if kind != libc::NLMSG_ERROR as u16 || error != 0 {
        bail!(
            "flushing conntrack: {}",
            std::io::Error::from_raw_os_error(-error)
        );
    }
    Ok(())
}

/// Identity of an IP packet starting at `offset` in `frame`: addresses, protocol and the
/// first 8 bytes of its transport header (ports, or ICMP type, code and id).
pub fn flow_key(frame: &[u8], offset: usize) -> Option<Vec<u8>> {
    let ip = frame.get(offset..)?;
    let (addresses, protocol, l4) = match ip.first()? >> 4 {
        4 => (ip.get(12..20)?, *ip.get(9)?, ip.get(20..28)?),
        6 => (ip.get(8..40)?, *ip.get(6)?, ip.get(40..48)?),
        _ => return None,
    };
    let mut key = addresses.to_vec();
    key.push(protocol);
    // Skip the checksum of ICMP, which forwarding does not change but keep the key simple.
    key.extend_from_slice(l4);
    Some(key)
}

/// A tagged frame for the pod's VLAN as the VPC sends it on the trunk, with correct
/// checksums (conntrack drops bad ones to invalid).
pub fn trunk_frame(pod: &BranchPod, ip: &Ip) -> Vec<u8> {
    let mut frame = frame::ip_frame(Tag::Vlan(pod.vlan), ip);
    frame[0..6].copy_from_slice(&Mac::vlan_link(pod.vlan).0);
    frame[6..12].copy_from_slice(&Mac::VPC_TRUNK.0);
    let packet = &mut frame[18..];
    let v6 = packet[0] >> 4 == 6;
    let (header, protocol, pseudo) = if v6 {
        let mut pseudo = packet[8..40].to_vec();
        pseudo.extend_from_slice(&((packet.len() - 40) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, packet[6]]);
        (40, packet[6], pseudo)
    } else {
        let mut pseudo = packet[12..20].to_vec();
        pseudo.extend_from_slice(&[0, packet[9]]);
        pseudo.extend_from_slice(&((packet.len() - 20) as u16).to_be_bytes());
        (20, packet[9], pseudo)
    };
    let at = match protocol {
        6 => 16,
        17 => 6,
        1 => 2,
        58 => 2,
        _ => return frame,
    };
    let l4 = &mut packet[header..];
    l4[at] = 0;
    l4[at + 1] = 0;
    let mut bytes = if protocol == 1 { Vec::new() } else { pseudo };
    bytes.extend_from_slice(l4);
    let mut sum = frame::checksum(&bytes);
    if protocol == 17 && sum == 0 {
        sum = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// A query for the evaluator from an ingress packet.
fn query(ip: &Ip) -> Query {
    let l4 = match ip.l4 {
        L4::Tcp { dst, .. } => L4Packet::tcp(dst),
        L4::Udp { dst, .. } => L4Packet::udp(dst),
        L4::Icmp {
            icmp_type, code, ..
        } => L4Packet::new(ip.protocol(), 0, icmp_type, code),
        L4::Other { protocol } => L4Packet::new(protocol, 0, 0, 0),
    };
    Query {
        direction: Direction::Ingress,
        peer: ip.src,
        l4: L4Query::Packet(l4),
    }
}

/// Whether the pod's groups allow `ip` (arriving for the pod) as a new flow.
pub fn allowed(model: &Model, pod: &BranchPod, ip: &Ip) -> bool {
    eval::evaluate(model, pod, &query(ip)).allowed
}

/// `count` new IPv4 flows to the pod, each its own 5-tuple, each aimed at one of the pod's
/// ingress rules with an IPv4 peer (TCP and UDP port rules, all-traffic rules as TCP),
/// rules drawn uniformly, none of it traffic never filtered. The first UDP one is also returned, to be the established flow.
pub fn new_flows(rng: &mut Rng, model: &Model, count: usize) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let pod = &model.pods[0];
    let dst = IpAddr::V4(pod.ipv4.context("the pod has IPv4")?);
    let mut targets: Vec<(Vec<IpAddr>, (u32, u32), L4Match)> = Vec::new();
    for group in pod.groups.iter().filter_map(|id| model.groups.get(id)) {
        for rule in &group.ingress {
            if !matches!(rule.l4, L4Match::All | L4Match::Ports { .. }) {
                continue;
            }
            match &rule.peer {
                Peer::Cidr(cidr) if cidr.is_ipv4() => {
                    let IpAddr::V4(base) = cidr.addr() else {
                        continue;
                    };
                    let size = 1u64 << (32 - u32::from(cidr.prefix_len()));
                    let base = u32::from(base);
                    targets.push((
                        Vec::new(),
                        (base, (u64::from(base) + size - 1) as u32),
                        rule.l4,
                    ));
                }
                Peer::Group(id) => {
                    let members: Vec<IpAddr> = model.members[id]
                        .iter()
                        .filter(|a| a.is_ipv4())
                        .map(|a| a.addr())
                        .collect();
                    if !members.is_empty() {
                        targets.push((members, (0, 0), rule.l4));
                    }
                }
                _ => {}
            }
        }
    }
    if targets.is_empty() {
        bail!("the pod has no IPv4 TCP/UDP ingress rule");
    }
    let mut seen = HashSet::new();
    let mut frames = Vec::with_capacity(count);
    let mut established = None;
    while frames.len() < count {
        let (members, (lo, hi), l4) = rng.pick(&targets).clone();
        let src = if members.is_empty() {
            IpAddr::V4((lo + rng.below(u64::from(hi - lo) + 1) as u32).into())
        } else {
            *rng.pick(&members)
        };
        let sport = rng.u16_in(1024, u16::MAX);
        let l4 = match l4 {
            L4Match::Ports {
                protocol: 17,
                from,
                to,
            } => L4::Udp {
                src: sport,
                dst: rng.u16_in(from, to),
            },
            L4Match::Ports { from, to, .. } => L4::Tcp {
                src: sport,
                dst: rng.u16_in(from, to),
                flags: frame::TCP_SYN,
            },
            _ => L4::Tcp {
                src: sport,
                dst: rng.u16_in(1, u16::MAX),
                flags: frame::TCP_SYN,
            },
        };
        let ip = Ip { src, dst, l4 };
        let (proto, dport) = match l4 {
            L4::Tcp { dst, .. } => (6, dst),
            L4::Udp { dst, .. } => (17, dst),
            _ => unreachable!("TCP or UDP only"),
        };
        // Traffic never filtered (peers, DHCP) would not test the rules.
        if eval::unfiltered(model, pod, &query(&ip)).is_some()
            || !seen.insert((src, proto, sport, dport))
        {
            continue;
        }
        // Every flow must be one the enforcer (and the evaluator) allows; a sample proves it.
        if frames.len() < 1000 && !allowed(model, pod, &ip) {
            bail!("generated flow {ip:?} is not allowed by the pod's groups");
        }
        let frame = trunk_frame(pod, &ip);
        if proto == 17 && established.is_none() {
            established = Some(frame.clone());
        }
        frames.push(frame);
    }
    Ok((
        frames,
        established.context("no UDP flow among the generated ones")?,
    ))
}

/// A flood the pod's groups refuse: `count` TCP SYNs to the pod from the IPv4 documentation
/// range (no rule names it), each its own 5-tuple, each checked with the evaluator.
pub fn denied_flows(rng: &mut Rng, model: &Model, count: usize) -> Result<Vec<Vec<u8>>> {
    let pod = &model.pods[0];
    let dst = IpAddr::V4(pod.ipv4.context("the pod has IPv4")?);
    let mut seen = HashSet::new();
    let mut frames = Vec::with_capacity(count);
    while frames.len() < count {
        let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, rng.below(256) as u8));
        let (sport, dport) = (rng.u16_in(1024, u16::MAX), rng.u16_in(1, u16::MAX));
        if !seen.insert((src, sport, dport)) {
            continue;
        }
        let ip = Ip {
            src,
            dst,
            l4: L4::Tcp {
                src: sport,
                dst: dport,
                flags: frame::TCP_SYN,
            },
        };
        if allowed(model, pod, &ip) || eval::unfiltered(model, pod, &query(&ip)).is_some() {
            bail!("the flood's flow {ip:?} is allowed by the pod's groups");
        }
        frames.push(trunk_frame(pod, &ip));
    }
    Ok(frames)
}

/// `frames` re-tagged with a VLAN no pod of `model` has.
pub fn on_unknown_vlan(model: &Model, frames: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let vlan = (2..4095u16)
        .find(|v| model.pods.iter().all(|p| p.vlan != *v))
        .context("every VLAN has a pod")?;
    Ok(frames
        .iter()
        .map(|frame| {
            let mut frame = frame.clone();
            let tci = u16::from_be_bytes([frame[14], frame[15]]) & !0x0fff | vlan;
            frame[14..16].copy_from_slice(&tci.to_be_bytes());
            frame
        })
        .collect())
}

/// Frames for the spot check: about `count` the pod's groups allow (aimed at its rules, both
/// families, every kind of rule) and `count` they refuse, with the verdict expected of each.
pub fn spot_check_frames(rng: &mut Rng, model: &Model, count: usize) -> Vec<(Vec<u8>, bool)> {
    let pod = &model.pods[0];
    let rules: Vec<_> = pod
        .groups
        .iter()
        .filter_map(|id| model.groups.get(id))
        .flat_map(|g| g.ingress.iter())
        .collect();
    let mut keys = HashSet::new();
    let mut out: Vec<(Vec<u8>, bool)> = Vec::new();
    let (mut allowed_count, mut denied_count) = (0, 0);
    let mut attempts = 0;
    while (allowed_count < count || denied_count < count) && attempts < 100 * count {
        attempts += 1;
        let candidate = if allowed_count < count && rng.chance(50) {
            {
                let rule = *rng.pick(&rules);
                packet_for_rule(rng, model, rule)
            }
        } else {
            let v6 = rng.chance(30);
            // Near the rules' peers (mostly allowed: the groups are wide), or in the
            // documentation ranges no rule names (denied).
            let peer = match (rng.chance(50), v6) {
                (true, _) => random_addr(rng, v6),
                (false, false) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, rng.below(256) as u8)),
                (false, true) => IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    rng.below(65536) as u16,
                )),
            };
            let l4 = match rng.below(4) {
                0 => L4::Tcp {
                    src: rng.u16_in(1024, u16::MAX),
                    dst: rng.next_u64() as u16,
                    flags: frame::TCP_SYN,
                },
                1 => L4::Udp {
                    src: rng.u16_in(1024, u16::MAX),
                    dst: rng.next_u64() as u16,
                },
                2 => L4::Icmp {
                    icmp_type: *rng.pick(&[0u8, 3, 8, 11, 128, 129, 1]),
                    code: rng.below(4) as u8,
                    id: rng.next_u64() as u16,
                },
                _ => L4::Other {
                    protocol: *rng.pick(&[50u8, 47, 132, 4]),
                },
            };
            Some((peer, l4))
        };
        let Some((peer, l4)) = candidate else {
            continue;
        };
        let dst = match peer {
            IpAddr::V4(_) => pod.ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => pod.ipv6.map(IpAddr::V6),
        };
        let Some(dst) = dst else { continue };
        // Multicast, link-local and unspecified sources are not forwarded by any node.
        if !routable(peer) {
            continue;
        }
        let ip = Ip { src: peer, dst, l4 };
        let expected = allowed(model, pod, &ip);
        if (expected && allowed_count >= count) || (!expected && denied_count >= count) {
            continue;
        }
        let frame = trunk_frame(pod, &ip);
        let Some(key) = flow_key(&frame, 18) else {
            continue;
        };
        if !keys.insert(key) {
            continue;
        }
        if expected {
            allowed_count += 1;
        } else {
            denied_count += 1;
        }
        out.push((frame, expected));
    }
    out
}

fn routable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_multicast() || a.is_unspecified() || a.is_broadcast() || a.is_loopback())
                && a.octets()[0] != 0
        }
        IpAddr::V6(a) => {
            !(a.is_multicast() || a.is_unspecified() || a.is_loopback())
                && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}
