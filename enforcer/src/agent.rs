//! The node agent: keeps the kernel enforcing the state directory, adopting what a
//! previous agent pinned, applying every valid change and keeping the last good state.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aya::Ebpf;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;

use crate::compile::{self, CompileError, Compiled};
use crate::ebpf::Attachment;
use crate::maps::{ApplyStats, KernelMaps, MapsError};
use crate::model::{BranchPod, EnforcingMode, Model};
use crate::pins::Migration;
use crate::state::StateErrors;
use crate::status::{AgentReport, PodReport};

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
    #[error("watching the state directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// The programs, their maps and what they enforce, for one pin path.
pub struct Agent {
    state_dir: PathBuf,
    pin_path: PathBuf,
    /// The loaded programs; attached through pinned links, so dropping them detaches nothing.
    ebpf: Ebpf,
    maps: KernelMaps,
    /// Maps replacing pinned ones of another layout, until the programs using them are attached.
    migration: Migration,
    /// The interface the programs of this process are attached to.
    trunk: Option<String>,
    applied: Option<Applied>,
    failure: Option<Failure>,
    /// Reloads that applied a state, and that were rejected.
    reloads: (u64, u64),
    /// The programs' own log records (aya-log), when this process logs at debug level.
    kernel_log: Option<KernelLog>,
}

/// Reader of the programs' aya-log records, forwarding them to `log`.
type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Agent {
    /// Loads the programs over the maps pinned under `pin_path` (creating
    /// them on a first start, migrating those of another layout: see
    /// [`crate::pins`]), then applies the state directory. A state that does
    /// not apply is reported (see [`Agent::failure`]), not fatal: whatever a
    /// previous agent left pinned keeps enforcing.
    pub fn start(state_dir: &Path, pin_path: &Path) -> Result<Self, AgentError> {
        let crate::pins::Loaded {
            mut ebpf,
            migration,
        } = crate::pins::load(pin_path)?;
        let kernel_log = if crate::ebpf::kernel_log_level() == 0 {
            None
        } else {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(AgentError::KernelLog)?)
        };
        let maps = KernelMaps::take(&mut ebpf)?;
        let mut agent = Self {
            state_dir: state_dir.to_path_buf(),
            pin_path: pin_path.to_path_buf(),
            ebpf,
            maps,
            migration,
            trunk: None,
            applied: None,
            failure: None,
            reloads: (0, 0),
            kernel_log,
        };
        match agent.reload() {
            // The report is how the failure would be told: without it, give up.
            Err(error @ AgentError::Report { .. }) => Err(error),
            _ => Ok(agent),
        }
    }

    /// Reads the state directory again and makes the kernel enforce it. On
    /// any error the kernel keeps the last good state and the error is kept
    /// for `status`, metrics and the next report.
    pub fn reload(&mut self) -> Result<&Applied, AgentError> {
        let result = self.try_reload();
        let now = SystemTime::now();
        match &result {
            Ok(()) => {
                self.failure = None;
                self.reloads.0 += 1;
            }
            Err(error) => {
                self.failure = Some(Failure {
                    at: now,
                    message: error_text(error),
                });
                self.reloads.1 += 1;
            }
        }
        self.write_report()?;
        result?;
        Ok(self
            .applied
            .as_ref()
            .expect("a successful reload leaves a state applied"))
    }

    fn try_reload(&mut self) -> Result<(), AgentError> {
        let mut model = crate::state::load(&self.state_dir)?;
        let modes = pin_modes(&mut model, &self.maps.pod_modes()?);
        let compiled = compile::compile_with(&model, Some(self.maps.enforced()?))?;
        self.maps.record_pod_modes(&modes)?;
        let mut stats = if self.migration.is_empty() {
            self.maps.apply(&compiled, &model.node)?
        } else {
            self.maps.stage(&compiled, &model.node)?
        };
        let trunk = &model.node.trunk_interface;
        if self.trunk.as_ref() != Some(trunk) {
            let how = crate::ebpf::attach_pinned(&mut self.ebpf, trunk, &self.pin_path)?;
            log::info!(
                "programs on {trunk}: {}",
                if how.contains(&Attachment::Replaced) {
                    "replaced the pinned ones"
                } else {
                    "attached and pinned"
                }
            );
            self.trunk = Some(trunk.clone());
        }
        if !self.migration.is_empty() {
            self.migration.commit()?;
            // What only the previous build's programs used goes now.
            stats.removed += self.maps.apply(&compiled, &model.node)?.removed;
        }
        self.applied = Some(Applied {
            model,
            compiled,
            at: SystemTime::now(),
            stats,
        });
        Ok(())
    }

    /// What the kernel enforces, once a state has been applied.
    pub fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }

    /// Why the latest state directory was not applied, if it was not.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Programs attached and the current state applied.
    pub fn is_ready(&self) -> bool {
        self.trunk.is_some() && self.applied.is_some() && self.failure.is_none()
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

    /// Tells `enforcer status` what the maps cannot: names, groups, errors.
    fn write_report(&self) -> Result<(), AgentError> {
        let report = AgentReport {
            pid: std::process::id(),
            state_dir: self.state_dir.clone(),
            trunk: self.trunk.clone(),
            node: self.applied.as_ref().map(|a| a.model.node.name.clone()),
            enforcing_mode: self
                .applied
                .as_ref()
                .map(|a| mode_name(a.model.node.enforcing_mode).to_string()),
            applied_at: self.applied.as_ref().map(|a| unix_seconds(a.at)),
            error: self.failure.as_ref().map(|f| f.message.clone()),
            error_at: self.failure.as_ref().map(|f| unix_seconds(f.at)),
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
        let path = crate::status::report_path(&self.pin_path);
        report
            .write(&path)
            .map_err(|source| AgentError::Report { path, source })
    }
}

/// Keeps the kernel enforcing the state directory until `stop` completes:
/// every change (debounced) is reloaded, and `metrics` (if given) serves
/// `/metrics`, `/healthz` and `/readyz`. Errors of a reload are logged and
/// reported, never fatal. Nothing is detached on return.
pub async fn run(
    agent: Agent,
    metrics: Option<TcpListener>,
    stop: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let state_dir = agent.state_dir.clone();
    let mut watch =
        crate::watch::StateWatch::new(&state_dir).map_err(|source| AgentError::Watch {
            path: state_dir.clone(),
            source,
        })?;
    let mut agent = agent;
    if let Some(kernel_log) = agent.kernel_log.take() {
        tokio::spawn(forward_kernel_log(kernel_log));
    }
    let agent = Arc::new(Mutex::new(agent));
    if let Some(listener) = metrics {
        tokio::spawn(crate::metrics::serve(listener, agent.clone()));
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            changed = watch.changed() => {
                changed.map_err(|source| AgentError::Watch { path: state_dir.clone(), source })?;
                let mut agent = agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match agent.reload() {
                    Ok(applied) => log::info!(
                        "state applied: {} pods, {} rules; {} map entries written, {} removed",
                        applied.model.pods.len(),
                        applied.compiled.rules.len(),
                        applied.stats.written,
                        applied.stats.removed,
                    ),
                    Err(error) => log::error!(
                        "state not applied, the kernel keeps the previous one: {}",
                        error_text(&error)
                    ),
                }
            }
        }
    }
}

