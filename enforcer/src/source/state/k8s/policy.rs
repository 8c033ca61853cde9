//! A ServiceAccount and a SecurityGroupPolicy with its label selectors.

use std::path::Path;

use super::super::reader::{Field, Invalid, Problems};
use super::super::{Inventory, Located, Reference, Target};
use super::meta::{labels, namespaced_name, object_name};
use crate::model::sgp::{LabelSelector, Labels, Operator, Requirement, SecurityGroupPolicy};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
}

pub(crate) fn service_account(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    let (namespace, name) = namespaced_name(&root, &mut problems);
    let labels = labels(&root, &mut problems);
    let object = object_name("ServiceAccount", &namespace, name.as_deref());
    let account = name.map(|name| ServiceAccount {
        namespace,
        name,
        labels,
    });
    inventory.admit(|i| &mut i.service_accounts, file, object, account, problems);
}

pub(crate) fn security_group_policy(file: &Path, root: Field, inventory: &mut Inventory) {
    let mut problems = Problems::default();
    // A selector that cannot be evaluated makes the VPC resource controller skip
    // the policy (`filterPodSecurityGroups` in its pkg/utils/helper.go: the
    // selector never matches): it selects no pod, here as there.
    let mut selector_problems = Problems::default();
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
        policy.pod_selector = selector("podSelector", &mut selector_problems);
        policy.service_account_selector =
            selector("serviceAccountSelector", &mut selector_problems);
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
    if name.is_none() {
        problems.report(file, &object, &mut inventory.errors);
        selector_problems.report(file, &object, &mut inventory.errors);
        return;
    }
    if !selector_problems.is_empty() {
        inventory.skipped.extend(
            selector_problems
                .into_errors(file, &object)
                .into_iter()
                .map(|mut e| {
                    e.message = format!(
                        "{}: the policy selects no pod (the VPC resource controller skips it too)",
                        e.message
                    );
                    e
                }),
        );
        return;
    }
    inventory.add_references(file, &object, references);
    let located = Located::with_problems(file, object, policy, problems);
    inventory.policies.push(located);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::state::testdir::StateDir;

    const SGP: &str = "apiVersion: vpcresources.k8s.aws/v1beta1\nkind: SecurityGroupPolicy\nmetadata:\n  name: db\n  namespace: shop\n";

    #[test]
    fn policy_parses_selectors() {
        let text = format!(
            "{SGP}spec:\n  podSelector:\n    matchLabels: {{app: db}}\n    matchExpressions:\n    - {{key: tier, operator: NotIn, values: [web]}}\n    - {{key: env, operator: Exists}}\n  serviceAccountSelector: {{}}\n  securityGroups:\n    groupIds: [sg-0node]\n"
        );
        let dir = StateDir::with_node().file("sgp.yaml", &text);
        let mut inventory = crate::source::state::Inventory::default();
        for doc in crate::source::state::reader::documents(
            &dir.path().join("sgp.yaml"),
            &mut inventory.errors,
        ) {
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
        // A group EC2 does not list (yet) is a warning on the policy; the pods it
        // gives that group are quarantined (source/resolve tests).
        let dir = StateDir::with_node().file(
            "sgp.yaml",
            &format!("{SGP}spec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  securityGroups: {{groupIds: [sg-0node, sg-0rds]}}\n"),
        );
        let warnings = dir.findings(crate::model::FindingKind::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(
            warnings[0]
                .contains("spec.securityGroups.groupIds[1]: security group sg-0rds is not defined")
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
}
