//! The frame-stage oracle on fuzzed frames (`tests/src/frame_oracle.rs`): it
//! must judge any bytes without panicking, and the frames it finds interesting
//! (its corpus) are replayed through the kernel program by
//! `tests/tests/replay.rs`, which checks the kernel against it.
#![no_main]

use enforcer::policy::flow::FlowTable;
use enforcer_fuzz::frame_oracle::FrameOracle;
use enforcer_fuzz::replay;

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let model = replay::model();
    let replayed = replay::decode(input);
    let (frame, metadata) = replayed.as_seen();
    let mut oracle = FrameOracle::new();
    let mut flows = FlowTable::new();
    oracle.judge(&model, &mut flows, &frame, metadata, replayed.direction, 0);
});
