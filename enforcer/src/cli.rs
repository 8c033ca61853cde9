//! The `enforcer` command line (contract: `../shared/docs/design.md`, "CLI").

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use enforcer::model::{Direction, EnforcingAction, Model};

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
    /// the rules that decide it, or why the pod is quarantined. Exit 0 whatever the verdict,
    /// 2 when the state is refused or the pod unknown.
    Explain(ExplainArgs),
    /// Validates a state directory and summarises what this node enforces, its findings (objects
    /// isolated, pods quarantined) on stderr; exit 0 when the node can enforce it, 2 when the
    /// state is refused (unreadable, the node unknown, more than the kernel holds).
    Check {
        /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Finds the pitfalls of security groups for pods in a state before they break anything;
    /// exit 0 clean, 1 findings at or above --severity, 2 the state is refused.
    Lint {
        /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Print `{"findings": [...]}` instead of text.
        #[arg(long)]
        json: bool,
        /// Report findings of this severity and above.
        #[arg(long, value_enum, default_value = "info")]
        severity: enforcer::policy::lint::Severity,
    },
    /// Enforces the state on the trunk and follows its changes until SIGTERM/SIGINT. Adopts
    /// what a previous agent pinned; exiting leaves enforcement in place (see `uninstall`).
    Run {
        /// Directory of EC2 CLI output, Kubernetes objects and the NodeConfig.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "source",
            conflicts_with = "source"
        )]
        state: Option<PathBuf>,
        /// Read the cluster itself: Kubernetes, EC2 and IMDS (see the live options).
        #[arg(long, value_enum)]
        source: Option<SourceKind>,
        #[command(flatten)]
        live: LiveArgs,
        /// bpffs directory for the pinned maps, programs and links.
        #[arg(long, value_name = "P", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: std::net::SocketAddr,
        /// The XDP program on the trunk, which drops denied traffic to pods before the
        /// kernel builds a packet: `auto` (native where the driver supports it, else
        /// generic), `native`, `generic` or `off` (TC judges everything).
        #[arg(long, value_name = "MODE", default_value = "auto")]
        xdp: enforcer::kernel::xdp::XdpSetting,
    },
    /// Writes the live sources' view as a state directory (today's contract), loadable by
    /// `check`, `explain` and `lint`: what `run --source cluster` would enforce now.
    Snapshot {
        #[arg(long, value_enum)]
        source: SourceKind,
        /// Directory to write (created if missing; files of the same names are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long to wait for every source's first view.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        live: LiveArgs,
    },
    /// One EC2 poller for the cluster: the leader (a Lease) publishes every group the
    /// nodes need as SecurityGroupView objects, which agents with `--ec2 controller` read
    /// instead of polling EC2. Runs until SIGTERM/SIGINT (then gives the lease up).
    Controller(ControllerArgs),
    /// What the kernel enforces now, from the pinned maps (with or without a running agent).
    Status {
        #[arg(long, value_name = "P", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Live verdict events: every deny, and allowed new flows with --allowed; with the pod,
    /// direction, addresses and ports, and the rule that allowed or the reason that denied.
    Flows {
        #[arg(long, value_name = "P", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Only this pod's events, as NAMESPACE/NAME.
        #[arg(long, value_name = "NS/NAME")]
        pod: Option<String>,
        /// Also report allowed new flows (asks the kernel for them while this runs).
        #[arg(long)]
        allowed: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Detaches the programs from the trunk and removes everything pinned under the pin path.
    Uninstall {
        #[arg(long, value_name = "P", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

/// Where a state comes from besides a directory.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// Kubernetes (this node's Pods, SecurityGroupPolicies, ServiceAccounts), EC2 and IMDS.
    Cluster,
}

/// The live sources' settings (`--source cluster`); the AWS SDK's and kubectl's
/// standard environment applies (AWS_REGION, AWS_ENDPOINT_URL_EC2, credentials, KUBECONFIG).
#[derive(clap::Args, Debug, Clone)]
pub struct LiveArgs {
    /// This node's name, as Pods' spec.nodeName says it.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// A kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Mean seconds between EC2 polls (jittered ±20 %).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub ec2_interval: u64,
    /// Where EC2's groups come from: this node's polls (`direct`), `enforcer controller`'s
    /// SecurityGroupViews (`controller`), or the views if their CRD is installed (`auto`).
    #[arg(long, value_enum, default_value = "auto")]
    pub ec2: Ec2Mode,
    /// With the controller's views: seconds after which a view not confirmed by the
    /// controller is flagged stale (it stays enforced).
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub view_max_age: u64,
    /// The trunk interface (default: the local interface with the trunk ENI's MAC).
    #[arg(long, value_name = "IFACE")]
    pub trunk_interface: Option<String>,
    /// The primary interface (default: the local interface with the primary ENI's MAC).
    #[arg(long, value_name = "IFACE")]
    pub primary_interface: Option<String>,
    /// A NodeConfig file for what IMDS does not tell (unknownVlan, connectionTracking, …).
    #[arg(long, value_name = "FILE")]
    pub node_config: Option<PathBuf>,
}

/// Where a node's EC2 view comes from (`--ec2`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ec2Mode {
    Direct,
    Controller,
    Auto,
}

/// `enforcer controller`'s settings; the AWS SDK's standard environment applies
/// (AWS_REGION, AWS_ENDPOINT_URL_EC2, IRSA's credentials).
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// A kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The EC2 region, unless AWS_REGION or AWS_DEFAULT_REGION names it (IRSA sets them).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Mean seconds between EC2 polls (jittered ±20 %).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub interval: u64,
    /// Seconds after which an unchanged view's read time is written again (what tells
    /// agents the controller is alive).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub refresh: u64,
    /// The namespace of the leader election's Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pub lease_namespace: String,
    /// The Lease's name.
    #[arg(long, value_name = "NAME", default_value = "enforcer-controller")]
    pub lease_name: String,
    /// Seconds a leader that stopped renewing keeps the lease.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    pub lease_duration: u64,
    /// This replica's name in the Lease (its pod's).
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub identity: String,
}

