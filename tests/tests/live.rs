//! The live sources (`--source cluster`) against stand-ins, since no cluster and no
//! AWS account can be had here: a fake Kubernetes API server that lists and watches
//! (`enforcer_tests::live::kube_api`, its limits written there), moto's EC2 server
//! seeded through boto3 (trunk and branch ENI types set in moto's backend, which
//! ignores them) and a local IMDSv2 responder. The real `enforcer` binary reads them
//! through a kubeconfig and the AWS SDK's standard variables.

mod agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_support::{
    METRICS_PORT, Node, PEER, TestPod, check_stdout, enforcer_binary, syn_to, wait_for,
};
use enforcer::model::EnforcingMode;
use enforcer_common::Reason;
use enforcer_tests::live::example::{
    aws_env, example_dir, example_node_imds, free_port, instance_with_trunk, kubernetes_objects,
    metadata, tempfile_dir,
};
use enforcer_tests::live::imds::Imds;
use enforcer_tests::live::kube_api::{DEFAULT_USER, Kind, KubeApi};
use enforcer_tests::live::moto::{self, Moto};
use enforcer_tests::testbed::scenario::{self, example_flows, example_state};
use enforcer_tests::testbed::{NodeSpec, VirtualNode, matrix};
use serde_json::{Value, json};

/// In EC2, each branch pod of another node has its branch ENI, carrying its groups:
/// what makes it a member of them for this node (whose API view has only its own
/// pods). Creates those ENIs in moto, with the groups the file source gives each pod
/// as a member when it reads all pods from `dir`.
fn other_nodes_branch_enis(moto: &mut Moto, dir: &Path, node: &str, seeded: &Value) {
    let model = enforcer::source::load(dir).expect("the example loads");
    for pod in kubernetes_objects(dir) {
        let annotation = &pod["metadata"]["annotations"]["vpc.amazonaws.com/pod-eni"];
        let (Some(annotation), false) = (annotation.as_str(), pod["spec"]["nodeName"] == node)
        else {
            continue;
        };
        let enis: Vec<Value> = serde_json::from_str(annotation).expect("the annotation");
        for eni in enis {
            let ip = eni["privateIp"].as_str().expect("privateIp");
            let address: std::net::IpAddr = ip.parse().expect("an address");
            let groups: Vec<&String> = model
                .members
                .iter()
                .filter(|(_, prefixes)| prefixes.iter().any(|p| p.contains(address)))
                .map(|(group, _)| group)
                .collect();
            let subnet = format!("{}.0/24", ip.rsplit_once('.').expect("IPv4").0);
            let id = eni["eniId"].as_str().expect("eniId");
            moto.next_ids("eni", &[id]).unwrap();
            moto.call(
                "create_network_interface",
                json!({"SubnetId": seeded["subnets"][&subnet], "Groups": groups,
                       "PrivateIpAddress": ip, "Description": "aws-k8s-branch-eni"}),
            )
            .expect("a branch ENI of another node");
            moto.set_interface_type(id, "branch").unwrap();
        }
    }
}

