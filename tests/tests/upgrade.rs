//! Agent hardening as real `enforcer` processes on a veth trunk: an upgrade over
//! pinned maps of another layout, and a pod replaced on its VLAN, never leave a
//! pod unenforced nor let it inherit what the pod before it left.

#[path = "agent_support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use aya::maps::MapInfo;
use enforcer::kernel::maps::KernelMaps;
use enforcer_common::{PodEntry, PodTraffic, Reason, map_names};
use support::{
    Node, TestPod, TestState, ack_to, maps_of_attached_program, pin_conntrack_of_an_older_layout,
    pin_pods_map_of_an_older_layout, pinned_map, syn_to, wait_for,
};

const OPEN: u16 = 80;
const CLOSED: u16 = 81;

fn web() -> TestPod {
    TestPod::new("web", "uid-web-1", 10, [10, 0, 1, 50])
}

fn state(pods: Vec<TestPod>) -> TestState {
    TestState {
        mode: "strict",
        open_port: OPEN,
        pods,
    }
}

fn maps(node: &Node) -> KernelMaps {
    KernelMaps::open_pinned(&node.pin_path).expect("open the pinned maps")
}

fn flows_of(node: &Node, vlan: u16) -> usize {
    maps(node)
        .flows()
        .expect("read CONNTRACK")
        .iter()
        .filter(|(key, _)| key.vlan == vlan)
        .count()
}

#[test]
fn an_upgrade_over_a_pods_map_of_another_layout_migrates_it_without_a_moment_unenforced() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state(vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 47000)], &[(Reason::PassNew, 1)]);
    node.stop_agent(0);
    let conntrack = pinned_map(&node, map_names::CONNTRACK).id();
    let older_pods = pin_pods_map_of_an_older_layout(&node);
    // A map of the older build that this one no longer has (its port map).
    let dropped = enforcer::kernel::bpffs::map_pin(&node.pin_path, "PORTS");
    support::create_pinned_map(
        &dropped,
        &[
            "type", "hash", "key", "8", "value", "8", "entries", "16", "name", "PORTS", "flags",
            "1",
        ],
    );
    let dropped = MapInfo::from_pin(&dropped).expect("the PORTS pin").id();

    // Userspace never reads a map of another layout as its own: a clear error.
    let pin_path = node.pin_path.to_str().expect("utf-8").to_string();
    let status = Command::new(support::enforcer_binary())
        .args(["status", "--pin-path", &pin_path])
        .output()
        .expect("run enforcer status");
    let error = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && error.contains(map_names::PODS) && error.contains("size"),
        "status over a PODS map of another layout: {error}"
    );

    // Denied frames keep arriving while the new build starts: every one is judged.
    node.start_agent_under_denied_traffic(syn_to(&web, CLOSED, 47001));

    // The pins name the maps the new programs use: PODS migrated, CONNTRACK kept.
    let pods = pinned_map(&node, map_names::PODS);
    assert_eq!(pods.value_size() as usize, size_of::<PodEntry>());
    assert_ne!(pods.id(), older_pods, "the older PODS pin is replaced");
    assert_eq!(pinned_map(&node, map_names::CONNTRACK).id(), conntrack);
    let used = maps_of_attached_program(&node);
    assert!(used.contains(&pods.id()) && used.contains(&conntrack));
    wait_for("the older PODS map freed", Duration::from_secs(5), || {
        MapInfo::from_id(older_pods).is_err()
    });
    wait_for(
        "the older build's PORTS map freed",
        Duration::from_secs(5),
        || MapInfo::from_id(dropped).is_err(),
    );
    let pinned: BTreeSet<String> = std::fs::read_dir(node.pin_path.join("maps"))
        .expect("maps dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = map_names::ALL.iter().map(|n| n.to_string()).collect();
    assert_eq!(pinned, expected, "no staging pin nor unknown map is left");

    // Enforcing: the flow tracked before the upgrade survives, the rules hold.
    assert!(maps(&node).pods().expect("PODS").contains_key(&web.vlan));
    node.expect_verdicts(
        vec![ack_to(&web, OPEN, 47000)],
        &[(Reason::PassEstablished, 1)],
    );
    node.expect_verdicts(vec![syn_to(&web, OPEN, 47002)], &[(Reason::PassNew, 1)]);
    let status = node.enforcer(&["status", "--pin-path", &pin_path]);
    assert!(status.contains("web"), "{status}");

    // A restart of the same build reuses every map.
    let ids: Vec<u32> = map_names::ALL
        .iter()
        .map(|name| pinned_map(&node, name).id())
        .collect();
    node.stop_agent(1);
    node.start_agent();
    node.wait_ready();
    let again: Vec<u32> = map_names::ALL
        .iter()
        .map(|name| pinned_map(&node, name).id())
        .collect();
    assert_eq!(again, ids, "a restart of the same build migrates nothing");
}

