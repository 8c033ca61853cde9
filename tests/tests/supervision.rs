//! The agent against faults around it: a trunk deleted, recreated or missing at
//! start, links removed by `uninstall`, other programs on the trunk, a taken
//! metrics port, a state that needs reading again, and local users of its endpoint.

#[path = "agent_support/mod.rs"]
mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use enforcer::kernel::ebpf::LinkState;
use enforcer::kernel::ebpf::TC_INGRESS;
use enforcer::kernel::maps::KernelMaps;
use enforcer::kernel::xdp::{XDP_INGRESS, XdpMode, XdpState};
use enforcer_common::{EnforcingMode, Reason};
use support::{METRICS_PORT, Node, TestPod, TestState, syn_to, wait_for};

const OPEN: u16 = 80;
const CLOSED: u16 = 81;

/// The agent notices a lost attachment within this (it checks every second).
const NOTICE: Duration = Duration::from_secs(2);

fn web() -> TestPod {
    TestPod::new("web", "uid-web-1", 10, [10, 0, 1, 50])
}

fn state(mode: &'static str, pods: Vec<TestPod>) -> TestState {
    TestState {
        mode,
        open_port: OPEN,
        pods,
    }
}

fn started() -> Node {
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    node.start_agent();
    node.wait_ready();
    node
}

/// Where both of the enforcer's links stand on the trunk, read from the kernel.
fn link_states(node: &Node) -> [LinkState; 2] {
    let pin_path = node.pin_path.clone();
    let trunk = node.trunk.clone();
    node.in_netns(move || {
        enforcer::kernel::ebpf::link_states(&pin_path, &trunk).expect("link states")
    })
}

fn first_on_the_trunk(node: &Node) -> bool {
    link_states(node) == [LinkState::First, LinkState::First]
}

/// Where the enforcer's XDP link stands on the trunk, read from the kernel.
fn xdp_state(node: &Node) -> XdpState {
    let pin_path = node.pin_path.clone();
    let trunk = node.trunk.clone();
    node.in_netns(move || enforcer::kernel::xdp::xdp_state(&pin_path, &trunk).expect("XDP state"))
}

fn status_json(node: &Node) -> serde_json::Value {
    let status = node.enforcer(&[
        "status",
        "--pin-path",
        node.pin_path.to_str().unwrap(),
        "--json",
    ]);
    serde_json::from_str(&status).expect("status JSON")
}

fn readyz(node: &Node) -> Option<u16> {
    node.http_get("/readyz").map(|(code, _)| code)
}

/// A denied SYN to web is dropped by the policy (the trunk is enforced).
fn expect_enforced(node: &Node, source_port: u16) {
    node.expect_verdicts(
        vec![syn_to(&web(), CLOSED, source_port)],
        &[(Reason::DropPolicy, 1)],
    );
}

