//! `AttentionInput` and `BlockIndex` construction from arbitrary sizes:
//! `flexprefill-testkit/tests/fuzz_input.rs`'s target.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../flexprefill-testkit/tests/fuzz_input.rs"]
mod fuzz_input;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_input::target(data);
});
