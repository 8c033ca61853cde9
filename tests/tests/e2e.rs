//! End to end on the virtual Nitro node (`enforcer_tests::testbed`): real TCP connections,
//! UDP requests and pings between network namespaces, through `enforcer run` on a trunk that
//! carries each branch pod's frames tagged with its VLAN, for the bundled example state.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use enforcer::kernel::ebpf::{TC_EGRESS, TC_INGRESS};
use enforcer::kernel::xdp::XDP_INGRESS;
use enforcer::model::EnforcingMode::{self, Standard, Strict};
use enforcer_common::Reason;
use enforcer_tests::require_root;
use enforcer_tests::testbed::datapath::TrunkDirection;
use enforcer_tests::testbed::matrix::{self, Matrix};
use enforcer_tests::testbed::scenario::{
    self, Endpoint, Expect, Flow, example, example_flows, example_state,
};
use enforcer_tests::testbed::traffic::{Outcome, Probe};
use enforcer_tests::testbed::{
    NAME_PREFIX, NodeSpec, Observation, VirtualNode, cleanup_leftovers, remains_of,
};

/// The bundled example on a virtual node in `mode`, its agent running.
fn example_node(mode: EnforcingMode) -> VirtualNode {
    require_root();
    let spec = NodeSpec {
        state: example_state(),
        mode,
        vpc_peers: scenario::vpc_peers(&example_flows()),
        enforcer: None,
    };
    let mut node = VirtualNode::build(&spec).expect("build the virtual node");
    node.start_agent().expect("start `enforcer run`");
    node
}

/// The example flow from `from` to `to` with `probe`.
fn example_flow(from: &Endpoint, to: &Endpoint, probe: Probe) -> Flow {
    example_flows()
        .into_iter()
        .find(|f| &f.from == from && &f.to == to && f.probe == probe)
        .unwrap_or_else(|| panic!("no example flow {from} -> {to} {probe}"))
}

fn probe(node: &mut VirtualNode, flow: &Flow) -> Observation {
    node.serve(flow).expect("start the flow's server");
    node.probe(flow).expect("probe")
}

fn assert_completed(observation: &Observation, flow: &Flow) {
    assert!(
        matches!(observation.outcome, Outcome::Completed { .. }),
        "{flow}: {observation:?}"
    );
}

fn assert_dropped_by_the_enforcer(observation: &Observation, flow: &Flow) {
    assert_eq!(observation.outcome, Outcome::TimedOut, "{flow}");
    assert!(
        observation.policy_drops() > 0,
        "{flow} timed out but the enforcer counted no policy drop: {observation:?}"
    );
}

fn assert_as_expected(matrix: &Matrix) {
    let failures: Vec<String> = matrix.mismatches().map(matrix::render_row).collect();
    assert!(
        failures.is_empty(),
        "{}\n{}",
        matrix::render_summary(matrix),
        failures.concat()
    );
}

fn drive_example(mode: EnforcingMode) {
    let mut node = example_node(mode);
    let matrix = matrix::drive(&mut node, &example_flows(), None, &|| false, |_| {})
        .expect("drive the example flows");
    assert_as_expected(&matrix);
    assert!(!matrix.rows.is_empty(), "nothing was judged");
    node.teardown().expect("tear down");
}

/// Strict mode: only the pods' groups, every packet through the trunk, including pod to
/// pod and node to pod (kubelet probes need a rule); references to groups resolve to their
/// members (RDS, the node, web pods elsewhere); IPv4 and IPv6; DNS and the never-filtered.
#[test]
fn strict_mode_example_flows() {
    drive_example(Strict);
}

/// Standard mode: the node's groups too for traffic leaving the node, none on it.
#[test]
fn standard_mode_example_flows() {
    drive_example(Standard);
}

