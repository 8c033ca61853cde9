//! The kernel's maps as userspace sees them: the only place that writes them,
//! reconciling every map with a compiled state in a generation of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::path::Path;

use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    lpm_trie::Key,
};
use aya::{Ebpf, Pod};
use enforcer_common::{
    AddrKey, CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, EventBudget, GENERATION_BIT, NO_POLICY,
    PeerClass, PeerKeyV4, PeerKeyV6, PodEntry, PodTraffic, PodUid, PortKey, PortVerdict, REASONS,
    RuleName, RuleTraffic, Settings, VERDICT_GENERATION, map_names,
};

use crate::compile::{Compiled, LpmKey};
use crate::eval::RuleRef;
use crate::model::{Direction, EnforcingMode, NodeConfig, UnknownVlanAction};

/// Errors of reading or writing a map, naming it.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open the pinned map {path}")]
    Pinned {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("pod UID {0:?} is longer than the kernel's {max} bytes", max = UID_BYTES)]
    UidTooLong(String),
    #[error("security group ID {0:?} is longer than the kernel's {max} bytes", max = GROUP_BYTES)]
    GroupIdTooLong(String),
    #[error("{0} policies, classes or rules: IDs must stay below the generation bit")]
    TooManyIds(u32),
    #[error("cannot count the CPUs: {0}")]
    Cpus(String),
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

const UID_BYTES: usize = 48;
const GROUP_BYTES: usize = 32;

/// Typed handles on every map userspace fills or reads.
pub struct KernelMaps {
    pods: HashMap<MapData, u16, PodEntry>,
    peers_v4: LpmTrie<MapData, PeerKeyV4, PeerClass>,
    peers_v6: LpmTrie<MapData, PeerKeyV6, PeerClass>,
    ports: LpmTrie<MapData, PortKey, PortVerdict>,
    unfiltered: HashMap<MapData, AddrKey, u8>,
    node_local: HashMap<MapData, AddrKey, u8>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    rules: HashMap<MapData, u32, RuleName>,
    pod_modes: HashMap<MapData, PodUid, u8>,
    pod_traffic: PerCpuArray<MapData, PodTraffic>,
    rule_traffic: PerCpuHashMap<MapData, u32, RuleTraffic>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    /// What rules of generations already retired admitted, by rule.
    retired_traffic: BTreeMap<RuleRef, RuleTraffic>,
}

/// What one apply changed, for logs and for the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
}

/// A map found by name, in a loaded object or pinned under a pin path.
trait MapSource {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError>;
}

impl MapSource for Ebpf {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError> {
        self.take_map(name).ok_or(MapsError::Missing(name))
    }
}

impl MapSource for &Path {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError> {
        let path = crate::ebpf::map_pin(self, name);
        let pinned = |source| MapsError::Pinned {
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(pinned)?;
        Map::from_map_data(data).map_err(pinned)
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    source: &mut impl MapSource,
    name: &'static str,
) -> Result<T, MapsError> {
    T::try_from(source.map(name)?).map_err(map_err(name))
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (its programs keep using them).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_source(ebpf)
    }

    /// Opens the maps pinned under `pin_path` (no programs needed).
    pub fn open_pinned(pin_path: &Path) -> Result<Self, MapsError> {
        Self::from_source(&mut { pin_path })
    }

    fn from_source(source: &mut impl MapSource) -> Result<Self, MapsError> {
        Ok(Self {
            pods: typed(source, map_names::PODS)?,
            peers_v4: typed(source, map_names::PEERS_V4)?,
            peers_v6: typed(source, map_names::PEERS_V6)?,
            ports: typed(source, map_names::PORTS)?,
            unfiltered: typed(source, map_names::UNFILTERED)?,
            node_local: typed(source, map_names::NODE_LOCAL)?,
            conntrack: typed(source, map_names::CONNTRACK)?,
            settings: typed(source, map_names::SETTINGS)?,
            counters: typed(source, map_names::COUNTERS)?,
            rules: typed(source, map_names::RULES)?,
            pod_modes: typed(source, map_names::POD_MODES)?,
            pod_traffic: typed(source, map_names::POD_TRAFFIC)?,
            rule_traffic: typed(source, map_names::RULE_TRAFFIC)?,
            event_budget: typed(source, map_names::EVENT_BUDGET)?,
            retired_traffic: BTreeMap::new(),
        })
    }

