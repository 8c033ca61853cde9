//! The classes' port tables: each a run of `PORT_RANGES` that its `PORT_TABLES` slot
//! points at. A new class's ranges go into free space before its slot is written, and a
//! class leaves by its slot being zeroed (after a grace period), which frees its run: as
//! with the hash maps, no program ever reads a half-written or reused table.

use std::collections::BTreeMap;
use std::sync::Arc;

use aya::maps::{Array, MapData};
use enforcer_common::{PortRange, PortTable, map_names};

use super::batch::{read_array, write_array};
use super::{MapSource, MapsError, typed};
use crate::compile::ClassEntries;

pub(super) struct PortTables {
    tables: Array<MapData, PortTable>,
    ranges: Array<MapData, PortRange>,
    /// Where each class the maps hold sits, by class.
    placed: BTreeMap<u32, PortTable>,
}

impl PortTables {
    /// Opens the maps and finds where the tables they hold sit.
    pub(super) fn open(source: &mut impl MapSource) -> Result<Self, MapsError> {
        let mut ports = Self {
            tables: typed(source, map_names::PORT_TABLES)?,
            ranges: typed(source, map_names::PORT_RANGES)?,
            placed: BTreeMap::new(),
        };
        ports.placed = ports.read_placement()?;
        Ok(ports)
    }

    fn read_placement(&self) -> Result<BTreeMap<u32, PortTable>, MapsError> {
        let slots = read_array(&self.tables, map_names::PORT_TABLES)?;
        Ok((0..)
            .zip(slots)
            .filter(|(_, table)| table.count > 0)
            .collect())
    }

    /// Every class's table the maps hold, by class.
    pub(super) fn read(&mut self) -> Result<BTreeMap<u32, Arc<ClassEntries>>, MapsError> {
        self.placed = self.read_placement()?;
        let ranges = read_array(&self.ranges, map_names::PORT_RANGES)?;
        Ok(self
            .placed
            .iter()
            .map(|(&class, table)| {
                let run = table.first as usize..(table.first + table.count) as usize;
                (class, Arc::new(ranges[run].to_vec()))
            })
            .collect())
    }

    /// Writes the tables of new classes, then their slots; returns how many entries.
    pub(super) fn write(&mut self, classes: &[(u32, &ClassEntries)]) -> Result<usize, MapsError> {
        let mut free = self.free_runs();
        let mut ranges = Vec::new();
        let mut slots = Vec::with_capacity(classes.len());
        for &(class, entries) in classes {
            let count = u32::try_from(entries.len()).expect("admitted: a table fits a search");
            let Some(first) = take(&mut free, count) else {
                return Err(MapsError::Full {
                    map: map_names::PORT_RANGES,
                    capacity: self.ranges.len(),
                });
            };
            ranges.extend((first..).zip(entries.iter().copied()));
            let table = PortTable { first, count };
            slots.push((class, table));
            self.placed.insert(class, table);
        }
        let written = write_array(&mut self.ranges, &ranges, map_names::PORT_RANGES)?;
        Ok(written + write_array(&mut self.tables, &slots, map_names::PORT_TABLES)?)
    }

    /// Zeroes the slots of `classes` (no program may still read them) and frees their
    /// ranges; returns how many ranges.
    pub(super) fn remove(&mut self, classes: &[u32]) -> Result<usize, MapsError> {
        let slots: Vec<(u32, PortTable)> = classes
            .iter()
            .map(|&class| (class, PortTable::default()))
            .collect();
        write_array(&mut self.tables, &slots, map_names::PORT_TABLES)?;
        Ok(classes
            .iter()
            .filter_map(|class| self.placed.remove(class))
            .map(|table| table.count as usize)
            .sum())
    }

    /// The runs of `PORT_RANGES` no class uses, as (first, count), in order.
    fn free_runs(&self) -> Vec<(u32, u32)> {
        let mut used: Vec<PortTable> = self.placed.values().copied().collect();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut next = 0;
        for table in used {
            if table.first > next {
                free.push((next, table.first - next));
            }
            next = next.max(table.first + table.count);
        }
        free.push((next, self.ranges.len() - next));
        free
    }
}

/// Takes `count` ranges from the first free run that holds them.
fn take(free: &mut [(u32, u32)], count: u32) -> Option<u32> {
    let run = free.iter_mut().find(|(_, left)| *left >= count)?;
    let first = run.0;
    *run = (run.0 + count, run.1 - count);
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_take_the_first_free_run_that_holds_them() {
        let mut free = vec![(0, 2), (10, 5), (20, 100)];
        assert_eq!(take(&mut free, 3), Some(10));
        assert_eq!(take(&mut free, 2), Some(0));
        assert_eq!(take(&mut free, 2), Some(13));
        assert_eq!(take(&mut free, 101), None);
        assert_eq!(take(&mut free, 100), Some(20));
        assert_eq!(free, [(2, 0), (15, 0), (120, 0)]);
    }
}
