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
    // The example's NodeConfig says TCP early demux is off: a note, not a warning.
    assert_eq!(findings["findings"][0]["severity"], "info", "{json}");
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

/// README.md shows a lint run on the example state: it must be the real output.
#[test]
fn the_readme_shows_the_real_lint_run_on_the_example_state() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let command = "$ enforcer lint --state tests/fixtures/state\n";
    let start = readme.find(command).expect("README.md shows the lint run") + command.len();
    let end = start + readme[start..].find("```").expect("the end of the block");
    let out = Command::new(support::enforcer_binary())
        .current_dir(root)
        .args(["lint", "--state", "tests/fixtures/state"])
        .output()
        .expect("run enforcer lint");
    let real = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        &readme[start..end],
        real,
        "README.md's lint run is out of date; the real output is:\n{real}"
    );
}

/// SGP013 through the command: a t3 node (no trunking) with the example's pods.
#[test]
fn branch_enis_beyond_the_instance_type_are_an_error() {
    let dir = std::env::temp_dir().join(format!("enforcer-lint-t3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for entry in std::fs::read_dir(example()).expect("the example state") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().expect("a name").to_owned();
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replace("instanceType: m5.xlarge", "instanceType: t3.xlarge");
        std::fs::write(dir.join(name), text).expect("write");
    }
    let (code, json) = lint(&dir, &["--json", "--severity", "error"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{json}");
    let findings: Value = serde_json::from_str(&json).expect("JSON");
    let capacity = findings["findings"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|f| f["id"] == "SGP013")
        .unwrap_or_else(|| panic!("no SGP013: {json}"));
    assert_eq!(capacity["severity"], "error");
    let message = capacity["message"].as_str().expect("a message");
    assert!(
        message.contains("t3.xlarge has none (no trunking): 3 will not start"),
        "{message}"
    );
}
