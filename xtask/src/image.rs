//! `cargo xtask image [--tag T]`: the agent's container image. A static
//! `x86_64-unknown-linux-musl` release build of `enforcer` (the release eBPF
//! object embedded, as in every build), copied alone into a build context,
//! stripped of its symbols, and built `FROM scratch` (`image/Containerfile`) by Debian's podman as the
//! project runs it (`image/podman`). Podman's layer cache makes a rebuild of
//! an unchanged binary a no-op.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build_ebpf;
use crate::command::{output, run as run_command, workspace_root};

/// Where the image comes from: the binary's target, the builder wrapper, the recipe.
const TARGET: &str = "x86_64-unknown-linux-musl";
const PODMAN: &str = "image/podman";
const CONTAINERFILE: &str = "image/Containerfile";
const LABEL: &str = "org.opencontainers.image";

pub fn run(tag: Option<&str>) -> Result<()> {
    let root = workspace_root();
    build_ebpf::run(true)?;
    run_command(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--package",
        "enforcer",
        "--bin",
        "enforcer",
    ]))?;
    let version = enforcer_version()?;
    let tag = tag.map_or_else(|| format!("sgp-enforcer:{version}"), str::to_string);
    let context = root.join("target/image");
    std::fs::create_dir_all(&context)
        .with_context(|| format!("cannot create {}", context.display()))?;
    let binary = root.join("target").join(TARGET).join("release/enforcer");
    let copy = context.join("enforcer");
    std::fs::copy(&binary, &copy)
        .with_context(|| format!("cannot copy {} into the build context", binary.display()))?;
    // Symbols are a fifth of the binary and nothing in a container reads them
    // (the copy only: the build keeps its own for profiling).
    run_command(Command::new("strip").arg("--strip-all").arg(&copy))?;
    run_command(
        Command::new(root.join(PODMAN))
            .current_dir(&root)
            .args(["build", "--file", CONTAINERFILE, "--tag", &tag])
            .args(["--label", &format!("{LABEL}.version={version}")])
            .args(["--label", &format!("{LABEL}.revision={}", revision()?)])
            .args(["--label", &format!("{LABEL}.source={}", source())])
            .arg(&context),
    )?;
    let size = output(Command::new(root.join(PODMAN)).args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        &tag,
    ]))
    .with_context(|| format!("cannot inspect the image {tag}"))?;
    let bytes: u64 = size
        .trim()
        .parse()
        .with_context(|| format!("podman printed a size that is not a number: {size}"))?;
    // The tests run the image by this name, as the manifests refer to it.
    let tag_file = context.join("tag");
    std::fs::write(&tag_file, format!("{tag}\n"))
        .with_context(|| format!("cannot write {}", tag_file.display()))?;
    eprintln!(
        "xtask image: {tag}: {:.1} MB ({bytes} bytes)",
        bytes as f64 / 1e6
    );
    Ok(())
}

/// The `enforcer` package's version (`cargo pkgid` ends with `#VERSION` or `@VERSION`).
fn enforcer_version() -> Result<String> {
    let pkgid = output(Command::new("cargo").current_dir(workspace_root()).args([
        "pkgid",
        "--package",
        "enforcer",
    ]))
    .context("`cargo pkgid --package enforcer` failed")?;
    match pkgid.trim().rsplit_once(['#', '@']) {
        Some((_, version)) if !version.is_empty() => Ok(version.to_string()),
        _ => bail!("no version in `cargo pkgid` output {pkgid:?}"),
    }
}

/// The commit built, `-dirty` if the work tree differs from it.
fn revision() -> Result<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .with_context(|| format!("cannot run git {}", args.join(" ")))
    };
    let head = git(&["rev-parse", "HEAD"])?;
    if !head.status.success() {
        bail!("`git rev-parse HEAD` failed: the image is built from a git checkout");
    }
    let commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let clean = git(&["diff", "--quiet", "HEAD"])?.status.success();
    Ok(if clean {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

/// The repository the image was built from: the checkout's `origin`, if it has one.
fn source() -> String {
    output(
        Command::new("git")
            .current_dir(workspace_root())
            .args(["remote", "get-url", "origin"]),
    )
    .map(|url| url.trim().to_string())
    .unwrap_or_else(|| "unknown (the checkout has no origin remote)".to_string())
}
