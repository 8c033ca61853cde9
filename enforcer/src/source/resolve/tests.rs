use super::*;
use crate::model::{EnforcingMode, FindingKind, Model, QuarantineCause};
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
fn a_vlan_twice_on_this_node_quarantines_it() {
    let mut pods = scenario();
    pods.push(pod(PodSpec {
        name: "web-3",
        labels: r#"{"app": "web"}"#,
        branch: Some((2, "10.0.1.105")),
        ..POD
    }));
    let dir = cluster(&pods);
    let quarantined = dir.findings(FindingKind::Quarantined);
    assert_eq!(quarantined.len(), 2, "{quarantined:#?}");
    assert!(
        quarantined[0].contains("Pod shop/payments")
            && quarantined[0].contains("also claimed by pod shop/web-3")
    );
    assert!(
        quarantined[1].contains("Pod shop/web-3")
            && quarantined[1].contains("also claimed by pod shop/payments")
    );
    // One pod stands for the VLAN in the kernel, with no group; the others keep theirs.
    let model = dir.model();
    let on_vlan: Vec<_> = model.pods.iter().filter(|p| p.vlan == 2).collect();
    assert_eq!(on_vlan.len(), 1);
    assert!(on_vlan[0].groups.is_empty() && on_vlan[0].facts.quarantine.is_some());
    assert_eq!(model.pod("shop/web-1").unwrap().groups, ["sg-0web"]);
}

