//! A throwaway node for agent tests: a namespace whose veth pair is the trunk, a state
//! directory, a pin path and `enforcer` processes, all removed on drop, even on failure.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::MapInfo;
use enforcer::agent::{Startup, StateSource};
use enforcer::kernel::xdp::XdpSetting;
use enforcer_common::{CtEntry, CtKey, PodEntry, Reason, counter_slot, map_names};
use enforcer_tests::frame::{self, Tag};

/// The agent's metrics endpoint inside the node's namespace.
pub const METRICS_PORT: u16 = 9464;

static NEXT: AtomicU32 = AtomicU32::new(0);
static BUILD: Once = Once::new();

/// The `enforcer` binary of this build, built on first use (cargo does not
/// build another package's binaries for this crate's tests).
pub fn enforcer_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable under target/<profile>/deps");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.args(["build", "--package", "enforcer", "--bin", "enforcer"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build for the enforcer binary");
        assert!(
            status.success(),
            "cargo build of the enforcer binary failed"
        );
    });
    profile_dir.join("enforcer")
}

/// One pod of the test state.
#[derive(Clone, Debug)]
pub struct TestPod {
    pub name: String,
    pub uid: String,
    pub vlan: u16,
    pub ip: [u8; 4],
    /// The `enforcer.sgp.dev/action` annotation, if any.
    pub action: Option<&'static str>,
}

impl TestPod {
    pub fn new(name: &str, uid: &str, vlan: u16, ip: [u8; 4]) -> Self {
        Self {
            name: name.to_string(),
            uid: uid.to_string(),
            vlan,
            ip,
            action: None,
        }
    }

    pub fn key(&self) -> String {
        format!("default/{}", self.name)
    }
}

/// What the state directory says: pods in group `sg-app`, which allows TCP
/// `open_port` in from the VPC and everything out.
#[derive(Clone, Debug)]
pub struct TestState {
    pub mode: &'static str,
    pub open_port: u16,
    pub pods: Vec<TestPod>,
}

/// A peer in the VPC, outside this node.
pub const PEER: [u8; 4] = [10, 0, 2, 7];

