//! The live sources (`--source cluster`): Kubernetes (`kube`), EC2 (`ec2`) and IMDS
//! (`imds`) each publish into the [`Hub`], which combines them into the view the
//! agent resolves like a state directory.

pub mod ec2;
pub mod hub;
pub mod imds;
pub mod kube;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use hub::{Hub, LiveError, LiveView, NodeSettings, ORIGIN};

/// How `--source cluster` is configured (flags and the standard environment).
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// This node, as Pods' `spec.nodeName` name it (`NODE_NAME`).
    pub node_name: String,
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config` or in-cluster, as kubectl.
    pub kubeconfig: Option<PathBuf>,
    /// Mean time between EC2 polls (jittered).
    pub ec2_interval: Duration,
    pub node: NodeSettings,
}

/// How often IMDS is read again (a primary ENI's groups may change).
const IMDS_INTERVAL: Duration = Duration::from_secs(60);

/// Starts every live source on the current tokio runtime; they publish into the
/// returned hub until the runtime ends.
pub async fn start(config: &LiveConfig) -> Result<Arc<Hub>, LiveError> {
    let hub = Hub::new(config.node_name.clone(), config.node.clone());
    let kube = kube::client(config.kubeconfig.as_ref()).await?;
    kube::spawn(kube, &config.node_name, hub.clone());
    imds::spawn(imds::client(), hub.clone(), IMDS_INTERVAL);
    let (ec2_hub, interval) = (hub.clone(), config.ec2_interval);
    tokio::spawn(async move {
        // The EC2 client needs a region: the instance's, unless the environment names one.
        let mut views = ec2_hub.subscribe();
        let region = loop {
            if let Some(identity) = ec2_hub.identity() {
                break identity.region;
            }
            if views.changed().await.is_err() {
                return;
            }
        };
        let client = ec2::client(&region).await;
        ec2::spawn(client, ec2_hub, interval);
    });
    Ok(hub)
}
