//! The target functions of the stable fuzz tests, compiled here from their source files so that
//! cargo-fuzz and `cargo test` run the same code. The CLI is a binary crate, so its reader
//! modules are included by path; their `crate::` paths resolve because they sit at this root.
#![allow(dead_code, unused_imports)]

#[path = "../../flexprefill-cli/src/fuzz.rs"]
mod cli_fuzz;
#[path = "../../flexprefill-testkit/tests/fuzz_input.rs"]
mod fuzz_input;
#[path = "../../flexprefill-cli/src/io.rs"]
mod io;
#[path = "../../flexprefill-cli/src/npy.rs"]
mod npy;

/// The `.npy` reader, then the CLI's q/k/v checks.
pub fn npy(data: &[u8]) {
    cli_fuzz::npy_target(data);
}

/// The safetensors reader, then the CLI's q/k/v checks.
pub fn safetensors(data: &[u8]) {
    cli_fuzz::safetensors_target(data);
}

/// `AttentionInput` and `BlockIndex` construction from sizes decoded from `data`.
pub fn attention_input(data: &[u8]) {
    fuzz_input::target(data);
}
