//! The node agent: keeps the kernel enforcing the state directory, adopting what a
//! previous agent pinned, applying every valid change and keeping the last good state,
//! and keeping its programs first on the trunk whatever happens to the links.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aya::Ebpf;
use aya::maps::MapData;
use enforcer_common::map_names;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;

use crate::compile::{self, CompileError, Compiled};
use crate::kernel::ebpf::{Attachment, LinkState};
use crate::kernel::maps::{ApplyStats, CarryStats, KernelMaps, MapsError, Pass};
use crate::kernel::pins::Migration;
use crate::kernel::xdp::{XdpMode, XdpSetting, XdpState};
use crate::model::{BranchPod, EnforcingMode, GroupId, GroupsSource, Model, QuarantineCause};
use crate::observe::metrics::{AgentView, Feed};
use crate::observe::status::{AgentReport, PodReport, SourceReport};
use crate::source::SourceHealth;
use crate::source::state::StateErrors;

/// How often the agent checks that its programs are still attached first on the trunk.
pub const SUPERVISE_INTERVAL: Duration = Duration::from_secs(1);
/// How often expired flows and fragment verdicts leave the kernel's tables
/// (which are not LRU, so nothing else removes them): well under the shortest
/// timeout that fills a table fast (TCP closing, 10 s), and a walk of a full
/// conntrack table is a fraction of a second of one CPU.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Waits before a rejected state is read again: doubling from 1 s to 30 s.
const RELOAD_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Waits before a failed attachment (a trunk not there yet) is tried again:
/// short, because enforcement waits on it.
const ATTACH_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(2));

/// Why the agent could not start, or could not apply a state.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] crate::Error),
    #[error("{} error(s) in the state directory", .0.0.len())]
    State(#[from] StateErrors),
    #[error("compiling the state")]
    Compile(#[from] CompileError),
    #[error("writing the kernel maps")]
    Maps(#[from] MapsError),
    #[error("writing the status report {path}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the programs' log records")]
    KernelLog(#[source] aya_log::Error),
    #[error(
        "the programs of this build are not attached to {trunk} yet: the maps of the previous layout stay in use until they are"
    )]
    Migration { trunk: String },
    #[error("the live view is not complete: {}", .0.join("; "))]
    Incomplete(Vec<String>),
    #[error("starting the metrics endpoint's scrape thread")]
    Endpoint(#[source] std::io::Error),
    #[error(
        "snatPortRange {}-{} overlaps the node's net.ipv4.ip_local_port_range {}-{}: translated flows could take its connections' ports",
        .snat.0, .snat.1, .local.0, .local.1
    )]
    SnatPortsOverlap { snat: (u16, u16), local: (u16, u16) },
    #[error("reading {LOCAL_PORT_RANGE}")]
    LocalPorts(#[source] std::io::Error),
    #[error("watching the state directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The ports this network namespace's own connections take.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Refuses a `snatPortRange` that overlaps the node's `ip_local_port_range`
/// (`local`, the sysctl's text): a translated flow must never take a port one
/// of the node's own connections on the primary IP may hold.
fn snat_ports_clear_of(snat: &RangeInclusive<u16>, local: &str) -> Result<(), AgentError> {
    let mut bounds = local
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(low), Some(high)) = (bounds.next(), bounds.next()) else {
        return Err(AgentError::LocalPorts(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{local:?} is not two ports"),
        )));
    };
    if *snat.start() <= high && low <= *snat.end() {
        return Err(AgentError::SnatPortsOverlap {
            snat: (*snat.start(), *snat.end()),
            local: (low, high),
        });
    }
    Ok(())
}

/// A state the kernel enforces.
pub struct Applied {
    pub model: Model,
    pub compiled: Compiled,
    pub at: SystemTime,
    pub stats: ApplyStats,
}

/// The last attempt to apply the state directory, when it failed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub at: SystemTime,
    pub message: String,
}

/// Where the agent's state comes from.
#[derive(Clone)]
pub enum StateSource {
    /// A state directory (`--state`), watched.
    Directory(PathBuf),
    /// The live sources' view (`--source cluster`), a virtual state directory.
    #[cfg(feature = "live")]
    Live(Arc<crate::source::live::Hub>),
}

impl StateSource {
    /// What reports and errors name as the state's origin.
    pub fn origin(&self) -> PathBuf {
        match self {
            Self::Directory(dir) => dir.clone(),
            #[cfg(feature = "live")]
            Self::Live(_) => PathBuf::from(crate::source::live::ORIGIN),
        }
    }

    /// The findings of the state just applied: those not in `logged` are logged,
    /// and in live mode every one goes to the Events publisher (which says each once
    /// while it persists).
    fn announce(&self, findings: &[crate::model::Finding], logged: &BTreeSet<String>) {
        for finding in findings {
            if !logged.contains(&finding.to_string()) {
                log::warn!("state finding: {finding}");
            }
        }
        #[cfg(feature = "live")]
        if let Self::Live(hub) = self {
            hub.report_findings(findings);
        }
    }

    /// Each live source's health (none for a directory).
    pub fn health(&self) -> Vec<SourceHealth> {
        match self {
            Self::Directory(_) => Vec::new(),
            #[cfg(feature = "live")]
            Self::Live(hub) => hub.view().sources.clone(),
        }
    }

