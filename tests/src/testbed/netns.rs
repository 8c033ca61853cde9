//! Named network namespaces (`/run/netns/NAME`, as `ip netns` makes them): configuring them
//! with `ip -batch`, and running code or processes inside them, a thread or a child at a time.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::wiring::Script;

/// Where `ip netns` keeps the namespaces it names.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, open for entering; deleted by [`Namespace::delete`].
pub struct Namespace {
    name: String,
    file: File,
}

impl Namespace {
    /// Creates the namespace `name`; it must not exist yet.
    pub fn create(name: &str) -> Result<Self> {
        if Path::new(NETNS_DIR).join(name).exists() {
            bail!(
                "network namespace {name} already exists (a leftover: `cargo xtask demo --teardown`)"
            );
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let file = File::open(Path::new(NETNS_DIR).join(name))
            .with_context(|| format!("opening network namespace {name}"))?;
        Ok(Self {
            name: name.to_string(),
            file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies a script of `ip` commands inside the namespace.
    pub fn ip(&self, script: &Script) -> Result<()> {
        self.ip_batch(&[], script.commands())?;
        if !script.rules_v6().is_empty() {
            self.ip_batch(&["-6"], script.rules_v6())?;
        }
        Ok(())
    }

    /// Runs `ip OPTIONS -batch -` on `commands` (one per line).
    fn ip_batch(&self, options: &[&str], commands: &str) -> Result<()> {
        let mut ip = Command::new("ip");
        ip.args(options).args(["-n", &self.name, "-batch", "-"]);
        if let Err(stderr) = run_with_input(ip, commands)? {
            bail!(
                "`ip -n {} -batch` failed: {}\ncommands:\n{commands}",
                self.name,
                stderr.trim()
            );
        }
        Ok(())
    }

    /// Sets sysctls (`net.ipv4.ip_forward` style keys) as seen inside the namespace.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.enter(|| {
            for (key, value) in settings {
                let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value)
                    .with_context(|| format!("setting {key} = {value} in {}", self.name))?;
            }
            Ok(())
        })?
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates and
    /// interfaces it names belong to the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    set_netns(fd)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread inside {} panicked", self.name))?
        })
    }

    /// Makes `command` start inside the namespace (only its network namespace changes).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: between fork and exec the closure only makes the setns system call on a
        // descriptor that stays open in the parent for as long as the namespace is alive.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    }

    /// Deletes the namespace; its interfaces go with it once nothing holds it.
    pub fn delete(self) -> Result<()> {
        let Self { name, file } = self;
        drop(file);
        delete_named(&name)
    }
}

fn set_netns(fd: BorrowedFd) -> Result<()> {
    // SAFETY: setns on a valid namespace descriptor; it only changes the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("entering a network namespace");
    }
    Ok(())
}

/// Deletes the named namespace, after ending the processes still inside it.
pub fn delete_named(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    for pid in pids_inside(&path)? {
        // SAFETY: plain kill(2); the process was started inside a test-bed namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    run(Command::new("ip").args(["netns", "delete", name]))
}

/// Processes (other than this one) whose network namespace is the one at `path`.
fn pids_inside(path: &Path) -> Result<Vec<i32>> {
    let inode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .ino();
    let wanted = format!("net:[{inode}]");
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end while we look: then it is nothing to kill.
        let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        if pid != me && link.to_str() == Some(wanted.as_str()) {
            pids.push(i32::try_from(pid).context("pid out of range")?);
        }
    }
    Ok(pids)
}

/// Names of the namespaces under [`NETNS_DIR`] that `wanted` selects.
pub fn named(wanted: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("reading {NETNS_DIR}")),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| wanted(name))
        .collect();
    names.sort();
    Ok(names)
}

/// Runs `command` to its end; its stderr is the error when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    output(command).map(drop)
}

/// Runs `command` to its end (stdin empty) and returns its stdout; its stderr is the
/// error when it fails.
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `command` with `input` on its standard input: `Ok(Err(stderr))` when
/// it ran and failed, `Err` when it could not be run.
pub fn run_with_input(mut command: Command, input: &str) -> Result<Result<(), String>> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{program}`"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to `{program}`"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{program}`"))?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}