/// The example state served live: moto holds its EC2 objects (same IDs), the fake API
/// server its Pods, ServiceAccounts and SecurityGroupPolicies, IMDS its node. A
/// snapshot of that view loads with `check` as the example does, says the same, and
/// holds exactly what was served (this node's pods).
#[test]
fn a_snapshot_of_the_served_example_reads_as_the_example() {
    let work = tempfile_dir("snapshot");
    let started = Instant::now();
    let mut moto = Moto::start(Command::new(moto::python()), free_port()).expect("moto");
    eprintln!("moto started in {:?}", started.elapsed());
    let seeded = moto
        .seed(&example_dir())
        .expect("seed moto with the example");
    let subnet = seeded["subnets"]["10.0.1.0/24"]
        .as_str()
        .expect("the node's subnet")
        .to_string();
    let (instance, trunk_id, _) =
        instance_with_trunk(&mut moto, &subnet, &["sg-0node0000000000001"], "10.0.1.11");
    let kube = KubeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).expect("the API");
    let objects = kubernetes_objects(&example_dir());
    for object in &objects {
        kube.apply(object.clone());
    }
    let node = "ip-10-0-1-10.ec2.internal";
    let imds = example_node_imds(&instance);
    let kubeconfig = kube.kubeconfig(&work).expect("kubeconfig");
    let out_dir = work.join("snapshot");
    let snapshot = |out: &Path| {
        let mut command = Command::new(enforcer_binary());
        command
            .args([
                "snapshot",
                "--source",
                "cluster",
                "--timeout",
                "30",
                "--kubeconfig",
            ])
            .arg(&kubeconfig)
            .args([
                "--trunk-interface",
                "eth1",
                "--primary-interface",
                "eth0",
                "--node-config",
            ])
            .arg(example_dir().join("node-config.yaml"))
            .arg("--out")
            .arg(out)
            .env("NODE_NAME", node)
            .env("RUST_LOG", "warn")
            .env_remove("POD_SECURITY_GROUP_ENFORCING_MODE");
        aws_env(&mut command, &moto, &imds);
        let started = Instant::now();
        let out = command.output().expect("run enforcer snapshot");
        eprintln!("snapshot took {:?}", started.elapsed());
        assert!(
            out.status.success(),
            "enforcer snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    snapshot(&out_dir);
    assert_eq!(check_stdout(&out_dir), check_stdout(&example_dir()));

    // What was served, and only that: this node's pods, every policy and account.
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(out_dir.join(name)).expect(name);
        serde_json::from_str(&text).expect("JSON")
    };
    let names = |list: &Value| -> Vec<String> {
        let mut names: Vec<String> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        names.sort();
        names
    };
    let served = |kind: &str, on_node: bool| -> Vec<String> {
        let mut names: Vec<String> = objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .filter(|o| !on_node || o["spec"]["nodeName"] == node)
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap_or("default"),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&read("kubernetes-pods.json")), served("Pod", true));
    assert!(
        served("Pod", false).len() > served("Pod", true).len(),
        "the example has pods of other nodes"
    );
    assert_eq!(
        names(&read("kubernetes-serviceaccounts.json")),
        served("ServiceAccount", false)
    );
    assert_eq!(
        names(&read("kubernetes-securitygrouppolicies.json")),
        served("SecurityGroupPolicy", false)
    );
    let enis = read("ec2-network-interfaces.json");
    let eni_ids: Vec<&str> = enis["NetworkInterfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["NetworkInterfaceId"].as_str().unwrap())
        .collect();
    assert!(eni_ids.contains(&trunk_id.as_str()), "{eni_ids:?}");
    let config = std::fs::read_to_string(out_dir.join("node-config.json")).unwrap();
    assert!(config.contains(&instance), "{config}");

    // Byte for byte the same view again (nothing changed in between).
    let again = work.join("again");
    snapshot(&again);
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(again.join(name)).unwrap(),
            "{name:?} differs between two snapshots of the same view"
        );
    }
    the_sources_read_what_access_lists(&kube, &mut moto);
    let _ = std::fs::remove_dir_all(&work);
}

/// The live sources read exactly what `enforcer::source::access` lists, which the
/// deployment's RBAC and IAM policy are checked against (`tests/manifests.rs`): a
/// source that read more would be refused on a real cluster, one that read less would
/// leave a permission granted for nothing.
fn the_sources_read_what_access_lists(kube: &KubeApi, moto: &mut Moto) {
    use enforcer::source::access;
    assert_eq!(
        kube.unserved(),
        Vec::<String>::new(),
        "requests beyond the three resources"
    );
    let read = kube.reads_by(DEFAULT_USER);
    let listed: BTreeSet<(&str, &str, &str)> = access::KUBERNETES
        .iter()
        .flat_map(|r| r.verbs.iter().map(|verb| (r.group, r.resource, *verb)))
        .collect();
    assert_eq!(
        read, listed,
        "what the sources read against enforcer::source::access::KUBERNETES"
    );
    let actions: Vec<String> = moto.actions(moto::AGENT_ACCESS_KEY).expect("moto's record");
    let mut listed: Vec<String> = access::EC2
        .iter()
        .map(|a| a.strip_prefix("ec2:").expect("an ec2: action").to_string())
        .collect();
    listed.sort();
    assert_eq!(
        actions, listed,
        "the EC2 actions used against enforcer::source::access::EC2"
    );
}

