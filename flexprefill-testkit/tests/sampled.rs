//! The sampled selection mode on the CPU backend, checked against the exact block masses.

use flexprefill_core::selection::{build_index, sampled_queries};
use flexprefill_core::{Backend, FlexPrefillConfig, SelectionMode};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::oracle::HeadBlockMass;
use flexprefill_testkit::{generate, WorkloadKind, WorkloadSpec};

fn small(kind: WorkloadKind, len: usize) -> WorkloadSpec {
    let mut spec = WorkloadSpec::new(kind, len);
    (spec.num_heads, spec.num_kv_heads, spec.head_dim) = (4, 2, 32);
    spec
}

// Field assignment, not a struct literal: the config is `#[non_exhaustive]` outside core.
#[allow(clippy::field_reassign_with_default)]
fn sampled_cfg() -> FlexPrefillConfig {
    let mut cfg = FlexPrefillConfig::default();
    cfg.selection = SelectionMode::Sampled;
    cfg.block_size = 64;
    cfg.min_budget = 64;
    cfg
}

#[test]
fn sampled_block_mass_is_the_mean_of_the_sampled_rows_exact_block_masses() {
    let w = generate(&small(WorkloadKind::Mixed, 1000));
    let x = w.input();
    let cfg = sampled_cfg();
    let stats = CpuBackend::new().head_statistics(&x, &cfg).unwrap();
    let s = x.seqs[0];
    let rows = sampled_queries(&s, 64);
    for (head, st) in stats.iter().enumerate() {
        let t = HeadBlockMass::compute(&x, 0, head, 64).unwrap();
        let nkb = t.num_key_blocks;
        assert_eq!(st.sampled_block_mass.len(), t.num_query_blocks() * nkb);
        for r in 0..t.num_query_blocks() {
            let mine: Vec<usize> = rows.iter().copied().filter(|&i| i / 64 == r).collect();
            assert!(mine.contains(&t.rows_of(r).end.saturating_sub(1)));
            for c in 0..nkb {
                let want = mine.iter().map(|&i| t.row(i)[c]).sum::<f64>() / mine.len() as f64;
                let got = st.sampled_block_mass[r * nkb + c] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {head} r {r} c {c}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn every_query_block_holds_gamma_of_its_estimate_and_heads_keep_their_mass() {
    for kind in [
        WorkloadKind::SinkLocal,
        WorkloadKind::Needle,
        WorkloadKind::Topics,
    ] {
        let w = generate(&small(kind, 2048));
        let x = w.input();
        let mut cfg = sampled_cfg();
        cfg.gamma = 0.9;
        let stats = CpuBackend::new().head_statistics(&x, &cfg).unwrap();
        let (index, reports) = build_index(&x.seqs, x.shape, &cfg, &stats).unwrap();
        index.validate(cfg.forced).unwrap();
        for (head, st) in stats.iter().enumerate() {
            let nkb = x.seqs[0].num_key_blocks(64);
            for r in 0..x.seqs[0].num_query_blocks(64) {
                let est = &st.sampled_block_mass[r * nkb..(r + 1) * nkb];
                let total: f64 = est.iter().map(|&v| v as f64).sum();
                let kept: f64 = index
                    .row(0, head, r)
                    .iter()
                    .map(|&c| est[c as usize] as f64)
                    .sum();
                assert!(
                    kept >= 0.9 * total - 1e-9,
                    "{kind} head {head} r {r}: {kept} of {total}"
                );
            }
            let t = HeadBlockMass::compute(&x, 0, head, 64).unwrap();
            let m = t.captured(&index, 0, head);
            let mean = m.iter().sum::<f64>() / m.len() as f64;
            assert!(mean >= 0.9 - 0.005, "{kind} head {head}: mean mass {mean}");
            assert!(reports[head].density <= 1.0);
        }
    }
}
