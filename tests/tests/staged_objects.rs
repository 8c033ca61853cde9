//! Every object `cargo xtask build-ebpf` stages, in every profile, is one the
//! kernel loads: each of its programs passes the verifier. A profile whose
//! objects do not load would leave a binary of that profile enforcing nothing.

use aya::Ebpf;
use aya::programs::Program;
use enforcer_tests::staged;

/// Loads every program of the object at `path`; the failures, verifier logs included.
fn rejected_programs(path: &std::path::Path) -> Vec<String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return vec![format!("{}: cannot read: {e}", path.display())],
    };
    let mut ebpf = match Ebpf::load(&bytes) {
        Ok(ebpf) => ebpf,
        Err(e) => return vec![format!("{}: {:#}", path.display(), anyhow::Error::from(e))],
    };
    let mut rejected = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let loaded = match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            other => {
                rejected.push(format!(
                    "{}: {name}: a {:?} program, which this test cannot load yet",
                    path.display(),
                    other.prog_type()
                ));
                continue;
            }
        };
        if let Err(e) = loaded {
            // ProgramError::LoadError's message carries the verifier's log.
            rejected.push(format!("{}: {name}: {e}", path.display()));
        }
    }
    rejected
}

#[test]
fn every_program_of_every_staged_profile_loads() {
    enforcer_tests::require_root();
    let mut rejected = Vec::new();
    for profile in staged::PROFILES {
        let dir = staged::dir(profile);
        let mut objects: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| {
                panic!(
                    "no objects staged for the {profile} profile in {} ({e}): run `{}`",
                    dir.display(),
                    staged::build_command(profile)
                )
            })
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "o"))
            .collect();
        objects.sort();
        assert!(
            !objects.is_empty(),
            "no objects staged in {}: run `{}`",
            dir.display(),
            staged::build_command(profile)
        );
        for object in &objects {
            eprintln!("loading {}", object.display());
            rejected.extend(rejected_programs(object));
        }
    }
    assert!(
        rejected.is_empty(),
        "the kernel rejected {} program(s):\n\n{}",
        rejected.len(),
        rejected.join("\n\n")
    );
}

/// The enforcer this crate links embeds the object staged for its own profile.
#[test]
fn the_enforcer_embeds_the_object_of_its_own_profile() {
    let staged = staged::object("enforcer-ebpf");
    let bytes = std::fs::read(&staged).unwrap_or_else(|e| {
        panic!(
            "{} ({e}): run `{}`",
            staged.display(),
            staged::build_command(staged::PROFILE)
        )
    });
    let embedded = enforcer::kernel::ebpf::object().expect("an embedded object");
    assert!(
        embedded == bytes.as_slice(),
        "the embedded object is not {}",
        staged.display()
    );
}