    /// Makes the kernel enforce `compiled` with `node`'s settings. The new
    /// generation's policy entries go in before the pods switch to them, one
    /// atomic update per pod, and the old generation leaves after a grace
    /// period, so no pod ever points at a missing or half-written policy. A
    /// pod that is gone loses its tracked flows and counters, so a reused VLAN
    /// inherits neither. Tracked flows of remaining pods are kept.
    pub fn apply(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        let generation = self.next_generation()?;
        let next = Generation::tag(compiled, generation)?;
        let mut stats = ApplyStats::default();

        let mut wanted_settings = settings(node);
        wanted_settings.events = self.settings()?.events;
        self.settings
            .set(0, wanted_settings, 0)
            .map_err(map_err(map_names::SETTINGS))?;
        stats.written += 1;
        // Counters of this generation left by an interrupted apply or a late packet.
        self.take_rule_traffic(|key| key & GENERATION_BIT == generation)?;
        stats.written += write_hash(&mut self.rules, &next.rules, map_names::RULES)?;
        stats.written += write_lpm(&mut self.peers_v4, &next.peers_v4, map_names::PEERS_V4)?;
        stats.written += write_lpm(&mut self.peers_v6, &next.peers_v6, map_names::PEERS_V6)?;
        stats.written += write_lpm(&mut self.ports, &next.ports, map_names::PORTS)?;
        stats.written += write_hash(
            &mut self.unfiltered,
            &compiled.unfiltered,
            map_names::UNFILTERED,
        )?;
        stats.written += write_hash(
            &mut self.node_local,
            &compiled.node_local,
            map_names::NODE_LOCAL,
        )?;

        let before: BTreeSet<u16> = keys(&self.pods, map_names::PODS)?.into_iter().collect();
        for vlan in next.pods.keys().filter(|vlan| !before.contains(vlan)) {
            self.reset_pod_traffic(*vlan)?;
        }
        stats.written += write_hash(&mut self.pods, &next.pods, map_names::PODS)?;
        let gone_pods: Vec<u16> = before
            .iter()
            .copied()
            .filter(|vlan| !next.pods.contains_key(vlan))
            .collect();
        for vlan in &gone_pods {
            self.pods.remove(vlan).map_err(map_err(map_names::PODS))?;
            self.reset_pod_traffic(*vlan)?;
        }
        stats.removed += gone_pods.len();
        stats.removed += self.forget_flows(|key| !next.pods.contains_key(&key.vlan))?;

        if !before.is_empty() {
            wait_for_running_programs();
        }
        let old = generation ^ GENERATION_BIT;
        for (key, traffic) in self.take_rule_traffic(|key| key & GENERATION_BIT == old)? {
            if let Some(rule) = self.rule_ref(key)? {
                let total = self.retired_traffic.entry(rule).or_default();
                total.packets += traffic.packets;
                total.bytes += traffic.bytes;
            }
        }
        stats.removed += remove_stale_hash(
            &mut self.node_local,
            &compiled.node_local,
            map_names::NODE_LOCAL,
        )?;
        stats.removed += remove_stale_hash(
            &mut self.unfiltered,
            &compiled.unfiltered,
            map_names::UNFILTERED,
        )?;
        stats.removed += remove_stale_lpm(&mut self.ports, &next.ports, map_names::PORTS)?;
        stats.removed += remove_stale_lpm(&mut self.peers_v6, &next.peers_v6, map_names::PEERS_V6)?;
        stats.removed += remove_stale_lpm(&mut self.peers_v4, &next.peers_v4, map_names::PEERS_V4)?;
        stats.removed += remove_stale_hash(&mut self.rules, &next.rules, map_names::RULES)?;
        Ok(stats)
    }

