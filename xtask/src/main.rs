//! Developer and CI verbs: `cargo xtask setup | build-ebpf | image | test | demo | bench | fuzz`.

mod bench;
mod build_ebpf;
mod command;
mod demo;
mod fuzz;
mod image;
mod setup;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, set up and test the enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what is missing (nightly rust-src, the musl target, bpf-linker, Debian packages
    /// with podman); idempotent.
    Setup,
    /// Build the kernel programs for bpfel-unknown-none (with BTF) and stage them for embedding.
    BuildEbpf {
        /// Build with the release profile (what the tests and the agent use).
        #[arg(long)]
        release: bool,
    },
    /// Build the agent's container image: a static musl build of `enforcer` (the release
    /// eBPF object embedded) `FROM scratch`, with Debian's podman (`image/podman`).
    Image {
        /// The image's name and tag (default: `sgp-enforcer:<enforcer's version>`).
        #[arg(long, value_name = "T")]
        tag: Option<String>,
    },
    /// Run every test: unit tests, then the privileged integration tests (root, BPF, namespaces).
    Test,
    /// Build everything, then run the enforcer on a virtual Nitro node (network namespaces,
    /// VLAN-tagged trunk) and drive real flows in strict, then standard mode (root).
    Demo {
        /// State directory to build the node from (default: the bundled example).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Only remove what an interrupted or crashed demo or test left behind.
        #[arg(long)]
        teardown: bool,
    },
    /// Run every fuzz target (fuzz/, cargo-fuzz and libFuzzer on nightly) for a while
    /// each; fails on a crash (FUZZING.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Measure the fast path against the floor and by rule count, apply time and map
    /// memory; writes a JSON report (root).
    Bench {
        /// A smoke run (part of `cargo xtask test`): fewer samples.
        #[arg(long)]
        quick: bool,
        /// Where to write the report.
        #[arg(long, value_name = "PATH")]
        json: PathBuf,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Verb::Setup => setup::run()?,
        Verb::BuildEbpf { release } => {
            setup::run()?;
            build_ebpf::run(release)?
        }
        Verb::Image { tag } => {
            setup::run()?;
            image::run(tag.as_deref())?
        }
        Verb::Test => {
            setup::run()?;
            test::run()?
        }
        Verb::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)?;
        }
        Verb::Demo { state, teardown } => return demo::run(state.as_deref(), teardown),
        Verb::Bench { quick, json } => {
            setup::run()?;
            bench::run(quick, &json)?
        }
    }
    Ok(ExitCode::SUCCESS)
}
