//! The virtual Nitro node: namespaces for the VPC, the node and each pod, branch pods' frames
//! crossing the trunk VLAN-tagged, `enforcer run` under test on it; torn down whole.

use std::ffi::OsString;
pub mod agent;
pub mod datapath;
pub mod generator;
pub mod matrix;
pub mod netns;
pub mod nft;
pub mod scenario;
pub mod throughput;
pub mod traffic;
pub mod wiring;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use enforcer::model::{BranchPod, EnforcingMode, Model};
use enforcer_common::{COUNTER_SLOTS, Reason, counter_slot};

use self::agent::Agent;
use self::datapath::{Datapath, TrunkDirection, TrunkFrames};
use self::netns::Namespace;
use self::scenario::{Endpoint, Flow};
use self::traffic::{Outcome, Probe, Server, TcpSession};
use self::wiring::Mac;

/// Every namespace, pin directory and work directory of a virtual node starts with this.
pub const NAME_PREFIX: &str = "sgptb-";

/// Where the enforcer's pins of each virtual node go (`<here>/<run>`).
const BPF_FS: &str = "/sys/fs/bpf";

/// What to build.
pub struct NodeSpec {
    /// The state directory (copied: the agent reads the copy, which tests may change).
    pub state: PathBuf,
    /// The enforcing mode written into the copy's NodeConfig.
    pub mode: EnforcingMode,
    /// Addresses of the VPC (and of the internet beyond it) that flows use.
    pub vpc_peers: Vec<IpAddr>,
    /// The `enforcer` binary; `None`: [`agent::enforcer_binary`].
    pub enforcer: Option<PathBuf>,
}

/// A namespace standing for a pod, and how it is wired.
struct PodHost {
    ns: Namespace,
    /// Its veth's node side.
    host_link: String,
    addresses: Vec<IpAddr>,
    /// The branch pod's name, or the regular pod's first address.
    label: String,
    /// The branch pod's index in the model.
    branch: Option<usize>,
}

/// One probe's result, with what the enforcer counted meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub outcome: Outcome,
    /// Counter increments per reason while the probe ran (only non-zero ones).
    pub reasons: Vec<(Reason, u64)>,
    /// Frames of audited pods passed although `reason` drops them, while the probe ran.
    pub would_drops: Vec<(Reason, u64)>,
}

impl Observation {
    /// Packets the enforcer dropped for want of a rule (branch or primary groups).
    pub fn policy_drops(&self) -> u64 {
        self.reasons
            .iter()
            .filter(|(r, _)| matches!(r, Reason::DropPolicy | Reason::DropPrimaryPolicy))
            .map(|(_, n)| n)
            .sum()
    }
}

/// The virtual node; dropping it tears everything down.
pub struct VirtualNode {
    run: String,
    model: Model,
    state: PathBuf,
    work_dir: PathBuf,
    pin_path: PathBuf,
    enforcer: PathBuf,
    vpc: Option<Namespace>,
    node: Option<Namespace>,
    pods: Vec<PodHost>,
    datapath: Option<Datapath>,
    agent: Option<Agent>,
    agent_runs: u32,
    servers: BTreeMap<(String, SocketAddr, Probe), Server>,
}

