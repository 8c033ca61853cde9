//! The NodeConfig parser on fuzzed YAML, inside the example state.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    enforcer_fuzz::load_with_fuzzed_file(input, &["node-config.yaml"], "yaml");
});
