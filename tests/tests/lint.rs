//! `enforcer lint` as users run it: on the example state, by severity, as JSON,
//! and on a state it cannot read.

#[path = "agent_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn lint(state: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(support::enforcer_binary())
        .arg("lint")
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("run enforcer lint");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8"),
    )
}

fn example() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/state"))
}

#[test]
fn the_example_state_linted_by_severity() {
    let (code, json) = lint(example(), &["--json"]);
    assert_eq!(code, Some(1), "findings at info and above: {json}");
    let findings: Value = serde_json::from_str(&json).expect("JSON");
    let ids: Vec<&str> = findings["findings"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|f| f["id"].as_str().expect("an id"))
        .collect();
    // payments: two policies give its groups, and none of its two groups is
    // tagged for the cluster; strict pods with probes need TCP early demux off.
    assert_eq!(ids, ["SGP002", "SGP008", "SGP010"], "{json}");
    let (code, text) = lint(example(), &["--severity", "error"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("0 finding(s)"), "{text}");
}

#[test]
fn a_state_that_cannot_be_read_exits_2() {
    let dir = std::env::temp_dir().join(format!("enforcer-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("pods.yaml"), "").expect("an empty file");
    let (code, _) = lint(&dir, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(2));
}