#[test]
fn branch_frames_cross_the_trunk_tagged_with_their_vlan() {
    let mut node = example_node(Strict);
    let flow = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    let frames = |node: &VirtualNode, direction, vlan| {
        node.trunk_frames(direction, vlan)
            .expect("read the trunk witness")
    };
    let egress = frames(&node, TrunkDirection::Egress, example::WEB_VLAN);
    let ingress = frames(&node, TrunkDirection::Ingress, example::WEB_VLAN);
    let untagged_out = frames(&node, TrunkDirection::Egress, 0);
    assert_completed(&probe(&mut node, &flow), &flow);
    let egress_after = frames(&node, TrunkDirection::Egress, example::WEB_VLAN);
    let ingress_after = frames(&node, TrunkDirection::Ingress, example::WEB_VLAN);
    // Handshake, request and close at least, each way, all seen by the enforcer tagged.
    assert!(
        egress_after.tagged() >= egress.tagged() + 3,
        "{egress:?} -> {egress_after:?}"
    );
    assert!(
        ingress_after.tagged() >= ingress.tagged() + 3,
        "{ingress:?} -> {ingress_after:?}"
    );
    assert_eq!(
        frames(&node, TrunkDirection::Egress, 0),
        untagged_out,
        "untagged frames left on the trunk"
    );
    eprintln!("web's frames on the trunk: egress {egress_after:?}, ingress {ingress_after:?}");
}

/// Tagged frames the trunk carried while `flow` ran: (egress, ingress) for each of `vlans`.
fn trunk_crossings(node: &mut VirtualNode, flow: &Flow, vlans: &[u16]) -> Vec<(u64, u64)> {
    let count = |node: &VirtualNode| -> Vec<(u64, u64)> {
        vlans
            .iter()
            .map(|&vlan| {
                let tagged = |direction| {
                    node.trunk_frames(direction, vlan)
                        .expect("read the trunk witness")
                        .tagged()
                };
                (
                    tagged(TrunkDirection::Egress),
                    tagged(TrunkDirection::Ingress),
                )
            })
            .collect()
    };
    let before = count(node);
    assert_completed(&probe(node, flow), flow);
    let after = count(node);
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 - b.0, a.1 - b.1))
        .collect()
}

/// Strict mode: pod to pod and node to pod leave through the trunk and come back in on it,
/// so that both ends' groups are checked, each at its own VLAN.
#[test]
fn strict_mode_hairpins_same_node_traffic_through_the_trunk() {
    let mut node = example_node(Strict);
    let vlans = [example::WEB_VLAN, example::ORDERS_VLAN];
    let pod_to_pod = example_flow(&example::web(), &example::orders(), Probe::Tcp(8080));
    let [web, orders] = trunk_crossings(&mut node, &pod_to_pod, &vlans)[..] else {
        unreachable!("two VLANs")
    };
    assert!(web.0 >= 3 && web.1 >= 3, "web's VLAN carried {web:?}");
    assert!(
        orders.0 >= 3 && orders.1 >= 3,
        "orders' VLAN carried {orders:?}"
    );
    let kubelet = example_flow(&Endpoint::Node, &example::web(), Probe::Tcp(8080));
    let [web, orders] = trunk_crossings(&mut node, &kubelet, &vlans)[..] else {
        unreachable!("two VLANs")
    };
    assert!(web.0 >= 3 && web.1 >= 3, "web's VLAN carried {web:?}");
    assert_eq!(orders, (0, 0));
}

/// Standard mode: traffic between a pod and its node, or two pods of the node, stays on it.
#[test]
fn standard_mode_keeps_same_node_traffic_off_the_trunk() {
    let mut node = example_node(Standard);
    let vlans = [example::WEB_VLAN, example::ORDERS_VLAN];
    for flow in [
        example_flow(&example::web(), &example::orders(), Probe::Tcp(8080)),
        example_flow(&Endpoint::Node, &example::web(), Probe::Tcp(9090)),
    ] {
        let crossings = trunk_crossings(&mut node, &flow, &vlans);
        assert_eq!(crossings, [(0, 0), (0, 0)], "{flow} crossed the trunk");
    }
}

