//! The kernel programs' object, embedded at build time, and loading it:
//! maps pinned by name under the pin path (so a restart finds them), the
//! programs verified and attached to the trunk interface.

use std::path::{Path, PathBuf};

use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use enforcer_common::map_names;

use crate::Error;

/// The eBPF ELF built by `cargo xtask build-ebpf` (empty if it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf.o"));

/// Name of the TC program for traffic arriving on the trunk (network -> pod).
pub const TC_INGRESS: &str = "tc_ingress";
/// Name of the TC program for traffic leaving on the trunk (pod -> network).
pub const TC_EGRESS: &str = "tc_egress";

/// The embedded object, or an error saying how to build it.
pub fn object() -> Result<&'static [u8], Error> {
    if OBJECT.is_empty() {
        Err(Error::NoEbpfObject)
    } else {
        Ok(OBJECT)
    }
}

/// Loads the object with private maps (tests, benchmarks).
pub fn load() -> Result<Ebpf, Error> {
    EbpfLoader::new()
        .load(object()?)
        .map_err(|e| Error::Ebpf(Box::new(e)))
}

/// Where a map is pinned under `pin_path`.
pub fn map_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join("maps").join(name)
}

/// Loads the object with every map pinned under `pin_path/maps/`: maps
/// already pinned there (by a previous agent) are reused with their content.
pub fn load_pinned(pin_path: &Path) -> Result<Ebpf, Error> {
    let dir = pin_path.join("maps");
    std::fs::create_dir_all(&dir).map_err(|source| Error::PinDir {
        path: dir.clone(),
        source,
    })?;
    let mut loader = EbpfLoader::new();
    for name in map_names::ALL {
        loader.map_pin_path(name, map_pin(pin_path, name));
    }
    loader.load(object()?).map_err(|e| Error::Ebpf(Box::new(e)))
}

/// Verifies both classifiers and attaches them to `interface` (TCX where the
/// kernel has it, clsact otherwise).
pub fn attach(ebpf: &mut Ebpf, interface: &str) -> Result<(), Error> {
    if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0)) {
        // Netlink attachment needs the clsact qdisc; it may already be there.
        let _ = tc::qdisc_add_clsact(interface);
    }
    for (name, attach_type) in [
        (TC_INGRESS, TcAttachType::Ingress),
        (TC_EGRESS, TcAttachType::Egress),
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|e| Error::Program { name, source: e })?;
        program
            .load()
            .map_err(|e| Error::Program { name, source: e })?;
        program
            .attach(interface, attach_type)
            .map_err(|e| Error::Program { name, source: e })?;
    }
    Ok(())
}
