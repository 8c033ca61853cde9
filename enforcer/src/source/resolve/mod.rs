//! From the objects of a state directory to this node's model: SGP matching gives
//! each pod its groups, pods of this node become branch pods, and groups get members.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::model::sgp::{self, Labels};
use crate::model::{
    BranchPod, Cidr, ClusterFacts, Direction, EnforcingAction, Finding, FindingKind, GroupId,
    GroupsSource, Model, NodeConfig, PodFacts, QuarantineCause, UnknownVlanAction,
};
use crate::source::state::{
    ACTION_ANNOTATION, BranchEni, Inventory, Located, NetworkInterface, Pod, Reference, StateError,
    Target, rule_counts,
};

/// Resolves the inventory. The state is refused (every such error returned, in
/// file order) only when the node itself cannot be known: a file that cannot be
/// read or parsed, an object of no known kind or without a name, the NodeConfig.
/// Anything else is isolated at the object (docs/isolation.md): a finding in the
/// model, the object set aside, and a pod whose groups cannot be known quarantined.
pub(crate) fn resolve(dir: &Path, inventory: Inventory) -> Result<Model, Vec<StateError>> {
    let Inventory {
        mut errors,
        skipped,
        groups,
        interfaces,
        prefix_lists,
        pods,
        service_accounts,
        policies,
        node_configs,
        references,
    } = inventory;
    let node = node_config(dir, node_configs, &mut errors);
    let Some(node) = node.filter(|_| errors.is_empty()) else {
        // Refused: every object's problems too, so that one pass shows them all.
        fn problems<T>(objects: &[Located<T>]) -> impl Iterator<Item = StateError> + '_ {
            objects.iter().flat_map(|o| o.problems.iter().cloned())
        }
        errors.extend(skipped);
        errors.extend(problems(&groups));
        errors.extend(problems(&interfaces));
        errors.extend(problems(&prefix_lists));
        errors.extend(problems(&service_accounts));
        errors.extend(problems(&policies));
        errors.extend(problems(&pods));
        for pod in &pods {
            errors.extend(
                pod.item
                    .unreadable_branch
                    .iter()
                    .flat_map(|b| b.problems.clone()),
            );
            errors.extend(pod.item.unreadable_action.iter().cloned());
        }
        return Err(in_file_order(errors));
    };
    let mut findings = Findings::default();
    for error in skipped {
        findings.push(FindingKind::Skipped, error);
    }
    // Every group read, sound or not: the ENI data says who carries it.
    let read_groups: BTreeSet<GroupId> = groups.iter().map(|g| g.item.id.clone()).collect();
    let prefix_lists = findings.sound(
        unique(prefix_lists, |(id, _)| id.clone()),
        "the prefix list is set aside: groups whose rules name it are set aside too",
    );
    let mut groups = findings.sound(
        unique(groups, |g| g.id.clone()),
        "the group is set aside: pods that carry it are quarantined",
    );
    // A group whose rules name a prefix list the state lacks cannot be evaluated.
    for reference in &references {
        let Reference { target, id, field } = &reference.item;
        if *target == Target::PrefixList && !prefix_lists.contains_key(id) {
            // Only groups' rules name prefix lists: the object is `SecurityGroup <id>`.
            let group = reference.object.strip_prefix("SecurityGroup ");
            if group.is_some_and(|group| groups.remove(group).is_some()) {
                let message = format!(
                    "prefix list {id} is not defined (no file has PrefixListId {id}): the \
                     group is set aside, pods that carry it are quarantined"
                );
                findings.push(
                    FindingKind::Skipped,
                    error(reference, Some(field.clone()), message),
                );
            }
        }
    }
    for reference in &references {
        let Reference { target, id, field } = &reference.item;
        if *target == Target::Group && !groups.contains_key(id) {
            let message = if reference.object == "NodeConfig" {
                format!(
                    "security group {id} is not defined: the node's groups are unknown, pods \
                     that need them are quarantined"
                )
            } else {
                format!(
                    "security group {id} is not defined (EC2 does not list it, or not yet): \
                     pods this policy gives it are quarantined until it is"
                )
            };
            findings.push(
                FindingKind::Warning,
                error(reference, Some(field.clone()), message),
            );
        }
    }
    // Rules may reference groups the state does not define (EC2 accepts
    // them): each is a warning, and matches the members the ENI data lists.
    let unknown: Vec<&Located<Reference>> = references
        .iter()
        .filter(|r| r.item.target == Target::ReferencedGroup && !read_groups.contains(&r.item.id))
        .collect();
    for group in groups.values() {
        check_rule_quota(group, node.max_rules_per_group, &mut findings);
    }
    let interfaces = findings.sound(
        unique(interfaces, |eni| eni.id.clone()),
        "the interface is set aside: its addresses are members of no group",
    );
    let (accounts, unreadable_accounts) = findings.split(
        unique(service_accounts, |a| (a.namespace.clone(), a.name.clone())),
        "the service account is set aside: pods it runs whose groups come from policies are \
         quarantined",
    );
    let (policies, unreadable_policies) = findings.split(
        unique(policies, |p| (p.namespace.clone(), p.name.clone())),
        "the policy is set aside: pods it selects whose groups come from policies are \
         quarantined",
    );
    // A completed pod's branch ENI, addresses and VLAN are released.
    let pods: Vec<Located<Pod>> = pods.into_iter().filter(|p| !p.item.completed).collect();
    let pods = unique(pods, |p| (p.namespace.clone(), p.name.clone()));

    let policies: Vec<_> = policies.values().map(|p| &p.item).collect();
    let unreadable_policies: Vec<_> = unreadable_policies.values().map(|p| &p.item).collect();
    let no_labels = Labels::new();
    // What the policies say of each pod, once: the policies that select it, and
    // whether something that might select it cannot be read.
    let selection = |pod: &Pod| -> Selection<'_> {
        let account = (pod.namespace.clone(), pod.service_account.clone());
        let account_labels = accounts
            .get(&account)
            .map_or(&no_labels, |a| &a.item.labels);
        let unreadable_account = unreadable_accounts.contains_key(&account);
        let unreadable = unreadable_policies
            .iter()
            .find(|p| p.selectors_match(&pod.namespace, &pod.labels, account_labels));
        let uncertainty = if let Some(policy) = unreadable {
            Some(format!(
                "SecurityGroupPolicy {}/{} selects it and cannot be read",
                policy.namespace, policy.name
            ))
        } else if unreadable_account {
            Some(format!(
                "its ServiceAccount {}/{} cannot be read",
                pod.namespace, pod.service_account
            ))
        } else {
            None
        };
        Selection {
            matched: sgp::matching(
                policies.iter().copied(),
                &pod.namespace,
                &pod.labels,
                account_labels,
            ),
            uncertainty,
        }
    };
    // Only groups that are read or referenced by a rule collect members.
    let mut members: BTreeMap<GroupId, BTreeSet<Cidr>> = read_groups
        .iter()
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
    let on_node = |pod: &Pod| pod.node_name.as_deref() == Some(node.name.as_str());
    // Each node's own addresses: those of its host-network pods.
    let mut node_ips: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    for pod in pods.values().filter(|p| p.is_sound()).map(|p| &p.item) {
        if let (true, Some(name)) = (pod.host_network, pod.node_name.as_deref()) {
            node_ips.entry(name).or_default().extend(&pod.ips);
        }
    }
    add_members(
        &node.primary_security_groups,
        &mut node.primary_ips.iter().map(|&ip| Cidr::host(ip)),
    );
    let mut node_local: BTreeSet<IpAddr> = node.primary_ips.iter().copied().collect();
    let selections: BTreeMap<(String, String), Selection> = pods
        .iter()
        .filter(|(_, p)| p.is_sound() && !p.item.host_network)
        .map(|(key, p)| (key.clone(), selection(&p.item)))
        .collect();
    let cluster = ClusterFacts {
        dns_endpoints: pods
            .values()
            .filter(|p| p.is_sound())
            .map(|p| &p.item)
            .filter(|p| p.labels.get("k8s-app").is_some_and(|app| app == "kube-dns"))
            .flat_map(|p| p.ips.iter().copied())
            .collect(),
        idle_policies: policies
            .iter()
            .filter(|policy| {
                !selections.values().any(|s| {
                    s.matched
                        .iter()
                        .any(|m| (&m.namespace, &m.name) == (&policy.namespace, &policy.name))
                })
            })
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
        awaiting_branch: pods
            .iter()
            .filter(|(key, p)| {
                on_node(&p.item)
                    && p.item.branch.is_none()
                    && p.item.unreadable_branch.is_none()
                    && selections.get(*key).is_some_and(|s| !s.matched.is_empty())
            })
            .map(|(_, p)| p.item.key())
            .collect(),
        pods_on_node: pods.values().filter(|p| on_node(&p.item)).count(),
    };
    let mut vlans: BTreeMap<u16, Vec<(String, PathBuf)>> = BTreeMap::new();
    let mut branch_pods = Vec::new();
    // Pods of this node to quarantine once the model is built, by key.
    let mut held: Vec<(String, PathBuf, String, QuarantineCause)> = Vec::new();
    for (key, located) in &pods {
        let pod = &located.item;
        let here = on_node(pod);
        if here && !pod.host_network {
            findings.extend(
                FindingKind::Ignored,
                &pod.unreadable_action,
                "the annotation is ignored",
            );
        }
        if !located.is_sound() || pod.unreadable_branch.is_some() {
            let vlan = pod
                .branch
                .as_ref()
                .map(|b| b.vlan)
                .or_else(|| pod.unreadable_branch.as_ref().and_then(|b| b.vlan));
            let problems = located
                .problems
                .iter()
                .chain(pod.unreadable_branch.iter().flat_map(|b| &b.problems));
            let reason = problems
                .clone()
                .map(|p| match &p.field {
                    Some(field) => format!("{field}: {}", p.message),
                    None => p.message.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ");
            match (here && !pod.host_network, vlan) {
                (true, Some(vlan)) => {
                    // Quarantined on the VLAN it claims, with no address and no group.
                    node_local.extend(pod.branch.iter().flat_map(|b| b.addresses()));
                    vlans
                        .entry(vlan)
                        .or_default()
                        .push((pod.key(), located.file.clone()));
                    branch_pods.push(branch_pod(pod, vlan, None, &node));
                    held.push((
                        pod.key(),
                        located.file.clone(),
                        reason,
                        QuarantineCause::Pod,
                    ));
                }
                (true, None) if pod.unreadable_branch.is_some() => findings.push(
                    FindingKind::Quarantined,
                    error(
                        located,
                        None,
                        format!(
                            "{reason}: the pod's VLAN is unknown, its frames get the node's \
                             unknownVlan action ({})",
                            match node.unknown_vlan {
                                UnknownVlanAction::Drop => "drop",
                                UnknownVlanAction::Pass => "pass",
                            }
                        ),
                    ),
                ),
                _ => {
                    let kind = if here {
                        FindingKind::Skipped
                    } else {
                        FindingKind::Ignored
                    };
                    findings.extend(
                        kind,
                        problems,
                        "the pod is set aside (its addresses are members of no group through it)",
                    );
                }
            }
            continue;
        }
        if here {
            node_local.extend(pod.ips.iter().copied());
            node_local.extend(pod.branch.iter().flat_map(|b| b.addresses()));
        }
        let Some(branch) = &pod.branch else {
            // Without a branch ENI a pod uses an address of one of its node's
            // ENIs and carries that ENI's groups: the ENI data says which. On
            // this node, an address no ENI lists is on the primary ENI that the
            // NodeConfig describes. A pod of another node is a member only
            // through the ENI data; host-network pods are their node itself.
            if here && !pod.host_network {
                let unlisted = pod.ips.iter().filter(|&&ip| !held_by_an_eni(ip));
                add_members(
                    &node.primary_security_groups,
                    &mut unlisted.map(|&ip| Cidr::host(ip)),
                );
            }
            continue;
        };
        let Some(Selection {
            matched,
            uncertainty,
        }) = selections.get(key)
        else {
            continue;
        };
        let mut pod_groups = sgp::union_of_groups(matched);
        if pod_groups.is_empty() {
            // No policy matched: the branch ENI carries its node's instance
            // groups, this node's from the NodeConfig, another's from the ENI
            // data (its primary ENI), or none known.
            pod_groups = if here {
                node.primary_security_groups.clone()
            } else {
                pod.node_name
                    .as_deref()
                    .and_then(|name| instance_groups(name, &interfaces, &node_ips))
                    .unwrap_or_default()
            };
        }
        // A branch ENI the ENI data lists made its members above, with the
        // groups it really carries; otherwise the policies' groups are the best
        // known, unless something that may select the pod cannot be read.
        let branch_eni_groups = interfaces
            .get(&branch.eni_id)
            .map(|eni| eni.item.groups.clone());
        if branch_eni_groups.is_none() && uncertainty.is_none() {
            add_members(&pod_groups, &mut branch.addresses().map(Cidr::host));
        }
        if !here {
            continue;
        }
        let quota = node.max_groups_per_pod;
        if branch_eni_groups.is_none() {
            let over_quota = (pod_groups.len() > quota).then(|| {
                let from = if matched.is_empty() {
                    "the node's primarySecurityGroups".to_string()
                } else {
                    let names: Vec<_> = matched.iter().map(|p| p.name.as_str()).collect();
                    format!("SecurityGroupPolicies {}", names.join(", "))
                };
                format!(
                    "{} security groups ({}) from {from}: over the quota of {quota} per branch \
                     ENI (maxSecurityGroupsPerPod), so EC2 cannot have given them all",
                    pod_groups.len(),
                    pod_groups.join(", "),
                )
            });
            if let Some(reason) = uncertainty.clone().or(over_quota) {
                held.push((
                    pod.key(),
                    located.file.clone(),
                    reason,
                    QuarantineCause::Policies,
                ));
            }
        } else if let Some(groups) = branch_eni_groups.as_ref().filter(|g| g.len() > quota) {
            let message = format!(
                "its branch ENI carries {} security groups, over maxSecurityGroupsPerPod ({quota}): \
                 the NodeConfig's quota is lower than the account's",
                groups.len()
            );
            findings.push(FindingKind::Warning, error(located, None, message));
        }
        vlans
            .entry(branch.vlan)
            .or_default()
            .push((pod.key(), located.file.clone()));
        let mut enforced = branch_pod(pod, branch.vlan, Some(branch), &node);
        // EC2 enforces the groups on the branch ENI, set when the pod was
        // created; the policies' groups are only a pod's until the agent pins them.
        enforced.groups = branch_eni_groups
            .clone()
            .unwrap_or_else(|| pod_groups.clone());
        enforced.facts = PodFacts {
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
            ..enforced.facts
        };
        match pod.action {
            Some(EnforcingAction::Audit) if !node.audit_namespaces.contains(&pod.namespace) => {
                let message = format!(
                    "{ACTION_ANNOTATION}: audit is ignored: the NodeConfig does not let pods of \
                     namespace {} choose it (auditNamespaces)",
                    pod.namespace
                );
                findings.push(FindingKind::Ignored, error(located, None, message));
            }
            Some(action) => enforced.action = action,
            None => {}
        }
        branch_pods.push(enforced);
    }
    // A VLAN two pods of this node claim: neither pod's groups can be trusted on it.
    for claimants in vlans.values().filter(|c| c.len() > 1) {
        for (pod, file) in claimants {
            let others: Vec<_> = claimants
                .iter()
                .filter(|(o, _)| o != pod)
                .map(|(o, _)| o.as_str())
                .collect();
            held.push((
                pod.clone(),
                file.clone(),
                format!("its VLAN is also claimed by pod {}", others.join(", ")),
                QuarantineCause::Pod,
            ));
        }
    }
    branch_pods.sort_by_key(|p| (p.vlan, p.key()));
    // One pod per VLAN in the kernel: the first claimant stands quarantined for all.
    branch_pods.dedup_by_key(|p| p.vlan);
    let warnings = unknown.into_iter().map(|reference| {
        let id = &reference.item.id;
        let known = members.get(id).map_or(0, BTreeSet::len);
        let message = format!(
            "security group {id} is not defined (another account's, a peered VPC's or a \
             deleted group?): EC2 accepts the rule; it matches the {known} member \
             address(es) and prefix(es) the ENI data lists"
        );
        error(reference, Some(reference.item.field.clone()), message)
    });
    for warning in warnings {
        findings.push(FindingKind::Warning, warning);
    }
    let nlb_groups = interfaces
        .values()
        .filter(|eni| eni.item.network_load_balancer)
        .flat_map(|eni| eni.item.groups.iter().cloned())
        .collect();
    let mut model = Model {
        node,
        groups: groups.into_iter().map(|(id, g)| (id, g.item)).collect(),
        prefix_lists: prefix_lists.into_values().map(|l| l.item).collect(),
        members,
        pods: branch_pods,
        node_local,
        findings: findings.0,
        nlb_groups,
        cluster,
    };
    for (key, file, reason, cause) in held {
        if let Some(index) = model.pods.iter().position(|p| p.key() == key) {
            model.quarantine(index, reason, cause);
        } else {
            // A claimant of a VLAN another pod stands for: reported, not enforced.
            model.findings.push(Finding {
                kind: FindingKind::Quarantined,
                at: StateError {
                    file,
                    object: format!("Pod {key}"),
                    field: None,
                    message: format!(
                        "not enforced (another claimant stands quarantined for the VLAN): {reason}"
                    ),
                },
            });
        }
    }
    quarantine_unknown_groups(&mut model);
    Ok(model)
}

/// Quarantines every pod of `model` that carries a group the model does not define
/// (and, in standard mode, every pod when one of the node's groups is undefined):
/// its rules cannot be known, so nothing of it may be allowed.
pub fn quarantine_unknown_groups(model: &mut Model) {
    let undefined = |ids: &[GroupId]| -> Vec<GroupId> {
        ids.iter()
            .filter(|id| !model.groups.contains_key(*id))
            .cloned()
            .collect()
    };
    let node_missing = match model.node.enforcing_mode {
        crate::model::EnforcingMode::Standard => undefined(&model.node.primary_security_groups),
        crate::model::EnforcingMode::Strict => Vec::new(),
    };
    let mut held = Vec::new();
    for (index, pod) in model.pods.iter().enumerate() {
        if pod.facts.quarantine.is_some() {
            continue;
        }
        let missing = undefined(&pod.groups);
        if pod.groups.len() > enforcer_common::MAX_GROUPS_PER_POD {
            let reason = format!(
                "{} security groups: more than a branch ENI carries ({})",
                pod.groups.len(),
                enforcer_common::MAX_GROUPS_PER_POD
            );
            held.push((index, reason, QuarantineCause::Pod));
        } else if !missing.is_empty() {
            let cause = match pod.facts.groups_source {
                GroupsSource::Policies => QuarantineCause::Policies,
                GroupsSource::BranchEni | GroupsSource::Pinned => QuarantineCause::Pod,
            };
            let reason = format!(
                "security group {} is not defined (EC2 does not list it, or not yet)",
                missing.join(", ")
            );
            held.push((index, reason, cause));
        } else if !node_missing.is_empty() {
            let reason = format!(
                "the node's security group {} is not defined (standard mode checks it too)",
                node_missing.join(", ")
            );
            held.push((index, reason, QuarantineCause::Pod));
        }
    }
    for (index, reason, cause) in held {
        model.quarantine(index, reason, cause);
    }
}

/// What the policies say of one pod.
struct Selection<'p> {
    matched: Vec<&'p crate::model::sgp::SecurityGroupPolicy>,
    /// Why its groups cannot be known from them, when they cannot.
    uncertainty: Option<String>,
}

