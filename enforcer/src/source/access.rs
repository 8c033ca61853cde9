//! What the agent reads from the cluster and from EC2, as lists: the live sources
//! (`live/kube.rs`, `live/ec2/`) read exactly this, and an operator exports the same into a
//! state directory (`state/`) for the file source. The deployment's
//! permissions are checked against these lists, not written by hand: the
//! ClusterRole in `deploy/agent/rbac.yaml` and `deploy/iam-policy.json`
//! (`tests/tests/manifests.rs`). The sources' requests to the stand-in API server
//! and to moto are checked against them too (`tests/tests/live.rs`,
//! `tests/tests/controller.rs`). The same for `enforcer controller`
//! ([`CONTROLLER`], `deploy/controller/rbac.yaml`) and for agents reading its views
//! ([`CONTROLLER_MODE`]).

/// A Kubernetes resource the agent reads, and the verbs it needs on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubernetesRead {
    /// The API group (`""` for the core group).
    pub group: &'static str,
    /// The resource, plural, as RBAC names it.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// A reflector lists, then watches from the list's version; it never gets one object.
const WATCH: &[&str] = &["list", "watch"];

/// What an agent reads besides [`KUBERNETES`] when its groups come from the
/// controller (`--ec2 controller`, or `auto` with the CRD installed), instead of EC2.
pub const CONTROLLER_MODE: &[KubernetesRead] = &[
    // The groups, members and prefix lists `enforcer controller` publishes.
    KubernetesRead {
        group: "enforcer.sgp.dev",
        resource: "securitygroupviews",
        verbs: WATCH,
    },
    // A Warning event on the node when the views turn stale (a repeat patches it).
    KubernetesRead {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// What `enforcer controller` reads and writes in the cluster (its EC2 reads are [`EC2`]).
pub const CONTROLLER: &[KubernetesRead] = &[
    // Nodes: their instances (`spec.providerID`), whose ENIs carry the nodes' groups.
    KubernetesRead {
        group: "",
        resource: "nodes",
        verbs: WATCH,
    },
    // SecurityGroupPolicies: the pods' groups.
    KubernetesRead {
        group: "vpcresources.k8s.aws",
        resource: "securitygrouppolicies",
        verbs: WATCH,
    },
    // Its views: followed, applied (server-side), and deleted when a group is no longer needed.
    KubernetesRead {
        group: "enforcer.sgp.dev",
        resource: "securitygroupviews",
        // A server-side apply that creates its object is authorized as `create`.
        verbs: &["create", "delete", "list", "patch", "watch"],
    },
    KubernetesRead {
        group: "enforcer.sgp.dev",
        resource: "securitygroupviews/status",
        verbs: &["patch"],
    },
    // Leader election (a Role in its own namespace).
    KubernetesRead {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
    },
];

/// The Kubernetes objects of the state directory (the node itself comes from IMDS).
pub const KUBERNETES: &[KubernetesRead] = &[
    // Pods: branch ENIs (`vpc.amazonaws.com/pod-eni`), labels, service accounts, addresses.
    KubernetesRead {
        group: "",
        resource: "pods",
        verbs: WATCH,
    },
    // ServiceAccounts: the labels `serviceAccountSelector` matches.
    KubernetesRead {
        group: "",
        resource: "serviceaccounts",
        verbs: WATCH,
    },
    // SecurityGroupPolicies: the VPC resource controller's CRD, not ours.
    KubernetesRead {
        group: "vpcresources.k8s.aws",
        resource: "securitygrouppolicies",
        verbs: WATCH,
    },
];

/// The EC2 API actions (IAM names) behind the state directory's EC2 files.
pub const EC2: &[&str] = &[
    // security-groups.json: every group's rules.
    "ec2:DescribeSecurityGroups",
    // network-interfaces.json: the members of groups that rules reference.
    "ec2:DescribeNetworkInterfaces",
    // prefix-list-*.json: the prefix lists that rules reference, and their entries.
    "ec2:DescribeManagedPrefixLists",
    "ec2:GetManagedPrefixListEntries",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policies_are_read_from_the_group_the_state_parses() {
        let sgp = KUBERNETES
            .iter()
            .find(|r| r.resource == "securitygrouppolicies")
            .expect("securitygrouppolicies are read");
        let (group, _version) = crate::source::state::SGP_API_VERSION
            .split_once('/')
            .expect("group/version");
        assert_eq!(sgp.group, group);
    }
}
