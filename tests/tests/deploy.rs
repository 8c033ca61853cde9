//! The agent as it ships: the image `cargo xtask image` builds from this checkout,
//! run by podman on a namespace trunk, and the DaemonSet's pod template as
//! `kubectl kustomize deploy/` renders it, played by `podman kube play`. Both
//! enforce the example state (`deploy/agent/example-state`, whose trunk is
//! `eth1`) inside a test network namespace whose trunk is named `eth1`. Then an
//! upgrade from one container to the next over pins of another layout, and the
//! removal by the rendered `remove` overlay.

#[path = "agent_support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use enforcer::model::Direction;
use enforcer_common::{PodEntry, Reason, map_names};
use enforcer_tests::deploy::{self, podman, run};
use enforcer_tests::frame::{self, Tag};
use enforcer_tests::testbed::matrix::Explainer;
use enforcer_tests::testbed::scenario::example_state;
use enforcer_tests::testbed::traffic::Probe;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use support::{
    Node, maps_of_attached_program, pin_pods_map_of_an_older_layout, pinned_map, wait_for,
};

/// The example NodeConfig's node and trunk.
const NODE: &str = "ip-10-0-1-10.ec2.internal";
const TRUNK: &str = "eth1";

/// The example's pod `shop/web-6f7c9d8b5-x2x7q`: VLAN 1, 10.0.1.101.
const WEB: &str = "shop/web-6f7c9d8b5-x2x7q";
const WEB_VLAN: u16 = 1;
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);

/// New TCP flows into `web`: from the load balancer, the internet and the node.
const FLOWS: &[(Ipv4Addr, u16)] = &[
    (Ipv4Addr::new(10, 0, 101, 17), 80),
    (Ipv4Addr::new(198, 51, 100, 77), 80),
    (Ipv4Addr::new(10, 0, 1, 10), 8080),
    (Ipv4Addr::new(10, 0, 1, 10), 9090),
];

/// The image is what the issue asks for: static, one layer, labelled, small.
#[test]
fn the_image_is_one_static_binary_with_its_labels() {
    enforcer_tests::require_root();
    let image = deploy::image();
    let inspect = |format: &str| {
        run(podman().args(["image", "inspect", "--format", format, image]))
            .trim()
            .to_string()
    };
    let size: u64 = inspect("{{.Size}}").parse().expect("a size");
    // 37.6 MB measured with the live sources (the AWS SDK's EC2 client and kube-rs:
    // 7.9 MB before them), 42.3 MB with the controller; 27.2 MB since `cargo xtask
    // image` strips the binary's symbols.
    assert!(size <= 40_000_000, "the image is {size} bytes, over 40 MB");
    assert_eq!(
        inspect("{{len .RootFS.Layers}}"),
        "1",
        "one layer: the binary"
    );
    assert_eq!(inspect("{{json .Config.Entrypoint}}"), r#"["/enforcer"]"#);
    let labels: serde_json::Value =
        serde_json::from_str(&inspect("{{json .Labels}}")).expect("labels as JSON");
    for label in ["version", "revision", "source"] {
        let key = format!("org.opencontainers.image.{label}");
        let value = labels[&key].as_str().unwrap_or_default();
        assert!(!value.is_empty(), "the image has no {key} label: {labels}");
    }
    let revision = run(Command::new("git")
        .current_dir(deploy::workspace_root())
        .args(["rev-parse", "HEAD"]));
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|r| r.starts_with(revision.trim())),
        "the revision label is not this checkout's commit: {labels}"
    );
}

