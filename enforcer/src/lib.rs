//! The enforcer's userspace library: from a state directory to the kernel's maps.
//! Read `ARCHITECTURE.md` at the project root first.

pub mod agent;
pub mod compile;
pub mod ebpf;
mod error;
pub mod eval;
pub mod events;
pub mod explain;
pub mod flow;
pub mod http;
pub mod lint;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod pins;
mod prefix;
mod resolve;
pub mod sgp;
pub mod sources;
pub mod state;
pub mod status;
pub mod watch;

pub use error::{Error, error_chain};
