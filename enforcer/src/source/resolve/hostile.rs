//! A hostile cluster: the bundled example state with bad and stale objects
//! injected (each kind the resolver isolates). Every well-formed pod keeps its
//! groups, action and verdicts; a quarantined pod refuses everything security
//! groups filter; every injected object is named by a finding; the state is
//! never refused.

use std::net::IpAddr;
use std::path::Path;

use proptest::prelude::*;

use crate::model::{Direction, FindingKind, Model};
use crate::policy::eval::{L4Packet, L4Query, Query, Reason, evaluate};

const NODE: &str = "ip-10-0-1-10.ec2.internal";
const OTHER_NODE: &str = "ip-10-0-2-20.ec2.internal";

/// One bad or stale object, and what it may touch.
#[derive(Clone, Debug)]
enum Injection {
    /// A policy of another namespace naming a group EC2 does not list.
    PolicyWithUnknownGroup { namespace: String },
    /// A policy of the example's namespace whose selector cannot be evaluated.
    PolicyWithInvalidSelector { operator: &'static str },
    /// A policy of another namespace that cannot be read.
    UnreadablePolicy { namespace: String },
    /// A completed Job pod of this node that kept the VLAN a running pod has now.
    CompletedPod { vlan: u16, phase: &'static str },
    /// A pod of another node whose branch annotation cannot be read.
    BrokenAnnotationElsewhere,
    /// A pod of this node on a free VLAN whose branch annotation is broken: quarantined.
    BrokenAnnotationHere { vlan: u16 },
    /// A pod of this node whose annotation is not JSON: its VLAN is unknown.
    UnreadableAnnotationHere,
    /// A pod of this node asking for audit without the node's leave.
    AuditWithoutLeave { vlan: u16 },
    /// An unused group over the default rule quota.
    GroupOverQuota,
    /// An unused group naming a prefix list the state lacks.
    GroupWithUnknownPrefixList,
    /// A service account of another namespace that cannot be read.
    UnreadableServiceAccount { namespace: String },
}

impl Injection {
    /// The object's name as findings give it, and the injected file's text.
    fn render(&self, n: usize) -> (Option<String>, String) {
        // Each injection's VLAN is its own, so that two never claim one.
        let own = |vlan: u16| 100 + vlan % 500 + 600 * n as u16;
        let pod = |name: &str, node: &str, annotations: &str, phase: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  uid: uid-{name}\n  labels: {{app: web}}\n  annotations:\n{annotations}spec:\n  nodeName: {node}\nstatus:\n  phase: {phase}\n"
            )
        };
        let eni = |vlan: u16, mac: &str| {
            format!(
                "    vpc.amazonaws.com/pod-eni: '[{{\"eniId\":\"eni-0bad{n}\",\"ifAddress\":\"{mac}\",\"privateIp\":\"10.0.1.{}\",\"vlanId\":{vlan}}}]'\n",
                200 + n
            )
        };
        match self {
            Self::PolicyWithUnknownGroup { namespace } => (
                Some(format!("SecurityGroupPolicy {namespace}/typo-{n}")),
                format!(
                    "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {{name: typo-{n}, namespace: {namespace}}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  securityGroups: {{groupIds: [sg-0eeee{n:012}]}}\n"
                ),
            ),
            Self::PolicyWithInvalidSelector { operator } => (
                Some(format!("SecurityGroupPolicy shop/bad-selector-{n}")),
                format!(
                    "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {{name: bad-selector-{n}, namespace: shop}}\nspec:\n  podSelector:\n    matchExpressions: [{{key: app, operator: {operator}}}]\n  securityGroups: {{groupIds: [sg-0rds00000000000001]}}\n"
                ),
            ),
            Self::UnreadablePolicy { namespace } => (
                Some(format!("SecurityGroupPolicy {namespace}/unreadable-{n}")),
                format!(
                    "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata: {{name: unreadable-{n}, namespace: {namespace}}}\nspec:\n  podSelector: {{}}\n  securityGroups: {{groupIds: sg-0rds00000000000001}}\n"
                ),
            ),
            Self::CompletedPod { vlan, phase } => (
                None,
                pod(
                    &format!("job-{n}"),
                    NODE,
                    &eni(*vlan, "02:00:00:00:00:01"),
                    phase,
                ),
            ),
            Self::BrokenAnnotationElsewhere => (
                Some(format!("Pod shop/elsewhere-{n}")),
                pod(
                    &format!("elsewhere-{n}"),
                    OTHER_NODE,
                    &eni(7, "not-a-mac"),
                    "Running",
                ),
            ),
            Self::BrokenAnnotationHere { vlan } => (
                Some(format!("Pod shop/broken-{n}")),
                pod(
                    &format!("broken-{n}"),
                    NODE,
                    &eni(own(*vlan), "not-a-mac"),
                    "Running",
                ),
            ),
            Self::UnreadableAnnotationHere => (
                Some(format!("Pod shop/garbled-{n}")),
                pod(
                    &format!("garbled-{n}"),
                    NODE,
                    "    vpc.amazonaws.com/pod-eni: '[{\"eniId\":'\n",
                    "Running",
                ),
            ),
            Self::AuditWithoutLeave { vlan } => (
                Some(format!("Pod shop/audited-{n}")),
                pod(
                    &format!("audited-{n}"),
                    NODE,
                    &format!(
                        "    enforcer.sgp.dev/action: audit\n{}",
                        eni(own(*vlan), "02:00:00:00:00:02")
                    ),
                    "Running",
                ),
            ),
            Self::GroupOverQuota => {
                let ranges: Vec<String> = (0..61)
                    .map(|i| format!(r#"{{"CidrIp": "10.9.{i}.0/24"}}"#))
                    .collect();
                (
                    Some(format!("SecurityGroup sg-0b1b{n:013}")),
                    format!(
                        r#"{{"SecurityGroups": [{{"GroupId": "sg-0b1b{n:013}", "GroupName": "big", "Description": "",
                        "IpPermissions": [{{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 1, "IpRanges": [{}]}}],
                        "IpPermissionsEgress": []}}]}}"#,
                        ranges.join(",")
                    ),
                )
            }
            Self::GroupWithUnknownPrefixList => (
                Some(format!("SecurityGroup sg-0a1a{n:013}")),
                format!(
                    r#"{{"SecurityGroups": [{{"GroupId": "sg-0a1a{n:013}", "GroupName": "pl", "Description": "",
                    "IpPermissions": [{{"IpProtocol": "-1", "PrefixListIds": [{{"PrefixListId": "pl-0missing{n}"}}]}}],
                    "IpPermissionsEgress": []}}]}}"#
                ),
            ),
            Self::UnreadableServiceAccount { namespace } => (
                Some(format!("ServiceAccount {namespace}/sa-{n}")),
                format!(
                    "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa-{n}\n  namespace: {namespace}\n  labels: {{tier: 1}}\n"
                ),
            ),
        }
    }

    /// A pod this injection quarantines on a VLAN of its own, if any.
    fn quarantined_pod(&self, n: usize) -> Option<String> {
        match self {
            Self::BrokenAnnotationHere { .. } => Some(format!("shop/broken-{n}")),
            _ => None,
        }
    }
}

