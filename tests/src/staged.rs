//! The kernel objects `cargo xtask build-ebpf` stages, one directory per profile
//! (`target/bpf/<debug|release>/<name>.o`, see `xtask/src/build_ebpf.rs`): a test
//! or a benchmark loads the objects of the profile it was built in, as the
//! `enforcer` binary embeds those of its own.

use std::path::PathBuf;

/// The profile this crate was built in, as cargo names it to build scripts.
pub const PROFILE: &str = env!("ENFORCER_TESTS_PROFILE");

/// Every profile `cargo xtask build-ebpf` stages objects for.
pub const PROFILES: [&str; 2] = ["debug", "release"];

/// The directory of the objects staged for `profile`.
pub fn dir(profile: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bpf")
        .join(profile)
}

/// The object `name` staged for this crate's profile.
pub fn object(name: &str) -> PathBuf {
    dir(PROFILE).join(format!("{name}.o"))
}

/// The command that stages the objects of `profile`.
pub fn build_command(profile: &str) -> &'static str {
    if profile == "release" {
        "cargo xtask build-ebpf --release"
    } else {
        "cargo xtask build-ebpf"
    }
}