#[test]
fn replies_pass_through_conntrack() {
    let mut node = example_node(Strict);
    // No ingress rule of web's allows RDS: its replies pass as part of web's flow.
    let flow = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    let observation = probe(&mut node, &flow);
    assert_completed(&observation, &flow);
    let count = |reason| {
        observation
            .reasons
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(count(Reason::PassNew), 1, "{observation:?}");
    assert!(count(Reason::PassEstablished) >= 4, "{observation:?}");
    // The same addresses and port the other way are a new flow, and denied.
    let reverse = example_flow(&example::rds(), &example::web(), Probe::Tcp(5432));
    assert_dropped_by_the_enforcer(&probe(&mut node, &reverse), &reverse);
}

/// What the trunk receives is screened at XDP: a denied flow's frames are dropped there, before
/// the kernel builds a packet (TC ingress never runs for them), and what XDP passes is judged
/// and counted by TC alone.
#[test]
fn xdp_drops_a_denied_flow_before_tc_and_each_frame_counts_once() {
    let mut node = example_node(Strict);
    // Run counts are kept while this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run statistics");
    let runs = |node: &VirtualNode| {
        let count = |name| {
            let pin = enforcer::kernel::bpffs::program_pin(node.pin_path(), name);
            aya::programs::ProgramInfo::from_pin(&pin)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", pin.display(), node.agent_output()))
                .run_count()
        };
        (count(XDP_INGRESS), count(TC_INGRESS), count(TC_EGRESS))
    };
    let denied = example_flow(&example::rds(), &example::web(), Probe::Tcp(5432));
    let before = runs(&node);
    let observation = probe(&mut node, &denied);
    assert_dropped_by_the_enforcer(&observation, &denied);
    let after = runs(&node);
    let (xdp, tc) = (after.0 - before.0, after.1 - before.1);
    let drops: u64 = observation
        .reasons
        .iter()
        .filter(|(reason, _)| reason.is_drop())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        xdp - tc,
        drops,
        "every drop at XDP: XDP ran {xdp} times, TC ingress {tc}, {observation:?}"
    );

    // An allowed flow: XDP passes its replies on, and TC judges and counts each once
    // (XDP counting them too would add a second reason per frame).
    let allowed = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    let before = runs(&node);
    let observation = probe(&mut node, &allowed);
    assert_completed(&observation, &allowed);
    let after = runs(&node);
    let (xdp, tc, egress) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert_eq!(
        xdp, tc,
        "XDP passed every frame of the allowed flow on to TC"
    );
    let counted: u64 = observation.reasons.iter().map(|(_, n)| n).sum();
    assert_eq!(
        counted,
        tc + egress,
        "one reason per frame: TC ingress ran {tc} times, TC egress {egress}, {observation:?}"
    );
}

/// Writes `security-groups.json` of `state` as `edit` changes it; atomically, for an agent
/// that may be watching the directory.
fn edit_groups(state: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = state.join("security-groups.json");
    let text = std::fs::read_to_string(&path).expect("read the groups");
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("JSON groups");
    edit(&mut doc);
    let staged = state.join("security-groups.json.new");
    std::fs::write(&staged, serde_json::to_string_pretty(&doc).expect("JSON"))
        .expect("write the groups");
    std::fs::rename(&staged, &path).expect("replace the groups");
}

fn group<'a>(doc: &'a mut serde_json::Value, id: &str) -> &'a mut serde_json::Value {
    doc["SecurityGroups"]
        .as_array_mut()
        .expect("SecurityGroups")
        .iter_mut()
        .find(|g| g["GroupId"] == id)
        .unwrap_or_else(|| panic!("group {id}"))
}

#[test]
fn a_policy_change_keeps_tracked_connections_and_judges_new_ones() {
    let mut node = example_node(Strict);
    let to_rds = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    let probe_9090 = example_flow(&Endpoint::Node, &example::web(), Probe::Tcp(9090));
    node.serve(&to_rds).expect("serve");
    node.serve(&probe_9090).expect("serve");
    let mut session = node.open_session(&to_rds).expect("connect web to RDS");
    session.exchange("before the change").expect("exchange");

    // The web group loses its egress rule to the database and opens 9090 to the node group.
    edit_groups(node.state_dir(), |doc| {
        let web = group(doc, "sg-0web00000000000001");
        web["IpPermissionsEgress"]
            .as_array_mut()
            .expect("egress rules")
            .retain(|r| r["FromPort"] != 5432);
        web["IpPermissions"]
            .as_array_mut()
            .expect("ingress rules")
            .push(serde_json::json!({
                "IpProtocol": "tcp", "FromPort": 9090, "ToPort": 9090,
                "IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [],
                "UserIdGroupPairs": [{"GroupId": "sg-0node0000000000001"}]
            }));
    });
    node.stop_agent().expect("stop the agent");
    node.start_agent()
        .expect("restart the agent on the new state");

    session
        .exchange("after the change")
        .expect("the tracked connection survives the change");
    assert_dropped_by_the_enforcer(&probe(&mut node, &to_rds), &to_rds);
    assert_completed(&probe(&mut node, &probe_9090), &probe_9090);
    session.close().expect("close the tracked connection");
    node.teardown().expect("tear down");
}

