//! The EC2 parsers (describe-security-groups, describe-network-interfaces, a
//! managed prefix list's entries) on fuzzed JSON, inside the example state.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    enforcer_fuzz::load_with_fuzzed_file(
        input,
        &[
            "security-groups.json",
            "network-interfaces.json",
            "prefix-list-partner-apis.json",
        ],
        "json",
    );
});
