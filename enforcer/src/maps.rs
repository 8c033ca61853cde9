//! The kernel's maps as userspace sees them: the only place that writes them,
//! writing only what changed between the enforced and a compiled state.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use aya::maps::{
    Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use aya::{Ebpf, Pod};
use enforcer_common::{
    AddrKey, CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, EventBudget, FragmentKey, FragmentVerdict,
    MAX_ADDRESSES, MAX_PEER_ENTRIES, MAX_PODS, MAX_PORT_ENTRIES, MAX_RULES, NO_POLICY, PeerClass,
    PeerKeyV4, PeerKeyV6, PodEntry, PodTraffic, PodUid, PortKey, PortVerdict, REASONS, RuleName,
    RuleTraffic, Settings, map_names,
};

use crate::compile::{ClassEntries, Compiled, PolicyEntries, RuleIds};
use crate::eval::RuleRef;
use crate::model::{Direction, EnforcingMode, Model, NodeConfig, UnknownVlanAction};

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
    #[error(
        "the state rewrites {map} entries of ID {id}, which are in use, in place: compile it over the enforced state"
    )]
    InPlace { map: &'static str, id: u32 },
    #[error(
        "map {map} is full ({capacity} entries): the state needs more than the enforcer holds; the kernel keeps enforcing the state before it"
    )]
    Full { map: &'static str, capacity: u32 },
    #[error("map {map}: batch operation")]
    Batch {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
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
    peers_v4: HashMap<MapData, PeerKeyV4, PeerClass>,
    peers_v6: HashMap<MapData, PeerKeyV6, PeerClass>,
    ports: HashMap<MapData, PortKey, PortVerdict>,
    node_local: HashMap<MapData, AddrKey, u8>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    fragments: HashMap<MapData, FragmentKey, FragmentVerdict>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    rules: HashMap<MapData, u32, RuleName>,
    pod_modes: HashMap<MapData, PodUid, u8>,
    pod_traffic: PerCpuArray<MapData, PodTraffic>,
    rule_traffic: PerCpuHashMap<MapData, u32, RuleTraffic>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    /// What rules no longer in the maps admitted, by rule.
    retired_traffic: BTreeMap<RuleRef, RuleTraffic>,
    /// What the maps hold, as this process last applied it; `None` until read back.
    enforced: Option<Compiled>,
    /// `enforced` was read back from the kernel (after a start or a failed
    /// apply), not applied by this process: the next apply reconciles.
    unreconciled: bool,
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
            node_local: typed(source, map_names::NODE_LOCAL)?,
            conntrack: typed(source, map_names::CONNTRACK)?,
            fragments: typed(source, map_names::FRAGMENTS)?,
            settings: typed(source, map_names::SETTINGS)?,
            counters: typed(source, map_names::COUNTERS)?,
            rules: typed(source, map_names::RULES)?,
            pod_modes: typed(source, map_names::POD_MODES)?,
            pod_traffic: typed(source, map_names::POD_TRAFFIC)?,
            rule_traffic: typed(source, map_names::RULE_TRAFFIC)?,
            event_budget: typed(source, map_names::EVENT_BUDGET)?,
            retired_traffic: BTreeMap::new(),
            enforced: None,
            unreconciled: false,
        })
    }

    /// The state the maps hold, to compile the next one against
    /// ([`crate::compile::compile_with`]): as this process last applied it,
    /// or read back from the kernel on the first call after a start or a
    /// failed apply (so what a previous agent pinned is reconciled).
    pub fn enforced(&mut self) -> Result<&Compiled, MapsError> {
        let enforced = match self.enforced.take() {
            Some(enforced) => enforced,
            None => {
                self.unreconciled = true;
                self.read_back()?
            }
        };
        Ok(self.enforced.insert(enforced))
    }

    /// Makes the kernel enforce `compiled` with `node`'s settings, writing
    /// only what differs from the enforced state. Policy handles and peer
    /// classes are copy-on-write (`compiled` must come from
    /// [`crate::compile::compile_with`] over [`KernelMaps::enforced`]): new
    /// ones are written before the pods switch to them, one atomic update
    /// per pod, and the old ones leave after a grace period, so no pod ever
    /// points at a missing or half-written policy; unchanged ones are not
    /// touched. A pod that is gone, or replaced on its VLAN by another
    /// (`PodEntry::identity`), loses its tracked flows, fragment verdicts and
    /// counters, so the VLAN's next pod inherits none. Tracked flows of
    /// remaining pods are kept.
    pub fn apply(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        self.write_state(compiled, node, true)
    }

    /// As [`KernelMaps::apply`], but the entries `compiled` no longer uses stay:
    /// the attached programs are a previous build's, reading maps of their own
    /// beside these ([`crate::pins`]), and may still use them. Once the new
    /// programs are attached, the next apply reads the maps back and retires them.
    pub fn stage(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        let stats = self.write_state(compiled, node, false)?;
        self.enforced = None;
        Ok(stats)
    }

    fn write_state(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
        retire: bool,
    ) -> Result<ApplyStats, MapsError> {
        let reconcile = self.enforced.is_none() || self.unreconciled;
        let mut old = match self.enforced.take() {
            Some(old) => old,
            None => self.read_back()?,
        };
        let mut swept = 0;
        if reconcile && retire {
            swept = self.sweep_unreached(&mut old)?;
        }
        let changes = Changes::between(&old, compiled);
        if let Err(error) = changes.copy_on_write(&old) {
            self.enforced = Some(old);
            return Err(error);
        }
        let result = self
            .apply_changes(&old, compiled, &changes, node, reconcile, retire)
            .map(|stats| ApplyStats {
                removed: stats.removed + swept,
                ..stats
            });
        // After an error the maps hold neither state: the next apply reads them back.
        if result.is_ok() {
            self.enforced = Some(compiled.clone());
            self.unreconciled = false;
        }
        result
    }

    /// Removes the policies and classes no pod reaches: what an apply that
    /// failed half-way (a map that filled up) wrote before it stopped. No
    /// program reads them once a grace period has passed, and they must go
    /// before anything is written, or the next state finds the map still full.
    fn sweep_unreached(&mut self, held: &mut Compiled) -> Result<usize, MapsError> {
        let reached: std::collections::BTreeSet<u32> = held
            .pods
            .values()
            .flat_map(|pod| pod.policies)
            .filter(|&handle| handle != NO_POLICY)
            .collect();
        let policies: Vec<u32> = held
            .policies
            .keys()
            .copied()
            .filter(|handle| !reached.contains(handle))
            .collect();
        let named: std::collections::BTreeSet<u32> = held
            .policies
            .iter()
            .filter(|(handle, _)| reached.contains(handle))
            .flat_map(|(_, entries)| entries.classes())
            .collect();
        let classes: Vec<u32> = held
            .classes
            .keys()
            .copied()
            .filter(|class| !named.contains(class))
            .collect();
        if policies.is_empty() && classes.is_empty() {
            return Ok(0);
        }
        // A pod switched away from one of them just before the failure may still be read.
        wait_for_running_programs();
        let peers = peer_entries(
            &policies
                .iter()
                .map(|h| (*h, held.policies[h].as_ref()))
                .collect::<Vec<_>>(),
        );
        let ports = port_entries(
            &classes
                .iter()
                .map(|c| (*c, held.classes[c].as_ref()))
                .collect::<Vec<_>>(),
        );
        remove_hash(&mut self.peers_v4, &keys(&peers.v4), map_names::PEERS_V4)?;
        remove_hash(&mut self.peers_v6, &keys(&peers.v6), map_names::PEERS_V6)?;
        remove_hash(&mut self.ports, &keys(&ports), map_names::PORTS)?;
        for handle in &policies {
            held.policies.remove(handle);
        }
        for class in &classes {
            held.classes.remove(class);
        }
        log::warn!(
            "removed {} policies and {} peer classes no pod uses (left by an apply that failed)",
            policies.len(),
            classes.len()
        );
        Ok(peers.v4.len() + peers.v6.len() + ports.len())
    }

    fn apply_changes(
        &mut self,
        old: &Compiled,
        new: &Compiled,
        changes: &Changes,
        node: &NodeConfig,
        reconcile: bool,
        retire: bool,
    ) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        let current = self.settings()?;
        let wanted = Settings {
            allowed_events_until_ns: current.allowed_events_until_ns,
            ..settings(node)
        };
        if wanted != current {
            self.settings
                .set(0, wanted, 0)
                .map_err(map_err(map_names::SETTINGS))?;
            stats.written += 1;
        }

        // Entries of new rules, classes and policies go in before any pod uses them.
        for (id, rule) in &changes.rules.write {
            // A counter left by an interrupted apply or a late packet of a freed ID.
            match self.rule_traffic.remove(id) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
            }
            self.rules
                .insert(id, rule_name(rule)?, 0)
                .map_err(map_err(map_names::RULES))?;
        }
        stats.written += changes.rules.write.len();
        let written = peer_entries(&changes.policies.write);
        stats.written += write_hash(
            &mut self.ports,
            &port_entries(&changes.classes.write),
            map_names::PORTS,
        )?;
        stats.written += write_hash(&mut self.peers_v4, &written.v4, map_names::PEERS_V4)?;
        stats.written += write_hash(&mut self.peers_v6, &written.v6, map_names::PEERS_V6)?;
        stats.written += write_hash(
            &mut self.node_local,
            &changes.node_local.write,
            map_names::NODE_LOCAL,
        )?;

        // Each pod switches with one update. A VLAN that gets a pod, or another
        // pod than before, starts its counters at zero.
        let replaced: BTreeSet<u16> = changes
            .pods
            .write
            .iter()
            .filter(|(vlan, entry)| {
                old.pods
                    .get(vlan)
                    .is_some_and(|held| held.identity != entry.identity)
            })
            .map(|(vlan, _)| *vlan)
            .collect();
        for (vlan, _) in changes
            .pods
            .write
            .iter()
            .filter(|(v, _)| !old.pods.contains_key(v) || replaced.contains(v))
        {
            self.reset_pod_traffic(*vlan)?;
        }
        stats.written += write_hash(&mut self.pods, &changes.pods.write, map_names::PODS)?;
        for vlan in &changes.pods.remove {
            self.pods.remove(vlan).map_err(map_err(map_names::PODS))?;
            self.reset_pod_traffic(*vlan)?;
        }
        stats.removed += changes.pods.remove.len();
        // What the kernel learnt of a pod that left or was replaced must not
        // admit the next pod's traffic: flows and fragment verdicts go with it.
        if reconcile || !changes.pods.remove.is_empty() || !replaced.is_empty() {
            stats.removed += self
                .forget_vlans(|vlan| !new.pods.contains_key(&vlan) || replaced.contains(&vlan))?;
        }
        if !retire {
            return Ok(stats);
        }

        // What no pod uses any more leaves once no program can be reading it.
        let removed_peers = peer_entries(&changes.policies.remove);
        let removed_ports = port_entries(&changes.classes.remove);
        let retired = [
            changes.rules.remove.len(),
            removed_ports.len(),
            removed_peers.v4.len(),
            removed_peers.v6.len(),
            changes.node_local.remove.len(),
        ];
        if retired.iter().any(|&n| n > 0) && !old.pods.is_empty() {
            wait_for_running_programs();
        }
        let counted = if reconcile {
            // Counters a previous agent left, of rules gone or never named.
            self.rule_traffic
                .keys()
                .collect::<Result<Vec<u32>, _>>()
                .map_err(map_err(map_names::RULE_TRAFFIC))?
                .into_iter()
                .filter(|id| new.rule(*id).is_none())
                .collect()
        } else {
            changes.rules.remove.clone()
        };
        for id in counted {
            if let Some(traffic) = self.take_rule_traffic(id)?
                && let Some(rule) = old.rule(id)
            {
                let total = self.retired_traffic.entry(rule.clone()).or_default();
                total.packets += traffic.packets;
                total.bytes += traffic.bytes;
            }
        }
        remove_hash(
            &mut self.node_local,
            &changes.node_local.remove,
            map_names::NODE_LOCAL,
        )?;
        remove_hash(
            &mut self.peers_v6,
            &keys(&removed_peers.v6),
            map_names::PEERS_V6,
        )?;
        remove_hash(
            &mut self.peers_v4,
            &keys(&removed_peers.v4),
            map_names::PEERS_V4,
        )?;
        remove_hash(&mut self.ports, &keys(&removed_ports), map_names::PORTS)?;
        for id in &changes.rules.remove {
            self.rules.remove(id).map_err(map_err(map_names::RULES))?;
        }
        stats.removed += retired.iter().sum::<usize>();
        Ok(stats)
    }

    /// The entries the kernel holds, as a compiled state.
    fn read_back(&self) -> Result<Compiled, MapsError> {
        let mut rules = RuleIds::default();
        for entry in self.rules.iter() {
            let (id, name) = entry.map_err(map_err(map_names::RULES))?;
            rules.insert(id, rule_ref(&name));
        }
        let pods = self.pods()?;
        // Every handle a pod uses, entries or not (a policy without entries denies all).
        let mut policies: BTreeMap<u32, PolicyEntries> = pods
            .values()
            .flat_map(|p| p.policies)
            .filter(|&h| h != NO_POLICY)
            .map(|h| (h, PolicyEntries::default()))
            .collect();
        for (key, class) in read_hash(&self.peers_v4, map_names::PEERS_V4)? {
            let entry = (PeerKeyV4 { policy: 0, ..key }, class);
            policies.entry(key.policy).or_default().v4.push(entry);
        }
        for (key, class) in read_hash(&self.peers_v6, map_names::PEERS_V6)? {
            let entry = (PeerKeyV6 { policy: 0, ..key }, class);
            policies.entry(key.policy).or_default().v6.push(entry);
        }
        let mut classes: BTreeMap<u32, ClassEntries> = BTreeMap::new();
        for (key, verdict) in read_hash(&self.ports, map_names::PORTS)? {
            let entry = (PortKey { class: 0, ..key }, verdict);
            classes.entry(key.class).or_default().push(entry);
        }
        let mut compiled = Compiled::default();
        compiled.pods = pods;
        compiled.policies = policies
            .into_iter()
            .map(|(h, e)| (h, Arc::new(e)))
            .collect();
        compiled.classes = classes.into_iter().map(|(c, e)| (c, Arc::new(e))).collect();
        compiled.node_local = read_hash(&self.node_local, map_names::NODE_LOCAL)?;
        compiled.rules = rules;
        Ok(compiled)
    }

    fn reset_pod_traffic(&mut self, vlan: u16) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![PodTraffic::default(); cpus()?])
            .map_err(|e| MapsError::Cpus(e.to_string()))?;
        self.pod_traffic
            .set(u32::from(vlan), zero, 0)
            .map_err(map_err(map_names::POD_TRAFFIC))
    }

    /// Removes a rule's counter; returns its CPU sum, if it had one.
    fn take_rule_traffic(&mut self, id: u32) -> Result<Option<RuleTraffic>, MapsError> {
        let traffic = match self.rule_traffic.get(&id, 0) {
            Ok(values) => sum_rule_traffic(&values),
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
        };
        match self.rule_traffic.remove(&id) {
            Ok(()) => Ok(Some(traffic)),
            Err(e) if absent(&e) => Ok(Some(traffic)),
            Err(e) => Err(map_err(map_names::RULE_TRAFFIC)(e)),
        }
    }

    /// Removes the tracked flows `doomed` selects; returns how many.
    pub fn forget_flows(&mut self, doomed: impl Fn(&CtKey) -> bool) -> Result<usize, MapsError> {
        remove_where(&mut self.conntrack, map_names::CONNTRACK, doomed)
    }

    /// Removes the tracked flows and fragment verdicts of the VLANs `doomed`
    /// selects; returns how many.
    fn forget_vlans(&mut self, doomed: impl Fn(u16) -> bool) -> Result<usize, MapsError> {
        let flows = self.forget_flows(|key| doomed(key.vlan))?;
        let fragments = remove_where(&mut self.fragments, map_names::FRAGMENTS, |key| {
            doomed(key.vlan)
        })?;
        Ok(flows + fragments)
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

    /// How many flows are tracked now (walks the keys only).
    pub fn flow_count(&self) -> Result<usize, MapsError> {
        self.conntrack.keys().try_fold(0, |count, key| {
            key.map(|_| count + 1)
                .map_err(map_err(map_names::CONNTRACK))
        })
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

    /// Sets [`Settings::allowed_events_until_ns`], keeping the rest.
    pub fn set_allowed_events_until(&mut self, until_ns: u64) -> Result<(), MapsError> {
        let mut settings = self.settings()?;
        settings.allowed_events_until_ns = until_ns;
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
        self.rule_traffic_over(&self.retired_traffic)
    }

    /// What rules no longer in the maps admitted, as this process folded it.
    pub fn retired_traffic(&self) -> &BTreeMap<RuleRef, RuleTraffic> {
        &self.retired_traffic
    }

    /// What each rule admitted: `retired` (another handle's
    /// [`KernelMaps::retired_traffic`]) plus what the kernel counts now.
    pub fn rule_traffic_over(
        &self,
        retired: &BTreeMap<RuleRef, RuleTraffic>,
    ) -> Result<BTreeMap<RuleRef, RuleTraffic>, MapsError> {
        let mut totals = retired.clone();
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

    /// The rule a rule ID stands for, while it is in the maps.
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
        let held = read_hash(&self.pod_modes, map_names::POD_MODES)?;
        let diff = Diff::between(held, wanted);
        write_hash(&mut self.pod_modes, &diff.write, map_names::POD_MODES)?;
        remove_hash(&mut self.pod_modes, &diff.remove, map_names::POD_MODES)
    }
}

/// Refuses, before anything is written, a state the maps cannot hold: names
/// longer than their keys, or more entries than a map's capacity. `enforcer
/// check` and the agent both run it, so `check` refuses what `run` would.
/// (An apply can still find a map full when old and new entries coexist
/// during a copy-on-write switch: [`MapsError::Full`] then.)
pub fn admit(model: &Model, compiled: &Compiled) -> Result<(), MapsError> {
    for pod in &model.pods {
        pod_uid(&pod.identity())?;
    }
    for (_, rule) in compiled.rules.iter() {
        rule_name(rule)?;
    }
    let peers = |v4: bool| -> usize {
        compiled
            .policies
            .values()
            .map(|p| if v4 { p.v4.len() } else { p.v6.len() })
            .sum()
    };
    let ports: usize = compiled.classes.values().map(|c| c.len()).sum();
    let needs = [
        (map_names::PODS, compiled.pods.len(), MAX_PODS),
        (map_names::RULES, compiled.rules.len(), MAX_RULES),
        (map_names::PEERS_V4, peers(true), MAX_PEER_ENTRIES),
        (map_names::PEERS_V6, peers(false), MAX_PEER_ENTRIES),
        (map_names::PORTS, ports, MAX_PORT_ENTRIES),
        (
            map_names::NODE_LOCAL,
            compiled.node_local.len(),
            MAX_ADDRESSES,
        ),
    ];
    match needs
        .into_iter()
        .find(|&(_, n, capacity)| n > capacity as usize)
    {
        Some((map, _, capacity)) => Err(MapsError::Full { map, capacity }),
        None => Ok(()),
    }
}

/// What one map must gain (new keys and changed values) and lose.
struct Diff<K, V> {
    write: Vec<(K, V)>,
    remove: Vec<K>,
}

impl<K: Ord + Copy, V: PartialEq + Copy> Diff<K, V> {
    /// Merges two key-ordered sequences of entries.
    fn between(
        old: impl IntoIterator<Item = (K, V)>,
        new: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut diff = Self {
            write: Vec::new(),
            remove: Vec::new(),
        };
        let mut old = old.into_iter().peekable();
        for (key, value) in new {
            while let Some(&(gone, _)) = old.peek().filter(|(k, _)| *k < key) {
                diff.remove.push(gone);
                old.next();
            }
            match old.peek() {
                Some(&(k, v)) if k == key => {
                    if v != value {
                        diff.write.push((key, value));
                    }
                    old.next();
                }
                _ => diff.write.push((key, value)),
            }
        }
        diff.remove.extend(old.map(|(k, _)| k));
        diff
    }
}

/// The entries one apply writes and removes, map by map; policies and classes by ID.
struct Changes<'c> {
    pods: Diff<u16, PodEntry>,
    policies: IdDiff<'c, PolicyEntries>,
    classes: IdDiff<'c, ClassEntries>,
    node_local: Diff<AddrKey, u8>,
    rules: Diff<u32, &'c RuleRef>,
}

