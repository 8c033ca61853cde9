//! `cargo xtask demo`: the enforcer end to end on a virtual Nitro node. Builds everything,
//! then runs the test bed's `testbed demo` (strict, then standard mode) and tears down.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::command::{run as run_command, workspace_root};
use crate::{build_ebpf, setup};

pub fn run(state: Option<&Path>, teardown: bool) -> Result<ExitCode> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let root = workspace_root();
    if teardown {
        build(&root, &["--package", "enforcer-tests", "--bin", "testbed"])?;
        return testbed(&root, &["teardown".into()]);
    }
    setup::run()?;
    build_ebpf::run(true)?;
    build(
        &root,
        &[
            "--package",
            "enforcer",
            "--bin",
            "enforcer",
            "--package",
            "enforcer-tests",
            "--bin",
            "testbed",
        ],
    )?;
    let mut args = vec![
        "demo".into(),
        "--enforcer".into(),
        root.join("target/release/enforcer").into_os_string(),
    ];
    if let Some(state) = state {
        let state = state
            .canonicalize()
            .with_context(|| format!("state directory {}", state.display()))?;
        args.extend(["--state".into(), state.into_os_string()]);
    }
    testbed(&root, &args)
}

fn build(root: &Path, packages: &[&str]) -> Result<()> {
    run_command(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--release"])
            .args(packages),
    )
}

/// Runs the test bed, which tears down on Ctrl-C: meanwhile Ctrl-C must not end us first.
fn testbed(root: &Path, args: &[std::ffi::OsString]) -> Result<ExitCode> {
    let binary: PathBuf = root.join("target/release/testbed");
    // SAFETY: setting a signal disposition; restored below.
    let previous = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = Command::new(&binary).args(args).status();
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGINT, previous) };
    let status = status.with_context(|| format!("starting {}", binary.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