/// Where maps, programs and links are pinned unless `--pin-path` says otherwise.
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/enforcer";
/// The Prometheus endpoint unless `--metrics-addr` says otherwise.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Explain(args) => explain(&args),
        Command::Check { state } => Ok(check(&state)),
        Command::Lint {
            state,
            json,
            severity,
        } => lint(&state, json, severity),
        Command::Run {
            state,
            source,
            live,
            pin_path,
            metrics_addr,
            xdp,
        } => run_agent(state, source, &live, &pin_path, metrics_addr, xdp),
        Command::Snapshot {
            source: SourceKind::Cluster,
            out,
            timeout,
            live,
        } => snapshot(&live, &out, std::time::Duration::from_secs(timeout)),
        Command::Controller(args) => controller(&args),
        Command::Status { pin_path, json } => status(&pin_path, json),
        Command::Uninstall { pin_path } => uninstall(&pin_path),
        Command::Flows {
            pin_path,
            pod,
            allowed,
            json,
            count,
        } => flows(&pin_path, pod.as_deref(), allowed, json, count),
    }
}

/// `enforcer check`: the summary on stdout, the findings on stderr (exit 0),
/// or every error of a refused state on stderr, one per line (exit 2). It runs
/// the agent's own checks, so it refuses what `run` would.
fn check(dir: &Path) -> ExitCode {
    let model = match enforcer::source::load(dir) {
        Ok(model) => model,
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!(
                "{} error(s) in {}: the state is refused",
                errors.0.len(),
                dir.display()
            );
            return ExitCode::from(STATE_REFUSED);
        }
    };
    match enforcer::agent::compile_checked(&model, None) {
        Ok(_) => {
            print!("{}", summary(&model));
            for finding in &model.findings {
                eprintln!("{finding}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}: {}", dir.display(), enforcer::error_chain(&error));
            ExitCode::from(STATE_REFUSED)
        }
    }
}

/// The exit status of `check`, `lint` and `explain` for a state the agent would refuse.
const STATE_REFUSED: u8 = 2;

