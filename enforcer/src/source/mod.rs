//! Where the node's picture comes from, and its resolution into the [`Model`]: the
//! file source (`state/`, watched by `watch`) feeds the resolver, which applies the
//! SecurityGroupPolicies and finds this node's branch pods and the groups' members.

pub mod access;
mod resolve;
pub mod state;
pub mod watch;

use std::path::Path;

use crate::model::Model;
use state::StateErrors;

/// Reads the state directory `dir` and resolves this node's model; every error,
/// the files' and the resolver's, in file order.
pub fn load(dir: &Path) -> Result<Model, StateErrors> {
    let inventory = state::read(dir)?;
    resolve::resolve(dir, inventory).map_err(StateErrors)
}

/// As [`load`], over files given as (name, text) instead of a directory's: the
/// parsers without the file system, for fuzzing (`fuzz/`).
pub fn load_texts(dir: &Path, files: &[(&str, &str)]) -> Result<Model, StateErrors> {
    resolve::resolve(dir, state::read_texts(dir, files)).map_err(StateErrors)
}
