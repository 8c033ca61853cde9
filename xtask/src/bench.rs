//! `cargo xtask bench [--quick] --json PATH`: builds the release objects and
//! runs the benchmark binary (`tests/src/bin/bench.rs`), which needs root.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::command::{run as run_command, workspace_root};
use crate::{build_ebpf, setup};

pub fn run(quick: bool, json: &Path) -> Result<()> {
    if !setup::is_root() {
        bail!("the benchmarks load BPF programs: run `cargo xtask bench` as root");
    }
    build_ebpf::run(true)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "run",
            "--release",
            "--package",
            "enforcer-tests",
            "--bin",
            "bench",
            "--",
        ])
        .arg("--json")
        .arg(json);
    if quick {
        cmd.arg("--quick");
    }
    run_command(&mut cmd)
}
