//! The enforcer's userspace library: from what the node is given to the kernel's maps.
//! Read `ARCHITECTURE.md` at the project root first; the folders are its stages, in order.

pub mod agent;
pub mod compile;
mod error;
pub mod kernel;
pub mod model;
pub mod observe;
pub mod policy;
pub mod source;

pub use error::{Error, error_chain};