    /// The generation the next apply writes: the one the pods do not use.
    /// After an apply cut short between pods, the first pod's decides; the
    /// others are rewritten in place by this apply.
    fn next_generation(&self) -> Result<u32, MapsError> {
        for entry in self.pods.iter() {
            let (_, pod) = entry.map_err(map_err(map_names::PODS))?;
            if let Some(&handle) = pod.policies.iter().find(|&&h| h != NO_POLICY) {
                return Ok((handle & GENERATION_BIT) ^ GENERATION_BIT);
            }
        }
        Ok(0)
    }

    fn reset_pod_traffic(&mut self, vlan: u16) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![PodTraffic::default(); cpus()?])
            .map_err(|e| MapsError::Cpus(e.to_string()))?;
        self.pod_traffic
            .set(u32::from(vlan), zero, 0)
            .map_err(map_err(map_names::POD_TRAFFIC))
    }

    /// Removes the per-rule counters whose key `selected` picks; returns their CPU sums.
    fn take_rule_traffic(
        &mut self,
        selected: impl Fn(u32) -> bool,
    ) -> Result<Vec<(u32, RuleTraffic)>, MapsError> {
        let mut taken = Vec::new();
        for key in self
            .rule_traffic
            .keys()
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(map_names::RULE_TRAFFIC))?
        {
            if !selected(key) {
                continue;
            }
            match self.rule_traffic.get(&key, 0) {
                Ok(values) => taken.push((key, sum_rule_traffic(&values))),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
            }
            match self.rule_traffic.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
            }
        }
        Ok(taken)
    }

    /// Removes the tracked flows `doomed` selects; returns how many.
    pub fn forget_flows(&mut self, doomed: impl Fn(&CtKey) -> bool) -> Result<usize, MapsError> {
        let keys: Vec<CtKey> = self
            .conntrack
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK))?;
        let mut removed = 0;
        for key in keys.iter().filter(|k| doomed(k)) {
            match self.conntrack.remove(key) {
                // An LRU eviction may have beaten us to it.
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            }
        }
        Ok(removed)
    }

    /// One tracked flow, if the kernel holds it.
    pub fn flow(&self, key: &CtKey) -> Result<Option<CtEntry>, MapsError> {
        match self.conntrack.get(key, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::CONNTRACK)(e)),
        }
    }

    /// Every tracked flow, as the kernel holds it now.
    pub fn flows(&self) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
        self.conntrack
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// Packets per [`enforcer_common::Reason`], summed over CPUs.
    pub fn counters(&self) -> Result<[u64; REASONS as usize], MapsError> {
        let mut totals = [0; REASONS as usize];
        for (slot, total) in (0..REASONS).zip(totals.iter_mut()) {
            let per_cpu = self
                .counters
                .get(&slot, 0)
                .map_err(map_err(map_names::COUNTERS))?;
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    /// Overwrites one tracked flow (tests use it to age entries past their timeouts).
    pub fn set_flow(&mut self, key: &CtKey, entry: &CtEntry) -> Result<(), MapsError> {
        self.conntrack
            .insert(key, entry, 0)
            .map_err(map_err(map_names::CONNTRACK))
    }

    /// The pods the kernel enforces now, by VLAN.
    pub fn pods(&self) -> Result<BTreeMap<u16, PodEntry>, MapsError> {
        self.pods
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::PODS))
    }

    /// The node settings the kernel uses now.
    pub fn settings(&self) -> Result<Settings, MapsError> {
        self.settings
            .get(&0, 0)
            .map_err(map_err(map_names::SETTINGS))
    }

    /// Sets [`Settings::events`] (which verdicts become events), keeping the rest.
    pub fn set_event_flags(&mut self, events: u32) -> Result<(), MapsError> {
        let mut settings = self.settings()?;
        settings.events = events;
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(map_names::SETTINGS))
    }

    /// A pod's traffic by verdict since it appeared, summed over CPUs.
    pub fn pod_traffic(&self, vlan: u16) -> Result<PodTraffic, MapsError> {
        let values = self
            .pod_traffic
            .get(&u32::from(vlan), 0)
            .map_err(map_err(map_names::POD_TRAFFIC))?;
        Ok(values.iter().fold(PodTraffic::default(), |mut sum, t| {
            sum.allowed_packets += t.allowed_packets;
            sum.allowed_bytes += t.allowed_bytes;
            sum.denied_packets += t.denied_packets;
            sum.denied_bytes += t.denied_bytes;
            sum
        }))
    }

    /// What each rule admitted since this process first applied a state:
    /// retired generations folded in, the current one live from the kernel.
    pub fn rule_traffic(&self) -> Result<BTreeMap<RuleRef, RuleTraffic>, MapsError> {
        let mut totals = self.retired_traffic.clone();
        for entry in self.rule_traffic.iter() {
            let (key, values) = entry.map_err(map_err(map_names::RULE_TRAFFIC))?;
            if let Some(rule) = self.rule_ref(key)? {
                let traffic = sum_rule_traffic(&values);
                let total = totals.entry(rule).or_default();
                total.packets += traffic.packets;
                total.bytes += traffic.bytes;
            }
        }
        Ok(totals)
    }

    /// Verdict events not sent (over the rate limit or a full ring), all CPUs.
    pub fn suppressed_events(&self) -> Result<u64, MapsError> {
        let values = self
            .event_budget
            .get(&0, 0)
            .map_err(map_err(map_names::EVENT_BUDGET))?;
        Ok(values.iter().map(|b| b.suppressed).sum())
    }

    /// The rule a rule key (rule ID with generation) stands for, while its generation is live.
    pub fn rule_ref(&self, key: u32) -> Result<Option<RuleRef>, MapsError> {
        match self.rules.get(&key, 0) {
            Ok(name) => Ok(Some(rule_ref(&name))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::RULES)(e)),
        }
    }

    /// Every pod's enforcing mode as first seen, by pod UID.
    pub fn pod_modes(&self) -> Result<BTreeMap<String, EnforcingMode>, MapsError> {
        let mut modes = BTreeMap::new();
        for entry in self.pod_modes.iter() {
            let (uid, mode) = entry.map_err(map_err(map_names::POD_MODES))?;
            if let Some(mode) = EnforcingMode::from_u8(mode) {
                modes.insert(text(&uid.uid), mode);
            }
        }
        Ok(modes)
    }

    /// Makes the mode store hold exactly `modes`: pods gone from the state leave it.
    pub fn record_pod_modes(
        &mut self,
        modes: &BTreeMap<String, EnforcingMode>,
    ) -> Result<(), MapsError> {
        let wanted: BTreeMap<PodUid, u8> = modes
            .iter()
            .map(|(uid, mode)| Ok((pod_uid(uid)?, *mode as u8)))
            .collect::<Result<_, MapsError>>()?;
        write_hash(&mut self.pod_modes, &wanted, map_names::POD_MODES)?;
        remove_stale_hash(&mut self.pod_modes, &wanted, map_names::POD_MODES)?;
        Ok(())
    }
}

