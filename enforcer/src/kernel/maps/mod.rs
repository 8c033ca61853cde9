//! The kernel's maps as userspace sees them: the only place that writes them,
//! writing only what changed between the enforced and a compiled state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::{Ebpf, Pod};
use enforcer_common::{
    AddrKey, COUNTER_SLOTS, CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, EventBudget, FragmentKey,
    FragmentVerdict, MAX_ADDRESSES, MAX_CLASSES, MAX_GROUPS_PER_POD, MAX_PEER_ENTRIES, MAX_PODS,
    MAX_PORT_RANGES, MAX_RULES, NO_POLICY, NatKey, NatPrefix, NatSettings, NatTarget, PeerClass,
    PeerKeyV4, PeerKeyV6, PodEntry, PodGroups, PodTracked, PodTraffic, PodUid, RuleName,
    RuleTraffic, Settings, ct_timeouts, map_names,
};

use crate::compile::{ClassEntries, Compiled, PolicyEntries, RuleIds};
use crate::model::{Direction, EnforcingMode, GroupId, Model, NodeConfig, UnknownVlanAction};
use crate::policy::eval::RuleRef;

mod apply;
mod batch;
mod carry;
mod mapped;
mod ports;
mod tracked;

use apply::Diff;
pub use apply::admit;
use batch::{remove_hash, write_hash};
pub use carry::{Carried, CarryStats, Pass};

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
    #[error("{0} security groups on one pod: EC2 allows at most {max}", max = MAX_GROUPS_PER_POD)]
    TooManyGroups(usize),
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
    #[error(
        "a peer class's port table has {ranges} ranges: a search covers at most {max}",
        max = enforcer_common::ranges::MAX_PER_TABLE
    )]
    PortTableTooLarge { ranges: usize },
    #[error("cannot count the CPUs: {0}")]
    Cpus(String),
    #[error("cannot memory-map map {map}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

const UID_BYTES: usize = enforcer_common::POD_IDENTITY_BYTES;
const GROUP_BYTES: usize = enforcer_common::GROUP_ID_BYTES;

/// Typed handles on every map userspace fills or reads.
pub struct KernelMaps {
    pods: HashMap<MapData, u16, PodEntry>,
    peers_v4: HashMap<MapData, PeerKeyV4, PeerClass>,
    peers_v6: HashMap<MapData, PeerKeyV6, PeerClass>,
    ports: ports::PortTables,
    node_local: HashMap<MapData, AddrKey, u8>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    fragments: HashMap<MapData, FragmentKey, FragmentVerdict>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, u64>,
    rules: HashMap<MapData, u32, RuleName>,
    pod_modes: HashMap<MapData, PodUid, u8>,
    pod_groups: HashMap<MapData, PodUid, PodGroups>,
    pod_traffic: PerCpuArray<MapData, PodTraffic>,
    rule_traffic: PerCpuHashMap<MapData, u32, RuleTraffic>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    nat_ports: HashMap<MapData, NatKey, NatTarget>,
    tracked: tracked::TrackedCounts,
    /// What rules no longer in the maps admitted, by rule.
    /// Shared with the views the agent publishes: an apply that retires rules
    /// copies it then, not every view.
    retired_traffic: Arc<BTreeMap<RuleRef, RuleTraffic>>,
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
        let path = crate::kernel::bpffs::map_pin(self, name);
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
            ports: ports::PortTables::open(source)?,
            node_local: typed(source, map_names::NODE_LOCAL)?,
            conntrack: typed(source, map_names::CONNTRACK)?,
            fragments: typed(source, map_names::FRAGMENTS)?,
            settings: typed(source, map_names::SETTINGS)?,
            counters: typed(source, map_names::COUNTERS)?,
            rules: typed(source, map_names::RULES)?,
            pod_modes: typed(source, map_names::POD_MODES)?,
            pod_groups: typed(source, map_names::POD_GROUPS)?,
            pod_traffic: typed(source, map_names::POD_TRAFFIC)?,
            rule_traffic: typed(source, map_names::RULE_TRAFFIC)?,
            event_budget: typed(source, map_names::EVENT_BUDGET)?,
            nat_ports: typed(source, map_names::NAT_PORTS)?,
            tracked: tracked::TrackedCounts::open(source)?,
            retired_traffic: Arc::default(),
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