/// Audit: web, audited by its `enforcer.sgp.dev/action` annotation, accepts the internet's
/// HTTP that its groups refuse (a real connection completes), the enforcer counts the
/// frames as would-drops under `drop_policy` (never as drops) and `enforcer flows`
/// reports "would drop"; orders, not audited, still drops what its groups refuse.
#[test]
fn an_audited_pods_denied_flow_connects_and_is_reported_as_would_drop() {
    let mut node = example_node(Strict);
    let denied = example_flow(&example::internet(), &example::web(), Probe::Tcp(80));
    let orders_denied = example_flow(&example::orders(), &example::web(), Probe::Tcp(443));
    for flow in [&denied, &orders_denied] {
        node.serve(flow).expect("serve");
    }

    node.stop_agent().expect("stop the agent");
    let pods = node.state_dir().join("pods.yaml");
    let text = std::fs::read_to_string(&pods).expect("read the pods");
    let web_eni = "      vpc.amazonaws.com/pod-eni: '[{\"eniId\":\"eni-0b7c1d2e3f4a50001\"";
    assert_eq!(text.matches(web_eni).count(), 1, "web's annotation");
    let annotated = text.replace(
        web_eni,
        &format!("      enforcer.sgp.dev/action: audit\n{web_eni}"),
    );
    std::fs::write(&pods, annotated).expect("annotate web");
    // A pod audits itself only where the node lets its namespace.
    let config = node.state_dir().join("node-config.yaml");
    let text = std::fs::read_to_string(&config).expect("read the NodeConfig");
    assert_eq!(text.matches("auditNamespaces: []").count(), 1, "{text}");
    let allowed = text.replace("auditNamespaces: []", "auditNamespaces: [shop]");
    std::fs::write(&config, allowed).expect("let shop audit");
    node.start_agent()
        .expect("restart the agent on the audited state");

    let pin = node
        .pin_path()
        .to_str()
        .expect("UTF-8 pin path")
        .to_string();
    let mut flows = node
        .enforcer_command(&["flows", "--pin-path", &pin, "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run enforcer flows");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        flows.stdout.take().expect("piped stdout"),
    ));
    let (sender, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let observation = probe(&mut node, &denied);
    assert_completed(&observation, &denied);
    assert_eq!(observation.policy_drops(), 0, "{observation:?}");
    let would_drops: u64 = observation
        .would_drops
        .iter()
        .filter(|(r, _)| *r == Reason::DropPolicy)
        .map(|(_, n)| n)
        .sum();
    assert!(
        would_drops >= 3,
        "handshake and data, each way: {observation:?}"
    );
    // The ring buffer may hold other events (earlier runs, the pods' own multicast).
    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        let line = events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a would-drop event of the flow from `enforcer flows`");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if event["protocol"] == 6 && event["dst_port"] == 80 {
            break event;
        }
    };
    flows.kill().expect("stop flows");
    flows.wait().expect("reap flows");
    assert_eq!(
        (&event["verdict"], &event["reason"], &event["pod"]),
        (
            &serde_json::json!("would drop"),
            &serde_json::json!("drop_policy"),
            &serde_json::json!("shop/web-6f7c9d8b5-x2x7q")
        ),
        "{event}"
    );
    let status = node
        .enforcer_command(&["status", "--pin-path", &pin, "--json"])
        .output()
        .expect("run enforcer status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let web = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["vlan"] == example::WEB_VLAN)
        .expect("web in status")
        .clone();
    assert_eq!(web["action"], "audit", "{web}");
    assert!(
        web["would_drop_packets"].as_u64() >= Some(would_drops),
        "{web}"
    );
    assert!(status["would_drop"]["drop_policy"].as_u64() >= Some(would_drops));
    // Audit is per pod: orders' egress to web:443 is still refused by orders' groups.
    assert_dropped_by_the_enforcer(&probe(&mut node, &orders_denied), &orders_denied);
    node.teardown().expect("tear down");
}

