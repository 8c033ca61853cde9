//! The EC2 source (AWS SDK): the groups this node needs, transitively, the members of
//! referenced groups, this instance's trunk and branch ENIs and the prefix lists,
//! polled (jittered) and early when Kubernetes names a group or branch ENI not yet
//! asked for. An error never shrinks the view: the last good one stays.
//! [`poll_cluster`] reads the same for every node at once (`enforcer controller`).

mod error;
pub(super) mod schedule;
pub mod shapes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, NetworkInterface, NetworkInterfaceType, SecurityGroup};
use serde_json::Value;

use super::hub::{Ec2Node, Hub, Identity, LiveView, names, pretty};
use super::kube::{PODS_FILE, POLICIES_FILE};
use crate::source::state::{Documents, POD_ENI_ANNOTATION};
pub use error::Ec2Error;
use schedule::{Poller, Wanted};

/// The tag the VPC resource controller puts on each branch ENI: its trunk ENI.
pub const TRUNK_TAG: &str = "vpcresources.k8s.aws/trunk-eni-id";
/// Values per filter in one request (EC2 accepts up to 200).
const FILTER_VALUES: usize = 100;
/// The documents of the live view that EC2's answers become.
pub const GROUPS_FILE: &str = "ec2-security-groups.json";
pub const INTERFACES_FILE: &str = "ec2-network-interfaces.json";

/// The document of the prefix list `id`. An ID EC2 would never give (a view's
/// content is another process's) is named by its bytes in hex: a file name never
/// holds a `/` or a dot-file, and no two IDs share a file.
pub fn prefix_list_file(id: &str) -> String {
    let plain = !id.is_empty()
        && id.len() <= 64
        && id.starts_with("pl-")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plain {
        return format!("ec2-prefix-list-{id}.json");
    }
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("ec2-prefix-list-x{hex}.json")
}

/// An EC2 client as the SDK's default chain configures it (`AWS_ENDPOINT_URL_EC2`/
/// `AWS_ENDPOINT_URL`, credentials), over rustls with ring; the region from
/// `AWS_REGION`/`AWS_DEFAULT_REGION`, else `region` (the instance's, from IMDS, or the
/// controller's `--region`).
pub async fn client(region: Option<&str>) -> Client {
    use aws_config::environment::EnvironmentVariableRegionProvider;
    use aws_config::meta::region::RegionProviderChain;
    let region = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(region.map(|r| aws_config::Region::new(r.to_string())));
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(super::imds::https_client())
        .region(region)
        .load()
        .await;
    Client::new(&config)
}

/// What one poll asked for: a later view of Kubernetes naming more wakes the poller.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Asked {
    /// Who asks (IMDS's view of this node).
    identity: Identity,
    groups: BTreeSet<String>,
    branch_enis: BTreeSet<String>,
}

impl Wanted for Asked {
    fn covers(&self, wanted: &Asked) -> bool {
        wanted.groups.is_subset(&self.groups) && wanted.branch_enis.is_subset(&self.branch_enis)
    }
}

/// Polls EC2 for `hub` until the runtime ends, once IMDS has said who this node is
/// and Kubernetes which pods and policies there are (what names the groups wanted:
/// a first poll before them would publish a view missing their groups).
pub fn spawn(client: Client, hub: Arc<Hub>, interval: Duration) {
    let changes = hub.subscribe();
    let poller = NodePoller {
        client,
        hub,
        changes,
    };
    tokio::spawn(schedule::run(poller, interval));
}

/// The node's poller: what the hub's view names, published into it.
struct NodePoller {
    client: Client,
    hub: Arc<Hub>,
    changes: tokio::sync::watch::Receiver<Arc<LiveView>>,
}

impl Poller for NodePoller {
    type Wanted = Asked;
    type Read = (Documents, Ec2Node);

    fn wanted(&self) -> Option<Asked> {
        let listed = [names::PODS, names::POLICIES]
            .iter()
            .all(|source| self.hub.documents_of(source).is_some());
        let identity = self.hub.identity().filter(|_| listed)?;
        Some(wanted(&self.hub, identity))
    }

    async fn poll(&self, asked: &Asked) -> Result<Self::Read, Ec2Error> {
        poll(&self.client, &asked.identity, &asked.groups).await
    }

    async fn publish(&self, (documents, node): Self::Read) {
        self.hub.publish_ec2(documents, node);
    }

    fn failed(&self, error: &Ec2Error, wait: Duration) {
        self.hub.failed(
            names::EC2,
            format!(
                "{} (the last view stays; next try in {wait:?})",
                crate::error_chain(error)
            ),
        );
    }

    async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }
}

