//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so that the
//! `enforcer` binary needs no path at run time. The object is the one staged
//! for this build's profile (`target/bpf/<debug|release>/`): a binary never
//! embeds what another profile built. Without the object the binary still
//! builds (unit tests and `check` do not need the kernel programs) and says at
//! load time how to build it.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_EBPF_OBJECT");
    let profile = std::env::var("PROFILE").expect("PROFILE set by cargo");
    let object = std::env::var_os("ENFORCER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Read when the script runs, not when it was compiled: a script compiled for
            // another checkout sharing this target directory must not embed its object.
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../target/bpf")
                .join(&profile)
                .join("enforcer-ebpf.o")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    let embedded = out.join("enforcer-ebpf.o");
    match std::fs::read(&object) {
        Ok(bytes) => std::fs::write(&embedded, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            let flag = if profile == "release" {
                " --release"
            } else {
                ""
            };
            println!(
                "cargo:warning=eBPF object {} not found; run `cargo xtask build-ebpf{flag}` to embed it",
                object.display()
            );
            std::fs::write(&embedded, []).expect("write empty eBPF object");
        }
    }
}