    /// Starts watching the source's changes. Done before the state's first read:
    /// a change made while the agent starts is then seen, never lost between
    /// that read and the watch.
    fn watch(&self) -> Result<Watched, AgentError> {
        match self {
            Self::Directory(dir) => crate::source::watch::StateWatch::new(dir)
                .map(Watched::Directory)
                .map_err(|source| AgentError::Watch {
                    path: dir.clone(),
                    source,
                }),
            #[cfg(feature = "live")]
            Self::Live(hub) => {
                let mut views = hub.subscribe();
                let seen = views.borrow_and_update().clone();
                Ok(Watched::Live { views, seen })
            }
        }
    }

    fn load(&self) -> Result<Model, AgentError> {
        match self {
            Self::Directory(dir) => Ok(crate::source::load(dir)?),
            #[cfg(feature = "live")]
            Self::Live(hub) => {
                let view = hub.view();
                if !view.incomplete.is_empty() {
                    return Err(AgentError::Incomplete(view.incomplete.clone()));
                }
                let origin = Path::new(crate::source::live::ORIGIN);
                Ok(crate::source::load_documents(origin, &view.documents)?)
            }
        }
    }
}

/// A source's changes, watched from before the state's first read.
enum Watched {
    /// The state directory's inotify watch, in place.
    Directory(crate::source::watch::StateWatch),
    /// The live view, subscribed: any view published after `seen` is a change.
    #[cfg(feature = "live")]
    Live {
        views: tokio::sync::watch::Receiver<Arc<crate::source::live::LiveView>>,
        seen: Arc<crate::source::live::LiveView>,
    },
}

/// The stages of an agent's start-up, in order, at which [`Agent::start_observed`]
/// calls its observer. A change to the state made at any of them is applied: a
/// ConfigMap update during a rolling restart, or a controller writing the state
/// while the agent comes up, lands at one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// The programs are loaded over the pins; the state is not read yet.
    Loaded,
    /// The first state is read, not yet applied.
    Read,
    /// The first state is applied, the programs not attached yet.
    Applied,
    /// The programs are attached (or their attachment is retried); the agent does
    /// not run yet, so `/readyz` is not served.
    Attached,
}

/// The programs, their maps and what they enforce, for one pin path.
pub struct Agent {
    source: StateSource,
    /// The source's changes since before the first read, until [`run`] takes them.
    watched: Option<Watched>,
    pin_path: PathBuf,
    /// The loaded programs; attached through pinned links, so dropping them detaches nothing.
    ebpf: Ebpf,
    maps: KernelMaps,
    /// Maps replacing pinned ones of another layout, until the programs using them are attached.
    migration: Migration,
    /// Every map, by name, to pin again if its pin is removed while the agent runs
    /// (empty while a migration is pending).
    map_pins: Vec<(&'static str, MapData)>,
    /// Where the programs must be: the trunk of the applied state.
    trunk: Option<String>,
    /// The primary interface, while the applied state source-NATs: the return
    /// path's program must be first there too.
    nat_interface: Option<String>,
    /// The XDP attachment asked for.
    xdp: XdpSetting,
    /// Where the XDP program runs on `trunk`, as last attached.
    xdp_mode: Option<XdpMode>,
    /// Both TC programs first on `trunk` and XDP as asked, as last checked.
    attached: bool,
    /// Why the last attempt to attach failed.
    attach_error: Option<String>,
    /// When to try attaching again after a failure, and the wait after that.
    attach_retry: (Instant, Backoff),
    applied: Option<Applied>,
    failure: Option<Failure>,
    /// Reloads that applied a state, and that were rejected.
    reloads: (u64, u64),
    /// The programs' own log records (aya-log), when this process logs at debug level.
    kernel_log: Option<KernelLog>,
    /// The sources' health as last reported.
    reported_sources: Vec<SourceHealth>,
    /// The applied state's findings as last logged: a reload logs only what is
    /// new (every pod status update reloads in live mode).
    announced: BTreeSet<String>,
}

/// Reader of the programs' aya-log records, forwarding them to `log`.
type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Agent {
    /// Watches the state directory, loads the programs over the maps pinned
    /// under `pin_path` (creating them on a first start, migrating those of
    /// another layout: see [`crate::kernel::pins`]), applies the state and
    /// attaches the programs to its trunk. The watch comes first: a change
    /// made while the agent starts is applied by [`run`], even one the first
    /// read missed. A state that does not apply, or a trunk that is
    /// not there yet, is reported (see [`Agent::failure`], [`Agent::is_ready`]),
    /// not fatal: whatever a previous agent left pinned keeps enforcing, and
    /// [`run`] tries again.
    pub fn start(state_dir: &Path, pin_path: &Path, xdp: XdpSetting) -> Result<Self, AgentError> {
        Self::start_from(
            StateSource::Directory(state_dir.to_path_buf()),
            pin_path,
            xdp,
        )
    }

    /// [`Agent::start`] over any [`StateSource`].
    pub fn start_from(
        source: StateSource,
        pin_path: &Path,
        xdp: XdpSetting,
    ) -> Result<Self, AgentError> {
        Self::start_observed(source, pin_path, xdp, &mut |_| {})
    }

    /// [`Agent::start_from`], calling `at` at each [`Startup`] stage as it is
    /// reached: how a test changes the state at a chosen moment of the start-up.
    /// The command line never passes an observer.
    pub fn start_observed(
        source: StateSource,
        pin_path: &Path,
        xdp: XdpSetting,
        at: &mut dyn FnMut(Startup),
    ) -> Result<Self, AgentError> {
        let watched = source.watch()?;
        let crate::kernel::pins::Loaded {
            mut ebpf,
            migration,
        } = crate::kernel::pins::load(pin_path)?;
        let kernel_log = if crate::kernel::ebpf::kernel_log_level() == 0 {
            None
        } else {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(AgentError::KernelLog)?)
        };
        let map_pins = if migration.is_empty() {
            open_map_pins(pin_path)?
        } else {
            Vec::new()
        };
        let maps = KernelMaps::take(&mut ebpf)?;
        let mut agent = Self {
            source,
            watched: Some(watched),
            pin_path: pin_path.to_path_buf(),
            ebpf,
            maps,
            migration,
            map_pins,
            trunk: None,
            nat_interface: None,
            xdp,
            xdp_mode: None,
            attached: false,
            attach_error: None,
            attach_retry: (Instant::now(), Backoff::new(ATTACH_RETRY)),
            applied: None,
            failure: None,
            reloads: (0, 0),
            kernel_log,
            reported_sources: Vec::new(),
            announced: Default::default(),
        };
        at(Startup::Loaded);
        // The report is how a failure would be told: without it, give up.
        if let Err(error @ AgentError::Report { .. }) = agent.reload_observed(at) {
            return Err(error);
        }
        at(Startup::Attached);
        Ok(agent)
    }