/// The groups this node's pods and the node itself carry (the primary ENI's, every
/// SecurityGroupPolicy's), and the branch ENIs its pods' annotations name.
fn wanted(hub: &Hub, identity: Identity) -> Asked {
    let mut asked = Asked {
        groups: identity.security_groups.iter().cloned().collect(),
        branch_enis: BTreeSet::new(),
        identity,
    };
    let items = |source, file| -> Vec<Value> {
        hub.documents_of(source)
            .and_then(|d| {
                let (_, text) = d.files().find(|(name, _)| *name == file)?;
                let list: Value = serde_json::from_str(text).ok()?;
                list.get("items")?.as_array().cloned()
            })
            .unwrap_or_default()
    };
    for policy in items(names::POLICIES, POLICIES_FILE) {
        let ids = &policy["spec"]["securityGroups"]["groupIds"];
        for id in ids.as_array().into_iter().flatten() {
            asked.groups.extend(id.as_str().map(str::to_string));
        }
    }
    for pod in items(names::PODS, PODS_FILE) {
        let annotation = &pod["metadata"]["annotations"][POD_ENI_ANNOTATION];
        let Some(enis) = annotation
            .as_str()
            .and_then(|a| serde_json::from_str::<Vec<Value>>(a).ok())
        else {
            continue;
        };
        for eni in enis {
            asked
                .branch_enis
                .extend(eni["eniId"].as_str().map(str::to_string));
        }
    }
    asked
}

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

/// One view of EC2 for this node: its documents and the trunk ENI.
pub async fn poll(
    client: &Client,
    identity: &Identity,
    wanted_groups: &BTreeSet<String>,
) -> Result<(Documents, Ec2Node), Ec2Error> {
    let attached = [
        filter("attachment.instance-id", [identity.instance_id.as_str()]),
        filter("interface-type", [NetworkInterfaceType::Trunk.as_str()]),
    ];
    let trunk = interfaces(client, &attached).await?.into_iter().next();
    let mut enis: BTreeMap<String, NetworkInterface> = BTreeMap::new();
    let mut groups = wanted_groups.clone();
    if let Some(trunk) = &trunk {
        let trunk_id = trunk.network_interface_id().unwrap_or_default();
        let branches = [
            filter("interface-type", [NetworkInterfaceType::Branch.as_str()]),
            filter(&format!("tag:{TRUNK_TAG}"), [trunk_id]),
        ];
        for eni in std::iter::once(trunk.clone()).chain(interfaces(client, &branches).await?) {
            groups.extend(eni.groups().iter().filter_map(|g| g.group_id.clone()));
            enis.insert(eni.network_interface_id().unwrap_or_default().into(), eni);
        }
    }
    let (security_groups, referenced, prefix_lists) = group_closure(client, groups).await?;
    for chunk in referenced.iter().collect::<Vec<_>>().chunks(FILTER_VALUES) {
        for eni in interfaces(client, &[filter("group-id", chunk.iter().copied())]).await? {
            enis.insert(eni.network_interface_id().unwrap_or_default().into(), eni);
        }
    }
    let mut documents = Documents::default();
    documents.insert(
        GROUPS_FILE,
        pretty(&shapes::security_groups(&security_groups)),
    );
    let enis: Vec<_> = enis.into_values().collect();
    documents.insert(INTERFACES_FILE, pretty(&shapes::network_interfaces(&enis)));
    for (id, document) in prefix_list_documents(client, &prefix_lists).await? {
        documents.insert(prefix_list_file(&id), pretty(&document));
    }
    let node = Ec2Node {
        trunk_mac: trunk
            .as_ref()
            .and_then(|t| t.mac_address())
            .map(str::to_ascii_lowercase),
        trunk_id: trunk.and_then(|t| t.network_interface_id),
        listed: true,
    };
    Ok((documents, node))
}

/// The groups `wanted` and every group their rules reference, transitively (EC2
/// evaluates a reference by membership, but the referenced group's own rules matter
/// when a pod carries it); the referenced groups and prefix lists named.
async fn group_closure(
    client: &Client,
    wanted: BTreeSet<String>,
) -> Result<(Vec<SecurityGroup>, BTreeSet<String>, BTreeSet<String>), Ec2Error> {
    let mut found: BTreeMap<String, SecurityGroup> = BTreeMap::new();
    let mut asked: BTreeSet<String> = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    let mut prefix_lists = BTreeSet::new();
    let mut next = wanted;
    while !next.is_empty() {
        asked.extend(next.iter().cloned());
        let ids: Vec<_> = next.into_iter().collect();
        let mut more = BTreeSet::new();
        for chunk in ids.chunks(FILTER_VALUES) {
            let mut pages = client
                .describe_security_groups()
                .filters(filter("group-id", chunk.iter().cloned()))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| Ec2Error::new("DescribeSecurityGroups", e))?;
                for group in page.security_groups.unwrap_or_default() {
                    let permissions = group.ip_permissions().iter();
                    for rule in permissions.chain(group.ip_permissions_egress()) {
                        for pair in rule.user_id_group_pairs() {
                            referenced.extend(pair.group_id.clone());
                            more.extend(pair.group_id.clone());
                        }
                    }
                    prefix_lists.extend(named_prefix_lists(&group));
                    found.insert(group.group_id.clone().unwrap_or_default(), group);
                }
            }
        }
        next = more.difference(&asked).cloned().collect();
    }
    Ok((found.into_values().collect(), referenced, prefix_lists))
}

