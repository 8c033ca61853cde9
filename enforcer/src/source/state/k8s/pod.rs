//! A Pod: its labels, service account and branch ENI (the VPC resource controller's annotation).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::super::reader::{Field, Invalid, Problems};
use super::super::{Inventory, Located};
use super::meta::{action, labels, namespaced_name, object_name};
use crate::model::sgp::Labels;
use crate::model::{Cidr, EnforcingAction, PodFacts, Probe, StateError};

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
    /// The branch ENI annotation, when it cannot be read: what is wrong with it, and
    /// its VLAN if that much can be read (the resolver quarantines that VLAN).
    pub unreadable_branch: Option<UnreadableBranch>,
    /// The [`ACTION_ANNOTATION`], when set.
    pub action: Option<EnforcingAction>,
    /// Why the [`ACTION_ANNOTATION`] cannot be read, when it cannot (it is ignored).
    pub unreadable_action: Vec<StateError>,
    /// `status.phase` is `Succeeded` or `Failed`: the VPC resource controller releases
    /// a completed pod's branch ENI (it handles it as deleted: `hasPodCompleted` in its
    /// controllers/core/pod_controller.go), so its VLAN and addresses go to new pods.
    pub completed: bool,
    /// What `enforcer lint` looks at (the policies are filled in by resolution).
    pub facts: PodFacts,
}

/// A `vpc.amazonaws.com/pod-eni` annotation that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnreadableBranch {
    pub vlan: Option<u16>,
    pub problems: Vec<StateError>,
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
    let mut branch_problems = Problems::default();
    let (branch, vlan) = match annotation(POD_ENI_ANNOTATION) {
        Some(f) => branch_eni(&f, &mut branch_problems),
        None => (None, None),
    };
    let mut action_problems = Problems::default();
    let action = annotation(ACTION_ANNOTATION)
        .and_then(|f| action_problems.ok(f.str().and_then(|s| action(s, &f))));
    let spec = root.get("spec");
    let spec_field = |key: &str| spec.as_ref().and_then(|s| s.get(key));
    let node_name = spec_field("nodeName").and_then(|f| problems.ok(f.name().map(str::to_string)));
    let service_account = spec_field("serviceAccountName")
        .and_then(|f| problems.ok(f.name().map(str::to_string)))
        .unwrap_or_else(|| "default".to_string());
    let host_network = spec_field("hostNetwork")
        .and_then(|f| problems.ok(f.bool()))
        .unwrap_or(false);
    let mut facts = spec.as_ref().map(pod_facts).unwrap_or_default();
    facts.file = file.to_path_buf();
    let status = root.get("status");
    let completed = status
        .as_ref()
        .and_then(|s| s.get("phase"))
        .and_then(|f| problems.ok(f.str()))
        .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"));
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
    let Some(name) = name else {
        problems.report(file, &object, &mut inventory.errors);
        branch_problems.report(file, &object, &mut inventory.errors);
        action_problems.report(file, &object, &mut inventory.errors);
        return;
    };
    let unreadable_branch = (!branch_problems.is_empty()).then(|| UnreadableBranch {
        vlan,
        problems: branch_problems.into_errors(file, &object),
    });
    let pod = Pod {
        namespace,
        name,
        uid,
        labels,
        node_name,
        service_account,
        host_network,
        ips,
        branch: branch.filter(|_| unreadable_branch.is_none()),
        unreadable_branch,
        action,
        unreadable_action: action_problems.into_errors(file, &object),
        completed,
        facts,
    };
    inventory
        .pods
        .push(Located::with_problems(file, object, pod, problems));
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
        ..PodFacts::default()
    }
}

/// The annotation's JSON array, element 0; field names are matched without
/// regard to case, as both `vlanId` and `vlanID` occur in the wild.
/// Also returns the VLAN when it can be read, so that a pod whose annotation is
/// otherwise broken can still be quarantined on it.
fn branch_eni(annotation: &Field, problems: &mut Problems) -> (Option<BranchEni>, Option<u16>) {
    let Some(text) = problems.ok(annotation.str()) else {
        return (None, None);
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            problems.push(Invalid::new(&annotation.path, format!("not JSON: {e}")));
            return (None, None);
        }
    };
    let list = Field {
        value: &value,
        path: annotation.path.clone(),
    };
    let Some(items) = problems.ok(list.items()) else {
        return (None, None);
    };
    let Some(eni) = items.first() else {
        problems.push(Invalid::new(&list.path, "empty list: no branch ENI"));
        return (None, None);
    };
    let Some(entries) = problems.ok(eni.entries()) else {
        return (None, None);
    };
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
    let branch = match (eni_id, mac, vlan) {
        (Some(eni_id), Some(mac), Some(vlan)) => Some(BranchEni {
            eni_id,
            mac,
            ipv4,
            ipv6,
            vlan,
            subnet_v4,
            subnet_v6,
        }),
        _ => None,
    };
    (branch, vlan)
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
        let allowed = "  auditNamespaces: [shop]\n";
        assert_eq!(action("", &plain), EnforcingAction::Enforce);
        assert_eq!(
            action("  enforcingAction: audit\n", &plain),
            EnforcingAction::Audit
        );
        assert_eq!(action(allowed, &annotated("audit")), EnforcingAction::Audit);
        assert_eq!(
            action("  enforcingAction: audit\n", &annotated("enforce")),
            EnforcingAction::Enforce
        );
        // A pod never loosens its own enforcement unless the node lets its namespace.
        assert_eq!(action("", &annotated("audit")), EnforcingAction::Enforce);
        assert_eq!(
            action("  auditNamespaces: [other]\n", &annotated("audit")),
            EnforcingAction::Enforce
        );
        let dir = StateDir::with_node().file("pod.yaml", &annotated("audit"));
        dir.error(&[
            "pod.yaml",
            "Pod shop/web",
            "audit is ignored",
            "auditNamespaces",
        ]);
        assert_eq!(dir.findings(crate::model::FindingKind::Ignored).len(), 1);
        // A value that is not an action is ignored: the pod is enforced.
        let dir = StateDir::with_node().file("pod.yaml", &annotated("Audit"));
        dir.error(&[
            "pod.yaml",
            "Pod shop/web",
            "metadata.annotations[\"enforcer.sgp.dev/action\"]",
            "\"Audit\" is not enforce or audit",
            "the annotation is ignored",
        ]);
        assert_eq!(dir.model().pods[0].action, EnforcingAction::Enforce);
        assert!(dir.model().pods[0].facts.quarantine.is_none());
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
        let mut inventory = crate::source::state::Inventory::default();
        for doc in crate::source::state::reader::documents(
            &dir.path().join("pod.json"),
            &mut inventory.errors,
        ) {
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
}
