//! Operators read the pinned maps with `bpftool`: thanks to BTF, keys and
//! values print with their field names.

use std::path::PathBuf;
use std::process::Command;

use enforcer::compile;
use enforcer::kernel::maps::KernelMaps;
use enforcer::model::L4Match;
use enforcer_common::map_names;
use enforcer_tests::models::{branch_pod, group, model, node_config, rule};

/// A pin directory removed however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pinned_maps_print_with_field_names() {
    enforcer_tests::require_root();
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/enforcer-test-bpftool-{}",
        std::process::id()
    )));
    let mut ebpf = enforcer::kernel::pins::load(&pins.0)
        .expect("load with pinned maps")
        .ebpf;
    let mut maps = KernelMaps::take(&mut ebpf).expect("typed maps");
    let web = group(
        "sg-0web",
        vec![rule(L4Match::All, "10.0.0.0/16")],
        vec![rule(L4Match::All, "0.0.0.0/0")],
    );
    let pod = branch_pod("web", 7, "10.0.1.101".parse().unwrap(), None, &["sg-0web"]);
    let model = model(node_config(vec!["sg-0web".into()]), vec![web], vec![pod]);
    let compiled = compile::compile(&model).expect("compiles");
    maps.apply(&compiled, &model.node).expect("apply");

    let pod_map = enforcer::kernel::bpffs::map_pin(&pins.0, map_names::PODS);
    let output = Command::new("bpftool")
        .args(["--json", "map", "dump", "pinned"])
        .arg(&pod_map)
        .output()
        .expect("run bpftool (installed by `cargo xtask setup`)");
    assert!(
        output.status.success(),
        "bpftool map dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bpftool JSON");
    // Without BTF, bpftool prints raw bytes only; with it, a `formatted` copy.
    let entry = &dump[0]["formatted"];
    assert_eq!(entry["key"], 7, "the VLAN is the key: {dump}");
    let value = &entry["value"];
    assert_eq!(value["ipv4"], serde_json::json!([10, 0, 1, 101]), "{dump}");
    for field in ["ipv6", "mode", "flags", "policies", "identity"] {
        assert!(value.get(field).is_some(), "no field {field} in {dump}");
    }
}
