//! Every frame of the `frame_oracle` fuzz corpus (`fuzz/corpus/frame_oracle`:
//! the checked-in seeds and whatever local fuzzing added) and of the
//! differential generator's edge cases, through the kernel program with
//! `BPF_PROG_TEST_RUN`, against the frame-stage oracle and the reference models
//! on `enforcer_tests::replay::model()`: verdict and reason must agree.
//!
//! `ENFORCER_REPLAY_WRITE_CORPUS=<dir>` also writes the generator's cases
//! there, one per frame-stage path, as corpus inputs (how the seeds were made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use enforcer::policy::flow::FlowTable;
use enforcer_tests::frame_oracle::FrameOracle;
use enforcer_tests::kernel::{Kernel, Outcome};
use enforcer_tests::random::{CaseGenerator, Rng};
use enforcer_tests::replay::{self, Replayed};

/// Generator cases replayed after the corpus.
const GENERATED: usize = 5_000;
const SEED: u64 = 0x00e0_d9e5;

/// The checked-in seeds, and what `cargo xtask fuzz` found (absent before any run).
fn corpus_dirs() -> [PathBuf; 2] {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        root.join("fuzz/corpus/frame_oracle"),
        root.join("target/fuzz-corpus/frame_oracle"),
    ]
}

#[test]
fn corpus_and_generator_frames_agree_with_the_oracle_in_the_kernel() {
    let model = replay::model();
    let kernel = Kernel::load(&model);
    let mut oracle = FrameOracle::new();
    let mut flows = FlowTable::new();
    let mut inputs: Vec<(String, Replayed)> = Vec::new();
    let [seeds, found] = corpus_dirs();
    let list = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a corpus entry").path())
            .collect()
    };
    let mut files = list(&seeds);
    assert!(!files.is_empty(), "the checked-in frame corpus is empty");
    if found.exists() {
        files.extend(list(&found));
    }
    files.sort();
    let corpus = files.len();
    for file in files {
        let bytes = std::fs::read(&file).expect("a corpus file");
        inputs.push((file.display().to_string(), replay::decode(&bytes)));
    }
    let mut rng = Rng::new(SEED);
    let mut cases = CaseGenerator::new();
    for n in 0..GENERATED {
        let case = cases.next(&mut rng, &model);
        let input = replay::encode(case.direction, case.metadata, &case.frame);
        inputs.push((
            format!("generated #{n} ({:?})", case.kind),
            replay::decode(&input),
        ));
    }
    let write_to = std::env::var_os("ENFORCER_REPLAY_WRITE_CORPUS").map(PathBuf::from);
    let mut paths = BTreeMap::<&str, u64>::new();
    for (name, replayed) in &inputs {
        let (seen, metadata) = replayed.as_seen();
        let now = enforcer::observe::events::monotonic().as_nanos() as u64;
        let want = oracle.judge(&model, &mut flows, &seen, metadata, replayed.direction, now);
        let got = if replayed.metadata {
            kernel.run_tag_in_metadata(replayed.direction, &replayed.frame)
        } else {
            kernel.run(replayed.direction, &replayed.frame)
        };
        assert_eq!(
            got,
            Outcome::expected(want.reason, false),
            "{name}, path {:?}: {replayed:02x?}",
            want.path
        );
        let first = !paths.contains_key(want.path);
        *paths.entry(want.path).or_default() += 1;
        if let Some(dir) = &write_to
            && first
        {
            let file = dir.join(want.path.replace([' ', ',', '\''], "-"));
            let input = replay::encode(replayed.direction, replayed.metadata, &replayed.frame);
            std::fs::write(&file, input).expect("write a corpus input");
        }
    }
    eprintln!(
        "replay: {corpus} corpus frames and {GENERATED} generated ones agree; paths {paths:#?}"
    );
}
