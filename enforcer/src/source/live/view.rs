//! The SecurityGroupView custom resource (`enforcer.sgp.dev/v1alpha1`, cluster-scoped):
//! one EC2 security group as `enforcer controller` read it — its rules, its members
//! (the ENIs carrying it) and the prefix lists its rules name — in the AWS CLI's shapes
//! (`ec2/shapes.rs`), so that an agent rebuilds from the views exactly the documents its
//! own EC2 poll would write, and one parser reads both.
//!
//! A group whose members would not fit in one object (etcd refuses requests over
//! 1.5 MiB) is split into parts: part 0 (named after the group) holds the rules, the
//! prefix lists and the first members; parts 1… (`<group>-<n>`) hold the rest. Every
//! part carries the whole group's revision: an agent uses a group only when all its
//! parts agree on it, and their status describes their spec (`observedGeneration`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, CustomResourceExt as _, Resource as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ec2::{GROUPS_FILE, INTERFACES_FILE, prefix_list_file};
use super::hub::{Ec2Node, pretty};
use crate::source::state::Documents;

/// The field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "enforcer-controller";
/// The label on every view the controller writes; it deletes only views carrying it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", FIELD_MANAGER);
/// The largest spec of one object, serialised: etcd refuses a request over 1.5 MiB
/// (`--max-request-bytes`), and the metadata, managed fields and status need room too.
pub const MAX_SPEC_BYTES: usize = 1_000_000;

/// One security group, or one part of one (see the module's documentation).
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "enforcer.sgp.dev",
    version = "v1alpha1",
    kind = "SecurityGroupView",
    plural = "securitygroupviews",
    shortname = "sgview",
    status = "SecurityGroupViewStatus",
    printcolumn = r#"{"name": "Group", "type": "string", "jsonPath": ".spec.groupId"}"#,
    printcolumn = r#"{"name": "Part", "type": "integer", "jsonPath": ".spec.part"}"#,
    printcolumn = r#"{"name": "Rules", "type": "integer", "jsonPath": ".status.rules"}"#,
    printcolumn = r#"{"name": "Members", "type": "integer", "jsonPath": ".status.members"}"#,
    printcolumn = r#"{"name": "Read", "type": "date", "jsonPath": ".status.readAt"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupViewSpec {
    /// The group's ID, in every part.
    #[schemars(regex(pattern = r"^sg-[0-9a-z]+$"))]
    pub group_id: String,
    /// This object's part, 0 for the first.
    #[schemars(range(min = 0))]
    pub part: u32,
    /// How many objects the group takes.
    #[schemars(range(min = 1))]
    pub parts: u32,
    /// A hash of the whole group's content, the same in all its parts.
    pub revision: String,
    /// The group as `describe-security-groups` prints it; in part 0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<SecurityGroup>,
    /// The ENIs carrying the group, as `describe-network-interfaces` prints them (the
    /// fields the enforcer reads).
    #[serde(default)]
    pub members: Vec<Member>,
    /// The prefix lists the group's rules name, with their entries; in part 0 only.
    #[serde(default)]
    pub prefix_lists: Vec<PrefixList>,
}

/// What the controller last read, for the spec of `observedGeneration`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupViewStatus {
    /// When EC2 last said this (restamped even when nothing changed, so that agents
    /// can tell a live controller from a stale view).
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub read_at: Time,
    /// The `metadata.generation` of the spec this status describes.
    pub observed_generation: i64,
    /// The group's rules (ingress and egress permissions).
    pub rules: u32,
    /// The members in this object.
    pub members: u32,
}

