//! The AWS CLI's EC2 output as `aws ec2 describe-…` prints it: security groups
//! (normalised into one `Rule` per peer), network interfaces and managed prefix lists.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use super::reader::{Field, Invalid, Problems};
use super::{Inventory, Reference, Target};
use crate::model::{Cidr, Direction, GroupId, L4Match, Peer, Rule, SecurityGroup};

/// `describe-network-interfaces`: what matters is which addresses carry which groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetworkInterface {
    pub id: String,
    pub groups: Vec<GroupId>,
    /// Private IPv4 (primary and secondary) and IPv6 addresses.
    pub addresses: BTreeSet<IpAddr>,
    /// Delegated prefixes (`Ipv4Prefixes`, `Ipv6Prefixes`): prefix mode and IPv6 clusters
    /// assign pod addresses from them.
    pub prefixes: BTreeSet<Cidr>,
    /// `PrivateDnsName`: an instance's primary ENI carries its node's name.
    pub dns_name: Option<String>,
    /// A Network Load Balancer's ENI (`Description` `ELB net/…`).
    pub network_load_balancer: bool,
}

impl NetworkInterface {
    /// Every address and delegated prefix, as prefixes.
    pub fn cidrs(&self) -> impl Iterator<Item = Cidr> + '_ {
        let hosts = self.addresses.iter().map(|&ip| Cidr::host(ip));
        hosts.chain(self.prefixes.iter().copied())
    }

    /// Holds `ip` as one of its addresses or inside one of its prefixes.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.addresses.contains(&ip) || self.prefixes.iter().any(|p| p.contains(ip))
    }
}

/// Each entry of `SecurityGroups`, as one object named by its `GroupId`.
pub(crate) fn security_groups(file: &Path, list: Field, inventory: &mut Inventory) {
    let items = match list.items() {
        Ok(items) => items,
        Err(e) => return inventory.invalid(file, "document", e),
    };
    for (i, item) in items.into_iter().enumerate() {
        // Paths inside a group start at the group, as the error names the group.
        let group = Field::root(item.value);
        let mut problems = Problems::default();
        let mut references = Vec::new();
        // A group named by something that is not a group ID is still that object:
        // it is set aside, and the state is refused only for a group without a name.
        let id = problems.ok(group
            .require("GroupId")
            .and_then(|f| f.name().map(str::to_string)));
        if let (Some(_), Some(field)) = (&id, group.get("GroupId")) {
            problems.ok(group_id(&field));
        }
        let text = |key, problems: &mut Problems| {
            group
                .get(key)
                .and_then(|f| problems.ok(f.str().map(str::to_string)))
                .unwrap_or_default()
        };
        let name = text("GroupName", &mut problems);
        let description = text("Description", &mut problems);
        let tags = group
            .get("Tags")
            .and_then(|f| problems.ok(tags(&f)))
            .unwrap_or_default();
        let mut rules = |key, problems: &mut Problems| {
            group
                .get(key)
                .map(|f| permissions(&f, problems, &mut references))
                .unwrap_or_default()
        };
        let ingress = rules("IpPermissions", &mut problems);
        let egress = rules("IpPermissionsEgress", &mut problems);
        let object = match &id {
            Some(id) => format!("SecurityGroup {id}"),
            None => format!("SecurityGroups[{i}]"),
        };
        inventory.add_references(file, &object, references);
        // A group with a bad rule is still defined (the resolver sets it aside):
        // references to it must not add a second, misleading error.
        let group = id.map(|id| SecurityGroup {
            id,
            name,
            description,
            tags,
            ingress,
            egress,
        });
        inventory.admit(|i| &mut i.groups, file, object, group, problems);
    }
}

