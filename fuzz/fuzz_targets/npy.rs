//! The .npy reader (then the CLI's q/k/v checks): `flexprefill-cli/src/fuzz.rs`'s target.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../flexprefill-cli/src/fuzz.rs"]
mod fuzz;
#[path = "../../flexprefill-cli/src/io.rs"]
mod io;
#[path = "../../flexprefill-cli/src/npy.rs"]
mod npy;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz::npy_target(data);
});
