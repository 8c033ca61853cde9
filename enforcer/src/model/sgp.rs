//! `SecurityGroupPolicy` objects and Kubernetes label selectors: which policies
//! select a pod, and the groups its branch ENI gets, as the VPC resource controller decides.

use std::collections::BTreeMap;

use crate::model::GroupId;

/// Labels of a pod or a service account.
pub type Labels = BTreeMap<String, String>;

/// A Kubernetes `LabelSelector`: every `matchLabels` pair and every
/// expression must hold; an empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "In" => Some(Self::In),
            "NotIn" => Some(Self::NotIn),
            "Exists" => Some(Self::Exists),
            "DoesNotExist" => Some(Self::DoesNotExist),
            _ => None,
        }
    }
}

impl Requirement {
    /// Kubernetes semantics: `NotIn` also holds when the key is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        let listed = || value.is_some_and(|v| self.values.contains(v));
        match self.operator {
            Operator::In => listed(),
            Operator::NotIn => !listed(),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// A `vpcresources.k8s.aws/v1beta1` `SecurityGroupPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroupPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Option<LabelSelector>,
    pub service_account_selector: Option<LabelSelector>,
    pub group_ids: Vec<GroupId>,
}

impl SecurityGroupPolicy {
    /// Whether this policy selects a pod of `namespace` with `pod_labels`, whose
    /// service account carries `service_account_labels`. A policy without any
    /// selector or without groups selects nothing; with both selectors, both must match.
    pub fn selects(
        &self,
        namespace: &str,
        pod_labels: &Labels,
        service_account_labels: &Labels,
    ) -> bool {
        !self.group_ids.is_empty()
            && self.selectors_match(namespace, pod_labels, service_account_labels)
    }

    /// Whether the policy's namespace and selectors take in such a pod, its groups
    /// aside: what a policy whose groups cannot be read may select.
    pub fn selectors_match(
        &self,
        namespace: &str,
        pod_labels: &Labels,
        service_account_labels: &Labels,
    ) -> bool {
        if self.namespace != namespace {
            return false;
        }
        let pod = self.pod_selector.as_ref().map(|s| s.matches(pod_labels));
        let account = self
            .service_account_selector
            .as_ref()
            .map(|s| s.matches(service_account_labels));
        match (pod, account) {
            (None, None) => false,
            (pod, account) => pod.unwrap_or(true) && account.unwrap_or(true),
        }
    }
}

/// The policies that select a pod, ordered by name as the controller lists them.
pub fn matching<'p>(
    policies: impl IntoIterator<Item = &'p SecurityGroupPolicy>,
    namespace: &str,
    pod_labels: &Labels,
    service_account_labels: &Labels,
) -> Vec<&'p SecurityGroupPolicy> {
    let mut selected: Vec<_> = policies
        .into_iter()
        .filter(|p| p.selects(namespace, pod_labels, service_account_labels))
        .collect();
    selected.sort_by(|a, b| a.name.cmp(&b.name));
    selected
}

/// The union of the policies' `groupIds`, de-duplicated in first-seen order.
/// Empty when no policy matched: the caller falls back to the node's groups.
pub fn union_of_groups(policies: &[&SecurityGroupPolicy]) -> Vec<GroupId> {
    let mut groups: Vec<GroupId> = Vec::new();
    for id in policies.iter().flat_map(|p| &p.group_ids) {
        if !groups.contains(id) {
            groups.push(id.clone());
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn requirement(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn operators_follow_kubernetes() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let none = Labels::new();
        let cases = [
            (
                requirement("app", Operator::In, &["web", "db"]),
                true,
                false,
            ),
            (requirement("app", Operator::In, &["db"]), false, false),
            (requirement("app", Operator::NotIn, &["db"]), true, true),
            (requirement("app", Operator::NotIn, &["web"]), false, true),
            (requirement("app", Operator::Exists, &[]), true, false),
            (requirement("app", Operator::DoesNotExist, &[]), false, true),
        ];
        for (r, on_web, on_none) in cases {
            assert_eq!(r.matches(&web), on_web, "{r:?} on web");
            assert_eq!(r.matches(&none), on_none, "{r:?} without labels");
        }
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let selector = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![requirement("tier", Operator::In, &["front"])],
        };
        assert!(selector.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!selector.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert!(!selector.matches(&labels(&[("app", "db"), ("tier", "front")])));
        assert!(!selector.matches(&labels(&[("tier", "front")])));
        assert!(LabelSelector::default().matches(&Labels::new()));
        assert!(LabelSelector::default().matches(&labels(&[("any", "thing")])));
    }

    fn policy(
        name: &str,
        pod: Option<LabelSelector>,
        account: Option<LabelSelector>,
        groups: &[&str],
    ) -> SecurityGroupPolicy {
        SecurityGroupPolicy {
            namespace: "shop".into(),
            name: name.into(),
            pod_selector: pod,
            service_account_selector: account,
            group_ids: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn app(value: &str) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: labels(&[("app", value)]),
            match_expressions: Vec::new(),
        })
    }

    #[test]
    fn selectors_of_a_policy() {
        let web = labels(&[("app", "web")]);
        let db_account = labels(&[("app", "db")]);
        let none = Labels::new();
        let by_pod = policy("p", app("web"), None, &["sg-1"]);
        assert!(by_pod.selects("shop", &web, &none));
        assert!(!by_pod.selects("shop", &none, &web));
        let by_account = policy("a", None, app("db"), &["sg-1"]);
        assert!(by_account.selects("shop", &none, &db_account));
        assert!(!by_account.selects("shop", &db_account, &none));
        let both = policy("b", app("web"), app("db"), &["sg-1"]);
        assert!(both.selects("shop", &web, &db_account));
        assert!(!both.selects("shop", &web, &none));
        assert!(!both.selects("shop", &none, &db_account));
        let everything = policy("e", Some(LabelSelector::default()), None, &["sg-1"]);
        assert!(everything.selects("shop", &none, &none));
    }

    #[test]
    fn policies_without_selector_or_groups_select_nothing() {
        let none = Labels::new();
        assert!(!policy("n", None, None, &["sg-1"]).selects("shop", &none, &none));
        let empty = Some(LabelSelector::default());
        assert!(!policy("g", empty, None, &[]).selects("shop", &none, &none));
    }

    #[test]
    fn only_the_pods_namespace_counts() {
        let web = labels(&[("app", "web")]);
        let p = policy("p", app("web"), None, &["sg-1"]);
        assert!(!p.selects("staging", &web, &Labels::new()));
        assert!(matching([&p], "staging", &web, &Labels::new()).is_empty());
    }

    #[test]
    fn union_in_policy_name_order() {
        let web = labels(&[("app", "web")]);
        let policies = [
            policy("zeta", app("web"), None, &["sg-3", "sg-1"]),
            policy("alpha", app("web"), None, &["sg-2", "sg-3"]),
            policy("beta", app("db"), None, &["sg-9"]),
            policy(
                "mid",
                Some(LabelSelector::default()),
                None,
                &["sg-1", "sg-4"],
            ),
        ];
        let matched = matching(&policies, "shop", &web, &Labels::new());
        let names: Vec<_> = matched.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(union_of_groups(&matched), ["sg-2", "sg-3", "sg-1", "sg-4"]);
        assert!(union_of_groups(&[]).is_empty());
    }
}
