//! The node agent as real `enforcer` processes on a veth trunk in a fresh namespace:
//! restarts, live and rejected states, pod lifecycle, enforcing-mode pinning; and the
//! agent run in-process, to change its state at each stage of its start-up.

#[path = "agent_support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer::agent::{Startup, StateSource};
use enforcer::kernel::maps::KernelMaps;
use enforcer::kernel::xdp::XdpSetting;
use enforcer::observe::status::Status;
use enforcer::source::live::hub::{Ec2Node, Identity, names};
use enforcer::source::live::{Hub, NodeSettings};
use enforcer::source::state::Documents;
use enforcer::source::watch::MAX_DELAY;
use enforcer_common::{EnforcingMode, POD_AUDIT, PodEntry, Reason, counter_slot};
use support::{Node, TestPod, TestState, ack_to, syn_to, wait_for};

const OPEN: u16 = 80;
const CLOSED: u16 = 81;

fn web() -> TestPod {
    TestPod::new("web", "uid-web-1", 10, [10, 0, 1, 50])
}

fn api() -> TestPod {
    TestPod::new("api", "uid-api-1", 11, [10, 0, 1, 51])
}

fn state(mode: &'static str, pods: Vec<TestPod>) -> TestState {
    TestState {
        mode,
        open_port: OPEN,
        pods,
    }
}

fn kernel_pods(node: &Node) -> std::collections::BTreeMap<u16, PodEntry> {
    KernelMaps::open_pinned(&node.pin_path)
        .expect("open the pinned maps")
        .pods()
        .expect("read PODS")
}

fn kernel_mode(node: &Node, vlan: u16) -> EnforcingMode {
    kernel_pods(node)[&vlan].mode().expect("a valid mode")
}

#[test]
fn kill_9_and_restart_keep_enforcing_through_one_attachment_per_direction() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    let (ingress, egress) = node.attached();
    assert_eq!(
        (ingress.len(), egress.len()),
        (1, 1),
        "one program per hook"
    );
    node.expect_verdicts(vec![syn_to(&web, OPEN, 40000)], &[(Reason::PassNew, 1)]);
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 40001)],
        &[(Reason::DropPolicy, 1)],
    );

    node.kill_agent(0);
    assert_eq!(
        node.attached(),
        (ingress.clone(), egress.clone()),
        "kill -9 detaches nothing"
    );
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 40002)],
        &[(Reason::DropPolicy, 1)],
    );

    // Denied frames keep arriving while the next agent starts: every one of
    // them must be judged (a moment without a program would pass some uncounted).
    node.start_agent_under_denied_traffic(syn_to(&web, CLOSED, 40003));

    let (new_ingress, new_egress) = node.attached();
    assert_eq!(
        (new_ingress.len(), new_egress.len()),
        (1, 1),
        "no second attachment"
    );
    assert_ne!(
        new_ingress, ingress,
        "the restarted agent replaced the program"
    );
    // The flow admitted before the restarts is still tracked.
    node.expect_verdicts(
        vec![ack_to(&web, OPEN, 40000)],
        &[(Reason::PassEstablished, 1)],
    );

    node.stop_agent(1);
    assert_eq!(
        node.attached(),
        (new_ingress, new_egress),
        "SIGTERM detaches nothing"
    );
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 40004)],
        &[(Reason::DropPolicy, 1)],
    );

    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();
    let out = node.enforcer(&["uninstall", "--pin-path", &pin_path]);
    assert!(out.contains("no longer enforced"), "{out}");
    assert_eq!(
        node.attached(),
        (vec![], vec![]),
        "uninstall detaches both programs"
    );
    assert!(!node.pin_path.exists(), "uninstall removes the pin path");
}

