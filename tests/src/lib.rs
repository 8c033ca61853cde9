//! Shared helpers of the privileged integration tests: frames built byte by
//! byte, and the guard that makes a test fail (never skip) without root.

pub mod deploy;
pub mod frame;
pub mod frame_oracle;
pub mod kernel;
pub mod live;
pub mod models;
pub mod nat_oracle;
pub mod oracle;
pub mod random;
pub mod replay;
pub mod staged;
pub mod testbed;

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

/// One `BPF_PROG_TEST_RUN` of `frame` through `program` (TC or XDP), timed by the kernel.
pub fn time_run<P>(program: &P, frame: &[u8]) -> std::time::Duration
where
    P: for<'a> aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    use aya::programs::TestRunOptions;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    program
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?} failed: {e:?}"))
        .duration
}