fn ip_in(node: &Node, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .arg("-n")
        .arg(&node.netns)
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_deleted_and_recreated_trunk_is_enforced_again_within_two_seconds() {
    let node = started();
    assert!(first_on_the_trunk(&node));
    ip_in(&node, &["link", "del", &node.trunk]);
    wait_for("/readyz to say not ready", NOTICE, || {
        readyz(&node) == Some(503)
    });
    node.add_trunk();
    let recreated = Instant::now();
    wait_for("the programs on the new trunk", NOTICE, || {
        first_on_the_trunk(&node) && xdp_state(&node) == XdpState::Attached(XdpMode::Native)
    });
    eprintln!(
        "enforced again {:?} after the trunk came back",
        recreated.elapsed()
    );
    wait_for("/readyz to say ready", NOTICE, || {
        readyz(&node) == Some(200)
    });
    expect_enforced(&node, 40000);
    let status = status_json(&node);
    assert_eq!(status["attached"], true, "{status:#}");
    assert_eq!(status["links"], serde_json::json!(["first", "first"]));
    assert_eq!(status["xdp"], "native", "{status:#}");
}

#[test]
fn xdp_judges_each_frame_once_in_the_mode_asked_and_off_leaves_it_to_tc() {
    // `auto` on a veth trunk: native.
    let mut node = started();
    assert_eq!(xdp_state(&node), XdpState::Attached(XdpMode::Native));
    assert_eq!(status_json(&node)["xdp"], "native");
    let (open, closed) = (
        || syn_to(&web(), OPEN, 42000),
        || syn_to(&web(), CLOSED, 42001),
    );
    // One reason per frame: TC does not count again what XDP judged and passed;
    // and the denied frame never reached TC (XDP dropped it). Run counts are
    // kept while this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run statistics");
    let runs = |name: &str| {
        let pin = enforcer::kernel::bpffs::program_pin(&node.pin_path, name);
        aya::programs::ProgramInfo::from_pin(&pin)
            .unwrap_or_else(|e| panic!("{}: {e}", pin.display()))
            .run_count()
    };
    let before = (runs(XDP_INGRESS), runs(TC_INGRESS));
    node.expect_verdicts(
        vec![open(), closed()],
        &[(Reason::PassNew, 1), (Reason::DropPolicy, 1)],
    );
    let (xdp_runs, tc_runs) = (runs(XDP_INGRESS) - before.0, runs(TC_INGRESS) - before.1);
    assert!(xdp_runs >= 2, "XDP ran {xdp_runs} times for 2 frames");
    assert_eq!(
        tc_runs,
        xdp_runs - 1,
        "TC ingress should see every frame XDP saw but the one it dropped"
    );
    let metrics = node.http_get("/metrics").expect("metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"enforcer_xdp_attached{mode="native"} 1"#),
        "{metrics}"
    );

    // A restart asking for generic moves the program to generic XDP.
    node.stop_agent(0);
    node.start_agent_with(&["--xdp", "generic"]);
    node.wait_ready();
    assert_eq!(xdp_state(&node), XdpState::Attached(XdpMode::Generic));
    assert_eq!(status_json(&node)["xdp"], "generic");
    node.expect_verdicts(vec![closed()], &[(Reason::DropPolicy, 1)]);

    // Off: no XDP program, TC judges everything.
    node.stop_agent(1);
    node.start_agent_with(&["--xdp", "off"]);
    node.wait_ready();
    assert_eq!(xdp_state(&node), XdpState::Missing);
    assert!(
        !trunk_has_xdp(&node),
        "--xdp off left an XDP program on the trunk"
    );
    assert_eq!(status_json(&node)["xdp"], "off");
    node.expect_verdicts(
        vec![open(), closed()],
        &[(Reason::PassEstablished, 1), (Reason::DropPolicy, 1)],
    );

    // Uninstall removes what the agent pinned, XDP included.
    node.stop_agent(2);
    node.start_agent();
    node.wait_ready();
    node.stop_agent(3);
    assert!(trunk_has_xdp(&node));
    node.enforcer(&["uninstall", "--pin-path", node.pin_path.to_str().unwrap()]);
    assert_eq!(xdp_state(&node), XdpState::Missing);
    assert!(
        !trunk_has_xdp(&node),
        "uninstall left an XDP program on the trunk"
    );
}

/// Whether the kernel runs any XDP program on the trunk (`ip link` says `xdp`).
fn trunk_has_xdp(node: &Node) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", &node.netns, "-d", "link", "show", "dev", &node.trunk])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains(" xdp")
}

#[test]
fn an_uninstall_under_a_running_agent_is_undone_within_two_seconds() {
    let node = started();
    let pin_path = node.pin_path.to_str().expect("utf-8 pin path").to_string();
    node.enforcer(&["uninstall", "--pin-path", &pin_path]);
    wait_for("the links pinned and first again", NOTICE, || {
        first_on_the_trunk(&node)
    });
    // The maps are pinned again too: `status` and the next agent find them.
    wait_for("the maps pinned again", NOTICE, || {
        KernelMaps::open_pinned(&node.pin_path).is_ok()
    });
    expect_enforced(&node, 40001);
    wait_for("/readyz to say ready", NOTICE, || {
        readyz(&node) == Some(200)
    });
}

