//! The faithful mode's second promise (docs/SELECTION.md): when the backend measures probe
//! queries, the probes' mean captured mass is at least gamma, checked against the f64 oracle's
//! exact captured mass (independent of the backend's own probe statistics). The first promise,
//! every representative query ≥ gamma, is `properties::representative_mass_at_least_gamma`.

use flexprefill_core::{
    selection::probe_queries, AttentionInput, Backend, FlexPrefillConfig, Pattern,
};
use flexprefill_cpu::{oracle, CpuBackend};
use flexprefill_testkit::strategies as s;
use proptest::prelude::*;

mod common;

/// Worst (head, mean probe mass − gamma) over the non-dense heads that have probes; `None`
/// when no head has probes.
fn worst_probe_margin(x: &AttentionInput<'_>, cfg: &FlexPrefillConfig) -> Option<(usize, f64)> {
    let cpu = CpuBackend::new();
    let (index, report) = cpu.select_index(x, cfg).expect("select_index");
    let mass = oracle::captured_mass(x, &index).expect("captured_mass");
    let h = x.shape.num_heads;
    report
        .heads
        .iter()
        .filter(|r| r.pattern != Pattern::Dense)
        .filter_map(|r| {
            let seq = x.seqs[r.seq];
            let probes = probe_queries(&seq, cfg.block_size);
            (!probes.is_empty()).then(|| {
                let mean = probes
                    .iter()
                    .map(|&i| mass[(seq.q_start + i) * h + r.head])
                    .sum::<f64>()
                    / probes.len() as f64;
                (r.head, mean - cfg.gamma as f64)
            })
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// The backend's statistics are f32; the oracle's mass is f64: allow their difference.
const TOL: f64 = 1e-4;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn probe_mean_at_least_gamma(
        (c, cfg) in s::case().prop_flat_map(|c| { let bs = c.block_size; (Just(c), s::faithful_config(bs)) }),
    ) {
        let input = c.build();
        let x = input.input()?;
        if let Some((head, margin)) = worst_probe_margin(&x, &cfg) {
            prop_assert!(margin >= -TOL, "head {head}: probes' mean is gamma {margin:+.6}");
        }
    }
}

/// On every planted kind at 4096 tokens (block 64 and 128, gamma 0.9 and 0.95).
#[test]
fn probe_mean_on_planted_workloads() {
    let (w, cfgs) = common::planted_gamma_grid(5);
    for cfg in cfgs {
        let (head, margin) = worst_probe_margin(&w.input(), &cfg).expect("probes");
        assert!(
            margin >= -TOL,
            "block {} gamma {} head {head}: {margin:+.6}",
            cfg.block_size,
            cfg.gamma
        );
    }
}
