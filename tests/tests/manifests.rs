//! `deploy/` as Kubernetes and IAM read it: every object `kubectl kustomize` renders
//! parses as its k8s-openapi type with no field left over (`enforcer_tests::deploy`),
//! the DaemonSet is what the issue asks of it, and its permissions are exactly what
//! the agent reads (`enforcer::source::access`), checked against that list.

use std::collections::{BTreeMap, BTreeSet};

use enforcer_tests::deploy::{self, Rendered};
use enforcer_tests::testbed::scenario::example_state;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Subject};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn pod_spec(rendered: &Rendered) -> &PodSpec {
    rendered
        .daemon_set()
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod template")
}

fn agent(rendered: &Rendered) -> &Container {
    let spec = pod_spec(rendered);
    assert_eq!(spec.containers.len(), 1, "one container: the agent");
    &spec.containers[0]
}

/// The value after `flag` in `container`'s arguments.
fn argument<'a>(container: &'a Container, flag: &str) -> &'a str {
    let args = container.args.as_deref().unwrap_or_default();
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{} has no {flag}: {args:?}", container.name));
    &args[at + 1]
}

#[test]
fn the_daemon_set_runs_one_agent_per_trunk_node_on_the_host() {
    let rendered = deploy::render("");
    let daemon_set = rendered.daemon_set();
    assert_eq!(
        daemon_set.metadata.namespace.as_deref(),
        Some("kube-system")
    );
    let spec = pod_spec(&rendered);
    // Only nodes with a trunk ENI.
    let terms = &spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("a required node affinity")
        .node_selector_terms;
    assert_eq!(terms.len(), 1);
    let expressions = terms[0].match_expressions.as_deref().unwrap_or_default();
    assert_eq!(expressions.len(), 1);
    assert_eq!(expressions[0].key, "vpc.amazonaws.com/has-trunk-attached");
    assert_eq!(expressions[0].operator, "In");
    assert_eq!(
        expressions[0].values.as_deref(),
        Some(&["true".to_string()][..])
    );
    // Every taint tolerated, node-critical, on the host's network.
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "all taints tolerated: {tolerations:?}"
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.host_network, Some(true));
    let agent = agent(&rendered);
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    // Never an uninstall on stop.
    assert!(agent.lifecycle.is_none(), "no preStop/postStart hooks");
    // NODE_NAME from the downward API.
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(node_name.field_path, "spec.nodeName");
    // Measured requests and limits, both set.
    let resources = agent.resources.as_ref().expect("resources");
    for (what, quantities) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let quantities = quantities.as_ref().unwrap_or_else(|| panic!("no {what}"));
        assert!(quantities.contains_key("memory"), "no memory {what}");
    }
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu"))
    );
    // A rolling update that never takes every node at once.
    let strategy = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let max_unavailable = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.max_unavailable.as_ref())
        .expect("maxUnavailable");
    match max_unavailable {
        IntOrString::Int(n) => assert!(*n >= 1, "maxUnavailable {n}"),
        IntOrString::String(percent) => {
            let value: u32 = percent
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("maxUnavailable {percent}"));
            assert!((1..50).contains(&value), "maxUnavailable {percent}");
        }
    }
}

#[test]
fn the_probes_and_mounts_are_the_agents_own() {
    let rendered = deploy::render("agent");
    let agent = agent(&rendered);
    // The probes ask the endpoint the agent serves, where the kubelet reaches it.
    let (host, port) = argument(agent, "--metrics-addr")
        .rsplit_once(':')
        .expect("HOST:PORT");
    for (probe, path) in [
        (&agent.readiness_probe, "/readyz"),
        (&agent.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.host.as_deref(),
            Some(host),
            "{path}: the address it listens on"
        );
        assert_eq!(get.port, IntOrString::Int(port.parse().expect("a port")));
    }
    // bpffs under the pin path, the report directory, the state from its ConfigMap.
    let spec = pod_spec(&rendered);
    let volume = |mount_path: &str| {
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted on {mount_path}"));
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name))
    };
    let pin_path = argument(agent, "--pin-path");
    assert!(
        pin_path.starts_with("/sys/fs/bpf/"),
        "pins on bpffs: {pin_path}"
    );
    let bpffs = volume("/sys/fs/bpf")
        .host_path
        .as_ref()
        .expect("a hostPath");
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    let run = volume(enforcer::observe::status::REPORT_DIR)
        .host_path
        .as_ref()
        .expect("a hostPath");
    assert_eq!(run.path, enforcer::observe::status::REPORT_DIR);
    let state = volume(argument(agent, "--state"))
        .config_map
        .as_ref()
        .expect("the state from a ConfigMap");
    assert!(
        rendered
            .config_maps
            .iter()
            .any(|c| c.metadata.name == Some(state.name.clone())),
        "the ConfigMap {} is part of the base",
        state.name
    );
}

