//! The Kubernetes parsers (Pods, ServiceAccounts, SecurityGroupPolicies, Lists,
//! several documents a file) on fuzzed YAML, inside the example state.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    enforcer_fuzz::load_with_fuzzed_file(
        input,
        &[
            "pods.yaml",
            "security-group-policies.yaml",
            "service-accounts.yaml",
        ],
        "yaml",
    );
});
