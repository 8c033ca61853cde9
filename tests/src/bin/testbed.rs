//! `testbed`, the virtual Nitro node as a command (what `cargo xtask demo` runs): flows
//! driven in strict then standard mode and printed as a matrix, and cleanup of leftovers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use enforcer::model::EnforcingMode;
use enforcer_tests::testbed::matrix::{self, Explainer};
use enforcer_tests::testbed::scenario::{self, Flow};
use enforcer_tests::testbed::{NAME_PREFIX, NodeSpec, VirtualNode, cleanup_leftovers};

/// The enforcer end to end on a virtual Nitro node built with network namespaces.
#[derive(Parser)]
#[command(name = "testbed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Builds the virtual node in strict, then standard mode, runs `enforcer run` on its
    /// trunk, drives the flows and prints them with their verdicts; exit 1 if an observed
    /// verdict differs from the expected one.
    Demo {
        /// A state directory: flows are derived from its rules and judged by the evaluator.
        /// Default: the bundled example, with its hand-written expectations.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// The `enforcer` binary, run as the agent and asked `explain`.
        #[arg(long, value_name = "PATH")]
        enforcer: PathBuf,
    },
    /// Removes what virtual nodes left behind: namespaces (and processes inside), pins,
    /// work directories.
    Teardown,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Demo { state, enforcer } => demo(state.as_deref(), &enforcer),
        Command::Teardown => teardown().map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        if INTERRUPTED.load(Ordering::Relaxed) {
            eprintln!("interrupted: the virtual node is torn down");
            return ExitCode::from(130);
        }
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

fn demo(state: Option<&Path>, enforcer: &Path) -> Result<ExitCode> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let (state, flows) = match state {
        None => (scenario::example_state(), scenario::example_flows()),
        Some(dir) => {
            let model = enforcer::source::load(dir)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("loading {}", dir.display()))?;
            (dir.to_path_buf(), scenario::derived_flows(&model))
        }
    };
    println!(
        "State {} ({}): {} flows, strict then standard mode.\n",
        state.display(),
        if flows
            .iter()
            .any(|f| f.strict == scenario::Expect::Evaluator)
        {
            "expected verdicts from `enforcer explain`"
        } else {
            "expected verdicts written by hand"
        },
        flows.len()
    );
    let mut summaries = Vec::new();
    let mut mismatches = 0;
    for mode in [EnforcingMode::Strict, EnforcingMode::Standard] {
        let matrix = drive_mode(&state, mode, &flows, enforcer)?;
        mismatches += matrix.mismatches().count();
        summaries.push(matrix::render_summary(&matrix));
    }
    println!("{}", summaries.join("; "));
    Ok(if mismatches == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn drive_mode(
    state: &Path,
    mode: EnforcingMode,
    flows: &[Flow],
    enforcer: &Path,
) -> Result<matrix::Matrix> {
    let spec = NodeSpec {
        state: state.to_path_buf(),
        mode,
        vpc_peers: scenario::vpc_peers(flows),
        enforcer: Some(enforcer.to_path_buf()),
    };
    let mut node = VirtualNode::build(&spec)?;
    print!("{}", node.describe());
    node.start_agent()?;
    println!("enforcer run: attached to the trunk\n");
    print!("{}", matrix::render_header());
    let explainer = Explainer {
        enforcer: enforcer.to_path_buf(),
        state: node.state_dir().to_path_buf(),
    };
    let interrupted = || INTERRUPTED.load(Ordering::Relaxed);
    let matrix = matrix::drive(&mut node, flows, Some(&explainer), &interrupted, |row| {
        print!("{}", matrix::render_row(row));
        let _ = std::io::stdout().flush();
    })?;
    println!("{}\n", matrix::render_summary(&matrix));
    node.teardown()?;
    if interrupted() {
        bail!("interrupted");
    }
    Ok(matrix)
}

fn teardown() -> Result<()> {
    let removed = cleanup_leftovers(NAME_PREFIX)?;
    if removed.is_empty() {
        println!("nothing left behind");
    }
    for name in &removed.namespaces {
        println!("removed network namespace {name}");
    }
    for dir in &removed.directories {
        println!("removed {}", dir.display());
    }
    Ok(())
}
