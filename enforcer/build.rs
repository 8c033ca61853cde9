//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so that the
//! `enforcer` binary needs no path at run time. Without the object the binary
//! still builds (unit tests and `check` do not need the kernel programs) and
//! says at load time how to build it.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_EBPF_OBJECT");
    let object = std::env::var_os("ENFORCER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/enforcer-ebpf.o")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    let embedded = out.join("enforcer-ebpf.o");
    match std::fs::read(&object) {
        Ok(bytes) => std::fs::write(&embedded, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found; run `cargo xtask build-ebpf` to embed it",
                object.display()
            );
            std::fs::write(&embedded, []).expect("write empty eBPF object");
        }
    }
}
