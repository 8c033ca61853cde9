//! `cargo xtask build-ebpf`: the kernel crates for bpfel-unknown-none with nightly,
//! build-std and BTF, staged in `target/bpf/<profile>/` where their loaders pick them up.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::command::{run as run_command, workspace_root};

const TARGET: &str = "bpfel-unknown-none";

/// The kernel crates: the enforcer's programs and the virtual node's VLAN
/// and fabric stand-ins.
const CRATES: [&str; 2] = ["enforcer-ebpf", "testbed-ebpf"];

/// The objects they build: the enforcer's (embedded by `enforcer/build.rs`), the
/// benchmarks' floor (`tests/src/bin/bench.rs`) and the virtual node's
/// (`tests/src/testbed.rs`).
const OBJECTS: [&str; 3] = ["enforcer-ebpf", "enforcer-floor", "testbed-ebpf"];

/// Where the object `name` of `profile` is staged: `target/bpf/<profile>/<name>.o`, with
/// `profile` named as cargo names its output directories and tells build scripts
/// (`PROFILE`: `debug` or `release`), so that each binary embeds or loads the objects of its
/// own profile (`enforcer/build.rs`, `enforcer_tests::staged_object`).
fn staged_object(profile: &str, name: &str) -> PathBuf {
    workspace_root()
        .join("target/bpf")
        .join(profile)
        .join(format!("{name}.o"))
}

/// How every crate of a kernel object is compiled, in either profile: `core` and
/// `compiler_builtins` (built by `-Z build-std`) and the eBPF crates' dependencies
/// included, which a profile's section in `Cargo.toml` would not reach. With the dev
/// defaults (debug assertions, overflow checks, no optimisation) `compiler_builtins`'
/// memset and memcpy keep `core`'s precondition checks, whose never-returning panic
/// call ends the function: the verifier rejects every program linking them ("last insn
/// is not an exit or jmp"). The profile only chooses where the objects are staged.
const CODEGEN: [&str; 5] = [
    "opt-level=3",
    "debug-assertions=false",
    "overflow-checks=false",
    "codegen-units=1",
    // The object must not depend on what was built before.
    "incremental=false",
];

pub fn run(release: bool) -> Result<()> {
    let (cargo_profile, profile) = if release {
        ("release", "release")
    } else {
        ("dev", "debug")
    };
    let root = workspace_root();
    let target_dir = root.join("target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            CRATES[0],
            "--package",
            CRATES[1],
        ])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .args(["--profile", cargo_profile])
        .args(CODEGEN.iter().flat_map(|setting| {
            [
                "--config".into(),
                format!("profile.{cargo_profile}.{setting}"),
            ]
        }))
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF makes map keys and values printable with field names by bpftool.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        // Variables set by the outer (stable) cargo must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");
    run_command(&mut cmd)?;
    for object in OBJECTS {
        let built = target_dir.join(TARGET).join(profile).join(object);
        let staged = staged_object(profile, object);
        std::fs::create_dir_all(staged.parent().expect("staged object has a parent"))?;
        let bytes =
            std::fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
        // An unchanged object keeps its mtime, so the binaries embedding it are not rebuilt.
        if std::fs::read(&staged).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&staged, &bytes)
                .with_context(|| format!("cannot write {}", staged.display()))?;
        }
        eprintln!("xtask: eBPF object staged at {}", staged.display());
    }
    Ok(())
}