/// Each entry of `NetworkInterfaces`, named by its `NetworkInterfaceId`.
pub(crate) fn network_interfaces(file: &Path, list: Field, inventory: &mut Inventory) {
    let items = match list.items() {
        Ok(items) => items,
        Err(e) => return inventory.invalid(file, "document", e),
    };
    for (i, item) in items.into_iter().enumerate() {
        let eni = Field::root(item.value);
        let mut problems = Problems::default();
        let id = problems.ok(eni
            .require("NetworkInterfaceId")
            .and_then(|f| f.name().map(str::to_string)));
        let mut groups = Vec::new();
        for g in list_of(&eni, "Groups", &mut problems) {
            groups.extend(problems.ok(g.require("GroupId").and_then(|f| group_id(&f))));
        }
        let mut addresses = BTreeSet::new();
        addresses.extend(
            eni.get("PrivateIpAddress")
                .and_then(|f| problems.ok(f.ip())),
        );
        for a in list_of(&eni, "PrivateIpAddresses", &mut problems) {
            addresses.extend(problems.ok(a.require("PrivateIpAddress").and_then(|f| f.ip())));
        }
        for a in list_of(&eni, "Ipv6Addresses", &mut problems) {
            addresses.extend(problems.ok(a.require("Ipv6Address").and_then(|f| f.ip())));
        }
        let mut prefixes = BTreeSet::new();
        for (list, key) in [
            ("Ipv4Prefixes", "Ipv4Prefix"),
            ("Ipv6Prefixes", "Ipv6Prefix"),
        ] {
            for p in list_of(&eni, list, &mut problems) {
                prefixes.extend(problems.ok(p.require(key).and_then(|f| f.cidr())));
            }
        }
        let dns_name = eni
            .get("PrivateDnsName")
            .and_then(|f| problems.ok(f.str()))
            .filter(|name| !name.is_empty())
            .map(str::to_string);
        let network_load_balancer = eni
            .get("Description")
            .and_then(|f| problems.ok(f.str()))
            .is_some_and(|d| d.starts_with("ELB net/"));
        let object = match &id {
            Some(id) => format!("NetworkInterface {id}"),
            None => format!("NetworkInterfaces[{i}]"),
        };
        let eni = id.map(|id| NetworkInterface {
            id,
            groups,
            addresses,
            prefixes,
            dns_name,
            network_load_balancer,
        });
        inventory.admit(|i| &mut i.interfaces, file, object, eni, problems);
    }
}

/// `get-managed-prefix-list-entries` output with the list's `PrefixListId` added.
pub(crate) fn prefix_list(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let id = problems.ok(root
        .require("PrefixListId")
        .and_then(|f| f.name().map(str::to_string)));
    let mut cidrs = Vec::new();
    for entry in list_of(&root, "Entries", &mut problems) {
        cidrs.extend(problems.ok(entry.require("Cidr").and_then(|f| f.cidr())));
    }
    let object = match &id {
        Some(id) => format!("PrefixList {id}"),
        None => "PrefixList".to_string(),
    };
    let list = id.map(|id| (id, cidrs));
    inventory.admit(|i| &mut i.prefix_lists, file, object, list, problems);
}

/// The elements of an optional list member; a non-list is recorded.
fn list_of<'v>(parent: &Field<'v>, key: &str, problems: &mut Problems) -> Vec<Field<'v>> {
    parent
        .get(key)
        .and_then(|f| problems.ok(f.items()))
        .unwrap_or_default()
}

fn group_id(field: &Field) -> Result<GroupId, Invalid> {
    let id = field.name()?;
    if !id.starts_with("sg-") {
        return Err(Invalid::new(
            &field.path,
            format!("{id:?} is not a security group ID (sg-…)"),
        ));
    }
    if id.len() > enforcer_common::GROUP_ID_BYTES {
        return Err(Invalid::new(
            &field.path,
            format!(
                "{id:?} is longer than any security group ID ({} bytes at most)",
                enforcer_common::GROUP_ID_BYTES
            ),
        ));
    }
    Ok(id.to_string())
}

fn tags(field: &Field) -> Result<BTreeMap<String, String>, Invalid> {
    field
        .items()?
        .iter()
        .map(|t| {
            let key = t.require("Key")?.str()?.to_string();
            let value = match t.get("Value") {
                Some(v) => v.str()?.to_string(),
                None => String::new(),
            };
            Ok((key, value))
        })
        .collect()
}

const PEER_LISTS: [&str; 4] = [
    "IpRanges",
    "Ipv6Ranges",
    "PrefixListIds",
    "UserIdGroupPairs",
];

