//! Fuzz targets for the two file readers: every byte string is either read or refused with an
//! error, never a panic, and what is read is consistent (element count = product of the shape).
//!
//! `cargo test` runs a short smoke of each; the long runs recorded in `docs/TESTING.md` are
//! `FLEXPREFILL_FUZZ_INPUTS=1000000 cargo test -p flexprefill-cli fuzz_long -- --ignored` (the test
//! profile keeps overflow checks on). `fuzz/` runs the same targets under cargo-fuzz.

use std::path::Path;

use flexprefill_core::{AttentionInput, AttentionShape};
use flexprefill_testkit::fuzz;

use crate::io::{assemble, safetensors_tensors, Loaded};
use crate::npy;

const SMOKE_INPUTS: u64 = 3_000;

const NPY_TOKENS: &[&[u8]] = &[
    b"'descr'",
    b"'<f4'",
    b"'<f2'",
    b"'<f8'",
    b"'fortran_order'",
    b"False",
    b"True",
    b"'shape'",
    b"()",
    b"(0,)",
    b", ",
    b"L",
    b"\x93NUMPY\x02\x00",
    b"\x93NUMPY\x03\x00",
];

const SAFETENSORS_TOKENS: &[&[u8]] = &[
    b"\"dtype\"",
    b"\"F32\"",
    b"\"F16\"",
    b"\"BF16\"",
    b"\"F64\"",
    b"\"I8\"",
    b"\"shape\"",
    b"[]",
    b"[0]",
    b"\"data_offsets\"",
    b"\"__metadata__\"",
    b"\"q\"",
    b"\"k\"",
    b"\"v\"",
    b"null",
];

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    fuzz::read_corpus(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz-corpus")
            .join(kind),
    )
}

/// Shape of what the readers return, checked against the data they return.
fn consistent(shape: &[usize], len: usize) -> bool {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(len)
}

/// The CLI's path after reading: assemble q/k/v, then build the attention input from them.
fn assemble_and_build(q: Loaded, k: Loaded, v: Loaded) -> bool {
    let Ok(x) = assemble(q, k, v) else {
        return false;
    };
    let shape = AttentionShape::new(x.num_heads, x.num_kv_heads, x.head_dim)
        .expect("assemble checked the heads and head_dim");
    let (q, k, v) = (x.q.as_ref(), x.k.as_ref(), x.v.as_ref());
    AttentionInput::batched(q, k, v, x.batch, x.q_len, x.kv_len, shape)
        .expect("assemble checked everything batched checks");
    true
}

pub(crate) fn npy_target(bytes: &[u8]) -> bool {
    let Ok(a) = npy::parse(bytes) else {
        return false;
    };
    assert!(
        consistent(&a.shape, a.data.len()),
        "{:?} vs {}",
        a.shape,
        a.data.len()
    );
    // The same array as q, k and v goes through the CLI's checks.
    let loaded = |role| Loaded {
        role,
        origin: "fuzz".into(),
        shape: a.shape.clone(),
        data: a.data.clone(),
    };
    assemble_and_build(loaded("q"), loaded("k"), loaded("v"));
    true
}

pub(crate) fn safetensors_target(bytes: &[u8]) -> bool {
    let names = ["q", "k", "v"].map(String::from);
    let Ok([q, k, v]) = safetensors_tensors(bytes, &names, "fuzz") else {
        return false;
    };
    for t in [&q, &k, &v] {
        assert!(
            consistent(&t.shape, t.data.len()),
            "{:?} vs {}",
            t.shape,
            t.data.len()
        );
    }
    assemble_and_build(q, k, v)
}

fn seed() -> u64 {
    std::env::var("FLEXPREFILL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn fuzz_smoke_npy() {
    let stats = fuzz::run(
        "npy",
        &corpus("npy"),
        NPY_TOKENS,
        SMOKE_INPUTS,
        1,
        npy_target,
    );
    assert!(stats.accepted > 0, "the corpus has valid files");
}

#[test]
fn fuzz_smoke_safetensors() {
    let stats = fuzz::run(
        "safetensors",
        &corpus("safetensors"),
        SAFETENSORS_TOKENS,
        SMOKE_INPUTS,
        1,
        safetensors_target,
    );
    assert!(stats.accepted > 0, "the corpus has valid files");
}

#[test]
#[ignore = "long fuzz run: set FLEXPREFILL_FUZZ_INPUTS (docs/TESTING.md)"]
fn fuzz_long_npy() {
    let n = fuzz::inputs_from_env(1_000_000);
    fuzz::run("npy", &corpus("npy"), NPY_TOKENS, n, seed(), npy_target);
}

#[test]
#[ignore = "long fuzz run: set FLEXPREFILL_FUZZ_INPUTS (docs/TESTING.md)"]
fn fuzz_long_safetensors() {
    let n = fuzz::inputs_from_env(1_000_000);
    let corpus = corpus("safetensors");
    fuzz::run(
        "safetensors",
        &corpus,
        SAFETENSORS_TOKENS,
        n,
        seed(),
        safetensors_target,
    );
}