#[test]
fn a_restart_over_a_bad_state_keeps_the_pinned_enforcement_until_the_state_is_fixed() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    let attached = node.attached();
    node.kill_agent(0);

    support::write_atomically(
        &node.state_dir.join("broken.json"),
        "{\"SecurityGroups\": [",
    );
    node.start_agent();
    wait_for(
        "the restarted agent to report",
        Duration::from_secs(10),
        || {
            node.http_get("/readyz")
                .is_some_and(|(code, _)| code == 503)
        },
    );
    assert_eq!(
        node.attached(),
        attached,
        "the pinned programs stay, untouched"
    );
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 45000)],
        &[(Reason::DropPolicy, 1)],
    );
    node.expect_verdicts(vec![syn_to(&web, OPEN, 45001)], &[(Reason::PassNew, 1)]);

    std::fs::remove_file(node.state_dir.join("broken.json")).expect("remove");
    node.wait_ready();
    let (ingress, egress) = node.attached();
    assert_eq!((ingress.len(), egress.len()), (1, 1));
    assert_ne!(
        ingress, attached.0,
        "the fixed state brought the new programs in"
    );
}

#[test]
fn a_configmap_update_swapping_the_data_symlink_is_applied() {
    let mut node = Node::new();
    let web = web();
    // The layout of a ConfigMap volume: files are symlinks through `..data`.
    let state_dir = node.state_dir.clone();
    let version = |n: u32| state_dir.join(format!("..2026_11_28_{n}"));
    std::fs::create_dir(version(1)).expect("version dir");
    node.write_state_in(&version(1), &state("strict", vec![web.clone()]));
    std::os::unix::fs::symlink("..2026_11_28_1", node.state_dir.join("..data")).expect("..data");
    for (file, _) in node.state_files(&state("strict", vec![])) {
        std::os::unix::fs::symlink(format!("..data/{file}"), node.state_dir.join(file))
            .expect("file symlink");
    }
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 46000)],
        &[(Reason::DropPolicy, 1)],
    );

    // What the kubelet does: a new version directory, then `..data` renamed over.
    let mut changed = state("strict", vec![web.clone()]);
    changed.open_port = CLOSED;
    std::fs::create_dir(version(2)).expect("version dir");
    node.write_state_in(&version(2), &changed);
    std::os::unix::fs::symlink("..2026_11_28_2", node.state_dir.join("..data_tmp")).expect("tmp");
    std::fs::rename(
        node.state_dir.join("..data_tmp"),
        node.state_dir.join("..data"),
    )
    .expect("swap ..data");
    std::fs::remove_dir_all(version(1)).expect("old version");
    let mut port = 46001;
    wait_for("the swapped state", Duration::from_secs(2), || {
        port += 1;
        let before = node.counters()[Reason::PassNew as usize];
        node.send_to_trunk(vec![syn_to(&web, CLOSED, port)]);
        std::thread::sleep(Duration::from_millis(10));
        node.counters()[Reason::PassNew as usize] > before
    });
}

#[test]
fn a_state_change_applies_within_a_second_and_keeps_tracked_flows() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 41000)], &[(Reason::PassNew, 1)]);
    let handle = kernel_pods(&node)[&web.vlan].policies[0];

    let mut changed = state("strict", vec![web.clone()]);
    changed.open_port = CLOSED;
    let written = Instant::now();
    node.write_state(&changed);
    let mut port = 42000;
    wait_for("the new rule", Duration::from_secs(1), || {
        port += 1;
        let before = node.counters()[Reason::PassNew as usize];
        node.send_to_trunk(vec![syn_to(&web, CLOSED, port)]);
        std::thread::sleep(Duration::from_millis(10));
        node.counters()[Reason::PassNew as usize] > before
    });
    eprintln!("applied {:?} after the write", written.elapsed());
    // Only the rule's port changed: the pod keeps its policy, whose classes' port tables
    // were switched in place (ARCHITECTURE.md, "Tables switched in place").
    let entry = kernel_pods(&node)[&web.vlan];
    assert_eq!(
        entry.policies[0], handle,
        "a port change keeps the pod's policy handle"
    );
    node.expect_verdicts(vec![syn_to(&web, OPEN, 41001)], &[(Reason::DropPolicy, 1)]);
    node.expect_verdicts(
        vec![ack_to(&web, OPEN, 41000)],
        &[(Reason::PassEstablished, 1)],
    );
}

