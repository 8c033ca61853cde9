//! The live sources (`--source cluster`): Kubernetes (`kube`), EC2 (`ec2`, or the
//! controller's SecurityGroupViews, `controller::follow`) and IMDS (`imds`) each publish
//! into the [`Hub`], which combines them into the view the agent resolves like a state
//! directory. `controller` is `enforcer controller`, which publishes those views.

pub mod controller;
pub mod ec2;
pub mod findings;
pub mod hub;
pub mod imds;
pub mod kube;
pub mod view;

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
    /// Where EC2's groups come from.
    pub ec2: Ec2Mode,
    /// In controller mode, the age of the views past which they are flagged stale.
    pub view_max_age: Duration,
    pub node: NodeSettings,
}

/// Where a node's EC2 view comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ec2Mode {
    /// This node polls EC2.
    Direct,
    /// `enforcer controller`'s SecurityGroupViews (no EC2 call from the node).
    Controller,
    /// Controller if the API server serves SecurityGroupViews (the CRD is installed),
    /// else direct; decided once, at start.
    Auto,
}

/// Whether the API server serves the SecurityGroupView resource.
async fn views_served(client: &::kube::Client) -> Result<bool, LiveError> {
    use ::kube::Resource as _;
    let version = view::SecurityGroupView::api_version(&());
    match client.list_api_group_resources(&version).await {
        Ok(list) => Ok(list
            .resources
            .iter()
            .any(|r| r.name == view::SecurityGroupView::plural(&()))),
        Err(::kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(LiveError::Discovery(error)),
    }
}

/// How often IMDS is read again (a primary ENI's groups may change).
const IMDS_INTERVAL: Duration = Duration::from_secs(60);

/// Starts every live source on the current tokio runtime; they publish into the
/// returned hub until the runtime ends.
pub async fn start(config: &LiveConfig) -> Result<Arc<Hub>, LiveError> {
    let hub = Hub::new(config.node_name.clone(), config.node.clone());
    let kube = kube::client(config.kubeconfig.as_ref()).await?;
    let mode = match config.ec2 {
        Ec2Mode::Auto if views_served(&kube).await? => Ec2Mode::Controller,
        Ec2Mode::Auto => Ec2Mode::Direct,
        mode => mode,
    };
    log::info!(
        "EC2's groups from {}",
        match mode {
            Ec2Mode::Controller => "the controller's SecurityGroupViews",
            _ => "this node's own polls",
        }
    );
    kube::spawn(kube.clone(), &config.node_name, hub.clone());
    findings::spawn(kube.clone(), &config.node_name, &hub);
    imds::spawn(imds::client(), hub.clone(), IMDS_INTERVAL);
    if mode == Ec2Mode::Controller {
        controller::follow::spawn(kube, &config.node_name, hub.clone(), config.view_max_age);
        return Ok(hub);
    }
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
        let client = ec2::client(Some(&region)).await;
        ec2::spawn(client, ec2_hub, interval);
    });
    Ok(hub)
}