    /// Reads the state directory again and makes the kernel enforce it, then
    /// makes sure the programs are attached to its trunk. On any error the
    /// kernel keeps the last good state and the error is kept for `status`,
    /// metrics and the next report.
    pub fn reload(&mut self) -> Result<&Applied, AgentError> {
        self.reload_observed(&mut |_| {})
    }

    /// [`Agent::reload`], calling `at` once the state is read and once it is applied.
    fn reload_observed(&mut self, at: &mut dyn FnMut(Startup)) -> Result<&Applied, AgentError> {
        let result = self.try_reload(at);
        let now = SystemTime::now();
        match &result {
            Ok(()) => {
                self.failure = None;
                self.reloads.0 += 1;
                let findings = self.findings();
                self.source.announce(findings, &self.announced);
                self.announced = findings.iter().map(ToString::to_string).collect();
            }
            Err(error) => {
                self.failure = Some(Failure {
                    at: now,
                    message: crate::error_chain(error),
                });
                self.reloads.1 += 1;
            }
        }
        // The report goes with the apply, not after the attachment (which takes a
        // while): `status` names every pod the maps now hold.
        let reported = self.write_report();
        if result.is_ok() {
            at(Startup::Applied);
        }
        let attachment = (self.attached, self.attach_error.clone());
        self.supervise();
        reported?;
        if (self.attached, self.attach_error.clone()) != attachment {
            self.write_report()?;
        }
        result?;
        Ok(self
            .applied
            .as_ref()
            .expect("a successful reload leaves a state applied"))
    }

    fn try_reload(&mut self, at: &mut dyn FnMut(Startup)) -> Result<(), AgentError> {
        let mut model = self.source.load()?;
        at(Startup::Read);
        if !model.node.external_snat {
            let local =
                std::fs::read_to_string(LOCAL_PORT_RANGE).map_err(AgentError::LocalPorts)?;
            snat_ports_clear_of(&model.node.snat_port_range, &local)?;
        }
        let known = Pinned {
            modes: self.maps.pod_modes()?,
            groups: self.maps.pod_groups()?,
        };
        let pinned = pin_pods(&mut model, &known);
        let compiled = compile_checked(&model, Some(self.maps.enforced()?))?;
        let nat_interface = crate::kernel::maps::settings(&model.node)
            .nat
            .enabled()
            .then(|| model.node.primary_interface.clone());
        if let Some(primary) = &nat_interface
            && self.nat_interface.as_ref() != Some(primary)
        {
            // The return path first: no flow is translated before its replies can come back.
            crate::kernel::ebpf::attach_primary(&mut self.ebpf, primary, &self.pin_path)?;
        }
        let mut stats = if self.migration.is_empty() {
            self.maps.apply(&compiled, &model.node)?
        } else {
            self.maps.stage(&compiled, &model.node)?
        };
        let trunk = &model.node.trunk_interface;
        if self.trunk.as_ref() != Some(trunk) {
            self.trunk = Some(trunk.clone());
            self.attached = false;
        }
        if self.nat_interface != nat_interface {
            self.nat_interface = nat_interface;
            self.attached = false;
        }
        if !self.migration.is_empty() {
            // Flows the previous build tracked are tracked by this one from its first frame.
            let before = self.maps.carry(self.migration.carried(), Pass::Before)?;
            // The new maps replace the old pins only once the programs that use them run.
            if !self.supervise() {
                return Err(AgentError::Migration {
                    trunk: trunk.clone(),
                });
            }
            let after = self.maps.carry(self.migration.carried(), Pass::After)?;
            if before != CarryStats::default() || after != CarryStats::default() {
                log::warn!(
                    "tracked entries carried into the new tables: {}, then {} tracked meanwhile; {} found no room",
                    before.copied,
                    after.copied,
                    after.dropped
                );
            }
            self.migration.commit()?;
            self.map_pins = open_map_pins(&self.pin_path)?;
            // What only the previous build's programs used goes now.
            stats.removed += self.maps.apply(&compiled, &model.node)?.removed;
        }
        // Only what the kernel enforces is remembered as the pod's first.
        self.maps.record_pod_modes(&pinned.modes)?;
        self.maps.record_pod_groups(&pinned.groups)?;
        self.applied = Some(Applied {
            model,
            compiled,
            at: SystemTime::now(),
            stats,
        });
        Ok(())
    }