fn copied<'m, K: Copy + 'm, V: Copy + 'm>(
    map: &'m BTreeMap<K, V>,
) -> impl Iterator<Item = (K, V)> + 'm {
    map.iter().map(|(k, v)| (*k, *v))
}

impl<'c> Changes<'c> {
    fn between(old: &'c Compiled, new: &'c Compiled) -> Self {
        Self {
            pods: Diff::between(copied(&old.pods), copied(&new.pods)),
            policies: IdDiff::between(&old.policies, &new.policies),
            classes: IdDiff::between(&old.classes, &new.classes),
            node_local: Diff::between(copied(&old.node_local), copied(&new.node_local)),
            rules: Diff::between(old.rules.iter(), new.rules.iter()),
        }
    }

    /// Checks that no policy, class or rule of `old` changes under its ID: what changes
    /// must be under fresh IDs.
    fn copy_on_write(&self, old: &Compiled) -> Result<(), MapsError> {
        let in_place = |map, id| Err(MapsError::InPlace { map, id });
        if let Some(&id) = self.policies.rewritten.first() {
            return in_place(map_names::PEERS_V4, id);
        }
        if let Some(&id) = self.classes.rewritten.first() {
            return in_place(map_names::PORTS, id);
        }
        match self
            .rules
            .write
            .iter()
            .find(|(id, _)| old.rule(*id).is_some())
        {
            Some(&(id, _)) => in_place(map_names::RULES, id),
            None => Ok(()),
        }
    }
}