#[test]
fn a_bad_state_is_rejected_whole_and_the_kernel_keeps_the_last_good_one() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    let good = kernel_pods(&node);
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();

    // A syntax error in one file, and a change elsewhere that must not apply.
    let mut changed = state("strict", vec![web.clone(), api()]);
    changed.open_port = CLOSED;
    node.write_state(&changed);
    support::write_atomically(&node.state_dir.join("broken.yaml"), "kind: [unclosed\n");
    wait_for("the rejection", Duration::from_secs(5), || {
        node.http_get("/readyz")
            .is_some_and(|(code, _)| code == 503)
    });
    assert_eq!(kernel_pods(&node), good, "the kernel maps changed");
    node.expect_verdicts(vec![syn_to(&web, OPEN, 43000)], &[(Reason::PassNew, 1)]);
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 43001)],
        &[(Reason::DropPolicy, 1)],
    );
    let status = node.enforcer(&["status", "--pin-path", &pin_path]);
    assert!(
        status.contains("broken.yaml"),
        "status names the file:\n{status}"
    );

    // Fixed: the change elsewhere applies.
    std::fs::remove_file(node.state_dir.join("broken.yaml")).expect("remove");
    node.wait_ready();
    assert!(
        kernel_pods(&node).contains_key(&api().vlan),
        "the fixed state applies"
    );
    node.expect_verdicts(vec![syn_to(&web, CLOSED, 43002)], &[(Reason::PassNew, 1)]);
}

/// One JSON file in the state directory holding `object`.
fn write_object(node: &Node, name: &str, object: serde_json::Value) {
    support::write_atomically(&node.state_dir.join(name), &object.to_string());
}

/// A pod of this node with the given phase and branch annotation.
fn pod_object(name: &str, vlan: u16, mac: &str, ip: &str, phase: &str) -> serde_json::Value {
    let eni = serde_json::json!([{
        "eniId": format!("eni-{vlan:017x}"), "ifAddress": mac, "privateIp": ip, "vlanId": vlan,
    }]);
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"app": "test"},
                     "annotations": {"vpc.amazonaws.com/pod-eni": eni.to_string()}},
        "spec": {"nodeName": "node-1"},
        "status": {"phase": phase, "podIP": ip},
    })
}

/// The unit of failure is the object: while the node enforces, a policy of another
/// namespace naming a group EC2 does not list, a policy whose selector cannot be
/// evaluated, a completed Job pod still annotated with a running pod's VLAN, and a
/// pod whose annotation is broken arrive with a new branch pod. The new pod is
/// enforced within the usual bound, the broken one is quarantined on its VLAN
/// (everything the groups filter dropped), `/readyz` stays 200, and `status` and
/// `/metrics` report each finding.
#[test]
fn bad_objects_are_isolated_and_the_node_keeps_enforcing() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();

    write_object(
        &node,
        "typo.json",
        serde_json::json!({
            "apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
            "metadata": {"name": "typo", "namespace": "team-a"},
            "spec": {"podSelector": {}, "securityGroups": {"groupIds": ["sg-0typo"]}},
        }),
    );
    write_object(
        &node,
        "selector.json",
        serde_json::json!({
            "apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
            "metadata": {"name": "selector", "namespace": "default"},
            "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]},
                     "securityGroups": {"groupIds": ["sg-node"]}},
        }),
    );
    write_object(
        &node,
        "job.json",
        pod_object(
            "job-old",
            web.vlan,
            "0a:00:00:00:00:09",
            "10.0.1.99",
            "Succeeded",
        ),
    );
    let broken = TestPod::new("broken", "uid-broken", 30, [10, 0, 1, 60]);
    write_object(
        &node,
        "broken.json",
        pod_object("broken", broken.vlan, "not-a-mac", "10.0.1.60", "Running"),
    );
    let started = Instant::now();
    node.write_state(&state("strict", vec![web.clone(), api()]));
    wait_for(
        "the new pod and the quarantine",
        Duration::from_secs(5),
        || {
            let pods = kernel_pods(&node);
            pods.contains_key(&api().vlan) && pods.contains_key(&broken.vlan)
        },
    );
    eprintln!("enforced {:?} after the change", started.elapsed());
    assert_eq!(node.http_get("/readyz").map(|(code, _)| code), Some(200));
    node.expect_verdicts(vec![syn_to(&api(), OPEN, 45000)], &[(Reason::PassNew, 1)]);
    node.expect_verdicts(vec![syn_to(&web, OPEN, 45001)], &[(Reason::PassNew, 1)]);
    // The quarantined pod: what its groups would have allowed is dropped; no address
    // of a broken annotation is trusted, so no frame is even the pod's.
    node.expect_verdicts(
        vec![syn_to(&broken, OPEN, 45002)],
        &[(Reason::DropSpoofed, 1)],
    );

    let status = node.enforcer(&["status", "--pin-path", &pin_path]);
    for expected in [
        "warning: ",
        "SecurityGroupPolicy team-a/typo",
        "skipped: ",
        "SecurityGroupPolicy default/selector",
        "quarantined: ",
        "QUARANTINED: ",
        "default/broken",
    ] {
        assert!(
            status.contains(expected),
            "status lacks {expected:?}:\n{status}"
        );
    }
    assert!(
        !status.contains("job-old"),
        "a completed pod is no finding:\n{status}"
    );
    let metrics = node.http_get("/metrics").expect("metrics").1;
    for expected in [
        r#"enforcer_state_findings{kind="warning"} 1"#,
        r#"enforcer_state_findings{kind="skipped"} 1"#,
        r#"enforcer_state_findings{kind="quarantined"} 1"#,
        "enforcer_state_error 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == expected),
            "metrics lack {expected:?}:\n{metrics}"
        );
    }

    // The pod fixed: released from quarantine with its policies' groups.
    write_object(
        &node,
        "broken.json",
        pod_object(
            "broken",
            broken.vlan,
            "0a:00:00:00:00:30",
            "10.0.1.60",
            "Running",
        ),
    );
    wait_for("the quarantine lifted", Duration::from_secs(5), || {
        !node
            .enforcer(&["status", "--pin-path", &pin_path])
            .contains("QUARANTINED")
    });
    node.expect_verdicts(vec![syn_to(&broken, OPEN, 45003)], &[(Reason::PassNew, 1)]);
}