/// Reloads the agent applied, from its metrics.
fn applied_reloads(node: &Node) -> u64 {
    let metrics = node.http_get("/metrics").expect("metrics").1;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("enforcer_reloads_total{result=\"applied\"} "))
        .and_then(|n| n.parse().ok())
        .expect("enforcer_reloads_total")
}

/// Prints the agent's log if the test fails.
struct LogOnFailure(PathBuf);

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("--- the agent's log ---\n{log}");
        }
    }
}

/// A pod of the live scenario: branch ENI annotation, labels, this node.
fn pod_object(pod: &TestPod, app: &str) -> Value {
    let ip = std::net::Ipv4Addr::from(pod.ip).to_string();
    let eni = json!([{
        "eniId": format!("eni-{:017x}", pod.vlan),
        "ifAddress": "0a:00:00:00:00:01",
        "privateIp": ip,
        "vlanId": pod.vlan,
        "subnetCidr": "10.0.1.0/24",
    }]);
    json!({
        "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": "default", "uid": pod.uid,
            "labels": {"app": app},
            "annotations": {"vpc.amazonaws.com/pod-eni": eni.to_string()},
        },
        "spec": {"nodeName": "node-1", "serviceAccountName": "default", "containers": []},
        "status": {"podIP": ip},
    })
}