#[test]
fn a_completed_pod_releases_its_vlan() {
    // A Job's pod that Succeeded keeps its annotation until it is garbage
    // collected; the VPC resource controller gave its VLAN to a new pod.
    let mut pods = scenario();
    let done = pod(PodSpec {
        name: "job-old",
        labels: r#"{"app": "web"}"#,
        branch: Some((2, "10.0.1.105")),
        ..POD
    });
    for phase in ["Succeeded", "Failed"] {
        let mut all = pods.clone();
        all.push(done.replace(
            r#""status": {"#,
            &format!(r#""status": {{"phase": "{phase}", "#),
        ));
        let model = cluster(&all).model();
        assert!(model.findings.is_empty(), "{:#?}", model.findings);
        let payments = model.pod("shop/payments").unwrap();
        assert_eq!(payments.vlan, 2);
        assert_eq!(payments.groups, ["sg-0db", "sg-0vpn"]);
        assert!(model.pod("shop/job-old").is_none());
        // Neither its address nor its groups' membership outlive it.
        let address: IpAddr = "10.0.1.105".parse().unwrap();
        assert!(!model.node_local.contains(&address));
        assert!(!model.members["sg-0web"].contains(&Cidr::host(address)));
    }
    // Running, it claims the VLAN: both are quarantined.
    pods.push(done.replace(r#""status": {"#, r#""status": {"phase": "Running", "#));
    assert_eq!(cluster(&pods).findings(FindingKind::Quarantined).len(), 2);
}

#[test]
fn groups_over_quota_quarantine_the_pod() {
    let config = format!("{NODE_CONFIG}  maxSecurityGroupsPerPod: 1\n");
    let dir = cluster(&scenario()).file("node.yaml", &config);
    dir.error(&[
        "pods.json",
        "Pod shop/payments",
        "VLAN 2 drops what security groups filter",
        "2 security groups (sg-0db, sg-0vpn) from SecurityGroupPolicies db, payments",
        "quota of 1 per branch ENI",
    ]);
    let model = dir.model();
    let payments = model.pod("shop/payments").unwrap();
    assert!(payments.groups.is_empty());
    assert_eq!(
        payments.facts.quarantine.as_ref().map(|q| q.cause),
        Some(QuarantineCause::Policies)
    );
}

#[test]
fn rule_quota_follows_the_node_as_a_warning() {
    let config = format!("{NODE_CONFIG}  maxRulesPerGroup: 1\n");
    let two = r#"[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}, {"CidrIp": "10.1.0.0/16"}]}]"#;
    let dir = StateDir::empty()
        .file("node.yaml", &config)
        .file("g.json", NODE_GROUP)
        .file("two.json", &group("sg-0two", two, "[]"));
    let warnings = dir.findings(FindingKind::Warning);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    for part in [
        "two.json",
        "SecurityGroup sg-0two",
        "IpPermissions",
        "2 IPv4 ingress rules",
    ] {
        assert!(warnings[0].contains(part), "{warnings:#?}");
    }
    assert!(dir.model().groups.contains_key("sg-0two"));
}

#[test]
fn without_a_node_the_state_is_refused_with_every_problem() {
    let dir = StateDir::empty().file(
        "g.json",
        r#"{"SecurityGroups": [{"GroupId": "sg-0a", "IpPermissions": [{"IpProtocol": "xyz", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]}]}"#,
    );
    let errors = dir.refusal();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("NodeConfig: missing")));
    assert!(errors.iter().any(|e| e.contains("unknown protocol")));
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

/// The VPC resource controller's choice of a pod's groups, from its documented
/// behaviour (EKS user guide, "Security groups for Pods"; the controller's
/// `filterPodSecurityGroups` and pod reconciler): one pod `shop/p` of this node
/// labelled `app: web`, run by service account `shop/sa` labelled `team: a`,
/// against the policies of each case. `None`: not enforced.
#[test]
fn groups_as_the_vpc_resource_controller_gives_them() {
    let policy = |name: &str, namespace: &str, spec: &str| {
        format!(
            "---\napiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
        )
    };
    let pods_sel = |sel: &str, groups: &str| {
        format!("  podSelector: {sel}\n  securityGroups: {{groupIds: [{groups}]}}\n")
    };
    let sa_sel = |sel: &str, groups: &str| {
        format!("  serviceAccountSelector: {sel}\n  securityGroups: {{groupIds: [{groups}]}}\n")
    };
    let both = |pod: &str, sa: &str, groups: &str| {
        format!(
            "  podSelector: {pod}\n  serviceAccountSelector: {sa}\n  securityGroups: {{groupIds: [{groups}]}}\n"
        )
    };
    let cases: Vec<(&str, String, &str, Option<&[&str]>)> = vec![
        (
            "pod selector matches",
            policy("a", "shop", &pods_sel("{matchLabels: {app: web}}", "sg-0a")),
            "Running",
            Some(&["sg-0a"]),
        ),
        (
            "service account selector matches",
            policy("a", "shop", &sa_sel("{matchLabels: {team: a}}", "sg-0a")),
            "Running",
            Some(&["sg-0a"]),
        ),
        (
            "both selectors must match",
            policy(
                "a",
                "shop",
                &both(
                    "{matchLabels: {app: web}}",
                    "{matchLabels: {team: b}}",
                    "sg-0a",
                ),
            ),
            "Running",
            Some(&["sg-0node"]),
        ),
        (
            "both selectors match",
            policy(
                "a",
                "shop",
                &both(
                    "{matchLabels: {app: web}}",
                    "{matchLabels: {team: a}}",
                    "sg-0a",
                ),
            ),
            "Running",
            Some(&["sg-0a"]),
        ),
        (
            "a policy selects pods of its own namespace only",
            policy("a", "other", &pods_sel("{}", "sg-0a")),
            "Running",
            Some(&["sg-0node"]),
        ),
        (
            "an empty pod selector selects every pod of the namespace",
            policy("a", "shop", &pods_sel("{}", "sg-0a")),
            "Running",
            Some(&["sg-0a"]),
        ),
        (
            "a policy without a selector selects nothing",
            policy("a", "shop", "  securityGroups: {groupIds: [sg-0a]}\n"),
            "Running",
            Some(&["sg-0node"]),
        ),
        (
            "a policy without groups selects nothing",
            policy(
                "a",
                "shop",
                "  podSelector: {}\n  securityGroups: {groupIds: []}\n",
            ),
            "Running",
            Some(&["sg-0node"]),
        ),
        (
            "a selector that cannot be evaluated selects nothing; the others still apply",
            policy(
                "a",
                "shop",
                &pods_sel("{matchExpressions: [{key: app, operator: In}]}", "sg-0a"),
            ) + &policy("b", "shop", &pods_sel("{}", "sg-0b")),
            "Running",
            Some(&["sg-0b"]),
        ),
        (
            "several policies: their groups in policy-name order, each once",
            policy("z", "shop", &pods_sel("{}", "sg-0b, sg-0a"))
                + &policy("a", "shop", &pods_sel("{matchLabels: {app: web}}", "sg-0a")),
            "Running",
            Some(&["sg-0a", "sg-0b"]),
        ),
        (
            "NotIn holds when the key is absent",
            policy(
                "a",
                "shop",
                &pods_sel(
                    "{matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}",
                    "sg-0a",
                ),
            ),
            "Running",
            Some(&["sg-0a"]),
        ),
        (
            "no policy: the node's groups",
            String::new(),
            "Pending",
            Some(&["sg-0node"]),
        ),
        (
            "a completed pod's branch ENI is released",
            policy("a", "shop", &pods_sel("{}", "sg-0a")),
            "Succeeded",
            None,
        ),
        (
            "a failed pod's too",
            policy("a", "shop", &pods_sel("{}", "sg-0a")),
            "Failed",
            None,
        ),
    ];
    for (case, policies, phase, expected) in cases {
        let pod = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
                "metadata": {{"name": "p", "namespace": "shop", "uid": "u", "labels": {{"app": "web"}},
                  "annotations": {{"vpc.amazonaws.com/pod-eni": "[{{\"eniId\":\"eni-1\",\"ifAddress\":\"02:00:00:00:00:01\",\"privateIp\":\"10.0.1.101\",\"vlanId\":1}}]"}}}},
                "spec": {{"nodeName": "{NODE}", "serviceAccountName": "sa"}},
                "status": {{"phase": "{phase}"}}}}"#
        );
        let mut dir = StateDir::with_node()
            .file("g-a.json", &group("sg-0a", "[]", "[]"))
            .file("g-b.json", &group("sg-0b", "[]", "[]"))
            .file(
                "sa.yaml",
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop, labels: {team: a}}\n",
            )
            .file("pod.json", &pod);
        if !policies.is_empty() {
            dir = dir.file("policies.yaml", &policies);
        }
        let model = dir.model();
        let groups = model.pod("shop/p").map(|p| p.groups.clone());
        let expected = expected.map(|g| g.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(groups, expected, "{case}");
    }
}