    /// Removes the tracked flows `doomed` selects, giving their pods' allowance
    /// back; returns how many.
    pub fn forget_flows(&mut self, doomed: impl Fn(&CtKey) -> bool) -> Result<usize, MapsError> {
        let removed = remove_where(
            &mut self.conntrack,
            map_names::CONNTRACK,
            |key, _| doomed(key),
            |key| key.vlan,
        )?;
        self.remove_nat_where(|_, target| doomed(&target.flow))?;
        Ok(self.release(&removed, &BTreeMap::new()))
    }

    /// Removes the fragment verdicts `doomed` selects, giving their pods'
    /// allowance back; returns how many.
    pub fn forget_fragments(
        &mut self,
        doomed: impl Fn(&FragmentKey) -> bool,
    ) -> Result<usize, MapsError> {
        let removed = remove_where(
            &mut self.fragments,
            map_names::FRAGMENTS,
            |key, _| doomed(key),
            |key| key.vlan,
        )?;
        Ok(self.release(&BTreeMap::new(), &removed))
    }

    /// Removes the tracked flows and fragment verdicts of the VLANs `doomed`
    /// selects; returns how many.
    fn forget_vlans(&mut self, doomed: impl Fn(u16) -> bool) -> Result<usize, MapsError> {
        let flows = remove_where(
            &mut self.conntrack,
            map_names::CONNTRACK,
            |key, _| doomed(key.vlan),
            |key| key.vlan,
        )?;
        let fragments = remove_where(
            &mut self.fragments,
            map_names::FRAGMENTS,
            |key, _| doomed(key.vlan),
            |key| key.vlan,
        )?;
        self.remove_nat_where(|_, target| doomed(target.flow.vlan))?;
        Ok(self.release(&flows, &fragments))
    }

    /// Removes the source NAT mappings `doomed` selects; returns how many.
    fn remove_nat_where(
        &mut self,
        doomed: impl Fn(&NatKey, &NatTarget) -> bool,
    ) -> Result<u64, MapsError> {
        let removed = remove_where(&mut self.nat_ports, map_names::NAT_PORTS, doomed, |_| 0)?;
        Ok(removed.values().sum())
    }

    /// How much of the source NAT's port range is in use.
    pub fn nat_use(&self) -> Result<NatUse, MapsError> {
        let nat = self.settings()?.nat;
        let mut by_peer = BTreeMap::<(NatKey, u8), usize>::new();
        let mappings = self.nat_mappings()?;
        for key in mappings.keys() {
            let peer = NatKey {
                nat_port: 0,
                ..*key
            };
            *by_peer.entry((peer, key.protocol)).or_default() += 1;
        }
        Ok(NatUse {
            address: nat.enabled().then(|| std::net::Ipv4Addr::from(nat.address)),
            ports: (nat.port_first, nat.port_last),
            mappings: mappings.len(),
            busiest_peer: by_peer.values().copied().max().unwrap_or(0),
        })
    }

