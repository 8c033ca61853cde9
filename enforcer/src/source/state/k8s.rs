//! Kubernetes objects as `kubectl get -o yaml|json` prints them (Pod, ServiceAccount,
//! SecurityGroupPolicy) and this node's `NodeConfig`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::reader::{Field, Invalid, Problems};
use super::{Inventory, Located, Reference, Target};
use crate::model::sgp::{LabelSelector, Labels, Operator, Requirement, SecurityGroupPolicy};
use crate::model::{
    Cidr, ConntrackTimeouts, EnforcingAction, EnforcingMode, NodeConfig, PodFacts, Probe,
    UnknownVlanAction,
};

/// The annotation the VPC resource controller writes on a pod with a branch ENI.
pub(crate) const POD_ENI_ANNOTATION: &str = "vpc.amazonaws.com/pod-eni";
/// The annotation that audits (or enforces) one pod, whatever the NodeConfig says.
pub const ACTION_ANNOTATION: &str = "enforcer.sgp.dev/action";

/// A pod, reduced to what group matching, membership and enforcement need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub service_account: String,
    pub host_network: bool,
    /// `status.podIP` and `status.podIPs`.
    pub ips: Vec<IpAddr>,
    pub branch: Option<BranchEni>,
    /// The [`ACTION_ANNOTATION`], when set.
    pub action: Option<EnforcingAction>,
    /// What `enforcer lint` looks at (the policies are filled in by resolution).
    pub facts: PodFacts,
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Element 0 of the `vpc.amazonaws.com/pod-eni` annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BranchEni {
    pub eni_id: String,
    pub mac: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub vlan: u16,
    pub subnet_v4: Option<Cidr>,
    pub subnet_v6: Option<Cidr>,
}

impl BranchEni {
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.ipv4.map(IpAddr::V4);
        v4.into_iter().chain(self.ipv6.map(IpAddr::V6))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
}

/// `metadata.namespace` (default `default`) and `metadata.name`.
fn namespaced_name(root: &Field, problems: &mut Problems) -> (String, Option<String>) {
    let metadata = root.get("metadata");
    let namespace = metadata
        .as_ref()
        .and_then(|m| m.get("namespace"))
        .and_then(|f| problems.ok(f.name().map(str::to_string)))
        .unwrap_or_else(|| "default".to_string());
    let name = problems.ok(root
        .require("metadata")
        .and_then(|m| m.require("name"))
        .and_then(|f| f.name().map(str::to_string)));
    (namespace, name)
}

fn object_name(kind: &str, namespace: &str, name: Option<&str>) -> String {
    format!("{kind} {namespace}/{}", name.unwrap_or("(unnamed)"))
}

fn labels(root: &Field, problems: &mut Problems) -> Labels {
    root.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|f| problems.ok(f.string_map()))
        .unwrap_or_default()
}

pub(crate) fn pod(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let (namespace, name) = namespaced_name(&root, &mut problems);
    let metadata = root.get("metadata");
    let uid = metadata
        .as_ref()
        .and_then(|m| m.get("uid"))
        .and_then(|f| problems.ok(f.str().map(str::to_string)))
        .unwrap_or_default();
    let labels = labels(&root, &mut problems);
    let annotations = metadata
        .as_ref()
        .and_then(|m| m.get("annotations"))
        .and_then(|a| problems.ok(a.entries()))
        .unwrap_or_default();
    let annotation = |name: &str| {
        annotations
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, f)| f.clone())
    };
    let branch = annotation(POD_ENI_ANNOTATION).and_then(|f| branch_eni(&f, &mut problems));
    let action = annotation(ACTION_ANNOTATION)
        .and_then(|f| problems.ok(f.str().and_then(|s| action(s, &f))));
    let spec = root.get("spec");
    let spec_field = |key: &str| spec.as_ref().and_then(|s| s.get(key));
    let node_name = spec_field("nodeName").and_then(|f| problems.ok(f.name().map(str::to_string)));
    let service_account = spec_field("serviceAccountName")
        .and_then(|f| problems.ok(f.name().map(str::to_string)))
        .unwrap_or_else(|| "default".to_string());
    let host_network = spec_field("hostNetwork")
        .and_then(|f| problems.ok(f.bool()))
        .unwrap_or(false);
    let facts = spec.as_ref().map(pod_facts).unwrap_or_default();
    let status = root.get("status");
    let mut ip_fields: Vec<Field> = status.iter().filter_map(|s| s.get("podIP")).collect();
    let listed = status.as_ref().and_then(|s| s.get("podIPs"));
    for entry in listed
        .and_then(|f| problems.ok(f.items()))
        .unwrap_or_default()
    {
        ip_fields.extend(problems.ok(entry.require("ip")));
    }
    let mut ips = Vec::new();
    for field in ip_fields {
        if let Some(ip) = problems.ok(field.ip())
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    let object = object_name("Pod", &namespace, name.as_deref());
    problems.report(file, &object, &mut inventory.errors);
    if let Some(name) = name {
        let pod = Pod {
            namespace,
            name,
            uid,
            labels,
            node_name,
            service_account,
            host_network,
            ips,
            branch,
            action,
            facts,
        };
        inventory.pods.push(Located::new(file, object, pod));
    }
}

/// Probes, DNS servers and grace period, read leniently: enforcement does not
/// use them, so a value `lint` cannot read is left out, never an error.
fn pod_facts(spec: &Field) -> PodFacts {
    let mut probes = Vec::new();
    for container in spec
        .get("containers")
        .and_then(|c| c.items().ok())
        .unwrap_or_default()
    {
        let name = container
            .get("name")
            .and_then(|n| n.str().ok())
            .unwrap_or_default()
            .to_string();
        let named_port = |wanted: &str| {
            container
                .get("ports")
                .and_then(|p| p.items().ok())
                .unwrap_or_default()
                .into_iter()
                .find(|p| p.get("name").and_then(|n| n.str().ok()) == Some(wanted))
                .and_then(|p| p.get("containerPort")?.int_in::<u16>(1..=65535).ok())
        };
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(probe) = container.get(kind) else {
                continue;
            };
            let port = ["httpGet", "tcpSocket", "grpc"]
                .into_iter()
                .find_map(|how| probe.get(how)?.get("port"))
                .and_then(|port| match port.value.as_str() {
                    Some(named) => named_port(named),
                    None => port.int_in::<u16>(1..=65535).ok(),
                });
            if let Some(port) = port {
                probes.push(Probe {
                    kind,
                    container: name.clone(),
                    port,
                });
            }
        }
    }
    PodFacts {
        groups_source: Default::default(),
        policy_groups: Vec::new(),
        probes,
        dns_nameservers: spec
            .get("dnsConfig")
            .and_then(|d| d.get("nameservers"))
            .and_then(|n| n.items().ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.ip().ok())
            .collect(),
        termination_grace_seconds: spec
            .get("terminationGracePeriodSeconds")
            .and_then(|g| g.int().ok()),
        policies: Vec::new(),
    }
}

