//! The example state (`deploy/agent/example-state`) served by the stand-ins, for the
//! tests of the live sources and of the controller: its Kubernetes objects, its node's
//! IMDS, an instance with a trunk ENI in moto, and the environment that points the
//! AWS SDK at them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::imds::Imds;
use super::kube_api::Kind;
use super::moto::{self, Moto};

/// The bundled example state (`deploy/agent/example-state`).
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent/example-state")
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// The Kubernetes objects of a state directory's YAML files, one by one.
pub fn kubernetes_objects(dir: &Path) -> Vec<Value> {
    let mut objects = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("the example state")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).expect("a state file");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
            match value["items"].as_array() {
                Some(items) => objects.extend(items.iter().cloned()),
                None => objects.push(value),
            }
        }
    }
    objects.retain(|o| Kind::of(o).is_some());
    objects
}

/// IMDS's view of a node with `ips` and `groups` on its primary ENI `mac`.
pub fn metadata(
    instance: &str,
    mac: &str,
    ips: &[&str],
    groups: &[&str],
    cidrs: &[&str],
) -> BTreeMap<String, String> {
    let eni = format!("network/interfaces/macs/{mac}");
    let (v6, v4): (Vec<&str>, Vec<&str>) = cidrs.iter().partition(|c| c.contains(':'));
    let mut paths = BTreeMap::from([
        ("instance-id".to_string(), instance.to_string()),
        ("placement/region".to_string(), moto::REGION.to_string()),
        ("mac".to_string(), mac.to_string()),
        (format!("{eni}/local-ipv4s"), ips.join("\n")),
        (format!("{eni}/security-group-ids"), groups.join("\n")),
        (format!("{eni}/vpc-ipv4-cidr-blocks"), v4.join("\n")),
    ]);
    if !v6.is_empty() {
        paths.insert(format!("{eni}/vpc-ipv6-cidr-blocks"), v6.join("\n"));
    }
    paths
}

/// IMDS of the example's node (`deploy/agent/example-state/node-config.yaml`) as
/// `instance`, serving in the current network namespace.
pub fn example_node_imds(instance: &str) -> Imds {
    Imds::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        metadata(
            instance,
            "0a:1b:2c:3d:4e:01",
            &["10.0.1.10"],
            &["sg-0node0000000000001"],
            &["10.0.0.0/16", "2600:1f18:4a3:6900::/56"],
        ),
    )
    .expect("IMDS")
}

/// An instance with a trunk ENI (moto's type set to `trunk`, as the VPC resource
/// controller's is) in `subnet`; its instance ID and the trunk's ID and MAC.
pub fn instance_with_trunk(
    moto: &mut Moto,
    subnet: &str,
    groups: &[&str],
    trunk_ip: &str,
) -> (String, String, String) {
    let reservation = moto
        .call(
            "run_instances",
            json!({"ImageId": "ami-12c6146b", "MinCount": 1, "MaxCount": 1, "SubnetId": subnet}),
        )
        .expect("an instance");
    let instance = reservation["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let trunk = moto
        .call(
            "create_network_interface",
            json!({"SubnetId": subnet, "Groups": groups, "PrivateIpAddress": trunk_ip,
                   "Description": "trunk"}),
        )
        .expect("the trunk ENI")["NetworkInterface"]
        .clone();
    let trunk_id = trunk["NetworkInterfaceId"].as_str().unwrap().to_string();
    moto.call(
        "attach_network_interface",
        json!({"NetworkInterfaceId": trunk_id, "InstanceId": instance, "DeviceIndex": 2}),
    )
    .expect("attach the trunk");
    moto.set_interface_type(&trunk_id, "trunk")
        .expect("a trunk");
    let mac = trunk["MacAddress"].as_str().unwrap().to_ascii_lowercase();
    (instance, trunk_id, mac)
}

/// The environment that points the SDK at moto and IMDS, and nowhere else.
pub fn aws_env(command: &mut Command, moto: &Moto, imds: &Imds) {
    command
        .env("AWS_ENDPOINT_URL_EC2", moto.endpoint())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
        .env("AWS_ACCESS_KEY_ID", moto::AGENT_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_PROFILE")
        .env_remove("KUBECONFIG");
}

pub fn tempfile_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enforcer-live-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a work directory");
    dir
}