/// The pod enforced on `vlan`, with no group yet: the caller gives it its groups.
fn branch_pod(pod: &Pod, vlan: u16, branch: Option<&BranchEni>, node: &NodeConfig) -> BranchPod {
    BranchPod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        vlan,
        eni_id: branch.map(|b| b.eni_id.clone()).unwrap_or_default(),
        mac: branch.map(|b| b.mac.clone()).unwrap_or_default(),
        ipv4: branch.and_then(|b| b.ipv4),
        ipv6: branch.and_then(|b| b.ipv6),
        subnet_v4: branch.and_then(|b| b.subnet_v4),
        subnet_v6: branch.and_then(|b| b.subnet_v6),
        groups: Vec::new(),
        mode: node.enforcing_mode,
        action: node.enforcing_action,
        facts: pod.facts.clone(),
    }
}

/// The findings of one resolution, in the order found.
#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, kind: FindingKind, at: StateError) {
        self.0.push(Finding { kind, at });
    }

    /// Each of `problems` as a finding of `kind`, with `what` after its message.
    fn extend<'e>(
        &mut self,
        kind: FindingKind,
        problems: impl IntoIterator<Item = &'e StateError>,
        what: &str,
    ) {
        for problem in problems {
            let message = format!("{}: {what}", problem.message);
            self.push(
                kind,
                StateError {
                    message,
                    ..problem.clone()
                },
            );
        }
    }

    /// The objects read whole; each other one is a finding (`what` says what follows).
    fn sound<K: Ord, T>(
        &mut self,
        objects: BTreeMap<K, Located<T>>,
        what: &str,
    ) -> BTreeMap<K, Located<T>> {
        self.split(objects, what).0
    }

    /// The objects read whole, and those that are not (each a finding).
    fn split<K: Ord, T>(
        &mut self,
        objects: BTreeMap<K, Located<T>>,
        what: &str,
    ) -> (BTreeMap<K, Located<T>>, BTreeMap<K, Located<T>>) {
        let (sound, unsound): (BTreeMap<_, _>, BTreeMap<_, _>) =
            objects.into_iter().partition(|(_, o)| o.is_sound());
        for object in unsound.values() {
            self.extend(FindingKind::Skipped, &object.problems, what);
        }
        (sound, unsound)
    }
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

