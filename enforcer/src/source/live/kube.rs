//! The Kubernetes source: reflectors (kube-rs) on this node's Pods, the
//! SecurityGroupPolicies and the ServiceAccounts, each store published as one
//! `kind: List` document of the live view after every change.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{WatchStreamExt as _, watcher};
use ::kube::{Api, Client, CustomResource, Resource, ResourceExt as _};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::hub::{Hub, LiveError, names, pretty};
use crate::source::state::Documents;

/// The VPC resource controller's SecurityGroupPolicy, as its CRD defines it
/// (`vpcresources.k8s.aws/v1beta1`). Not our CRD: no schema is generated.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[kube(
    group = "vpcresources.k8s.aws",
    version = "v1beta1",
    kind = "SecurityGroupPolicy",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<GroupIds>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupIds {
    #[serde(default)]
    pub group_ids: Vec<String>,
}

/// The documents each store becomes in the live view.
pub const PODS_FILE: &str = "kubernetes-pods.json";
pub const SERVICE_ACCOUNTS_FILE: &str = "kubernetes-serviceaccounts.json";
pub const POLICIES_FILE: &str = "kubernetes-securitygrouppolicies.json";

/// A client as kubectl would configure it: `kubeconfig` if given, else
/// `KUBECONFIG`, `~/.kube/config` or the in-cluster service account.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, LiveError> {
    let boxed = |e: Box<dyn std::error::Error + Send + Sync>| LiveError::KubeConfig(e);
    let config = match kubeconfig {
        Some(path) => {
            let file = ::kube::config::Kubeconfig::read_from(path).map_err(|e| boxed(e.into()))?;
            ::kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| boxed(e.into()))?
        }
        None => ::kube::Config::infer().await.map_err(|e| boxed(e.into()))?,
    };
    Client::try_from(config).map_err(|e| boxed(e.into()))
}

/// Follows the three resources until the runtime ends, publishing into `hub`.
pub fn spawn(client: Client, node_name: &str, hub: Arc<Hub>) {
    let on_this_node = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    tokio::spawn(follow(
        Api::<Pod>::all(client.clone()),
        on_this_node,
        names::PODS,
        PODS_FILE,
        hub.clone(),
    ));
    tokio::spawn(follow(
        Api::<ServiceAccount>::all(client.clone()),
        watcher::Config::default(),
        names::SERVICE_ACCOUNTS,
        SERVICE_ACCOUNTS_FILE,
        hub.clone(),
    ));
    tokio::spawn(follow(
        Api::<SecurityGroupPolicy>::all(client),
        watcher::Config::default(),
        names::POLICIES,
        POLICIES_FILE,
        hub,
    ));
}

/// One reflector: the watcher relists on 410 Gone and backs off on errors
/// (kube-runtime's defaults); every change after the first list republishes the store.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    source: &'static str,
    file: &'static str,
    hub: Arc<Hub>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync,
    K: 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        // Managed fields are most of an object's size and tell the enforcer nothing.
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer);
    futures::pin_mut!(events);
    let mut listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                listed = true;
                hub.publish(source, list_document(&store, file));
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) if listed => {
                hub.publish(source, list_document(&store, file));
            }
            Ok(_) => {}
            Err(error) => hub.failed(source, crate::error_chain(&error)),
        }
    }
}

/// The store as the `kind: List` document `kubectl get -o json` prints, ordered by
/// namespace and name so that a snapshot is stable.
fn list_document<K>(store: &Store<K>, file: &'static str) -> Documents
where
    K: Resource<DynamicType = ()> + Clone + Serialize,
{
    let mut objects = store.state();
    objects.sort_by_key(|o| (o.namespace(), o.name_any()));
    let items: Vec<_> = objects
        .iter()
        .map(|o| serde_json::to_value(&**o).expect("a Kubernetes object serialises"))
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let mut documents = Documents::default();
    documents.insert(file, pretty(&list));
    documents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_type_reads_and_writes_the_controllers_objects() {
        let text = r#"{"apiVersion": "vpcresources.k8s.aws/v1beta1", "kind": "SecurityGroupPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "securityGroups": {"groupIds": ["sg-1", "sg-2"]}}}"#;
        let policy: SecurityGroupPolicy = serde_json::from_str(text).unwrap();
        assert_eq!(
            policy.spec.security_groups.as_ref().unwrap().group_ids,
            ["sg-1", "sg-2"]
        );
        let written = serde_json::to_value(&policy).unwrap();
        let read: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(written, read);
    }

    #[test]
    fn stores_become_lists_the_file_source_reads() {
        let (store, mut writer) = reflector::store::<Pod>();
        for (namespace, name) in [("shop", "web"), ("db", "main"), ("shop", "api")] {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": namespace, "uid": name},
                "spec": {"nodeName": "n", "containers": []},
                "status": {"podIP": "10.0.1.9"},
            }))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(pod));
        }
        let documents = list_document(&store, PODS_FILE);
        let (name, text) = documents.files().next().unwrap();
        assert_eq!(name, PODS_FILE);
        let list: serde_json::Value = serde_json::from_str(text).unwrap();
        let names: Vec<_> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["apiVersion"].clone(),
                    p["kind"].clone(),
                    p["metadata"]["name"].clone(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (json!("v1"), json!("Pod"), json!("main")),
                (json!("v1"), json!("Pod"), json!("api")),
                (json!("v1"), json!("Pod"), json!("web")),
            ]
        );
        let inventory =
            crate::source::state::read_documents(std::path::Path::new("cluster"), &documents);
        assert!(inventory.errors.is_empty(), "{:?}", inventory.errors);
        assert_eq!(inventory.pods.len(), 3);
    }
}
