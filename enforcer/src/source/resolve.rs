//! From the objects of a state directory to this node's model: SGP matching gives
//! each pod its groups, pods of this node become branch pods, and groups get members.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use crate::model::sgp::{self, Labels};
use crate::model::{
    BranchPod, Cidr, ClusterFacts, Direction, GroupId, GroupsSource, Model, NodeConfig, PodFacts,
};
use crate::source::state::{
    Inventory, Located, NetworkInterface, Pod, Reference, StateError, Target, rule_counts,
};

/// Resolves the inventory; every error found is returned, in file order.
pub(crate) fn resolve(dir: &Path, inventory: Inventory) -> Result<Model, Vec<StateError>> {
    let Inventory {
        mut errors,
        groups,
        interfaces,
        prefix_lists,
        pods,
        service_accounts,
        policies,
        node_configs,
        references,
    } = inventory;
    let groups = unique(groups, |g| g.id.clone(), &mut errors);
    let prefix_lists = unique(prefix_lists, |(id, _)| id.clone(), &mut errors);
    let interfaces = unique(interfaces, |eni| eni.id.clone(), &mut errors);
    let pods = unique(pods, |p| (p.namespace.clone(), p.name.clone()), &mut errors);
    let accounts = unique(
        service_accounts,
        |a| (a.namespace.clone(), a.name.clone()),
        &mut errors,
    );
    let policies = unique(
        policies,
        |p| (p.namespace.clone(), p.name.clone()),
        &mut errors,
    );
    for reference in &references {
        check_reference(reference, &groups, &prefix_lists, &mut errors);
    }
    // Rules may reference groups the state does not define (EC2 accepts
    // them): each is a warning, and matches the members the ENI data lists.
    let unknown: Vec<&Located<Reference>> = references
        .iter()
        .filter(|r| r.item.target == Target::ReferencedGroup && !groups.contains_key(&r.item.id))
        .collect();
    let node = node_config(dir, node_configs, &mut errors);
    let max_rules = node.as_ref().map_or(60, |n| n.max_rules_per_group);
    for group in groups.values() {
        check_rule_quota(group, max_rules, &mut errors);
    }
    let Some(node) = node else {
        return Err(in_file_order(errors));
    };

    let policies: Vec<_> = policies.values().map(|p| &p.item).collect();
    let no_labels = Labels::new();
    // Only groups that are defined or referenced by a rule collect members.
    let mut members: BTreeMap<GroupId, BTreeSet<Cidr>> = groups
        .keys()
        .chain(unknown.iter().map(|r| &r.item.id))
        .map(|id| (id.clone(), BTreeSet::new()))
        .collect();
    let mut add_members = |groups: &[GroupId], cidrs: &mut dyn Iterator<Item = Cidr>| {
        let cidrs: Vec<Cidr> = cidrs.collect();
        for group in groups {
            if let Some(set) = members.get_mut(group) {
                set.extend(cidrs.iter().copied());
            }
        }
    };
    // The ENI data is the truth: every address and delegated prefix of an ENI
    // is a member of each of its groups. Pods add only what is certain.
    for eni in interfaces.values() {
        add_members(&eni.item.groups, &mut eni.item.cidrs());
    }
    let held_by_an_eni = |ip: IpAddr| interfaces.values().any(|eni| eni.item.holds(ip));
    // Each node's own addresses: those of its host-network pods.
    let mut node_ips: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    for pod in pods.values().map(|p| &p.item).filter(|p| p.host_network) {
        if let Some(name) = pod.node_name.as_deref() {
            node_ips.entry(name).or_default().extend(&pod.ips);
        }
    }
    add_members(
        &node.primary_security_groups,
        &mut node.primary_ips.iter().map(|&ip| Cidr::host(ip)),
    );
    let mut node_local: BTreeSet<IpAddr> = node.primary_ips.iter().copied().collect();
    let policies_of = |pod: &Pod| {
        let account_labels = accounts
            .get(&(pod.namespace.clone(), pod.service_account.clone()))
            .map_or(&no_labels, |a| &a.item.labels);
        sgp::matching(
            policies.iter().copied(),
            &pod.namespace,
            &pod.labels,
            account_labels,
        )
    };
    let cluster = ClusterFacts {
        dns_endpoints: pods
            .values()
            .map(|p| &p.item)
            .filter(|p| p.labels.get("k8s-app").is_some_and(|app| app == "kube-dns"))
            .flat_map(|p| p.ips.iter().copied())
            .collect(),
        idle_policies: policies
            .iter()
            .filter(|policy| {
                !pods.values().any(|p| {
                    !p.item.host_network
                        && policies_of(&p.item)
                            .iter()
                            .any(|m| (&m.namespace, &m.name) == (&policy.namespace, &policy.name))
                })
            })
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
        awaiting_branch: pods
            .values()
            .map(|p| &p.item)
            .filter(|p| {
                p.node_name.as_deref() == Some(node.name.as_str())
                    && !p.host_network
                    && p.branch.is_none()
                    && !policies_of(p).is_empty()
            })
            .map(Pod::key)
            .collect(),
        pods_on_node: pods
            .values()
            .filter(|p| p.item.node_name.as_deref() == Some(node.name.as_str()))
            .count(),
    };
    let mut vlans: BTreeMap<u16, &Located<Pod>> = BTreeMap::new();
    let mut branch_pods = Vec::new();
    for located in pods.values() {
        let pod = &located.item;
        let on_node = pod.node_name.as_deref() == Some(node.name.as_str());
        if on_node {
            node_local.extend(pod.ips.iter().copied());
            node_local.extend(pod.branch.iter().flat_map(|b| b.addresses()));
        }
        let Some(branch) = &pod.branch else {
            // Without a branch ENI a pod uses an address of one of its node's
            // ENIs and carries that ENI's groups: the ENI data says which. On
            // this node, an address no ENI lists is on the primary ENI that the
            // NodeConfig describes. A pod of another node is a member only
            // through the ENI data; host-network pods are their node itself.
            if on_node && !pod.host_network {
                let unlisted = pod.ips.iter().filter(|&&ip| !held_by_an_eni(ip));
                add_members(
                    &node.primary_security_groups,
                    &mut unlisted.map(|&ip| Cidr::host(ip)),
                );
            }
            continue;
        };
        let matched = policies_of(pod);
        let mut pod_groups = sgp::union_of_groups(&matched);
        if pod_groups.is_empty() {
            // No policy matched: the branch ENI carries its node's instance
            // groups, this node's from the NodeConfig, another's from the ENI
            // data (its primary ENI), or none known.
            pod_groups = if on_node {
                node.primary_security_groups.clone()
            } else {
                pod.node_name
                    .as_deref()
                    .and_then(|name| instance_groups(name, &interfaces, &node_ips))
                    .unwrap_or_default()
            };
        }
        // A branch ENI the ENI data lists made its members above, with the
        // groups it really carries; otherwise the policies' groups are the best known.
        let branch_eni_groups = interfaces
            .get(&branch.eni_id)
            .map(|eni| eni.item.groups.clone());
        if branch_eni_groups.is_none() {
            add_members(&pod_groups, &mut branch.addresses().map(Cidr::host));
        }
        if !on_node {
            continue;
        }
        if pod_groups.len() > node.max_groups_per_pod {
            let from = if matched.is_empty() {
                "the node's primarySecurityGroups".to_string()
            } else {
                let names: Vec<_> = matched.iter().map(|p| p.name.as_str()).collect();
                format!("SecurityGroupPolicies {}", names.join(", "))
            };
            errors.push(error(
                located,
                None,
                format!(
                    "{} security groups ({}) from {from}: over the quota of {} per branch ENI (maxSecurityGroupsPerPod)",
                    pod_groups.len(),
                    pod_groups.join(", "),
                    node.max_groups_per_pod,
                ),
            ));
        }
        match vlans.entry(branch.vlan) {
            Entry::Vacant(slot) => {
                slot.insert(located);
            }
            Entry::Occupied(other) => errors.push(error(
                located,
                Some(format!(
                    "metadata.annotations[{:?}][0].vlanId",
                    crate::source::state::POD_ENI_ANNOTATION
                )),
                format!(
                    "VLAN {} is also used by pod {} ({}) on this node",
                    branch.vlan,
                    other.get().item.key(),
                    other.get().file.display()
                ),
            )),
        }
        branch_pods.push(BranchPod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            vlan: branch.vlan,
            eni_id: branch.eni_id.clone(),
            mac: branch.mac.clone(),
            ipv4: branch.ipv4,
            ipv6: branch.ipv6,
            subnet_v4: branch.subnet_v4,
            subnet_v6: branch.subnet_v6,
            // EC2 enforces the groups on the branch ENI, set when the pod was
            // created; the policies' groups are only a pod's until the agent pins them.
            groups: branch_eni_groups
                .clone()
                .unwrap_or_else(|| pod_groups.clone()),
            mode: node.enforcing_mode,
            action: pod.action.unwrap_or(node.enforcing_action),
            facts: PodFacts {
                groups_source: if branch_eni_groups.is_some() {
                    GroupsSource::BranchEni
                } else {
                    GroupsSource::Policies
                },
                policy_groups: pod_groups,
                policies: matched
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect(),
                ..pod.facts.clone()
            },
        });
    }
    if !errors.is_empty() {
        return Err(in_file_order(errors));
    }
    branch_pods.sort_by_key(|p| p.vlan);
    let warnings = unknown
        .into_iter()
        .map(|reference| {
            let id = &reference.item.id;
            let known = members.get(id).map_or(0, BTreeSet::len);
            let message = format!(
                "security group {id} is not defined (another account's, a peered VPC's or a \
                 deleted group?): EC2 accepts the rule; it matches the {known} member \
                 address(es) and prefix(es) the ENI data lists"
            );
            error(reference, Some(reference.item.field.clone()), message)
        })
        .collect();
    let nlb_groups = interfaces
        .values()
        .filter(|eni| eni.item.network_load_balancer)
        .flat_map(|eni| eni.item.groups.iter().cloned())
        .collect();
    Ok(Model {
        node,
        groups: groups.into_iter().map(|(id, g)| (id, g.item)).collect(),
        prefix_lists: prefix_lists.into_values().map(|l| l.item).collect(),
        members,
        pods: branch_pods,
        node_local,
        warnings,
        nlb_groups,
        cluster,
    })
}

