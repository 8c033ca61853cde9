//! What operators see: `enforcer status` with and without an agent, `enforcer flows`
//! (rules, reasons, pod filter, rate limit) and the agent's metrics endpoint.

#[path = "agent_support/mod.rs"]
mod support;

use std::time::Duration;

use enforcer::kernel::maps::KernelMaps;
use enforcer_common::Reason;
use serde_json::Value;
use support::{Node, TestPod, TestState, stdout_lines, syn_to, wait_for};

const OPEN: u16 = 80;
const CLOSED: u16 = 81;

fn web() -> TestPod {
    TestPod::new("web", "uid-web-1", 10, [10, 0, 1, 50])
}

fn api() -> TestPod {
    TestPod::new("api", "uid-api-1", 11, [10, 0, 1, 51])
}

fn state(open_port: u16) -> TestState {
    TestState {
        mode: "strict",
        open_port,
        pods: vec![web(), api()],
    }
}

fn started() -> Node {
    let mut node = Node::new();
    node.write_state(&state(OPEN));
    node.start_agent();
    node.wait_ready();
    node
}

fn pin(node: &Node) -> String {
    node.pin_path.to_str().expect("utf-8 pin path").to_string()
}

fn status_json(node: &Node) -> Value {
    let out = node.enforcer(&["status", "--pin-path", &pin(node), "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}\n{out}"))
}

fn pod<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["pod"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status:#}"))
}

#[test]
fn status_tells_what_the_kernel_enforces_with_and_without_the_agent() {
    let mut node = started();
    let web = web();
    node.expect_verdicts(
        vec![syn_to(&web, OPEN, 50000), syn_to(&web, CLOSED, 50001)],
        &[(Reason::PassNew, 1), (Reason::DropPolicy, 1)],
    );
    let status = status_json(&node);
    assert_eq!(status["attached"], true, "{status:#}");
    assert_eq!(status["agent_running"], true);
    assert_eq!(status["node"], "node-1");
    assert_eq!(status["enforcing_mode"], "strict");
    assert_eq!(status["trunk"], node.trunk.as_str());
    assert_eq!(status["error"], Value::Null);
    assert!(status["applied_at"].is_u64());
    assert_eq!(status["conntrack_entries"], 1);
    assert_eq!(status["pods"].as_array().expect("pods").len(), 2);
    let entry = pod(&status, "default/web");
    assert_eq!(entry["vlan"], 10);
    assert_eq!(entry["ipv4"], "10.0.1.50");
    assert_eq!(entry["mode"], "strict");
    assert_eq!(entry["groups"], serde_json::json!(["sg-app"]));
    assert_eq!(entry["ingress_rules"], 1);
    assert_eq!(entry["egress_rules"], 1);
    assert_eq!(entry["flows"], 1);
    assert_eq!(entry["tracked_flows"], 1, "the kernel counted the flow");
    assert_eq!(entry["tracked_fragments"], 0);
    assert_eq!(pod(&status, "default/api")["tracked_flows"], 0);
    assert_eq!(
        status["max_flows_per_pod"],
        enforcer_common::DEFAULT_MAX_FLOWS_PER_POD
    );
    assert_eq!(entry["allowed_packets"], 1);
    assert_eq!(entry["denied_packets"], 1);
    assert_eq!(status["verdicts"]["drop_policy"], 1);

    let text = node.enforcer(&["status", "--pin-path", &pin(&node)]);
    for expected in [
        "programs attached",
        "default/web",
        "10.0.1.51",
        "sg-app",
        "conntrack: 1 of",
        "flows 1 (counted 1, fragments 0)",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }

    node.stop_agent(0);
    let status = status_json(&node);
    assert_eq!(status["attached"], true, "still enforced without the agent");
    assert_eq!(status["agent_running"], false);
    assert_eq!(pod(&status, "default/api")["ipv4"], "10.0.1.51");
}