/// The entries of one apply, tagged with its generation.
struct Generation {
    pods: BTreeMap<u16, PodEntry>,
    peers_v4: BTreeMap<LpmKey<PeerKeyV4>, PeerClass>,
    peers_v6: BTreeMap<LpmKey<PeerKeyV6>, PeerClass>,
    ports: BTreeMap<LpmKey<PortKey>, PortVerdict>,
    rules: BTreeMap<u32, RuleName>,
}

impl Generation {
    fn tag(compiled: &Compiled, generation: u32) -> Result<Self, MapsError> {
        let limit = u32::try_from(
            compiled
                .rules
                .len()
                .max(compiled.policies.len())
                .max(compiled.ports.len()),
        )
        .unwrap_or(u32::MAX);
        if limit >= GENERATION_BIT {
            return Err(MapsError::TooManyIds(limit));
        }
        let handle = |h: u32| if h == NO_POLICY { h } else { h | generation };
        let be = |bytes: [u8; 4]| (u32::from_be_bytes(bytes) | generation).to_be_bytes();
        let class = |c: &PeerClass| PeerClass {
            class: c.class | generation,
        };
        let pods = compiled
            .pods
            .iter()
            .map(|(vlan, pod)| {
                let mut pod = *pod;
                pod.policies = pod.policies.map(handle);
                (*vlan, pod)
            })
            .collect();
        let peers_v4 = compiled
            .peers_v4
            .iter()
            .map(|(key, value)| {
                let mut key = *key;
                key.data.policy = be(key.data.policy);
                (key, class(value))
            })
            .collect();
        let peers_v6 = compiled
            .peers_v6
            .iter()
            .map(|(key, value)| {
                let mut key = *key;
                key.data.policy = be(key.data.policy);
                (key, class(value))
            })
            .collect();
        let verdict_flag = if generation == 0 {
            0
        } else {
            VERDICT_GENERATION
        };
        let ports = compiled
            .ports
            .iter()
            .map(|(key, value)| {
                let mut key = *key;
                key.data.class = be(key.data.class);
                let mut value = *value;
                value.flags |= verdict_flag;
                (key, value)
            })
            .collect();
        let rules = (1..)
            .zip(&compiled.rules)
            .map(|(id, rule): (u32, &RuleRef)| Ok((id | generation, rule_name(rule)?)))
            .collect::<Result<_, MapsError>>()?;
        Ok(Self {
            pods,
            peers_v4,
            peers_v6,
            ports,
            rules,
        })
    }
}

