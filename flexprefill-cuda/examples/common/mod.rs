//! What the device benches share: the issue-5 head shape, the error type, the median.

/// Query heads and kv heads of issue 5's benchmark shape.
pub const H: usize = 32;
pub const HKV: usize = 8;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Median of the timings (the upper one of an even count).
pub fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `base` with `set` applied (configurations are built from a default plus field
/// assignments, never a struct literal: the config struct is open to new fields).
pub fn with_config(
    mut base: flexprefill_core::FlexPrefillConfig,
    set: impl FnOnce(&mut flexprefill_core::FlexPrefillConfig),
) -> flexprefill_core::FlexPrefillConfig {
    set(&mut base);
    base
}

/// The bf16 q, k, v of testkit workload `kind`: batch 1, `n` tokens, the issue-5 heads,
/// head_dim `d`, seeded with the length (so a length always gets the same input).
pub fn workload_bf16(
    kind: flexprefill_testkit::workload::WorkloadKind,
    n: usize,
    d: usize,
) -> (
    Vec<flexprefill_core::bf16>,
    Vec<flexprefill_core::bf16>,
    Vec<flexprefill_core::bf16>,
) {
    flexprefill_testkit::workload::generate(&flexprefill_testkit::workload::WorkloadSpec {
        kind,
        batch: 1,
        seq_len: n,
        num_heads: H,
        num_kv_heads: HKV,
        head_dim: d,
        seed: n as u64,
    })
    .to_bf16()
}
