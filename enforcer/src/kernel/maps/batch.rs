//! `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6),
//! which aya does not wrap: one system call for thousands of entries, the bulk of an
//! apply's time otherwise.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::Pod;
use aya::maps::{Array, HashMap, IterableMap as _, MapData};

use super::MapsError;

/// Entries per `BPF_MAP_*_BATCH` call: the kernel copies them one by one, so this only
/// bounds the buffers.
const BATCH: usize = 8192;

pub(super) fn write_hash<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    entries: &[(K, V)],
    name: &'static str,
) -> Result<usize, MapsError> {
    write(map.map(), entries, name)
}

/// Writes `entries` (index, value) of an array.
pub(super) fn write_array<V: Pod>(
    map: &mut Array<MapData, V>,
    entries: &[(u32, V)],
    name: &'static str,
) -> Result<usize, MapsError> {
    write(map.map(), entries, name)
}

fn write<K: Pod, V: Pod>(
    map: &MapData,
    entries: &[(K, V)],
    name: &'static str,
) -> Result<usize, MapsError> {
    let fd = map.fd().as_fd();
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        update(fd, &keys, &values).map_err(|source| {
            // A hash map refuses a new key when full with E2BIG.
            if source.raw_os_error() == Some(libc::E2BIG) {
                let capacity = map.info().map_or(0, |info| info.max_entries());
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

/// Every value of an array, by index.
pub(super) fn read_array<V: Pod + Default>(
    map: &Array<MapData, V>,
    name: &'static str,
) -> Result<Vec<V>, MapsError> {
    let error = |source| MapsError::Batch { map: name, source };
    let fd = map.map().fd().as_fd();
    let len = map.len() as usize;
    let mut keys = vec![0u32; BATCH];
    let mut values = vec![V::default(); len];
    let mut read = 0;
    let mut after: Option<u32> = None;
    while read < len {
        let want = BATCH.min(len - read);
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: after.as_ref().map_or(0, |k| k as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values[read..].as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the buffers hold `count` keys and values and outlive the call.
        let ended = match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(error(e)),
        };
        read += attr.count as usize;
        if ended || attr.count == 0 {
            break;
        }
        after = Some(next);
    }
    values.truncate(read);
    Ok(values)
}

pub(super) fn remove_hash<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    name: &'static str,
) -> Result<(), MapsError> {
    let fd = map.map().fd().as_fd();
    for chunk in keys.chunks(BATCH) {
        delete(fd, chunk).map_err(|source| MapsError::Batch { map: name, source })?;
    }
    Ok(())
}

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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

fn update<K, V>(fd: BorrowedFd, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    call(BPF_MAP_UPDATE_BATCH, fd, keys, values.as_ptr() as u64)
}

fn delete<K>(fd: BorrowedFd, keys: &[K]) -> io::Result<()> {
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
    unsafe { bpf(cmd, &mut attr) }
}

/// # Safety
/// The pointers in `attr` must be valid for what `cmd` reads and writes.
unsafe fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: as the caller promises.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