/// The intended behaviour: the programs stay attached through pinned links when the agent
/// dies, with the last state it applied.
#[test]
fn killing_the_agent_leaves_enforcement_in_place() {
    let mut node = example_node(Strict);
    let to_rds = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    let denied = example_flow(&example::internet(), &example::web(), Probe::Tcp(80));
    let allowed = example_flow(&example::alb(), &example::web(), Probe::Tcp(80));
    for flow in [&to_rds, &denied, &allowed] {
        node.serve(flow).expect("serve");
    }
    let mut session = node.open_session(&to_rds).expect("connect web to RDS");
    session.exchange("while the agent runs").expect("exchange");

    node.kill_agent().expect("kill the agent");

    session
        .exchange("after the agent died")
        .expect("an open connection keeps working");
    let programs = node.enforcer_programs().expect("list the trunk's programs");
    assert!(
        programs.iter().all(Option::is_some),
        "the enforcer's programs left the trunk with the agent: {programs:?}"
    );
    assert_dropped_by_the_enforcer(&node.probe(&denied).expect("probe"), &denied);
    assert_completed(&node.probe(&allowed).expect("probe"), &allowed);
    session.close().expect("close");
    node.teardown().expect("tear down");
}

/// The node's primary IP in the example state: what a translated flow's peer sees.
const NODE_IP: &str = "10.0.1.10";
/// web's address: what an untranslated flow's peer sees.
const WEB_IP: &str = "10.0.1.101";

/// The example in standard mode, web's group also allowing UDP 53 and ICMP echo to the
/// partner API (the node's group allows all egress: every probe is allowed by both sets),
/// `settings` merged into the NodeConfig's spec; its agent running.
fn nat_node(settings: serde_json::Value) -> VirtualNode {
    nat_node_with(settings, None)
}

/// [`nat_node`], the node's group allowing only `node_egress` (EC2 rules) if given.
fn nat_node_with(
    settings: serde_json::Value,
    node_egress: Option<serde_json::Value>,
) -> VirtualNode {
    require_root();
    let spec = NodeSpec {
        state: example_state(),
        mode: Standard,
        vpc_peers: scenario::vpc_peers(&example_flows()),
        enforcer: None,
    };
    let mut node = VirtualNode::build(&spec).expect("build the virtual node");
    let config = node.state_dir().join("node-config.yaml");
    let mut doc: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&config).expect("read")).expect("YAML");
    for (key, value) in settings.as_object().expect("settings") {
        doc["spec"][key] = value.clone();
    }
    std::fs::write(&config, serde_yaml::to_string(&doc).expect("YAML")).expect("write");
    let groups = node.state_dir().join("security-groups.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&groups).expect("read")).expect("JSON");
    if let Some(rules) = node_egress {
        group(&mut doc, "sg-0node0000000000001")["IpPermissionsEgress"] = rules;
    }
    let web = group(&mut doc, "sg-0web00000000000001");
    let partner = serde_json::json!([{ "CidrIp": format!("{}/32", example::PARTNER_API) }]);
    for (protocol, from, to) in [("udp", 53, 53), ("icmp", 8, -1)] {
        web["IpPermissionsEgress"]
            .as_array_mut()
            .expect("egress rules")
            .push(serde_json::json!({
                "IpProtocol": protocol, "FromPort": from, "ToPort": to, "IpRanges": partner,
                "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []
            }));
    }
    std::fs::write(&groups, doc.to_string()).expect("write");
    node.start_agent().expect("start `enforcer run`");
    node
}

/// web to the partner API with `probe`, allowed by both sets in [`nat_node`].
fn to_partner(probe: Probe) -> Flow {
    Flow {
        from: example::web(),
        to: example::partner_api(),
        probe,
        story: "web to the partner API".into(),
        strict: Expect::Allow,
        standard: Expect::Allow,
    }
}

