//! The library's typed errors; the binary adds context with `anyhow`.

/// Errors of the kernel-facing parts of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this enforcer was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoEbpfObject,
    #[error("loading the eBPF object")]
    Ebpf(#[source] Box<aya::EbpfError>),
}