    /// One source NAT mapping, if the kernel holds it.
    pub fn nat_mapping(&self, key: &NatKey) -> Result<Option<NatTarget>, MapsError> {
        match self.nat_ports.get(key, 0) {
            Ok(target) => Ok(Some(target)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::NAT_PORTS)(e)),
        }
    }

    /// Every source NAT mapping the kernel holds.
    pub fn nat_mappings(&self) -> Result<BTreeMap<NatKey, NatTarget>, MapsError> {
        read_hash(&self.nat_ports, map_names::NAT_PORTS)
    }

    /// Deletes the flows idle past their timeout and the fragment verdicts
    /// older than [`ct_timeouts::FRAGMENTS`] at `now_ns` (CLOCK_MONOTONIC, the
    /// kernel's clock), by the timeouts the kernel enforces, and gives the
    /// pods' allowance back: the tables are not LRU, so nothing else removes
    /// them. An entry the kernel refreshes between the read and the delete is
    /// lost (its next packet is judged as a new flow), as in any swept tracker.
    pub fn sweep(&mut self, now_ns: u64) -> Result<Swept, MapsError> {
        let settings = self.settings()?;
        let timeouts = crate::model::ConntrackTimeouts {
            tcp_established: settings.tcp_established_timeout,
            udp_stream: settings.udp_stream_timeout,
            udp: settings.udp_timeout,
        };
        let flows = remove_where(
            &mut self.conntrack,
            map_names::CONNTRACK,
            |key, entry| !crate::policy::flow::kernel_entry_live(key, entry, &timeouts, now_ns),
            |key| key.vlan,
        )?;
        let fragment_timeout = u64::from(ct_timeouts::FRAGMENTS) * 1_000_000_000;
        let fragments = remove_where(
            &mut self.fragments,
            map_names::FRAGMENTS,
            |_, verdict| now_ns.saturating_sub(verdict.created_ns) > fragment_timeout,
            |key| key.vlan,
        )?;
        // A mapping leaves with its flow. The kernel maps a port before it
        // writes the flow's entry: a young mapping without one is being made.
        let conntrack = &self.conntrack;
        let orphan = |key: &NatKey, target: &NatTarget| {
            now_ns.saturating_sub(target.created_ns) >= NAT_SETTLE_NS
                && !matches!(conntrack.get(&target.flow, 0),
                    Ok(entry) if entry.nat_port == key.nat_port)
        };
        let nat_mappings = remove_where(&mut self.nat_ports, map_names::NAT_PORTS, orphan, |_| 0)?
            .values()
            .sum();
        let swept = Swept {
            flows: flows.values().sum(),
            fragments: fragments.values().sum(),
            nat_mappings,
        };
        self.release(&flows, &fragments);
        Ok(swept)
    }

    /// Gives back the slots of deleted entries, by VLAN; returns how many.
    fn release(&self, flows: &BTreeMap<u16, u64>, fragments: &BTreeMap<u16, u64>) -> usize {
        let vlans: BTreeSet<u16> = flows.keys().chain(fragments.keys()).copied().collect();
        for vlan in vlans {
            let count = |removed: &BTreeMap<u16, u64>| removed.get(&vlan).copied().unwrap_or(0);
            self.tracked.release(vlan, count(flows), count(fragments));
        }
        (flows.values().sum::<u64>() + fragments.values().sum::<u64>()) as usize
    }

    /// How many conntrack and fragment entries the pod on `vlan` holds, as the
    /// kernel counts them against its allowance.
    pub fn tracked(&self, vlan: u16) -> PodTracked {
        self.tracked.get(vlan)
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

    /// Packets per [`enforcer_common::counter_slot`] (a reason, then the same reason's
    /// would-drops: `Reason as usize` indexes the frames judged so), summed over CPUs.
    pub fn counters(&self) -> Result<[u64; COUNTER_SLOTS as usize], MapsError> {
        let mut totals = [0; COUNTER_SLOTS as usize];
        for (slot, total) in (0..COUNTER_SLOTS).zip(totals.iter_mut()) {
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
            sum.would_drop_packets += t.would_drop_packets;
            sum.would_drop_bytes += t.would_drop_bytes;
            sum
        }))
    }

    /// What each rule admitted since this process first applied a state:
    /// retired generations folded in, the current one live from the kernel.
    pub fn rule_traffic(&self) -> Result<BTreeMap<RuleRef, RuleTraffic>, MapsError> {
        self.rule_traffic_over(&self.retired_traffic)
    }

    /// What rules no longer in the maps admitted, as this process folded it.
    pub fn retired_traffic(&self) -> &Arc<BTreeMap<RuleRef, RuleTraffic>> {
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
        let wanted = modes
            .iter()
            .map(|(uid, mode)| Ok((pod_uid(uid)?, *mode as u8)))
            .collect::<Result<_, MapsError>>()?;
        record(&mut self.pod_modes, map_names::POD_MODES, wanted)
    }

    /// Every pod's security groups as first enforced, by pod UID.
    pub fn pod_groups(&self) -> Result<BTreeMap<String, Vec<GroupId>>, MapsError> {
        let mut groups = BTreeMap::new();
        for entry in self.pod_groups.iter() {
            let (uid, held) = entry.map_err(map_err(map_names::POD_GROUPS))?;
            let count = usize::from(held.count).min(MAX_GROUPS_PER_POD);
            groups.insert(
                text(&uid.uid),
                held.groups[..count].iter().map(|g| text(g)).collect(),
            );
        }
        Ok(groups)
    }

    /// Makes the group store hold exactly `groups`: pods gone from the state leave it.
    pub fn record_pod_groups(
        &mut self,
        groups: &BTreeMap<String, Vec<GroupId>>,
    ) -> Result<(), MapsError> {
        let wanted = groups
            .iter()
            .map(|(uid, ids)| Ok((pod_uid(uid)?, pod_groups(ids)?)))
            .collect::<Result<_, MapsError>>()?;
        record(&mut self.pod_groups, map_names::POD_GROUPS, wanted)
    }
}