/// What web's frames leaving and arriving on the trunk were while `probe` ran.
fn across_the_trunk(node: &mut VirtualNode, flow: &Flow) -> (Observation, u64, u64) {
    let frames = |node: &VirtualNode, direction| {
        node.trunk_frames(direction, example::WEB_VLAN)
            .expect("witness")
            .tagged()
    };
    let before = (
        frames(node, TrunkDirection::Egress),
        frames(node, TrunkDirection::Ingress),
    );
    let observation = probe(node, flow);
    (
        observation,
        frames(node, TrunkDirection::Egress) - before.0,
        frames(node, TrunkDirection::Ingress) - before.1,
    )
}

/// Whether the enforcer counted a frame for `reason` while the probe ran.
fn counted(observation: &Observation, reason: Reason) -> bool {
    observation.reasons.iter().any(|(r, _)| *r == reason)
}

fn seen_as(observation: &Observation) -> Option<IpAddr> {
    match observation.outcome {
        Outcome::Completed { seen_as } => seen_as,
        _ => None,
    }
}

/// Standard mode source-NATs what leaves the VPC (sg-semantics.md §6): the partner sees
/// the node's primary IP, the pod's frames leave by the primary interface (none by the
/// trunk), and replies, pings' included, come back to the pod through the trunk as
/// replies of a tracked flow. Real sockets at both ends check every checksum.
#[test]
fn standard_mode_source_nats_off_vpc_egress_to_the_node_address() {
    let mut node = nat_node(serde_json::json!({}));
    let node_ip: IpAddr = NODE_IP.parse().expect("address");
    for probe in [Probe::Tcp(443), Probe::Udp(53), Probe::Ping] {
        let flow = to_partner(probe);
        let (observation, out, back) = across_the_trunk(&mut node, &flow);
        assert_completed(&observation, &flow);
        if probe != Probe::Ping {
            assert_eq!(seen_as(&observation), Some(node_ip), "{flow}");
        }
        assert_eq!(out, 0, "{flow}: the pod's frames left by the trunk");
        assert!(back > 0, "{flow}: no reply came back through the trunk");
        assert!(
            counted(&observation, Reason::PassEstablished),
            "{flow}: replies are a tracked flow's: {observation:?}"
        );
    }
    let maps = enforcer::kernel::maps::KernelMaps::open_pinned(node.pin_path()).expect("maps");
    let mappings = maps.nat_mappings().expect("NAT_PORTS");
    let protocols: Vec<u8> = mappings.keys().map(|k| k.protocol).collect();
    assert_eq!(protocols.len(), 3, "one mapping per flow: {mappings:?}");
    for (key, target) in &mappings {
        assert!((61000..=65535).contains(&key.nat_port), "{key:?}");
        let entry = maps
            .flow(&target.flow)
            .expect("conntrack")
            .expect("its flow");
        assert_eq!(
            entry.nat_port, key.nat_port,
            "the flow's entry holds its port"
        );
    }
    node.teardown().expect("tear down");
}

/// A flow web's group allows and the node's group refuses is dropped as the node's
/// groups' (`drop_primary_policy`), before any translation: no port is taken.
#[test]
fn flows_the_node_groups_refuse_are_dropped_untranslated() {
    let tcp_only = serde_json::json!([{
        "IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
        "IpRanges": [{ "CidrIp": "0.0.0.0/0" }],
        "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []
    }]);
    let mut node = nat_node_with(serde_json::json!({}), Some(tcp_only));
    for kind in [Probe::Udp(53), Probe::Ping] {
        let flow = to_partner(kind);
        let observation = probe(&mut node, &flow);
        assert_eq!(observation.outcome, Outcome::TimedOut, "{flow}");
        assert!(
            counted(&observation, Reason::DropPrimaryPolicy),
            "{flow}: {observation:?}"
        );
    }
    let allowed = to_partner(Probe::Tcp(443));
    assert_completed(&probe(&mut node, &allowed), &allowed);
    let maps = enforcer::kernel::maps::KernelMaps::open_pinned(node.pin_path()).expect("maps");
    let mappings = maps.nat_mappings().expect("NAT_PORTS");
    assert_eq!(
        mappings.keys().map(|k| k.protocol).collect::<Vec<_>>(),
        [6],
        "only the allowed flow holds a port"
    );
    node.teardown().expect("tear down");
}

