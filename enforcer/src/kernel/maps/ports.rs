//! The classes' port tables: each a run of `PORT_RANGES` that its `PORT_TABLES` slot
//! points at. A class's ranges go into free space before its slot is written, and a run
//! is freed only after a grace period once no slot points at it (its class left, or was
//! switched to another run): as with the hash maps, no program ever reads a half-written
//! or reused table.
//!
//! A class keeps its ID when only its rules' ports changed (`compile::compile_with`), and
//! its slot is switched in place: one atomic 8-byte store ([`PortTable::word`]) through
//! the memory-mapped `PORT_TABLES`, which the kernel reads with one load, so a lookup reads
//! the whole old run or the whole new one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Array, MapData};
use enforcer_common::{MAX_CLASSES, PortRange, PortTable, map_names};

use super::batch::{read_array, write_array};
use super::mapped::Mapped;
use super::{MapSource, MapsError, typed, wait_for_running_programs};
use crate::compile::ClassEntries;

pub(super) struct PortTables {
    tables: Mapped<PortTable>,
    ranges: Array<MapData, PortRange>,
    /// Where each class the maps hold sits, by class.
    placed: BTreeMap<u32, PortTable>,
    /// Runs switched away from that programs may still read until a grace period passes.
    retiring: Vec<PortTable>,
}

impl PortTables {
    /// Opens the maps and finds where the tables they hold sit.
    pub(super) fn open(source: &mut impl MapSource) -> Result<Self, MapsError> {
        let mut ports = Self {
            tables: Mapped::open(source, map_names::PORT_TABLES, MAX_CLASSES as usize)?,
            ranges: typed(source, map_names::PORT_RANGES)?,
            placed: BTreeMap::new(),
            retiring: Vec::new(),
        };
        ports.placed = ports.read_placement();
        Ok(ports)
    }

    fn slot(&self, class: u32) -> &AtomicU64 {
        let slot = self
            .tables
            .slot(class as usize)
            .expect("admitted: class IDs are below MAX_CLASSES");
        // SAFETY: a live, 8-byte aligned slot of the mapping (`PortTable` is one aligned
        // word), which the kernel only reads, with one load.
        unsafe { AtomicU64::from_ptr(slot.cast()) }
    }

    fn read_placement(&self) -> BTreeMap<u32, PortTable> {
        (0..self.tables.len() as u32)
            .map(|class| {
                (
                    class,
                    PortTable::from_word(self.slot(class).load(Ordering::Acquire)),
                )
            })
            .filter(|(_, table)| table.count > 0)
            .collect()
    }

    /// Every class's table the maps hold, by class.
    pub(super) fn read(&mut self) -> Result<BTreeMap<u32, Arc<ClassEntries>>, MapsError> {
        self.placed = self.read_placement();
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

    /// Writes the tables of `classes` into free runs, then points their slots at them: new
    /// classes, and classes switched in place, whose previous runs stay until
    /// [`PortTables::retire`]. Returns how many entries.
    pub(super) fn write(&mut self, classes: &[(u32, &ClassEntries)]) -> Result<usize, MapsError> {
        let full = MapsError::Full {
            map: map_names::PORT_RANGES,
            capacity: self.ranges.len(),
        };
        let slots = match self.place(classes) {
            Some(slots) => slots,
            None if !self.retiring.is_empty() => {
                // The runs switched away from, once no program can be reading them.
                wait_for_running_programs();
                self.retiring.clear();
                self.place(classes).ok_or(full)?
            }
            None => return Err(full),
        };
        let mut ranges = Vec::new();
        for (&(_, entries), &(_, table)) in classes.iter().zip(&slots) {
            ranges.extend((table.first..).zip(entries.iter().copied()));
        }
        let written = write_array(&mut self.ranges, &ranges, map_names::PORT_RANGES)?;
        // The ranges are in the map (the system calls returned) before a slot names them:
        // the release stores order them for a program that loads the slot.
        for &(class, table) in &slots {
            self.slot(class).store(table.word(), Ordering::Release);
            if let Some(previous) = self.placed.insert(class, table) {
                self.retiring.push(previous);
            }
        }
        Ok(written + slots.len())
    }

    /// Where the tables of `classes` go, first fit in the free runs; `None` if one does not
    /// fit.
    fn place(&self, classes: &[(u32, &ClassEntries)]) -> Option<Vec<(u32, PortTable)>> {
        let mut free = self.free_runs();
        classes
            .iter()
            .map(|&(class, entries)| {
                let count = u32::try_from(entries.len()).expect("admitted: a table fits a search");
                take(&mut free, count).map(|first| (class, PortTable { first, count }))
            })
            .collect()
    }

    /// Once no program may still read them: zeroes the slots of `classes` and frees their
    /// runs, and, if a grace period passed since the switches (`waited`), the runs switched
    /// away from. Returns how many ranges of `classes`.
    pub(super) fn retire(&mut self, classes: &[u32], waited: bool) -> usize {
        for &class in classes {
            self.slot(class).store(0, Ordering::Release);
        }
        if waited {
            self.retiring.clear();
        }
        classes
            .iter()
            .filter_map(|class| self.placed.remove(class))
            .map(|table| table.count as usize)
            .sum()
    }

    /// The runs of `PORT_RANGES` no class uses nor may still be read, as (first, count),
    /// in order.
    fn free_runs(&self) -> Vec<(u32, u32)> {
        let mut used: Vec<PortTable> = self.placed.values().copied().collect();
        used.extend(&self.retiring);
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