/// The IDs whose entries an apply writes (new IDs) and removes (gone IDs). `rewritten`:
/// IDs of both states whose entries differ, which copy-on-write forbids.
struct IdDiff<'c, E> {
    write: Vec<(u32, &'c E)>,
    remove: Vec<(u32, &'c E)>,
    rewritten: Vec<u32>,
}

impl<'c, E: PartialEq> IdDiff<'c, E> {
    fn between(old: &'c BTreeMap<u32, Arc<E>>, new: &'c BTreeMap<u32, Arc<E>>) -> Self {
        let mut diff = Self {
            write: Vec::new(),
            remove: Vec::new(),
            rewritten: Vec::new(),
        };
        for (&id, entries) in new {
            match old.get(&id) {
                None => diff.write.push((id, entries)),
                // Shared with the previous compile, or equal.
                Some(held) if Arc::ptr_eq(held, entries) || held == entries => {}
                Some(_) => diff.rewritten.push(id),
            }
        }
        for (&id, entries) in old {
            if !new.contains_key(&id) {
                diff.remove.push((id, entries));
            }
        }
        diff
    }
}

/// The map entries of policies, their handles in the keys.
fn peer_entries(policies: &[(u32, &PolicyEntries)]) -> PolicyEntries {
    let v4 = policies
        .iter()
        .flat_map(|&(policy, e)| {
            e.v4.iter()
                .map(move |&(k, c)| (PeerKeyV4 { policy, ..k }, c))
        })
        .collect();
    let v6 = policies
        .iter()
        .flat_map(|&(policy, e)| {
            e.v6.iter()
                .map(move |&(k, c)| (PeerKeyV6 { policy, ..k }, c))
        })
        .collect();
    PolicyEntries { v4, v6 }
}

fn keys<K: Copy, V>(entries: &[(K, V)]) -> Vec<K> {
    entries.iter().map(|(k, _)| *k).collect()
}

/// The map entries of classes, their IDs in the keys.
fn port_entries(classes: &[(u32, &ClassEntries)]) -> Vec<(PortKey, PortVerdict)> {
    classes
        .iter()
        .flat_map(|&(class, e)| e.iter().map(move |&(k, v)| (PortKey { class, ..k }, v)))
        .collect()
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

/// The key was not in the map (lookups say `KeyNotFound`, deletes `ENOENT`).
fn absent(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
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
        ..Settings::default()
    }
}

/// Entries per `BPF_MAP_*_BATCH` call: the kernel copies them one by one, so this only
/// bounds the buffers.
const BATCH: usize = 8192;

fn write_hash<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: &[(K, V)],
    name: &'static str,
) -> Result<usize, MapsError> {
    let fd = map.map().fd().as_fd();
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        batch::update(fd, &keys, &values).map_err(|source| {
            // A hash map refuses a new key when full with E2BIG.
            if source.raw_os_error() == Some(libc::E2BIG) {
                let capacity = map.map().info().map_or(0, |info| info.max_entries());
                MapsError::Full {
                    map: name,
                    capacity,
                }
            } else {
                MapsError::Batch { map: name, source }
            }
        })?;
    }
    Ok(entries.len())
}