/// A baseline of the scenario, and the same with `extra` files: the pods other than
/// `touched` keep their groups, action and quarantine.
fn only_touches(extra: &[(&str, &str)], touched: &[&str]) -> Model {
    let baseline = cluster(&scenario()).model();
    let mut dir = cluster(&scenario());
    for (name, text) in extra {
        dir = dir.file(name, text);
    }
    let model = dir.model();
    for pod in baseline
        .pods
        .iter()
        .filter(|p| !touched.contains(&p.key().as_str()))
    {
        let now = model.pod(&pod.key()).expect("still enforced");
        assert_eq!(
            (&now.groups, now.action, now.vlan, &now.facts.quarantine),
            (&pod.groups, pod.action, pod.vlan, &None),
            "{}",
            pod.key()
        );
    }
    model
}

fn quarantine_of(model: &Model, key: &str) -> (String, QuarantineCause) {
    let pod = model.pod(key).expect("enforced");
    assert!(pod.groups.is_empty(), "{key} keeps groups {:?}", pod.groups);
    let held = pod.facts.quarantine.as_ref().expect("quarantined");
    (held.reason.clone(), held.cause)
}

#[test]
fn a_policy_of_another_namespace_naming_an_unknown_group_touches_no_pod() {
    let sgp = "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {name: typo, namespace: team-a}\nspec:\n  podSelector: {}\n  securityGroups: {groupIds: [sg-0typo]}\n";
    let model = only_touches(&[("typo.yaml", sgp)], &[]);
    assert_eq!(model.findings.len(), 1, "{:#?}", model.findings);
    assert_eq!(model.findings[0].kind, FindingKind::Warning);
    assert!(
        model.findings[0]
            .at
            .to_string()
            .contains("SecurityGroupPolicy team-a/typo")
    );
}