#[test]
fn flows_reports_denies_and_allowed_flows_with_their_rule() {
    let node = started();
    let web = web();
    let maps = || KernelMaps::open_pinned(&node.pin_path).expect("maps");
    let mut flows = node.enforcer_in_netns(&[
        "flows",
        "--pin-path",
        &pin(&node),
        "--json",
        "--allowed",
        "--count",
        "2",
    ]);
    let lines = stdout_lines(&mut flows);
    wait_for(
        "allowed-flow events switched on",
        Duration::from_secs(5),
        || leased(&maps()),
    );
    node.send_to_trunk(vec![syn_to(&web, OPEN, 51000), syn_to(&web, CLOSED, 51001)]);
    let events: Vec<Value> = (0..2)
        .map(|_| {
            let line = lines
                .recv_timeout(Duration::from_secs(5))
                .expect("an event line");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
        })
        .collect();
    let allowed = events
        .iter()
        .find(|e| e["verdict"] == "allow")
        .expect("the allowed flow");
    assert_eq!(allowed["reason"], "pass_new");
    assert_eq!(allowed["rule"], "sg-app ingress #0");
    assert_eq!(allowed["pod"], "default/web");
    assert_eq!(allowed["direction"], "ingress");
    assert_eq!(allowed["src"], "10.0.2.7");
    assert_eq!(allowed["dst"], "10.0.1.50");
    assert_eq!(allowed["src_port"], 51000);
    assert_eq!(allowed["dst_port"], 80);
    assert_eq!(allowed["protocol"], 6);
    let denied = events
        .iter()
        .find(|e| e["verdict"] == "deny")
        .expect("the denied flow");
    assert_eq!(denied["reason"], "drop_policy");
    assert_eq!(denied["rule"], Value::Null);
    assert_eq!(denied["dst_port"], 81);
    let status = flows.wait().expect("flows exits after --count");
    assert!(status.success());
    assert_eq!(
        maps().settings().expect("settings").allowed_events_until_ns,
        0,
        "flows switched allowed events off"
    );

    // The pod filter, and denies without --allowed.
    let mut api_only = node.enforcer_in_netns(&[
        "flows",
        "--pin-path",
        &pin(&node),
        "--pod",
        "default/api",
        "--count",
        "1",
    ]);
    let lines = stdout_lines(&mut api_only);
    std::thread::sleep(Duration::from_millis(300));
    node.send_to_trunk(vec![
        syn_to(&web, CLOSED, 51002),
        syn_to(&web, OPEN, 51003),
        syn_to(&api(), CLOSED, 51004),
    ]);
    let line = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("api's event");
    for expected in [
        "default/api",
        "10.0.2.7:51004 -> 10.0.1.51:81",
        "DENY drop_policy",
    ] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from {line:?}"
        );
    }
    assert!(api_only.wait().expect("flows exits").success());

    // A flood is rate-limited in the kernel: the excess is counted, not sent.
    let flood: Vec<Vec<u8>> = (0..6000).map(|i| syn_to(&web, CLOSED, 1024 + i)).collect();
    node.send_to_trunk(flood);
    wait_for("suppressed events", Duration::from_secs(5), || {
        maps().suppressed_events().expect("budget") > 0
    });
}

/// Whether allowed new flows are events now (the lease of `flows --allowed` runs).
fn leased(maps: &KernelMaps) -> bool {
    let until = maps.settings().expect("settings").allowed_events_until_ns;
    until > enforcer::observe::events::monotonic().as_nanos() as u64
}