/// The prefix lists the rules of `group` name.
fn named_prefix_lists(group: &SecurityGroup) -> BTreeSet<String> {
    let permissions = group.ip_permissions().iter();
    permissions
        .chain(group.ip_permissions_egress())
        .flat_map(|rule| rule.prefix_list_ids())
        .filter_map(|list| list.prefix_list_id.clone())
        .collect()
}

/// One group as the cluster's view holds it: CLI-shaped (`shapes`), with its members
/// (every ENI carrying it) and the prefix lists its rules name.
#[derive(Clone, Debug)]
pub struct GroupRead {
    pub group: Value,
    pub members: Vec<Value>,
    pub prefix_lists: Vec<Value>,
}

/// One view of EC2 for the whole cluster: the groups of the ENIs attached to
/// `instances` (the nodes: primary, secondary and trunk ENIs carry the node's groups),
/// the groups `wanted` (the SecurityGroupPolicies'), every group their rules
/// reference, transitively, each with its members and prefix lists. Its requests grow
/// with the groups, not the nodes (but for one per [`FILTER_VALUES`] nodes).
pub async fn poll_cluster(
    client: &Client,
    instances: &BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> Result<Vec<GroupRead>, Ec2Error> {
    let mut groups = wanted.clone();
    let instances: Vec<_> = instances.iter().collect();
    for chunk in instances.chunks(FILTER_VALUES) {
        let attached = [filter("attachment.instance-id", chunk.iter().copied())];
        for eni in interfaces(client, &attached).await? {
            groups.extend(eni.groups().iter().filter_map(|g| g.group_id.clone()));
        }
    }
    let (security_groups, _, prefix_lists) = group_closure(client, groups).await?;
    let ids: Vec<String> = security_groups
        .iter()
        .filter_map(|g| g.group_id.clone())
        .collect();
    let mut enis: BTreeMap<String, NetworkInterface> = BTreeMap::new();
    for chunk in ids.chunks(FILTER_VALUES) {
        for eni in interfaces(client, &[filter("group-id", chunk.iter().cloned())]).await? {
            enis.insert(eni.network_interface_id().unwrap_or_default().into(), eni);
        }
    }
    let lists: BTreeMap<String, Value> = prefix_list_documents(client, &prefix_lists)
        .await?
        .into_iter()
        .collect();
    let reads = security_groups
        .iter()
        .map(|group| {
            let id = group.group_id().unwrap_or_default();
            let members = enis
                .values()
                .filter(|eni| eni.groups().iter().any(|g| g.group_id() == Some(id)))
                .map(shapes::network_interface)
                .collect();
            GroupRead {
                group: shapes::security_group(group),
                members,
                prefix_lists: named_prefix_lists(group)
                    .iter()
                    .filter_map(|id| lists.get(id).cloned())
                    .collect(),
            }
        })
        .collect();
    Ok(reads)
}

async fn interfaces(
    client: &Client,
    filters: &[Filter],
) -> Result<Vec<NetworkInterface>, Ec2Error> {
    let mut pages = client
        .describe_network_interfaces()
        .set_filters(Some(filters.to_vec()))
        .into_paginator()
        .send();
    let mut found = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| Ec2Error::new("DescribeNetworkInterfaces", e))?;
        found.extend(page.network_interfaces.unwrap_or_default());
    }
    Ok(found)
}

/// Each prefix list named that exists, with its entries, by ID.
async fn prefix_list_documents(
    client: &Client,
    ids: &BTreeSet<String>,
) -> Result<Vec<(String, Value)>, Ec2Error> {
    let mut documents = Vec::new();
    let ids: Vec<_> = ids.iter().cloned().collect();
    for chunk in ids.chunks(FILTER_VALUES) {
        let mut pages = client
            .describe_managed_prefix_lists()
            .filters(filter("prefix-list-id", chunk.iter().cloned()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Ec2Error::new("DescribeManagedPrefixLists", e))?;
            for list in page.prefix_lists.unwrap_or_default() {
                let Some(id) = list.prefix_list_id.clone() else {
                    continue;
                };
                let mut entries = Vec::new();
                let mut pages = client
                    .get_managed_prefix_list_entries()
                    .prefix_list_id(&id)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| Ec2Error::new("GetManagedPrefixListEntries", e))?;
                    entries.extend(page.entries.unwrap_or_default());
                }
                documents.push((id, shapes::prefix_list(&list, &entries)));
            }
        }
    }
    Ok(documents)
}

#[cfg(test)]
mod tests;