/// The instance security groups of the node called `name`, from the ENI data:
/// its primary ENI, whose `PrivateDnsName` is the node's name, or the ENI
/// holding the address of one of its host-network pods (the node's own address).
fn instance_groups(
    name: &str,
    interfaces: &BTreeMap<String, Located<NetworkInterface>>,
    node_ips: &BTreeMap<&str, BTreeSet<IpAddr>>,
) -> Option<Vec<GroupId>> {
    let ips = node_ips.get(name);
    interfaces
        .values()
        .map(|eni| &eni.item)
        .find(|eni| {
            eni.dns_name.as_deref() == Some(name)
                || ips.is_some_and(|ips| eni.addresses.iter().any(|ip| ips.contains(ip)))
        })
        .map(|eni| eni.groups.clone())
}

fn error<T>(at: &Located<T>, field: Option<String>, message: String) -> StateError {
    StateError {
        file: at.file.clone(),
        object: at.object.clone(),
        field,
        message,
    }
}

/// Errors grouped by file, in the order found within each file.
fn in_file_order(mut errors: Vec<StateError>) -> Vec<StateError> {
    errors.sort_by(|a, b| a.file.cmp(&b.file));
    errors
}

/// Objects by key; a second object with a key already seen is an error.
fn unique<T, K: Ord>(
    items: Vec<Located<T>>,
    key: impl Fn(&T) -> K,
    errors: &mut Vec<StateError>,
) -> BTreeMap<K, Located<T>> {
    let mut map = BTreeMap::new();
    for item in items {
        match map.entry(key(&item.item)) {
            Entry::Vacant(slot) => {
                slot.insert(item);
            }
            Entry::Occupied(first) => {
                let message = format!("defined twice: also in {}", first.get().file.display());
                errors.push(error(&item, None, message));
            }
        }
    }
    map
}