/// The annotation's JSON array, element 0; field names are matched without
/// regard to case, as both `vlanId` and `vlanID` occur in the wild.
fn branch_eni(annotation: &Field, problems: &mut Problems) -> Option<BranchEni> {
    let text = problems.ok(annotation.str())?;
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            problems.push(Invalid::new(&annotation.path, format!("not JSON: {e}")));
            return None;
        }
    };
    let list = Field {
        value: &value,
        path: annotation.path.clone(),
    };
    let items = problems.ok(list.items())?;
    let Some(eni) = items.first() else {
        problems.push(Invalid::new(&list.path, "empty list: no branch ENI"));
        return None;
    };
    let entries = problems.ok(eni.entries())?;
    let get = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, f)| f.clone())
    };
    let required =
        |name: &str| get(name).ok_or_else(|| Invalid::new(&eni.path_of(name), "missing"));
    // An empty string is how the controller leaves out the family a pod lacks.
    let optional = |name: &str| get(name).filter(|f| f.value.as_str() != Some(""));
    let eni_id = problems.ok(required("eniId").and_then(|f| f.name().map(str::to_string)));
    let mac = problems.ok(required("ifAddress").and_then(|f| mac_address(&f)));
    let vlan = problems.ok(required("vlanId").and_then(|f| f.int_in::<u16>(1..=4094)));
    let ipv4 = optional("privateIp").and_then(|f| problems.ok(ipv4(&f)));
    let ipv6 = optional("ipv6Addr").and_then(|f| problems.ok(ipv6(&f)));
    let subnet = |name, v6, problems: &mut Problems| {
        let field = optional(name)?;
        let cidr = problems.ok(field.cidr())?;
        if cidr.is_ipv4() == v6 {
            problems.push(Invalid::new(
                &field.path,
                format!("{cidr} is of the wrong address family"),
            ));
            return None;
        }
        Some(cidr)
    };
    let subnet_v4 = subnet("subnetCidr", false, problems);
    let subnet_v6 = subnet("subnetV6Cidr", true, problems);
    if optional("privateIp").is_none() && optional("ipv6Addr").is_none() {
        problems.push(Invalid::new(
            &eni.path,
            "no address: privateIp and ipv6Addr are both empty",
        ));
    }
    Some(BranchEni {
        eni_id: eni_id?,
        mac: mac?,
        ipv4,
        ipv6,
        vlan: vlan?,
        subnet_v4,
        subnet_v6,
    })
}

fn ipv4(field: &Field) -> Result<Ipv4Addr, Invalid> {
    match field.ip()? {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => Err(Invalid::new(
            &field.path,
            format!("{ip} is not an IPv4 address"),
        )),
    }
}

fn ipv6(field: &Field) -> Result<Ipv6Addr, Invalid> {
    match field.ip()? {
        IpAddr::V6(ip) => Ok(ip),
        IpAddr::V4(ip) => Err(Invalid::new(
            &field.path,
            format!("{ip} is not an IPv6 address"),
        )),
    }
}

/// `aa:bb:cc:dd:ee:ff`, normalised to lower case.
fn mac_address(field: &Field) -> Result<String, Invalid> {
    let mac = field.name()?;
    let octets: Vec<&str> = mac.split(':').collect();
    let valid = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return Err(Invalid::new(
            &field.path,
            format!("{mac:?} is not a MAC address"),
        ));
    }
    Ok(mac.to_ascii_lowercase())
}

pub(crate) fn service_account(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let (namespace, name) = namespaced_name(&root, &mut problems);
    let labels = labels(&root, &mut problems);
    let object = object_name("ServiceAccount", &namespace, name.as_deref());
    problems.report(file, &object, &mut inventory.errors);
    if let Some(name) = name {
        let account = ServiceAccount {
            namespace,
            name,
            labels,
        };
        inventory
            .service_accounts
            .push(Located::new(file, object, account));
    }
}

pub(crate) fn security_group_policy(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let (namespace, name) = namespaced_name(&root, &mut problems);
    let mut references = Vec::new();
    let mut policy = SecurityGroupPolicy {
        namespace,
        name: name.clone().unwrap_or_default(),
        pod_selector: None,
        service_account_selector: None,
        group_ids: Vec::new(),
    };
    if let Some(spec) = problems.ok(root.require("spec")) {
        for unknown in
            spec.unknown_keys(&["podSelector", "serviceAccountSelector", "securityGroups"])
        {
            problems.push(unknown);
        }
        let selector = |key, problems: &mut Problems| {
            spec.get(key).and_then(|f| problems.ok(label_selector(&f)))
        };
        policy.pod_selector = selector("podSelector", &mut problems);
        policy.service_account_selector = selector("serviceAccountSelector", &mut problems);
        if let Some(groups) = spec.get("securityGroups") {
            for unknown in groups.unknown_keys(&["groupIds"]) {
                problems.push(unknown);
            }
            let ids = groups.get("groupIds").and_then(|f| problems.ok(f.items()));
            for field in ids.unwrap_or_default() {
                if let Some(id) = problems.ok(field.name()) {
                    references.push(Reference::new(Target::Group, id, &field.path));
                    policy.group_ids.push(id.to_string());
                }
            }
        }
    }
    let object = object_name("SecurityGroupPolicy", &policy.namespace, name.as_deref());
    problems.report(file, &object, &mut inventory.errors);
    inventory.add_references(file, &object, references);
    if name.is_some() {
        inventory.policies.push(Located::new(file, object, policy));
    }
}