/// The base (`kubectl apply -k deploy/`) runs the live sources: `--source cluster`,
/// the enforcing mode as aws-node takes it, no state directory and no ConfigMap; the
/// rest of the agent is the state-directory variant's (`deploy/agent`).
#[test]
fn the_base_runs_the_agent_on_the_live_sources() {
    let rendered = deploy::render("");
    let agent = agent(&rendered);
    assert_eq!(argument(agent, "--source"), "cluster");
    let args = agent.args.as_deref().unwrap_or_default();
    assert!(!args.iter().any(|a| a == "--state"), "{args:?}");
    assert!(rendered.config_maps.is_empty(), "no state ConfigMap");
    let mode = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_SECURITY_GROUP_ENFORCING_MODE")
        .and_then(|e| e.value.as_deref());
    assert_eq!(mode, Some("strict"));
    let spec = pod_spec(&rendered);
    let mounts: Vec<_> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        ["/sys/fs/bpf", enforcer::observe::status::REPORT_DIR]
    );
    assert_eq!(spec.volumes.as_ref().map(Vec::len), Some(2));
    // The same agent otherwise: the state-directory variant differs only there.
    let file = deploy::render("agent");
    let file_agent = self::agent(&file);
    assert_eq!(agent.image, file_agent.image);
    assert_eq!(agent.readiness_probe, file_agent.readiness_probe);
    assert_eq!(agent.security_context, file_agent.security_context);
    assert_eq!(
        argument(agent, "--pin-path"),
        argument(file_agent, "--pin-path")
    );
    assert_eq!(
        argument(agent, "--metrics-addr"),
        argument(file_agent, "--metrics-addr")
    );
}

/// The example ConfigMap is the example state directory, every file of it.
#[test]
fn the_state_config_map_is_the_example_state() {
    let rendered = deploy::render("agent");
    assert_eq!(rendered.config_maps.len(), 1);
    let data = rendered.config_maps[0].data.clone().unwrap_or_default();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(example_state()).expect("the example state") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if name != "README.md" {
            files.insert(name, std::fs::read_to_string(&path).expect("read"));
        }
    }
    assert_eq!(data, files);
}

type Grant = (String, String, String);

/// What a role's rules allow: (API group, resource, verb).
fn rules(rules: &Option<Vec<PolicyRule>>) -> BTreeSet<Grant> {
    let mut granted = BTreeSet::new();
    for rule in rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

/// What `list` says is read or written, as grants.
fn grants(list: &[enforcer::source::access::KubernetesRead]) -> BTreeSet<Grant> {
    list.iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.group.to_string(), r.resource.to_string(), v.to_string()))
        })
        .collect()
}

/// Controller mode: the agents read the views (`--ec2 controller`); the controller
/// runs as two replicas under a PodDisruptionBudget, with exactly the permissions
/// `enforcer::source::access::CONTROLLER` lists (its Lease's in its own namespace),
/// and the CRD is the one the code generates.
#[test]
fn controller_mode_runs_two_controllers_with_their_permissions_and_the_crd() {
    let rendered = deploy::render("controller-mode");
    let agent = agent(&rendered);
    let args = &agent.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--ec2").expect("--ec2");
    assert_eq!(args[at + 1], "controller");

    assert_eq!(rendered.deployments.len(), 1);
    let deployment = &rendered.deployments[0];
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.args.as_ref().unwrap()[0], "controller");
    let env: BTreeSet<(String, String)> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let path = &e.value_from.as_ref()?.field_ref.as_ref()?.field_path;
            Some((e.name.clone(), path.clone()))
        })
        .collect();
    assert!(env.contains(&("POD_NAME".into(), "metadata.name".into())));
    assert!(env.contains(&("POD_NAMESPACE".into(), "metadata.namespace".into())));
    let account = pod.service_account_name.clone().unwrap();
    let namespace = deployment.metadata.namespace.clone().unwrap();

    let budget = &rendered.pod_disruption_budgets[0];
    let budget_spec = budget.spec.as_ref().unwrap();
    assert_eq!(budget_spec.min_available, Some(IntOrString::Int(1)));
    assert_eq!(
        budget_spec.selector.as_ref().unwrap().match_labels,
        spec.selector.match_labels
    );

    // The controller's grants: its ClusterRole's and, in its namespace, its Role's.
    let bound_to_controller = |subjects: &Option<Vec<Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_ref() == Some(&namespace)
        })
    };
    let mut granted = BTreeSet::new();
    for binding in rendered
        .cluster_role_bindings
        .iter()
        .filter(|b| bound_to_controller(&b.subjects))
    {
        let role = rendered
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_ref() == Some(&binding.role_ref.name))
            .expect("the bound ClusterRole");
        granted.extend(rules(&role.rules));
    }
    for binding in rendered
        .role_bindings
        .iter()
        .filter(|b| bound_to_controller(&b.subjects))
    {
        assert_eq!(binding.metadata.namespace.as_ref(), Some(&namespace));
        let role = rendered
            .roles
            .iter()
            .find(|r| r.metadata.name.as_ref() == Some(&binding.role_ref.name))
            .expect("the bound Role");
        assert_eq!(role.metadata.namespace.as_ref(), Some(&namespace));
        let leases = rules(&role.rules);
        assert!(leases.iter().all(|(_, resource, _)| resource == "leases"));
        granted.extend(leases);
    }
    assert_eq!(
        granted,
        grants(enforcer::source::access::CONTROLLER),
        "the controller's roles against enforcer::source::access::CONTROLLER"
    );

    let crd = enforcer::source::live::view::crd();
    assert_eq!(rendered.custom_resource_definitions.len(), 1);
    assert_eq!(rendered.custom_resource_definitions[0].spec, crd.spec);
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    for column in ["Group", "Rules", "Members", "Age"] {
        assert!(columns.iter().any(|c| c == column), "{columns:?}");
    }
}