/// Objects by key. A second object with a key already seen makes the first
/// unsound: which of the two is right cannot be known.
fn unique<T, K: Ord>(items: Vec<Located<T>>, key: impl Fn(&T) -> K) -> BTreeMap<K, Located<T>> {
    let mut map: BTreeMap<K, Located<T>> = BTreeMap::new();
    for item in items {
        match map.entry(key(&item.item)) {
            Entry::Vacant(slot) => {
                slot.insert(item);
            }
            Entry::Occupied(mut first) => {
                let message = format!("defined twice: also in {}", first.get().file.display());
                first.get_mut().problems.push(error(&item, None, message));
            }
        }
    }
    map
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
/// A group over it exists, so the account's quota is higher: a warning.
fn check_rule_quota(
    group: &Located<crate::model::SecurityGroup>,
    max: usize,
    findings: &mut Findings,
) {
    for (direction, field) in [
        (Direction::Ingress, "IpPermissions"),
        (Direction::Egress, "IpPermissionsEgress"),
    ] {
        let (v4, v6) = rule_counts(&group.item, direction);
        for (count, family) in [(v4, "IPv4"), (v6, "IPv6")] {
            if count > max {
                let message = format!(
                    "{count} {family} {} rules: over the quota of {max} per group and direction \
                     (maxRulesPerGroup); EC2 would refuse the group at that quota",
                    direction.as_str()
                );
                findings.push(
                    FindingKind::Warning,
                    error(group, Some(field.to_string()), message),
                );
            }
        }
    }
}

#[cfg(test)]
mod hostile;
#[cfg(test)]
mod tests;