/// A `LabelSelector`, with the API server's validation of expressions.
fn label_selector(field: &Field) -> Result<LabelSelector, Invalid> {
    if let Some(unknown) = field
        .unknown_keys(&["matchLabels", "matchExpressions"])
        .pop()
    {
        return Err(unknown);
    }
    let match_labels = match field.get("matchLabels") {
        Some(f) => f.string_map()?,
        None => Labels::new(),
    };
    let mut match_expressions = Vec::new();
    for expression in field
        .get("matchExpressions")
        .map(|f| f.items())
        .transpose()?
        .unwrap_or_default()
    {
        if let Some(unknown) = expression
            .unknown_keys(&["key", "operator", "values"])
            .pop()
        {
            return Err(unknown);
        }
        let key = expression.require("key")?.name()?.to_string();
        let operator_field = expression.require("operator")?;
        let operator = Operator::parse(operator_field.str()?).ok_or_else(|| {
            Invalid::new(
                &operator_field.path,
                "unknown operator (expected In, NotIn, Exists or DoesNotExist)",
            )
        })?;
        let values = match expression.get("values") {
            Some(f) => f
                .items()?
                .iter()
                .map(|v| v.str().map(str::to_string))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values == values.is_empty() {
            let message = if needs_values {
                "In and NotIn need at least one value"
            } else {
                "Exists and DoesNotExist take no values"
            };
            return Err(Invalid::new(&expression.path_of("values"), message));
        }
        match_expressions.push(Requirement {
            key,
            operator,
            values,
        });
    }
    Ok(LabelSelector {
        match_labels,
        match_expressions,
    })
}

const NODE_CONFIG_FIELDS: &[&str] = &[
    "maxFlowsPerPod",
    "maxFragmentsPerPod",
    "enforcingMode",
    "trunkInterface",
    "primaryInterface",
    "primaryIPs",
    "primarySecurityGroups",
    "vpcCidrs",
    "externalSnat",
    "excludeSnatCidrs",
    "snatPortRange",
    "unknownVlan",
    "connectionTracking",
    "instanceType",
    "serviceCidrs",
    "maxSecurityGroupsPerPod",
    "maxRulesPerGroup",
    "enforcingAction",
    "tcpEarlyDemuxDisabled",
];

/// EC2's hard limit on rules per group times groups per network interface.
const MAX_RULES_PER_INTERFACE: usize = 1000;

/// The `NodeConfig` (design.md): strict about unknown fields, since a typo
/// there would silently change what this node enforces.
pub(crate) fn node_config(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let mut references = Vec::new();
    let name = problems.ok(root
        .require("metadata")
        .and_then(|m| m.require("name"))
        .and_then(|f| f.name().map(str::to_string)));
    let config = problems
        .ok(root.require("spec"))
        .and_then(|spec| node_spec(&spec, name.clone()?, &mut problems, &mut references));
    let object = "NodeConfig".to_string();
    problems.report(file, &object, &mut inventory.errors);
    inventory.add_references(file, &object, references);
    inventory
        .node_configs
        .push(Located::new(file, object, config));
}

fn node_spec(
    spec: &Field,
    name: String,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> Option<NodeConfig> {
    for unknown in spec.unknown_keys(NODE_CONFIG_FIELDS) {
        problems.push(unknown);
    }
    let enforcing_mode = match spec.get("enforcingMode") {
        None => Some(EnforcingMode::Strict),
        Some(f) => problems.ok(f.str().and_then(|s| match s {
            "strict" => Ok(EnforcingMode::Strict),
            "standard" => Ok(EnforcingMode::Standard),
            _ => Err(Invalid::new(
                &f.path,
                format!("{s:?} is not strict or standard"),
            )),
        })),
    };
    let enforcing_action = match spec.get("enforcingAction") {
        None => Some(EnforcingAction::Enforce),
        Some(f) => problems.ok(f.str().and_then(|s| action(s, &f))),
    };
    let unknown_vlan = match spec.get("unknownVlan") {
        None => Some(UnknownVlanAction::Drop),
        Some(f) => problems.ok(f.str().and_then(|s| match s {
            "drop" => Ok(UnknownVlanAction::Drop),
            "pass" => Ok(UnknownVlanAction::Pass),
            _ => Err(Invalid::new(&f.path, format!("{s:?} is not drop or pass"))),
        })),
    };
    let interface = |key| interface_name(spec, key);
    let trunk_interface = problems.ok(interface("trunkInterface"));
    let primary_interface = problems.ok(interface("primaryInterface"));
    let primary_ips: Vec<IpAddr> = non_empty_list(spec, "primaryIPs", problems)
        .iter()
        .filter_map(|f| problems.ok(f.ip()))
        .collect();
    let mut primary_security_groups = Vec::new();
    for field in non_empty_list(spec, "primarySecurityGroups", problems) {
        if let Some(id) = problems.ok(field.name()) {
            references.push(Reference::new(Target::Group, id, &field.path));
            primary_security_groups.push(id.to_string());
        }
    }
    let vpc_cidrs: Vec<Cidr> = non_empty_list(spec, "vpcCidrs", problems)
        .iter()
        .filter_map(|f| problems.ok(f.cidr()))
        .collect();
    let external_snat = match spec.get("externalSnat") {
        None => Some(false),
        Some(f) => problems.ok(f.bool()),
    };
    let exclude_snat_cidrs = optional_cidrs(spec, "excludeSnatCidrs", problems);
    let exempt = vpc_cidrs
        .iter()
        .chain(&exclude_snat_cidrs)
        .filter(|c| c.is_ipv4())
        .count();
    if exempt > enforcer_common::MAX_NAT_EXEMPT {
        problems.push(Invalid::new(
            &spec.path_of("excludeSnatCidrs"),
            format!(
                "{exempt} IPv4 CIDRs in vpcCidrs and excludeSnatCidrs; the kernel holds {}",
                enforcer_common::MAX_NAT_EXEMPT
            ),
        ));
    }
    let snat_port_range = match spec.get("snatPortRange") {
        None => Some(crate::model::DEFAULT_SNAT_PORT_RANGE),
        Some(f) => problems.ok(f.str().and_then(|s| port_range(s, &f))),
    };
    let tcp_early_demux_disabled = match spec.get("tcpEarlyDemuxDisabled") {
        None => Some(false),
        Some(f) => problems.ok(f.bool()),
    };
    let instance_type = match spec.get("instanceType") {
        None => Some(None),
        Some(f) => problems.ok(f.name().and_then(|t| match t.split_once('.') {
            Some((family, size)) if !family.is_empty() && !size.is_empty() => {
                Ok(Some(t.to_string()))
            }
            _ => Err(Invalid::new(
                &f.path,
                format!("{t:?} is not an instance type (family.size, e.g. m5.large)"),
            )),
        })),
    };
    let defaults =
        ConntrackTimeouts::defaults_for(instance_type.as_ref().and_then(Option::as_deref));
    let connection_tracking = match spec.get("connectionTracking") {
        None => Some(defaults),
        Some(f) => conntrack(&f, defaults, problems),
    };
    let service_cidrs = optional_cidrs(spec, "serviceCidrs", problems);
    let bounded = |key, range, default, problems: &mut Problems| match spec.get(key) {
        None => Some(default),
        Some(f) => problems.ok(f.int_in::<usize>(range)),
    };
    let max_groups_per_pod = bounded("maxSecurityGroupsPerPod", 1..=16, 5, problems);
    let max_rules_per_group = bounded("maxRulesPerGroup", 1..=1000, 60, problems);
    let allowance = |key, max: u32, default: u32, problems: &mut Problems| match spec.get(key) {
        None => Some(default),
        Some(f) => problems.ok(f.int_in::<u32>(1..=i64::from(max))),
    };
    let max_flows_per_pod = allowance(
        "maxFlowsPerPod",
        enforcer_common::MAX_FLOWS,
        enforcer_common::DEFAULT_MAX_FLOWS_PER_POD,
        problems,
    );
    let max_fragments_per_pod = allowance(
        "maxFragmentsPerPod",
        enforcer_common::MAX_FRAGMENTED_DATAGRAMS,
        enforcer_common::DEFAULT_MAX_FRAGMENTS_PER_POD,
        problems,
    );
    if let (Some(groups), Some(rules)) = (max_groups_per_pod, max_rules_per_group)
        && groups * rules > MAX_RULES_PER_INTERFACE
    {
        problems.push(Invalid::new(
            &spec.path_of("maxRulesPerGroup"),
            format!(
                "{rules} rules per group × {groups} groups per pod exceeds EC2's limit of {MAX_RULES_PER_INTERFACE}"
            ),
        ));
    }
    Some(NodeConfig {
        name,
        enforcing_mode: enforcing_mode?,
        enforcing_action: enforcing_action?,
        trunk_interface: trunk_interface?,
        primary_interface: primary_interface?,
        primary_ips,
        primary_security_groups,
        vpc_cidrs,
        external_snat: external_snat?,
        exclude_snat_cidrs,
        snat_port_range: snat_port_range?,
        unknown_vlan: unknown_vlan?,
        connection_tracking: connection_tracking?,
        instance_type: instance_type?,
        service_cidrs,
        max_groups_per_pod: max_groups_per_pod?,
        max_rules_per_group: max_rules_per_group?,
        tcp_early_demux_disabled: tcp_early_demux_disabled?,
        max_flows_per_pod: max_flows_per_pod?,
        max_fragments_per_pod: max_fragments_per_pod?,
    })
}

/// An optional list of CIDRs (empty when absent); each bad one is a problem.
fn optional_cidrs(spec: &Field, key: &str, problems: &mut Problems) -> Vec<Cidr> {
    match spec.get(key) {
        None => Vec::new(),
        Some(f) => problems
            .ok(f.items())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| problems.ok(c.cidr()))
            .collect(),
    }
}

/// `snatPortRange`: `"FROM-TO"`, unprivileged ports, FROM <= TO.
fn port_range(value: &str, field: &Field) -> Result<std::ops::RangeInclusive<u16>, Invalid> {
    let parsed = value.split_once('-').and_then(|(from, to)| {
        Some((
            from.trim().parse::<u16>().ok()?,
            to.trim().parse::<u16>().ok()?,
        ))
    });
    match parsed {
        Some((from, to)) if (1024..=to).contains(&from) => Ok(from..=to),
        _ => Err(Invalid::new(
            &field.path,
            format!("{value:?} is not a port range FROM-TO with 1024 <= FROM <= TO <= 65535"),
        )),
    }
}

/// `enforce` or `audit` (NodeConfig `enforcingAction`, the pod's action annotation).
fn action(value: &str, field: &Field) -> Result<EnforcingAction, Invalid> {
    EnforcingAction::parse(value)
        .ok_or_else(|| Invalid::new(&field.path, format!("{value:?} is not enforce or audit")))
}

fn non_empty_list<'v>(spec: &Field<'v>, key: &str, problems: &mut Problems) -> Vec<Field<'v>> {
    match problems.ok(spec.require(key).and_then(|f| f.items())) {
        Some(items) if items.is_empty() => {
            problems.push(Invalid::new(&spec.path_of(key), "needs at least one entry"));
            Vec::new()
        }
        items => items.unwrap_or_default(),
    }
}