/// `podman run --privileged --network … -v /sys/fs/bpf:/sys/fs/bpf IMAGE run`:
/// the container enforces the example state as `enforcer explain` judges it, and
/// bpftool on the host sees its pinned maps and links.
#[test]
fn the_image_enforces_the_example_state_on_a_namespace_trunk() {
    let image = deploy::image();
    let node = Node::with_trunk(Some(TRUNK));
    let container = RunningContainer::start(&node, image, "agent");
    container.wait_ready(&node);
    judged_as_explain_says(&node);
    assert_eq!(
        node.attached(),
        (
            vec![pinned_program(&node, "ingress")],
            vec![pinned_program(&node, "egress")]
        ),
        "exactly the pinned programs, once per direction"
    );
    bpftool_sees_the_pins(&node);
    // The manifest's memory limit holds the first start's peak, maps included.
    let cgroup = run(podman().args(["inspect", "--format", "{{.State.CgroupPath}}", &container.0]));
    let peak = Path::new("/sys/fs/cgroup/memory")
        .join(cgroup.trim().trim_start_matches('/'))
        .join("memory.max_usage_in_bytes");
    let peak: u64 = std::fs::read_to_string(&peak)
        .unwrap_or_else(|e| panic!("{}: {e}", peak.display()))
        .trim()
        .parse()
        .expect("bytes");
    let limit = memory_limit();
    assert!(
        peak < limit,
        "the agent peaked at {peak} bytes, over the manifest's limit {limit}"
    );
    // `enforcer status` on the host reads what the agent in the container enforces.
    let pin_path = node.pin_path.to_str().expect("utf-8 pin path");
    let status = node.enforcer(&["status", "--pin-path", pin_path]);
    assert!(status.contains(WEB), "status does not list {WEB}: {status}");
}

/// A rolling upgrade on one node: image v1 enforcing, its container killed, the
/// next version's container started over pins of another layout (what a build
/// whose `PodEntry` was smaller pinned, made as `tests/upgrade.rs` does; v2 is
/// this checkout's image): a denied frame arriving every 200 µs from before the
/// kill until v2 is ready is judged and dropped every time, and exactly one
/// program per direction is attached after it, using the migrated map.
#[test]
fn a_rolling_upgrade_between_images_leaves_no_frame_unjudged() {
    let image = deploy::image();
    let mut node = Node::with_trunk(Some(TRUNK));
    let v1 = RunningContainer::start(&node, image, "v1");
    v1.wait_ready(&node);
    let (peer, port) = (Ipv4Addr::new(198, 51, 100, 77), 80);
    assert!(
        !explainer()
            .explain(WEB, Direction::Ingress, IpAddr::V4(peer), Probe::Tcp(port))
            .expect("enforcer explain")
            .allowed,
        "the frame sent during the upgrade is one the policy denies"
    );
    let denied = frame::tcp(peer, 41_000, WEB_IP, port, frame::TCP_SYN);
    let mut older_pods = None;
    let mut v2 = None;
    node.start_under_denied_traffic(frame::ip_frame(Tag::Vlan(WEB_VLAN), &denied), |node| {
        v1.kill();
        older_pods = Some(pin_pods_map_of_an_older_layout(node));
        let started = RunningContainer::start(node, image, "v2");
        started.wait_ready(node);
        v2 = Some(started);
    });
    let _v2 = v2;
    assert_eq!(
        node.attached(),
        (
            vec![pinned_program(&node, "ingress")],
            vec![pinned_program(&node, "egress")]
        ),
        "exactly one program per direction after the upgrade, the pinned one"
    );
    let pods = pinned_map(&node, map_names::PODS);
    assert_eq!(
        pods.value_size() as usize,
        size_of::<PodEntry>(),
        "PODS migrated"
    );
    assert_ne!(
        Some(pods.id()),
        older_pods,
        "the older PODS pin is replaced"
    );
    assert!(
        maps_of_attached_program(&node).contains(&pods.id()),
        "the attached program uses the migrated PODS"
    );
    judged_as_explain_says(&node);
}

