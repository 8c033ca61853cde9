//! Shared helpers of the privileged integration tests: frames built byte by
//! byte, and the guard that makes a test fail (never skip) without root.

pub mod frame;
pub mod kernel;
pub mod models;
pub mod oracle;
pub mod random;

/// Fails the calling test unless it runs as root: privileged tests must never
/// pass by doing nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads BPF programs and needs root (run `cargo xtask test` as root)"
    );
}