/// VLANs the example leaves free (1, 2 and 4 are its pods').
fn free_vlan() -> impl Strategy<Value = u16> {
    100u16..4000
}

fn other_namespace() -> impl Strategy<Value = String> {
    prop_oneof![Just("team-a"), Just("team-b"), Just("default")].prop_map(str::to_string)
}

fn injection() -> impl Strategy<Value = Injection> {
    prop_oneof![
        other_namespace().prop_map(|namespace| Injection::PolicyWithUnknownGroup { namespace }),
        prop_oneof![Just("In"), Just("NotIn"), Just("Equals")]
            .prop_map(|operator| Injection::PolicyWithInvalidSelector { operator }),
        other_namespace().prop_map(|namespace| Injection::UnreadablePolicy { namespace }),
        (
            prop_oneof![Just(1u16), Just(2), Just(4)],
            prop_oneof![Just("Succeeded"), Just("Failed")]
        )
            .prop_map(|(vlan, phase)| Injection::CompletedPod { vlan, phase }),
        Just(Injection::BrokenAnnotationElsewhere),
        free_vlan().prop_map(|vlan| Injection::BrokenAnnotationHere { vlan }),
        Just(Injection::UnreadableAnnotationHere),
        free_vlan().prop_map(|vlan| Injection::AuditWithoutLeave { vlan }),
        Just(Injection::GroupOverQuota),
        Just(Injection::GroupWithUnknownPrefixList),
        other_namespace().prop_map(|namespace| Injection::UnreadableServiceAccount { namespace }),
    ]
}

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/state")
}