    /// Makes sure both TC programs are attached to the trunk, ahead of any
    /// other program, the XDP program as asked, and every pin is in place;
    /// re-attaches and re-pins what was lost (a deleted and recreated trunk,
    /// `enforcer uninstall`, another tool). Returns whether the programs are attached.
    pub fn supervise(&mut self) -> bool {
        let Some(trunk) = self.trunk.clone() else {
            return false;
        };
        let was_attached = self.attached;
        let states = crate::kernel::ebpf::link_states(&self.pin_path, &trunk);
        let xdp = crate::kernel::xdp::xdp_state(&self.pin_path, &trunk);
        let primary = match &self.nat_interface {
            Some(primary) => crate::kernel::ebpf::link_state(
                &self.pin_path,
                crate::kernel::ebpf::TC_PRIMARY_INGRESS,
                primary,
                aya::programs::TcAttachType::Ingress,
            ),
            None => Ok(LinkState::First),
        };
        if let Ok(states) = &states
            && states.iter().all(|s| *s == LinkState::First)
            && matches!(primary, Ok(LinkState::First))
            && matches!(&xdp, Ok(xdp) if self.xdp_as_asked(*xdp))
            && self.attached
        {
            self.restore_map_pins();
            return true;
        }
        if !was_attached && Instant::now() < self.attach_retry.0 {
            return false;
        }
        if was_attached {
            log::warn!(
                "programs no longer first on {trunk} ({}, XDP {}): attaching again",
                match &states {
                    Ok([ingress, egress]) => format!("ingress {ingress:?}, egress {egress:?}"),
                    Err(e) => crate::error_chain(e),
                },
                match &xdp {
                    Ok(xdp) => format!("{xdp:?}"),
                    Err(e) => crate::error_chain(e),
                }
            );
        }
        let behind = matches!(&states, Ok(states)
            if states.iter().any(|s| matches!(s, LinkState::Behind { .. })));
        if behind && self.migration.is_empty() {
            // TCX takes a program once per hook: to go first again, attach a new
            // instance of the programs (over the same pinned maps), then let the old go.
            match crate::kernel::pins::load(&self.pin_path) {
                Ok(loaded) if loaded.migration.is_empty() => self.ebpf = loaded.ebpf,
                Ok(_) => log::error!(
                    "the pinned maps changed layout under the running agent: not reloading the programs"
                ),
                Err(error) => log::error!(
                    "cannot load the programs again to go first: {}",
                    crate::error_chain(&error)
                ),
            }
        }
        // The return path first: no flow is translated before its replies can come back.
        let primary = match &self.nat_interface {
            Some(primary) => {
                crate::kernel::ebpf::attach_primary(&mut self.ebpf, primary, &self.pin_path)
                    .map(|_| ())
            }
            None => Ok(()),
        };
        let attached = primary
            .and_then(|()| {
                crate::kernel::ebpf::attach_pinned(&mut self.ebpf, &trunk, &self.pin_path)
            })
            .and_then(|how| {
                let mode = crate::kernel::xdp::attach_xdp(
                    &mut self.ebpf,
                    &trunk,
                    &self.pin_path,
                    self.xdp,
                )?;
                Ok((how, mode))
            });
        match attached {
            Ok((how, xdp_mode)) => {
                self.xdp_mode = xdp_mode;
                self.attached = true;
                self.attach_error = None;
                self.attach_retry = (Instant::now(), Backoff::new(ATTACH_RETRY));
                log::info!(
                    "programs on {trunk}: {}, XDP {}",
                    if how.iter().all(|a| *a == Attachment::Replaced) {
                        "replaced the pinned ones"
                    } else {
                        "attached first and pinned"
                    },
                    xdp_mode.map_or("off", XdpMode::name)
                );
            }
            Err(error) => {
                let message = crate::error_chain(&error);
                if self.attach_error.as_ref() != Some(&message) {
                    log::error!("cannot attach to {trunk}, will try again: {message}");
                }
                self.attached = false;
                self.attach_error = Some(message);
                let wait = self.attach_retry.1.next();
                self.attach_retry.0 = Instant::now() + wait;
            }
        }
        self.restore_map_pins();
        self.attached
    }

    fn xdp_as_asked(&self, state: XdpState) -> bool {
        match state {
            XdpState::Attached(mode) => self.xdp.accepts(mode),
            XdpState::Missing => self.xdp == XdpSetting::Off,
            XdpState::Elsewhere(_) => false,
        }
    }

    /// Where the XDP program runs on the trunk (`None`: not attached, or off).
    pub fn xdp_mode(&self) -> Option<XdpMode> {
        self.xdp_mode.filter(|_| self.attached)
    }

    /// Pins again every map whose pin was removed, so `status`, `flows` and the
    /// next agent find them.
    fn restore_map_pins(&self) {
        for (name, data) in &self.map_pins {
            let pin = crate::kernel::bpffs::map_pin(&self.pin_path, name);
            if pin.exists() {
                continue;
            }
            let pinned = std::fs::create_dir_all(pin.parent().expect("a map pin has a directory"))
                .map_err(|e| e.to_string())
                .and_then(|()| data.pin(&pin).map_err(|e| crate::error_chain(&e)));
            match pinned {
                Ok(()) => log::warn!("map pin {} was removed: pinned again", pin.display()),
                Err(e) => log::error!("cannot pin {} again: {e}", pin.display()),
            }
        }
    }

