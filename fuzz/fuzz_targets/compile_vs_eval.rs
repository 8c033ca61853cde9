//! The compiler against the evaluator: a model and packets decoded from the
//! input; `interpret(compile(model))` must agree with `eval::evaluate` on every
//! packet (verdict, reason, untracked, lowest allowing rules), as the
//! compiler's property tests check on random models.
#![no_main]

use enforcer_fuzz::{Bytes, model, query};

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let mut bytes = Bytes::new(input);
    let model = model(&mut bytes);
    let Ok(compiled) = enforcer::compile::compile(&model) else {
        return;
    };
    for _ in 0..16 {
        if bytes.is_empty() {
            break;
        }
        let (pod, query) = query(&mut bytes, &model);
        if let Some(difference) = enforcer::compile::disagreement(&model, &compiled, pod, &query) {
            panic!("{difference}");
        }
    }
});
