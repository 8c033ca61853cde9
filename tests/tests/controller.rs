//! `enforcer controller` against the stand-ins (`tests/tests/live.rs` says why): moto's
//! EC2 seeded with the example state, the fake API server serving its Kubernetes
//! objects, a Node for its instance, the SecurityGroupView CRD and Leases. Node agents
//! are the `enforcer` binary (`snapshot --ec2 controller`) or simulated in-process
//! (the library's view follower on a hub each, or its direct EC2 poll), so that 100
//! of them fit on a test machine. The figures these tests measure are printed (and
//! recorded in BENCHMARKS.md).

mod agent_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_support::{check_stdout, enforcer_binary};
use enforcer::source::access;
use enforcer::source::live::controller::follow;
use enforcer::source::live::hub::{Hub, Identity, NodeSettings, names};
use enforcer::source::live::{ec2, imds, kube as live_kube};
use enforcer_tests::live::example::{
    aws_env, example_dir, example_node_imds, free_port, instance_with_trunk, kubernetes_objects,
    tempfile_dir,
};
use enforcer_tests::live::imds::Imds;
use enforcer_tests::live::kube_api::{ETCD_LIMIT, Kind, KubeApi, Write};
use enforcer_tests::live::moto::{self, Moto};
use serde_json::{Value, json};

/// The example's node (`deploy/agent/example-state/node-config.yaml`).
const NODE: &str = "ip-10-0-1-10.ec2.internal";
const NODE_GROUP: &str = "sg-0node0000000000001";
/// The controller's namespace, where its Lease lives.
const NAMESPACE: &str = "kube-system";
/// The users (kubeconfig tokens) the stand-in tells apart.
const CONTROLLER_USER: &str = "enforcer-controller";
const AGENT_USER: &str = "enforcer-agent";

