//! This node's `NodeConfig`: interfaces, addresses, modes, allowances and timeouts.

use std::net::IpAddr;
use std::path::Path;

use super::super::reader::{Field, Invalid, Problems};
use super::super::{Inventory, Located, Reference, Target};
use super::meta::action;
use crate::model::{
    Cidr, ConntrackTimeouts, EnforcingAction, EnforcingMode, NodeConfig, UnknownVlanAction,
};

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
    "auditNamespaces",
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
    let audit_namespaces: Vec<String> = match spec.get("auditNamespaces") {
        None => Vec::new(),
        Some(f) => problems
            .ok(f.items())
            .unwrap_or_default()
            .iter()
            .filter_map(|n| problems.ok(n.name().map(str::to_string)))
            .collect(),
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
        audit_namespaces,
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
    use crate::source::state::testdir::{NODE, NODE_CONFIG, NODE_GROUP, StateDir};

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
        // The node's group undefined: its pods that need it are quarantined.
        let dir = StateDir::empty().file("node.yaml", NODE_CONFIG);
        let warnings = dir.findings(crate::model::FindingKind::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        for part in [
            "NodeConfig",
            "spec.primarySecurityGroups[0]",
            "sg-0node is not defined",
        ] {
            assert!(warnings[0].contains(part), "{warnings:#?}");
        }
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
