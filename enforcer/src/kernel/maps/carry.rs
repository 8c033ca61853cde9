//! Tracked flows carried across an upgrade whose conntrack or fragment table
//! changed only its capacity or flags ([`crate::kernel::pins`]): the previous
//! build's entries are copied into the new tables, so that no established
//! connection's replies meet an empty table.
//!
//! Two passes, because the previous programs keep tracking until the new ones
//! replace them: [`Pass::Before`] copies everything while only the previous
//! programs run; [`Pass::After`], once the new programs are attached, copies
//! what the previous ones tracked or moved on since. The pods' counts
//! (`POD_TRACKED`) are shared by both builds and already count every entry of
//! the previous table; an entry the new table cannot take is given back.

use std::collections::BTreeSet;

use aya::Pod;
use aya::maps::{HashMap, Map, MapData, MapError};
use enforcer_common::{CtEntry, CtKey, FragmentKey, FragmentVerdict, map_names};

use super::{KernelMaps, MapsError, map_err};

/// The previous build's tracking tables whose entries move into the new ones:
/// open until the migration commits.
#[derive(Debug, Default)]
pub struct Carried {
    conntrack: Option<Map>,
    fragments: Option<Map>,
    /// Entries given back to their pods' counts: never twice.
    given_back: (BTreeSet<CtKey>, BTreeSet<FragmentKey>),
}

impl Carried {
    /// Where the previous table of map `name` is kept, if it is a tracking table.
    pub fn previous(&mut self, name: &str) -> Option<&mut Option<Map>> {
        match name {
            map_names::CONNTRACK => Some(&mut self.conntrack),
            map_names::FRAGMENTS => Some(&mut self.fragments),
            _ => None,
        }
    }

    /// Whether migrating map `name` loses tracked entries: a tracking table not carried.
    pub fn loses(&self, name: &str) -> bool {
        match name {
            map_names::CONNTRACK => self.conntrack.is_none(),
            map_names::FRAGMENTS => self.fragments.is_none(),
            _ => false,
        }
    }
}

/// When a copy runs, relative to the new programs' attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Only the previous programs run: every entry is copied as it is.
    Before,
    /// The new programs run too: an entry is copied if the new table lacks it
    /// or holds an older copy (the previous programs saw a later packet); what
    /// the new programs wrote since is theirs.
    After,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CarryStats {
    pub copied: usize,
    /// Entries the new table had no room for, given back to their pods' counts.
    pub dropped: usize,
}

/// A tracking table's entries, as a carry compares them.
trait Tracked: Pod {
    /// The table of such entries.
    const MAP: &'static str;
    /// When the entry last saw a packet: the later of two copies wins.
    fn seen(&self) -> u64;
}

impl Tracked for CtEntry {
    const MAP: &'static str = map_names::CONNTRACK;
    fn seen(&self) -> u64 {
        self.last_seen_ns
    }
}

impl Tracked for FragmentVerdict {
    const MAP: &'static str = map_names::FRAGMENTS;
    fn seen(&self) -> u64 {
        self.created_ns
    }
}

impl KernelMaps {
    /// Copies the carried tables' entries into this build's (see the module).
    pub fn carry(&mut self, carried: &mut Carried, pass: Pass) -> Result<CarryStats, MapsError> {
        let mut stats = CarryStats::default();
        if let Some(previous) = &carried.conntrack {
            let given_back = &mut carried.given_back.0;
            for key in copy(previous, &mut self.conntrack, pass, given_back, &mut stats)? {
                self.tracked.release(key.vlan, 1, 0);
            }
        }
        if let Some(previous) = &carried.fragments {
            let given_back = &mut carried.given_back.1;
            for key in copy(previous, &mut self.fragments, pass, given_back, &mut stats)? {
                self.tracked.release(key.vlan, 0, 1);
            }
        }
        Ok(stats)
    }
}

/// Copies `previous`'s entries into `into` for `pass`; returns the keys that
/// found no room and were not given back before (now added to `given_back`).
fn copy<K: Pod + Ord, V: Tracked>(
    previous: &Map,
    into: &mut HashMap<MapData, K, V>,
    pass: Pass,
    given_back: &mut BTreeSet<K>,
    stats: &mut CarryStats,
) -> Result<Vec<K>, MapsError> {
    let name = V::MAP;
    let previous: HashMap<&MapData, K, V> = HashMap::try_from(previous).map_err(map_err(name))?;
    let entries: Vec<(K, V)> = previous
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(name))?;
    let mut dropped = Vec::new();
    for (key, value) in entries {
        let current = match pass {
            Pass::Before => None,
            Pass::After => match into.get(&key, 0) {
                Ok(current) => Some(current),
                Err(MapError::KeyNotFound) => None,
                Err(error) => return Err(map_err(name)(error)),
            },
        };
        if current.is_some_and(|current| current.seen() >= value.seen()) {
            continue;
        }
        match into.insert(key, value, 0) {
            Ok(()) => stats.copied += 1,
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                stats.dropped += 1;
                if given_back.insert(key) {
                    dropped.push(key);
                }
            }
            Err(error) => return Err(map_err(name)(error)),
        }
    }
    Ok(dropped)
}
