use super::*;
use crate::model::{EnforcingMode, FindingKind};
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
    assert!(quarantined[0].contains("Pod shop/payments") && quarantined[0].contains("also claimed by pod shop/web-3"));
    assert!(quarantined[1].contains("Pod shop/web-3") && quarantined[1].contains("also claimed by pod shop/payments"));
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
        all.push(done.replace(r#""status": {"#, &format!(r#""status": {{"phase": "{phase}", "#)));
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
        "quarantined",
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
    for part in ["two.json", "SecurityGroup sg-0two", "IpPermissions", "2 IPv4 ingress rules"] {
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