/// `enforcer lint`: the findings at or above `severity`, as text or JSON.
fn lint(dir: &Path, json: bool, severity: enforcer::policy::lint::Severity) -> Result<ExitCode> {
    let model = match enforcer::source::load(dir) {
        Ok(model) => model,
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!(
                "the state in {} is refused: it cannot be linted",
                dir.display()
            );
            return Ok(ExitCode::from(STATE_REFUSED));
        }
    };
    let findings: Vec<_> = enforcer::policy::lint::lint(&model)
        .into_iter()
        .filter(|f| f.severity >= severity)
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "findings": findings }))?
        );
    } else {
        for finding in &findings {
            println!("{finding}");
        }
        println!("{} finding(s) in {}", findings.len(), dir.display());
    }
    Ok(ExitCode::from(u8::from(!findings.is_empty())))
}

fn summary(model: &Model) -> String {
    let node = &model.node;
    let mode = node.enforcing_mode.name();
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
            "  VLAN {:>4}  {}  {}  groups {}  rules {} ingress, {} egress{}",
            pod.vlan,
            pod.key(),
            join(&mut pod.addresses().map(|ip| ip.to_string())),
            pod.groups.join(", "),
            count(Direction::Ingress),
            count(Direction::Egress),
            match (&pod.facts.quarantine, pod.action) {
                (Some(held), _) => format!("  QUARANTINED: {}", held.reason),
                (None, EnforcingAction::Audit) => {
                    "  AUDIT (refused traffic passes, reported as would-drops)".to_string()
                }
                (None, EnforcingAction::Enforce) => String::new(),
            },
        );
    }
    out
}

/// How long `run --source cluster` waits for the sources' first views before it starts
/// (then it starts anyway, not ready, and applies them when they come): short, as the
/// endpoint (`/readyz` saying why) is served only once the agent has started.
const FIRST_VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(feature = "live")]
fn live_config(args: &LiveArgs) -> Result<enforcer::source::live::LiveConfig> {
    use enforcer::source::live::{LiveConfig, NodeSettings};
    let node_name = args
        .node_name
        .clone()
        .context("--source cluster needs this node's name: --node-name or NODE_NAME")?;
    let spec = match &args.node_config {
        Some(path) => NodeSettings::read_spec(path)?,
        None => Default::default(),
    };
    use enforcer::source::live::Ec2Mode as Mode;
    Ok(LiveConfig {
        node_name,
        kubeconfig: args.kubeconfig.clone(),
        ec2_interval: std::time::Duration::from_secs(args.ec2_interval.max(1)),
        ec2: match args.ec2 {
            Ec2Mode::Direct => Mode::Direct,
            Ec2Mode::Controller => Mode::Controller,
            Ec2Mode::Auto => Mode::Auto,
        },
        view_max_age: std::time::Duration::from_secs(args.view_max_age.max(1)),
        node: NodeSettings {
            trunk_interface: args.trunk_interface.clone(),
            primary_interface: args.primary_interface.clone(),
            enforcing_mode: NodeSettings::enforcing_mode_from_env()?,
            spec,
        },
    })
}

/// The live sources, started on `runtime`.
#[cfg(feature = "live")]
fn start_live(
    runtime: &tokio::runtime::Runtime,
    args: &LiveArgs,
) -> Result<std::sync::Arc<enforcer::source::live::Hub>> {
    let config = live_config(args)?;
    runtime
        .block_on(enforcer::source::live::start(&config))
        .context("starting the live sources")
}

#[cfg(not(feature = "live"))]
fn no_live() -> anyhow::Error {
    anyhow::anyhow!("this enforcer was built without the live sources (feature `live`)")
}