#[test]
fn a_trunk_missing_at_start_is_waited_for_and_then_enforced() {
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    ip_in(&node, &["link", "del", &node.trunk]);
    node.start_agent();
    // Serving, applied, but not ready: nothing is attached.
    wait_for("the endpoint", Duration::from_secs(10), || {
        readyz(&node).is_some()
    });
    let (code, body) = node.http_get("/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not attached"), "{body}");
    assert!(
        KernelMaps::open_pinned(&node.pin_path)
            .expect("maps pinned")
            .pods()
            .expect("PODS")
            .contains_key(&web().vlan),
        "the state is applied while the trunk is awaited"
    );
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();
    let status = node.enforcer(&["status", "--pin-path", &pin_path, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["attached"], false, "{status:#}");
    assert!(
        status["attach_error"]
            .as_str()
            .is_some_and(|e| e.contains("No such device")),
        "{status:#}"
    );
    std::thread::sleep(Duration::from_secs(3));
    node.add_trunk();
    // Attach retries back off to at most 2 s and are checked every second: 3 s,
    // with room for a loaded machine.
    wait_for("the programs on the trunk", Duration::from_secs(6), || {
        first_on_the_trunk(&node)
    });
    wait_for("/readyz to say ready", NOTICE, || {
        readyz(&node) == Some(200)
    });
    expect_enforced(&node, 40002);
}

/// The test bed's program that passes every frame and ends the chain.
fn pass_program() -> Ebpf {
    let path = enforcer_tests::staged::object("testbed-ebpf");
    let mut ebpf = Ebpf::load_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let program: &mut SchedClassifier = ebpf
        .program_mut("trunk_pass")
        .expect("trunk_pass in the test bed's object")
        .try_into()
        .expect("a classifier");
    program.load().expect("trunk_pass verifies");
    ebpf
}

/// Attaches a fresh pass program to the trunk's ingress at `order`; it stays
/// attached as long as the returned object lives.
fn attach_pass(node: &Node, order: LinkOrder) -> Ebpf {
    let mut ebpf = pass_program();
    let trunk = node.trunk.clone();
    node.in_netns(move || {
        let program: &mut SchedClassifier = ebpf
            .program_mut("trunk_pass")
            .expect("trunk_pass")
            .try_into()
            .expect("a classifier");
        program
            .attach_with_options(
                &trunk,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(order),
            )
            .expect("attach trunk_pass");
        ebpf
    })
}

#[test]
fn programs_that_pass_every_frame_never_let_a_denied_one_through() {
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    // One attached first before the agent starts ...
    let _before = attach_pass(&node, LinkOrder::first());
    node.start_agent();
    node.wait_ready();
    assert!(first_on_the_trunk(&node), "{:?}", link_states(&node));
    expect_enforced(&node, 41000);
    // ... one attached after it, at the end of the chain ...
    let _after = attach_pass(&node, LinkOrder::last());
    expect_enforced(&node, 41001);
    assert_eq!(node.attached().0.len(), 3);
    // ... and one that pushes itself ahead of the enforcer: the agent goes first again.
    let _ahead = attach_pass(&node, LinkOrder::first());
    assert_eq!(link_states(&node)[0], LinkState::Behind { ahead: 1 });
    wait_for("the enforcer first again", NOTICE, || {
        first_on_the_trunk(&node)
    });
    expect_enforced(&node, 41002);
    assert_eq!(
        node.attached().0.len(),
        4,
        "one enforcer link, three others"
    );
}

#[test]
fn a_taken_metrics_port_stops_the_start_before_anything_is_attached() {
    let node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    let _taken = node.in_netns(|| {
        std::net::TcpListener::bind(("127.0.0.1", METRICS_PORT)).expect("take the port")
    });
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();
    let state_dir = node.state_dir.to_str().expect("utf-8").to_string();
    let mut agent = node
        .command_in_netns(&[
            "run",
            "--state",
            &state_dir,
            "--pin-path",
            &pin_path,
            "--metrics-addr",
            &format!("127.0.0.1:{METRICS_PORT}"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start enforcer run");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!("`enforcer run` kept running with its metrics port taken");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    agent
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "binding the metrics endpoint 127.0.0.1:{METRICS_PORT}"
        )),
        "{stderr}"
    );
    assert_eq!(node.attached(), (vec![], vec![]), "nothing attached");
    assert!(!node.pin_path.exists(), "nothing pinned");
}