#[test]
fn allowed_flow_events_stop_when_flows_is_killed() {
    let node = started();
    let web = web();
    let maps = || KernelMaps::open_pinned(&node.pin_path).expect("maps");
    let mut allowed = node.enforcer_in_netns(&["flows", "--pin-path", &pin(&node), "--allowed"]);
    wait_for(
        "the lease taken",
        Duration::from_secs(5),
        || leased(&maps()),
    );
    // The lease is renewed while `flows` runs...
    std::thread::sleep(Duration::from_nanos(
        enforcer_common::ALLOWED_EVENTS_LEASE_NS + 1_000_000_000,
    ));
    assert!(leased(&maps()), "renewed while flows --allowed runs");
    // ... and runs out when it is killed, though it could not switch events off itself.
    allowed.kill().expect("SIGKILL flows");
    allowed.wait().expect("reap flows");
    assert!(leased(&maps()), "SIGKILL leaves the lease as it was");
    wait_for(
        "the lease ran out",
        Duration::from_nanos(enforcer_common::ALLOWED_EVENTS_LEASE_NS + 1_000_000_000),
        || !leased(&maps()),
    );
    // The kernel sends denies only: an allowed flow then a denied one, and the
    // first event a reader gets is the deny.
    let mut denies =
        node.enforcer_in_netns(&["flows", "--pin-path", &pin(&node), "--json", "--count", "1"]);
    let lines = stdout_lines(&mut denies);
    std::thread::sleep(Duration::from_millis(300));
    node.send_to_trunk(vec![syn_to(&web, OPEN, 53000), syn_to(&web, CLOSED, 53001)]);
    let line = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("an event line");
    let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["verdict"], "deny", "{event}");
    assert_eq!(event["dst_port"], CLOSED, "{event}");
    assert!(denies.wait().expect("flows exits").success());
}

#[test]
fn the_metrics_endpoint_serves_counters_health_and_readiness() {
    let node = started();
    let web = web();
    assert_eq!(node.http_get("/healthz").expect("healthz").0, 200);
    assert_eq!(node.http_get("/readyz").expect("readyz").0, 200);
    assert_eq!(node.http_get("/nothing").expect("404").0, 404);
    node.expect_verdicts(
        vec![syn_to(&web, OPEN, 52000), syn_to(&web, CLOSED, 52001)],
        &[(Reason::PassNew, 1), (Reason::DropPolicy, 1)],
    );
    let rule = r#"enforcer_rule_packets_total{group="sg-app",direction="ingress",rule="0"} 1"#;
    let max_flows = format!(
        "enforcer_max_flows_per_pod {}",
        enforcer_common::DEFAULT_MAX_FLOWS_PER_POD
    );
    let expected = [
        "enforcer_ready 1",
        "enforcer_state_error 0",
        "enforcer_pods 2",
        "enforcer_conntrack_entries 1",
        r#"enforcer_verdicts_total{reason="pass_new",verdict="allow"} 1"#,
        r#"enforcer_verdicts_total{reason="drop_policy",verdict="deny"} 1"#,
        r#"enforcer_pod_packets_total{pod="default/web",vlan="10",verdict="allow"} 1"#,
        r#"enforcer_pod_packets_total{pod="default/web",vlan="10",verdict="deny"} 1"#,
        r#"enforcer_pod_packets_total{pod="default/api",vlan="11",verdict="deny"} 0"#,
        r#"enforcer_pod_tracked_flows{pod="default/web",vlan="10"} 1"#,
        r#"enforcer_pod_tracked_flows{pod="default/api",vlan="11"} 0"#,
        r#"enforcer_pod_tracked_fragments{pod="default/web",vlan="10"} 0"#,
        &max_flows,
        rule,
    ];
    let (code, metrics) = node.http_get("/metrics").expect("metrics");
    assert_eq!(code, 200);
    for line in expected {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} missing from:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("# TYPE enforcer_verdicts counter"),
        "{metrics}"
    );

    // A new generation of rules (rule #0 now opens port 81): what the old
    // generation counted is folded into the rule's total, not lost.
    node.write_state(&state(CLOSED));
    wait_for("the new state", Duration::from_secs(2), || {
        node.http_get("/metrics")
            .is_some_and(|(_, m)| m.contains(r#"reloads_total{result="applied"} 2"#))
    });
    node.expect_verdicts(vec![syn_to(&web, CLOSED, 52002)], &[(Reason::PassNew, 1)]);
    let metrics = node.http_get("/metrics").expect("metrics").1;
    let total = r#"enforcer_rule_packets_total{group="sg-app",direction="ingress",rule="0"} 2"#;
    assert!(
        metrics.lines().any(|l| l == total),
        "{total:?} missing from:\n{metrics}"
    );
}

/// A rule referencing a group the state does not define (another account's):
/// EC2 accepts it, so `check` passes with a warning, the agent applies the
/// state (a pod added later is enforced, not dropped as an unknown VLAN) and
/// reports the warning in `status` and `/metrics`.
#[test]
fn a_reference_to_an_undefined_group_is_a_warning_everywhere() {
    let mut node = Node::new();
    node.write_state(&state(OPEN));
    let peered = serde_json::json!({"SecurityGroups": [{
        "GroupId": "sg-peered", "GroupName": "peered", "Description": "test",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
            "UserIdGroupPairs": [{"GroupId": "sg-0otheraccount", "UserId": "444455556666"}]}],
        "IpPermissionsEgress": [],
    }]});
    support::write_atomically(&node.state_dir.join("peered.json"), &peered.to_string());
    let state_dir = node.state_dir.to_str().expect("utf-8").to_string();
    let out = node
        .command_in_netns(&["check", "--state", &state_dir])
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("sg-0otheraccount is not defined"),
        "{stderr}"
    );

    node.start_agent();
    node.wait_ready();
    let status = node.enforcer(&["status", "--pin-path", &pin(&node)]);
    assert!(
        status.contains("warning: ") && status.contains("sg-0otheraccount"),
        "{status}"
    );
    let metrics = node.http_get("/metrics").expect("metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"enforcer_state_findings{kind="warning"} 1"#),
        "{metrics}"
    );
    let web = web();
    node.expect_verdicts(vec![syn_to(&web, OPEN, 52100)], &[(Reason::PassNew, 1)]);
}