fn check_reference<G, P>(
    reference: &Located<Reference>,
    groups: &BTreeMap<GroupId, G>,
    prefix_lists: &BTreeMap<String, P>,
    errors: &mut Vec<StateError>,
) {
    let Reference { target, id, field } = &reference.item;
    let message = match target {
        Target::Group if !groups.contains_key(id) => format!(
            "security group {id} is not defined (no describe-security-groups output lists it)"
        ),
        Target::PrefixList if !prefix_lists.contains_key(id) => {
            format!("prefix list {id} is not defined (no file has PrefixListId {id})")
        }
        _ => return,
    };
    errors.push(error(reference, Some(field.clone()), message));
}

/// The single NodeConfig; none, or more than one, is an error.
fn node_config(
    dir: &Path,
    configs: Vec<Located<Option<NodeConfig>>>,
    errors: &mut Vec<StateError>,
) -> Option<NodeConfig> {
    let mut configs = configs.into_iter();
    let Some(first) = configs.next() else {
        errors.push(StateError {
            file: dir.to_path_buf(),
            object: "NodeConfig".to_string(),
            field: None,
            message: "missing: the state directory needs exactly one NodeConfig".to_string(),
        });
        return None;
    };
    for extra in configs {
        let message = format!(
            "duplicate NodeConfig: {} already has one",
            first.file.display()
        );
        errors.push(error(&extra, None, message));
    }
    first.item
}

