//! The kernel programs' object, embedded at build time, and loading it.

use aya::{Ebpf, EbpfLoader};

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

/// Loads the object into the kernel: maps are created, programs are not yet verified.
pub fn load() -> Result<Ebpf, Error> {
    EbpfLoader::new()
        .load(object()?)
        .map_err(|e| Error::Ebpf(Box::new(e)))
}