/// A Linux interface name (`dev_valid_name`): 1 to 15 bytes, no `/`, `:` or space.
fn interface_name(spec: &Field, key: &str) -> Result<String, Invalid> {
    let field = spec.require(key)?;
    let name = field.name()?;
    let valid = name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !valid {
        return Err(Invalid::new(
            &field.path,
            format!("{name:?} is not an interface name"),
        ));
    }
    Ok(name.to_string())
}

/// EC2 `ConnectionTrackingSpecification` timeouts, within EC2's ranges;
/// those not given take `defaults` (the instance type's).
fn conntrack(
    field: &Field,
    defaults: ConntrackTimeouts,
    problems: &mut Problems,
) -> Option<ConntrackTimeouts> {
    for unknown in field.unknown_keys(&["tcpEstablishedTimeout", "udpStreamTimeout", "udpTimeout"])
    {
        problems.push(unknown);
    }
    let mut timeout = |key, range, default| match field.get(key) {
        None => Some(default),
        Some(f) => problems.ok(f.int_in::<u32>(range)),
    };
    let tcp_established = timeout(
        "tcpEstablishedTimeout",
        60..=432_000,
        defaults.tcp_established,
    );
    let udp_stream = timeout("udpStreamTimeout", 60..=180, defaults.udp_stream);
    let udp = timeout("udpTimeout", 30..=60, defaults.udp);
    Some(ConntrackTimeouts {
        tcp_established: tcp_established?,
        udp_stream: udp_stream?,
        udp: udp?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GroupsSource;
    use crate::source::state::testdir::{NODE, NODE_CONFIG, NODE_GROUP, StateDir};

    /// A branch ENI on VLAN 7 whose ENI ID is `eni-0a`.
    const BRANCH_ENI: &str = r#"[{"eniId":"eni-0a","ifAddress":"0a:1b:2c:3d:4e:5f","privateIp":"10.0.1.101","vlanId":7,"subnetCidr":"10.0.1.0/24"}]"#;

    /// A SecurityGroupPolicy giving every pod of `shop` the node's group.
    const EVERYONE: &str = "apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: everyone, namespace: shop}
spec:
  podSelector: {}
  securityGroups: {groupIds: [sg-0node]}
";

    /// A pod of namespace `shop` on this node carrying the annotation `eni`.
    fn pod_with_eni(eni: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  uid: u-1\n  annotations:\n    vpc.amazonaws.com/pod-eni: '{eni}'\nspec:\n  nodeName: {NODE}\n"
        )
    }

    fn eni_error(eni: &str, parts: &[&str]) {
        let dir = StateDir::with_node().file("pod.yaml", &pod_with_eni(eni));
        let mut parts = parts.to_vec();
        parts.extend([
            "pod.yaml",
            "Pod shop/web",
            "metadata.annotations[\"vpc.amazonaws.com/pod-eni\"]",
        ]);
        dir.error(&parts);
    }

    #[test]
    fn the_pods_action_annotation_wins_over_the_node_configs() {
        const ENI: &str = r#"[{"eniId":"eni-0a","ifAddress":"0a:1b:2c:3d:4e:5f","privateIp":"10.0.1.101","vlanId":7}]"#;
        let annotated = |action: &str| {
            pod_with_eni(ENI).replace(
                "  annotations:\n",
                &format!("  annotations:\n    enforcer.sgp.dev/action: {action}\n"),
            )
        };
        let action = |node: &str, pod: &str| {
            StateDir::empty()
                .file("node.yaml", &format!("{NODE_CONFIG}{node}"))
                .file("g.json", NODE_GROUP)
                .file("pod.yaml", pod)
                .model()
                .pods[0]
                .action
        };
        let plain = pod_with_eni(ENI);
        assert_eq!(action("", &plain), EnforcingAction::Enforce);
        assert_eq!(
            action("  enforcingAction: audit\n", &plain),
            EnforcingAction::Audit
        );
        assert_eq!(action("", &annotated("audit")), EnforcingAction::Audit);
        assert_eq!(
            action("  enforcingAction: audit\n", &annotated("enforce")),
            EnforcingAction::Enforce
        );
        let dir = StateDir::with_node().file("pod.yaml", &annotated("Audit"));
        dir.error(&[
            "pod.yaml",
            "Pod shop/web",
            "metadata.annotations[\"enforcer.sgp.dev/action\"]",
            "\"Audit\" is not enforce or audit",
        ]);
    }

    #[test]
    fn branch_annotation_fields() {
        let eni = r#"[{"eniId":"eni-0a","ifAddress":"0A:1B:2C:3D:4E:5F","privateIp":"10.0.1.101","ipv6Addr":"2001:db8::65","vlanID":7,"subnetCidr":"10.0.1.0/24","subnetV6Cidr":"2001:db8::/64","associationID":"trunk-assoc-1"},{"eniId":"eni-ignored"}]"#;
        let model = StateDir::with_node()
            .file("pod.yaml", &pod_with_eni(eni))
            .model();
        let pod = model.pod("shop/web").expect("enforced");
        assert_eq!(
            (pod.vlan, pod.eni_id.as_str(), pod.mac.as_str()),
            (7, "eni-0a", "0a:1b:2c:3d:4e:5f")
        );
        assert_eq!(pod.ipv4, Some("10.0.1.101".parse().unwrap()));
        assert_eq!(pod.ipv6, Some("2001:db8::65".parse().unwrap()));
        assert_eq!(pod.subnet_v4, Some("10.0.1.0/24".parse().unwrap()));
        assert_eq!(pod.subnet_v6, Some("2001:db8::/64".parse().unwrap()));
        assert_eq!(pod.uid, "u-1");
    }

    #[test]
    fn lint_facts_of_a_pod_named_ports_resolved_and_unreadable_ones_left_out() {
        let spec = "  terminationGracePeriodSeconds: 0
  dnsConfig:
    nameservers: [169.254.20.10, not-an-ip]
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {port: http}}
    livenessProbe: {tcpSocket: {port: 9090}}
    startupProbe: {httpGet: {port: nowhere}}
  - name: side
    livenessProbe: {grpc: {port: 7000}}
    readinessProbe: {exec: {command: [true]}}
";
        let pod = format!("{}{spec}", pod_with_eni(BRANCH_ENI));
        let policy = [
            EVERYONE,
            "---
apiVersion: vpcresources.k8s.aws/v1beta1
kind: SecurityGroupPolicy
metadata: {name: nobody, namespace: shop}
spec:
  podSelector: {matchLabels: {app: nothing}}
  securityGroups: {groupIds: [sg-0node]}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns-1, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {nodeName: elsewhere}
status: {podIP: 10.0.9.9}
",
        ]
        .concat();
        let model = StateDir::with_node()
            .file("pod.yaml", &pod)
            .file("policies.yaml", &policy)
            .model();
        let facts = &model.pod("shop/web").expect("enforced").facts;
        let ports: Vec<(&str, &str, u16)> = facts
            .probes
            .iter()
            .map(|p| (p.kind, p.container.as_str(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("livenessProbe", "app", 9090),
                ("readinessProbe", "app", 8080),
                ("livenessProbe", "side", 7000)
            ]
        );
        assert_eq!(
            facts.dns_nameservers,
            ["169.254.20.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(facts.termination_grace_seconds, Some(0));
        assert_eq!(facts.policies, ["shop/everyone"]);
        assert_eq!(model.cluster.idle_policies, ["shop/nobody"]);
        assert_eq!(
            model.cluster.dns_endpoints,
            ["10.0.9.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_listed_branch_eni_gives_the_pod_its_groups_whatever_the_policies_say_now() {
        let state = || {
            StateDir::with_node()
                .file("pod.yaml", &pod_with_eni(BRANCH_ENI))
                .file("policies.yaml", EVERYONE)
                .file(
                    "old-group.json",
                    r#"{"SecurityGroups": [{"GroupId": "sg-0old", "GroupName": "old",
                        "Description": "created with", "IpPermissions": [], "IpPermissionsEgress": []}]}"#,
                )
        };
        // Without ENI data, the policies' groups (the agent pins them on first sight).
        let model = state().model();
        let pod = model.pod("shop/web").expect("enforced");
        assert_eq!(pod.groups, ["sg-0node"]);
        assert_eq!(pod.facts.groups_source, GroupsSource::Policies);
        // With the branch ENI listed, its groups, whatever the policies give now.
        let model = state()
            .file(
                "enis.json",
                r#"{"NetworkInterfaces": [{"NetworkInterfaceId": "eni-0a",
                    "Groups": [{"GroupId": "sg-0old"}], "PrivateIpAddress": "10.0.1.101"}]}"#,
            )
            .model();
        let pod = model.pod("shop/web").expect("enforced");
        assert_eq!(pod.groups, ["sg-0old"], "EC2 enforces the ENI's groups");
        assert_eq!(pod.facts.groups_source, GroupsSource::BranchEni);
        assert_eq!(pod.facts.policy_groups, ["sg-0node"]);
        let member = "10.0.1.101/32".parse::<Cidr>().unwrap();
        assert!(model.members["sg-0old"].contains(&member));
        assert!(
            !model.members["sg-0node"].contains(&member),
            "a member of the groups its ENI carries, not of those its policies name now"
        );
    }

    #[test]
    fn vlan_key_in_any_case_and_empty_family() {
        let eni = r#"[{"ENIID":"eni-0a","ifaddress":"0a:1b:2c:3d:4e:5f","privateIp":"","ipv6Addr":"2001:db8::65","VLANID":3,"subnetCidr":""}]"#;
        let model = StateDir::with_node()
            .file("pod.yaml", &pod_with_eni(eni))
            .model();
        let pod = model.pod("shop/web").unwrap();
        assert_eq!((pod.vlan, pod.ipv4, pod.subnet_v4), (3, None, None));
    }

    #[test]
    fn branch_annotation_errors() {
        let with = |extra: &str| {
            format!(
                r#"[{{"eniId":"eni-0a","ifAddress":"0a:1b:2c:3d:4e:5f","privateIp":"10.0.1.9",{extra}}}]"#
            )
        };
        eni_error(
            &with(r#""vlanId":0"#),
            &["[0].vlanId", "0 is out of range 1..=4094"],
        );
        eni_error(&with(r#""vlanId":4095"#), &["[0].vlanId", "out of range"]);
        eni_error(
            &with(r#""vlanId":"3""#),
            &["[0].vlanId", "expected an integer"],
        );
        eni_error(
            &with(r#""vlanId":3,"privateIp":"2001:db8::1""#),
            &["[0].privateIp", "not an IPv4 address"],
        );
        eni_error(
            &with(r#""vlanId":3,"subnetCidr":"2001:db8::/64""#),
            &["[0].subnetCidr", "wrong address family"],
        );
        eni_error(
            &with(r#""vlanId":3,"subnetCidr":"10.0.1.1/24""#),
            &["[0].subnetCidr", "host bits"],
        );
        eni_error(
            r#"[{"eniId":"eni-0a","ifAddress":"0a:1b:2c:3d:4e:5f","privateIp":"","ipv6Addr":"","vlanId":3}]"#,
            &["[0]", "no address"],
        );
        eni_error(
            r#"[{"eniId":"eni-0a","ifAddress":"","privateIp":"10.0.1.9","vlanId":3}]"#,
            &["[0].ifAddress", "must not be empty"],
        );
        eni_error(
            r#"[{"eniId":"eni-0a","ifAddress":"0a:1b:2c","privateIp":"10.0.1.9","vlanId":3}]"#,
            &["[0].ifAddress", "not a MAC address"],
        );
        eni_error(
            r#"[{"ifAddress":"0a:1b:2c:3d:4e:5f","privateIp":"10.0.1.9","vlanId":3}]"#,
            &["[0].eniId", "missing"],
        );
        eni_error(r#"{"eniId":"eni-0a"}"#, &["expected a list"]);
        eni_error("[]", &["empty list"]);
        eni_error("[{", &["not JSON"]);
    }

    #[test]
    fn pod_defaults() {
        let dir = StateDir::with_node().file(
            "pod.json",
            r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"nodeName": "ip-10-0-1-10.ec2.internal"},
                "status": {"podIP": "10.0.1.50", "podIPs": [{"ip": "10.0.1.50"}, {"ip": "2001:db8::50"}]}}"#,
        );
        let mut inventory = super::super::Inventory::default();
        for doc in
            super::super::reader::documents(&dir.path().join("pod.json"), &mut inventory.errors)
        {
            inventory.classify(&doc.file, "document 1", &doc.value);
        }
        let pod = &inventory.pods[0].item;
        assert_eq!(
            (pod.namespace.as_str(), pod.service_account.as_str()),
            ("default", "default")
        );
        assert_eq!(
            pod.ips,
            [
                "10.0.1.50".parse::<IpAddr>().unwrap(),
                "2001:db8::50".parse().unwrap()
            ]
        );
        assert_eq!(inventory.pods[0].object, "Pod default/p");
        assert!(inventory.errors.is_empty());
    }

    #[test]
    fn duplicated_pod_and_service_account() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n";
        let account =
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop}\n";
        let dir = StateDir::with_node()
            .file("a.yaml", &format!("{pod}---\n{account}"))
            .file("b.yaml", &format!("{pod}---\n{account}"));
        let errors = dir.errors();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].contains("b.yaml: Pod shop/p: defined twice: also in"));
        assert!(errors[1].contains("b.yaml: ServiceAccount shop/sa: defined twice"));
    }

    const SGP: &str = "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata:\n  name: db\n  namespace: shop\n";

    #[test]
    fn policy_parses_selectors() {
        let text = format!(
            "{SGP}spec:\n  podSelector:\n    matchLabels: {{app: db}}\n    matchExpressions:\n    - {{key: tier, operator: NotIn, values: [web]}}\n    - {{key: env, operator: Exists}}\n  serviceAccountSelector: {{}}\n  securityGroups:\n    groupIds: [sg-0node]\n"
        );
        let dir = StateDir::with_node().file("sgp.yaml", &text);
        let mut inventory = super::super::Inventory::default();
        for doc in
            super::super::reader::documents(&dir.path().join("sgp.yaml"), &mut inventory.errors)
        {
            inventory.classify(&doc.file, "document 1", &doc.value);
        }
        assert!(inventory.errors.is_empty(), "{:?}", inventory.errors);
        let policy = &inventory.policies[0].item;
        let pod = policy.pod_selector.as_ref().unwrap();
        assert_eq!(pod.match_labels["app"], "db");
        assert_eq!(pod.match_expressions[0].operator, Operator::NotIn);
        assert_eq!(pod.match_expressions[1].values, Vec::<String>::new());
        assert_eq!(
            policy.service_account_selector,
            Some(LabelSelector::default())
        );
        assert_eq!(policy.group_ids, ["sg-0node"]);
    }

    #[test]
    fn policy_errors() {
        let error = |spec: &str, parts: &[&str]| {
            let dir = StateDir::with_node().file("sgp.yaml", &format!("{SGP}spec:\n{spec}"));
            let mut parts = parts.to_vec();
            parts.extend(["sgp.yaml", "SecurityGroupPolicy shop/db"]);
            dir.error(&parts);
        };
        error(
            "  podSelector: {matchLabels: {app: db}}\n  securityGroups: {groupIds: [sg-0node, sg-0rds]}\n",
            &[
                "spec.securityGroups.groupIds[1]",
                "security group sg-0rds is not defined",
            ],
        );
        error(
            "  podSelector:\n    matchExpressions: [{key: app, operator: Equals, values: [db]}]\n  securityGroups: {groupIds: [sg-0node]}\n",
            &[
                "spec.podSelector.matchExpressions[0].operator",
                "unknown operator",
            ],
        );
        error(
            "  podSelector:\n    matchExpressions: [{key: app, operator: In}]\n  securityGroups: {groupIds: [sg-0node]}\n",
            &[
                "spec.podSelector.matchExpressions[0].values",
                "at least one value",
            ],
        );
        error(
            "  serviceAccountSelector:\n    matchExpressions: [{key: app, operator: Exists, values: [x]}]\n  securityGroups: {groupIds: [sg-0node]}\n",
            &[
                "spec.serviceAccountSelector.matchExpressions[0].values",
                "take no values",
            ],
        );
        error(
            "  podSelecter: {}\n  securityGroups: {groupIds: [sg-0node]}\n",
            &["spec.podSelecter", "unknown field"],
        );
        error(
            "  podSelector: {matchLabel: {app: db}}\n  securityGroups: {groupIds: [sg-0node]}\n",
            &["spec.podSelector.matchLabel", "unknown field"],
        );
    }

    #[test]
    fn misspelt_kind_is_an_error() {
        let text = SGP.replace("SecurityGroupPolicy", "SecurityGroupPolicies");
        let dir = StateDir::with_node().file("sgp.yaml", &format!("{text}spec: {{}}\n"));
        dir.error(&[
            "sgp.yaml",
            "SecurityGroupPolicies db",
            "unrecognised object",
        ]);
        let dir = StateDir::with_node().file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        );
        dir.error(&[
            "cm.yaml",
            "ConfigMap x",
            "unrecognised object (apiVersion v1, kind ConfigMap)",
        ]);
        let dir = StateDir::with_node().file("list.yaml", "- 1\n- 2\n");
        dir.error(&["list.yaml", "document 1", "expected a mapping"]);
    }

    #[test]
    fn node_config_defaults() {
        let node = StateDir::with_node().model().node;
        assert_eq!(node.name, NODE);
        assert_eq!(node.enforcing_mode, EnforcingMode::Strict);
        assert_eq!(node.enforcing_action, EnforcingAction::Enforce);
        assert!(!node.tcp_early_demux_disabled);
        assert_eq!(node.unknown_vlan, UnknownVlanAction::Drop);
        assert!(!node.external_snat);
        assert_eq!(node.connection_tracking, ConntrackTimeouts::default());
        assert_eq!((node.max_groups_per_pod, node.max_rules_per_group), (5, 60));
        assert_eq!(
            (node.max_flows_per_pod, node.max_fragments_per_pod),
            (16_384, 512),
            "a sixteenth of each table"
        );
        assert_eq!(
            (
                node.trunk_interface.as_str(),
                node.primary_interface.as_str()
            ),
            ("eth1", "eth0")
        );
        assert_eq!(node.primary_ips, ["10.0.1.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(node.vpc_cidrs, ["10.0.0.0/16".parse::<Cidr>().unwrap()]);
        assert!(node.exclude_snat_cidrs.is_empty());
        assert_eq!(node.snat_port_range, crate::model::DEFAULT_SNAT_PORT_RANGE);
    }

    #[test]
    fn node_config_settings() {
        let config = format!(
            "{NODE_CONFIG}  enforcingMode: standard\n  enforcingAction: audit\n  tcpEarlyDemuxDisabled: true\n  unknownVlan: pass\n  externalSnat: true\n  excludeSnatCidrs: [198.51.100.0/24]\n  snatPortRange: 50000-50009\n  maxSecurityGroupsPerPod: 16\n  maxRulesPerGroup: 62\n  maxFlowsPerPod: 1000\n  maxFragmentsPerPod: 20\n  connectionTracking: {{tcpEstablishedTimeout: 350, udpStreamTimeout: 60, udpTimeout: 60}}\n"
        );
        let dir = StateDir::empty()
            .file("node.yaml", &config)
            .file("g.json", NODE_GROUP);
        let node = dir.model().node;
        assert_eq!(node.enforcing_mode, EnforcingMode::Standard);
        assert_eq!(node.enforcing_action, EnforcingAction::Audit);
        assert!(node.tcp_early_demux_disabled);
        assert_eq!(node.unknown_vlan, UnknownVlanAction::Pass);
        assert!(node.external_snat);
        assert_eq!(
            node.exclude_snat_cidrs,
            ["198.51.100.0/24".parse::<Cidr>().unwrap()]
        );
        assert_eq!(node.snat_port_range, 50000..=50009);
        assert_eq!(
            (node.max_groups_per_pod, node.max_rules_per_group),
            (16, 62)
        );
        assert_eq!(
            (node.max_flows_per_pod, node.max_fragments_per_pod),
            (1000, 20)
        );
        let expected = ConntrackTimeouts {
            tcp_established: 350,
            udp_stream: 60,
            udp: 60,
        };
        assert_eq!(node.connection_tracking, expected);
    }

    #[test]
    fn the_tcp_established_default_follows_the_instance_type() {
        let node = |extra: &str| {
            StateDir::empty()
                .file("node.yaml", &format!("{NODE_CONFIG}{extra}"))
                .file("g.json", NODE_GROUP)
                .model()
                .node
        };
        for (instance_type, expected) in [
            ("m8i.large", 350),
            ("c8i-flex.xlarge", 350),
            ("r8i.48xlarge", 350),
            ("m5.large", 432_000),
            ("m8g.large", 432_000),
            ("p6e-gb200.36xlarge", 432_000),
        ] {
            let node = node(&format!("  instanceType: {instance_type}\n"));
            assert_eq!(node.instance_type.as_deref(), Some(instance_type));
            assert_eq!(
                node.connection_tracking.tcp_established, expected,
                "{instance_type}"
            );
            assert_eq!(node.connection_tracking.udp_stream, 180);
        }
        // An explicit timeout wins; the rest still follows the instance type.
        let explicit = node("  instanceType: m8i.large\n  connectionTracking: {udpTimeout: 60}\n");
        assert_eq!(explicit.connection_tracking.tcp_established, 350);
        assert_eq!(explicit.connection_tracking.udp, 60);
        let set = node(
            "  instanceType: m8i.large\n  connectionTracking: {tcpEstablishedTimeout: 3600}\n",
        );
        assert_eq!(set.connection_tracking.tcp_established, 3600);
        let services = node("  serviceCidrs: [172.20.0.0/16, fd00:20::/108]\n");
        assert_eq!(
            services.service_cidrs,
            [
                "172.20.0.0/16".parse::<Cidr>().unwrap(),
                "fd00:20::/108".parse::<Cidr>().unwrap()
            ]
        );
    }

    fn node_error(extra: &str, parts: &[&str]) {
        let dir = StateDir::empty()
            .file("node.yaml", &format!("{NODE_CONFIG}{extra}"))
            .file("g.json", NODE_GROUP);
        let mut parts = parts.to_vec();
        parts.extend(["node.yaml", "NodeConfig"]);
        dir.error(&parts);
    }

    #[test]
    fn node_config_errors() {
        node_error(
            "  enforcingMode: Strict\n",
            &["spec.enforcingMode", "not strict or standard"],
        );
        node_error(
            "  enforcingAction: warn\n",
            &["spec.enforcingAction", "\"warn\" is not enforce or audit"],
        );
        node_error(
            "  tcpEarlyDemuxDisabled: yes\n",
            &["spec.tcpEarlyDemuxDisabled"],
        );
        node_error(
            "  unknownVlan: accept\n",
            &["spec.unknownVlan", "not drop or pass"],
        );
        node_error(
            "  externalSNAT: true\n",
            &["spec.externalSNAT", "unknown field"],
        );
        for range in ["1000-2000", "60000-50000", "61000", "61000-70000"] {
            node_error(
                &format!("  snatPortRange: \"{range}\"\n"),
                &["spec.snatPortRange", "not a port range"],
            );
        }
        let many: Vec<String> = (0..32).map(|i| format!("198.51.{i}.0/24")).collect();
        node_error(
            &format!("  excludeSnatCidrs: [{}]\n", many.join(", ")),
            &["spec.excludeSnatCidrs", "33 IPv4 CIDRs"],
        );
        node_error(
            "  instanceType: m5\n",
            &["spec.instanceType", "not an instance type"],
        );
        node_error(
            "  serviceCidrs: [172.20.0.1/16]\n",
            &["spec.serviceCidrs[0]", "host bits set"],
        );
        node_error(
            "  maxSecurityGroupsPerPod: 17\n",
            &["spec.maxSecurityGroupsPerPod", "out of range 1..=16"],
        );
        node_error(
            "  maxSecurityGroupsPerPod: 16\n  maxRulesPerGroup: 63\n",
            &["spec.maxRulesPerGroup", "exceeds EC2's limit of 1000"],
        );
        for (key, value) in [
            ("tcpEstablishedTimeout", 59),
            ("tcpEstablishedTimeout", 432_001),
            ("udpStreamTimeout", 181),
            ("udpTimeout", 29),
            ("udpTimeout", 61),
        ] {
            node_error(
                &format!("  connectionTracking: {{{key}: {value}}}\n"),
                &[&format!("spec.connectionTracking.{key}"), "out of range"],
            );
        }
        node_error(
            "  connectionTracking: {tcpTimeout: 100}\n",
            &["spec.connectionTracking.tcpTimeout", "unknown field"],
        );
        let dir = StateDir::empty()
            .file(
                "node.yaml",
                &NODE_CONFIG.replace("trunkInterface: eth1", "trunkInterface: vlan/1"),
            )
            .file("g.json", NODE_GROUP);
        dir.error(&["NodeConfig", "spec.trunkInterface", "not an interface name"]);
        let dir = StateDir::empty()
            .file(
                "node.yaml",
                &NODE_CONFIG.replace("primaryIPs: [10.0.1.10]", "primaryIPs: []"),
            )
            .file("g.json", NODE_GROUP);
        dir.error(&["NodeConfig", "spec.primaryIPs", "at least one"]);
        let dir = StateDir::empty().file("node.yaml", NODE_CONFIG);
        dir.error(&[
            "NodeConfig",
            "spec.primarySecurityGroups[0]",
            "sg-0node is not defined",
        ]);
    }

    #[test]
    fn node_config_missing_or_duplicated() {
        let dir = StateDir::empty().file("g.json", NODE_GROUP);
        let error = dir.error(&["NodeConfig", "missing"]);
        assert!(error.starts_with(&format!("{}: NodeConfig", dir.path().display())));
        let dir = StateDir::with_node().file("other.yaml", NODE_CONFIG);
        dir.error(&[
            "other.yaml",
            "NodeConfig",
            "duplicate NodeConfig",
            "node.yaml",
        ]);
        // A broken NodeConfig is reported as broken, not also as missing.
        let dir = StateDir::empty()
            .file(
                "node.yaml",
                &NODE_CONFIG.replace("  primaryInterface: eth0\n", ""),
            )
            .file("g.json", NODE_GROUP);
        dir.error(&[
            "node.yaml",
            "NodeConfig",
            "spec.primaryInterface",
            "missing",
        ]);
    }
}
