//! `cargo xtask setup`: installs what the build, the image and the tests need, and does
//! nothing when everything is there (recipe: ../shared/docs/toolchain.md).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command::{output, run as run_command};

/// bpf-linker must link the same LLVM major as the nightly rustc.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// `cargo fuzz` (libFuzzer targets in fuzz/, run by `cargo xtask fuzz` and `test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests and tools use, with a binary proving each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("nftables", "nft"),
    ("iptables", "iptables"),
    ("iputils-ping", "ping"),
    ("tcpdump", "tcpdump"),
    // The image is built and run with Debian's podman, runc and catatonit (image/podman).
    ("podman", "podman"),
    ("runc", "runc"),
    ("catatonit", "catatonit"),
    // The image's static build compiles ring (rustls' crypto, for the live sources'
    // Kubernetes and AWS clients) for musl: its C needs musl's compiler wrapper.
    ("musl-tools", "musl-gcc"),
    // The image's binary is stripped of its symbols (`cargo xtask image`).
    ("binutils", "strip"),
];

/// The image's binary is a static build for this target (`cargo xtask image`).
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn run() -> Result<()> {
    rust_src()?;
    musl_target()?;
    bpf_linker()?;
    cargo_fuzz()?;
    packages()?;
    kubectl()?;
    moto()?;
    bpffs()
}

/// moto's EC2 server for the live-source tests (`tests/live/moto_ec2.py`; no AWS
/// here), pinned, in a venv under target/ so that nothing is installed system-wide.
const MOTO: &str = "moto[server]==5.2.5";

fn moto() -> Result<()> {
    let venv = crate::command::workspace_root().join("target/moto");
    let python = venv.join("bin/python");
    let marker = venv.join("installed");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == MOTO) && python.exists() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {MOTO} into {}", venv.display());
    run_command(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run_command(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        MOTO,
    ]))?;
    std::fs::write(&marker, MOTO).context("recording the moto install")?;
    Ok(())
}

fn musl_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("rustup cannot list the installed targets")?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        return Ok(());
    }
    eprintln!("xtask setup: adding the {MUSL_TARGET} target (the image's static binary)");
    run_command(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// `kubectl kustomize deploy/` renders the manifests the tests run. kubectl (with its
/// built-in kustomize) comes with the machine image: Debian 12 only has a 1.20 client,
/// whose kustomize is too old for `deploy/`.
fn kubectl() -> Result<()> {
    if output(Command::new("kubectl").args(["version", "--client"])).is_some() {
        return Ok(());
    }
    bail!(
        "kubectl is not installed: the tests render deploy/ with `kubectl kustomize` (kubectl >= 1.27)"
    )
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup cannot list the nightly toolchain's components: is `nightly` installed (`rustup toolchain install nightly`)?")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask setup: installing rust-src for nightly (needed by -Z build-std=core)");
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> Result<()> {
    // bpf-linker loads the nightly toolchain's libLLVM, which `rustup run` puts on the library path.
    let version =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM (about 2 minutes)"
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("cannot find the nightly sysroot (`rustc +nightly --print sysroot`)")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot read {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/rust-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    // Replace a link left by an older nightly.
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), llvm.display()))?;
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed (recipe in ../shared/docs/toolchain.md)")
}

fn cargo_fuzz() -> Result<()> {
    let version = output(Command::new("cargo-fuzz").arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION))
    {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 1 minute)");
    run_command(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
    .context("installing cargo-fuzz failed")
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(package, _)| !dpkg_installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root (or apt-get install them)",
            missing.join(", ")
        );
    }
    eprintln!("xtask setup: installing {}", missing.join(", "));
    run_command(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for (package, binary) in PACKAGES {
        if output(Command::new("sh").args(["-c", &format!("command -v {binary}")])).is_none() {
            bail!("package {package} is installed but `{binary}` is not on PATH");
        }
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// The BPF filesystem the agent pins under; some machines boot without it.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    if !is_root() {
        bail!("/sys/fs/bpf is not mounted: run `cargo xtask setup` as root");
    }
    eprintln!("xtask setup: mounting bpffs on /sys/fs/bpf");
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}
