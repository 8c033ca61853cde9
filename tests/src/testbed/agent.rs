//! The enforcer under test: the `enforcer run` process inside the node's namespace, started,
//! stopped or killed as an operator (or a crash) would, and its pinned counters.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};
use enforcer::kernel::ebpf::{TC_EGRESS, TC_INGRESS};
use enforcer::kernel::xdp::{XdpMode, XdpState};
use enforcer_common::{COUNTER_SLOTS, map_names};

use super::netns::Namespace;

/// Set to the `enforcer` binary to use; otherwise the tests build it with cargo.
pub const BINARY_VARIABLE: &str = "ENFORCER_BIN";

/// How long an agent may take to load, fill its maps and attach.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped agent may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `enforcer` binary: [`BINARY_VARIABLE`], or built (once per process) by cargo into the
/// target directory and profile of the running test.
pub fn enforcer_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_VARIABLE) {
        return Ok(PathBuf::from(path));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_enforcer().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_enforcer() -> Result<PathBuf> {
    // The test runs as <target>/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().context("locating the running test")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not inside a cargo target directory")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "build",
            "--quiet",
            "--package",
            "enforcer",
            "--bin",
            "enforcer",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build
        .status()
        .context("running cargo to build `enforcer`")?;
    if !status.success() {
        bail!("building the `enforcer` binary failed ({status})");
    }
    Ok(profile_dir.join("enforcer"))
}

/// A running `enforcer run`, its output kept in a log file.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `enforcer run` in `node` and waits until both of its TC programs are attached to
    /// `trunk` (new ones: a restart replaces the programs of the previous agent), and its XDP
    /// program in native mode.
    pub fn start(
        binary: &Path,
        node: &Namespace,
        trunk: &str,
        state: &Path,
        pin_path: &Path,
        log: PathBuf,
    ) -> Result<Self> {
        let source = [OsString::from("--state"), state.into()];
        Self::start_with(binary, node, trunk, &source, &[], pin_path, log)
    }

    /// [`Agent::start`] with other source arguments (`--source cluster …`) and
    /// environment variables.
    pub fn start_with(
        binary: &Path,
        node: &Namespace,
        trunk: &str,
        source: &[OsString],
        env: &[(String, String)],
        pin_path: &Path,
        log: PathBuf,
    ) -> Result<Self> {
        let before = enforcer_programs(node, trunk)?;
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = node
            .command(binary)
            .arg("run")
            .args(source)
            .arg("--pin-path")
            .arg(pin_path)
            // The fabric delivers tags inline, as on Nitro: XDP judges what the trunk receives.
            .args(["--xdp", "native"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut agent = Self { child, log };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "`enforcer run` exited ({status}) before attaching:\n{}",
                    agent.output()
                );
            }
            let now = enforcer_programs(node, trunk)?;
            if now.iter().zip(&before).all(|(n, b)| n.is_some() && n != b)
                && xdp_state(node, trunk, pin_path)? == XdpState::Attached(XdpMode::Native)
            {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "`enforcer run` did not attach to {trunk} within {START_TIMEOUT:?}:\n{}",
                    agent.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the agent printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as an orderly shutdown; SIGKILL if it does not exit in time.
    pub fn stop(mut self) -> Result<()> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.kill();
                bail!("`enforcer run` ignored SIGTERM for {STOP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        // Reaped, so no zombie holds the node's namespace.
        let _ = self.child.wait();
    }

    fn signal(&mut self, signal: i32) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: plain kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Where the enforcer's XDP program stands on `trunk`.
fn xdp_state(node: &Namespace, trunk: &str, pin_path: &Path) -> Result<XdpState> {
    node.enter(|| enforcer::kernel::xdp::xdp_state(pin_path, trunk))?
        .context("reading the XDP link")
}

/// IDs of the enforcer's programs attached to `trunk` (ingress, egress), if any.
pub fn enforcer_programs(node: &Namespace, trunk: &str) -> Result<[Option<u32>; 2]> {
    node.enter(|| -> Result<[Option<u32>; 2]> {
        let mut ids = [None; 2];
        for (id, (name, hook)) in ids.iter_mut().zip([
            (TC_INGRESS, TcAttachType::Ingress),
            (TC_EGRESS, TcAttachType::Egress),
        ]) {
            let (_, programs) = SchedClassifier::query_tcx(trunk, hook)
                .with_context(|| format!("listing the programs on {trunk}"))?;
            *id = programs
                .iter()
                .find(|p| p.name_as_str() == Some(name))
                .map(|p| p.id());
        }
        Ok(ids)
    })?
}

/// The enforcer's packet counters by [`enforcer_common::counter_slot`] (per reason, then
/// audit's would-drops per reason), read from their pin under `pin_path`.
pub fn counters(pin_path: &Path) -> Result<[u64; COUNTER_SLOTS as usize]> {
    let pin = enforcer::kernel::bpffs::map_pin(pin_path, map_names::COUNTERS);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut totals = [0; COUNTER_SLOTS as usize];
    // A map pinned by an older build may have fewer slots.
    for (slot, total) in (0..counters.len().min(COUNTER_SLOTS)).zip(totals.iter_mut()) {
        *total = counters.get(&slot, 0)?.iter().sum();
    }
    Ok(totals)
}