/// EC2's quota of rules per group and direction, IPv4 and IPv6 counted apart.
fn check_rule_quota(
    group: &Located<crate::model::SecurityGroup>,
    max: usize,
    errors: &mut Vec<StateError>,
) {
    for (direction, field) in [
        (Direction::Ingress, "IpPermissions"),
        (Direction::Egress, "IpPermissionsEgress"),
    ] {
        let (v4, v6) = rule_counts(&group.item, direction);
        for (count, family) in [(v4, "IPv4"), (v6, "IPv6")] {
            if count > max {
                let message = format!(
                    "{count} {family} {} rules: over the quota of {max} per group and direction (maxRulesPerGroup)",
                    direction.as_str()
                );
                errors.push(error(group, Some(field.to_string()), message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EnforcingMode;
    use crate::source::state::testdir::{NODE, NODE_CONFIG, NODE_GROUP, StateDir, group};

    const OTHER_NODE: &str = "ip-10-0-2-20.ec2.internal";

    struct PodSpec<'a> {
        namespace: &'a str,
        name: &'a str,
        node: &'a str,
        labels: &'a str,
        account: &'a str,
        branch: Option<(u16, &'a str)>,
        ips: &'a [&'a str],
        host_network: bool,
    }

    const POD: PodSpec<'static> = PodSpec {
        namespace: "shop",
        name: "",
        node: NODE,
        labels: "{}",
        account: "default",
        branch: None,
        ips: &[],
        host_network: false,
    };

    fn pod(spec: PodSpec) -> String {
        let annotations = match spec.branch {
            Some((vlan, ip)) => format!(
                r#"{{"vpc.amazonaws.com/pod-eni": "[{{\"eniId\":\"eni-{vlan}\",\"ifAddress\":\"02:00:00:00:00:{vlan:02x}\",\"privateIp\":\"{ip}\",\"vlanId\":{vlan}}}]"}}"#
            ),
            None => "{}".into(),
        };
        let ips: Vec<String> = spec
            .ips
            .iter()
            .map(|ip| format!(r#"{{"ip": "{ip}"}}"#))
            .collect();
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
                "metadata": {{"name": "{}", "namespace": "{}", "uid": "uid-{}", "labels": {}, "annotations": {annotations}}},
                "spec": {{"nodeName": "{}", "serviceAccountName": "{}", "hostNetwork": {}}},
                "status": {{"podIPs": [{}]}}}}"#,
            spec.name,
            spec.namespace,
            spec.name,
            spec.labels,
            spec.node,
            spec.account,
            spec.host_network,
            ips.join(",")
        )
    }

    fn list(items: &[String]) -> String {
        format!(
            r#"{{"apiVersion": "v1", "kind": "List", "items": [{}]}}"#,
            items.join(",")
        )
    }

    const POLICIES: &str = "\
apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  securityGroups: {groupIds: [sg-0web]}
---
apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: db, namespace: shop}
spec:
  serviceAccountSelector: {matchLabels: {db-access: \"true\"}}
  securityGroups: {groupIds: [sg-0db]}
---
apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  serviceAccountSelector:
    matchExpressions: [{key: pci, operator: Exists}]
  securityGroups: {groupIds: [sg-0vpn, sg-0db]}
---
apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: everything, namespace: staging}
spec:
  podSelector: {}
  securityGroups: {groupIds: [sg-0db]}
";

    const ACCOUNTS: &str = "\
apiVersion: v1
kind: ServiceAccount
metadata: {name: orders, namespace: shop, labels: {db-access: \"true\"}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: payments, namespace: shop, labels: {db-access: \"true\", pci: \"\"}}
";

    fn cluster(pods: &[String]) -> StateDir {
        let rule = r#"[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0node"}]}]"#;
        StateDir::with_node()
            .file("g-web.json", &group("sg-0web", rule, "[]"))
            .file("g-db.json", &group("sg-0db", rule, "[]"))
            .file("g-vpn.json", &group("sg-0vpn", rule, "[]"))
            .file("policies.yaml", POLICIES)
            .file("accounts.yaml", ACCOUNTS)
            .file("pods.json", &list(pods))
    }

    fn scenario() -> Vec<String> {
        vec![
            pod(PodSpec {
                name: "web-1",
                labels: r#"{"app": "web"}"#,
                branch: Some((3, "10.0.1.101")),
                ips: &["10.0.1.101"],
                ..POD
            }),
            pod(PodSpec {
                name: "orders",
                account: "orders",
                branch: Some((1, "10.0.1.102")),
                ..POD
            }),
            pod(PodSpec {
                name: "payments",
                labels: r#"{"app": "payments"}"#,
                account: "payments",
                branch: Some((2, "10.0.1.103")),
                ..POD
            }),
            pod(PodSpec {
                name: "lonely",
                labels: r#"{"app": "other"}"#,
                account: "missing",
                branch: Some((5, "10.0.1.104")),
                ..POD
            }),
            pod(PodSpec {
                name: "web-2",
                node: OTHER_NODE,
                labels: r#"{"app": "web"}"#,
                branch: Some((3, "10.0.2.101")),
                ..POD
            }),
            pod(PodSpec {
                name: "stray",
                node: OTHER_NODE,
                branch: Some((4, "10.0.2.102")),
                ..POD
            }),
            pod(PodSpec {
                namespace: "staging",
                name: "web",
                node: OTHER_NODE,
                labels: r#"{"app": "web"}"#,
                branch: Some((1, "10.0.2.103")),
                ..POD
            }),
            pod(PodSpec {
                namespace: "kube-system",
                name: "coredns-1",
                ips: &["10.0.1.31", "2001:db8::31"],
                ..POD
            }),
            pod(PodSpec {
                namespace: "kube-system",
                name: "coredns-2",
                node: OTHER_NODE,
                ips: &["10.0.2.44"],
                ..POD
            }),
            pod(PodSpec {
                namespace: "kube-system",
                name: "aws-node",
                node: OTHER_NODE,
                ips: &["10.0.2.20"],
                host_network: true,
                ..POD
            }),
        ]
    }

    #[test]
    fn pods_of_this_node_a_policy_selects_without_a_branch_eni_wait_for_one() {
        let mut pods = scenario();
        pods.push(pod(PodSpec {
            name: "web-new",
            labels: r#"{"app": "web"}"#,
            ..POD
        }));
        pods.push(pod(PodSpec {
            name: "web-elsewhere",
            node: OTHER_NODE,
            labels: r#"{"app": "web"}"#,
            ..POD
        }));
        let cluster = cluster(&pods).model().cluster;
        assert_eq!(cluster.awaiting_branch, ["shop/web-new"]);
        // web-1, orders, payments, lonely, coredns-1 and web-new.
        assert_eq!(cluster.pods_on_node, 6);
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    /// Members: addresses (host prefixes) or delegated prefixes.
    fn cidrs(list: &[&str]) -> BTreeSet<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn branch_pods_of_this_node_by_vlan() {
        let model = cluster(&scenario()).model();
        let pods: Vec<_> = model
            .pods
            .iter()
            .map(|p| (p.vlan, p.key(), p.groups.join(" ")))
            .collect();
        assert_eq!(
            pods,
            [
                (1, "shop/orders".to_string(), "sg-0db".to_string()),
                (2, "shop/payments".into(), "sg-0db sg-0vpn".into()),
                (3, "shop/web-1".into(), "sg-0web".into()),
                (5, "shop/lonely".into(), "sg-0node".into()),
            ]
        );
        let web = model.pod("shop/web-1").unwrap();
        assert_eq!(web.mode, EnforcingMode::Strict);
        assert_eq!(
            (web.uid.as_str(), web.eni_id.as_str()),
            ("uid-web-1", "eni-3")
        );
    }

    #[test]
    fn mode_comes_from_the_node() {
        let config = format!("{NODE_CONFIG}  enforcingMode: standard\n");
        let dir = cluster(&scenario()).file("node.yaml", &config);
        assert!(
            dir.model()
                .pods
                .iter()
                .all(|p| p.mode == EnforcingMode::Standard)
        );
    }

    #[test]
    fn members_of_each_group() {
        let model = cluster(&scenario()).model();
        assert_eq!(
            model.members["sg-0web"],
            cidrs(&["10.0.1.101", "10.0.2.101"])
        );
        assert_eq!(
            model.members["sg-0db"],
            cidrs(&["10.0.1.102", "10.0.1.103", "10.0.2.103"])
        );
        assert_eq!(model.members["sg-0vpn"], cidrs(&["10.0.1.103"]));
        // The node, this node's pods without a branch ENI (no ENI data lists
        // them: the primary ENI) and its branch pods that no policy selects;
        // never host-network pods. Pods of the other node, whose ENIs no file
        // describes, are members of nothing by assumption.
        assert_eq!(
            model.members["sg-0node"],
            cidrs(&["10.0.1.10", "10.0.1.104", "10.0.1.31", "2001:db8::31"])
        );
    }

    /// The ENIs of another node group's node (found by its DNS name, with a
    /// delegated prefix), of a node found through its host-network pod, of a
    /// Fargate pod, and of this node with custom networking.
    const INTERFACES: &str = r#"{"NetworkInterfaces": [
        {"NetworkInterfaceId": "eni-0other", "PrivateDnsName": "ip-10-0-2-20.ec2.internal",
         "Groups": [{"GroupId": "sg-0other"}],
         "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.2.20"}],
         "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.2.48/28"}],
         "Ipv6Prefixes": [{"Ipv6Prefix": "2001:db8:2::/80"}]},
        {"NetworkInterfaceId": "eni-0b", "PrivateDnsName": "ip-10-0-4-40.ec2.internal",
         "Groups": [{"GroupId": "sg-0b"}], "PrivateIpAddress": "10.0.4.40"},
        {"NetworkInterfaceId": "eni-0fargate", "Description": "[Fargate] pod",
         "Groups": [{"GroupId": "sg-0cluster"}], "PrivateIpAddress": "10.0.5.9"},
        {"NetworkInterfaceId": "eni-0custom", "Description": "ENIConfig us-east-1a",
         "Groups": [{"GroupId": "sg-0pods"}],
         "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.1.31"}],
         "Ipv6Addresses": [{"Ipv6Address": "2001:db8::31"}]}]}"#;

    fn cluster_with_enis() -> StateDir {
        let mut pods = scenario();
        pods.extend([
            pod(PodSpec {
                namespace: "kube-system",
                name: "cache",
                node: OTHER_NODE,
                ips: &["10.0.2.50", "2001:db8:2::7"],
                ..POD
            }),
            pod(PodSpec {
                name: "fargate",
                node: "fargate-ip-10-0-5-9.ec2.internal",
                ips: &["10.0.5.9"],
                ..POD
            }),
            pod(PodSpec {
                namespace: "kube-system",
                name: "aws-node-b",
                node: "worker-b",
                ips: &["10.0.4.40"],
                host_network: true,
                ..POD
            }),
            pod(PodSpec {
                name: "stray-b",
                node: "worker-b",
                branch: Some((4, "10.0.4.102")),
                ..POD
            }),
            pod(PodSpec {
                name: "stray-c",
                node: "worker-c",
                branch: Some((4, "10.0.6.102")),
                ..POD
            }),
        ]);
        let mut dir = cluster(&pods).file("enis.json", INTERFACES);
        for id in ["sg-0other", "sg-0b", "sg-0cluster", "sg-0pods"] {
            dir = dir.file(&format!("g-{id}.json"), &group(id, "[]", "[]"));
        }
        dir
    }

    #[test]
    fn members_follow_the_eni_data() {
        let model = cluster_with_enis().model();
        // Another node group's node: its ENI's addresses and delegated
        // prefixes, and its branch pod that no policy selects.
        assert_eq!(
            model.members["sg-0other"],
            cidrs(&["10.0.2.20", "10.0.2.48/28", "2001:db8:2::/80", "10.0.2.102"])
        );
        // A node named otherwise, found by its host-network pod's address.
        assert_eq!(model.members["sg-0b"], cidrs(&["10.0.4.40", "10.0.4.102"]));
        assert_eq!(model.members["sg-0cluster"], cidrs(&["10.0.5.9"]));
        // This node's pod on an ENIConfig's ENI carries that ENI's groups.
        assert_eq!(
            model.members["sg-0pods"],
            cidrs(&["10.0.1.31", "2001:db8::31"])
        );
        // Neither pods of other nodes (in a prefix or not, Fargate), nor the
        // branch pod of a node whose ENIs are unknown, are in this node's group.
        assert_eq!(
            model.members["sg-0node"],
            cidrs(&["10.0.1.10", "10.0.1.104"])
        );
        let everywhere: BTreeSet<Cidr> = model.members.values().flatten().copied().collect();
        for absent in ["10.0.2.44", "10.0.6.102"] {
            assert!(!everywhere.contains(&Cidr::host(absent.parse().unwrap())));
        }
    }

    #[test]
    fn members_through_a_prefix_are_judged_as_ec2_does() {
        use crate::policy::eval::{L4Packet, L4Query, Query, evaluate};
        // "8080 from the node group": EC2 admits the node group's members
        // only, the pod in this node's delegated prefix among them.
        let rule = r#"[{"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080,
                        "UserIdGroupPairs": [{"GroupId": "sg-0node"}]}]"#;
        let enis = r#"{"NetworkInterfaces": [
            {"NetworkInterfaceId": "eni-0here", "PrivateDnsName": "ip-10-0-1-10.ec2.internal",
             "Groups": [{"GroupId": "sg-0node"}], "PrivateIpAddress": "10.0.1.10",
             "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.1.64/28"}]}]}"#;
        let model = cluster_with_enis()
            .file("g-web.json", &group("sg-0web", rule, "[]"))
            .file("enis-here.json", enis)
            .model();
        let web = model.pod("shop/web-1").unwrap();
        let from = |peer: &str| {
            let query = Query {
                direction: Direction::Ingress,
                peer: peer.parse().unwrap(),
                l4: L4Query::Packet(L4Packet::tcp(8080)),
            };
            evaluate(&model, web, &query).allowed
        };
        assert!(from("10.0.1.70"), "a pod in the node's delegated prefix");
        assert!(!from("10.0.2.50"), "a pod of another node group");
        assert!(!from("10.0.5.9"), "a Fargate pod");
        assert!(!from("10.0.2.44"), "a pod of a node whose ENIs are unknown");
    }

    #[test]
    fn node_local_addresses() {
        let model = cluster(&scenario()).model();
        assert_eq!(
            model.node_local,
            ips(&[
                "10.0.1.10",
                "10.0.1.101",
                "10.0.1.102",
                "10.0.1.103",
                "10.0.1.104",
                "10.0.1.31",
                "2001:db8::31"
            ])
        );
    }

    #[test]
    fn a_vlan_twice_on_this_node() {
        let mut pods = scenario();
        pods.push(pod(PodSpec {
            name: "web-3",
            labels: r#"{"app": "web"}"#,
            branch: Some((2, "10.0.1.105")),
            ..POD
        }));
        let dir = cluster(&pods);
        dir.error(&[
            "pods.json",
            "Pod shop/web-3",
            "metadata.annotations[\"vpc.amazonaws.com/pod-eni\"][0].vlanId",
            "VLAN 2 is also used by pod shop/payments",
        ]);
    }

    #[test]
    fn groups_over_quota() {
        let config = format!("{NODE_CONFIG}  maxSecurityGroupsPerPod: 1\n");
        let dir = cluster(&scenario()).file("node.yaml", &config);
        dir.error(&[
            "pods.json",
            "Pod shop/payments",
            "2 security groups (sg-0db, sg-0vpn) from SecurityGroupPolicies db, payments",
            "quota of 1 per branch ENI",
        ]);
    }

    #[test]
    fn rule_quota_follows_the_node() {
        let config = format!("{NODE_CONFIG}  maxRulesPerGroup: 1\n");
        let two = r#"[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}, {"CidrIp": "10.1.0.0/16"}]}]"#;
        let dir = StateDir::empty()
            .file("node.yaml", &config)
            .file("g.json", NODE_GROUP)
            .file("two.json", &group("sg-0two", two, "[]"));
        dir.error(&[
            "two.json",
            "SecurityGroup sg-0two",
            "IpPermissions",
            "2 IPv4 ingress rules",
        ]);
    }

    #[test]
    fn without_a_node_the_rest_is_still_checked() {
        let dir = StateDir::empty().file(
            "g.json",
            &group(
                "sg-0a",
                r#"[{"IpProtocol": "-1", "PrefixListIds": [{"PrefixListId": "pl-0b"}]}]"#,
                "[]",
            ),
        );
        let errors = dir.errors();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors.iter().any(|e| e.contains("NodeConfig: missing")));
        assert!(errors.iter().any(|e| e.contains("pl-0b is not defined")));
    }

    #[test]
    fn the_bundled_example() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/state");
        let model = crate::source::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(model.node.name, NODE);
        assert_eq!(model.node.trunk_interface, "eth1");
        let pods: Vec<_> = model
            .pods
            .iter()
            .map(|p| (p.vlan, p.key(), p.groups.clone()))
            .collect();
        let web = "sg-0web00000000000001".to_string();
        let db_client = "sg-0dbc00000000000001".to_string();
        let ipsec = "sg-0vpn00000000000001".to_string();
        assert_eq!(
            pods,
            [
                (1, "shop/web-6f7c9d8b5-x2x7q".to_string(), vec![web.clone()]),
                (
                    2,
                    "shop/orders-5b8d7c6f4-k9m2p".into(),
                    vec![db_client.clone()]
                ),
                (
                    4,
                    "shop/payments-7c9f8d6b5-z8w4n".into(),
                    vec![db_client.clone(), ipsec]
                ),
            ]
        );
        assert_eq!(model.groups.len(), 6);
        assert_eq!(model.prefix_lists["pl-0partner000000001"].len(), 2);
        let web_group = &model.groups[&web];
        assert_eq!((web_group.ingress.len(), web_group.egress.len()), (6, 6));
        assert!(
            model
                .groups
                .values()
                .flat_map(|g| &g.ingress)
                .any(|r| r.l4 == crate::model::L4Match::Protocol(50))
        );
        assert!(model.groups["sg-0rds00000000000001"].egress.is_empty());
        assert_eq!(
            model.members[&web],
            cidrs(&[
                "10.0.1.101",
                "2600:1f18:4a3:6901:8a2f::1",
                "10.0.2.101",
                "2600:1f18:4a3:6902:5c1e::1"
            ])
        );
        assert_eq!(
            model.members["sg-0rds00000000000001"],
            cidrs(&["10.0.3.25"])
        );
        assert_eq!(
            model.members["sg-0alb00000000000001"],
            cidrs(&["10.0.101.17", "10.0.102.33", "2600:1f18:4a3:6965::11"])
        );
        assert_eq!(
            model.members["sg-0node0000000000001"],
            cidrs(&[
                "10.0.1.10",
                "10.0.1.31",
                "10.0.1.57",
                "10.0.2.20",
                "10.0.2.44"
            ])
        );
        assert_eq!(
            model.node_local,
            ips(&[
                "10.0.1.10",
                "10.0.1.31",
                "10.0.1.57",
                "10.0.1.101",
                "10.0.1.102",
                "10.0.1.104",
                "2600:1f18:4a3:6901:8a2f::1",
                "2600:1f18:4a3:6901:8a2f::4",
            ])
        );
    }
}
