//! Each pod's use of its tracking allowance (`POD_TRACKED`): the kernel adds an
//! entry's count before it inserts the entry, and whoever deletes entries
//! (the sweep, a removed pod) subtracts them here. Both sides use atomic adds
//! on the same memory: the array is memory-mapped, because a map update from
//! userspace would overwrite whatever the kernel added meanwhile.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Map, MapData};
use enforcer_common::{MAX_PODS, PodTracked, map_names};

use super::{MapSource, MapsError};

/// `POD_TRACKED`, memory-mapped read-write.
pub struct TrackedCounts {
    /// Keeps the map (and so the mapping's object) open.
    _map: MapData,
    base: *mut PodTracked,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, only ever touched through atomics.
unsafe impl Send for TrackedCounts {}
// SAFETY: as above.
unsafe impl Sync for TrackedCounts {}

impl TrackedCounts {
    pub(super) fn open(source: &mut impl MapSource) -> Result<Self, MapsError> {
        let name = map_names::POD_TRACKED;
        let Map::Array(map) = source.map(name)? else {
            return Err(MapsError::Missing(name));
        };
        // An mmapable array's values are 8-byte aligned, from offset 0 (`PodTracked` is 16 bytes).
        let len = size_of::<PodTracked>() * MAX_PODS as usize;
        // SAFETY: a shared read-write mapping of the map's own fd; the kernel
        // refuses (MAP_FAILED) a map created without BPF_F_MMAPABLE.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                map: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            _map: map,
            base: base.cast(),
            len,
        })
    }

    fn slot(&self, vlan: u16) -> Option<*mut PodTracked> {
        (u32::from(vlan) < MAX_PODS).then(|| {
            // SAFETY: in bounds of the mapping (checked above).
            unsafe { self.base.add(usize::from(vlan)) }
        })
    }

    /// The pod's counts now.
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
                    flows: flows.load(Ordering::Relaxed),
                    fragments: fragments.load(Ordering::Relaxed),
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

impl Drop for TrackedCounts {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