/// The example state with `injections` written beside it, one file each.
fn hostile(injections: &[Injection]) -> (tempfile::TempDir, Vec<Option<String>>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for entry in std::fs::read_dir(example()).expect("the example state") {
        let entry = entry.expect("an entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    let mut objects = Vec::new();
    for (n, injection) in injections.iter().enumerate() {
        let (object, text) = injection.render(n);
        let name = if text.starts_with('{') {
            format!("injected-{n}.json")
        } else {
            format!("injected-{n}.yaml")
        };
        std::fs::write(dir.path().join(name), text).expect("write");
        objects.push(object);
    }
    (dir, objects)
}

/// Peers every verdict is asked about: the members of every group, and a few
/// addresses outside them.
fn peers(model: &Model) -> Vec<IpAddr> {
    let mut peers: Vec<IpAddr> = model.members.values().flatten().map(|c| c.addr()).collect();
    peers.extend(
        [
            "198.51.100.7",
            "10.0.3.25",
            "10.0.101.17",
            "2600:1f18:4a3:6965::11",
            "10.0.1.10",
        ]
        .map(|ip| ip.parse::<IpAddr>().unwrap()),
    );
    peers.sort();
    peers.dedup();
    peers
}

fn queries(model: &Model) -> Vec<Query> {
    let l4 = [
        L4Query::Packet(L4Packet::tcp(80)),
        L4Query::Packet(L4Packet::tcp(443)),
        L4Query::Packet(L4Packet::tcp(5432)),
        L4Query::Packet(L4Packet::tcp(8080)),
        L4Query::Packet(L4Packet::udp(53)),
        L4Query::Packet(L4Packet::icmp(8, 0)),
        L4Query::Packet(L4Packet::new(50, 0, 0, 0)),
        L4Query::AllTraffic,
    ];
    let mut queries = Vec::new();
    for peer in peers(model) {
        for direction in [Direction::Ingress, Direction::Egress] {
            for l4 in &l4 {
                queries.push(Query {
                    direction,
                    peer,
                    l4: *l4,
                });
            }
        }
    }
    queries
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn bad_objects_touch_only_themselves(injections in prop::collection::vec(injection(), 1..6)) {
        let baseline = crate::source::load(&example()).expect("the example loads");
        let (dir, objects) = hostile(&injections);
        let model = match crate::source::load(dir.path()) {
            Ok(model) => model,
            Err(errors) => panic!("the hostile state was refused:\n{errors}"),
        };
        // Every well-formed pod: the same groups, action, mode and verdicts.
        let queries = queries(&baseline);
        for pod in &baseline.pods {
            let now = model.pod(&pod.key()).expect("a well-formed pod stays enforced");
            prop_assert_eq!(
                (now.vlan, &now.uid, &now.groups, now.action, now.mode, now.ipv4, now.ipv6),
                (pod.vlan, &pod.uid, &pod.groups, pod.action, pod.mode, pod.ipv4, pod.ipv6)
            );
            prop_assert!(now.facts.quarantine.is_none());
            for query in &queries {
                let before = evaluate(&baseline, pod, query);
                let after = evaluate(&model, now, query);
                prop_assert_eq!(
                    (before.allowed, &before.reason),
                    (after.allowed, &after.reason),
                    "pod {} query {:?}", pod.key(), query
                );
            }
        }
        // A quarantined pod allows nothing security groups filter.
        for (n, injection) in injections.iter().enumerate() {
            if let Some(key) = injection.quarantined_pod(n) {
                let pod = model.pod(&key).expect("quarantined on its VLAN");
                prop_assert!(pod.groups.is_empty() && pod.facts.quarantine.is_some());
                for query in &queries {
                    let verdict = evaluate(&model, pod, query);
                    prop_assert!(
                        !verdict.allowed || matches!(verdict.reason, Reason::Unfiltered(_)),
                        "{} allowed {:?}: {:?}", key, query, verdict.reason
                    );
                }
            }
        }
        // Every injected object is named by a finding; nothing else is.
        let named: Vec<&str> = model.findings.iter().map(|f| f.at.object.as_str()).collect();
        for object in objects.iter().flatten() {
            prop_assert!(named.contains(&object.as_str()), "{object} not in {named:#?}");
        }
        for finding in &model.findings {
            let expected = |f: &crate::model::Finding| {
                (f.kind, &f.at.object, &f.at.field, &f.at.message)
                    == (finding.kind, &finding.at.object, &finding.at.field, &finding.at.message)
            };
            prop_assert!(
                objects.iter().flatten().any(|o| *o == finding.at.object)
                    || baseline.findings.iter().any(expected),
                "a finding no injection explains: {finding}"
            );
        }
        prop_assert!(model.findings_of(FindingKind::Quarantined).count() <= injections.len());
    }
}
