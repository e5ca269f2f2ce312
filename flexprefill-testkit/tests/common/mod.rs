//! What more than one test file of the testkit runs on.

use flexprefill_core::{FlexPrefillConfig, SelectionMode};
use flexprefill_testkit::{generate, Workload, WorkloadKind, WorkloadSpec};

/// The planted workload the faithful mode's gamma promises are checked on, at a length where
/// selection is really sparse (4096 tokens of every kind, 10 heads over 5 kv heads, d 64), and
/// the faithful configs checked there: block 64 and 128 × gamma 0.9 and 0.95, min budget 256.
pub fn planted_gamma_grid(seed: u64) -> (Workload, Vec<FlexPrefillConfig>) {
    let w = generate(&WorkloadSpec {
        kind: WorkloadKind::Mixed,
        batch: 1,
        seq_len: 4096,
        num_heads: 10,
        num_kv_heads: 5,
        head_dim: 64,
        seed,
    });
    let cfgs = [64, 128]
        .into_iter()
        .flat_map(|block_size| {
            [0.9, 0.95].map(|gamma| {
                FlexPrefillConfig::default()
                    .with_gamma(gamma)
                    .with_block_size(block_size)
                    .with_min_budget(256)
                    .with_selection(SelectionMode::Faithful)
            })
        })
        .collect();
    (w, cfgs)
}