/// Waits until every program that may have read a pod's old entry has finished:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is an RCU grace period, and TC programs
/// run inside RCU read-side sections. Kernels that refuse it (nohz_full) get a
/// pause far longer than any program run.
fn wait_for_running_programs() {
    /// `MEMBARRIER_CMD_GLOBAL` of `linux/membarrier.h`.
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes no pointers.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0;
    if !done {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn cpus() -> Result<usize, MapsError> {
    aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))
}

fn sum_rule_traffic(values: &PerCpuValues<RuleTraffic>) -> RuleTraffic {
    values.iter().fold(RuleTraffic::default(), |mut sum, t| {
        sum.packets += t.packets;
        sum.bytes += t.bytes;
        sum
    })
}

fn pod_uid(uid: &str) -> Result<PodUid, MapsError> {
    let mut key = PodUid {
        uid: [0; UID_BYTES],
    };
    let bytes = uid.as_bytes();
    key.uid
        .get_mut(..bytes.len())
        .ok_or_else(|| MapsError::UidTooLong(uid.to_string()))?
        .copy_from_slice(bytes);
    Ok(key)
}

fn rule_name(rule: &RuleRef) -> Result<RuleName, MapsError> {
    let mut group = [0; GROUP_BYTES];
    let bytes = rule.group_id.as_bytes();
    group
        .get_mut(..bytes.len())
        .ok_or_else(|| MapsError::GroupIdTooLong(rule.group_id.clone()))?
        .copy_from_slice(bytes);
    Ok(RuleName {
        group,
        index: u32::try_from(rule.index).unwrap_or(u32::MAX),
        direction: match rule.direction {
            Direction::Ingress => DIR_INGRESS as u8,
            Direction::Egress => DIR_EGRESS as u8,
        },
        _pad: [0; 3],
    })
}

fn rule_ref(name: &RuleName) -> RuleRef {
    RuleRef {
        group_id: text(&name.group),
        direction: if usize::from(name.direction) == DIR_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        index: name.index as usize,
    }
}

/// A zero-padded string of a map key or value.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The kernel's copy of the NodeConfig settings it needs per packet.
pub fn settings(node: &NodeConfig) -> Settings {
    Settings {
        unknown_vlan_pass: u32::from(node.unknown_vlan == UnknownVlanAction::Pass),
        tcp_established_timeout: node.connection_tracking.tcp_established,
        udp_stream_timeout: node.connection_tracking.udp_stream,
        udp_timeout: node.connection_tracking.udp,
        events: 0,
    }
}

fn keys<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<K>, MapsError> {
    map.keys().collect::<Result<_, _>>().map_err(map_err(name))
}

fn write_hash<K: Pod + Ord + Hash, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    for (key, value) in wanted {
        map.insert(key, value, 0).map_err(map_err(name))?;
    }
    Ok(wanted.len())
}

