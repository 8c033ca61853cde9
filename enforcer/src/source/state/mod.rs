//! The file source: a state directory (EC2 CLI output, Kubernetes objects, the
//! NodeConfig) read into an [`Inventory`], every error with its file, object and field.

mod ec2;
mod k8s;
mod reader;
#[cfg(test)]
pub(crate) mod testdir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub(crate) use ec2::{NetworkInterface, rule_counts};
pub use k8s::ACTION_ANNOTATION;
#[cfg(feature = "live")]
pub(crate) use k8s::POD_ENI_ANNOTATION;
pub(crate) use k8s::{BranchEni, Pod, ServiceAccount};
use reader::{Field, Invalid, Problems};

use crate::model::sgp::SecurityGroupPolicy;
use crate::model::{Cidr, NodeConfig, SecurityGroup};

pub use crate::model::{Finding, FindingKind, StateError};

/// Every error found in a state directory, in file order; never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct StateErrors(pub Vec<StateError>);

fn display_lines(errors: &[StateError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads every object of the state directory `dir`; what cannot be read is in the
/// inventory's errors, for the resolver to report with its own.
pub(crate) fn read(dir: &Path) -> Result<Inventory, StateErrors> {
    let mut inventory = Inventory::default();
    let files = reader::state_files(dir).map_err(|e| StateErrors(vec![e]))?;
    for file in files {
        for document in reader::documents(&file, &mut inventory.errors) {
            let object = format!("document {}", document.index);
            inventory.classify(&document.file, &object, &document.value);
        }
    }
    Ok(inventory)
}

/// A state directory held in memory: file names and their text, as the live sources
/// build it. [`read_documents`] reads it exactly as [`read`] reads a directory holding
/// these files, and [`Documents::write_to`] makes that directory (`enforcer snapshot`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Documents(BTreeMap<String, String>);

impl Documents {
    /// Adds (or replaces) the file `name`: a state file's name (`*.json`, `*.yaml`,
    /// `*.yml`, not hidden), so that a written copy reads the same.
    pub fn insert(&mut self, name: impl Into<String>, text: impl Into<String>) {
        let name = name.into();
        assert!(
            reader::is_state_file_name(&name) && !name.contains('/'),
            "{name:?} is not a state file's name"
        );
        self.0.insert(name, text.into());
    }

    /// Adds every file of `other`.
    pub fn extend(&mut self, other: &Documents) {
        self.0
            .extend(other.0.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// The files, by name, in the order a directory of them is read.
    pub fn files(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Writes every file into `dir` (created if missing); a file there of the same
    /// name is replaced.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in &self.0 {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(())
    }
}

/// Reads every object of `documents` as [`read`] reads the same files in a directory;
/// errors name them as files of `origin`.
pub(crate) fn read_documents(origin: &Path, documents: &Documents) -> Inventory {
    let mut inventory = Inventory::default();
    for (name, text) in documents.files() {
        let file = origin.join(name);
        for document in reader::parse_documents(&file, text, &mut inventory.errors) {
            let object = format!("document {}", document.index);
            inventory.classify(&document.file, &object, &document.value);
        }
    }
    inventory
}

/// An object and where it was read, for error messages that point at it.
#[derive(Clone, Debug)]
pub(crate) struct Located<T> {
    pub file: PathBuf,
    /// As errors name it, e.g. `Pod shop/web`.
    pub object: String,
    pub item: T,
    /// What could not be read of it: the resolver isolates the object (never the state).
    pub problems: Vec<StateError>,
}

impl<T> Located<T> {
    pub fn new(file: &Path, object: String, item: T) -> Self {
        Self {
            file: file.to_path_buf(),
            object,
            item,
            problems: Vec::new(),
        }
    }

    /// The object with what could not be read of it.
    pub fn with_problems(file: &Path, object: String, item: T, problems: Problems) -> Self {
        let problems = problems.into_errors(file, &object);
        Self {
            problems,
            ..Self::new(file, object, item)
        }
    }

    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a reference names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A group a pod or the node carries (SGP `groupIds`, `primarySecurityGroups`).
    Group,
    /// A group a rule references (`UserIdGroupPairs`): legal in EC2 even when
    /// the state does not define it (another account, a peered VPC, a deleted group).
    ReferencedGroup,
    PrefixList,
}

/// A group or prefix list ID used somewhere, checked once every file is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reference {
    pub target: Target,
    pub id: String,
    pub field: String,
}

impl Reference {
    pub fn new(target: Target, id: &str, field: &str) -> Self {
        Self {
            target,
            id: id.to_string(),
            field: field.to_string(),
        }
    }
}

/// Everything read from a state directory, before resolution.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    /// What no object can be blamed for (a file that cannot be read or parsed, an
    /// object of no known kind or without a name, the NodeConfig): the state is refused.
    pub errors: Vec<StateError>,
    /// Objects set aside as they were read (a policy whose selector cannot be
    /// evaluated selects nothing, as the VPC resource controller skips it).
    pub skipped: Vec<StateError>,
    pub groups: Vec<Located<SecurityGroup>>,
    pub interfaces: Vec<Located<NetworkInterface>>,
    pub prefix_lists: Vec<Located<(String, Vec<Cidr>)>>,
    pub pods: Vec<Located<Pod>>,
    pub service_accounts: Vec<Located<ServiceAccount>>,
    pub policies: Vec<Located<SecurityGroupPolicy>>,
    /// `None` for a NodeConfig too broken to use, so that it still counts as present.
    pub node_configs: Vec<Located<Option<NodeConfig>>>,
    pub references: Vec<Located<Reference>>,
}

pub(crate) const SGP_API_VERSION: &str = "vpcresources.k8s.aws/v1beta1";
const NODE_CONFIG_API_VERSION: &str = "enforcer.sgp.dev/v1alpha1";

impl Inventory {
    pub fn invalid(&mut self, file: &Path, object: &str, invalid: Invalid) {
        self.errors.push(StateError {
            file: file.to_path_buf(),
            object: object.to_string(),
            field: invalid.field,
            message: invalid.message,
        });
    }

    /// A named object (`item`) joins its list with what could not be read of it;
    /// an unnamed one cannot be attributed, so its problems refuse the state.
    pub fn admit<T>(
        &mut self,
        list: impl FnOnce(&mut Self) -> &mut Vec<Located<T>>,
        file: &Path,
        object: String,
        item: Option<T>,
        problems: Problems,
    ) {
        match item {
            Some(item) => {
                let located = Located::with_problems(file, object, item, problems);
                list(self).push(located);
            }
            None => problems.report(file, &object, &mut self.errors),
        }
    }

    pub fn add_references(&mut self, file: &Path, object: &str, references: Vec<Reference>) {
        let located = references
            .into_iter()
            .map(|r| Located::new(file, object.to_string(), r));
        self.references.extend(located);
    }

    /// Recognises an object by its shape (design.md, "State directory") and
    /// reads it; anything unrecognised is an error, so that a typo in `kind`
    /// cannot silently drop a policy.
    fn classify(&mut self, file: &Path, object: &str, value: &Value) {
        let root = Field::root(value);
        if !value.is_object() {
            return self.invalid(file, object, Invalid::new("", "expected a mapping"));
        }
        let text = |key| root.get(key).and_then(|f| f.value.as_str());
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        if let Some(items) = root
            .get("items")
            .filter(|_| kind.is_some_and(|k| k.ends_with("List")))
        {
            match items.items() {
                Ok(items) => {
                    for item in items {
                        self.classify(file, &format!("{object} {}", item.path), item.value);
                    }
                }
                Err(e) => self.invalid(file, object, e),
            }
            return;
        }
        if let Some(list) = root.get("SecurityGroups") {
            return ec2::security_groups(file, list, self);
        }
        if let Some(list) = root.get("NetworkInterfaces") {
            return ec2::network_interfaces(file, list, self);
        }
        if root.get("PrefixListId").is_some() && root.get("Entries").is_some() {
            return ec2::prefix_list(file, root, self);
        }
        match (api_version, kind) {
            (Some("v1"), Some("Pod")) => k8s::pod(file, root, self),
            (Some("v1"), Some("ServiceAccount")) => k8s::service_account(file, root, self),
            (Some(SGP_API_VERSION), Some("SecurityGroupPolicy")) => {
                k8s::security_group_policy(file, root, self)
            }
            (Some(NODE_CONFIG_API_VERSION), Some("NodeConfig")) => {
                k8s::node_config(file, root, self)
            }
            _ => {
                let named = root
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(|f| f.value.as_str());
                let object = match (kind, named) {
                    (Some(kind), Some(name)) => format!("{kind} {name}"),
                    _ => object.to_string(),
                };
                let message = format!(
                    "unrecognised object (apiVersion {}, kind {}): expected EC2 SecurityGroups, \
                     NetworkInterfaces or a prefix list (PrefixListId, Entries), a v1 Pod or \
                     ServiceAccount, a {SGP_API_VERSION} SecurityGroupPolicy or a \
                     {NODE_CONFIG_API_VERSION} NodeConfig",
                    api_version.unwrap_or("absent"),
                    kind.unwrap_or("absent"),
                );
                self.invalid(file, &object, Invalid::new("", message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::{NODE_CONFIG, NODE_GROUP, StateDir};
    use super::*;
    use crate::source::load;

    const ACCOUNT: &str =
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n";

    #[test]
    fn display_omits_absent_parts() {
        let mut error = StateError {
            file: "s/g.json".into(),
            object: "SecurityGroup sg-1".into(),
            field: Some("IpPermissions[2].FromPort".into()),
            message: "bad".into(),
        };
        assert_eq!(
            error.to_string(),
            "s/g.json: SecurityGroup sg-1: IpPermissions[2].FromPort: bad"
        );
        error.field = None;
        assert_eq!(error.to_string(), "s/g.json: SecurityGroup sg-1: bad");
        error.object.clear();
        assert_eq!(error.to_string(), "s/g.json: bad");
        let errors = StateErrors(vec![error.clone(), error]);
        assert_eq!(errors.to_string(), "s/g.json: bad\ns/g.json: bad");
    }

    #[test]
    fn reads_state_files_only() {
        let dir = StateDir::with_node()
            .file(".hidden.yaml", "not: [valid")
            .file("README.md", "# notes")
            .file("notes.txt", "{")
            .file("accounts.yml", ACCOUNT);
        // A ConfigMap mount: visible names are symlinks into a hidden `..data`.
        let data = dir.path().join("..2024_06_11_08_31_17.123");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("pods.yaml"), "not: [valid").unwrap();
        std::fs::write(data.join("extra.yaml"), ACCOUNT.replace("web", "api")).unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("..data/extra.yaml"),
            dir.path().join("extra.yaml"),
        )
        .unwrap();
        // Not recursive, even into a directory named like a state file.
        let nested = dir.path().join("nested.yaml");
        std::fs::create_dir(&nested).unwrap();
        std::fs::write(nested.join("broken.json"), "{").unwrap();
        dir.model();
        let files = reader::state_files(dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "accounts.yml",
                "extra.yaml",
                "groups-node.json",
                "node.yaml"
            ]
        );
    }

    #[test]
    fn dangling_symlink_is_an_error() {
        let dir = StateDir::with_node();
        std::os::unix::fs::symlink(dir.path().join("gone.yaml"), dir.path().join("pods.yaml"))
            .unwrap();
        dir.error(&["pods.yaml", "cannot read"]);
    }

    #[test]
    fn missing_directory() {
        let dir = StateDir::empty();
        let gone = dir.path().join("nope");
        let errors = load(&gone).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert!(
            errors.0[0]
                .to_string()
                .contains("cannot read the state directory")
        );
    }

    #[test]
    fn multi_document_yaml_and_lists() {
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\nmetadata: {{resourceVersion: \"\"}}\n",
            ACCOUNT.trim_end().replace('\n', "\n  "),
            ACCOUNT
                .trim_end()
                .replace('\n', "\n  ")
                .replace("web", "db"),
        );
        let dir = StateDir::empty()
            .file("all.yaml", &format!("---\n{NODE_CONFIG}---\n{list}---\n"))
            .file("groups.yaml", &format!("---\n{NODE_GROUP}\n"));
        let model = dir.model();
        assert!(model.groups.contains_key("sg-0node"));
        // The pod list kind the API returns directly is unpacked too.
        let dir = StateDir::with_node().file(
            "pods.json",
            r#"{"apiVersion": "v1", "kind": "PodList", "items": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
                 "status": {"podIP": "10.0.9.9"}}, {"kind": "Secret", "metadata": {"name": "s"}}]}"#,
        );
        dir.error(&["pods.json", "Secret s", "unrecognised object"]);
    }

    #[test]
    fn list_items_are_named_by_position_when_unnamed() {
        let dir = StateDir::with_node().file(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: ok}}\n- 42\n",
        );
        dir.error(&["list.yaml", "document 1 items[1]", "expected a mapping"]);
    }

    #[test]
    fn malformed_files() {
        let dir = StateDir::with_node()
            .file("a.json", r#"{"SecurityGroups": [}"#)
            .file(
                "b.yaml",
                &format!("{ACCOUNT}---\nkey: [unclosed\n---\n{ACCOUNT}"),
            );
        let errors = dir.errors();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].contains("a.json: document 1: malformed JSON"),
            "{}",
            errors[0]
        );
        assert!(errors[0].contains("line 1"), "{}", errors[0]);
        assert!(
            errors[1].contains("b.yaml: document 2: malformed YAML"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn a_file_without_any_object_is_an_error() {
        for text in [
            "",
            " \n  \n",
            "# no pods yet\n",
            "---\n",
            "--- # none\n...\n",
        ] {
            let dir = StateDir::with_node().file("pods.yaml", text);
            dir.error(&["pods.yaml", "no object"]);
        }
        let dir = StateDir::with_node().file("pods.json", " \n");
        dir.error(&["pods.json", "malformed JSON"]);
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let list = "apiVersion: v1\nkind: List\nitems:\n\
                    - apiVersion: v1\n  kind: ServiceAccount\n  metadata: {name: web, namespace: shop}\n\
                    - apiVersion: v1\n  kind: ServiceAccount\n  metadata: {name: db, namespace: shop}\n";
        StateDir::with_node().file("accounts.yaml", list).model();
        for cut in [
            "items:\n",
            "- apiVersion: v1\n  kind: Servi",
            "metadata: {name: db, nam",
            "namespace: shop}\n- apiVersion: v1\n",
            "- ",
        ] {
            let end = list.rfind(cut).expect("a cut point") + cut.len();
            let dir = StateDir::with_node().file("accounts.yaml", &list[..end]);
            let errors = dir.errors();
            assert!(
                errors.iter().all(|e| e.contains("accounts.yaml")),
                "cut after {cut:?}: {errors:#?}"
            );
        }
        let dir = StateDir::with_node().file(
            "pods.json",
            r#"{"apiVersion": "v1", "kind": "PodList", "items": [{"apiVersion": "v1", "kin"#,
        );
        dir.error(&["pods.json", "malformed JSON"]);
    }

    #[test]
    fn explicit_empty_lists_are_states_without_objects() {
        let model = StateDir::with_node()
            .file("pods.yaml", "apiVersion: v1\nkind: List\nitems: []\n")
            .file(
                "pods.json",
                r#"{"apiVersion": "v1", "kind": "PodList", "items": []}"#,
            )
            .file("enis.json", r#"{"NetworkInterfaces": []}"#)
            .model();
        assert!(model.pods.is_empty());
    }

    /// Loads `dir` on another thread: a state file that blocks the reader fails the test.
    fn errors_without_hanging(dir: &StateDir) -> Vec<String> {
        let path = dir.path().to_path_buf();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let errors = load(&path)
                .err()
                .map(|e| e.0.iter().map(ToString::to_string).collect());
            let _ = sender.send(errors);
        });
        receiver
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("loading the state hung")
            .expect("the state loaded without errors")
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = StateDir::with_node();
        let fifo = std::ffi::CString::new(
            dir.path()
                .join("pods.yaml")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
        std::os::unix::fs::symlink("/dev/null", dir.path().join("device.yaml")).unwrap();
        let _socket =
            std::os::unix::net::UnixListener::bind(dir.path().join("socket.json")).unwrap();
        let errors = errors_without_hanging(&dir);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        for (error, name) in errors
            .iter()
            .zip(["device.yaml", "pods.yaml", "socket.json"])
        {
            assert!(error.contains(name), "{error}");
            assert!(error.contains("not a regular file"), "{error}");
        }
    }

    #[test]
    fn a_file_larger_than_the_cap_is_not_read() {
        let dir = StateDir::with_node();
        let big = std::fs::File::create(dir.path().join("pods.yaml")).unwrap();
        // Sparse: no disk is used, but reading it whole would take 64 MiB.
        big.set_len(reader::MAX_FILE_BYTES + 1).unwrap();
        let errors = errors_without_hanging(&dir);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("pods.yaml"), "{}", errors[0]);
        assert!(errors[0].contains("more than the 64 MiB"), "{}", errors[0]);
    }

    #[test]
    fn wrong_types_name_their_field() {
        let dir = StateDir::with_node()
            .file("g.json", r#"{"SecurityGroups": {"GroupId": "sg-1"}}"#)
            .file(
                "p.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {tier: 1}\nspec: {hostNetwork: yes}\n",
            );
        let errors = dir.errors();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors[0]
                .contains("g.json: document: SecurityGroups: expected a list, found a mapping")
        );
        assert!(errors[1].contains(
            "p.yaml: Pod default/p: metadata.labels.tier: expected a string, found a number"
        ));
        assert!(
            errors[2].contains("p.yaml: Pod default/p: spec.hostNetwork: expected true or false")
        );
    }
}
