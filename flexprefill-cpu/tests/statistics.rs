//! `head_statistics` against a naive f64 computation, and its invariants.

mod common;

use common::Data;
use flexprefill_core::selection::probe_queries;
use flexprefill_core::{
    AttentionInput, Backend, BlockIndex, DType, FlexPrefillConfig, HeadStatistics, HostTensor,
    SelectionMode,
};
use flexprefill_cpu::{oracle, CpuBackend};

/// The definitions of `HeadStatistics`, term by term, in f64.
struct Naive {
    probe_block_mass: Vec<f64>,
    vertical: Vec<f64>,
    slash: Vec<f64>,
    rep_block_mass: Vec<f64>,
    estimate: Vec<f64>,
    q_pooled: Vec<f64>,
    k_pooled: Vec<f64>,
}

fn naive(x: &AttentionInput<'_>, seq: usize, head: usize, bs: usize, e: f64) -> Naive {
    let s = x.seqs[seq];
    let d = x.shape.head_dim;
    let kvh = x.shape.kv_head(head);
    let q = |i: usize, c: usize| x.q.get_f32(x.q_offset(s.q_start + i, head) + c) as f64;
    let k = |j: usize, c: usize| x.k.get_f32(x.kv_offset(s.k_start + j, kvh) + c) as f64;
    let n = s.kv_len;
    let nkb = s.num_key_blocks(bs);
    let nrep = bs.min(s.q_len);
    let (mut vertical, mut slash) = (vec![0.0; n], vec![0.0; n]);
    let mut rep_block_mass = vec![0.0; nrep * nkb];
    for i in 0..nrep {
        let qi = s.q_len - nrep + i;
        let pos = s.kv_len - nrep + i;
        let logits: Vec<f64> = (0..=pos)
            .map(|j| (0..d).map(|c| q(qi, c) * k(j, c)).sum::<f64>() * e)
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        for (j, l) in logits.iter().enumerate() {
            let a = (l - m).exp() / z;
            vertical[j] += a / nrep as f64;
            slash[pos - j] += a / nrep as f64;
            rep_block_mass[i * nkb + j / bs] += a;
        }
    }
    let mut probe_block_mass = Vec::new();
    for qi in probe_queries(&s, bs) {
        let pos = s.query_offset() + qi;
        let logits: Vec<f64> = (0..=pos)
            .map(|j| (0..d).map(|c| q(qi, c) * k(j, c)).sum::<f64>() * e)
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        let mut row = vec![0.0; nkb];
        for (j, l) in logits.iter().enumerate() {
            row[j / bs] += (l - m).exp() / z;
        }
        probe_block_mass.extend(row);
    }
    let mean_rows = |rows: std::ops::Range<usize>, f: &dyn Fn(usize, usize) -> f64| {
        let cnt = rows.len() as f64;
        (0..d)
            .map(|c| rows.clone().map(|r| f(r, c)).sum::<f64>() / cnt)
            .collect::<Vec<f64>>()
    };
    let k_pooled: Vec<f64> = (0..nkb)
        .flat_map(|c| mean_rows(c * bs..((c + 1) * bs).min(n), &k))
        .collect();
    let q_pooled: Vec<f64> = (0..s.num_query_blocks(bs))
        .flat_map(|r| mean_rows(r * bs..((r + 1) * bs).min(s.q_len), &q))
        .map(|v| v * e)
        .collect();
    let qbar: Vec<f64> = mean_rows(s.q_len - nrep..s.q_len, &q)
        .iter()
        .map(|v| v * e)
        .collect();
    let logits: Vec<f64> = k_pooled
        .chunks(d)
        .map(|kb| kb.iter().zip(&qbar).map(|(a, b)| a * b).sum())
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
    let estimate = logits.iter().map(|l| (l - m).exp() / z).collect();
    Naive {
        probe_block_mass,
        vertical,
        slash,
        rep_block_mass,
        estimate,
        q_pooled,
        k_pooled,
    }
}

fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