fn remove_stale_hash<K: Pod + Ord, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    let stale: Vec<K> = keys(map, name)?
        .into_iter()
        .filter(|key| !wanted.contains_key(key))
        .collect();
    for key in &stale {
        map.remove(key).map_err(map_err(name))?;
    }
    Ok(stale.len())
}

fn write_lpm<K: Pod + Ord, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    wanted: &BTreeMap<LpmKey<K>, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    for (key, value) in wanted {
        map.insert(&Key::new(key.prefix_len, key.data), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(wanted.len())
}

fn remove_stale_lpm<K: Pod + Ord, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    wanted: &BTreeMap<LpmKey<K>, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    let mut stale = Vec::new();
    for key in map.keys() {
        let key = key.map_err(map_err(name))?;
        let lpm = LpmKey {
            data: key.data(),
            prefix_len: key.prefix_len(),
        };
        if !wanted.contains_key(&lpm) {
            stale.push(key);
        }
    }
    for key in &stale {
        map.remove(key).map_err(map_err(name))?;
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::fixtures::{cidr, group, model, node, pod, rule, tcp};

    fn compiled(mode: EnforcingMode) -> Compiled {
        let mut state = model(
            vec![
                group(
                    "sg-web",
                    vec![rule(tcp(443, 443), cidr("10.0.0.0/16"))],
                    vec![],
                ),
                group(
                    "sg-node",
                    vec![rule(tcp(22, 22), cidr("10.0.0.0/8"))],
                    vec![],
                ),
            ],
            vec![pod(7, "10.0.1.7", &["sg-web"], mode)],
        );
        state.node = node(mode, &["sg-node"]);
        crate::compile::compile(&state).expect("compiles")
    }

    #[test]
    fn a_generation_tags_handles_classes_and_verdicts_but_not_no_policy() {
        let compiled = compiled(EnforcingMode::Strict);
        let tagged = Generation::tag(&compiled, GENERATION_BIT).expect("tags");
        let pod = tagged.pods[&7];
        assert_eq!(
            pod.policies[0],
            compiled.pods[&7].policies[0] | GENERATION_BIT
        );
        assert_eq!(
            pod.policies[2], NO_POLICY,
            "strict: no primary side, untagged"
        );
        assert!(tagged.peers_v4.iter().all(|(k, v)| {
            u32::from_be_bytes(k.data.policy) & GENERATION_BIT != 0 && v.class & GENERATION_BIT != 0
        }));
        assert!(tagged.ports.iter().all(|(k, v)| {
            u32::from_be_bytes(k.data.class) & GENERATION_BIT != 0
                && v.flags & VERDICT_GENERATION != 0
                && v.rule_key() == v.rule | GENERATION_BIT
        }));
        assert_eq!(tagged.rules.len(), compiled.rules.len());
        assert!(tagged.rules.keys().all(|k| k & GENERATION_BIT != 0));
    }

    #[test]
    fn generation_zero_is_the_compiled_entries_themselves() {
        let compiled = compiled(EnforcingMode::Standard);
        let tagged = Generation::tag(&compiled, 0).expect("tags");
        assert_eq!(tagged.pods, compiled.pods);
        assert_eq!(tagged.peers_v4, compiled.peers_v4);
        assert_eq!(tagged.ports, compiled.ports);
        let names: Vec<RuleRef> = tagged.rules.values().map(rule_ref).collect();
        assert_eq!(names, compiled.rules, "the rule table round-trips");
    }

    #[test]
    fn over_long_names_are_errors_not_truncations() {
        assert!(matches!(
            pod_uid(&"u".repeat(UID_BYTES + 1)),
            Err(MapsError::UidTooLong(_))
        ));
        assert_eq!(text(&pod_uid("uid-1").expect("fits").uid), "uid-1");
        let rule = RuleRef {
            group_id: "sg-".repeat(11),
            direction: Direction::Egress,
            index: 3,
        };
        assert!(matches!(
            rule_name(&rule),
            Err(MapsError::GroupIdTooLong(_))
        ));
    }
}