#[test]
fn an_upgrade_over_a_conntrack_of_another_capacity_and_flags_keeps_the_tracked_flows() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state(vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 49000)], &[(Reason::PassNew, 1)]);
    node.stop_agent(0);
    let tracked = maps(&node).flows().expect("read CONNTRACK");
    assert_eq!(tracked.len(), 1);
    let counted = maps(&node).tracked(web.vlan);
    let older = pin_conntrack_of_an_older_layout(&node, &tracked);

    node.start_agent_under_denied_traffic(syn_to(&web, CLOSED, 49001));

    // The new table replaced the older one, with the older one's flows in it.
    let conntrack = pinned_map(&node, map_names::CONNTRACK);
    assert_ne!(conntrack.id(), older, "the older CONNTRACK pin is replaced");
    assert!(maps_of_attached_program(&node).contains(&conntrack.id()));
    let carried: Vec<_> = maps(&node).flows().expect("read CONNTRACK");
    assert_eq!(carried, tracked, "the tracked flow is carried as it was");
    assert_eq!(
        maps(&node).tracked(web.vlan),
        counted,
        "the pod's count still counts its entries"
    );
    node.expect_verdicts(
        vec![ack_to(&web, OPEN, 49000)],
        &[(Reason::PassEstablished, 1)],
    );
}

#[test]
fn a_pod_replaced_on_its_vlan_loses_the_old_pods_flows_and_counters() {
    let mut node = Node::new();
    let web = web();
    node.write_state(&state(vec![web.clone()]));
    node.start_agent();
    node.wait_ready();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 48000)], &[(Reason::PassNew, 1)]);
    assert_eq!(flows_of(&node, web.vlan), 1);
    assert_ne!(
        maps(&node).pod_traffic(web.vlan).expect("POD_TRAFFIC"),
        PodTraffic::default()
    );

    // web deleted and created again between two reloads: same name and VLAN, new UID.
    let replaced = TestPod::new("web", "uid-web-2", web.vlan, [10, 0, 1, 60]);
    node.write_state(&state(vec![replaced.clone()]));
    wait_for("the replacement in PODS", Duration::from_secs(2), || {
        maps(&node).pods().expect("PODS")[&web.vlan].ipv4 == replaced.ip
    });
    assert_eq!(flows_of(&node, web.vlan), 0, "the old pod's flows are gone");
    assert_eq!(
        maps(&node).pod_traffic(web.vlan).expect("POD_TRAFFIC"),
        PodTraffic::default(),
        "the new pod's counters start at zero"
    );
    node.expect_verdicts(
        vec![syn_to(&replaced, OPEN, 48001)],
        &[(Reason::PassNew, 1)],
    );
    assert_eq!(
        maps(&node)
            .pod_traffic(web.vlan)
            .expect("POD_TRAFFIC")
            .allowed_packets,
        1
    );

    // Replaced again while no agent runs: the next one tells it from the pinned entry.
    node.stop_agent(0);
    let again = TestPod::new("web", "uid-web-3", web.vlan, [10, 0, 1, 60]);
    node.write_state(&state(vec![again]));
    node.start_agent();
    node.wait_ready();
    assert_eq!(flows_of(&node, web.vlan), 0, "the old pod's flows are gone");
    assert_eq!(
        maps(&node).pod_traffic(web.vlan).expect("POD_TRAFFIC"),
        PodTraffic::default(),
        "the new pod's counters start at zero"
    );
}
