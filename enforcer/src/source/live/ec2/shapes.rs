//! The one mapping from the AWS SDK's EC2 types to the AWS CLI's JSON shapes, the
//! shapes the file source parses (`state/ec2.rs`): a live view reads, and a snapshot
//! writes, exactly what `aws ec2 describe-…` would have printed for these fields.

use aws_sdk_ec2::types::{
    IpPermission, ManagedPrefixList, NetworkInterface, PrefixListEntry, SecurityGroup, Tag,
};
use serde_json::{Map, Value, json};

/// A JSON object of the members that are present (the CLI omits absent ones).
#[derive(Default)]
struct Object(Map<String, Value>);

impl Object {
    fn put(mut self, key: &str, value: Option<impl Into<Value>>) -> Self {
        if let Some(value) = value {
            self.0.insert(key.to_string(), value.into());
        }
        self
    }

    /// A list member, omitted when the SDK has none.
    fn list<T>(self, key: &str, items: Option<&[T]>, each: impl Fn(&T) -> Value) -> Self {
        let items = items.map(|items| Value::Array(items.iter().map(each).collect()));
        self.put(key, items)
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn text(value: Option<&str>) -> Option<Value> {
    value.map(|s| json!(s))
}

fn tag(tag: &Tag) -> Value {
    Object::default()
        .put("Key", text(tag.key()))
        .put("Value", text(tag.value()))
        .done()
}

/// `describe-security-groups` output.
pub fn security_groups(groups: &[SecurityGroup]) -> Value {
    let groups: Vec<_> = groups.iter().map(security_group).collect();
    json!({ "SecurityGroups": groups })
}

/// One group of `describe-security-groups` output.
pub fn security_group(group: &SecurityGroup) -> Value {
    Object::default()
        .put("GroupId", text(group.group_id()))
        .put("GroupName", text(group.group_name()))
        .put("Description", text(group.description()))
        .put("OwnerId", text(group.owner_id()))
        .put("VpcId", text(group.vpc_id()))
        .list("IpPermissions", group.ip_permissions.as_deref(), permission)
        .list(
            "IpPermissionsEgress",
            group.ip_permissions_egress.as_deref(),
            permission,
        )
        .list("Tags", group.tags.as_deref(), tag)
        .done()
}

fn permission(permission: &IpPermission) -> Value {
    Object::default()
        .put("IpProtocol", text(permission.ip_protocol()))
        .put("FromPort", permission.from_port())
        .put("ToPort", permission.to_port())
        .list("IpRanges", permission.ip_ranges.as_deref(), |r| {
            Object::default()
                .put("CidrIp", text(r.cidr_ip()))
                .put("Description", text(r.description()))
                .done()
        })
        .list("Ipv6Ranges", permission.ipv6_ranges.as_deref(), |r| {
            Object::default()
                .put("CidrIpv6", text(r.cidr_ipv6()))
                .put("Description", text(r.description()))
                .done()
        })
        .list(
            "PrefixListIds",
            permission.prefix_list_ids.as_deref(),
            |p| {
                Object::default()
                    .put("PrefixListId", text(p.prefix_list_id()))
                    .put("Description", text(p.description()))
                    .done()
            },
        )
        .list(
            "UserIdGroupPairs",
            permission.user_id_group_pairs.as_deref(),
            |p| {
                Object::default()
                    .put("GroupId", text(p.group_id()))
                    .put("UserId", text(p.user_id()))
                    .put("VpcId", text(p.vpc_id()))
                    .put(
                        "VpcPeeringConnectionId",
                        text(p.vpc_peering_connection_id()),
                    )
                    .put("PeeringStatus", text(p.peering_status()))
                    .put("Description", text(p.description()))
                    .done()
            },
        )
        .done()
}

/// `describe-network-interfaces` output.
pub fn network_interfaces(interfaces: &[NetworkInterface]) -> Value {
    let interfaces: Vec<_> = interfaces.iter().map(network_interface).collect();
    json!({ "NetworkInterfaces": interfaces })
}

/// One ENI of `describe-network-interfaces` output.
pub fn network_interface(eni: &NetworkInterface) -> Value {
    let attachment = eni.attachment().map(|a| {
        Object::default()
            .put("AttachmentId", text(a.attachment_id()))
            .put("InstanceId", text(a.instance_id()))
            .put("DeviceIndex", a.device_index())
            .put("Status", text(a.status().map(|s| s.as_str())))
            .done()
    });
    Object::default()
        .put("NetworkInterfaceId", text(eni.network_interface_id()))
        .put(
            "InterfaceType",
            text(eni.interface_type().map(|t| t.as_str())),
        )
        .put("Description", text(eni.description()))
        .put("Status", text(eni.status().map(|s| s.as_str())))
        .put("MacAddress", text(eni.mac_address()))
        .put("VpcId", text(eni.vpc_id()))
        .put("SubnetId", text(eni.subnet_id()))
        .put("OwnerId", text(eni.owner_id()))
        .put("Attachment", attachment)
        .list("Groups", eni.groups.as_deref(), |g| {
            Object::default()
                .put("GroupId", text(g.group_id()))
                .put("GroupName", text(g.group_name()))
                .done()
        })
        .put("PrivateDnsName", text(eni.private_dns_name()))
        .put("PrivateIpAddress", text(eni.private_ip_address()))
        .list(
            "PrivateIpAddresses",
            eni.private_ip_addresses.as_deref(),
            |a| {
                Object::default()
                    .put("Primary", a.primary())
                    .put("PrivateDnsName", text(a.private_dns_name()))
                    .put("PrivateIpAddress", text(a.private_ip_address()))
                    .done()
            },
        )
        .list("Ipv6Addresses", eni.ipv6_addresses.as_deref(), |a| {
            Object::default()
                .put("Ipv6Address", text(a.ipv6_address()))
                .put("IsPrimaryIpv6", a.is_primary_ipv6())
                .done()
        })
        .list("Ipv4Prefixes", eni.ipv4_prefixes.as_deref(), |p| {
            Object::default()
                .put("Ipv4Prefix", text(p.ipv4_prefix()))
                .done()
        })
        .list("Ipv6Prefixes", eni.ipv6_prefixes.as_deref(), |p| {
            Object::default()
                .put("Ipv6Prefix", text(p.ipv6_prefix()))
                .done()
        })
        .list("TagSet", eni.tag_set.as_deref(), tag)
        .done()
}

/// `get-managed-prefix-list-entries` output with the list's `PrefixListId` (and, for
/// people reading a snapshot, its name and version) added, as the state directory holds it.
pub fn prefix_list(list: &ManagedPrefixList, entries: &[PrefixListEntry]) -> Value {
    Object::default()
        .put("PrefixListId", text(list.prefix_list_id()))
        .put("PrefixListName", text(list.prefix_list_name()))
        .put("Version", list.version())
        .list("Entries", Some(entries), |e| {
            Object::default()
                .put("Cidr", text(e.cidr()))
                .put("Description", text(e.description()))
                .done()
        })
        .done()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use aws_sdk_ec2::types::{
        GroupIdentifier, IpRange, Ipv6Range, NetworkInterfaceIpv6Address,
        NetworkInterfacePrivateIpAddress, PrefixListId, UserIdGroupPair,
    };

    use super::*;
    use crate::source::state::{Documents, read_documents};

    #[test]
    fn sdk_objects_read_as_the_cli_output_of_the_same_objects() {
        let group = SecurityGroup::builder()
            .group_id("sg-web")
            .group_name("web")
            .description("web pods")
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(80)
                    .to_port(443)
                    .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/16").build())
                    .ipv6_ranges(Ipv6Range::builder().cidr_ipv6("2001:db8::/56").build())
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id("sg-db").build())
                    .prefix_list_ids(PrefixListId::builder().prefix_list_id("pl-1").build())
                    .build(),
            )
            .ip_permissions_egress(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                    .build(),
            )
            .build();
        let cli = security_groups(&[group]);
        assert_eq!(
            cli["SecurityGroups"][0]["IpPermissions"][0],
            json!({"IpProtocol": "tcp", "FromPort": 80, "ToPort": 443,
                   "IpRanges": [{"CidrIp": "10.0.0.0/16"}],
                   "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/56"}],
                   "PrefixListIds": [{"PrefixListId": "pl-1"}],
                   "UserIdGroupPairs": [{"GroupId": "sg-db"}]})
        );
        assert_eq!(
            cli["SecurityGroups"][0]["IpPermissionsEgress"][0],
            json!({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
            "an all-protocols rule has no ports, as the CLI prints it"
        );
        let eni = NetworkInterface::builder()
            .network_interface_id("eni-1")
            .groups(GroupIdentifier::builder().group_id("sg-db").build())
            .private_ip_address("10.0.3.4")
            .private_ip_addresses(
                NetworkInterfacePrivateIpAddress::builder()
                    .private_ip_address("10.0.3.4")
                    .primary(true)
                    .build(),
            )
            .ipv6_addresses(
                NetworkInterfaceIpv6Address::builder()
                    .ipv6_address("2001:db8::4")
                    .build(),
            )
            .build();
        let list = ManagedPrefixList::builder().prefix_list_id("pl-1").build();
        let entry = PrefixListEntry::builder().cidr("192.0.2.0/24").build();
        let mut documents = Documents::default();
        for (name, value) in [
            ("groups.json", cli),
            ("enis.json", network_interfaces(&[eni])),
            ("pl.json", prefix_list(&list, &[entry])),
        ] {
            documents.insert(name, value.to_string());
        }
        let inventory = read_documents(Path::new("cluster"), &documents);
        assert!(inventory.errors.is_empty(), "{:?}", inventory.errors);
        let group = &inventory.groups[0].item;
        assert_eq!(group.ingress.len(), 4, "one rule per peer");
        assert_eq!(group.egress.len(), 1);
        let eni = &inventory.interfaces[0].item;
        assert_eq!(eni.groups, ["sg-db"]);
        assert_eq!(eni.addresses.len(), 2);
        assert_eq!(inventory.prefix_lists[0].item.1.len(), 1);
    }
}