fn remove_hash<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    name: &'static str,
) -> Result<(), MapsError> {
    let fd = map.map().fd().as_fd();
    for chunk in keys.chunks(BATCH) {
        batch::delete(fd, chunk).map_err(|source| MapsError::Batch { map: name, source })?;
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6), which aya does not wrap:
/// one system call for thousands of entries, the bulk of an apply's time otherwise.
mod batch {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// `bpf_attr.batch` of `linux/bpf.h`.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

    pub fn update<K, V>(fd: BorrowedFd, keys: &[K], values: &[V]) -> io::Result<()> {
        assert_eq!(keys.len(), values.len());
        call(BPF_MAP_UPDATE_BATCH, fd, keys, values.as_ptr() as u64)
    }

    pub fn delete<K>(fd: BorrowedFd, keys: &[K]) -> io::Result<()> {
        call(BPF_MAP_DELETE_BATCH, fd, keys, 0)
    }

    fn call<K>(cmd: libc::c_long, fd: BorrowedFd, keys: &[K], values: u64) -> io::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values,
            count: u32::try_from(keys.len()).expect("a batch fits in u32"),
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys (and values) that outlive the call; the
        // kernel reads them and writes back only `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Removes the entries of an LRU map whose keys `doomed` selects; returns how many.
fn remove_where<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<usize, MapsError> {
    let keys: Vec<K> = map
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    let mut removed = 0;
    for key in keys.iter().filter(|k| doomed(k)) {
        match map.remove(key) {
            // An LRU eviction may have beaten us to it.
            Ok(()) => removed += 1,
            Err(e) if absent(&e) => removed += 1,
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(removed)
}

fn read_hash<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, MapsError> {
    map.iter().collect::<Result<_, _>>().map_err(map_err(name))
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
    fn a_diff_writes_new_and_changed_entries_and_removes_gone_ones() {
        let old = BTreeMap::from([(1u32, 10u8), (2, 20), (4, 40), (6, 60)]);
        let new = BTreeMap::from([(0u32, 0u8), (2, 20), (4, 41), (5, 50)]);
        let diff = Diff::between(old, new);
        assert_eq!(diff.write, [(0, 0), (4, 41), (5, 50)]);
        assert_eq!(diff.remove, [1, 6]);
    }

    /// Four pods on distinct groups; `port` opens one rule of sg-3, which only pod 4 uses.
    fn spread(port: u16) -> crate::model::Model {
        let groups = (0..4)
            .map(|g| {
                let rules = (0..20)
                    .map(|r| rule(tcp(1000 + r, 1000 + r), cidr(&format!("10.{g}.{r}.0/24"))))
                    .collect();
                group(
                    &format!("sg-{g}"),
                    rules,
                    vec![rule(tcp(53, 53), cidr("10.9.0.0/16"))],
                )
            })
            .chain([group(
                "sg-x",
                vec![rule(tcp(port, port), cidr("10.8.0.0/16"))],
                vec![],
            )])
            .collect();
        let pods = (0..4u16)
            .map(|i| {
                let gi = format!("sg-{i}");
                let groups: &[&str] = if i == 3 { &[&gi, "sg-x"] } else { &[&gi] };
                pod(
                    i + 1,
                    &format!("10.0.1.{}", i + 1),
                    groups,
                    EnforcingMode::Strict,
                )
            })
            .collect();
        model(groups, pods)
    }

    #[test]
    fn one_changed_rule_writes_only_the_entries_of_its_policy() {
        let before = crate::compile::compile(&spread(80)).expect("compiles");
        let state = spread(81);
        let after = crate::compile::compile_with(&state, Some(&before)).expect("compiles");
        let changes = Changes::between(&before, &after);
        changes.copy_on_write(&before).expect("copy-on-write");

        // The new policy of pod 4's ingress side, with its new classes, is all that is written.
        let (handle, old_handle) = (after.pods[&4].policies[0], before.pods[&4].policies[0]);
        assert_ne!(handle, old_handle);
        let written: Vec<u32> = changes.policies.write.iter().map(|(h, _)| *h).collect();
        assert_eq!(written, [handle]);
        let classes: Vec<u32> = after.policies[&handle].classes().collect();
        assert!(!changes.classes.write.is_empty());
        assert!(
            changes
                .classes
                .write
                .iter()
                .all(|(class, _)| classes.contains(class))
        );
        assert!(changes.classes.write.len() * 10 < after.classes.len());
        assert_eq!(changes.pods.write.len(), 1, "pod 4 switches, no other");
        assert!(changes.rules.write.is_empty() && changes.rules.remove.is_empty());
        // And the old policy is all that goes.
        let removed: Vec<u32> = changes.policies.remove.iter().map(|(h, _)| *h).collect();
        assert_eq!(removed, [old_handle]);

        // Recompiling the same state over itself changes nothing.
        let again = crate::compile::compile_with(&state, Some(&after)).expect("compiles");
        assert_eq!(again, after);
    }

    #[test]
    fn a_state_not_compiled_over_the_enforced_one_is_refused() {
        let before = crate::compile::compile(&spread(80)).expect("compiles");
        let mut state = spread(80);
        state.pods.remove(0);
        // Fresh IDs renumber: entries in use would change in place.
        let fresh = crate::compile::compile(&state).expect("compiles");
        let changes = Changes::between(&before, &fresh);
        assert!(matches!(
            changes.copy_on_write(&before),
            Err(MapsError::InPlace { .. })
        ));
        let over = crate::compile::compile_with(&state, Some(&before)).expect("compiles");
        Changes::between(&before, &over)
            .copy_on_write(&before)
            .expect("copy-on-write");
    }

    #[test]
    fn rule_names_round_trip() {
        let compiled = compiled(EnforcingMode::Standard);
        for (_, rule) in compiled.rules.iter() {
            assert_eq!(&rule_ref(&rule_name(rule).expect("fits")), rule);
        }
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