/// A network namespace with the trunk veth pair, a state directory and a pin path.
pub struct Node {
    pub netns: String,
    /// The trunk the agent enforces (its TC hooks); `peer` is the other end.
    pub trunk: String,
    pub peer: String,
    pub state_dir: PathBuf,
    pub pin_path: PathBuf,
    agents: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Node {
    /// A fresh node; fails the test without root.
    pub fn new() -> Self {
        Self::with_trunk(None)
    }

    /// A fresh node whose trunk is named `trunk` (its own namespace holds the name),
    /// or a unique name.
    pub fn with_trunk(trunk: Option<&str>) -> Self {
        enforcer_tests::require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        let node = Self {
            netns: format!("enforcer-test-{pid}-{n}"),
            trunk: trunk.map_or_else(|| format!("et{tag}a"), str::to_string),
            peer: format!("et{tag}b"),
            state_dir: std::env::temp_dir().join(format!("enforcer-test-{pid}-{n}")),
            pin_path: PathBuf::from(format!("/sys/fs/bpf/enforcer-test-{pid}-{n}")),
            agents: Vec::new(),
        };
        ip(&["netns", "add", &node.netns]);
        // No IPv6 neighbour discovery or MLD chatter on the trunk: tests count every frame.
        for conf in ["all", "default"] {
            let knob = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
            ip(&["netns", "exec", &node.netns, "sysctl", "-qw", &knob]);
        }
        ip(&["-n", &node.netns, "link", "set", "lo", "up"]);
        node.add_trunk();
        std::fs::create_dir_all(&node.state_dir).expect("state dir");
        node
    }

    /// Creates the trunk veth pair, both ends up (again, after a test deleted it).
    pub fn add_trunk(&self) {
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            &self.trunk,
            "type",
            "veth",
            "peer",
            "name",
            &self.peer,
        ]);
        for link in [&self.trunk, &self.peer] {
            ip(&["-n", &self.netns, "link", "set", link, "up"]);
        }
    }

    /// Writes the state files (JSON) for `state`, each atomically.
    pub fn write_state(&self, state: &TestState) {
        self.write_state_in(&self.state_dir, state);
    }

    /// Writes the state files for `state` into `dir`.
    pub fn write_state_in(&self, dir: &Path, state: &TestState) {
        for (file, text) in self.state_files(state) {
            write_atomically(&dir.join(file), &text);
        }
    }

    /// The state files of `state`, by file name.
    pub fn state_files(&self, state: &TestState) -> [(&'static str, String); 3] {
        [
            ("node-config.json", node_config(self, state)),
            ("security-groups.json", security_groups(state).to_string()),
            ("pods.json", pods(state)),
        ]
    }

    /// Starts `enforcer run` in the node's namespace.
    pub fn start_agent(&mut self) -> u32 {
        self.start_agent_with(&[])
    }

    /// Starts `enforcer run ARGS` in the node's namespace.
    pub fn start_agent_with(&mut self, args: &[&str]) -> u32 {
        let metrics = format!("127.0.0.1:{METRICS_PORT}");
        let mut run = vec![
            "run",
            "--state",
            self.state_dir.to_str().expect("utf-8 path"),
            "--pin-path",
            self.pin_path.to_str().expect("utf-8 path"),
            "--metrics-addr",
            &metrics,
        ];
        run.extend_from_slice(args);
        let child = self.enforcer_in_netns(&run);
        let pid = child.id();
        self.agents.push(child);
        pid
    }

    /// Starts `enforcer ARGS` in the node's namespace, stdout piped.
    pub fn enforcer_in_netns(&self, args: &[&str]) -> Child {
        self.command_in_netns(args).spawn().expect("spawn enforcer")
    }

    /// Runs `enforcer ARGS` to completion in the node's namespace, as an
    /// operator on the node would; its stdout.
    pub fn enforcer(&self, args: &[&str]) -> String {
        let out = self
            .command_in_netns(args)
            .stderr(Stdio::piped())
            .output()
            .expect("run enforcer");
        assert!(
            out.status.success(),
            "enforcer {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `enforcer ARGS` to run in the node's namespace, stdout piped.
    pub fn command_in_netns(&self, args: &[&str]) -> Command {
        let netns = File::open(format!("/run/netns/{}", self.netns)).expect("open the netns");
        let mut command = Command::new(enforcer_binary());
        // Warnings and errors only: the agents' info lines would drown the test output.
        command
            .args(args)
            .stdout(Stdio::piped())
            .env("RUST_LOG", "warn");
        // SAFETY: setns is async-signal-safe; the descriptor outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    }

    /// `kill -9` of the agent started `index`-th.
    pub fn kill_agent(&mut self, index: usize) {
        let child = &mut self.agents[index];
        child.kill().expect("SIGKILL the agent");
        child.wait().expect("reap the agent");
    }

    /// SIGTERM to the agent started `index`-th; waits for it to exit successfully.
    pub fn stop_agent(&mut self, index: usize) {
        let child = &mut self.agents[index];
        // SAFETY: plain signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = child.wait().expect("reap the agent");
        assert!(status.success(), "the agent exited with {status}");
    }

    /// Waits until the agent answers `/readyz` with 200.
    pub fn wait_ready(&self) {
        wait_for("the agent to be ready", Duration::from_secs(20), || {
            self.http_get("/readyz")
                .is_some_and(|(code, _)| code == 200)
        });
    }

    /// `GET path` on the agent's endpoint inside the namespace: status code and body.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.http_get_at(("127.0.0.1", METRICS_PORT), path)
    }

    /// `GET path` on `address` inside the namespace: status code and body.
    pub fn http_get_at(&self, address: (&str, u16), path: &str) -> Option<(u16, String)> {
        let path = path.to_string();
        let (host, port) = (address.0.to_string(), address.1);
        self.in_netns(move || {
            let mut stream = TcpStream::connect((host.as_str(), port)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let code = response.split(' ').nth(1)?.parse().ok()?;
            let body = response.split_once("\r\n\r\n")?.1.to_string();
            Some((code, body))
        })
    }

    /// Runs `f` on a thread inside the node's network namespace.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_netns(f)
            .join()
            .expect("the thread in the namespace")
    }

    /// Starts `f` on a thread inside the node's network namespace.
    pub fn spawn_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let netns = File::open(format!("/run/netns/{}", self.netns)).expect("open the netns");
        std::thread::spawn(move || {
            // SAFETY: moves only this thread into the namespace.
            let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Sends `frames` from the peer end, so they arrive on the trunk (ingress).
    pub fn send_to_trunk(&self, frames: Vec<Vec<u8>>) {
        let interface = self.peer.clone();
        self.in_netns(move || {
            let socket = PacketSocket::open(&interface);
            for frame in &frames {
                socket.send(frame);
            }
        });
    }

    /// Packets counted per [`counter_slot`] by the pinned programs, summed over CPUs,
    /// from the pinned `COUNTERS` alone (other pins may be of another layout while an
    /// upgrade is under way).
    pub fn counters(&self) -> [u64; enforcer_common::COUNTER_SLOTS as usize] {
        enforcer_tests::testbed::agent::counters(&self.pin_path).expect("read the counters")
    }

    /// Starts an agent while a frame the policy denies (`denied`) arrives on the
    /// trunk every 200 µs, and checks that every one of them was judged and
    /// dropped: a moment without a program would let some pass uncounted.
    pub fn start_agent_under_denied_traffic(&mut self, denied: Vec<u8>) {
        self.start_under_denied_traffic(denied, |node| {
            node.start_agent();
            node.wait_ready();
        });
    }

    /// Runs `start` (which returns once its agent is ready) while a frame the policy
    /// denies (`denied`) arrives on the trunk every 200 µs, and checks that every one
    /// of them was judged and dropped.
    pub fn start_under_denied_traffic(&mut self, denied: Vec<u8>, start: impl FnOnce(&mut Self)) {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let before = self.counters();
        let sender = {
            let (sent, stop) = (sent.clone(), stop.clone());
            let peer = self.peer.clone();
            self.spawn_in_netns(move || {
                let socket = PacketSocket::open(&peer);
                while !stop.load(Ordering::SeqCst) {
                    socket.send(&denied);
                    sent.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        start(self);
        stop.store(true, Ordering::SeqCst);
        sender.join().expect("the sender");
        let sent = sent.load(Ordering::SeqCst);
        assert!(
            sent > 100,
            "only {sent} frames sent while the agent started"
        );
        wait_for("every frame judged", Duration::from_secs(5), || {
            let after = self.counters();
            after[Reason::DropPolicy as usize] - before[Reason::DropPolicy as usize] == sent
        });
        let after = self.counters();
        let others: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .map(|&r| (r, after[r as usize] - before[r as usize]))
            .filter(|&(r, n)| r != Reason::DropPolicy && n > 0)
            .collect();
        assert!(
            others.is_empty(),
            "frames judged otherwise while the agent started: {others:?}"
        );
    }

    /// Sends `frames` to the trunk and waits until the counters moved by exactly
    /// `expected` (reason, count) and nothing else (no would-drop either).
    pub fn expect_verdicts(&self, frames: Vec<Vec<u8>>, expected: &[(Reason, u64)]) {
        let expected: Vec<_> = expected.iter().map(|&(r, n)| ((r, false), n)).collect();
        self.expect_counted(frames, &expected);
    }

    /// Sends `frames` to the trunk and waits until the counters moved by exactly
    /// `expected` ((reason, would drop), count) and nothing else.
    pub fn expect_counted(&self, frames: Vec<Vec<u8>>, expected: &[((Reason, bool), u64)]) {
        let before = self.counters();
        self.send_to_trunk(frames);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after = self.counters();
            let moved: Vec<((Reason, bool), u64)> = [false, true]
                .into_iter()
                .flat_map(|would_drop| Reason::ALL.iter().map(move |&r| (r, would_drop)))
                .map(|(r, would_drop)| {
                    let slot = counter_slot(r, would_drop) as usize;
                    ((r, would_drop), after[slot] - before[slot])
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            let mut wanted = expected.to_vec();
            wanted.sort_by_key(|((r, would_drop), _)| counter_slot(*r, *would_drop));
            if moved == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected verdicts {wanted:?}, the kernel counted {moved:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TCX programs attached to the trunk: (ingress, egress) program IDs.
    pub fn attached(&self) -> (Vec<u32>, Vec<u32>) {
        let trunk = self.trunk.clone();
        self.in_netns(move || {
            use aya::programs::TcAttachType;
            let ids = |t| enforcer::kernel::ebpf::attached_programs(&trunk, t).expect("query TCX");
            (ids(TcAttachType::Ingress), ids(TcAttachType::Egress))
        })
    }
}

/// An agent the test runs itself, through the library rather than the binary, on a
/// thread inside the node's namespace: how a test reaches the start-up stages
/// ([`Startup`]) the command line never exposes. Its endpoint listens on
/// [`METRICS_PORT`] like a started `enforcer run`'s.
pub struct InProcessAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Node {
    /// Starts an agent on `source` in this process, calling `at` at each stage of its start-up.
    pub fn start_in_process(
        &self,
        source: StateSource,
        xdp: XdpSetting,
        mut at: impl FnMut(Startup) + Send + 'static,
    ) -> InProcessAgent {
        let pin_path = self.pin_path.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = self.spawn_in_netns(move || {
            let listener = std::net::TcpListener::bind(("127.0.0.1", METRICS_PORT))
                .map_err(|e| format!("binding the metrics endpoint: {e}"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("a non-blocking endpoint: {e}"))?;
            // Built on this thread, so its workers are in the node's namespace too;
            // two of them, as `enforcer run` has.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("a runtime: {e}"))?;
            let agent = enforcer::agent::Agent::start_observed(source, &pin_path, xdp, &mut at)
                .map_err(|e| enforcer::error_chain(&e))?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| format!("serving the endpoint: {e}"))?;
                let stop = async move {
                    let _ = stopped.await;
                };
                enforcer::agent::run(agent, Some(listener), stop)
                    .await
                    .map_err(|e| enforcer::error_chain(&e))
            })
        });
        InProcessAgent {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl InProcessAgent {
    /// Stops the agent; it must have run without error.
    pub fn stop(mut self) {
        self.stop.take().map(|stop| stop.send(()));
        let thread = self.thread.take().expect("the agent's thread");
        let result = thread.join().expect("the agent's thread does not panic");
        assert_eq!(result, Ok(()), "the in-process agent failed");
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        // A test that failed still stops its agent before the node goes.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = enforcer::kernel::ebpf::uninstall(&self.pin_path);
        let _ = std::fs::remove_file(enforcer::observe::status::report_path(&self.pin_path));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The kernel's description of the map pinned as `name`.
pub fn pinned_map(node: &Node, name: &str) -> MapInfo {
    MapInfo::from_pin(enforcer::kernel::bpffs::map_pin(&node.pin_path, name))
        .expect("pinned map info")
}

/// The maps the program attached at the trunk's ingress uses, by ID.
pub fn maps_of_attached_program(node: &Node) -> BTreeSet<u32> {
    let program = node.attached().0[0];
    aya::programs::loaded_programs()
        .map(|info| info.expect("program info"))
        .find(|info| info.id() == program)
        .expect("the attached program is loaded")
        .map_ids()
        .expect("map IDs")
        .expect("the kernel reports map IDs")
        .into_iter()
        .collect()
}

/// Replaces the pinned `PODS` with the map a build whose `PodEntry` was 8 bytes
/// smaller would have pinned (the attached programs keep the map they hold).
pub fn pin_pods_map_of_an_older_layout(node: &Node) -> u32 {
    let pin = enforcer::kernel::bpffs::map_pin(&node.pin_path, map_names::PODS);
    let current = pinned_map(node, map_names::PODS);
    std::fs::remove_file(&pin).expect("unpin PODS");
    let older_value = (size_of::<PodEntry>() - 8).to_string();
    let entries = current.max_entries().to_string();
    let flags = current.map_flags().to_string();
    create_pinned_map(
        &pin,
        &[
            "type",
            "hash",
            "key",
            "2",
            "value",
            &older_value,
            "entries",
            &entries,
            "name",
            map_names::PODS,
            "flags",
            &flags,
        ],
    );
    let older = pinned_map(node, map_names::PODS);
    assert_ne!(older.value_size(), current.value_size());
    older.id()
}

/// Creates a map pinned at `pin` with `bpftool map create` and its `definition`
/// (type, key, value, entries, name, flags), as another build would have.
/// What `enforcer check --state dir` prints; the check must pass.
pub fn check_stdout(dir: &std::path::Path) -> String {
    let out = Command::new(enforcer_binary())
        .args(["check", "--state"])
        .arg(dir)
        .output()
        .expect("run enforcer check");
    assert!(
        out.status.success(),
        "enforcer check --state {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Replaces the pinned `CONNTRACK` with the table a build that preallocated half
/// as many entries would have pinned, holding `flows` (the attached programs
/// keep the map they hold).
pub fn pin_conntrack_of_an_older_layout(node: &Node, flows: &[(CtKey, CtEntry)]) -> u32 {
    let pin = enforcer::kernel::bpffs::map_pin(&node.pin_path, map_names::CONNTRACK);
    let current = pinned_map(node, map_names::CONNTRACK);
    std::fs::remove_file(&pin).expect("unpin CONNTRACK");
    let (key, value) = (
        size_of::<CtKey>().to_string(),
        size_of::<CtEntry>().to_string(),
    );
    let entries = (current.max_entries() / 2).to_string();
    create_pinned_map(
        &pin,
        &[
            "type",
            "hash",
            "key",
            &key,
            "value",
            &value,
            "entries",
            &entries,
            "name",
            map_names::CONNTRACK,
            "flags",
            "0",
        ],
    );
    let data = aya::maps::MapData::from_pin(&pin).expect("open the older CONNTRACK");
    let mut older: aya::maps::HashMap<_, CtKey, CtEntry> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    for (key, entry) in flows {
        older.insert(key, entry, 0).expect("write a flow");
    }
    let older = pinned_map(node, map_names::CONNTRACK);
    assert_ne!(older.map_flags(), current.map_flags());
    older.id()
}

pub fn create_pinned_map(pin: &std::path::Path, definition: &[&str]) {
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin)
        .args(definition)
        .output()
        .expect("run bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A packet socket bound to one interface of the calling thread's namespace.
pub struct PacketSocket {
    fd: libc::c_int,
    interface: String,
}

impl PacketSocket {
    pub fn open(interface: &str) -> Self {
        // SAFETY: plain socket calls; the descriptor is closed on drop.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(interface).expect("interface name");
            let mut address: libc::sockaddr_ll = std::mem::zeroed();
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(address.sll_ifindex > 0, "no interface {interface}");
            let bound = libc::bind(
                fd,
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
            Self {
                fd,
                interface: interface.to_string(),
            }
        }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length.
        let sent = unsafe { libc::send(self.fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            sent,
            frame.len() as isize,
            "send on {}: {}",
            self.interface,
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Polls `done` until it holds, failing the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads lines from a child's stdout on a thread, so a test can wait with a deadline.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

pub fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp~");
    std::fs::write(&temporary, text).expect("write state file");
    std::fs::rename(&temporary, path).expect("rename state file");
}

/// A TCP SYN from [`PEER`] to `pod` port `port`, tagged with the pod's VLAN.
pub fn syn_to(pod: &TestPod, port: u16, source_port: u16) -> Vec<u8> {
    tcp_to(pod, port, source_port, frame::TCP_SYN)
}

/// The peer's ACK of an established connection to `pod` port `port`.
pub fn ack_to(pod: &TestPod, port: u16, source_port: u16) -> Vec<u8> {
    tcp_to(pod, port, source_port, frame::TCP_ACK)
}

fn tcp_to(pod: &TestPod, port: u16, source_port: u16, flags: u8) -> Vec<u8> {
    let ip = frame::tcp(PEER, source_port, pod.ip, port, flags);
    frame::ip_frame(Tag::Vlan(pod.vlan), &ip)
}

fn dotted(ip: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

fn node_config(node: &Node, state: &TestState) -> String {
    let mut config = serde_json::json!({
        "apiVersion": "enforcer.sgp.dev/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "node-1"},
        "spec": {
            "enforcingMode": state.mode,
            "trunkInterface": node.trunk,
            "primaryInterface": "eth0",
            "primaryIPs": ["10.0.1.10"],
            "primarySecurityGroups": ["sg-node"],
            "vpcCidrs": ["10.0.0.0/16"],
        }
    });
    // A pod's own audit annotation needs the node's leave: a state that asks for
    // one gives it to the pods' namespace.
    if state.pods.iter().any(|p| p.action == Some("audit")) {
        config["spec"]["auditNamespaces"] = serde_json::json!(["default"]);
    }
    config.to_string()
}

/// `describe-security-groups` output: `sg-app` (the pods' group) and `sg-node`.
pub fn security_groups(state: &TestState) -> serde_json::Value {
    let group = |id: &str, ingress: serde_json::Value| {
        serde_json::json!({
            "GroupId": id,
            "GroupName": id,
            "Description": "test",
            "IpPermissions": [ingress],
            "IpPermissionsEgress": [{
                "IpProtocol": "-1",
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": [],
            }],
            "OwnerId": "111122223333",
            "VpcId": "vpc-0test",
        })
    };
    serde_json::json!({"SecurityGroups": [
        group("sg-app", serde_json::json!({
            "IpProtocol": "tcp", "FromPort": state.open_port, "ToPort": state.open_port,
            "IpRanges": [{"CidrIp": "10.0.0.0/16"}],
            "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": [],
        })),
        group("sg-node", serde_json::json!({
            "IpProtocol": "-1",
            "IpRanges": [{"CidrIp": "10.0.0.0/16"}],
            "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": [],
        })),
    ]})
}

fn pods(state: &TestState) -> String {
    let mut items: Vec<serde_json::Value> = state
        .pods
        .iter()
        .map(|pod| {
            let eni = serde_json::json!([{
                "eniId": format!("eni-{:017x}", pod.vlan),
                "ifAddress": "0a:00:00:00:00:01",
                "privateIp": dotted(pod.ip),
                "vlanId": pod.vlan,
                "subnetCidr": "10.0.1.0/24",
            }]);
            let mut annotations = serde_json::json!({"vpc.amazonaws.com/pod-eni": eni.to_string()});
            if let Some(action) = pod.action {
                annotations[enforcer::source::state::ACTION_ANNOTATION] = action.into();
            }
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod.name,
                    "namespace": "default",
                    "uid": pod.uid,
                    "labels": {"app": "test"},
                    "annotations": annotations,
                },
                "spec": {"nodeName": "node-1", "serviceAccountName": "default"},
                "status": {"podIP": dotted(pod.ip)},
            })
        })
        .collect();
    items.push(serde_json::json!({
        "apiVersion": "vpcresources.k8s.aws/v1beta1",
        "kind": "SecurityGroupPolicy",
        "metadata": {"name": "test", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "test"}},
            "securityGroups": {"groupIds": ["sg-app"]},
        },
    }));
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}