#[test]
fn a_policy_naming_a_group_ec2_does_not_list_yet_quarantines_the_pods_it_gives_it() {
    let sgp = "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {name: new, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  securityGroups: {groupIds: [sg-0new]}\n";
    let model = only_touches(&[("new.yaml", sgp)], &["shop/web-1"]);
    let (reason, cause) = quarantine_of(&model, "shop/web-1");
    assert!(reason.contains("sg-0new is not defined"), "{reason}");
    assert_eq!(cause, QuarantineCause::Policies);
    // Once EC2 lists it, the pod takes it.
    let model = cluster(&scenario())
        .file("new.yaml", sgp)
        .file("g-new.json", &group("sg-0new", "[]", "[]"))
        .model();
    assert_eq!(
        model.pod("shop/web-1").unwrap().groups,
        ["sg-0new", "sg-0web"]
    );
}

#[test]
fn a_policy_that_cannot_be_read_quarantines_the_pods_it_selects() {
    let sgp = "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  securityGroups: {groupIds: sg-0db}\n";
    let model = only_touches(&[("broken.yaml", sgp)], &["shop/web-1"]);
    let (reason, cause) = quarantine_of(&model, "shop/web-1");
    assert!(
        reason.contains("SecurityGroupPolicy shop/broken selects it and cannot be read"),
        "{reason}"
    );
    assert_eq!(cause, QuarantineCause::Policies);
    assert!(
        model
            .findings_of(FindingKind::Skipped)
            .any(|f| f.at.object == "SecurityGroupPolicy shop/broken")
    );
}

#[test]
fn a_service_account_that_cannot_be_read_quarantines_the_pods_it_runs() {
    let account = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: orders, namespace: shop, labels: {db-access: 1}}\n";
    let model = only_touches(
        &[(
            "accounts.yaml",
            &format!("{account}---\n{}", ACCOUNTS.split("---\n").nth(1).unwrap()),
        )],
        &["shop/orders"],
    );
    let (reason, _) = quarantine_of(&model, "shop/orders");
    assert!(
        reason.contains("ServiceAccount shop/orders cannot be read"),
        "{reason}"
    );
}

