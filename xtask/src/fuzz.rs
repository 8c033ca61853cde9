//! `cargo xtask fuzz [--seconds N]`: every cargo-fuzz target of `fuzz/` (a
//! workspace of its own, built by nightly with libFuzzer and AddressSanitizer),
//! each for N seconds, starting from the checked-in seeds (`fuzz/corpus/<target>`)
//! plus what earlier runs found (`target/fuzz-corpus/<target>`, where new inputs
//! go). A crash fails the run and leaves its input in `target/fuzz-artifacts/`.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::command::workspace_root;

/// Every fuzz target (`fuzz/Cargo.toml`).
pub const TARGETS: [&str; 6] = [
    "state_ec2_json",
    "state_k8s_yaml",
    "state_k8s_json",
    "state_node_config",
    "compile_vs_eval",
    "frame_oracle",
];

/// Seconds per target that `cargo xtask test` (CI) gives each: a bounded smoke run.
pub const CI_SECONDS: u64 = 10;

/// Builds the targets, then runs each for `seconds`; fails on the first crash.
/// Returns the executions of all targets.
pub fn run(seconds: u64) -> Result<u64> {
    let root = workspace_root();
    // Variables set by the outer (stable) cargo must not leak into the nightly build.
    let nightly_cargo = || {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(&root)
            .args(["run", "nightly", "cargo", "fuzz"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR");
        cmd
    };
    crate::command::run(nightly_cargo().args(["build", "--fuzz-dir", "fuzz"]))?;
    // The built binaries are run directly: `cargo fuzz run` would check the build again per target.
    let host = crate::command::output(Command::new("rustc").args(["+nightly", "-vV"]))
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        })
        .context("cannot find the nightly toolchain's host triple (`rustc +nightly -vV`)")?;
    let binaries = root.join("fuzz/target").join(host).join("release");
    let mut total = 0;
    for target in TARGETS {
        let work = root.join("target/fuzz-corpus").join(target);
        let artifacts = root.join("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root.join("fuzz/corpus").join(target);
        let mut cmd = Command::new(binaries.join(target));
        cmd.current_dir(&root)
            .arg(&work)
            .arg(&seeds)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stdout(Stdio::null());
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = cmd
            .output()
            .with_context(|| format!("cannot run the fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({}); the input is under {}:\n{}",
                out.status,
                artifacts.display(),
                tail.join("\n")
            );
        }
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let executions = stat("number_of_executed_units")
            .with_context(|| format!("{target}: libFuzzer printed no execution count"))?;
        let corpus = count_files(&work)? + count_files(&seeds)?;
        eprintln!("xtask: {target}: {executions} executions, 0 crashes, corpus {corpus} inputs");
        total += executions;
    }
    eprintln!(
        "xtask: fuzzing done: {total} executions over {} targets, 0 crashes",
        TARGETS.len()
    );
    Ok(total)
}

fn count_files(dir: &Path) -> Result<u64> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .count() as u64)
}
