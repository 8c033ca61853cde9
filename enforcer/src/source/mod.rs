//! Where the node's picture comes from, and its resolution into the [`Model`]: the
//! file source (`state/`, watched by `watch`) feeds the resolver, which applies the
//! SecurityGroupPolicies and finds this node's branch pods and the groups' members.

pub mod access;
#[cfg(feature = "live")]
pub mod live;
mod resolve;
pub mod state;
pub mod watch;

pub use resolve::quarantine_unknown_groups;

use std::path::Path;
use std::time::SystemTime;

use crate::model::Model;
use state::{Documents, StateErrors};

/// Reads the state directory `dir` and resolves this node's model; every error,
/// the files' and the resolver's, in file order.
pub fn load(dir: &Path) -> Result<Model, StateErrors> {
    let inventory = state::read(dir)?;
    resolve::resolve(dir, inventory).map_err(StateErrors)
}

/// Resolves this node's model from state files held in memory (a live source's view),
/// exactly as [`load`] would from a directory of them; errors name the files as in
/// `origin`.
pub fn load_documents(origin: &Path, documents: &Documents) -> Result<Model, StateErrors> {
    let inventory = state::read_documents(origin, documents);
    resolve::resolve(origin, inventory).map_err(StateErrors)
}

/// One live source's health, as status and metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceHealth {
    /// `kubernetes/pods`, `ec2`, `imds`, ….
    pub name: String,
    /// When it last produced a view; `None` before its first.
    pub last_success: Option<SystemTime>,
    /// Why its latest attempt failed (its last view stays in use).
    pub error: Option<String>,
    pub error_at: Option<SystemTime>,
}
