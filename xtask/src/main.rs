//! Developer and CI verbs: `cargo xtask setup | build-ebpf | test`.

mod build_ebpf;
mod command;
mod setup;
mod test;

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
    /// Install what is missing (nightly rust-src, bpf-linker, Debian packages); idempotent.
    Setup,
    /// Build the kernel programs for bpfel-unknown-none (with BTF) and stage them for embedding.
    BuildEbpf {
        /// Build with the release profile (what the tests and the agent use).
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, then the privileged integration tests (root, BPF, namespaces).
    Test,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Verb::Setup => setup::run(),
        Verb::BuildEbpf { release } => {
            setup::run()?;
            build_ebpf::run(release)
        }
        Verb::Test => {
            setup::run()?;
            test::run()
        }
    }
}
