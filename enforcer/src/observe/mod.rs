//! What the kernel did, read back: `status` and `flows` for people, `/metrics`
//! and the health endpoints for machines.

pub mod events;
pub mod http;
pub mod metrics;
pub mod status;