/// `podman kube play` of the DaemonSet's pod template exactly as `kubectl kustomize
/// deploy/agent` (the state-directory variant: no cluster here) renders it (see [`play`]): the agent gets ready as its readiness probe
/// asks, and enforces.
#[test]
fn the_rendered_daemon_set_gets_ready_under_podman_kube_play() {
    let host = HostPaths::new();
    let mut node = Node::with_trunk(Some(TRUNK));
    node.pin_path = host.bpffs.join("enforcer");
    let (_played, agent) = play(&node, &host, "agent");
    assert_eq!(
        agent.image.as_deref(),
        Some(deploy::image()),
        "the manifest runs the image built"
    );
    wait_ready_as_probed(&node, &agent);
    judged_as_explain_says(&node);
    bpftool_sees_the_pins(&node);
}

/// The README's removal: the agent's pod deleted leaves its programs enforcing;
/// the `remove` overlay's pod (played as rendered, see [`play`]) uninstalls them.
#[test]
fn the_remove_overlay_uninstalls_what_the_daemon_set_installed() {
    let host = HostPaths::new();
    let mut node = Node::with_trunk(Some(TRUNK));
    node.pin_path = host.bpffs.join("enforcer");
    let (played, agent) = play(&node, &host, "agent");
    wait_ready_as_probed(&node, &agent);
    drop(played);
    let denied = frame::tcp(
        Ipv4Addr::new(198, 51, 100, 77),
        42_000,
        WEB_IP,
        80,
        frame::TCP_SYN,
    );
    node.expect_verdicts(
        vec![frame::ip_frame(Tag::Vlan(WEB_VLAN), &denied)],
        &[(Reason::DropPolicy, 1)],
    );
    let (_removal, _) = play(&node, &host, "remove");
    wait_for(
        "the remove overlay's init container to uninstall",
        Duration::from_secs(60),
        || !node.pin_path.exists(),
    );
    assert_eq!(
        node.attached(),
        (vec![], vec![]),
        "nothing attached to the trunk after the removal"
    );
}

