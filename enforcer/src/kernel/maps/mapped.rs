//! Arrays created with `BPF_F_MMAPABLE`, mapped read-write into the agent: the only way
//! userspace can change a value with one atomic instruction (a map update copies it, and
//! may overwrite what the kernel wrote meanwhile, or be seen half-done).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Map, MapData};

use super::{MapSource, MapsError};

/// An array map of `len` values of `T`, mapped read-write.
pub(super) struct Mapped<T> {
    /// Keeps the map (and so the mapping's object) open.
    _map: MapData,
    base: *mut T,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; its users touch it only through atomics.
unsafe impl<T> Send for Mapped<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Mapped<T> {}

impl<T> Mapped<T> {
    /// Maps array `name` of `len` values. An mmapable array's values are 8-byte aligned
    /// from offset 0, so `T` must be a multiple of 8 bytes.
    pub(super) fn open(
        source: &mut impl MapSource,
        name: &'static str,
        len: usize,
    ) -> Result<Self, MapsError> {
        const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() <= 8) };
        let Map::Array(map) = source.map(name)? else {
            return Err(MapsError::Missing(name));
        };
        // SAFETY: a shared read-write mapping of the map's own fd; the kernel
        // refuses (MAP_FAILED) a map created without BPF_F_MMAPABLE.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size_of::<T>() * len,
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

    /// The value at `index`, if in bounds: live and 8-byte aligned while `self` is.
    pub(super) fn slot(&self, index: usize) -> Option<*mut T> {
        (index < self.len).then(|| {
            // SAFETY: in bounds of the mapping (checked above).
            unsafe { self.base.add(index) }
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), size_of::<T>() * self.len) };
    }
}