/// The rules of `IpPermissions` or `IpPermissionsEgress`, one per peer, in
/// EC2's order (see [`SecurityGroup`]).
fn permissions(
    list: &Field,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for permission in problems.ok(list.items()).unwrap_or_default() {
        let l4 = l4_match(&permission, problems);
        let peers = peers(&permission, problems, references);
        // Only a permission that lists no peer at all is peerless; a listed
        // peer that failed to parse has its own error.
        let listed = PEER_LISTS.iter().any(|key| {
            permission
                .get(key)
                .is_some_and(|f| f.value.as_array().is_none_or(|a| !a.is_empty()))
        });
        if !listed {
            problems.push(Invalid::new(
                &permission.path,
                "no peer: IpRanges, Ipv6Ranges, PrefixListIds and UserIdGroupPairs are all empty",
            ));
        }
        if let Some(l4) = l4 {
            rules.extend(peers.into_iter().map(|(peer, description)| Rule {
                l4,
                peer,
                description,
            }));
        }
    }
    rules
}

/// `IpProtocol` with `FromPort`/`ToPort`, as EC2 interprets them (sg-semantics.md §3).
fn l4_match(permission: &Field, problems: &mut Problems) -> Option<L4Match> {
    let field = problems.ok(permission.require("IpProtocol"))?;
    // The CLI prints strings; a YAML file written by hand may carry a bare number.
    let protocol = match field.value {
        serde_json::Value::Number(n) => n.to_string(),
        _ => problems.ok(field.str())?.trim().to_ascii_lowercase(),
    };
    let number = match protocol.as_str() {
        "-1" => return Some(L4Match::All),
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        other => match other.parse::<u8>() {
            Ok(n) => n,
            Err(_) => {
                problems.push(Invalid::new(
                    &field.path,
                    format!(
                        "unknown protocol {protocol:?} (expected tcp, udp, icmp, icmpv6, -1 or a number 0..=255)"
                    ),
                ));
                return None;
            }
        },
    };
    match number {
        6 | 17 => port_range(permission, number, problems),
        1 | 58 => icmp(permission, number == 58, problems),
        n => Some(L4Match::Protocol(n)),
    }
}

fn port_range(permission: &Field, protocol: u8, problems: &mut Problems) -> Option<L4Match> {
    let port = |key| {
        permission
            .require(key)
            .and_then(|f| f.int_in::<u16>(0..=65535))
    };
    let from = problems.ok(port("FromPort"));
    let to = problems.ok(port("ToPort"));
    let (from, to) = (from?, to?);
    if from > to {
        problems.push(Invalid::new(
            &permission.path_of("ToPort"),
            format!("ToPort {to} is below FromPort {from}"),
        ));
        return None;
    }
    Some(L4Match::Ports { protocol, from, to })
}

/// `FromPort` is the ICMP type and `ToPort` the code, `-1` (or absent) meaning
/// any; any type implies any code, whatever `ToPort` says.
fn icmp(permission: &Field, v6: bool, problems: &mut Problems) -> Option<L4Match> {
    let value = |key| -> Result<Option<u8>, Invalid> {
        match permission.get(key) {
            None => Ok(None),
            Some(f) if f.int()? == -1 => Ok(None),
            Some(f) => f.int_in::<u8>(-1..=255).map(Some),
        }
    };
    let icmp_type = problems.ok(value("FromPort"));
    let code = problems.ok(value("ToPort"));
    let icmp_type = icmp_type?;
    let code = if icmp_type.is_none() { None } else { code? };
    Some(L4Match::Icmp {
        v6,
        icmp_type,
        code,
    })
}