    /// What the kernel enforces, once a state has been applied.
    pub fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }

    /// Why the latest state directory was not applied, if it was not.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Why the programs could not be attached the last time, if they could not.
    pub fn attach_error(&self) -> Option<&str> {
        self.attach_error.as_deref()
    }

    /// Programs attached first on the trunk and the current state applied.
    pub fn is_ready(&self) -> bool {
        self.view().is_ready()
    }

    /// Reloads that applied a state, and that were rejected, since start.
    pub fn reloads(&self) -> (u64, u64) {
        self.reloads
    }

    pub fn maps(&self) -> &KernelMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// What the metrics endpoint shows of the agent now.
    pub fn view(&self) -> AgentView {
        AgentView {
            attached: self.attached,
            applied: self.applied.is_some(),
            state_error: self.failure.is_some(),
            reloads: self.reloads,
            applied_at: self.applied.as_ref().map(|a| a.at),
            pods: Arc::new(
                self.applied
                    .as_ref()
                    .map(|a| a.model.pods.iter().map(|p| (p.key(), p.vlan)).collect())
                    .unwrap_or_default(),
            ),
            retired_traffic: self.maps.retired_traffic().clone(),
            findings: crate::model::FindingKind::ALL
                .iter()
                .map(|&kind| {
                    (
                        kind,
                        self.findings().iter().filter(|f| f.kind == kind).count(),
                    )
                })
                .collect(),
            xdp_mode: self.xdp_mode().map(XdpMode::name),
            sources: Arc::new(self.source.health()),
        }
    }

    /// The applied state's findings.
    fn findings(&self) -> &[crate::model::Finding] {
        self.applied.as_ref().map_or(&[], |a| &a.model.findings)
    }

    /// Tells `enforcer status` what the maps cannot: names, groups, errors.
    fn write_report(&self) -> Result<(), AgentError> {
        let report = AgentReport {
            pid: std::process::id(),
            state_dir: self.source.origin(),
            sources: self
                .source
                .health()
                .iter()
                .map(SourceReport::from)
                .collect(),
            trunk: self.trunk.clone(),
            node: self.applied.as_ref().map(|a| a.model.node.name.clone()),
            enforcing_mode: self
                .applied
                .as_ref()
                .map(|a| a.model.node.enforcing_mode.name().to_string()),
            applied_at: self.applied.as_ref().map(|a| unix_seconds(a.at)),
            error: self.failure.as_ref().map(|f| f.message.clone()),
            error_at: self.failure.as_ref().map(|f| unix_seconds(f.at)),
            attach_error: self.attach_error.clone(),
            findings: self.findings().iter().map(ToString::to_string).collect(),
            pods: self
                .applied
                .as_ref()
                .map(|a| {
                    a.model
                        .pods
                        .iter()
                        .map(|p| pod_report(&a.model, p))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let path = crate::observe::status::report_path(&self.pin_path);
        report
            .write(&path)
            .map_err(|source| AgentError::Report { path, source })
    }

    fn reload_logged(&mut self) {
        match self.reload() {
            Ok(applied) => {
                log::info!(
                    "state applied: {} pods, {} rules; {} map entries written, {} removed",
                    applied.model.pods.len(),
                    applied.compiled.rules.len(),
                    applied.stats.written,
                    applied.stats.removed,
                );
            }
            Err(error) => log::error!(
                "state not applied, the kernel keeps the previous one: {}",
                crate::error_chain(&error)
            ),
        }
    }

    /// Checks the attachment; the report follows what changed (and the live
    /// sources' health, which changes without a reload when a source fails).
    fn supervise_reported(&mut self) {
        let before = (self.attached, self.attach_error.clone());
        self.supervise();
        let sources = self.source.health();
        let sources_changed = self.reported_sources != sources;
        self.reported_sources = sources;
        let changed = (self.attached, self.attach_error.clone()) != before || sources_changed;
        if changed && let Err(error) = self.write_report() {
            log::error!("{}", crate::error_chain(&error));
        }
    }
}

/// Every map pinned under `pin_path`, by name.
fn open_map_pins(pin_path: &Path) -> Result<Vec<(&'static str, MapData)>, MapsError> {
    map_names::ALL
        .iter()
        .map(|&name| {
            let pin = crate::kernel::bpffs::map_pin(pin_path, name);
            MapData::from_pin(&pin)
                .map(|data| (name, data))
                .map_err(|source| MapsError::Pinned { path: pin, source })
        })
        .collect()
}

/// Everything `enforcer run` checks before it writes the kernel: compiles
/// `model` (over the `enforced` state, for stable IDs) and admits it to the
/// maps. `enforcer check` runs exactly this, so it refuses what `run` would.
pub fn compile_checked(model: &Model, enforced: Option<&Compiled>) -> Result<Compiled, AgentError> {
    let compiled = compile::compile_with(model, enforced)?;
    crate::kernel::maps::admit(model, &compiled)?;
    Ok(compiled)
}

/// The wait before the next try: doubling from a minimum to a maximum.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    bounds: (Duration, Duration),
}

impl Backoff {
    fn new(bounds: (Duration, Duration)) -> Self {
        Self {
            next: bounds.0,
            bounds,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.bounds.1);
        wait
    }
}

/// Keeps the kernel enforcing the state directory until `stop` completes:
/// every change (debounced) since the agent started watching, before its
/// first read, is reloaded, a rejected state is tried again with
/// backoff, the attachment is checked every [`SUPERVISE_INTERVAL`] and
/// restored, and `metrics` (if given, bound before the agent started) serves
/// `/metrics`, `/healthz` and `/readyz`. Errors of a reload are logged and
/// reported, never fatal. Nothing is detached on return.
pub async fn run(
    mut agent: Agent,
    metrics: Option<TcpListener>,
    stop: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let state_dir = agent.source.origin();
    let watched = agent
        .watched
        .take()
        .expect("an agent watches its source from its start");
    let mut changes = match watched {
        Watched::Directory(watch) => watch_changes(watch),
        #[cfg(feature = "live")]
        Watched::Live { views, seen } => live_changes(views, &seen),
    };
    if let Some(kernel_log) = agent.kernel_log.take() {
        tokio::spawn(forward_kernel_log(kernel_log));
    }
    let (feed, source) = crate::observe::metrics::feed(agent.view(), agent.pin_path.clone());
    if let Some(listener) = metrics {
        crate::observe::http::start(listener, source).map_err(AgentError::Endpoint)?;
    }
    let mut supervise = tokio::time::interval(SUPERVISE_INTERVAL);
    supervise.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    spawn_sweeper(agent.pin_path.clone());
    let mut backoff = Backoff::new(RELOAD_RETRY);
    let retry = tokio::time::sleep(backoff.next());
    tokio::pin!(stop, retry);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            changed = changes.recv() => {
                changed
                    .unwrap_or_else(|| Err(std::io::Error::other("the watch ended")))
                    .map_err(|source| AgentError::Watch { path: state_dir.clone(), source })?;
                update(&feed, &mut agent, Agent::reload_logged);
                backoff = Backoff::new(RELOAD_RETRY);
                retry.as_mut().reset(tokio::time::Instant::now() + backoff.next());
            }
            () = &mut retry, if agent.failure.is_some() => {
                log::info!("reading the rejected state again");
                update(&feed, &mut agent, Agent::reload_logged);
                retry.as_mut().reset(tokio::time::Instant::now() + backoff.next());
            }
            _ = supervise.tick() => update(&feed, &mut agent, Agent::supervise_reported),
        }
    }
}

