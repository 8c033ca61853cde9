//! What every object shares: its metadata (namespace, name, labels) and the enforcing
//! action a pod's annotation and the NodeConfig both name.

use super::super::reader::{Field, Invalid, Problems};
use crate::model::EnforcingAction;
use crate::model::sgp::Labels;

/// `metadata.namespace` (default `default`) and `metadata.name`.
pub(super) fn namespaced_name(root: &Field, problems: &mut Problems) -> (String, Option<String>) {
    let metadata = root.get("metadata");
    let namespace = metadata
        .as_ref()
        .and_then(|m| m.get("namespace"))
        .and_then(|f| problems.ok(f.name().map(str::to_string)))
        .unwrap_or_else(|| "default".to_string());
    let name = problems.ok(root
        .require("metadata")
        .and_then(|m| m.require("name"))
        .and_then(|f| f.name().map(str::to_string)));
    (namespace, name)
}

pub(super) fn object_name(kind: &str, namespace: &str, name: Option<&str>) -> String {
    format!("{kind} {namespace}/{}", name.unwrap_or("(unnamed)"))
}

pub(super) fn labels(root: &Field, problems: &mut Problems) -> Labels {
    root.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|f| problems.ok(f.string_map()))
        .unwrap_or_default()
}

/// `enforce` or `audit` (NodeConfig `enforcingAction`, the pod's action annotation).
pub(super) fn action(value: &str, field: &Field) -> Result<EnforcingAction, Invalid> {
    EnforcingAction::parse(value)
        .ok_or_else(|| Invalid::new(&field.path, format!("{value:?} is not enforce or audit")))
}
