//! Kubernetes objects as `kubectl get -o yaml|json` prints them (Pod, ServiceAccount,
//! SecurityGroupPolicy) and this node's `NodeConfig`.

mod meta;
mod node;
mod pod;
mod policy;

pub(crate) use node::node_config;
pub use pod::ACTION_ANNOTATION;
#[cfg(feature = "live")]
pub(crate) use pod::POD_ENI_ANNOTATION;
pub(crate) use pod::{BranchEni, Pod, pod};
pub(crate) use policy::{ServiceAccount, security_group_policy, service_account};

#[cfg(test)]
mod tests {
    use crate::source::state::testdir::StateDir;

    #[test]
    fn duplicated_pod_and_service_account() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n";
        let account =
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop}\n";
        let dir = StateDir::with_node()
            .file("a.yaml", &format!("{pod}---\n{account}"))
            .file("b.yaml", &format!("{pod}---\n{account}"));
        // Which of the two is right cannot be known: both are set aside.
        let errors = dir.errors();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("b.yaml: Pod shop/p: defined twice: also in"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("b.yaml: ServiceAccount shop/sa: defined twice"))
        );
    }
}