#[test]
fn an_emptied_pods_file_is_rejected_and_the_kernel_keeps_its_pods() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    // The pods as YAML (JSON is YAML): an empty YAML file parses as no document at all.
    let pods = node.state_dir.join("pods.yaml");
    std::fs::rename(node.state_dir.join("pods.json"), &pods).expect("pods.yaml");
    node.start_agent();
    node.wait_ready();
    let good = kernel_pods(&node);
    assert!(good.contains_key(&web.vlan), "the pod is enforced");
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();

    // Truncated in place, as a writer that has not written yet leaves it.
    std::fs::write(&pods, "").expect("empty pods.yaml");
    wait_for("the rejection", Duration::from_secs(5), || {
        node.http_get("/readyz")
            .is_some_and(|(code, _)| code == 503)
    });
    assert_eq!(kernel_pods(&node), good, "the kernel maps changed");
    node.expect_verdicts(vec![syn_to(&web, OPEN, 44000)], &[(Reason::PassNew, 1)]);
    let status = node.enforcer(&["status", "--pin-path", &pin_path]);
    assert!(
        status.contains("pods.yaml"),
        "status names the file:\n{status}"
    );

    // An explicit empty list is a state without pods: applied.
    support::write_atomically(&pods, "apiVersion: v1\nkind: List\nitems: []\n");
    node.wait_ready();
    wait_for("the pod removed", Duration::from_secs(5), || {
        kernel_pods(&node).is_empty()
    });
}