/// Sweeps expired entries out of the conntrack and fragment tables every
/// [`SWEEP_INTERVAL`], giving each pod its allowance back, on a task of its own
/// with its own handles on the pinned maps: a sweep of a full table takes a
/// while and must never delay a reload. The agent's own deletes (a removed pod)
/// may race it: whichever delete succeeds gives the slot back, once. Errors are
/// logged; the next sweep retries.
fn spawn_sweeper(pin_path: PathBuf) {
    tokio::spawn(async move {
        let mut maps = match KernelMaps::open_pinned(&pin_path) {
            Ok(maps) => maps,
            Err(error) => {
                log::error!("no sweeps of expired flows: {}", crate::error_chain(&error));
                return;
            }
        };
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let swept = tokio::task::block_in_place(|| {
                maps.sweep(crate::observe::events::monotonic().as_nanos() as u64)
            });
            match swept {
                Ok(swept) if swept.flows + swept.fragments > 0 => log::debug!(
                    "swept {} expired flows and {} fragment verdicts",
                    swept.flows,
                    swept.fragments
                ),
                Ok(_) => {}
                Err(error) => log::warn!("sweep: {}", crate::error_chain(&error)),
            }
        }
    });
}

/// The state directory's changes, debounced, from a task of their own: a
/// change seen while the agent is busy is kept (one pending reload), never
/// lost with a cancelled wait.
fn watch_changes(
    mut watch: crate::source::watch::StateWatch,
) -> tokio::sync::mpsc::Receiver<std::io::Result<()>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            match watch.changed().await {
                // Full: a reload is pending already and will read this change too.
                Ok(()) => {
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                        sender.try_send(Ok(()))
                    {
                        return;
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            }
        }
    });
    receiver
}

/// Changes of the live view's documents (or of its completeness) since `seen`, the
/// view as subscribed before the first read, from a task of their own into a one-slot
/// channel like a directory's; a change of the sources' health alone is no reload
/// (the supervision tick reports it).
#[cfg(feature = "live")]
fn live_changes(
    mut views: tokio::sync::watch::Receiver<Arc<crate::source::live::LiveView>>,
    seen: &crate::source::live::LiveView,
) -> tokio::sync::mpsc::Receiver<std::io::Result<()>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let mut seen = (seen.documents.clone(), seen.incomplete.clone());
    tokio::spawn(async move {
        while views.changed().await.is_ok() {
            // A burst of events (a relist, a rollout) is one reload.
            tokio::time::sleep(LIVE_SETTLE).await;
            let view = views.borrow_and_update().clone();
            let current = (view.documents.clone(), view.incomplete.clone());
            if current == seen {
                continue;
            }
            seen = current;
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = sender.try_send(Ok(()))
            {
                return;
            }
        }
    });
    receiver
}

/// How long the live view may settle after a change before it is reloaded.
#[cfg(feature = "live")]
const LIVE_SETTLE: Duration = Duration::from_millis(50);