/// The peers of one permission with their descriptions, in rule-index order.
fn peers(
    permission: &Field,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> Vec<(Peer, Option<String>)> {
    let mut peers = Vec::new();
    for (list, key, v6) in [
        ("IpRanges", "CidrIp", false),
        ("Ipv6Ranges", "CidrIpv6", true),
    ] {
        for range in list_of(permission, list, problems) {
            let description = description(&range, problems);
            let Some(field) = problems.ok(range.require(key)) else {
                continue;
            };
            match problems.ok(field.cidr()) {
                Some(cidr) if cidr.is_ipv4() != v6 => peers.push((Peer::Cidr(cidr), description)),
                Some(cidr) => problems.push(Invalid::new(
                    &field.path,
                    format!("{cidr} is not an {} CIDR", if v6 { "IPv6" } else { "IPv4" }),
                )),
                None => {}
            }
        }
    }
    for entry in list_of(permission, "PrefixListIds", problems) {
        let description = description(&entry, problems);
        let Some(field) = problems.ok(entry.require("PrefixListId")) else {
            continue;
        };
        if let Some(id) = problems.ok(field.name()) {
            references.push(Reference::new(Target::PrefixList, id, &field.path));
            peers.push((Peer::PrefixList(id.to_string()), description));
        }
    }
    for pair in list_of(permission, "UserIdGroupPairs", problems) {
        let description = description(&pair, problems);
        let Some(field) = problems.ok(pair.require("GroupId")) else {
            continue;
        };
        if let Some(id) = problems.ok(group_id(&field)) {
            references.push(Reference::new(Target::ReferencedGroup, &id, &field.path));
            peers.push((Peer::Group(id), description));
        }
    }
    peers
}

fn description(peer: &Field, problems: &mut Problems) -> Option<String> {
    let text = problems.ok(peer.get("Description")?.str())?;
    (!text.is_empty()).then(|| text.to_string())
}

/// Rules of one direction counted as the EC2 quota counts them: IPv4 and IPv6
/// separately, a prefix list or group reference counting once in each family.
pub(crate) fn rule_counts(group: &SecurityGroup, direction: Direction) -> (usize, usize) {
    group
        .rules(direction)
        .iter()
        .fold((0, 0), |(v4, v6), rule| match &rule.peer {
            Peer::Cidr(c) if c.is_ipv4() => (v4 + 1, v6),
            Peer::Cidr(_) => (v4, v6 + 1),
            Peer::PrefixList(_) | Peer::Group(_) => (v4 + 1, v6 + 1),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cidr;
    use crate::source::state::testdir::{StateDir, group};

    fn cidr(s: &str) -> Peer {
        Peer::Cidr(s.parse::<Cidr>().unwrap())
    }

    /// The ingress rules of `sg-0app`, defined with `permissions` (a JSON array).
    fn ingress(permissions: &str) -> Vec<Rule> {
        let dir = StateDir::with_node().file("app.json", &group("sg-0app", permissions, "[]"));
        dir.model().groups["sg-0app"].ingress.clone()
    }

    fn l4(permission: &str) -> L4Match {
        let rules = ingress(&format!("[{permission}]"));
        assert_eq!(rules.len(), 1);
        rules[0].l4
    }

    fn error_of(permission: &str, parts: &[&str]) -> String {
        let dir = StateDir::with_node().file(
            "app.json",
            &group("sg-0app", &format!("[{permission}]"), "[]"),
        );
        let mut parts = parts.to_vec();
        parts.extend(["app.json", "SecurityGroup sg-0app"]);
        dir.error(&parts)
    }

    const PEER: &str = r#""IpRanges": [{"CidrIp": "10.0.0.0/16"}]"#;

    #[test]
    fn tcp_and_udp_ranges_by_name_number_or_case() {
        let tcp = L4Match::Ports {
            protocol: 6,
            from: 80,
            to: 443,
        };
        for protocol in ["tcp", "6", "TCP", "Tcp"] {
            let p =
                format!(r#"{{"IpProtocol": "{protocol}", "FromPort": 80, "ToPort": 443, {PEER}}}"#);
            assert_eq!(l4(&p), tcp, "{protocol}");
        }
        let udp = format!(r#"{{"IpProtocol": "17", "FromPort": 0, "ToPort": 65535, {PEER}}}"#);
        assert_eq!(
            l4(&udp),
            L4Match::Ports {
                protocol: 17,
                from: 0,
                to: 65535
            }
        );
    }

    #[test]
    fn icmp_type_and_code_with_any() {
        let icmp = |protocol: &str, ports: &str| {
            l4(&format!(
                r#"{{"IpProtocol": "{protocol}", {ports} {PEER}}}"#
            ))
        };
        let v4 = |t, c| L4Match::Icmp {
            v6: false,
            icmp_type: t,
            code: c,
        };
        assert_eq!(
            icmp("icmp", r#""FromPort": 3, "ToPort": 4,"#),
            v4(Some(3), Some(4))
        );
        assert_eq!(
            icmp("1", r#""FromPort": 8, "ToPort": -1,"#),
            v4(Some(8), None)
        );
        // Any type implies any code, whatever ToPort says.
        assert_eq!(
            icmp("icmp", r#""FromPort": -1, "ToPort": 5,"#),
            v4(None, None)
        );
        let any_v6 = L4Match::Icmp {
            v6: true,
            icmp_type: None,
            code: None,
        };
        assert_eq!(icmp("icmpv6", ""), any_v6);
        assert_eq!(icmp("58", r#""FromPort": -1, "ToPort": -1,"#), any_v6);
        assert_eq!(
            icmp("ICMPv6", r#""FromPort": 128, "ToPort": 0,"#),
            L4Match::Icmp {
                v6: true,
                icmp_type: Some(128),
                code: Some(0)
            }
        );
    }

    #[test]
    fn all_and_other_protocols_ignore_ports() {
        let all = format!(r#"{{"IpProtocol": "-1", "FromPort": 99999, {PEER}}}"#);
        assert_eq!(l4(&all), L4Match::All);
        let esp = format!(r#"{{"IpProtocol": "50", "FromPort": -1, "ToPort": -1, {PEER}}}"#);
        assert_eq!(l4(&esp), L4Match::Protocol(50));
        // A hand-written YAML file may carry the number unquoted.
        let dir = StateDir::with_node().file(
            "gre.yaml",
            "SecurityGroups:\n- GroupId: sg-0gre\n  IpPermissions:\n  - IpProtocol: 47\n    IpRanges: [{CidrIp: 10.0.0.0/8}]\n",
        );
        assert_eq!(
            dir.model().groups["sg-0gre"].ingress[0].l4,
            L4Match::Protocol(47)
        );
    }

    #[test]
    fn one_rule_per_peer_in_ec2_order() {
        let dir = StateDir::with_node()
            .file(
                "pl.json",
                r#"{"PrefixListId": "pl-0abc", "Entries": [{"Cidr": "192.0.2.0/24"}]}"#,
            )
            .file(
                "app.json",
                &group(
                    "sg-0app",
                    r#"[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                        "UserIdGroupPairs": [{"GroupId": "sg-0node", "UserId": "111122223333", "Description": "nodes"}],
                        "PrefixListIds": [{"PrefixListId": "pl-0abc"}],
                        "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/32", "Description": ""}],
                        "IpRanges": [{"CidrIp": "10.0.0.0/16", "Description": "vpc"}, {"CidrIp": "192.0.2.7/32"}]},
                       {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "IpRanges": [{"CidrIp": "10.0.0.2/32"}]}]"#,
                    "[]",
                ),
            );
        let model = dir.model();
        let rules = &model.groups["sg-0app"].ingress;
        let peers: Vec<_> = rules.iter().map(|r| r.peer.clone()).collect();
        assert_eq!(
            peers,
            [
                cidr("10.0.0.0/16"),
                cidr("192.0.2.7/32"),
                cidr("2001:db8::/32"),
                Peer::PrefixList("pl-0abc".into()),
                Peer::Group("sg-0node".into()),
                cidr("10.0.0.2/32"),
            ]
        );
        let descriptions: Vec<_> = rules.iter().map(|r| r.description.as_deref()).collect();
        assert_eq!(
            descriptions,
            [Some("vpc"), None, None, None, Some("nodes"), None]
        );
        assert_eq!(
            model.prefix_lists["pl-0abc"],
            ["192.0.2.0/24".parse().unwrap()]
        );
        assert!(model.groups["sg-0app"].egress.is_empty());
    }

    #[test]
    fn group_fields_and_tags() {
        let dir = StateDir::with_node().file(
            "app.json",
            r#"{"SecurityGroups": [{"GroupId": "sg-0app", "GroupName": "app", "Description": "the app",
               "VpcId": "vpc-1", "OwnerId": "1", "Tags": [{"Key": "team", "Value": "shop"}]}]}"#,
        );
        let g = &dir.model().groups["sg-0app"];
        assert_eq!(
            (g.name.as_str(), g.description.as_str()),
            ("app", "the app")
        );
        assert_eq!(g.tags["team"], "shop");
    }

    #[test]
    fn port_errors() {
        let p = |from: &str, to: &str| {
            format!(r#"{{"IpProtocol": "tcp", "FromPort": {from}, "ToPort": {to}, {PEER}}}"#)
        };
        error_of(
            &p("443", "80"),
            &["IpPermissions[0].ToPort", "below FromPort 443"],
        );
        error_of(
            &p("80", "70000"),
            &["IpPermissions[0].ToPort", "70000 is out of range"],
        );
        error_of(
            &p("-1", "80"),
            &["IpPermissions[0].FromPort", "out of range"],
        );
        error_of(
            &p("\"80\"", "80"),
            &["IpPermissions[0].FromPort", "expected an integer"],
        );
        let missing = format!(r#"{{"IpProtocol": "udp", "FromPort": 53, {PEER}}}"#);
        error_of(&missing, &["IpPermissions[0].ToPort", "missing"]);
        let icmp = format!(r#"{{"IpProtocol": "icmp", "FromPort": 300, "ToPort": 0, {PEER}}}"#);
        error_of(&icmp, &["IpPermissions[0].FromPort", "out of range"]);
    }

    #[test]
    fn protocol_errors() {
        for protocol in ["tcpp", "256", "all", ""] {
            let p = format!(r#"{{"IpProtocol": "{protocol}", {PEER}}}"#);
            error_of(&p, &["IpPermissions[0].IpProtocol", "unknown protocol"]);
        }
        error_of(
            &format!("{{{PEER}}}"),
            &["IpPermissions[0].IpProtocol", "missing"],
        );
    }

    #[test]
    fn peer_errors() {
        let with = |peers: &str| format!(r#"{{"IpProtocol": "-1", {peers}}}"#);
        error_of(
            &with(r#""IpRanges": [{"CidrIp": "10.0.0.1/16"}]"#),
            &[
                "IpPermissions[0].IpRanges[0].CidrIp",
                "host bits set",
                "10.0.0.0/16",
            ],
        );
        error_of(
            &with(r#""IpRanges": [{"CidrIp": "10.0.0.0/33"}]"#),
            &["IpPermissions[0].IpRanges[0].CidrIp", "not a CIDR"],
        );
        error_of(
            &with(r#""IpRanges": [{"CidrIp": "::/0"}]"#),
            &["IpPermissions[0].IpRanges[0].CidrIp", "not an IPv4 CIDR"],
        );
        error_of(
            &with(r#""Ipv6Ranges": [{"CidrIpv6": "0.0.0.0/0"}]"#),
            &[
                "IpPermissions[0].Ipv6Ranges[0].CidrIpv6",
                "not an IPv6 CIDR",
            ],
        );
        error_of(
            &with(
                r#""IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []"#,
            ),
            &["IpPermissions[0]", "no peer"],
        );
        error_of(
            &with(r#""UserIdGroupPairs": [{"GroupName": "default"}]"#),
            &["IpPermissions[0].UserIdGroupPairs[0].GroupId", "missing"],
        );
    }

    #[test]
    fn undefined_references() {
        let dir = StateDir::with_node().file(
            "app.json",
            &group(
                "sg-0app",
                "[]",
                r#"[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                     "PrefixListIds": [{"PrefixListId": "pl-0gone"}]}]"#,
            ),
        );
        dir.error(&[
            "app.json: SecurityGroup sg-0app: IpPermissionsEgress[0].PrefixListIds[0].PrefixListId: prefix list pl-0gone is not defined",
        ]);
    }

    /// A rule may reference a group the state does not define (another
    /// account's, a peered VPC's, a deleted one): EC2 accepts it, and it
    /// matches the members the ENI data lists. A warning, not an error.
    #[test]
    fn a_referenced_group_the_state_does_not_define_is_a_warning() {
        let dir = StateDir::with_node()
            .file(
                "app.json",
                &group(
                    "sg-0app",
                    r#"[{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
                         "UserIdGroupPairs": [{"GroupId": "sg-0node"},
                                              {"GroupId": "sg-0peer", "UserId": "444455556666",
                                               "VpcPeeringConnectionId": "pcx-0a"}]},
                        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0gone"}]}]"#,
                    "[]",
                ),
            )
            .file(
                "enis.json",
                r#"{"NetworkInterfaces": [{"NetworkInterfaceId": "eni-0peer",
                    "Groups": [{"GroupId": "sg-0peer"}], "PrivateIpAddress": "10.0.9.9",
                    "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.9.16/28"}]}]}"#,
            );
        let model = dir.model();
        let warnings: Vec<String> = model.findings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(warnings[0].contains(
            "app.json: SecurityGroup sg-0app: IpPermissions[0].UserIdGroupPairs[1].GroupId: security group sg-0peer is not defined"
        ), "{warnings:?}");
        assert!(warnings[0].contains("matches the 2 member"), "{warnings:?}");
        assert!(
            warnings[1]
                .contains("IpPermissions[1].UserIdGroupPairs[0].GroupId: security group sg-0gone")
        );
        assert!(warnings[1].contains("matches the 0 member"), "{warnings:?}");
        assert_eq!(
            model.members["sg-0peer"],
            ["10.0.9.9/32", "10.0.9.16/28"]
                .map(|c| c.parse().unwrap())
                .into()
        );
        assert!(model.members["sg-0gone"].is_empty());
    }

    #[test]
    fn every_error_is_reported() {
        let dir = StateDir::with_node().file(
            "bad.json",
            r#"{"SecurityGroups": [
                {"GroupId": "sg-0a", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 9, "ToPort": 1, "IpRanges": [{"CidrIp": "1.2.3.4/8"}]}]},
                {"GroupId": "0b", "IpPermissionsEgress": [{"IpProtocol": "xyz", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]},
                {"GroupName": "no id"}]}"#,
        );
        let errors = dir.errors();
        let expected = [
            "SecurityGroup sg-0a: IpPermissions[0].ToPort",
            "SecurityGroup sg-0a: IpPermissions[0].IpRanges[0].CidrIp",
            "SecurityGroup 0b: GroupId: \"0b\" is not a security group ID",
            "SecurityGroup 0b: IpPermissionsEgress[0].IpProtocol",
            "SecurityGroups[2]: GroupId: missing",
        ];
        // Unnamed groups cannot be set aside: the state is refused, with every problem.
        assert_eq!(errors, dir.refusal());
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for expected in expected {
            assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{errors:#?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn a_group_that_cannot_be_read_is_set_aside() {
        let dir = StateDir::with_node().file(
            "bad.json",
            r#"{"SecurityGroups": [
                {"GroupId": "sg-0a", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 9, "ToPort": 1, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]}]}"#,
        );
        let skipped = dir.findings(crate::model::FindingKind::Skipped);
        assert_eq!(skipped.len(), 1, "{skipped:#?}");
        assert!(skipped[0].contains("SecurityGroup sg-0a: IpPermissions[0].ToPort"));
        assert!(skipped[0].contains("the group is set aside"));
        let model = dir.model();
        assert!(!model.groups.contains_key("sg-0a"));
        assert!(model.groups.contains_key("sg-0node"));
    }

    #[test]
    fn duplicated_group() {
        let dir =
            StateDir::with_node().file("again.json", crate::source::state::testdir::NODE_GROUP);
        dir.error(&[
            "again.json",
            "SecurityGroup sg-0node",
            "defined twice",
            "groups-node.json",
        ]);
    }

    /// `count` TCP rules to distinct CIDRs of one family.
    fn many_rules(count: usize, v6: bool) -> String {
        let ranges: Vec<String> = (0..count)
            .map(|i| match v6 {
                false => format!(r#"{{"CidrIp": "10.1.{i}.0/24"}}"#),
                true => format!(r#"{{"CidrIpv6": "2001:db8:{i:x}::/48"}}"#),
            })
            .collect();
        let key = if v6 { "Ipv6Ranges" } else { "IpRanges" };
        format!(
            r#"{{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 1, "{key}": [{}]}}"#,
            ranges.join(",")
        )
    }

    #[test]
    fn rule_quota_counts_families_apart() {
        let full = format!("[{}, {}]", many_rules(60, false), many_rules(60, true));
        let dir = StateDir::with_node().file("big.json", &group("sg-0big", &full, &full));
        assert_eq!(dir.model().groups["sg-0big"].ingress.len(), 120);

        let over = format!("[{}]", many_rules(61, false));
        let dir = StateDir::with_node().file("big.json", &group("sg-0big", "[]", &over));
        warning(
            &dir,
            &[
                "big.json",
                "SecurityGroup sg-0big",
                "IpPermissionsEgress",
                "61 IPv4 egress rules",
                "quota of 60",
            ],
        );
    }

    /// The single warning, which must mention every one of `parts`: EC2 accepted a
    /// group over the default quota, so the account's quota is higher.
    fn warning(dir: &StateDir, parts: &[&str]) {
        let warnings = dir.findings(crate::model::FindingKind::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        for part in parts {
            assert!(warnings[0].contains(part), "{warnings:#?} lacks {part:?}");
        }
    }

    #[test]
    fn references_count_in_both_families() {
        let refs = r#"{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0node"}]}"#;
        let ingress = format!("[{}, {refs}]", many_rules(60, true));
        let dir = StateDir::with_node().file("big.json", &group("sg-0big", &ingress, "[]"));
        warning(
            &dir,
            &[
                "SecurityGroup sg-0big",
                "IpPermissions",
                "61 IPv6 ingress rules",
            ],
        );
    }

    #[test]
    fn network_interfaces_carry_their_groups() {
        let dir = StateDir::with_node().file(
            "enis.json",
            r#"{"NetworkInterfaces": [{
                "NetworkInterfaceId": "eni-0rds", "Description": "RDSNetworkInterface", "InterfaceType": "interface",
                "Groups": [{"GroupId": "sg-0node", "GroupName": "node"}, {"GroupId": "sg-0elsewhere"}],
                "PrivateIpAddress": "10.0.3.25",
                "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.3.25", "Primary": true}, {"PrivateIpAddress": "10.0.3.26"}],
                "Ipv6Addresses": [{"Ipv6Address": "2001:db8::25"}],
                "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.3.32/28"}],
                "Ipv6Prefixes": [{"Ipv6Prefix": "2001:db8:0:1::/80"}]}]}"#,
        );
        let model = dir.model();
        let members = &model.members["sg-0node"];
        for cidr in [
            "10.0.3.25",
            "10.0.3.26",
            "2001:db8::25",
            "10.0.3.32/28",
            "2001:db8:0:1::/80",
        ] {
            assert!(members.contains(&cidr.parse().unwrap()), "{cidr}");
        }
        // Only groups defined or referenced by a rule collect members.
        assert!(!model.members.contains_key("sg-0elsewhere"));
        assert!(
            model.nlb_groups.is_empty(),
            "an RDS ENI is no load balancer"
        );
    }

    #[test]
    fn the_groups_of_network_load_balancer_enis_are_known() {
        let dir = StateDir::with_node().file(
            "enis.json",
            r#"{"NetworkInterfaces": [
                {"NetworkInterfaceId": "eni-0nlb", "Description": "ELB net/k8s-shop-api/50dc6c495c0c9188",
                 "Groups": [{"GroupId": "sg-0node"}], "PrivateIpAddress": "10.0.3.40"},
                {"NetworkInterfaceId": "eni-0alb", "Description": "ELB app/k8s-shop-web/9f8e7d6c5b4a3921",
                 "Groups": [{"GroupId": "sg-0alb"}], "PrivateIpAddress": "10.0.3.41"}]}"#,
        );
        let model = dir.model();
        assert_eq!(
            model.nlb_groups,
            BTreeSet::from(["sg-0node".to_string()]),
            "an ALB proxies (its own address is what pods see); an NLB may not"
        );
    }

    #[test]
    fn network_interface_errors() {
        let dir = StateDir::with_node().file(
            "enis.json",
            r#"{"NetworkInterfaces": [{"NetworkInterfaceId": "eni-1", "PrivateIpAddress": "10.0.3.999"},
                                      {"NetworkInterfaceId": "eni-1"},
                                      {"NetworkInterfaceId": "eni-2", "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.3.33/28"}]}]}"#,
        );
        let errors = dir.errors();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        for expected in [
            "NetworkInterface eni-1: PrivateIpAddress: \"10.0.3.999\" is not an IP address",
            "NetworkInterface eni-2: Ipv4Prefixes[0].Ipv4Prefix: \"10.0.3.33/28\" has host bits set",
            "NetworkInterface eni-1: defined twice",
        ] {
            assert!(
                errors.iter().any(|e| e.contains(expected)),
                "{errors:#?} lacks {expected:?}"
            );
        }
        assert!(
            errors
                .iter()
                .all(|e| e.contains("the interface is set aside"))
        );
    }

    #[test]
    fn prefix_list_errors() {
        let dir = StateDir::with_node()
            .file(
                "pl.json",
                r#"{"PrefixListId": "pl-1", "Entries": [{"Cidr": "192.0.2.1/24"}]}"#,
            )
            .file("pl2.json", r#"{"PrefixListId": "pl-1", "Entries": []}"#);
        let errors = dir.errors();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].contains(
            "pl.json: PrefixList pl-1: Entries[0].Cidr: \"192.0.2.1/24\" has host bits set"
        ));
        assert!(errors[1].contains("pl2.json: PrefixList pl-1: defined twice"));
    }
}