#[test]
fn a_pod_that_leaves_loses_its_vlan_entry_and_its_flows_at_once() {
    let mut node = Node::new();
    let (web, api) = (web(), api());
    node.write_state(&state("strict", vec![web.clone(), api.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(
        vec![syn_to(&web, OPEN, 44000), syn_to(&api, OPEN, 44000)],
        &[(Reason::PassNew, 2)],
    );
    let flows_of = |vlan: u16| {
        KernelMaps::open_pinned(&node.pin_path)
            .expect("maps")
            .flows()
            .expect("flows")
            .iter()
            .filter(|(k, _)| k.vlan == vlan)
            .count()
    };
    assert_eq!(flows_of(api.vlan), 1);

    node.write_state(&state("strict", vec![web.clone()]));
    // One apply removes the entry, then (no packet of the VLAN can be tracked any
    // more) its flows: wait for the apply, not only for its first step.
    wait_for(
        "api's VLAN entry and flows to go",
        Duration::from_secs(2),
        || !kernel_pods(&node).contains_key(&api.vlan) && flows_of(api.vlan) == 0,
    );
    assert_eq!(flows_of(web.vlan), 1, "web's flow stays");
    node.expect_verdicts(
        vec![ack_to(&api, OPEN, 44000)],
        &[(Reason::DropUnknownVlan, 1)],
    );
    node.expect_verdicts(
        vec![ack_to(&web, OPEN, 44000)],
        &[(Reason::PassEstablished, 1)],
    );
}

#[test]
fn a_pod_keeps_the_mode_it_was_first_seen_with_across_mode_changes_and_restarts() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    assert_eq!(kernel_mode(&node, web.vlan), EnforcingMode::Strict);

    // The node switches to standard: only pods created afterwards get it.
    let api = api();
    node.write_state(&state("standard", vec![web.clone(), api.clone()]));
    wait_for("api to appear", Duration::from_secs(2), || {
        kernel_pods(&node).contains_key(&api.vlan)
    });
    assert_eq!(kernel_mode(&node, web.vlan), EnforcingMode::Strict);
    assert_eq!(kernel_mode(&node, api.vlan), EnforcingMode::Standard);

    // The modes survive a crash and a restart under the new node mode.
    node.kill_agent(0);
    node.start_agent();
    node.wait_ready();
    assert_eq!(kernel_mode(&node, web.vlan), EnforcingMode::Strict);
    assert_eq!(kernel_mode(&node, api.vlan), EnforcingMode::Standard);

    // A recreated web (new UID, same name and VLAN) takes the current mode.
    let recreated = TestPod::new("web", "uid-web-2", web.vlan, web.ip);
    node.write_state(&state("standard", vec![recreated, api.clone()]));
    wait_for(
        "the recreated web in standard mode",
        Duration::from_secs(2),
        || kernel_mode(&node, web.vlan) == EnforcingMode::Standard,
    );
    // And back to strict: the existing pods keep standard.
    node.write_state(&state("strict", vec![api.clone()]));
    wait_for("web to go", Duration::from_secs(2), || {
        !kernel_pods(&node).contains_key(&web.vlan)
    });
    assert_eq!(kernel_mode(&node, api.vlan), EnforcingMode::Standard);
}

/// Writes `state` with its SecurityGroupPolicy giving `group` instead of `sg-app`.
fn write_state_with_policy_group(node: &Node, state: &TestState, group: &str) {
    for (file, text) in node.state_files(state) {
        let text = text.replace(
            r#""groupIds":["sg-app"]"#,
            &format!(r#""groupIds":["{group}"]"#),
        );
        support::write_atomically(&node.state_dir.join(file), &text);
    }
}

fn wait_for_applied_reloads(node: &Node, count: u64) {
    let line = format!(r#"enforcer_reloads_total{{result="applied"}} {count}"#);
    wait_for("the state applied", Duration::from_secs(3), || {
        node.http_get("/metrics")
            .is_some_and(|(_, metrics)| metrics.lines().any(|l| l == line))
    });
}

#[test]
fn a_running_pod_keeps_its_groups_when_its_policy_changes_and_a_recreated_one_takes_the_new() {
    let mut node = Node::new();
    let web = web();
    let before = state("strict", vec![web.clone()]);
    node.write_state(&before);
    node.start_agent();
    node.wait_ready();
    // sg-app opens only port 80.
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 45000)],
        &[(Reason::DropPolicy, 1)],
    );
    // The policy now gives sg-node (everything from the VPC): web keeps sg-app.
    write_state_with_policy_group(&node, &before, "sg-node");
    wait_for_applied_reloads(&node, 2);
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 45001)],
        &[(Reason::DropPolicy, 1)],
    );
    // So it does across a restart: the groups are pinned with the mode.
    node.kill_agent(0);
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(
        vec![syn_to(&web, CLOSED, 45002)],
        &[(Reason::DropPolicy, 1)],
    );
    // A recreated web (new UID) is created under the new policy.
    let recreated = TestPod::new("web", "uid-web-2", web.vlan, web.ip);
    write_state_with_policy_group(&node, &state("strict", vec![recreated.clone()]), "sg-node");
    wait_for_applied_reloads(&node, 2);
    node.expect_verdicts(
        vec![syn_to(&recreated, CLOSED, 45003)],
        &[(Reason::PassNew, 1)],
    );
}