impl VirtualNode {
    /// Builds the VPC, the node and its pods from `spec` (the agent is not started yet).
    /// On error, whatever was built is torn down.
    pub fn build(spec: &NodeSpec) -> Result<Self> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let work_dir = std::env::temp_dir().join(&run);
        let state = work_dir.join("state");
        let prepared = (|| -> Result<(Model, PathBuf)> {
            copy_state(&spec.state, &state, spec.mode)?;
            let model = enforcer::source::load(&state)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("loading the state {}", spec.state.display()))?;
            let enforcer = match &spec.enforcer {
                Some(path) => path.clone(),
                None => agent::enforcer_binary()?,
            };
            Ok((model, enforcer))
        })();
        let (model, enforcer) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = remove_dir(&work_dir);
                return Err(e);
            }
        };
        let mut node = Self {
            pin_path: Path::new(BPF_FS).join(&run),
            run,
            model,
            state,
            work_dir,
            enforcer,
            vpc: None,
            node: None,
            pods: Vec::new(),
            datapath: None,
            agent: None,
            agent_runs: 0,
            servers: BTreeMap::new(),
        };
        node.wire(&spec.vpc_peers)?;
        Ok(node)
    }

    fn wire(&mut self, vpc_peers: &[IpAddr]) -> Result<()> {
        let mut datapath = Datapath::load()?;
        let vpc = Namespace::create(&format!("{}-vpc", self.run))?;
        let vpc = self.vpc.insert(vpc);
        let node = Namespace::create(&format!("{}-node", self.run))?;
        let node = self.node.insert(node);
        for ns in [&*vpc, &*node] {
            ns.sysctl(wiring::COMMON_SYSCTLS)?;
            ns.sysctl(wiring::ROUTER_SYSCTLS)?;
        }
        let config = &self.model.node;
        node.ip(&wiring::node(
            vpc.name(),
            &config.primary_interface,
            &config.primary_ips,
        ))?;
        node.ip(&wiring::trunk_veth(vpc.name(), &config.trunk_interface))?;
        // The trunk carries only branch traffic: no addresses or discovery of its own.
        node.sysctl(&[(
            &format!("net.ipv6.conf.{}.disable_ipv6", config.trunk_interface),
            "1",
        )])?;

        let branch_addresses: Vec<IpAddr> =
            self.model.pods.iter().flat_map(|p| p.addresses()).collect();
        let regular_pods: Vec<IpAddr> = self
            .model
            .node_local
            .iter()
            .filter(|a| !config.primary_ips.contains(a) && !branch_addresses.contains(a))
            .copied()
            .collect();
        let mut hosts: Vec<(String, Vec<IpAddr>, Option<usize>)> = self
            .model
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), p.addresses().collect(), Some(i)))
            .collect();
        hosts.extend(regular_pods.iter().map(|a| (a.to_string(), vec![*a], None)));
        for (index, (label, addresses, branch)) in hosts.into_iter().enumerate() {
            let index = u16::try_from(index).context("too many pods")?;
            let pod = branch.map(|i| &self.model.pods[i]);
            let host = self.wire_pod(index, &label, &addresses, pod, &mut datapath)?;
            self.pods.push(host);
        }

        let vpc = self.vpc.as_ref().expect("created above");
        let node = self.node.as_ref().expect("created above");
        let mut on_primary = config.primary_ips.clone();
        on_primary.extend(&regular_pods);
        let branches: Vec<(IpAddr, u16)> = self
            .model
            .pods
            .iter()
            .flat_map(|p| p.addresses().map(|a| (a, p.vlan)))
            .collect();
        vpc.ip(&wiring::vpc(vpc_peers, &on_primary, &branches))?;
        for (addr, vlan) in &branches {
            datapath.add_branch_address(*addr, *vlan)?;
        }
        datapath.attach_fabric(vpc, wiring::VPC_TRUNK)?;
        datapath.attach_trunk_witness(node, &config.trunk_interface)?;
        self.datapath = Some(datapath);
        Ok(())
    }

    fn wire_pod(
        &self,
        index: u16,
        label: &str,
        addresses: &[IpAddr],
        branch: Option<&BranchPod>,
        datapath: &mut Datapath,
    ) -> Result<PodHost> {
        let node = self.node.as_ref().expect("node namespace");
        let ns = Namespace::create(&format!("{}-pod-{label}", self.run))?;
        ns.sysctl(wiring::COMMON_SYSCTLS)?;
        let (prefix, mac) = match branch {
            Some(pod) => (
                match pod.mode {
                    EnforcingMode::Strict => "vlan",
                    EnforcingMode::Standard => "eni",
                },
                Mac::parse(&pod.mac)
                    .with_context(|| format!("MAC {:?} of pod {}", pod.mac, pod.key()))?,
            ),
            None => ("eni", Mac::regular_pod(index)),
        };
        let host_link = wiring::host_link(prefix, label);
        let trunk = &self.model.node.trunk_interface;
        let wired = node
            .ip(&wiring::node_side_of_pod(
                index,
                ns.name(),
                &host_link,
                mac,
                addresses,
                branch,
                trunk,
            ))
            .and_then(|()| ns.ip(&wiring::pod(addresses, Mac::host_side(index))))
            .and_then(|()| match branch {
                Some(pod) => {
                    datapath.attach_vlan_link(node, &wiring::vlan_link(pod.vlan), pod.vlan)
                }
                None => Ok(()),
            });
        if let Err(e) = wired {
            // Not yet owned by the node: delete it here.
            let _ = ns.delete();
            return Err(e);
        }
        Ok(PodHost {
            ns,
            host_link,
            addresses: addresses.to_vec(),
            label: label.to_string(),
            branch: branch.and_then(|b| self.model.pods.iter().position(|p| p.key() == b.key())),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The state directory the agent reads (a copy: tests may change it, then restart).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// `enforcer ARGS` (the binary the agent runs), as an operator on the node runs it.
    pub fn enforcer_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.enforcer);
        command.args(args);
        command
    }

    /// Namespaces' prefix, pin directory and work directory name of this node.
    pub fn run_name(&self) -> &str {
        &self.run
    }

    /// Starts `enforcer run` on the state directory; returns once it enforces.
    pub fn start_agent(&mut self) -> Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.agent_runs += 1;
        let log = self.work_dir.join(format!("agent-{}.log", self.agent_runs));
        let agent = Agent::start(
            &self.enforcer,
            self.node.as_ref().expect("node namespace"),
            &self.model.node.trunk_interface,
            &self.state,
            &self.pin_path,
            log,
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Starts `enforcer run` with other source arguments (`--source cluster …`) and
    /// environment; returns once it enforces.
    pub fn start_agent_with(
        &mut self,
        source: &[OsString],
        env: &[(String, String)],
    ) -> Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.agent_runs += 1;
        let log = self.work_dir.join(format!("agent-{}.log", self.agent_runs));
        let agent = Agent::start_with(
            &self.enforcer,
            self.node_namespace(),
            &self.model.node.trunk_interface,
            source,
            env,
            &self.pin_path,
            log,
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    /// The node's network namespace (the agent's, and the host network's).
    pub fn node_namespace(&self) -> &Namespace {
        self.node.as_ref().expect("node namespace")
    }

    /// Stops the agent as an operator would (SIGTERM).
    pub fn stop_agent(&mut self) -> Result<()> {
        match self.agent.take() {
            Some(agent) => agent.stop(),
            None => bail!("no agent is running"),
        }
    }

    /// Kills the agent as a crash would (SIGKILL).
    pub fn kill_agent(&mut self) -> Result<()> {
        match self.agent.take() {
            Some(agent) => {
                agent.kill();
                Ok(())
            }
            None => bail!("no agent is running"),
        }
    }

    /// What the running agent printed so far.
    pub fn agent_output(&self) -> String {
        self.agent.as_ref().map(Agent::output).unwrap_or_default()
    }

    /// IDs of the enforcer's programs on the trunk (ingress, egress), if attached.
    pub fn enforcer_programs(&self) -> Result<[Option<u32>; 2]> {
        agent::enforcer_programs(
            self.node.as_ref().expect("node namespace"),
            &self.model.node.trunk_interface,
        )
    }

    /// The enforcer's counters per [`enforcer_common::counter_slot`] (the agent must have run once).
    pub fn counters(&self) -> Result<[u64; COUNTER_SLOTS as usize]> {
        agent::counters(&self.pin_path)
    }

    /// What the witness behind the enforcer counted on the trunk (frames it passed).
    pub fn trunk_frames(&self, direction: TrunkDirection, vlan: u16) -> Result<TrunkFrames> {
        self.datapath
            .as_ref()
            .expect("datapath")
            .trunk_frames(direction, vlan)
    }

    /// The namespace and address of `endpoint` for a flow of `family` (`true`: IPv6).
    pub fn locate(&self, endpoint: &Endpoint, ipv6: bool) -> Result<(&Namespace, IpAddr)> {
        let of_family = |addresses: &[IpAddr], what: &str| {
            addresses
                .iter()
                .find(|a| a.is_ipv6() == ipv6)
                .copied()
                .with_context(|| format!("{what} has no IPv{} address", if ipv6 { 6 } else { 4 }))
        };
        match endpoint {
            Endpoint::Node => Ok((
                self.node.as_ref().expect("node namespace"),
                of_family(&self.model.node.primary_ips, "the node")?,
            )),
            Endpoint::Pod { name, .. } => {
                let host = self
                    .pods
                    .iter()
                    .find(|h| h.branch.is_some() && &h.label == name)
                    .with_context(|| format!("no branch pod {name} on the node"))?;
                Ok((&host.ns, of_family(&host.addresses, name)?))
            }
            Endpoint::LocalPod { name, addr } => {
                let host = self
                    .pods
                    .iter()
                    .find(|h| h.branch.is_none() && h.addresses.contains(addr))
                    .with_context(|| format!("no pod {name} ({addr}) on the node"))?;
                Ok((&host.ns, *addr))
            }
            Endpoint::Peer { addr, .. } => Ok((self.vpc.as_ref().expect("VPC namespace"), *addr)),
        }
    }

    /// Starts the server `flow` needs at its destination (once per address and port).
    pub fn serve(&mut self, flow: &Flow) -> Result<()> {
        if flow.probe == Probe::Ping {
            return Ok(());
        }
        let port = match flow.probe {
            Probe::Tcp(port) | Probe::Udp(port) => port,
            Probe::Ping => unreachable!("handled above"),
        };
        let (ns, addr) = self.locate(&flow.to, flow.ipv6())?;
        let key = (
            ns.name().to_string(),
            SocketAddr::new(addr, port),
            flow.probe,
        );
        if self.servers.contains_key(&key) {
            return Ok(());
        }
        let server = Server::start(ns, key.1, flow.probe)?;
        self.servers.insert(key, server);
        Ok(())
    }

    /// Sends `flow`'s probe (its server must be started) and reports what happened.
    pub fn probe(&self, flow: &Flow) -> Result<Observation> {
        let ipv6 = flow.ipv6();
        let (from_ns, src) = self.locate(&flow.from, ipv6)?;
        let (_, dst) = self.locate(&flow.to, ipv6)?;
        let enforced = self.pin_path.exists();
        let before = if enforced {
            Some(self.counters()?)
        } else {
            None
        };
        let outcome = traffic::probe(from_ns, src, dst, flow.probe)?;
        let (reasons, would_drops) = match before {
            Some(before) => {
                let after = self.counters()?;
                let moved = |would_drop| {
                    Reason::ALL
                        .iter()
                        .map(|&r| (r, counter_slot(r, would_drop) as usize))
                        .filter(|&(_, slot)| after[slot] > before[slot])
                        .map(|(r, slot)| (r, after[slot] - before[slot]))
                        .collect()
                };
                (moved(false), moved(true))
            }
            None => (Vec::new(), Vec::new()),
        };
        Ok(Observation {
            outcome,
            reasons,
            would_drops,
        })
    }

    /// Opens a TCP connection for `flow` (a `Probe::Tcp` flow whose server is started) and
    /// leaves it open.
    pub fn open_session(&self, flow: &Flow) -> Result<TcpSession> {
        let Probe::Tcp(port) = flow.probe else {
            bail!("{flow} is not a TCP flow");
        };
        let ipv6 = flow.ipv6();
        let (from_ns, src) = self.locate(&flow.from, ipv6)?;
        let (_, dst) = self.locate(&flow.to, ipv6)?;
        from_ns
            .enter(|| TcpSession::connect(src, SocketAddr::new(dst, port)))?
            .with_context(|| format!("connecting {flow}"))
    }

    /// How the node is wired, for people.
    pub fn describe(&self) -> String {
        let config = &self.model.node;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "virtual node {} ({} mode): primary {} {}, trunk {}; namespaces {}-*",
            config.name,
            config.enforcing_mode.name(),
            config.primary_interface,
            config
                .primary_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            config.trunk_interface,
            self.run,
        );
        for host in &self.pods {
            let branch = host.branch.map(|i| &self.model.pods[i]);
            let addresses = host
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let label = match branch {
                Some(_) => format!("{} ({addresses})", host.label),
                None => format!("pod {addresses}"),
            };
            wiring::describe_pod(&mut out, &label, &host.host_link, branch);
        }
        out
    }

    /// Tears everything down, reporting the first problem (dropping does the same quietly).
    pub fn teardown(mut self) -> Result<()> {
        self.dismantle()
    }

    fn dismantle(&mut self) -> Result<()> {
        self.servers.clear();
        if let Some(agent) = self.agent.take() {
            agent.kill();
        }
        self.datapath = None;
        let mut first_error = None;
        let mut note = |result: Result<()>| {
            if let Err(e) = result
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        };
        for host in self.pods.drain(..) {
            note(host.ns.delete());
        }
        for ns in [self.node.take(), self.vpc.take()].into_iter().flatten() {
            note(ns.delete());
        }
        for dir in [&self.pin_path, &self.work_dir] {
            note(remove_dir(dir));
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for VirtualNode {
    fn drop(&mut self) {
        if let Err(e) = self.dismantle() {
            eprintln!(
                "tearing down {} left something behind: {e:#} (clean up with `cargo xtask demo --teardown`)",
                self.run
            );
        }
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Copies the state directory's files (not recursive, as the agent reads it), with the
/// NodeConfig's `spec.enforcingMode` set to `mode`.
fn copy_state(from: &Path, to: &Path, mode: EnforcingMode) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mode = mode.name();
    let mut node_configs = 0;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !path.is_file() || !matches!(ext, "json" | "yaml" | "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let (text, found) = if ext == "json" {
            set_mode_json(&text, mode)
        } else {
            set_mode_yaml(&text, mode)
        }
        .with_context(|| format!("parsing {}", path.display()))?;
        node_configs += found;
        let copy = to.join(path.file_name().expect("a file has a name"));
        std::fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))?;
    }
    if node_configs != 1 {
        bail!(
            "{} holds {node_configs} NodeConfig objects, not one",
            from.display()
        );
    }
    Ok(())
}

fn is_node_config(doc: &serde_json::Value) -> bool {
    doc["kind"] == "NodeConfig"
        && doc["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("enforcer.sgp.dev/"))
}

fn set_mode_json(text: &str, mode: &str) -> Result<(String, usize)> {
    let mut doc: serde_json::Value = serde_json::from_str(text)?;
    if !is_node_config(&doc) {
        return Ok((text.to_string(), 0));
    }
    doc["spec"]["enforcingMode"] = mode.into();
    Ok((serde_json::to_string_pretty(&doc)?, 1))
}

fn set_mode_yaml(text: &str, mode: &str) -> Result<(String, usize)> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    let mut found = 0;
    for document in serde_yaml::Deserializer::from_str(text) {
        let mut doc = serde_json::Value::deserialize(document)?;
        if is_node_config(&doc) {
            doc["spec"]["enforcingMode"] = mode.into();
            found += 1;
        }
        docs.push(doc);
    }
    if found == 0 {
        return Ok((text.to_string(), 0));
    }
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc)?);
    }
    Ok((out, found))
}

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub namespaces: Vec<String>,
    pub directories: Vec<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.directories.is_empty()
    }
}

/// Removes what virtual nodes whose names start with `prefix` left behind (a crash, a
/// SIGKILL): their namespaces (with the processes and interfaces inside), the enforcer's
/// pins and the work directories.
pub fn cleanup_leftovers(prefix: &str) -> Result<Leftovers> {
    if !prefix.starts_with(NAME_PREFIX) {
        bail!("{prefix:?} is not a virtual node's prefix ({NAME_PREFIX}…)");
    }
    let mut removed = Leftovers::default();
    for name in netns::named(|n| n.starts_with(prefix))? {
        netns::delete_named(&name)?;
        removed.namespaces.push(name);
    }
    for parent in [PathBuf::from(BPF_FS), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                remove_dir(&entry.path())?;
                removed.directories.push(entry.path());
            }
        }
    }
    Ok(removed)
}

/// Whether anything of the virtual node `run` is still there.
pub fn remains_of(run: &str) -> Result<Vec<String>> {
    let mut remains = netns::named(|n| n.starts_with(&format!("{run}-")))?;
    for dir in [Path::new(BPF_FS).join(run), std::env::temp_dir().join(run)] {
        if dir.exists() {
            remains.push(dir.display().to_string());
        }
    }
    Ok(remains)
}
