//! The library's typed errors for the kernel-facing parts; the binary adds
//! context with `anyhow`.

use std::path::PathBuf;

/// Errors of loading, attaching, pinning and removing the kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this enforcer was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoEbpfObject,
    #[error("loading the eBPF object")]
    Ebpf(#[source] Box<aya::EbpfError>),
    #[error("reading the eBPF object's map definitions")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("cannot read the pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot rename the pin {from} over {to}")]
    Repin {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("TCX link of program {name} (the kernel must support TCX, Linux 6.6 or later)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot read the link pinned at {path}")]
    LinkInfo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot detach the link of program {name}")]
    Detach {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot remove {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create pin directory {path} (is bpffs mounted on /sys/fs/bpf?)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An error with its causes, on one line: `error: cause: cause`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
