//! The `enforcer` command line (contract: `../shared/docs/design.md`, "CLI").

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use enforcer::model::{Direction, Model};

/// Enforces EC2 security groups for pods (branch ENIs) in the node's kernel, on the trunk interface.
#[derive(Parser, Debug)]
#[command(name = "enforcer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Judges a new flow of a pod against its security groups (no conntrack): the verdict and
    /// the rules that decide it. Exit 0 whatever the verdict.
    Explain(ExplainArgs),
    /// Validates a state directory and summarises what this node enforces; exit 1 on errors.
    Check {
        /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Loads the programs on the trunk, enforces the state, and runs until SIGTERM/SIGINT.
    Run {
        /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// bpffs directory for the pinned maps.
        #[arg(long, value_name = "P", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

/// Where maps (and later links) are pinned unless `--pin-path` says otherwise.
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/enforcer";

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Explain(args) => explain(&args),
        Command::Check { state } => Ok(check(&state)),
        Command::Run { state, pin_path } => run_agent(&state, &pin_path),
    }
}

/// `enforcer check`: the summary on stdout, or every error on stderr, one per line.
fn check(dir: &Path) -> ExitCode {
    match enforcer::state::load(dir) {
        Ok(model) => {
            print!("{}", summary(&model));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), dir.display());
            ExitCode::from(1)
        }
    }
}

fn summary(model: &Model) -> String {
    let node = &model.node;
    let mode = match node.enforcing_mode {
        enforcer::model::EnforcingMode::Strict => "strict",
        enforcer::model::EnforcingMode::Standard => "standard",
    };
    let join = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {mode} mode, trunk {}, primary {} ({}), node groups {}",
        node.name,
        node.trunk_interface,
        node.primary_interface,
        join(&mut node.primary_ips.iter().map(ToString::to_string)),
        node.primary_security_groups.join(", "),
    );
    let _ = writeln!(
        out,
        "security groups: {}, prefix lists: {}, pods enforced: {}",
        model.groups.len(),
        model.prefix_lists.len(),
        model.pods.len(),
    );
    for pod in &model.pods {
        let count = |direction| {
            pod.groups
                .iter()
                .filter_map(|id| model.groups.get(id))
                .map(|g| g.rules(direction).len())
                .sum::<usize>()
        };
        let _ = writeln!(
            out,
            "  VLAN {:>4}  {}  {}  groups {}  rules {} ingress, {} egress",
            pod.vlan,
            pod.key(),
            join(&mut pod.addresses().map(|ip| ip.to_string())),
            pod.groups.join(", "),
            count(Direction::Ingress),
            count(Direction::Egress),
        );
    }
    out
}

/// `enforcer run`: enforce the state until a signal. Maps stay pinned after exit.
fn run_agent(dir: &Path, pin_path: &Path) -> Result<ExitCode> {
    let model = match enforcer::state::load(dir) {
        Ok(model) => model,
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            anyhow::bail!(
                "{} error(s) in {}: nothing loaded",
                errors.0.len(),
                dir.display()
            );
        }
    };
    let enforcer = enforcer::agent::Enforcer::start(&model, pin_path).with_context(|| {
        format!(
            "starting the enforcer on {} (pins under {})",
            model.node.trunk_interface,
            pin_path.display()
        )
    })?;
    for line in summary(&model).lines() {
        log::info!("{line}");
    }
    log::info!(
        "enforcing on {}: {} pods, {} rules compiled; maps pinned under {}",
        model.node.trunk_interface,
        enforcer.compiled().pods.len(),
        enforcer.compiled().rules.len(),
        pin_path.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = terminate.recv() => log::info!("SIGTERM: stopping"),
            result = tokio::signal::ctrl_c() => {
                result.context("waiting for SIGINT")?;
                log::info!("SIGINT: stopping");
            }
        }
        anyhow::Ok(())
    })?;
    drop(enforcer);
    Ok(ExitCode::SUCCESS)
}

/// `enforcer explain` (contract: design.md, "CLI").
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("direction").required(true).args(["ingress", "egress"])))]
pub struct ExplainArgs {
    /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// The pod, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME")]
    pod: String,
    /// Traffic from the peer to the pod.
    #[arg(long)]
    ingress: bool,
    /// Traffic from the pod to the peer.
    #[arg(long)]
    egress: bool,
    /// The other end of the flow.
    #[arg(long, value_name = "IP")]
    peer: std::net::IpAddr,
    /// tcp, udp, icmp, icmpv6, all, or an IP protocol number.
    #[arg(long, value_name = "PROTO")]
    protocol: String,
    /// Destination port of the packet (tcp, udp).
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// ICMP or ICMPv6 type.
    #[arg(long, value_name = "T")]
    icmp_type: Option<u8>,
    /// ICMP or ICMPv6 code (default 0).
    #[arg(long, value_name = "C")]
    icmp_code: Option<u8>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn explain(args: &ExplainArgs) -> Result<ExitCode> {
    let model = enforcer::state::load(&args.state)
        .with_context(|| format!("loading {}", args.state.display()))?;
    let pod = model.pod(&args.pod).with_context(|| {
        let enforced: Vec<String> = model.pods.iter().map(|p| p.key()).collect();
        format!(
            "no pod {} with a branch ENI on node {} (enforced: {})",
            args.pod,
            model.node.name,
            if enforced.is_empty() {
                "none".to_string()
            } else {
                enforced.join(", ")
            }
        )
    })?;
    let direction = if args.ingress {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let query = enforcer::explain::parse_query(
        direction,
        args.peer,
        &args.protocol,
        args.port,
        args.icmp_type,
        args.icmp_code,
    )?;
    let explanation = enforcer::explain::explain(&model, pod, &query);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{explanation}");
    }
    Ok(ExitCode::SUCCESS)
}