/// Plays the pod template of the DaemonSet `kubectl kustomize deploy/<overlay>`
/// renders, with the state ConfigMap it renders, in the node's network namespace;
/// returns the pod (removed on drop) and its first container as rendered. Only
/// the node's own parts are filled in: `spec.nodeName` and `NODE_NAME` (the
/// scheduler's and the kubelet's: podman resolves only metadata fields of the
/// downward API), the hostPath volumes (this test's bpffs instance and run
/// directory), `registry.k8s.io/pause` (no registry here) by podman's own
/// pause image, and podman's init container type (Kubernetes' behaviour).
fn play(node: &Node, host: &HostPaths, overlay: &str) -> (Played, Container) {
    let rendered = deploy::render(overlay);
    let daemon_set = rendered.daemon_set();
    let template = daemon_set.spec.as_ref().expect("spec").template.clone();
    let mut spec: PodSpec = template.spec.expect("a pod spec");
    let first = spec.containers[0].clone();
    for volume in spec.volumes.iter_mut().flatten() {
        if let Some(path) = volume.host_path.as_mut() {
            path.path = match path.path.as_str() {
                "/sys/fs/bpf" => host.bpffs.display().to_string(),
                "/run/enforcer" => host.run.display().to_string(),
                other => panic!("a hostPath this test does not provide: {other}"),
            };
        }
    }
    spec.node_name = Some(NODE.to_string());
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in containers {
        for variable in container.env.iter_mut().flatten() {
            let field = variable
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref());
            if field.is_some_and(|f| f.field_path == "spec.nodeName") {
                variable.value_from = None;
                variable.value = Some(NODE.to_string());
            }
        }
        if container
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("registry.k8s.io/pause:"))
        {
            container.image = Some(podman_pause_image());
        }
    }
    let name = format!(
        "{}-{}",
        node.netns,
        if overlay.is_empty() { "agent" } else { overlay }
    );
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: daemon_set.metadata.namespace.clone(),
            labels: template.metadata.and_then(|m| m.labels),
            // Init containers as Kubernetes runs them (at every pod start): podman's
            // default, "once", removes one after its exit and races with that exit.
            annotations: Some(
                [(
                    "io.podman.annotations.init.container.type".to_string(),
                    "always".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    let pod_file = host.root.join(format!("{name}.yaml"));
    let config_map_file = host.root.join(format!("{name}-config-maps.yaml"));
    std::fs::write(&pod_file, serde_yaml::to_string(&pod).expect("pod YAML")).expect("write");
    let config_maps: Vec<String> = rendered
        .config_maps
        .iter()
        .map(|c| serde_yaml::to_string(c).expect("ConfigMap YAML"))
        .collect();
    std::fs::write(&config_map_file, config_maps.join("---\n")).expect("write");
    // A host-network pod joins podman's own network namespace: the node's.
    let played = Played(name);
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg(deploy::workspace_root().join("image/podman"))
        .args(["kube", "play", "--configmap"])
        .arg(&config_map_file)
        .arg(&pod_file));
    (played, first)
}

/// The pause image podman builds for its pods' infra containers (after a first play).
fn podman_pause_image() -> String {
    let images = run(podman().args([
        "images",
        "--filter",
        "reference=localhost/podman-pause",
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ]));
    images
        .lines()
        .next()
        .expect("podman's pause image, built by an earlier kube play")
        .to_string()
}

/// Waits until `container`'s readiness probe, asked as the kubelet asks it, succeeds.
fn wait_ready_as_probed(node: &Node, container: &Container) {
    let probe = container
        .readiness_probe
        .clone()
        .and_then(|p| p.http_get)
        .expect("an HTTP readiness probe");
    let host = probe.host.expect("the probe names the host (host network)");
    let IntOrString::Int(port) = probe.port else {
        panic!("the probe's port is a number")
    };
    let path = probe.path.expect("a probe path");
    wait_for(
        "the played pod to be ready",
        Duration::from_secs(60),
        || {
            node.http_get_at((&host, port as u16), &path)
                .is_some_and(|(code, _)| code == 200)
        },
    );
}

/// The DaemonSet's memory limit, in bytes (a `Mi` or `Gi` quantity).
fn memory_limit() -> u64 {
    let rendered = deploy::render("");
    let spec = rendered.daemon_set().spec.as_ref().expect("spec");
    let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
    let limit = &container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .expect("a memory limit")
        .0;
    let (number, unit) = limit.split_at(limit.len() - 2);
    let unit: u64 = match unit {
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("a memory limit in {other}: {limit}"),
    };
    number.parse::<u64>().expect("a number") * unit
}

/// `enforcer explain` on the example state.
fn explainer() -> Explainer {
    Explainer {
        enforcer: support::enforcer_binary(),
        state: example_state(),
    }
}

/// New flows into `web` judged by the kernel as `enforcer explain` judges them on
/// the example state: allowed ones pass as new flows, denied ones are dropped.
fn judged_as_explain_says(node: &Node) {
    let explainer = explainer();
    let mut verdicts = Vec::new();
    for (n, &(peer, port)) in FLOWS.iter().enumerate() {
        let allowed = explainer
            .explain(WEB, Direction::Ingress, IpAddr::V4(peer), Probe::Tcp(port))
            .expect("enforcer explain")
            .allowed;
        let ip = frame::tcp(peer, 40_000 + n as u16, WEB_IP, port, frame::TCP_SYN);
        let expected = if allowed {
            Reason::PassNew
        } else {
            Reason::DropPolicy
        };
        node.expect_verdicts(
            vec![frame::ip_frame(Tag::Vlan(WEB_VLAN), &ip)],
            &[(expected, 1)],
        );
        verdicts.push(allowed);
    }
    assert!(
        verdicts.contains(&true) && verdicts.contains(&false),
        "the flows should include allowed and denied ones: {verdicts:?}"
    );
}

/// The program pinned for `direction` (`ingress`/`egress`), by ID.
fn pinned_program(node: &Node, direction: &str) -> u32 {
    let pin = node.pin_path.join(format!("programs/tc_{direction}"));
    aya::programs::ProgramInfo::from_pin(&pin)
        .unwrap_or_else(|e| panic!("{}: {e}", pin.display()))
        .id()
}

/// `bpftool` on the host shows the agent's pinned maps, and its pinned TCX links
/// holding its pinned programs.
fn bpftool_sees_the_pins(node: &Node) {
    let bpftool = |args: &[&str], pin: PathBuf| run(Command::new("bpftool").args(args).arg(&pin));
    let pods = bpftool(
        &["map", "show", "pinned"],
        node.pin_path.join("maps").join(map_names::PODS),
    );
    assert!(pods.contains(map_names::PODS), "bpftool map show: {pods}");
    for direction in ["ingress", "egress"] {
        let link = bpftool(
            &["link", "show", "pinned"],
            node.pin_path.join(format!("links/tc_{direction}")),
        );
        let program = format!("prog {}", pinned_program(node, direction));
        assert!(
            link.contains(&program),
            "bpftool link show: {link}, not {program}"
        );
    }
}

/// The image run as `podman run --privileged` in the node's network namespace,
/// with the host's bpffs and report directory, on the example state; removed on drop.
struct RunningContainer(String);

impl RunningContainer {
    fn start(node: &Node, image: &str, name: &str) -> Self {
        let state = example_state().canonicalize().expect("the example state");
        std::fs::create_dir_all(enforcer::observe::status::REPORT_DIR)
            .expect("the report directory");
        let container = Self(format!("{}-{name}", node.netns));
        let pin_path = node.pin_path.to_str().expect("utf-8 pin path");
        run(podman()
            .args(["run", "--detach", "--name", &container.0, "--privileged"])
            .args(["--network", &format!("ns:/run/netns/{}", node.netns)])
            .args(["--volume", "/sys/fs/bpf:/sys/fs/bpf"])
            .args([
                "--volume",
                &format!("{}:/etc/enforcer/state:ro", state.display()),
            ])
            .args([
                "--volume",
                &format!("{0}:{0}", enforcer::observe::status::REPORT_DIR),
            ])
            .arg(image)
            .args([
                "run",
                "--state",
                "/etc/enforcer/state",
                "--pin-path",
                pin_path,
            ])
            .args(["--metrics-addr", "127.0.0.1:9464"]));
        container
    }

    fn wait_ready(&self, node: &Node) {
        wait_for(
            &format!("the agent in {} to be ready", self.0),
            Duration::from_secs(30),
            || {
                node.http_get("/readyz")
                    .is_some_and(|(code, _)| code == 200)
            },
        );
    }

    /// SIGKILL, as a node losing its pod would; the pins stay.
    fn kill(self) {
        run(podman().args(["rm", "--force", "--time", "0", &self.0]));
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.0])
            .output();
    }
}

/// A pod started with `podman kube play`, by name, removed on drop.
struct Played(String);

impl Drop for Played {
    fn drop(&mut self) {
        let _ = podman()
            .args(["pod", "rm", "--force", "--time", "0", &self.0])
            .output();
    }
}

/// The node's host paths for a played pod: a bpffs instance of its own (so the
/// manifest's pin path cannot meet another agent's) and a run directory.
struct HostPaths {
    root: PathBuf,
    bpffs: PathBuf,
    run: PathBuf,
}

impl HostPaths {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "enforcer-test-deploy-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let (bpffs, run_dir) = (root.join("bpf"), root.join("run"));
        for dir in [&bpffs, &run_dir] {
            std::fs::create_dir_all(dir).expect("create the host paths");
        }
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
        Self {
            root,
            bpffs,
            run: run_dir,
        }
    }
}

impl Drop for HostPaths {
    fn drop(&mut self) {
        let _ = enforcer::kernel::ebpf::uninstall(&self.bpffs.join("enforcer"));
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