/// `externalSnat: true` (something else translates) and a destination in
/// `excludeSnatCidrs`: the flow leaves by the trunk with the pod's own address.
#[test]
fn external_snat_and_excluded_cidrs_leave_untranslated() {
    let web_ip: IpAddr = WEB_IP.parse().expect("address");
    for settings in [
        serde_json::json!({ "externalSnat": true }),
        serde_json::json!({ "excludeSnatCidrs": ["203.0.113.0/24"] }),
    ] {
        let mut node = nat_node(settings.clone());
        for probe in [Probe::Tcp(443), Probe::Udp(53)] {
            let flow = to_partner(probe);
            let (observation, out, _) = across_the_trunk(&mut node, &flow);
            assert_completed(&observation, &flow);
            assert_eq!(seen_as(&observation), Some(web_ip), "{settings}: {flow}");
            assert!(out > 0, "{settings}: {flow} did not leave by the trunk");
        }
        node.teardown().expect("tear down");
    }
}

/// A port range of one port: a second connection to the same peer and port finds no free
/// port while the first holds it, and is dropped for that reason; the first goes on.
#[test]
fn an_exhausted_port_range_drops_new_flows_and_keeps_live_ones() {
    let mut node = nat_node(serde_json::json!({ "snatPortRange": "61000-61000" }));
    let flow = to_partner(Probe::Tcp(443));
    node.serve(&flow).expect("serve");
    let mut session = node.open_session(&flow).expect("the first connection");
    let node_ip: IpAddr = NODE_IP.parse().expect("address");
    assert_eq!(session.exchange("first").expect("exchange"), node_ip);
    let second = node.probe(&flow).expect("probe");
    assert_eq!(second.outcome, Outcome::TimedOut, "{second:?}");
    assert!(counted(&second, Reason::DropNatExhausted), "{second:?}");
    assert_eq!(
        session
            .exchange("still there")
            .expect("the first connection lives"),
        node_ip
    );
    session.close().expect("close");
    node.teardown().expect("tear down");
}

#[test]
fn teardown_leaves_nothing_behind() {
    let mut node = example_node(Strict);
    let flow = example_flow(&example::web(), &example::rds(), Probe::Tcp(5432));
    node.serve(&flow).expect("serve");
    let session = node.open_session(&flow).expect("connect");
    let run = node.run_name().to_string();
    assert!(!remains_of(&run).expect("look").is_empty());
    // Dropped with a connection open and the agent running, as a failing test would.
    drop(node);
    drop(session);
    assert_eq!(remains_of(&run).expect("look"), Vec::<String>::new());
}

#[test]
fn leftovers_of_a_crashed_run_are_cleaned_up_by_prefix() {
    require_root();
    let prefix = format!("{NAME_PREFIX}leftover-{}-", std::process::id());
    let name = format!("{prefix}node");
    let added = Command::new("ip").args(["netns", "add", &name]).status();
    assert!(added.expect("ip netns add").success());
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "600"])
        .spawn()
        .expect("a process inside");
    wait_inside(sleeper.id(), &name);
    let pins = Path::new("/sys/fs/bpf").join(format!("{prefix}pins"));
    std::fs::create_dir_all(pins.join("maps")).expect("pin directory");
    let work = std::env::temp_dir().join(format!("{prefix}work"));
    std::fs::create_dir_all(work.join("state")).expect("work directory");

    let removed = cleanup_leftovers(&prefix).expect("clean up");
    assert_eq!(removed.namespaces, vec![name]);
    assert_eq!(removed.directories.len(), 2, "{removed:?}");
    assert!(!pins.exists() && !work.exists());
    let status = sleeper.wait().expect("reap");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(cleanup_leftovers(&prefix).expect("again").is_empty());
}

/// Waits until process `pid` has entered the named network namespace.
fn wait_inside(pid: u32, name: &str) {
    let inode = std::fs::metadata(Path::new("/run/netns").join(name))
        .expect("the namespace")
        .ino();
    let inside = format!("net:[{inode}]");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .is_ok_and(|link| link.to_string_lossy() != inside)
    {
        assert!(Instant::now() < deadline, "{pid} never entered {name}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