fn check_invariants(st: &HeadStatistics, x: &AttentionInput<'_>, seq: usize, bs: usize) {
    let s = x.seqs[seq];
    let (d, nkb, nqb) = (
        x.shape.head_dim,
        s.num_key_blocks(bs),
        s.num_query_blocks(bs),
    );
    let nrep = bs.min(s.q_len);
    assert_eq!(st.vertical.len(), s.kv_len);
    assert_eq!(st.slash.len(), s.kv_len);
    assert_eq!(st.estimate.len(), nkb);
    assert_eq!(st.q_pooled.len(), nqb * d);
    assert_eq!(st.k_pooled.len(), nkb * d);
    assert_eq!(st.rep_block_mass.len(), nrep * nkb);
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    assert!((sum(&st.vertical) - 1.0).abs() < 1e-5);
    assert!((sum(&st.slash) - 1.0).abs() < 1e-5);
    assert!((sum(&st.estimate) - 1.0).abs() < 1e-5);
    for row in st.rep_block_mass.chunks(nkb) {
        assert!((sum(row) - 1.0).abs() < 1e-5);
    }
    for row in st.probe_block_mass.chunks(nkb) {
        assert!((sum(row) - 1.0).abs() < 1e-5);
    }
    // The last representative query sees everything; the first one nothing past its position.
    let first_pos = s.kv_len - nrep;
    let last_block_of_first = first_pos / bs;
    assert!(st.rep_block_mass[last_block_of_first + 1..nkb]
        .iter()
        .all(|&m| m == 0.0));
}

#[test]
fn statistics_match_the_naive_definitions() {
    let cpu = CpuBackend::new();
    // Aligned, shorter than one block, chunked mid-block, GQA 4:1, ragged.
    let data = Data::new(3, &[(300, 300), (20, 20), (50, 230)], 8, 2, 24);
    let x = data.input().with_softmax_scale(0.15).unwrap();
    for (mode, bs) in [
        (SelectionMode::Faithful, 64),
        (SelectionMode::Original, 32),
        (SelectionMode::Faithful, 16),
    ] {
        let cfg = FlexPrefillConfig::default()
            .with_block_size(bs)
            .with_selection(mode);
        // Original estimates with 1/√D whatever softmax_scale says; Faithful with it.
        let e = match mode {
            SelectionMode::Original => 1.0 / (24f64).sqrt(),
            _ => 0.15f32 as f64,
        };
        let stats = cpu.head_statistics(&x, &cfg).unwrap();
        assert_eq!(stats.len(), 3 * 8);
        for (si, _) in x.seqs.iter().enumerate() {
            for head in 0..8 {
                let st = &stats[si * 8 + head];
                assert!(!st.bf16_pooled_logits);
                check_invariants(st, &x, si, bs);
                let want = naive(&x, si, head, bs, e);
                let at = format!("{mode:?} bs {bs} seq {si} head {head}");
                assert!(max_abs(&st.vertical, &want.vertical) < 1e-6, "{at}");
                assert!(max_abs(&st.slash, &want.slash) < 1e-6, "{at}");
                assert!(
                    max_abs(&st.rep_block_mass, &want.rep_block_mass) < 1e-5,
                    "{at}"
                );
                assert!(max_abs(&st.estimate, &want.estimate) < 1e-6, "{at}");
                assert!(max_abs(&st.q_pooled, &want.q_pooled) < 1e-5, "{at}");
                if mode == SelectionMode::Original {
                    assert!(st.probe_block_mass.is_empty(), "{at}");
                } else {
                    assert!(
                        max_abs(&st.probe_block_mass, &want.probe_block_mass) < 1e-5,
                        "{at}"
                    );
                }
                assert!(max_abs(&st.k_pooled, &want.k_pooled) < 1e-5, "{at}");
            }
        }
    }
}