/// The example served: moto, the API server (with the views' CRD), IMDS of its node.
struct Cluster {
    moto: Moto,
    kube: KubeApi,
    imds: Imds,
    instance: String,
    /// The example's VPC in moto.
    vpc: String,
    work: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(what: &str) -> Self {
        let work = tempfile_dir(&format!("controller-{what}"));
        let mut moto = Moto::start(Command::new(moto::python()), free_port()).expect("moto");
        let seeded = moto.seed(&example_dir()).expect("seed moto");
        let subnet = seeded["subnets"]["10.0.1.0/24"]
            .as_str()
            .unwrap()
            .to_string();
        let (instance, _, _) = instance_with_trunk(&mut moto, &subnet, &[NODE_GROUP], "10.0.1.11");
        // Its primary ENI carries the groups IMDS names (moto gave it the VPC's default).
        let described = moto
            .call("describe_instances", json!({"InstanceIds": [instance]}))
            .expect("the instance");
        let primary = &described["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0];
        moto.call(
            "modify_network_interface_attribute",
            json!({"NetworkInterfaceId": primary["NetworkInterfaceId"], "Groups": [NODE_GROUP]}),
        )
        .expect("the node's groups");
        let kube = KubeApi::serve(TcpListener::bind("127.0.0.1:0").unwrap()).expect("the API");
        for object in kubernetes_objects(&example_dir()) {
            kube.apply(object);
        }
        kube.apply(node_object(NODE, &instance));
        kube.install_views_crd();
        let imds = example_node_imds(&instance);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the simulated agents");
        Self {
            vpc: seeded["vpc"].as_str().unwrap().to_string(),
            moto,
            kube,
            imds,
            instance,
            work,
            runtime,
        }
    }

    fn kubeconfig(&self, user: &str) -> PathBuf {
        self.kube
            .kubeconfig_as(&self.work, user)
            .expect("a kubeconfig")
    }

    /// `enforcer controller` as `identity`, signing EC2 requests with `access_key`.
    fn controller(&self, identity: &str, access_key: &str, interval: u64) -> Controller {
        let log_path = self.work.join(format!("{identity}.log"));
        let log = File::create(&log_path).expect("a log file");
        let child = Command::new(enforcer_binary())
            .args(["controller", "--kubeconfig"])
            .arg(self.kubeconfig(CONTROLLER_USER))
            .args(["--interval", &interval.to_string(), "--refresh", "2"])
            .args(["--lease-namespace", NAMESPACE, "--lease-duration"])
            .arg(LEASE_SECONDS.to_string())
            .args(["--identity", identity])
            .env("AWS_ENDPOINT_URL_EC2", self.moto.endpoint())
            .env("AWS_REGION", moto::REGION)
            .env("AWS_ACCESS_KEY_ID", access_key)
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .expect("start enforcer controller");
        Controller {
            child,
            log: log_path,
        }
    }

    /// The views, once every one's status describes its spec and their groups are
    /// stable over a poll.
    fn until_published(&self, within: Duration) -> BTreeMap<String, Value> {
        let start = Instant::now();
        let mut last = BTreeMap::new();
        loop {
            let views: BTreeMap<String, Value> = self
                .kube
                .objects(Kind::SecurityGroupView)
                .into_iter()
                .map(|v| (v["metadata"]["name"].as_str().unwrap().to_string(), v))
                .collect();
            let stamped = !views.is_empty()
                && views
                    .values()
                    .all(|v| v["status"]["observedGeneration"] == v["metadata"]["generation"]);
            let specs = |v: &BTreeMap<String, Value>| -> Vec<Value> {
                v.values().map(|v| v["spec"].clone()).collect()
            };
            if stamped && specs(&views) == specs(&last) {
                return views;
            }
            assert!(
                start.elapsed() < within,
                "no stable views within {within:?}: {:?}",
                views.keys()
            );
            last = views;
            std::thread::sleep(Duration::from_millis(1500));
        }
    }

    /// A node agent simulated in-process: a hub with this node's identity (no IMDS)
    /// fed by the view follower, as `run --ec2 controller` feeds its own.
    fn agent(&self, name: &str, max_age: Duration) -> Arc<Hub> {
        let hub = Hub::new(name.to_string(), NodeSettings::default());
        hub.publish_identity(self.identity());
        let kubeconfig = self.kubeconfig(AGENT_USER);
        let (follower, node) = (hub.clone(), name.to_string());
        self.runtime.block_on(async move {
            let client = live_kube::client(Some(&kubeconfig))
                .await
                .expect("a client");
            follow::spawn(client, &node, follower, max_age);
        });
        hub
    }

    fn identity(&self) -> Identity {
        Identity {
            instance_id: self.instance.clone(),
            region: moto::REGION.into(),
            mac: "0a:1b:2c:3d:4e:01".into(),
            primary_ips: vec!["10.0.1.10".parse().unwrap()],
            security_groups: vec![NODE_GROUP.into()],
            vpc_cidrs: vec!["10.0.0.0/16".into()],
        }
    }

    /// An EC2 client signing with `access_key`, as the SDK would configure it.
    fn ec2_client(&self, access_key: &str) -> aws_sdk_ec2::Client {
        use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(moto::REGION))
            .endpoint_url(self.moto.endpoint())
            .credentials_provider(Credentials::new(access_key, "testing", None, None, "test"))
            .http_client(imds::https_client())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// EC2 requests signed with `access_key` so far.
    fn requests(&mut self, access_key: &str) -> u64 {
        self.moto
            .requests(access_key)
            .expect("moto's record")
            .values()
            .sum()
    }

    /// `enforcer snapshot --ec2 MODE` of the example's node, as `access_key`.
    fn snapshot(&self, mode: &str, access_key: &str, out: &Path) {
        let mut command = Command::new(enforcer_binary());
        command
            .args(["snapshot", "--source", "cluster", "--ec2", mode])
            .args(["--timeout", "30", "--kubeconfig"])
            .arg(self.kubeconfig(AGENT_USER))
            .args(["--trunk-interface", "eth1", "--primary-interface", "eth0"])
            .arg("--node-config")
            .arg(example_dir().join("node-config.yaml"))
            .arg("--out")
            .arg(out)
            .env("NODE_NAME", NODE)
            .env("RUST_LOG", "warn")
            .env_remove("POD_SECURITY_GROUP_ENFORCING_MODE");
        aws_env(&mut command, &self.moto, &self.imds);
        command.env("AWS_ACCESS_KEY_ID", access_key);
        let output = command.output().expect("run enforcer snapshot");
        assert!(
            output.status.success(),
            "enforcer snapshot --ec2 {mode}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// How long a leader that stopped renewing keeps the lease, in the tests.
const LEASE_SECONDS: u64 = 3;

/// A running `enforcer controller`: killed on drop, its log printed if the test fails.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

fn node_object(name: &str, instance: &str) -> Value {
    json!({"kind": "Node", "metadata": {"name": name},
           "spec": {"providerID": format!("aws:///us-east-1a/{instance}")}})
}

/// The writes of views' specs (created, changed or deleted), not their status.
fn spec_writes(kube: &KubeApi) -> Vec<Write> {
    kube.writes()
        .into_iter()
        .filter(|w| w.kind == Kind::SecurityGroupView && w.what != "status")
        .collect()
}

/// The group IDs of a state directory's (or snapshot's) EC2 groups.
fn groups_of(dir: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(dir.join(ec2::GROUPS_FILE)).expect("groups");
    let groups: Value = serde_json::from_str(&text).unwrap();
    groups["SecurityGroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["GroupId"].as_str().unwrap().to_string())
        .collect()
}

/// A group of a SecurityGroupPolicy of the example.
fn a_policy_group(kube: &KubeApi) -> String {
    let policies = kube.objects(Kind::SecurityGroupPolicy);
    policies[0]["spec"]["securityGroups"]["groupIds"][0]
        .as_str()
        .unwrap()
        .to_string()
}

/// An ingress rule no group of the example has.
fn open_port(moto: &mut Moto, group: &str, port: u16) {
    moto.call(
        "authorize_security_group_ingress",
        json!({"GroupId": group, "IpPermissions": [{"IpProtocol": "tcp", "FromPort": port,
               "ToPort": port, "IpRanges": [{"CidrIp": "10.99.0.0/16"}]}]}),
    )
    .expect("a new rule");
}

/// Whether `hub`'s EC2 view has a rule on `port`.
fn has_port(hub: &Hub, port: u16) -> bool {
    hub.documents_of(names::EC2).is_some_and(|d| {
        d.files().any(|(name, text)| {
            name == ec2::GROUPS_FILE && text.contains(&format!("\"FromPort\": {port}"))
        })
    })
}

/// The controller publishes one view per group the cluster needs (those a node's own
/// poll reads), which agents enforce as if they had polled EC2, without one EC2 call;
/// a view is written again only when EC2 changed it, once; and each side asks the
/// API server and EC2 for exactly what `enforcer::source::access` grants it.
#[test]
fn the_controller_publishes_each_group_once_and_agents_enforce_its_views() {
    let mut cluster = Cluster::start("publish");
    let controller = cluster.controller("controller-a", "controller-a", 1);
    let views = cluster.until_published(Duration::from_secs(60));
    assert!(controller.log().contains("leading"), "{}", controller.log());

    // The groups a node polling EC2 itself reads, one view each (the example's fit one).
    let direct = cluster.work.join("direct");
    cluster.snapshot("direct", moto::AGENT_ACCESS_KEY, &direct);
    let published: BTreeSet<String> = views
        .values()
        .map(|v| v["spec"]["groupId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(published, groups_of(&direct));
    assert!(views.values().all(|v| v["spec"]["parts"] == 1));

    // Enforced the same: a snapshot from the views checks as the example does.
    for mode in ["controller", "auto"] {
        let key = format!("agent-{mode}");
        let out = cluster.work.join(mode);
        cluster.snapshot(mode, &key, &out);
        assert_eq!(
            check_stdout(&out),
            check_stdout(&example_dir()),
            "--ec2 {mode}"
        );
        assert_eq!(cluster.requests(&key), 0, "--ec2 {mode} called EC2");
    }

    // Nothing changed in EC2: nothing is written but read times.
    let before = spec_writes(&cluster.kube);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        spec_writes(&cluster.kube),
        before,
        "views written unchanged"
    );
    let stamps = cluster
        .kube
        .writes()
        .iter()
        .filter(|w| w.what == "status")
        .count();
    assert!(stamps > views.len(), "no read time restamped");

    // A rule added in EC2: that group's view is written once.
    let group = a_policy_group(&cluster.kube);
    open_port(&mut cluster.moto, &group, 8443);
    let start = Instant::now();
    while !cluster
        .kube
        .objects(Kind::SecurityGroupView)
        .iter()
        .any(|v| v["spec"]["groupId"] == group.as_str() && v["spec"].to_string().contains("8443"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the new rule is not published"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<Write> = spec_writes(&cluster.kube).split_off(before.len());
    assert_eq!(
        after,
        [Write {
            kind: Kind::SecurityGroupView,
            name: group.clone(),
            what: "apply",
        }]
    );

    // A group a new policy names gets its view; once no policy names it, the view goes.
    let extra = cluster
        .moto
        .call(
            "create_security_group",
            json!({"GroupName": "extra", "Description": "extra", "VpcId": cluster.vpc}),
        )
        .expect("a group")["GroupId"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.kube.apply(json!({"kind": "SecurityGroupPolicy",
        "metadata": {"name": "extra", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "none"}},
                 "securityGroups": {"groupIds": [extra]}}}));
    let published = |kube: &KubeApi| {
        kube.objects(Kind::SecurityGroupView)
            .iter()
            .any(|v| v["metadata"]["name"] == extra.as_str())
    };
    let start = Instant::now();
    while !published(&cluster.kube) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no view of {extra}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
        .kube
        .delete(Kind::SecurityGroupPolicy, "default", "extra");
    let start = Instant::now();
    while published(&cluster.kube) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{extra}'s view stays"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let grants = |list: &[access::KubernetesRead]| -> BTreeSet<(&str, &str, &str)> {
        list.iter()
            .flat_map(|r| r.verbs.iter().map(|verb| (r.group, r.resource, *verb)))
            .collect()
    };
    assert_eq!(
        cluster.kube.reads_by(CONTROLLER_USER),
        grants(access::CONTROLLER),
        "the controller's requests against enforcer::source::access::CONTROLLER"
    );
    let agent = cluster.kube.reads_by(AGENT_USER);
    let allowed: BTreeSet<_> = grants(access::KUBERNETES)
        .union(&grants(access::CONTROLLER_MODE))
        .copied()
        .collect();
    assert!(agent.is_subset(&allowed), "{agent:?} beyond {allowed:?}");
    let listed: BTreeSet<String> = access::EC2
        .iter()
        .map(|a| a.strip_prefix("ec2:").unwrap().to_string())
        .collect();
    let used: BTreeSet<String> = cluster
        .moto
        .actions("controller-a")
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        used, listed,
        "the controller's EC2 actions against access::EC2"
    );
    assert_eq!(cluster.kube.unserved(), Vec::<String>::new());
}

/// EC2 calls per poll interval with 1, 10 and 100 nodes: one controller's stay the
/// same (its agents watch the API server: 100 simulated ones get its views), direct
/// agents' grow linearly; and the largest cluster each fits in 10 % of an account's
/// describe budget (a refill of 20 requests a second), at the default 30 s interval.
#[test]
fn ec2_calls_stay_flat_with_the_controller_and_grow_with_direct_agents() {
    let mut cluster = Cluster::start("calls");
    let mut table = Vec::new();
    let mut agents = Vec::new();
    for (round, nodes) in [1usize, 10, 100].into_iter().enumerate() {
        for n in 1..nodes {
            // Nodes whose instances are not in moto: their ENIs read as none.
            cluster
                .kube
                .apply(node_object(&format!("sim-{n}"), &format!("i-{n:017x}")));
        }
        // One poll: an interval long enough that a second does not start.
        let key = format!("controller-{nodes}");
        let controller = cluster.controller(&format!("calls-{round}"), &key, 3600);
        let start = Instant::now();
        while !controller.log().contains("leading") || cluster.requests(&key) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}",
                controller.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster.until_published(Duration::from_secs(30));
        // Its poll is over once its count stops growing.
        let mut controller_calls = cluster.requests(&key);
        loop {
            std::thread::sleep(Duration::from_millis(1500));
            let now = cluster.requests(&key);
            if now == controller_calls {
                break;
            }
            controller_calls = now;
        }
        drop(controller);
        // The lease is free again only once it expires: the next round's controller waits.
        std::thread::sleep(Duration::from_secs(LEASE_SECONDS + 1));
        while agents.len() < nodes {
            let name = format!("agent-{}", agents.len());
            agents.push(cluster.agent(&name, Duration::from_secs(900)));
        }
        let start = Instant::now();
        while !agents.iter().all(|a| a.documents_of(names::EC2).is_some()) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agents without views"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Direct mode: each node polls EC2 itself, once per interval.
        let key = format!("direct-{nodes}");
        let client = cluster.ec2_client(&key);
        let identity = cluster.identity();
        let wanted: BTreeSet<String> = cluster
            .kube
            .objects(Kind::SecurityGroupPolicy)
            .iter()
            .flat_map(|p| {
                p["spec"]["securityGroups"]["groupIds"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|g| g.as_str().map(str::to_string))
            .chain(identity.security_groups.iter().cloned())
            .collect();
        cluster.runtime.block_on(async {
            for _ in 0..nodes {
                ec2::poll(&client, &identity, &wanted)
                    .await
                    .expect("a direct poll");
            }
        });
        let direct_calls = cluster.requests(&key);
        table.push((nodes, controller_calls, direct_calls));
    }
    eprintln!("nodes | controller EC2 calls per interval | direct EC2 calls per interval");
    for (nodes, controller, direct) in &table {
        eprintln!("{nodes:>5} | {controller:>33} | {direct:>29}");
    }
    let (_, controller_one, direct_one) = table[0];
    for &(nodes, controller, direct) in &table {
        assert_eq!(
            controller, controller_one,
            "the controller's calls grew with {nodes} nodes"
        );
        assert_eq!(
            direct,
            direct_one * nodes as u64,
            "direct calls not linear at {nodes} nodes"
        );
    }
    // 10 % of a refill of 20 describes a second, over the default 30 s interval.
    let budget = 0.1 * 20.0 * 30.0;
    let direct_fit = (budget / direct_one as f64).floor();
    eprintln!(
        "10 % of the describe budget: {budget} calls per 30 s interval; direct mode fits {direct_fit} nodes; \
         the controller ({controller_one} calls, +1 per 100 nodes) fits {} nodes",
        ((budget - controller_one as f64) * 100.0).floor() + 100.0
    );
}

/// A rule added in EC2 reaches 100 simulated agents' views within one poll interval
/// (jittered up to +20 %) plus 2 s.
#[test]
fn an_ec2_change_reaches_100_agents_within_an_interval_and_2s() {
    const INTERVAL: u64 = 3;
    let mut cluster = Cluster::start("fanout");
    let _controller = cluster.controller("fanout", "controller-fanout", INTERVAL);
    cluster.until_published(Duration::from_secs(60));
    let agents: Vec<_> = (0..100)
        .map(|n| cluster.agent(&format!("agent-{n}"), Duration::from_secs(900)))
        .collect();
    let start = Instant::now();
    while !agents.iter().all(|a| a.documents_of(names::EC2).is_some()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agents without views"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let group = a_policy_group(&cluster.kube);
    open_port(&mut cluster.moto, &group, 9443);
    let changed = Instant::now();
    let bound = Duration::from_secs(INTERVAL).mul_f64(1.2) + Duration::from_secs(2);
    while !agents.iter().all(|a| has_port(a, 9443)) {
        assert!(
            changed.elapsed() < bound,
            "{} of 100 agents have the new rule after {bound:?}",
            agents.iter().filter(|a| has_port(a, 9443)).count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "fan-out: an EC2 rule change reached 100 agents in {:?} (poll interval {INTERVAL} s)",
        changed.elapsed()
    );
}

/// Two controllers: one leads. Killed, the other takes over within the Lease's
/// duration; the views are not written during the handover, so no agent's view
/// changes. Stopped (SIGTERM), a leader releases the lease. With no controller left,
/// agents keep the last views, flagged stale (the source's error, and a Warning
/// event on the node).
#[test]
fn the_lease_hands_over_within_its_duration_and_agents_see_no_change() {
    let cluster = Cluster::start("failover");
    let mut first = cluster.controller("replica-1", "controller-failover", 1);
    let mut second = cluster.controller("replica-2", "controller-failover", 1);
    cluster.until_published(Duration::from_secs(60));
    let holder = || -> String {
        let leases = cluster.kube.objects(Kind::Lease);
        leases[0]["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let leader = holder();
    let (leading, other, other_name) = match leader.as_str() {
        "replica-1" => (&mut first, &second, "replica-2"),
        "replica-2" => (&mut second, &first, "replica-1"),
        _ => panic!("no leader: {leader:?}"),
    };
    assert!(!other.log().contains("leading"), "two leaders");
    let agents: Vec<_> = (0..10)
        .map(|n| cluster.agent(&format!("agent-{n}"), Duration::from_secs(4)))
        .collect();
    let start = Instant::now();
    while !agents.iter().all(|a| a.documents_of(names::EC2).is_some()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "agents without views"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen: Vec<_> = agents.iter().map(|a| a.documents_of(names::EC2)).collect();
    let writes = spec_writes(&cluster.kube);

    leading.kill();
    let killed = Instant::now();
    while holder() == leader {
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECONDS * 3),
            "no handover: {}",
            other.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let handover = killed.elapsed();
    eprintln!(
        "failover: the lease ({LEASE_SECONDS} s) went to {} in {handover:?}",
        holder()
    );
    assert_eq!(holder(), other_name);
    assert!(
        handover <= Duration::from_secs(LEASE_SECONDS) + Duration::from_millis(300),
        "handover took {handover:?}"
    );
    // The new leader's polls find the views as they are.
    std::thread::sleep(Duration::from_secs(3));
    assert!(other.log().contains("leading"));
    assert_eq!(
        spec_writes(&cluster.kube),
        writes,
        "views written during the handover"
    );
    let now: Vec<_> = agents.iter().map(|a| a.documents_of(names::EC2)).collect();
    assert!(
        now == seen,
        "an agent's EC2 view changed during the handover"
    );

    // The new leader stopped (SIGTERM): it gives the lease up as it exits.
    let survivor = if other_name == "replica-1" {
        &mut first
    } else {
        &mut second
    };
    let pid = i32::try_from(survivor.child.id()).expect("a pid");
    // SAFETY: a signal to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = survivor.child.wait().expect("the controller exits");
    assert!(status.success(), "{status}: {}", survivor.log());
    assert_eq!(holder(), "", "the lease not released");

    // No controller: the views age; agents keep them and flag them.
    drop(first);
    drop(second);
    let stopped = Instant::now();
    let stale = |hub: &Hub| {
        hub.view().sources.iter().any(|s| {
            s.name == names::EC2
                && s.error
                    .as_ref()
                    .is_some_and(|e| e.contains("last confirmed"))
        })
    };
    while !agents.iter().all(|a| stale(a)) {
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the views not flagged stale"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let now: Vec<_> = agents.iter().map(|a| a.documents_of(names::EC2)).collect();
    assert!(now == seen, "a stale view was dropped");
    let events = cluster.kube.objects(Kind::Event);
    assert!(
        events.iter().any(
            |e| e["reason"] == "StaleSecurityGroupViews" && e["regarding"]["name"] == "agent-0"
        ),
        "{events:?}"
    );
}

/// A group whose members would not fit in one object is published in parts, each
/// under etcd's limit (which the stand-in enforces), and an agent rebuilds it whole.
#[test]
fn a_group_too_large_for_one_object_is_split_and_rebuilt_whole() {
    let mut cluster = Cluster::start("split");
    let subnet = cluster
        .moto
        .call(
            "create_subnet",
            json!({"VpcId": cluster.vpc, "CidrBlock": "10.0.128.0/17"}),
        )
        .expect("a subnet")["Subnet"]["SubnetId"]
        .as_str()
        .unwrap()
        .to_string();
    // 400 ENIs of 50 addresses each: about 1.4 MB of members in the node's group.
    for _ in 0..400 {
        cluster
            .moto
            .call(
                "create_network_interface",
                json!({"SubnetId": subnet, "Groups": [NODE_GROUP],
                       "SecondaryPrivateIpAddressCount": 49}),
            )
            .expect("an ENI");
    }
    let _controller = cluster.controller("split", "controller-split", 1);
    let views = cluster.until_published(Duration::from_secs(120));
    let parts: Vec<&Value> = views
        .values()
        .filter(|v| v["spec"]["groupId"] == NODE_GROUP)
        .collect();
    assert!(parts.len() > 1, "{} part(s)", parts.len());
    let mut members = 0;
    for part in &parts {
        assert!(part.to_string().len() < ETCD_LIMIT);
        assert_eq!(part["spec"]["parts"], parts.len());
        members += part["spec"]["members"].as_array().unwrap().len();
    }
    assert!(members > 400, "{members} members");
    let refused: Vec<Write> = cluster
        .kube
        .writes()
        .into_iter()
        .filter(|w| w.what == "refused")
        .collect();
    assert_eq!(refused, []);

    let out = cluster.work.join("split");
    cluster.snapshot("controller", "agent-split", &out);
    let text = std::fs::read_to_string(out.join(ec2::INTERFACES_FILE)).expect("the ENIs");
    let enis: Value = serde_json::from_str(&text).unwrap();
    let carrying = enis["NetworkInterfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Groups"].to_string().contains(NODE_GROUP))
        .count();
    assert_eq!(carrying, members, "the agent's members of {NODE_GROUP}");
    eprintln!(
        "split: {members} members of {NODE_GROUP} in {} objects",
        parts.len()
    );
}