/// Makes a userspace-only map hold exactly `wanted`.
fn record<V: Pod + PartialEq>(
    map: &mut HashMap<MapData, PodUid, V>,
    name: &'static str,
    wanted: BTreeMap<PodUid, V>,
) -> Result<(), MapsError> {
    let held = read_hash(map, name)?;
    let diff = Diff::between(held, wanted);
    write_hash(map, &diff.write, name)?;
    remove_hash(map, &diff.remove, name)
}

fn pod_groups(ids: &[GroupId]) -> Result<PodGroups, MapsError> {
    let mut value = PodGroups {
        count: 0,
        _pad: [0; 3],
        groups: [[0; GROUP_BYTES]; MAX_GROUPS_PER_POD],
    };
    if ids.len() > MAX_GROUPS_PER_POD {
        return Err(MapsError::TooManyGroups(ids.len()));
    }
    for (slot, id) in value.groups.iter_mut().zip(ids) {
        slot.get_mut(..id.len())
            .ok_or_else(|| MapsError::GroupIdTooLong(id.clone()))?
            .copy_from_slice(id.as_bytes());
    }
    value.count = ids.len() as u8;
    Ok(value)
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

/// The kernel's copy of the NodeConfig settings it needs per packet. The
/// interfaces are looked up in the caller's network namespace (the node's).
pub fn settings(node: &NodeConfig) -> Settings {
    Settings {
        unknown_vlan_pass: u32::from(node.unknown_vlan == UnknownVlanAction::Pass),
        tcp_established_timeout: node.connection_tracking.tcp_established,
        udp_stream_timeout: node.connection_tracking.udp_stream,
        udp_timeout: node.connection_tracking.udp,
        max_flows_per_pod: node.max_flows_per_pod,
        max_fragments_per_pod: node.max_fragments_per_pod,
        nat: nat_settings(node),
        ..Settings::default()
    }
}

/// Standard mode's source NAT as the kernel needs it: off (zero) with
/// `externalSnat`, without an IPv4 primary address, or while an interface is
/// missing (`status` says so).
fn nat_settings(node: &NodeConfig) -> NatSettings {
    let address = node.primary_ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(v4.octets()),
        std::net::IpAddr::V6(_) => None,
    });
    let Some(address) = address.filter(|_| !node.external_snat) else {
        return NatSettings::default();
    };
    let mut nat = NatSettings {
        address,
        port_first: *node.snat_port_range.start(),
        port_last: *node.snat_port_range.end(),
        primary_ifindex: ifindex(&node.primary_interface),
        trunk_ifindex: ifindex(&node.trunk_interface),
        ..NatSettings::default()
    };
    let exempt = node
        .vpc_cidrs
        .iter()
        .chain(&node.exclude_snat_cidrs)
        .filter_map(|cidr| match cidr.addr() {
            std::net::IpAddr::V4(v4) => Some(NatPrefix {
                addr: v4.octets(),
                len: cidr.prefix_len(),
                _pad: [0; 3],
            }),
            std::net::IpAddr::V6(_) => None,
        });
    // The parser refuses more than the array holds.
    for (slot, prefix) in nat.exempt.iter_mut().zip(exempt) {
        *slot = prefix;
        nat.exempt_count += 1;
    }
    nat
}

/// The index of interface `name` in this network namespace; 0 if there is none.
fn ifindex(name: &str) -> u32 {
    std::ffi::CString::new(name)
        // SAFETY: a valid C string for the duration of the call.
        .map(|name| unsafe { libc::if_nametoindex(name.as_ptr()) })
        .unwrap_or(0)
}