/// Runs `change` on the agent (blocking: applies write the maps) and
/// publishes the agent's view to the metrics endpoint.
fn update(feed: &Feed, agent: &mut Agent, change: fn(&mut Agent)) {
    feed.update(|| {
        tokio::task::block_in_place(|| change(agent));
        ((), agent.view())
    });
}

/// What each pod keeps from when the agent first enforced it, by pod identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    pub modes: BTreeMap<String, EnforcingMode>,
    /// Groups of pods whose branch ENI the state does not list.
    pub groups: BTreeMap<String, Vec<GroupId>>,
}

/// Gives each pod what it had when the agent first saw it: its mode
/// (sg-semantics: a mode change affects only pods created after it) and,
/// unless its branch ENI's groups are known, its groups (a policy change
/// does not touch running pods). A pod seen for the first time takes the
/// node's mode and its policies' groups; one quarantined because its policies
/// cannot give its groups is released by the groups it kept, and kept groups
/// the state does not define quarantine it. A quarantined pod's groups are
/// never remembered, so it takes its policies' groups once they are known.
/// Returns what to remember: pods gone from the state are forgotten, so a
/// recreated pod (new UID) takes what is in force when it comes back.
pub fn pin_pods(model: &mut Model, known: &Pinned) -> Pinned {
    let node_mode = model.node.enforcing_mode;
    let mut pinned = Pinned::default();
    for index in 0..model.pods.len() {
        let pod = &mut model.pods[index];
        let identity = pod.identity();
        pod.mode = known.modes.get(&identity).copied().unwrap_or(node_mode);
        pinned.modes.insert(identity.clone(), pod.mode);
        if pod.facts.groups_source == GroupsSource::BranchEni {
            continue;
        }
        let cause = pod.facts.quarantine.as_ref().map(|q| q.cause);
        match (known.groups.get(&identity), cause) {
            // Still remembered: a pod whose annotation breaks for a while keeps what it had.
            (Some(groups), Some(QuarantineCause::Pod)) => {
                pinned.groups.insert(identity, groups.clone());
            }
            (None, Some(QuarantineCause::Pod)) => {}
            (Some(groups), _) => {
                if cause.is_some() {
                    model.release(index, groups.clone());
                }
                let pod = &mut model.pods[index];
                pod.groups = groups.clone();
                pod.facts.groups_source = GroupsSource::Pinned;
                pinned.groups.insert(identity, groups.clone());
            }
            (None, Some(QuarantineCause::Policies)) => {}
            (None, None) => {
                pinned.groups.insert(identity, pod.groups.clone());
            }
        }
    }
    crate::source::quarantine_unknown_groups(model);
    pinned
}