/// Audit as operators see it: `check` marks the audited pod, `status` (text and
/// JSON) says it is audited and counts its would-drops apart from drops, and
/// `/metrics` has `enforcer_pod_audit` and the `would_deny` series.
#[test]
fn an_audited_pod_in_check_status_and_metrics() {
    let mut node = Node::new();
    let mut audited = web();
    audited.action = Some("audit");
    let state = TestState {
        mode: "strict",
        open_port: OPEN,
        pods: vec![audited.clone(), api()],
    };
    node.write_state(&state);
    let state_dir = node.state_dir.to_str().expect("utf-8").to_string();
    let check = node.enforcer(&["check", "--state", &state_dir]);
    let marked: Vec<&str> = check.lines().filter(|l| l.contains("AUDIT")).collect();
    assert!(
        marked.len() == 1 && marked[0].contains("default/web"),
        "{check}"
    );
    node.start_agent();
    node.wait_ready();
    node.expect_counted(
        vec![
            syn_to(&audited, CLOSED, 54000),
            syn_to(&api(), CLOSED, 54001),
        ],
        &[
            ((Reason::DropPolicy, false), 1),
            ((Reason::DropPolicy, true), 1),
        ],
    );
    let status = status_json(&node);
    let web = pod(&status, "default/web");
    assert_eq!(
        (
            &web["action"],
            &web["would_drop_packets"],
            &web["denied_packets"]
        ),
        (&Value::from("audit"), &Value::from(1), &Value::from(0)),
        "{web}"
    );
    assert_eq!(pod(&status, "default/api")["action"], "enforce");
    assert_eq!(status["would_drop"]["drop_policy"], 1, "{status:#}");
    assert_eq!(status["verdicts"]["drop_policy"], 1, "{status:#}");
    let text = node.enforcer(&["status", "--pin-path", &pin(&node)]);
    assert!(text.contains("AUDIT: would drop 1 pkts"), "{text}");
    assert!(
        text.contains("audit, passed but would drop: drop_policy 1"),
        "{text}"
    );
    let metrics = node.http_get("/metrics").expect("metrics").1;
    for line in [
        r#"enforcer_pod_audit{pod="default/web",vlan="10"} 1"#,
        r#"enforcer_pod_audit{pod="default/api",vlan="11"} 0"#,
        r#"enforcer_pod_packets_total{pod="default/web",vlan="10",verdict="would_deny"} 1"#,
        r#"enforcer_pod_packets_total{pod="default/web",vlan="10",verdict="deny"} 0"#,
        r#"enforcer_verdicts_total{reason="drop_policy",verdict="would_deny"} 1"#,
        r#"enforcer_verdicts_total{reason="drop_policy",verdict="deny"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} missing from:\n{metrics}"
        );
    }
}
