//! The Kubernetes parsers on fuzzed JSON (what `kubectl get -o json` prints),
//! inside the example state.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    enforcer_fuzz::load_with_fuzzed_file(
        input,
        &[
            "pods.yaml",
            "security-group-policies.yaml",
            "service-accounts.yaml",
        ],
        "json",
    );
});