// The AWS CLI's shapes, as `ec2/shapes.rs` writes them (absent members omitted).

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct SecurityGroup {
    pub group_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_permissions: Option<Vec<Permission>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_permissions_egress: Option<Vec<Permission>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Tag {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Permission {
    pub ip_protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_ranges: Option<Vec<IpRange>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_ranges: Option<Vec<Ipv6Range>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_list_ids: Option<Vec<PrefixListId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id_group_pairs: Option<Vec<GroupPair>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct IpRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Ipv6Range {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_ipv6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PrefixListId {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_list_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GroupPair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_peering_connection_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peering_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// An ENI: only what the state parser reads (addresses, prefixes, groups, DNS name,
/// description) and what finds a node's trunk (type, attachment, MAC); the rest of
/// what `describe-network-interfaces` prints is dropped, since members are most of a
/// view's size.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Member {
    pub network_interface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupIdentifier>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip_addresses: Option<Vec<PrivateIp>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_addresses: Option<Vec<Ipv6Address>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_prefixes: Option<Vec<Ipv4Prefix>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefixes: Option<Vec<Ipv6Prefix>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Attachment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct GroupIdentifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct PrivateIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip_address: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Ipv6Address {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_primary_ipv6: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Ipv4Prefix {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase")]
pub struct Ipv6Prefix {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<String>,
}

/// `get-managed-prefix-list-entries` with the list's ID, name and version, as
/// `shapes::prefix_list` writes it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PrefixList {
    pub prefix_list_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_list_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default)]
    pub entries: Vec<PrefixListEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PrefixListEntry {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Why a group cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("EC2's {what} does not read as a SecurityGroupView's: {source}")]
    Shape {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "security group {group}: {what} takes {bytes} bytes, over the {max} bytes one object may hold"
    )]
    TooLarge {
        group: String,
        what: &'static str,
        bytes: usize,
        max: usize,
    },
}

/// A CLI-shaped JSON value (from `shapes`) as the view's type.
pub fn from_cli<T: serde::de::DeserializeOwned>(
    what: &'static str,
    value: Value,
) -> Result<T, ViewError> {
    serde_json::from_value(value).map_err(|source| ViewError::Shape { what, source })
}

/// The SecurityGroupView CRD.
pub fn crd() -> CustomResourceDefinition {
    SecurityGroupView::crd()
}

/// The CRD as `deploy/controller/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = crd();
    let mut text = String::from(
        "# Generated from enforcer/src/source/live/view.rs (SecurityGroupView::crd()); a test\n\
         # keeps them equal: `cargo test -p enforcer --lib view` prints the new text on a change.\n",
    );
    text.push_str(&serde_yaml::to_string(&crd).expect("a CRD serialises"));
    text
}

/// The objects' name for part `part` of `group`.
pub fn object_name(group: &str, part: u32) -> String {
    if part == 0 {
        group.to_string()
    } else {
        format!("{group}-{part}")
    }
}

/// FNV-1a over the serialised content: stable across builds and replicas (the
/// standard hasher is not), which a revision compared between them must be.
fn revision(content: &[&Value]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for value in content {
        for byte in value.to_string().bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

fn size(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

/// The specs that publish `group` with its members and prefix lists, each at most
/// `max_bytes` serialised: members are packed in order, part after part.
pub fn split(
    group: SecurityGroup,
    members: Vec<Member>,
    prefix_lists: Vec<PrefixList>,
    max_bytes: usize,
) -> Result<Vec<SecurityGroupViewSpec>, ViewError> {
    let id = group.group_id.clone();
    let content = [
        serde_json::to_value(&group).expect("a group serialises"),
        serde_json::to_value(&members).expect("members serialise"),
        serde_json::to_value(&prefix_lists).expect("prefix lists serialise"),
    ];
    let revision = revision(&content.iter().collect::<Vec<_>>());
    let empty = |part| SecurityGroupViewSpec {
        group_id: id.clone(),
        part,
        // The widest it will be, so that measuring it does not undercount.
        parts: u32::MAX,
        revision: revision.clone(),
        security_group: None,
        members: Vec::new(),
        prefix_lists: Vec::new(),
    };
    let first = SecurityGroupViewSpec {
        security_group: Some(group),
        prefix_lists,
        ..empty(0)
    };
    let too_large = |what, bytes| ViewError::TooLarge {
        group: id.clone(),
        what,
        bytes,
        max: max_bytes,
    };
    let mut used = size(&first);
    if used > max_bytes {
        return Err(too_large("its rules and prefix lists", used));
    }
    let mut specs = vec![first];
    for member in members {
        // A comma, unless it is the first in the list.
        let bytes = size(&member) + 1;
        if used + bytes > max_bytes {
            let next = empty(u32::try_from(specs.len()).unwrap_or(u32::MAX));
            used = size(&next);
            if used + bytes > max_bytes {
                return Err(too_large("one member", bytes));
            }
            specs.push(next);
        }
        used += bytes;
        specs.last_mut().expect("a part").members.push(member);
    }
    let parts = u32::try_from(specs.len()).unwrap_or(u32::MAX);
    for spec in &mut specs {
        spec.parts = parts;
    }
    Ok(specs)
}

/// A group whose parts agree, as an agent uses it.
#[derive(Clone, Debug)]
struct Assembled {
    parts: Vec<Arc<SecurityGroupView>>,
    read_at: SystemTime,
}

/// The groups an agent has from the views: each whole group replaces its last when all
/// its parts agree again, so that a group being rewritten (or split anew) is never
/// seen half old and half new.
#[derive(Clone, Debug, Default)]
pub struct Assembly {
    groups: BTreeMap<String, Assembled>,
}

impl Assembly {
    /// Takes the objects now stored. Returns whether the groups in use changed.
    pub fn update(&mut self, objects: &[Arc<SecurityGroupView>]) -> bool {
        let mut by_group: BTreeMap<&str, Vec<&Arc<SecurityGroupView>>> = BTreeMap::new();
        for object in objects {
            by_group
                .entry(&object.spec.group_id)
                .or_default()
                .push(object);
        }
        let before = self.groups.len();
        self.groups
            .retain(|id, _| by_group.contains_key(id.as_str()));
        let mut changed = self.groups.len() != before;
        for (id, mut objects) in by_group {
            let Some(assembled) = assemble(&mut objects) else {
                continue;
            };
            let same = self.groups.get(id).is_some_and(|last| {
                last.read_at == assembled.read_at
                    && last
                        .parts
                        .iter()
                        .map(|p| &p.spec)
                        .eq(assembled.parts.iter().map(|p| &p.spec))
            });
            if !same {
                self.groups.insert(id.to_string(), assembled);
                changed = true;
            }
        }
        changed
    }

    /// Whether the group `id` is in use.
    pub fn has(&self, id: &str) -> bool {
        self.groups.contains_key(id)
    }

    /// When the least recently confirmed group was read from EC2.
    pub fn oldest_read(&self) -> Option<SystemTime> {
        self.groups.values().map(|g| g.read_at).min()
    }

    /// The EC2 documents the views hold, as this node's EC2 poll would write them, and
    /// what they say of the trunk of `instance_id`.
    pub fn documents(&self, instance_id: &str) -> (Documents, Ec2Node) {
        let mut groups = Vec::new();
        let mut members: BTreeMap<&str, &Member> = BTreeMap::new();
        let mut prefix_lists: BTreeMap<&str, &PrefixList> = BTreeMap::new();
        for part in self.groups.values().flat_map(|g| &g.parts) {
            groups.extend(part.spec.security_group.as_ref());
            for member in &part.spec.members {
                members.insert(&member.network_interface_id, member);
            }
            for list in &part.spec.prefix_lists {
                prefix_lists.insert(&list.prefix_list_id, list);
            }
        }
        let trunk = members.values().find(|m| {
            m.interface_type.as_deref() == Some("trunk")
                && m.attachment.as_ref().and_then(|a| a.instance_id.as_deref()) == Some(instance_id)
        });
        let node = Ec2Node {
            trunk_mac: trunk
                .and_then(|t| t.mac_address.as_deref())
                .map(str::to_ascii_lowercase),
            trunk_id: trunk.map(|t| t.network_interface_id.clone()),
            listed: true,
        };
        let mut documents = Documents::default();
        documents.insert(GROUPS_FILE, pretty(&json!({ "SecurityGroups": groups })));
        let members: Vec<_> = members.into_values().collect();
        documents.insert(
            INTERFACES_FILE,
            pretty(&json!({ "NetworkInterfaces": members })),
        );
        for (id, list) in prefix_lists {
            let value = serde_json::to_value(list).expect("a prefix list serialises");
            documents.insert(prefix_list_file(id), pretty(&value));
        }
        (documents, node)
    }
}

/// The group of `objects` if its parts are all there, agree on the revision, and
/// each one's status describes its spec.
fn assemble(objects: &mut [&Arc<SecurityGroupView>]) -> Option<Assembled> {
    objects.sort_by_key(|o| o.spec.part);
    let first = objects.first()?;
    let parts = first.spec.parts;
    let whole = usize::try_from(parts).ok() == Some(objects.len())
        && objects.iter().enumerate().all(|(i, o)| {
            usize::try_from(o.spec.part).ok() == Some(i)
                && o.spec.parts == parts
                && o.spec.revision == first.spec.revision
                && o.status.as_ref().map(|s| s.observed_generation) == o.meta().generation
        });
    if !whole || first.spec.security_group.is_none() {
        return None;
    }
    let read_at = objects
        .iter()
        .filter_map(|o| o.status.as_ref())
        .map(|s| SystemTime::from(s.read_at.0))
        .min()?;
    Some(Assembled {
        parts: objects.iter().map(|o| Arc::clone(o)).collect(),
        read_at,
    })
}

#[cfg(test)]
mod tests;
