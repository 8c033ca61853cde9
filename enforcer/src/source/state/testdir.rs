//! Temporary state directories for unit tests, written in the native formats,
//! with a minimal valid node so that each test adds only what it is about.

use std::path::Path;

use super::StateErrors;
use crate::model::{FindingKind, Model};
use crate::source::load;

/// The node every test directory starts with.
pub(crate) const NODE: &str = "ip-10-0-1-10.ec2.internal";

pub(crate) const NODE_CONFIG: &str = "\
apiVersion: enforcer.sgp.dev/v1alpha1
kind: NodeConfig
metadata:
  name: ip-10-0-1-10.ec2.internal
spec:
  trunkInterface: eth1
  primaryInterface: eth0
  primaryIPs: [10.0.1.10]
  primarySecurityGroups: [sg-0node]
  vpcCidrs: [10.0.0.0/16]
";

/// `describe-security-groups` output holding the node's group only.
pub(crate) const NODE_GROUP: &str = r#"{"SecurityGroups": [{
  "GroupId": "sg-0node", "GroupName": "node", "Description": "nodes",
  "IpPermissions": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}],
  "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
}]}"#;

pub(crate) struct StateDir(tempfile::TempDir);

impl StateDir {
    /// An empty directory.
    pub fn empty() -> Self {
        Self(tempfile::tempdir().expect("create a temporary directory"))
    }

    /// A directory with `node.yaml` and `groups-node.json`.
    pub fn with_node() -> Self {
        Self::empty()
            .file("node.yaml", NODE_CONFIG)
            .file("groups-node.json", NODE_GROUP)
    }

    pub fn file(self, name: &str, text: &str) -> Self {
        std::fs::write(self.path().join(name), text).expect("write a state file");
        self
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn load(&self) -> Result<Model, StateErrors> {
        load(self.path())
    }

    /// The model; panics with the errors if there are any.
    pub fn model(&self) -> Model {
        self.load()
            .unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
    }

    /// Every problem line: the errors of a refused state, or else the findings
    /// that are not warnings (objects set aside or ignored, pods quarantined);
    /// panics if there are none.
    pub fn errors(&self) -> Vec<String> {
        let lines: Vec<String> = match self.load() {
            Ok(model) => model
                .findings
                .iter()
                .filter(|f| f.kind != FindingKind::Warning)
                .map(|f| f.at.to_string())
                .collect(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        };
        assert!(
            !lines.is_empty(),
            "the state directory loaded without problems"
        );
        lines
    }

    /// The errors of a refused state; panics if the directory loads.
    pub fn refusal(&self) -> Vec<String> {
        match self.load() {
            Ok(model) => panic!("the state loaded, with findings {:#?}", model.findings),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// The findings of `kind`, as lines; panics if the state is refused.
    pub fn findings(&self, kind: FindingKind) -> Vec<String> {
        self.model()
            .findings_of(kind)
            .map(|f| f.at.to_string())
            .collect()
    }

    /// The single problem line, which must mention every one of `parts`.
    pub fn error(&self, parts: &[&str]) -> String {
        let errors = self.errors();
        assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
        for part in parts {
            assert!(errors[0].contains(part), "{:?} lacks {part:?}", errors[0]);
        }
        errors[0].clone()
    }
}

/// A `describe-security-groups` document with one group and the given
/// permission lists (JSON arrays).
pub(crate) fn group(id: &str, ingress: &str, egress: &str) -> String {
    format!(
        r#"{{"SecurityGroups": [{{"GroupId": "{id}", "GroupName": "{id}", "Description": "",
        "IpPermissions": {ingress}, "IpPermissionsEgress": {egress}}}]}}"#
    )
}