/// `enforcer controller`: publish until a signal, then give the lease up.
fn controller(args: &ControllerArgs) -> Result<ExitCode> {
    #[cfg(not(feature = "live"))]
    {
        let _ = args;
        Err(no_live())
    }
    #[cfg(feature = "live")]
    {
        use enforcer::source::live::controller::{self, ControllerConfig, LeaseConfig};
        use std::time::Duration;
        let config = ControllerConfig {
            kubeconfig: args.kubeconfig.clone(),
            region: args.region.clone(),
            interval: Duration::from_secs(args.interval.max(1)),
            refresh: Duration::from_secs(args.refresh.max(1)),
            lease: LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: args.identity.clone(),
                duration: Duration::from_secs(args.lease_duration.max(1)),
            },
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async {
            let running = controller::start(&config)
                .await
                .context("starting the controller")?;
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            tokio::select! {
                () = running.run() => anyhow::bail!("the controller's caches ended"),
                _ = terminate.recv() => log::info!("SIGTERM: giving the lease up"),
                _ = tokio::signal::ctrl_c() => log::info!("SIGINT: giving the lease up"),
            }
            running.release().await.context("giving the lease up")
        })?;
        Ok(ExitCode::SUCCESS)
    }
}

/// `enforcer snapshot`: the live view, once every source has spoken, as files.
fn snapshot(args: &LiveArgs, out: &Path, timeout: std::time::Duration) -> Result<ExitCode> {
    #[cfg(not(feature = "live"))]
    {
        let _ = (args, out, timeout);
        Err(no_live())
    }
    #[cfg(feature = "live")]
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let hub = start_live(&runtime, args)?;
        let view = runtime
            .block_on(hub.first_view(timeout))
            .context("waiting for the live sources")?;
        view.documents
            .write_to(out)
            .with_context(|| format!("writing the snapshot into {}", out.display()))?;
        for (name, _) in view.documents.files() {
            println!("{}", out.join(name).display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `enforcer run`: enforce the state and follow it until a signal. Everything stays pinned.
fn run_agent(
    state: Option<PathBuf>,
    source: Option<SourceKind>,
    live: &LiveArgs,
    pin_path: &Path,
    metrics_addr: std::net::SocketAddr,
    xdp: enforcer::kernel::xdp::XdpSetting,
) -> Result<ExitCode> {
    // Bound before anything is attached: a taken port stops the start, not the endpoint.
    let listener = std::net::TcpListener::bind(metrics_addr)
        .with_context(|| format!("binding the metrics endpoint {metrics_addr}"))?;
    listener
        .set_nonblocking(true)
        .context("making the metrics endpoint non-blocking")?;
    // Two workers: applies block one, the endpoint answers on the other.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let source = match (state, source) {
        (Some(dir), _) => enforcer::agent::StateSource::Directory(dir),
        #[cfg(feature = "live")]
        (None, Some(SourceKind::Cluster)) => {
            let hub = start_live(&runtime, live)?;
            if let Err(error) = runtime.block_on(hub.first_view(FIRST_VIEW_WAIT)) {
                log::warn!("starting before the live view is complete: {error}");
            }
            enforcer::agent::StateSource::Live(hub)
        }
        #[cfg(not(feature = "live"))]
        (None, Some(SourceKind::Cluster)) => {
            let _ = (live, FIRST_VIEW_WAIT);
            return Err(no_live());
        }
        (None, None) => anyhow::bail!("--state or --source is needed"),
    };
    let dir = source.origin();
    let agent = enforcer::agent::Agent::start_from(source, pin_path, xdp)
        .with_context(|| format!("starting the agent (pins under {})", pin_path.display()))?;
    match (agent.applied(), agent.failure()) {
        (_, Some(failure)) => log::error!(
            "state {} not applied, the pinned programs (if any) keep enforcing the previous state: {}",
            dir.display(),
            failure.message
        ),
        (Some(applied), None) => {
            for line in summary(&applied.model).lines() {
                log::info!("{line}");
            }
            log::info!(
                "enforcing {} pods, {} rules compiled; pinned under {}",
                applied.compiled.pods.len(),
                applied.compiled.rules.len(),
                pin_path.display()
            );
        }
        (None, None) => {}
    }
    if let Some(error) = agent.attach_error() {
        log::error!("not attached yet, trying again: {error}");
    }
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("serving the metrics endpoint")?;
        log::info!("metrics on http://{metrics_addr}/metrics");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let stop = async move {
            tokio::select! {
                _ = terminate.recv() => log::info!("SIGTERM: exiting, enforcement stays pinned"),
                _ = tokio::signal::ctrl_c() => log::info!("SIGINT: exiting, enforcement stays pinned"),
            }
        };
        enforcer::agent::run(agent, Some(listener), stop)
            .await
            .context("running the agent")
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `enforcer status`: the pinned maps and the agent's report.
fn status(pin_path: &Path, json: bool) -> Result<ExitCode> {
    let status = enforcer::observe::status::Status::read(pin_path).with_context(|| {
        format!(
            "reading the maps pinned under {} (is an enforcer installed there?)",
            pin_path.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `enforcer flows`: print verdict events until a signal (or `count` of them).
fn flows(
    pin_path: &Path,
    pod: Option<&str>,
    allowed: bool,
    json: bool,
    count: Option<u64>,
) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut stream = enforcer::observe::events::EventStream::open(pin_path).with_context(|| {
            format!(
                "opening the events pinned under {} (is an enforcer installed there?)",
                pin_path.display()
            )
        })?;
        let vlan = match pod {
            Some(pod) => Some(stream.vlan_of(pod).with_context(|| {
                format!(
                    "no pod {pod} in the agent's report for {}",
                    pin_path.display()
                )
            })?),
            None => None,
        };
        if allowed {
            stream.lease_allowed_events()?;
        }
        // Renewed well before it runs out; if this process dies, the kernel stops on its own.
        let mut renew = tokio::time::interval(std::time::Duration::from_nanos(
            enforcer_common::ALLOWED_EVENTS_LEASE_NS / 5,
        ));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let mut stdout = std::io::stdout().lock();
        let mut printed = 0;
        let result = loop {
            let events = tokio::select! {
                _ = terminate.recv() => break Ok(()),
                _ = tokio::signal::ctrl_c() => break Ok(()),
                _ = renew.tick(), if allowed => match stream.lease_allowed_events() {
                    Ok(()) => continue,
                    Err(e) => break Err(anyhow::Error::new(e).context("renewing the allowed-flow events")),
                },
                events = stream.next() => events,
            };
            let events = match events {
                Ok(events) => events,
                Err(e) => break Err(anyhow::Error::new(e).context("reading events")),
            };
            let written = events
                .iter()
                .filter(|e| vlan.is_none_or(|v| e.vlan == v))
                .try_for_each(|event| {
                    printed += 1;
                    if json {
                        let line = serde_json::to_string(event).map_err(std::io::Error::other)?;
                        writeln!(stdout, "{line}")
                    } else {
                        writeln!(stdout, "{event}")
                    }
                })
                .and_then(|()| stdout.flush());
            match written {
                Ok(()) => {}
                // The reader went away (`flows | head`): a normal end.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
                Err(e) => break Err(anyhow::Error::new(e).context("writing events")),
            }
            if count.is_some_and(|n| printed >= n) {
                break Ok(());
            }
        };
        if allowed {
            stream
                .end_allowed_events()
                .context("switching allowed-flow events off again")?;
        }
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `enforcer uninstall`: detach and unpin everything, and forget the report.
fn uninstall(pin_path: &Path) -> Result<ExitCode> {
    let removed = enforcer::kernel::ebpf::uninstall(pin_path)
        .with_context(|| format!("uninstalling from {}", pin_path.display()))?;
    let report = enforcer::observe::status::report_path(pin_path);
    match std::fs::remove_file(&report) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", report.display()));
        }
        _ => {}
    }
    println!(
        "removed {} pins under {}; the trunk is no longer enforced",
        removed.len(),
        pin_path.display()
    );
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
    let model = enforcer::source::load(&args.state)
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
    let query = enforcer::policy::explain::parse_query(
        direction,
        args.peer,
        &args.protocol,
        args.port,
        args.icmp_type,
        args.icmp_code,
    )?;
    let explanation = enforcer::policy::explain::explain(&model, pod, &query);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{explanation}");
    }
    Ok(ExitCode::SUCCESS)
}