/// Audit, switched by the pod's annotation while refused frames keep arriving: each
/// switch is one update of the pod's `PODS` entry (same policies, the audit flag
/// changed), every frame is judged once, either dropped or passed as a would-drop,
/// a tracked flow survives both switches, and the verdict of new refused flows
/// changes as soon as the agent applies the state.
#[test]
fn switching_a_pod_between_audit_and_enforce_keeps_its_flows() {
    let mut node = Node::new();
    let mut web = web();
    node.write_state(&state("strict", vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 47000)], &[(Reason::PassNew, 1)]);
    let enforced = kernel_pods(&node)[&web.vlan];
    assert_eq!(enforced.flags & POD_AUDIT, 0);

    let dropped = counter_slot(Reason::DropPolicy, false) as usize;
    let would_drop = counter_slot(Reason::DropPolicy, true) as usize;
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let before = node.counters();
    let sender = {
        let (refused, stop, web) = (refused.clone(), stop.clone(), web.clone());
        let peer = node.peer.clone();
        node.spawn_in_netns(move || {
            let socket = support::PacketSocket::open(&peer);
            let mut port = 20000;
            while !stop.load(Ordering::SeqCst) {
                socket.send(&syn_to(&web, CLOSED, port));
                refused.fetch_add(1, Ordering::SeqCst);
                port = if port == 39999 { 20000 } else { port + 1 };
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let mut switch = |action, audited: bool| {
        web.action = Some(action);
        node.write_state(&state("strict", vec![web.clone()]));
        let (slot, other) = if audited {
            (would_drop, dropped)
        } else {
            (dropped, would_drop)
        };
        wait_for(&format!("{action} applied"), Duration::from_secs(2), || {
            let entry = kernel_pods(&node)[&web.vlan];
            (entry.flags & POD_AUDIT != 0) == audited
        });
        // From then on, every refused frame counts in `slot` alone.
        let at = node.counters();
        std::thread::sleep(Duration::from_millis(200));
        let later = node.counters();
        assert!(later[slot] > at[slot], "{action}: refused frames counted");
        assert_eq!(later[other], at[other], "{action}: counted the old way");
        let entry = kernel_pods(&node)[&web.vlan];
        assert_eq!(
            entry.policies, enforced.policies,
            "{action}: the same policies, only the flag changed"
        );
        if audited {
            // A refused connection audit lets through, from a port the sender never uses.
            node.send_to_trunk(vec![syn_to(&web, CLOSED, 50000)]);
        }
        // The tracked flow passes as established (the refused frames go on meanwhile).
        let established = Reason::PassEstablished as usize;
        let at = node.counters()[established];
        node.send_to_trunk(vec![ack_to(&web, OPEN, 47000)]);
        wait_for(
            &format!("{action}: the tracked flow"),
            Duration::from_secs(2),
            || node.counters()[established] == at + 1,
        );
    };
    switch("audit", true);
    switch("enforce", false);
    stop.store(true, Ordering::SeqCst);
    sender.join().expect("the sender");
    let sent = refused.load(Ordering::SeqCst);
    wait_for("every refused frame judged", Duration::from_secs(5), || {
        let after = node.counters();
        // The sender's frames, and the one connection attempt from port 50000.
        after[dropped] + after[would_drop] - before[dropped] - before[would_drop] == sent + 1
    });
    let after = node.counters();
    eprintln!(
        "{sent} refused frames: {} dropped, {} passed as would-drops",
        after[dropped] - before[dropped],
        after[would_drop] - before[would_drop]
    );
    // A refused flow audit let through is not tracked: enforced, its next packet drops.
    node.expect_verdicts(
        vec![ack_to(&web, CLOSED, 50000)],
        &[(Reason::DropPolicy, 1)],
    );
}

/// The longest a change may take to be enforced: the watch reloads at most
/// [`MAX_DELAY`] after it, and the read, the apply and the frames take well under a second.
const RELOAD_BOUND: Duration = MAX_DELAY.saturating_add(Duration::from_secs(1));

/// The stages of the start-up a change is made at, in the order the agent reaches them.
const STAGES: [Startup; 4] = [
    Startup::Loaded,
    Startup::Read,
    Startup::Applied,
    Startup::Attached,
];

/// Where an agent of [`change_during_start_up`] reads its state.
#[derive(Clone, Copy, Debug)]
enum Origin {
    Directory,
    Live,
}

/// What the observer of a start-up saw.
#[derive(Debug, Default)]
struct StartUp {
    stages: Vec<Startup>,
    changed_at: Option<Instant>,
    /// When the start-up ended: a change made before is applied within the bound of it.
    attached_at: Option<Instant>,
    /// At each stage from the first apply on: the VLANs `enforcer status` could not name.
    unnamed: Vec<(Startup, Vec<u16>)>,
}

#[test]
fn a_state_file_replaced_at_any_stage_of_the_start_up_is_applied() {
    changes_during_start_up(Origin::Directory);
}

#[test]
fn a_live_view_published_at_any_stage_of_the_start_up_is_applied() {
    changes_during_start_up(Origin::Live);
}

/// [`change_during_start_up`] at every stage, XDP on and off; fails with every case
/// that failed, each one's message printed as it fails.
fn changes_during_start_up(origin: Origin) {
    let mut failed = Vec::new();
    for xdp in [XdpSetting::Auto, XdpSetting::Off] {
        for stage in STAGES {
            let case = std::panic::AssertUnwindSafe(|| change_during_start_up(origin, xdp, stage));
            if std::panic::catch_unwind(case).is_err() {
                failed.push(format!("XDP {xdp:?}, change at {stage:?}"));
            }
        }
    }
    assert!(failed.is_empty(), "{origin:?} source: failed {failed:#?}");
}

/// Starts an agent over a state allowing `OPEN` to `web`, adds an ingress rule for
/// `CLOSED` when the start-up reaches `stage`, and checks that the rule is enforced
/// within [`RELOAD_BOUND`] of the change (or of the start-up's end, if later), that the start-up went through every stage,
/// and that `status` named every pod the maps held from the first apply on.
fn change_during_start_up(origin: Origin, xdp: XdpSetting, stage: Startup) {
    let case = format!("{origin:?} source, XDP {xdp:?}, change at {stage:?}");
    eprintln!("{case}");
    let node = Node::new();
    let web = web();
    let initial = state("strict", vec![web.clone()]);
    let mut groups = support::security_groups(&initial);
    groups["SecurityGroups"][0]["IpPermissions"]
        .as_array_mut()
        .expect("sg-app's ingress rules")
        .push(serde_json::json!({
            "IpProtocol": "tcp", "FromPort": CLOSED, "ToPort": CLOSED,
            "IpRanges": [{"CidrIp": "10.0.0.0/16"}],
            "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": [],
        }));
    let groups = groups.to_string();
    let (source, change): (StateSource, Box<dyn FnOnce() + Send>) = match origin {
        Origin::Directory => {
            node.write_state(&initial);
            let file = node.state_dir.join("security-groups.json");
            (
                StateSource::Directory(node.state_dir.clone()),
                Box::new(move || support::write_atomically(&file, &groups)),
            )
        }
        Origin::Live => {
            let hub = live_hub(&node, &initial);
            let changed = hub.clone();
            (
                StateSource::Live(hub),
                Box::new(move || {
                    changed.publish_ec2(documents("security-groups.json", &groups), ec2_node());
                }),
            )
        }
    };
    let seen = Arc::new(Mutex::new(StartUp::default()));
    let observer = seen.clone();
    let pin_path = node.pin_path.clone();
    let mut change = Some(change);
    let agent = node.start_in_process(source, xdp, move |at| {
        let mut seen = observer.lock().expect("the observer's record");
        seen.stages.push(at);
        if matches!(at, Startup::Applied | Startup::Attached) {
            let unnamed = match Status::read(&pin_path) {
                Ok(status) => status
                    .pods
                    .iter()
                    .filter(|p| p.pod.is_none() || p.groups.is_empty())
                    .map(|p| p.vlan)
                    .collect(),
                Err(error) => panic!("status at {at:?}: {}", enforcer::error_chain(&error)),
            };
            seen.unnamed.push((at, unnamed));
        }
        if at == stage {
            (change.take().expect("one change"))();
            seen.changed_at = Some(Instant::now());
        }
        if at == Startup::Attached {
            seen.attached_at = Some(Instant::now());
        }
    });
    node.wait_ready();
    let (changed_at, attached_at) = {
        let seen = seen.lock().expect("the observer's record");
        let reached = |at: Option<Instant>| {
            at.unwrap_or_else(|| panic!("{case}: the start-up never reached the stage"))
        };
        (reached(seen.changed_at), reached(seen.attached_at))
    };
    // The attachment (a second or more with XDP) is the start-up's, not the reload's.
    let deadline = changed_at.max(attached_at) + RELOAD_BOUND;
    let mut port = 47000;
    loop {
        port += 1;
        let before = node.counters()[Reason::PassNew as usize];
        node.send_to_trunk(vec![syn_to(&web, CLOSED, port)]);
        std::thread::sleep(Duration::from_millis(10));
        if node.counters()[Reason::PassNew as usize] > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: the added rule is not enforced {RELOAD_BOUND:?} after the change and the start-up"
        );
    }
    eprintln!("  applied {:?} after the change", changed_at.elapsed());
    node.expect_verdicts(vec![syn_to(&web, OPEN, 46999)], &[(Reason::PassNew, 1)]);
    let (_, metrics) = node.http_get("/metrics").expect("the agent's metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"enforcer_reloads_total{result="rejected"} 0"#),
        "{case}: a reload was rejected"
    );
    agent.stop();
    let seen = seen.lock().expect("the observer's record");
    assert_eq!(seen.stages, STAGES, "{case}: the stages of the start-up");
    for (at, unnamed) in &seen.unnamed {
        assert!(
            unnamed.is_empty(),
            "{case}: at {at:?}, `enforcer status` names no pod for VLANs {unnamed:?}"
        );
    }
}

/// A live view of `state` as the sources would publish it: the pods and the policy
/// from Kubernetes, the groups from EC2, the node's identity from IMDS.
fn live_hub(node: &Node, state: &TestState) -> Arc<Hub> {
    let settings = NodeSettings {
        trunk_interface: Some(node.trunk.clone()),
        primary_interface: Some("eth0".to_string()),
        enforcing_mode: Some(state.mode.to_string()),
        spec: serde_json::Map::new(),
    };
    let hub = Hub::new("node-1".to_string(), settings);
    let files: std::collections::BTreeMap<_, _> = node.state_files(state).into_iter().collect();
    hub.publish(names::PODS, documents("pods.json", &files["pods.json"]));
    hub.publish(names::SERVICE_ACCOUNTS, Documents::default());
    hub.publish(names::POLICIES, Documents::default());
    hub.publish_ec2(
        documents("security-groups.json", &files["security-groups.json"]),
        ec2_node(),
    );
    hub.publish_identity(Identity {
        instance_id: "i-0test".to_string(),
        region: "eu-west-1".to_string(),
        mac: "0a:00:00:00:00:01".to_string(),
        primary_ips: vec!["10.0.1.10".parse().expect("an address")],
        security_groups: vec!["sg-node".to_string()],
        vpc_cidrs: vec!["10.0.0.0/16".to_string()],
    });
    let view = hub.view();
    assert!(view.incomplete.is_empty(), "{:?}", view.incomplete);
    hub
}

fn ec2_node() -> Ec2Node {
    Ec2Node {
        listed: true,
        ..Ec2Node::default()
    }
}

fn documents(name: &str, text: &str) -> Documents {
    let mut documents = Documents::default();
    documents.insert(name, text);
    documents
}
