//! Each pod's use of its tracking allowance (`POD_TRACKED`): the kernel adds an
//! entry's count before it inserts the entry, and whoever deletes entries
//! (the sweep, a removed pod) subtracts them here. Both sides use atomic adds
//! on the same memory: the array is memory-mapped, because a map update from
//! userspace would overwrite whatever the kernel added meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};

use enforcer_common::{MAX_PODS, PodTracked, map_names};

use super::mapped::Mapped;
use super::{MapSource, MapsError};

/// `POD_TRACKED`, memory-mapped read-write.
pub struct TrackedCounts(Mapped<PodTracked>);

impl TrackedCounts {
    pub(super) fn open(source: &mut impl MapSource) -> Result<Self, MapsError> {
        let counts = Mapped::open(source, map_names::POD_TRACKED, MAX_PODS as usize)?;
        Ok(Self(counts))
    }

    fn slot(&self, vlan: u16) -> Option<*mut PodTracked> {
        self.0.slot(usize::from(vlan))
    }

    /// The pod's counts now. The kernel compares them as signed, and a
    /// release racing its give-back may leave one below zero for a moment:
    /// such a count reads as 0, not as 2^64 - 1.
    pub fn get(&self, vlan: u16) -> PodTracked {
        self.slot(vlan)
            .map(|slot| {
                // SAFETY: a live, aligned slot of the mapping, read atomically.
                let (flows, fragments) = unsafe {
                    (
                        AtomicU64::from_ptr(&raw mut (*slot).flows),
                        AtomicU64::from_ptr(&raw mut (*slot).fragments),
                    )
                };
                PodTracked {
                    flows: held(flows.load(Ordering::Relaxed)),
                    fragments: held(fragments.load(Ordering::Relaxed)),
                }
            })
            .unwrap_or_default()
    }

    /// Gives back `flows` conntrack and `fragments` fragment slots the caller
    /// deleted, never below zero: entries the kernel did not count (written by
    /// hand, or left by a table whose counts were lost) must not make a count
    /// wrap and lock a pod out.
    pub fn release(&self, vlan: u16, flows: u64, fragments: u64) {
        let Some(slot) = self.slot(vlan) else { return };
        let release = |count: &AtomicU64, n: u64| {
            let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
        };
        // SAFETY: a live, aligned slot of the mapping; the kernel adds to the
        // same words with atomic instructions.
        unsafe {
            release(AtomicU64::from_ptr(&raw mut (*slot).flows), flows);
            release(AtomicU64::from_ptr(&raw mut (*slot).fragments), fragments);
        }
    }
}

/// A count as the kernel reads it (signed), none below zero.
fn held(count: u64) -> u64 {
    if (count as i64) < 0 { 0 } else { count }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_count_raced_below_zero_reads_as_none_held() {
        assert_eq!(super::held(u64::MAX), 0);
        assert_eq!(super::held(7), 7);
    }
}