/// Removes the entries `doomed` selects; returns how many this call deleted,
/// by VLAN (`vlan` of the key). An entry someone else deleted meanwhile (a
/// concurrent sweep) is theirs to count.
fn remove_where<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K, &V) -> bool,
    vlan: impl Fn(&K) -> u16,
) -> Result<BTreeMap<u16, u64>, MapsError> {
    let mut keys = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) if doomed(&key, &value) => keys.push(key),
            Ok(_) => {}
            // Deleted between the walk's key and its value.
            Err(e) if absent(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    let mut removed = BTreeMap::new();
    for key in &keys {
        match map.remove(key) {
            Ok(()) => *removed.entry(vlan(key)).or_default() += 1,
            Err(e) if absent(&e) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(removed)
}

/// Standard mode's source NAT as the kernel holds it (`status`, metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NatUse {
    /// The address translated flows leave from; `None`: translation is off
    /// (`externalSnat`, no IPv4 primary address, or an interface missing).
    pub address: Option<std::net::Ipv4Addr>,
    /// `snatPortRange`.
    pub ports: (u16, u16),
    /// Translated flows (mappings in `NAT_PORTS`).
    pub mappings: usize,
    /// The most ports one peer endpoint (address, port, protocol) holds: a
    /// new flow to it is dropped once this reaches the range's size.
    pub busiest_peer: usize,
}

/// What one [`KernelMaps::sweep`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub flows: u64,
    pub fragments: u64,
    pub nat_mappings: u64,
}

/// How long a source NAT mapping may wait for its flow's entry before the sweep
/// counts it an orphan (the kernel writes the two one after the other).
const NAT_SETTLE_NS: u64 = 1_000_000_000;

fn read_hash<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, MapsError> {
    map.iter().collect::<Result<_, _>>().map_err(map_err(name))
}

/// Waits until every program that may have read a pod's old entry has finished:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is an RCU grace period, and TC programs
/// run inside RCU read-side sections. Kernels that refuse it (nohz_full) get a
/// pause far longer than any program run.
pub(super) fn wait_for_running_programs() {
    /// `MEMBARRIER_CMD_GLOBAL` of `linux/membarrier.h`.
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes no pointers.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0;
    if !done {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::fixtures::{cidr, group, model, node, pod, rule, tcp};

    /// A strict or standard pod with one rule on each side, compiled.
    pub(super) fn compiled(mode: EnforcingMode) -> Compiled {
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

    /// Translation is on with both interfaces found and an IPv4 primary address; the
    /// VPC's IPv4 CIDRs and `excludeSnatCidrs` are exempt, IPv6 ones are not kept.
    #[test]
    fn nat_settings_follow_the_node_config() {
        let mut config = node(EnforcingMode::Standard, &["sg-node"]);
        config.trunk_interface = "lo".to_string();
        config.primary_interface = "lo".to_string();
        config.vpc_cidrs.push("2600:1f00::/56".parse().unwrap());
        config.exclude_snat_cidrs = vec!["192.168.0.0/16".parse().unwrap()];
        config.snat_port_range = 50000..=50009;
        let nat = settings(&config).nat;
        assert!(nat.enabled());
        assert_eq!(nat.address, [10, 0, 1, 10]);
        assert_eq!(
            (nat.port_first, nat.port_last, nat.port_count()),
            (50000, 50009, 10)
        );
        assert_eq!(nat.exempt_count, 2);
        for (addr, exempt) in [
            ([10, 0, 200, 1], true),
            ([192, 168, 3, 4], true),
            ([192, 0, 2, 7], false),
            ([10, 1, 0, 1], false),
        ] {
            assert_eq!(nat.exempts(addr), exempt, "{addr:?}");
        }
        let mut external = config.clone();
        external.external_snat = true;
        assert_eq!(settings(&external).nat, NatSettings::default());
        let mut missing = config.clone();
        missing.primary_interface = "sgp-no-such0".to_string();
        assert!(!settings(&missing).nat.enabled());
        let mut v6_only = config;
        v6_only.primary_ips = vec!["2600:1f00::10".parse().unwrap()];
        assert!(!settings(&v6_only).nat.enabled());
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