#[test]
fn a_branch_annotation_that_cannot_be_read() {
    let eni = |vlan: &str, mac: &str| {
        format!(
            r#"{{"vpc.amazonaws.com/pod-eni": "[{{\"eniId\":\"eni-9\",\"ifAddress\":\"{mac}\",\"privateIp\":\"10.0.1.109\",\"vlanId\":{vlan}}}]"}}"#
        )
    };
    let pod = |name: &str, node: &str, annotations: &str| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "shop", "uid": "u-{name}", "labels": {{"app": "web"}}, "annotations": {annotations}}}, "spec": {{"nodeName": "{node}"}}}}"#
        )
    };
    let mut pods = scenario();
    pods.push(pod("bad-mac", NODE, &eni("9", "zz")));
    pods.push(pod(
        "garbled",
        NODE,
        r#"{"vpc.amazonaws.com/pod-eni": "[{"}"#,
    ));
    pods.push(pod("elsewhere", OTHER_NODE, &eni("9", "zz")));
    let baseline = cluster(&scenario()).model();
    let model = cluster(&pods).model();
    for pod in &baseline.pods {
        assert_eq!(model.pod(&pod.key()).unwrap().groups, pod.groups);
    }
    // Its VLAN known: quarantined on it, with no address.
    let (reason, cause) = quarantine_of(&model, "shop/bad-mac");
    assert!(
        reason.contains("ifAddress") && reason.contains("not a MAC address"),
        "{reason}"
    );
    assert_eq!(cause, QuarantineCause::Pod);
    let bad = model.pod("shop/bad-mac").unwrap();
    assert_eq!((bad.vlan, bad.ipv4, bad.ipv6), (9, None, None));
    // Its VLAN unknown: reported; the node's unknownVlan action holds for it.
    let garbled: Vec<_> = model
        .findings_of(FindingKind::Quarantined)
        .filter(|f| f.at.object == "Pod shop/garbled")
        .collect();
    assert_eq!(garbled.len(), 1);
    assert!(garbled[0].at.message.contains("unknownVlan action (drop)"));
    // Another node's: ignored, and its address is a member of nothing through it.
    assert!(
        model
            .findings_of(FindingKind::Ignored)
            .any(|f| f.at.object == "Pod shop/elsewhere")
    );
    assert_eq!(model.members, baseline.members);
}

/// What the kernel cannot hold is never a reason to refuse the node: an identity
/// longer than its key is held as a digest, a group ID longer than any is set
/// aside, and more groups than a branch ENI carries quarantine the pod.
#[test]
fn what_the_kernel_cannot_hold_is_isolated() {
    let long_uid = "u".repeat(60);
    let pod = |name: &str, uid: &str, vlan: u16, eni: &str| {
        format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "shop", "uid": "{uid}", "labels": {{}},
                "annotations": {{"vpc.amazonaws.com/pod-eni": "[{{\"eniId\":\"{eni}\",\"ifAddress\":\"02:00:00:00:00:01\",\"privateIp\":\"10.0.1.{vlan}\",\"vlanId\":{vlan}}}]"}}}},
                "spec": {{"nodeName": "{NODE}"}}}}"#
        )
    };
    let groups: Vec<String> = (0..17).map(|i| format!("sg-0many{i:012}")).collect();
    let many: Vec<String> = groups
        .iter()
        .map(|id| format!(r#"{{"GroupId": "{id}", "GroupName": "m", "Description": "", "IpPermissions": [], "IpPermissionsEgress": []}}"#))
        .collect();
    let pairs: Vec<String> = groups
        .iter()
        .map(|id| format!(r#"{{"GroupId": "{id}"}}"#))
        .collect();
    let long_group = format!("sg-{}", "0".repeat(40));
    let dir = StateDir::with_node()
        .file("long.json", &pod("long", &long_uid, 7, "eni-7"))
        .file("crowded.json", &pod("crowded", "u-crowded", 8, "eni-8"))
        .file("many.json", &format!(r#"{{"SecurityGroups": [{}]}}"#, many.join(",")))
        .file(
            "enis.json",
            &format!(
                r#"{{"NetworkInterfaces": [{{"NetworkInterfaceId": "eni-8", "Groups": [{}], "PrivateIpAddress": "10.0.1.8"}}]}}"#,
                pairs.join(",")
            ),
        )
        .file("long-group.json", &group(&long_group, "[]", "[]"));
    let model = dir.model();
    let long = model.pod("shop/long").unwrap();
    assert!(long.facts.quarantine.is_none());
    assert_eq!(long.identity().len(), "fnv1a64:".len() + 16);
    assert_ne!(long.identity(), long_uid);
    let (reason, cause) = quarantine_of(&model, "shop/crowded");
    assert!(reason.contains("17 security groups"), "{reason}");
    assert_eq!(cause, QuarantineCause::Pod);
    assert!(!model.groups.contains_key(&long_group));
    assert!(
        model
            .findings_of(FindingKind::Skipped)
            .any(|f| f.at.object == format!("SecurityGroup {long_group}"))
    );
}
