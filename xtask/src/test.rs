//! `cargo xtask test`: unit tests, a short run of every fuzz target, then the privileged integration tests,
//! which share kernel state (bpffs, namespaces) and so run on one thread.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command::{run as run_command, workspace_root};
use crate::{bench, build_ebpf, fuzz, setup};

/// Set to `1` to run only the unprivileged tests on a machine without root
/// (`.ci/run` refuses it).
const SKIP_PRIVILEGED: &str = "ENFORCER_SKIP_PRIVILEGED";

/// Written once the privileged tests and the benchmarks' smoke run have passed:
/// `.ci/run` fails without it, so no switch can make CI pass without them.
const PRIVILEGED_PASSED: &str = "target/privileged-tests.passed";

pub fn run() -> Result<()> {
    // Each binary embeds or loads the objects of its own profile: the tests run in
    // the dev profile, the benchmarks in release, and `staged_objects` verifies both.
    build_ebpf::run(false)?;
    build_ebpf::run(true)?;
    let root = workspace_root();
    // The kernel crates build for bpfel-unknown-none only (`build_ebpf` above).
    run_command(Command::new("cargo").current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "enforcer-tests",
        "--exclude",
        "enforcer-ebpf",
        "--exclude",
        "testbed-ebpf",
    ]))?;
    // Every fuzz target, briefly (10 s each): no crash on the seeds and what they lead to;
    // the frames it finds are replayed through the kernel by the privileged tests.
    fuzz::run(fuzz::CI_SECONDS)?;
    if std::env::var(SKIP_PRIVILEGED).as_deref() == Ok("1") {
        eprintln!("xtask: {SKIP_PRIVILEGED}=1: privileged integration tests NOT run");
        return Ok(());
    }
    if !setup::is_root() {
        bail!(
            "the integration tests load BPF programs and create namespaces: run as root (or set {SKIP_PRIVILEGED}=1 to skip them explicitly)"
        );
    }
    run_command(Command::new("cargo").current_dir(&root).args([
        "test",
        "--package",
        "enforcer-tests",
        "--",
        "--test-threads=1",
    ]))?;
    // A smoke run of the benchmarks: they must run and write their report;
    // no figure is asserted on a shared machine.
    bench::run(true, &root.join("target/bench-quick.json"))?;
    let marker = root.join(PRIVILEGED_PASSED);
    std::fs::write(
        &marker,
        "enforcer-tests and the benchmarks' smoke run passed as root\n",
    )
    .with_context(|| format!("cannot write {}", marker.display()))
}
