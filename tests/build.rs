//! Tells the crate which profile it is built in (`debug` or `release`, as cargo names
//! them): it loads the kernel objects `cargo xtask build-ebpf` staged for that profile.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let profile = std::env::var("PROFILE").expect("PROFILE set by cargo");
    println!("cargo:rustc-env=ENFORCER_TESTS_PROFILE={profile}");
}