#[test]
fn a_rejected_state_is_read_again_without_a_change_in_its_directory() {
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    // pods.json points outside the directory, at a file that is not there yet (a
    // volume mounted late): no event in the directory will say when it appears.
    let outside = node.state_dir.with_extension("late");
    std::fs::create_dir_all(&outside).expect("outside dir");
    let pods = node.state_dir.join("pods.json");
    let target = outside.join("pods.json");
    std::fs::rename(&pods, outside.join("pods.json.later")).expect("move pods.json away");
    std::os::unix::fs::symlink(&target, &pods).expect("dangling symlink");
    node.start_agent();
    wait_for("the endpoint", Duration::from_secs(10), || {
        readyz(&node).is_some()
    });
    assert_eq!(readyz(&node), Some(503));
    std::fs::rename(outside.join("pods.json.later"), &target).expect("the file appears");
    // Retries back off from 1 s: 1 + 2 + 4 s at most before this one.
    wait_for(
        "the state applied on a retry",
        Duration::from_secs(10),
        || readyz(&node) == Some(200),
    );
    expect_enforced(&node, 42000);
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn the_endpoint_bounds_its_connections_and_drops_idle_ones() {
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    let agent = node.start_agent();
    node.wait_ready();
    let sockets = move || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .expect("the agent's descriptors")
            .filter(|fd| {
                fd.as_ref()
                    .ok()
                    .and_then(|fd| std::fs::read_link(fd.path()).ok())
                    .is_some_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    };
    let before = sockets();
    // Local users opening connections and sending nothing.
    let idle: Vec<TcpStream> = node.in_netns(|| {
        (0..100)
            .map(|_| TcpStream::connect(("127.0.0.1", METRICS_PORT)).expect("connect"))
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let during = sockets();
    assert!(
        during <= before + enforcer::observe::http::MAX_CONNECTIONS,
        "{during} sockets with 100 idle clients, {before} before"
    );
    // The server gives each one its header timeout, then closes it.
    let mut first = idle.into_iter().next().expect("a connection");
    first
        .set_read_timeout(Some(enforcer::observe::http::HEADER_TIMEOUT * 2))
        .expect("timeout");
    let mut buffer = [0u8; 64];
    let started = Instant::now();
    let read = first.read(&mut buffer);
    assert!(
        matches!(read, Ok(0))
            || read.is_err() && started.elapsed() < enforcer::observe::http::HEADER_TIMEOUT * 2,
        "an idle connection was not closed: {read:?} after {:?}",
        started.elapsed()
    );
    drop(first);
    // Once the idle clients are gone, the endpoint answers again.
    wait_for("a scrape", Duration::from_secs(15), || {
        node.http_get("/metrics")
            .is_some_and(|(code, _)| code == 200)
    });
}

#[test]
fn readyz_reveals_nothing_of_a_rejected_file_and_the_report_is_root_only() {
    let node = started();
    let report = enforcer::observe::status::report_path(&node.pin_path);
    let mode = std::fs::metadata(&report)
        .expect("the report")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "report mode {mode:o}");
    std::fs::write(
        node.state_dir.join("secret.yaml"),
        "apiVersion: v1\nkind: Secret\ndata: {token: hunter2-s3cr3t\n",
    )
    .expect("write a broken file");
    wait_for("/readyz to say not ready", Duration::from_secs(3), || {
        readyz(&node) == Some(503)
    });
    let (_, body) = node.http_get("/readyz").expect("readyz");
    assert!(body.contains("rejected"), "{body}");
    assert!(
        !body.contains("s3cr3t") && !body.contains("secret.yaml"),
        "{body}"
    );
    let report_text = std::fs::read_to_string(&report).expect("read the report");
    assert!(
        report_text.contains("secret.yaml"),
        "root still sees why: {report_text}"
    );
}

/// The worst time, over three reloads that each add a pod, from the state
/// written to the pod in the kernel.
fn worst_reload(node: &Node, first_vlan: u16) -> Duration {
    let mut worst = Duration::ZERO;
    for round in 0..3u16 {
        let vlan = first_vlan + round;
        let name = format!("extra{vlan}");
        let extra = TestPod::new(
            &name,
            &format!("uid-{name}"),
            vlan,
            [10, 0, 1, 60 + vlan as u8],
        );
        node.write_state(&state("strict", vec![web(), extra]));
        let written = Instant::now();
        wait_for("the new pod in the kernel", Duration::from_secs(10), || {
            KernelMaps::open_pinned(&node.pin_path)
                .expect("maps")
                .pods()
                .expect("PODS")
                .contains_key(&vlan)
        });
        worst = worst.max(written.elapsed());
    }
    worst
}

/// Scrapes run beside the agent's work, never in its way: reloads while four
/// clients scrape in a tight loop (each scrape walking 100,000 tracked flows)
/// take no longer than reloads without them, measured in the same run (a
/// machine's load slows both alike).
#[test]
fn scraping_in_a_tight_loop_never_delays_a_reload() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut node = Node::new();
    node.write_state(&state("strict", vec![web()]));
    node.start_agent();
    node.wait_ready();
    // Many tracked flows make every scrape walk a large map.
    let mut maps = KernelMaps::open_pinned(&node.pin_path).expect("maps");
    let template = maps.flows().expect("flows");
    assert!(template.is_empty());
    fill_conntrack(&mut maps, web().vlan, 100_000);
    let quiet = worst_reload(&node, 11);
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, scrapes) = (stop.clone(), scrapes.clone());
            node.spawn_in_netns(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", METRICS_PORT)) {
                        let _ = write!(
                            stream,
                            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                        );
                        let mut sink = Vec::new();
                        let _ = stream.read_to_end(&mut sink);
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let scraped = worst_reload(&node, 21);
    stop.store(true, Ordering::Relaxed);
    for scraper in scrapers {
        scraper.join().expect("scraper");
    }
    let scrapes = scrapes.load(Ordering::Relaxed);
    eprintln!("worst reload latency {quiet:?} alone, {scraped:?} under {scrapes} scrapes");
    assert!(scrapes >= 4, "the scrapers ran ({scrapes})");
    // Two CPUs shared with four busy scrapers: at most twice as long, and a
    // second of slack for the debounce and the scheduler.
    assert!(
        scraped < quiet * 2 + Duration::from_secs(1),
        "a reload took {scraped:?} while scraped, {quiet:?} alone"
    );
}

/// Inserts `count` tracked flows of the pod on `vlan` straight into the pinned conntrack.
fn fill_conntrack(maps: &mut KernelMaps, vlan: u16, count: u32) {
    let mut key = enforcer_common::CtKey {
        pod_addr: [0; 16],
        peer_addr: [0; 16],
        pod_port: 80,
        peer_port: 40000,
        vlan,
        protocol: 6,
        _pad: 0,
    };
    // Live flows (an established TCP flow seen now): the agent's sweep keeps them.
    let now = enforcer::observe::events::monotonic().as_nanos() as u64;
    let entry = enforcer_common::CtEntry {
        created_ns: now,
        last_seen_ns: now,
        state: enforcer_common::ct_state::ESTABLISHED,
        ..Default::default()
    };
    for i in 0..count {
        key.peer_addr[12..].copy_from_slice(&(0x0b00_0000 + i).to_be_bytes());
        maps.set_flow(&key, &entry).expect("insert a flow");
    }
}

/// `state` plus a rule in `sg-app` that admits everything from the members of
/// `sg-crowd`: `members` addresses from `first` on, 50 to an ENI. Each member is
/// a peer entry: enough of them and a policy switch (old and new entries side by
/// side) overflows PEERS_V4 while either state alone fits.
fn write_crowd_state(node: &Node, state: &TestState, first: u32, members: u32) {
    let mut groups = support::security_groups(state);
    let list = groups["SecurityGroups"].as_array_mut().expect("groups");
    let app = list
        .iter_mut()
        .find(|g| g["GroupId"] == "sg-app")
        .expect("sg-app");
    app["IpPermissions"]
        .as_array_mut()
        .expect("ingress")
        .push(serde_json::json!({
            "IpProtocol": "-1", "IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [],
            "UserIdGroupPairs": [{"GroupId": "sg-crowd", "UserId": "111122223333"}],
        }));
    let mut crowd = list[0].clone();
    crowd["GroupId"] = "sg-crowd".into();
    crowd["GroupName"] = "sg-crowd".into();
    list.push(crowd);
    let interfaces: Vec<serde_json::Value> = (0..members)
        .step_by(50)
        .map(|start| {
            let addresses: Vec<serde_json::Value> = (start..members.min(start + 50))
                .map(|i| {
                    serde_json::json!({
                        "PrivateIpAddress": std::net::Ipv4Addr::from(first + i).to_string()
                    })
                })
                .collect();
            serde_json::json!({
                "NetworkInterfaceId": format!("eni-crowd{start}"),
                "Groups": [{"GroupId": "sg-crowd"}],
                "PrivateIpAddress": addresses[0]["PrivateIpAddress"],
                "PrivateIpAddresses": addresses,
            })
        })
        .collect();
    // Everything computed first, then written in one burst: the agent must not
    // read a mix of two states (it reloads after 200 ms of quiet).
    let interfaces = serde_json::json!({ "NetworkInterfaces": interfaces }).to_string();
    let groups = groups.to_string();
    for (file, text) in node.state_files(state) {
        let text = if file == "security-groups.json" {
            groups.clone()
        } else {
            text
        };
        support::write_atomically(&node.state_dir.join(file), &text);
    }
    support::write_atomically(&node.state_dir.join("network-interfaces.json"), &interfaces);
}

#[test]
fn a_pods_mode_is_remembered_only_once_a_state_with_it_is_enforced() {
    let crowd = enforcer_common::MAX_PEER_ENTRIES * 55 / 100;
    let first = u32::from(std::net::Ipv4Addr::new(11, 0, 0, 0));
    let mut node = Node::new();
    let web = web();
    write_crowd_state(&node, &state("strict", vec![web.clone()]), first, crowd);
    node.start_agent();
    node.wait_ready();
    let rejected = || {
        node.http_get("/metrics").is_some_and(|(_, m)| {
            m.lines().any(|l| {
                l.starts_with(r#"enforcer_reloads_total{result="rejected"}"#) && !l.ends_with(" 0")
            })
        })
    };
    // The node turns standard and a new pod comes, but the crowd moved: old and
    // new peer entries together overflow PEERS_V4, so the apply fails.
    let api = TestPod::new("api", "uid-api-1", 11, [10, 0, 1, 51]);
    write_crowd_state(
        &node,
        &state("standard", vec![web.clone(), api.clone()]),
        first + crowd,
        crowd,
    );
    wait_for("the apply refused", Duration::from_secs(60), rejected);
    let (_, body) = node.http_get("/readyz").expect("readyz");
    assert!(body.contains("rejected"), "{body}");
    let report = std::fs::read_to_string(enforcer::observe::status::report_path(&node.pin_path))
        .expect("report");
    assert!(report.contains("PEERS_V4 is full"), "{report}");
    // Back to strict: api is enforced for the first time now, so strict is its mode.
    write_crowd_state(
        &node,
        &state("strict", vec![web.clone(), api.clone()]),
        first,
        10,
    );
    wait_for("api enforced", Duration::from_secs(60), || {
        KernelMaps::open_pinned(&node.pin_path)
            .expect("maps")
            .pods()
            .expect("PODS")
            .contains_key(&api.vlan)
    });
    let pods = KernelMaps::open_pinned(&node.pin_path)
        .expect("maps")
        .pods()
        .expect("PODS");
    assert_eq!(pods[&api.vlan].mode(), Some(EnforcingMode::Strict));
}

/// `check` refuses what `run` refuses (a state the maps cannot hold), and
/// accepts what the kernel holds in another form (an identity longer than its
/// key, held as a digest): both enforce the same thing.
#[test]
fn check_refuses_what_run_refuses() {
    let node = Node::new();
    let check = |node: &Node| {
        let state_dir = node.state_dir.to_str().expect("utf-8").to_string();
        let out = node
            .command_in_netns(&["check", "--state", &state_dir])
            .stderr(Stdio::piped())
            .output()
            .expect("run check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let long_uid = TestPod::new("db", &"u".repeat(60), 12, [10, 0, 1, 52]);
    node.write_state(&state("strict", vec![web(), long_uid]));
    let (code, stderr) = check(&node);
    assert_eq!(code, Some(0), "{stderr}");
    let crowd = enforcer_common::MAX_PEER_ENTRIES + 1;
    write_crowd_state(&node, &state("strict", vec![web()]), 11 << 24, crowd);
    let (code, stderr) = check(&node);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("PEERS_V4"), "{stderr}");
}
