//! The enforcer's userspace library: from a state directory to the kernel's maps.
//! Read `ARCHITECTURE.md` at the project root first.

pub mod ebpf;
mod error;
pub mod model;

pub use error::Error;
