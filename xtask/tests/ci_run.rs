//! `.ci/run` passes only when the privileged tests ran: it is run in a scratch
//! copy of the repository whose `cargo` and `rustup` are stand-ins that succeed
//! without doing anything, the `cargo xtask test` one leaving the proof that the
//! privileged tests ran only when asked to.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MARKER: &str = "target/privileged-tests.passed";

/// A scratch repository holding `.ci/run` and the stand-ins, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("xtask-ci-run-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in [".ci", "bin", "target"] {
            std::fs::create_dir_all(root.join(dir)).expect("create the scratch repository");
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run");
        std::fs::copy(&script, root.join(".ci/run")).expect("copy .ci/run");
        // Each call is logged; `cargo xtask test` writes the marker when told to.
        let cargo = format!(
            "#!/bin/sh\necho \"cargo $*\" >> {root}/calls\n\
             if [ \"$1 $2\" = 'xtask test' ] && [ -n \"$PRIVILEGED_TESTS_RUN\" ]; then\n\
             echo ran > {root}/{MARKER}\nfi\n",
            root = root.display()
        );
        let rustup = format!(
            "#!/bin/sh\necho \"rustup $*\" >> {}/calls\n",
            root.display()
        );
        for (name, text) in [("cargo", cargo), ("rustup", rustup)] {
            let path = root.join("bin").join(name);
            std::fs::write(&path, text).expect("write a stand-in");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make a stand-in executable");
        }
        Self(root)
    }

    /// Runs `.ci/run` with the stand-ins first on the path and `env` set.
    fn run(&self, env: &[(&str, &str)]) -> Output {
        let path = format!("{}:/usr/bin:/bin", self.0.join("bin").display());
        Command::new("bash")
            .arg(self.0.join(".ci/run"))
            .env_clear()
            .env("PATH", path)
            .envs(env.iter().copied())
            .output()
            .expect("run .ci/run")
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.0.join("calls")).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn passes_when_the_privileged_tests_ran() {
    let scratch = Scratch::new("ran");
    let output = scratch.run(&[("PRIVILEGED_TESTS_RUN", "1")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(scratch.calls().contains("cargo xtask test"));
}

#[test]
fn fails_when_the_privileged_tests_did_not_run() {
    let scratch = Scratch::new("skipped");
    // A proof left by an earlier run does not count.
    std::fs::write(scratch.0.join(MARKER), "ran").unwrap();
    let output = scratch.run(&[]);
    assert!(
        !output.status.success(),
        "CI passed without the privileged tests"
    );
    assert!(
        stderr(&output).contains("the privileged tests did not run"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn refuses_the_switch_that_skips_them() {
    let scratch = Scratch::new("switch");
    let output = scratch.run(&[
        ("ENFORCER_SKIP_PRIVILEGED", "1"),
        ("PRIVILEGED_TESTS_RUN", "1"),
    ]);
    assert!(
        !output.status.success(),
        "CI passed with ENFORCER_SKIP_PRIVILEGED=1"
    );
    assert!(
        stderr(&output).contains("ENFORCER_SKIP_PRIVILEGED"),
        "{}",
        stderr(&output)
    );
    assert!(
        !scratch.calls().contains("xtask test"),
        "{}",
        scratch.calls()
    );
}
