//! The kernel's maps as userspace sees them: the only place that writes them.
//! Applying a compiled state reconciles every map with it, whatever the maps
//! held before (a fresh load, a restart over pinned maps, or a previous state).

use std::collections::BTreeMap;
use std::hash::Hash;

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key};
use aya::{Ebpf, Pod};
use enforcer_common::{
    AddrKey, CtEntry, CtKey, PeerClass, PeerKeyV4, PeerKeyV6, PodEntry, PortKey, PortVerdict,
    REASONS, Settings, map_names,
};

use crate::compile::{Compiled, LpmKey};
use crate::model::{NodeConfig, UnknownVlanAction};

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
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

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
}

/// What one apply changed, for logs and for the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (its programs keep using them).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, MapsError> {
            let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
            T::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            pods: take(ebpf, map_names::PODS)?,
            peers_v4: take(ebpf, map_names::PEERS_V4)?,
            peers_v6: take(ebpf, map_names::PEERS_V6)?,
            ports: take(ebpf, map_names::PORTS)?,
            unfiltered: take(ebpf, map_names::UNFILTERED)?,
            node_local: take(ebpf, map_names::NODE_LOCAL)?,
            conntrack: take(ebpf, map_names::CONNTRACK)?,
            settings: take(ebpf, map_names::SETTINGS)?,
            counters: take(ebpf, map_names::COUNTERS)?,
        })
    }

    /// Makes the kernel enforce `compiled` with `node`'s settings. New policy
    /// entries go in before the pods that use them and stale ones leave after,
    /// so no pod ever points at a missing entry. A pod that is gone loses its
    /// tracked flows, so a reused VLAN never inherits them.
    pub fn apply(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        self.settings
            .set(0, settings(node), 0)
            .map_err(map_err(map_names::SETTINGS))?;
        stats.written += 1;
        stats.written += write_lpm(&mut self.peers_v4, &compiled.peers_v4, map_names::PEERS_V4)?;
        stats.written += write_lpm(&mut self.peers_v6, &compiled.peers_v6, map_names::PEERS_V6)?;
        stats.written += write_lpm(&mut self.ports, &compiled.ports, map_names::PORTS)?;
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
        stats.written += write_hash(&mut self.pods, &compiled.pods, map_names::PODS)?;

        let gone_pods = stale_hash(&self.pods, &compiled.pods, map_names::PODS)?;
        for vlan in &gone_pods {
            self.pods.remove(vlan).map_err(map_err(map_names::PODS))?;
        }
        stats.removed += gone_pods.len();
        stats.removed += self.forget_flows(|key| !compiled.pods.contains_key(&key.vlan))?;
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
        stats.removed += remove_stale_lpm(&mut self.ports, &compiled.ports, map_names::PORTS)?;
        stats.removed +=
            remove_stale_lpm(&mut self.peers_v6, &compiled.peers_v6, map_names::PEERS_V6)?;
        stats.removed +=
            remove_stale_lpm(&mut self.peers_v4, &compiled.peers_v4, map_names::PEERS_V4)?;
        Ok(stats)
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
}

/// The kernel's copy of the NodeConfig settings it needs per packet.
pub fn settings(node: &NodeConfig) -> Settings {
    Settings {
        unknown_vlan_pass: u32::from(node.unknown_vlan == UnknownVlanAction::Pass),
        tcp_established_timeout: node.connection_tracking.tcp_established,
        udp_stream_timeout: node.connection_tracking.udp_stream,
        udp_timeout: node.connection_tracking.udp,
    }
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

fn stale_hash<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<Vec<K>, MapsError> {
    let mut stale = Vec::new();
    for key in map.keys() {
        let key = key.map_err(map_err(name))?;
        if !wanted.contains_key(&key) {
            stale.push(key);
        }
    }
    Ok(stale)
}

fn remove_stale_hash<K: Pod + Ord, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, MapsError> {
    let stale = stale_hash(map, wanted, name)?;
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