/// The ClusterRole allows exactly what `enforcer::source::access::KUBERNETES` and
/// `CONTROLLER_MODE` read, bound to the DaemonSet's service account.
#[test]
fn rbac_grants_what_the_agent_reads_and_nothing_more() {
    let rendered = deploy::render("");
    assert_eq!(rendered.cluster_roles.len(), 1);
    let role = &rendered.cluster_roles[0];
    let read: BTreeSet<_> = grants(enforcer::source::access::KUBERNETES)
        .union(&grants(enforcer::source::access::CONTROLLER_MODE))
        .cloned()
        .collect();
    assert_eq!(
        rules(&role.rules),
        read,
        "the ClusterRole against enforcer::source::access::KUBERNETES and CONTROLLER_MODE"
    );
    // Bound to the agent's service account, which the base creates.
    assert_eq!(rendered.service_accounts.len(), 1);
    let account = &rendered.service_accounts[0].metadata;
    assert_eq!(
        pod_spec(&rendered).service_account_name.as_ref(),
        account.name.as_ref()
    );
    assert_eq!(rendered.cluster_role_bindings.len(), 1);
    let binding = &rendered.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.name.as_ref());
    assert_eq!(subjects[0].namespace, account.namespace);
}

/// `deploy/iam-policy.json` allows exactly the EC2 reads of `enforcer::source::access::EC2`.
#[test]
fn the_iam_policy_allows_the_ec2_reads_and_nothing_more() {
    let path = deploy::workspace_root().join("deploy/iam-policy.json");
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read the policy"))
            .expect("the policy is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let mut allowed = BTreeSet::new();
    for statement in policy["Statement"].as_array().expect("statements") {
        assert_eq!(statement["Effect"], "Allow");
        assert_eq!(
            statement["Resource"], "*",
            "EC2 describe calls take no resource"
        );
        for action in statement["Action"].as_array().expect("actions") {
            allowed.insert(action.as_str().expect("an action").to_string());
        }
    }
    let reads: BTreeSet<String> = enforcer::source::access::EC2
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(
        allowed, reads,
        "the IAM policy against enforcer::source::access::EC2"
    );
    for action in &allowed {
        assert!(
            action.starts_with("ec2:Describe") || action.starts_with("ec2:Get"),
            "{action} is not a read"
        );
    }
}

/// The `remove` overlay runs `enforcer uninstall` on the agent's pin path, with the
/// agent's image and host mounts, and no agent.
#[test]
fn the_remove_overlay_uninstalls_the_agents_pins() {
    let base = deploy::render("");
    let remove = deploy::render("remove");
    let agent = agent(&base);
    let spec = pod_spec(&remove);
    assert!(
        spec.containers.iter().all(|c| c.image != agent.image),
        "no agent runs in the remove overlay"
    );
    let init = spec.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].image, agent.image);
    assert_eq!(
        init[0]
            .args
            .as_deref()
            .unwrap_or_default()
            .first()
            .map(String::as_str),
        Some("uninstall")
    );
    assert_eq!(
        argument(&init[0], "--pin-path"),
        argument(agent, "--pin-path")
    );
    assert_eq!(
        init[0].security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    assert!(
        init[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/sys/fs/bpf"),
        "the uninstall sees the host's bpffs"
    );
}