/// Gives each pod the mode it had when the agent first saw it (sg-semantics.md
/// §6: a mode change affects only pods created after it); a pod seen for the
/// first time takes the node's mode. Returns the modes to remember, by pod
/// identity: pods gone from the state are forgotten, so a recreated pod (new
/// UID) takes the mode in force when it comes back.
pub fn pin_modes(
    model: &mut Model,
    known: &BTreeMap<String, EnforcingMode>,
) -> BTreeMap<String, EnforcingMode> {
    let node_mode = model.node.enforcing_mode;
    let mut modes = BTreeMap::new();
    for pod in &mut model.pods {
        let identity = pod.identity();
        pod.mode = known.get(&identity).copied().unwrap_or(node_mode);
        modes.insert(identity, pod.mode);
    }
    modes
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
        mode: mode_name(pod.mode).to_string(),
        groups: pod.groups.clone(),
        ingress_rules: rules(crate::model::Direction::Ingress),
        egress_rules: rules(crate::model::Direction::Egress),
    }
}

pub fn mode_name(mode: EnforcingMode) -> &'static str {
    match mode {
        EnforcingMode::Strict => "strict",
        EnforcingMode::Standard => "standard",
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error with its causes, on one line per cause.
pub fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
    use crate::eval::fixtures::{model, node, pod};

    const STRICT: EnforcingMode = EnforcingMode::Strict;
    const STANDARD: EnforcingMode = EnforcingMode::Standard;

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
        let known = BTreeMap::from([
            ("uid-1".to_string(), STRICT),
            ("uid-gone".to_string(), STANDARD),
        ]);
        let remembered = pin_modes(&mut state, &known);
        let modes: Vec<_> = state.pods.iter().map(|p| p.mode).collect();
        assert_eq!(modes, [STRICT, STANDARD]);
        assert_eq!(
            remembered,
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
        let known = BTreeMap::from([(key.clone(), STANDARD)]);
        assert_eq!(
            pin_modes(&mut state, &known),
            BTreeMap::from([(key, STANDARD)])
        );
        assert_eq!(state.pods[0].mode, STANDARD);
    }
}