fn pod_report(model: &Model, pod: &BranchPod) -> PodReport {
    let rules = |direction| {
        pod.groups
            .iter()
            .filter_map(|id| model.groups.get(id))
            .map(|g| g.rules(direction).len())
            .sum()
    };
    PodReport {
        vlan: pod.vlan,
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        mode: pod.mode.name().to_string(),
        groups: pod.groups.clone(),
        groups_source: pod.facts.groups_source,
        ingress_rules: rules(crate::model::Direction::Ingress),
        egress_rules: rules(crate::model::Direction::Egress),
        quarantine: pod.facts.quarantine.as_ref().map(|q| q.reason.clone()),
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Forwards the programs' log records to `log` as they arrive.
async fn forward_kernel_log(kernel_log: KernelLog) {
    // SAFETY: the logger owns its ring buffer's descriptor for as long as the AsyncFd holds it.
    let registered = unsafe { AsyncFd::register_with_interest(kernel_log, Interest::READABLE) };
    let mut records = match registered {
        Ok(records) => records,
        Err(error) => {
            log::error!("cannot watch the programs' log records: {error}");
            return;
        }
    };
    loop {
        match records.readable_mut().await {
            Ok(mut ready) => {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            Err(error) => {
                log::error!("the programs' log records stopped: {error}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::fixtures::{group, model, node, pod};

    const STRICT: EnforcingMode = EnforcingMode::Strict;
    const STANDARD: EnforcingMode = EnforcingMode::Standard;

    fn modes(known: &[(&str, EnforcingMode)]) -> Pinned {
        Pinned {
            modes: known.iter().map(|(id, m)| (id.to_string(), *m)).collect(),
            groups: BTreeMap::new(),
        }
    }

    #[test]
    fn the_snat_port_range_stays_clear_of_the_nodes_own_ports() {
        let default = crate::model::DEFAULT_SNAT_PORT_RANGE;
        assert!(snat_ports_clear_of(&default, "32768\t60999\n").is_ok());
        let err = snat_ports_clear_of(&(60000..=61000), "32768\t60999\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("snatPortRange 60000-61000 overlaps the node's net.ipv4.ip_local_port_range 32768-60999"),
            "{err}"
        );
        assert!(snat_ports_clear_of(&(1024..=32767), "32768 60999").is_ok());
        assert!(matches!(
            snat_ports_clear_of(&default, "garbage"),
            Err(AgentError::LocalPorts(_))
        ));
    }

    #[test]
    fn known_pods_keep_their_mode_and_new_ones_take_the_nodes() {
        let mut state = model(
            vec![],
            vec![
                pod(1, "10.0.1.1", &[], STRICT),
                pod(2, "10.0.1.2", &[], STRICT),
            ],
        );
        state.node = node(STANDARD, &[]);
        let remembered = pin_pods(
            &mut state,
            &modes(&[("uid-1", STRICT), ("uid-gone", STANDARD)]),
        );
        let pinned: Vec<_> = state.pods.iter().map(|p| p.mode).collect();
        assert_eq!(pinned, [STRICT, STANDARD]);
        assert_eq!(
            remembered.modes,
            BTreeMap::from([
                ("uid-1".to_string(), STRICT),
                ("uid-2".to_string(), STANDARD)
            ]),
            "pods gone from the state are forgotten"
        );
    }

    #[test]
    fn a_pod_without_uid_is_known_by_its_name() {
        let mut without_uid = pod(1, "10.0.1.1", &[], STRICT);
        without_uid.uid.clear();
        let key = without_uid.key();
        let mut state = model(vec![], vec![without_uid]);
        let remembered = pin_pods(&mut state, &modes(&[(&key, STANDARD)]));
        assert_eq!(remembered.modes, BTreeMap::from([(key, STANDARD)]));
        assert_eq!(state.pods[0].mode, STANDARD);
    }

    /// A pod whose policies cannot give its groups is released by the groups it kept
    /// from its first enforcement; one whose own object is at fault is not, and keeps
    /// them remembered; a quarantined pod's groups are never remembered; kept groups
    /// the state does not define quarantine the pod.
    #[test]
    fn kept_groups_and_quarantine() {
        let groups = ["sg-kept", "sg-new"].map(|id| group(id, vec![], vec![]));
        let mut state = model(
            groups.to_vec(),
            (1..=5)
                .map(|vlan| pod(vlan, &format!("10.0.1.{vlan}"), &["sg-new"], STRICT))
                .collect(),
        );
        state.quarantine(0, "policy unreadable".into(), QuarantineCause::Policies);
        state.quarantine(1, "policy unreadable".into(), QuarantineCause::Policies);
        state.quarantine(2, "annotation broken".into(), QuarantineCause::Pod);
        let kept = |groups: &[&str]| groups.iter().map(|g| g.to_string()).collect::<Vec<_>>();
        let known = Pinned {
            modes: BTreeMap::new(),
            groups: BTreeMap::from([
                ("uid-1".to_string(), kept(&["sg-kept"])),
                ("uid-3".to_string(), kept(&["sg-kept"])),
                ("uid-4".to_string(), kept(&["sg-gone"])),
            ]),
        };
        let remembered = pin_pods(&mut state, &known);
        let held: Vec<(Vec<String>, Option<QuarantineCause>)> = state
            .pods
            .iter()
            .map(|p| {
                (
                    p.groups.clone(),
                    p.facts.quarantine.as_ref().map(|q| q.cause),
                )
            })
            .collect();
        assert_eq!(
            held,
            [
                (kept(&["sg-kept"]), None),
                (vec![], Some(QuarantineCause::Policies)),
                (vec![], Some(QuarantineCause::Pod)),
                (vec![], Some(QuarantineCause::Pod)),
                (kept(&["sg-new"]), None),
            ]
        );
        assert_eq!(
            remembered.groups,
            BTreeMap::from([
                ("uid-1".to_string(), kept(&["sg-kept"])),
                ("uid-3".to_string(), kept(&["sg-kept"])),
                ("uid-4".to_string(), kept(&["sg-gone"])),
                ("uid-5".to_string(), kept(&["sg-new"])),
            ])
        );
        // One finding per quarantined pod, none for the released one.
        let quarantined: Vec<&str> = state
            .findings_of(crate::model::FindingKind::Quarantined)
            .map(|f| f.at.object.as_str())
            .collect();
        assert_eq!(quarantined.len(), 3, "{quarantined:?}");
        assert!(
            !quarantined.contains(&"Pod default/pod1"),
            "{quarantined:?}"
        );
    }

    #[test]
    fn known_pods_keep_their_groups_unless_their_branch_eni_says_otherwise() {
        let groups = ["sg-old", "sg-new", "sg-eni"].map(|id| group(id, vec![], vec![]));
        let mut state = model(
            groups.to_vec(),
            vec![
                pod(1, "10.0.1.1", &["sg-new"], STRICT),
                pod(2, "10.0.1.2", &["sg-new"], STRICT),
                pod(3, "10.0.1.3", &["sg-eni"], STRICT),
            ],
        );
        state.pods[2].facts.groups_source = GroupsSource::BranchEni;
        let known = Pinned {
            modes: BTreeMap::new(),
            groups: ["uid-1", "uid-3"]
                .into_iter()
                .map(|id| (id.to_string(), vec!["sg-old".to_string()]))
                .collect(),
        };
        let remembered = pin_pods(&mut state, &known);
        let groups: Vec<(&[String], GroupsSource)> = state
            .pods
            .iter()
            .map(|p| (p.groups.as_slice(), p.facts.groups_source))
            .collect();
        assert_eq!(
            groups,
            [
                (&["sg-old".to_string()][..], GroupsSource::Pinned),
                (&["sg-new".to_string()][..], GroupsSource::Policies),
                (&["sg-eni".to_string()][..], GroupsSource::BranchEni),
            ]
        );
        assert_eq!(
            remembered.groups,
            BTreeMap::from([
                ("uid-1".to_string(), vec!["sg-old".to_string()]),
                ("uid-2".to_string(), vec!["sg-new".to_string()]),
            ]),
            "a branch ENI's groups need no pin; the ENI data says them"
        );
    }
}