#[test]
fn representative_block_mass_agrees_with_captured_mass() {
    // Two independent paths to the same number: Σ over selected blocks of rep_block_mass, and
    // the oracle's captured mass on the representative rows (same scale in Faithful mode).
    let cpu = CpuBackend::new();
    let data = Data::new(5, &[(200, 200), (40, 150)], 4, 2, 16);
    let x = data.input();
    let bs = 32;
    let cfg = FlexPrefillConfig::default().with_block_size(bs);
    let stats = cpu.head_statistics(&x, &cfg).unwrap();
    let heads = x
        .seqs
        .iter()
        .flat_map(|s| {
            (0..4).map(move |h| {
                (0..s.num_query_blocks(bs))
                    .map(|r| {
                        (0..s.causal_key_blocks(r, bs) as u32)
                            .filter(|c| (c + h) % 3 != 1)
                            .collect::<Vec<_>>()
                    })
                    .map(|row| if row.is_empty() { vec![0] } else { row })
                    .collect()
            })
        })
        .collect();
    let index = BlockIndex::from_rows(&x.seqs, 4, bs, heads).unwrap();
    let mass = oracle::captured_mass(&x, &index).unwrap();
    for (si, s) in x.seqs.iter().enumerate() {
        let nrep = bs.min(s.q_len);
        let nkb = s.num_key_blocks(bs);
        for h in 0..4 {
            let st = &stats[si * 4 + h];
            for i in 0..nrep {
                let qi = s.q_len - nrep + i;
                // The representative rows straddle the last two query blocks when
                // q_len % bs != 0: each row reads its own block's selection.
                let row = index.row(si, h, qi / bs);
                let from_stats: f64 = row
                    .iter()
                    .map(|&c| st.rep_block_mass[i * nkb + c as usize] as f64)
                    .sum();
                let from_oracle = mass[(s.q_start + qi) * 4 + h];
                assert!(
                    (from_stats - from_oracle).abs() < 1e-5,
                    "seq {si} head {h} rep {i}: {from_stats} vs {from_oracle}"
                );
            }
        }
    }
}

#[test]
fn original_mode_on_bf16_replays_the_rounding_points() {
    let cpu = CpuBackend::new();
    let data = Data::new(9, &[(300, 300)], 4, 2, 32);
    let (q, k, v) = (
        HostTensor::from_f32(data.q.clone(), DType::BF16),
        HostTensor::from_f32(data.k.clone(), DType::BF16),
        HostTensor::from_f32(data.v.clone(), DType::BF16),
    );
    let x = AttentionInput::batched(q.as_ref(), k.as_ref(), v.as_ref(), 1, 300, 300, data.shape)
        .unwrap();
    let bs = 64;
    let original = FlexPrefillConfig::original().with_block_size(bs);
    let faithful = FlexPrefillConfig::default().with_block_size(bs);
    let emu = cpu.head_statistics(&x, &original).unwrap();
    let plain = cpu.head_statistics(&x, &faithful).unwrap();
    let is_bf16 = |v: f32| flexprefill_core::bf16::from_f32(v).to_f32() == v;
    for (e, p) in emu.iter().zip(&plain) {
        assert!(e.bf16_pooled_logits && !p.bf16_pooled_logits);
        // The pooled tensors the original keeps in bf16 are bf16 values here.
        assert!(e.q_pooled.iter().all(|&v| is_bf16(v)));
        assert!(e.k_pooled.iter().all(|&v| is_bf16(v)));
        assert!(!p.q_pooled.iter().all(|&v| is_bf16(v)));
        // Same default scale (1/√D) in both, so the difference is the rounding alone: small.
        let l1 = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>();
        assert!(l1(&e.vertical, &p.vertical) < 0.05);
        assert!(l1(&e.slash, &p.slash) < 0.05);
        assert!(l1(&e.estimate, &p.estimate) < 0.05);
        assert!(e.vertical != p.vertical, "rounding must change something");
        let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        assert!((sum(&e.vertical) - 1.0).abs() < 1e-5);
        assert!((sum(&e.slash) - 1.0).abs() < 1e-5);
    }
}