/// Sends SYNs from [`PEER`] to `pod` port `port` until the kernel counts `reason` for
/// one, within `bound`; the time that took.
fn until_judged(
    node: &Node,
    pod: &TestPod,
    port: u16,
    reason: Reason,
    bound: Duration,
) -> Duration {
    let start = Instant::now();
    let mut source_port = 30000u16;
    loop {
        let before = node.counters();
        node.send_to_trunk(vec![syn_to(pod, port, source_port)]);
        source_port = source_port.wrapping_add(1);
        let judged = Instant::now() + Duration::from_millis(200);
        while Instant::now() < judged {
            let after = node.counters();
            if after[reason as usize] > before[reason as usize] {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            start.elapsed() < bound,
            "a SYN to {} port {port} not judged {reason:?} within {bound:?}",
            pod.name
        );
    }
}

/// `enforcer run --source cluster` on a node namespace whose servers (API, IMDS,
/// moto) listen inside it: each change of the cluster reaches the kernel within
/// its bound, judged frame by frame on the trunk.
#[test]
fn the_agent_enforces_what_the_cluster_says_and_follows_it() {
    let node = Node::new();
    let work = tempfile_dir("agent");
    let netns = std::fs::File::open(format!("/run/netns/{}", node.netns)).expect("the netns");
    let in_netns = |mut command: Command| {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let fd = netns.as_raw_fd();
        // SAFETY: setns between fork and exec, on a descriptor the parent keeps open.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        command
    };
    let mut moto =
        Moto::start(in_netns(Command::new(moto::python())), 5000).expect("moto in the node");
    let vpc = moto
        .call("create_vpc", json!({"CidrBlock": "10.0.0.0/16"}))
        .unwrap()["Vpc"]["VpcId"]
        .as_str()
        .unwrap()
        .to_string();
    let subnet = moto
        .call(
            "create_subnet",
            json!({"VpcId": vpc, "CidrBlock": "10.0.1.0/24"}),
        )
        .unwrap()["Subnet"]["SubnetId"]
        .as_str()
        .unwrap()
        .to_string();
    let group = |moto: &mut Moto, id: &str| {
        moto.next_ids("sg", &[id]).unwrap();
        moto.call(
            "create_security_group",
            json!({"GroupName": id, "Description": id, "VpcId": vpc}),
        )
        .unwrap();
    };
    group(&mut moto, "sg-node");
    group(&mut moto, "sg-app");
    moto.next_ids("pl", &["pl-peers"]).unwrap();
    moto.call(
        "create_managed_prefix_list",
        json!({"PrefixListName": "peers", "MaxEntries": 5, "AddressFamily": "IPv4",
               "Entries": [{"Cidr": "192.0.2.0/24"}]}),
    )
    .unwrap();
    moto.call(
        "authorize_security_group_ingress",
        json!({"GroupId": "sg-app", "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]},
            {"IpProtocol": "tcp", "FromPort": 7070, "ToPort": 7070, "PrefixListIds": [{"PrefixListId": "pl-peers"}]},
        ]}),
    )
    .unwrap();
    let (instance, trunk_id, trunk_mac) =
        instance_with_trunk(&mut moto, &subnet, &["sg-node"], "10.0.1.11");
    // The trunk is found by the trunk ENI's MAC, the primary interface by IMDS's.
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&[
        "-n",
        &node.netns,
        "link",
        "set",
        &node.trunk,
        "address",
        &trunk_mac,
    ]);
    let primary_mac = "0a:00:00:00:00:aa";
    ip(&[
        "-n",
        &node.netns,
        "link",
        "set",
        &node.peer,
        "address",
        primary_mac,
    ]);

    let web = TestPod::new("web-1", "uid-web-1", 11, [10, 0, 1, 21]);
    // A branch ENI of this trunk (its type and trunk tag are what the agent filters on).
    moto.next_ids("eni", &[&format!("eni-{:017x}", web.vlan)])
        .unwrap();
    let branch = moto
        .call(
            "create_network_interface",
            json!({"SubnetId": subnet, "Groups": ["sg-app"], "PrivateIpAddress": "10.0.1.21",
                   "TagSpecifications": [{"ResourceType": "network-interface",
                       "Tags": [{"Key": "vpcresources.k8s.aws/trunk-eni-id", "Value": trunk_id}]}]}),
        )
        .unwrap();
    let branch_id = branch["NetworkInterface"]["NetworkInterfaceId"]
        .as_str()
        .unwrap()
        .to_string();
    moto.set_interface_type(&branch_id, "branch").unwrap();

    let (kube, imds) = node.in_netns(move || {
        let kube = KubeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).expect("the API");
        let imds = Imds::serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            BTreeMap::from([("placement/region".to_string(), moto::REGION.to_string())]),
        )
        .expect("IMDS");
        (kube, imds)
    });
    kube.apply(json!({"kind": "SecurityGroupPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "securityGroups": {"groupIds": ["sg-app"]}}}));
    kube.apply(
        json!({"kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "default"}}),
    );
    kube.apply(pod_object(&web, "web"));

    let kubeconfig = kube.kubeconfig(&work).expect("kubeconfig");
    let mut command = node.command_in_netns(&[
        "run",
        "--source",
        "cluster",
        "--ec2-interval",
        "1",
        "--pin-path",
        node.pin_path.to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{METRICS_PORT}"),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    let log = work.join("agent.log");
    command
        .env("NODE_NAME", "node-1")
        .env("POD_SECURITY_GROUP_ENFORCING_MODE", "strict")
        .env("RUST_LOG", "info")
        .stderr(Stdio::from(
            std::fs::File::create(&log).expect("the agent's log"),
        ));
    aws_env(&mut command, &moto, &imds);
    let mut agent = command
        .spawn()
        .expect("start enforcer run --source cluster");
    let _log = LogOnFailure(log);

    // IMDS says nothing of the instance yet: not ready, and `/readyz` says why.
    wait_for("a source to be reported", Duration::from_secs(20), || {
        node.http_get("/readyz")
            .is_some_and(|(code, body)| code == 503 && body.contains("live source"))
    });
    for (path, value) in metadata(
        &instance,
        primary_mac,
        &["10.0.1.10"],
        &["sg-node"],
        &["10.0.0.0/16"],
    ) {
        imds.set(&path, &value);
    }
    node.wait_ready();
    let metrics = node.http_get("/metrics").expect("metrics").1;
    for source in [
        "kubernetes/pods",
        "kubernetes/serviceaccounts",
        "kubernetes/securitygrouppolicies",
        "ec2",
        "imds",
    ] {
        assert!(
            metrics.contains(&format!(
                "enforcer_source_staleness_seconds{{source=\"{source}\"}}"
            )),
            "{source} in\n{metrics}"
        );
    }
    let status: Value = serde_json::from_str(&node.enforcer(&[
        "status",
        "--json",
        "--pin-path",
        node.pin_path.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(status["pods"].as_array().unwrap().len(), 1, "{status:#}");
    assert_eq!(status["sources"].as_array().unwrap().len(), 5, "{status:#}");
    assert!(
        status["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["lastSuccess"].is_u64()),
        "{status:#}"
    );
    let bound = Duration::from_secs(1);
    until_judged(&node, &web, 8080, Reason::PassNew, bound);
    until_judged(&node, &web, 9090, Reason::DropPolicy, bound);
    until_judged(&node, &web, 7070, Reason::DropPolicy, bound);

    // A pod added: its branch ENI enforced within 1 s of its annotation.
    let api = TestPod::new("web-2", "uid-web-2", 12, [10, 0, 1, 22]);
    until_judged(&node, &api, 8080, Reason::DropUnknownVlan, bound);
    kube.apply(pod_object(&api, "web"));
    let added = until_judged(&node, &api, 8080, Reason::PassNew, bound);
    eprintln!("a new pod's branch ENI enforced {added:?} after its annotation appeared");

    // Relabelled out of its policy: the view changes and is applied, and the running
    // pod keeps its groups (sg-semantics §2), pinned from when it was first enforced.
    let applied = applied_reloads(&node);
    kube.apply(pod_object(&api, "other"));
    wait_for("the relabel to be applied", Duration::from_secs(5), || {
        applied_reloads(&node) > applied
    });
    until_judged(&node, &api, 8080, Reason::PassNew, bound);

    // Deleted: its VLAN is unknown again.
    kube.delete(Kind::Pod, "default", "web-2");
    until_judged(&node, &api, 8080, Reason::DropUnknownVlan, bound);

    // A policy naming a group EC2 does not list yet (created before it, or a typo):
    // only the pod it selects is quarantined, with an Event on it; the node stays
    // ready and every other pod enforced. The group named, EC2 is polled early, and
    // once it exists the pod takes it.
    kube.apply(json!({"kind": "SecurityGroupPolicy",
        "metadata": {"name": "batch", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "batch"}}, "securityGroups": {"groupIds": ["sg-batch"]}}}));
    let batch = TestPod::new("batch-1", "uid-batch-1", 14, [10, 0, 1, 24]);
    kube.apply(pod_object(&batch, "batch"));
    until_judged(&node, &batch, 8080, Reason::DropPolicy, bound);
    until_judged(&node, &web, 8080, Reason::PassNew, bound);
    assert_eq!(node.http_get("/readyz").map(|(code, _)| code), Some(200));
    let quarantined = |events: &[Value]| {
        events.iter().any(|e| {
            e["reason"] == "PodQuarantined"
                && e["regarding"]["name"] == "batch-1"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("sg-batch is not defined"))
        })
    };
    wait_for("the quarantine's Event", Duration::from_secs(5), || {
        quarantined(&kube.objects(Kind::Event))
    });
    let status = node.enforcer(&["status", "--pin-path", node.pin_path.to_str().unwrap()]);
    assert!(
        status.contains("QUARANTINED") && status.contains("default/batch-1"),
        "{status}"
    );
    group(&mut moto, "sg-batch");
    moto.call(
        "authorize_security_group_ingress",
        json!({"GroupId": "sg-batch", "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]}),
    )
    .unwrap();
    let released = until_judged(&node, &batch, 8080, Reason::PassNew, Duration::from_secs(5));
    eprintln!("a quarantined pod released {released:?} after its group appeared in EC2");
    // One Event for the quarantine, however many reloads it lasted.
    let events = kube.objects(Kind::Event);
    let about_batch = events
        .iter()
        .filter(|e| e["regarding"]["name"] == "batch-1")
        .count();
    assert_eq!(about_batch, 1, "{events:#?}");
    kube.delete(Kind::Pod, "default", "batch-1");

    // A rule added in EC2 and a prefix list changed: within a poll (1 s, jittered) and the apply.
    let ec2_bound = Duration::from_secs(5);
    moto.call(
        "authorize_security_group_ingress",
        json!({"GroupId": "sg-app", "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 9090, "ToPort": 9090, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]}),
    )
    .unwrap();
    until_judged(&node, &web, 9090, Reason::PassNew, ec2_bound);
    let peer = std::net::Ipv4Addr::from(PEER);
    moto.call(
        "modify_managed_prefix_list",
        json!({"PrefixListId": "pl-peers", "CurrentVersion": 1,
               "AddEntries": [{"Cidr": format!("{peer}/32")}]}),
    )
    .unwrap();
    until_judged(&node, &web, 7070, Reason::PassNew, ec2_bound);

    // A change the watch never delivered (the history compacted, the watches ended):
    // the reflector's relist after 410 Gone finds it.
    let lists = kube.lists(Kind::Pod);
    let late = TestPod::new("web-3", "uid-web-3", 13, [10, 0, 1, 23]);
    kube.apply_behind_a_compaction(pod_object(&late, "web"));
    until_judged(&node, &late, 8080, Reason::PassNew, Duration::from_secs(10));
    assert!(kube.lists(Kind::Pod) > lists, "no relist");

    // EC2 failing keeps the last view: moto gone, the pods stay enforced, the error shows.
    drop(moto);
    wait_for(
        "the EC2 error to be reported",
        Duration::from_secs(10),
        || {
            let status: Value = serde_json::from_str(&node.enforcer(&[
                "status",
                "--json",
                "--pin-path",
                node.pin_path.to_str().unwrap(),
            ]))
            .unwrap();
            status["sources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "ec2" && s["error"].is_string())
        },
    );
    until_judged(&node, &web, 9090, Reason::PassNew, bound);
    let metrics = node.http_get("/metrics").expect("metrics").1;
    assert!(
        metrics.contains("enforcer_source_error{source=\"ec2\"} 1"),
        "{metrics}"
    );

    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&work);
}

/// End to end on the virtual node: the example served live (moto, the API stand-in and
/// IMDS inside the node's namespace) is enforced by `enforcer run --source cluster`
/// exactly as the example's flows expect, frame by frame through the trunk.
#[test]
fn the_example_served_live_is_enforced_on_the_virtual_node() {
    enforcer_tests::require_root();
    let spec = NodeSpec {
        state: example_state(),
        mode: EnforcingMode::Strict,
        vpc_peers: scenario::vpc_peers(&example_flows()),
        enforcer: None,
    };
    let mut node = VirtualNode::build(&spec).expect("build the virtual node");
    let work = tempfile_dir("virtual-node");
    let namespace = node.node_namespace();
    let mut moto = Moto::start(namespace.command(moto::python()), 5000).expect("moto in the node");
    let seeded = moto
        .seed(&example_dir())
        .expect("seed moto with the example");
    let subnet = seeded["subnets"]["10.0.1.0/24"]
        .as_str()
        .expect("the node's subnet")
        .to_string();
    let (instance, _, _) =
        instance_with_trunk(&mut moto, &subnet, &["sg-0node0000000000001"], "10.0.1.11");
    other_nodes_branch_enis(
        &mut moto,
        &example_dir(),
        &node.model().node.name.clone(),
        &seeded,
    );
    let (kube, imds) = namespace
        .enter(move || {
            let kube = KubeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).expect("the API");
            let imds = example_node_imds(&instance);
            (kube, imds)
        })
        .expect("servers in the node's namespace");
    for object in kubernetes_objects(&example_dir()) {
        kube.apply(object);
    }
    let kubeconfig = kube.kubeconfig(&work).expect("kubeconfig");
    let model_node = node.model().node.clone();
    let source: Vec<std::ffi::OsString> = [
        "--source",
        "cluster",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--trunk-interface",
        &model_node.trunk_interface,
        "--primary-interface",
        &model_node.primary_interface,
        "--node-config",
        example_dir().join("node-config.yaml").to_str().unwrap(),
    ]
    .iter()
    .map(Into::into)
    .collect();
    let env: Vec<(String, String)> = [
        ("NODE_NAME", model_node.name.as_str()),
        ("POD_SECURITY_GROUP_ENFORCING_MODE", "strict"),
        ("AWS_ENDPOINT_URL_EC2", &moto.endpoint()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint()),
        ("AWS_ACCESS_KEY_ID", moto::AGENT_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    node.start_agent_with(&source, &env)
        .expect("start `enforcer run --source cluster`");
    let matrix = matrix::drive(&mut node, &example_flows(), None, &|| false, |_| {})
        .expect("drive the example flows");
    let failures: Vec<String> = matrix.mismatches().map(matrix::render_row).collect();
    assert!(
        failures.is_empty(),
        "{}\n{}\n{}",
        matrix::render_summary(&matrix),
        failures.concat(),
        node.agent_output()
    );
    assert!(!matrix.rows.is_empty(), "nothing was judged");
    drop(moto);
    node.teardown().expect("tear down");
    let _ = std::fs::remove_dir_all(&work);
}
