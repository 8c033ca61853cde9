//! The deployment as the tests see it: `deploy/` rendered by `kubectl kustomize`
//! and read as k8s-openapi types (every document exactly: a field the types do not
//! know fails), and the image `cargo xtask image` builds, run with the project's
//! podman (`image/podman`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// What a kustomization renders, by kind; any other kind fails the render.
#[derive(Debug, Default)]
pub struct Rendered {
    pub daemon_sets: Vec<DaemonSet>,
    pub config_maps: Vec<ConfigMap>,
    pub service_accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub deployments: Vec<Deployment>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
    pub custom_resource_definitions: Vec<CustomResourceDefinition>,
}

impl Rendered {
    /// The one DaemonSet.
    pub fn daemon_set(&self) -> &DaemonSet {
        assert_eq!(self.daemon_sets.len(), 1, "one DaemonSet");
        &self.daemon_sets[0]
    }
}

/// `kubectl kustomize deploy/<dir>` (`""`: the base), parsed.
pub fn render(dir: &str) -> Rendered {
    let path = workspace_root().join("deploy").join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("run kubectl (`cargo xtask setup` checks it is installed)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    let mut rendered = Rendered::default();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).expect("a YAML document");
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "DaemonSet" => rendered.daemon_sets.push(exactly(value)),
            "ConfigMap" => rendered.config_maps.push(exactly(value)),
            "ServiceAccount" => rendered.service_accounts.push(exactly(value)),
            "ClusterRole" => rendered.cluster_roles.push(exactly(value)),
            "ClusterRoleBinding" => rendered.cluster_role_bindings.push(exactly(value)),
            "Deployment" => rendered.deployments.push(exactly(value)),
            "Role" => rendered.roles.push(exactly(value)),
            "RoleBinding" => rendered.role_bindings.push(exactly(value)),
            "PodDisruptionBudget" => rendered.pod_disruption_budgets.push(exactly(value)),
            // Generated from the code, so compared with it by the tests rather than
            // round-tripped: its schema's bounds (f64) do not read back byte for byte.
            "CustomResourceDefinition" => rendered
                .custom_resource_definitions
                .push(serde_json::from_value(value).expect("a CustomResourceDefinition")),
            other => panic!("deploy/{dir} renders a {other:?}, which the tests do not know"),
        }
    }
    rendered
}

/// `value` as `T`, which must hold all of it: serialised back, it is `value` again.
fn exactly<T: DeserializeOwned + serde::Serialize>(value: serde_json::Value) -> T {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{e}: not a valid {}: {value:#}", value["kind"]));
    let back = serde_json::to_value(&typed).expect("serialise");
    assert_eq!(
        back, value,
        "a field of this {} is unknown to Kubernetes (misspelt or misplaced): {value:#}",
        value["kind"]
    );
    typed
}

/// The project's podman (`image/podman`: its containers.conf, storage under target/).
pub fn podman() -> Command {
    Command::new(workspace_root().join("image/podman"))
}

/// Runs `command` to completion; its stdout. Fails the test, with stderr, otherwise.
pub fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The agent's image, built once per test process by `cargo xtask image` from this
/// checkout (a no-op when nothing changed); its name, as the manifests refer to it.
pub fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        run(Command::new(cargo)
            .current_dir(workspace_root())
            .args(["xtask", "image"]));
        let tag = std::fs::read_to_string(workspace_root().join("target/image/tag"))
            .expect("`cargo xtask image` writes target/image/tag");
        tag.trim().to_string()
    })
}
