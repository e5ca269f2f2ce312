//! The CPU backend against the f64 oracle, shape by awkward shape.
//!
//! Tolerances: the f32 kernel's error against the f64 oracle is a few f32 ulps per element
//! (GEMM sums of ≤ 256 terms, a polynomial exp2 within 2·10⁻⁷), so relative L2 ≤ 1e-5 leaves a
//! margin of ~30× on these sizes. f16/bf16 outputs add their own rounding (2⁻¹¹, 2⁻⁸ relative
//! per element), hence 1e-3 and 8e-3 there.

use flexprefill_core::{
    bf16, f16, AttentionInput, Backend, BlockIndex, DType, Error, FlexPrefillConfig, ForcedBlocks,
    HostTensor, Sequence, TensorRef,
};
use flexprefill_cpu::{merge_partials, oracle, CpuBackend, Tiles};

mod common;
use common::{Data, Rng};

fn out_f32(o: &flexprefill_core::AttentionOutput) -> Vec<f32> {
    o.out.to_f32_vec()
}

/// Max |a − b| over finite entries; −∞ must match −∞.
fn lse_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "row {i}");
        } else {
            assert!(
                (g as f64 - w).abs() <= tol * w.abs().max(1.0),
                "row {i}: {g} vs {w}"
            );
        }
    }
}

fn random_index(seed: u64, seqs: &[Sequence], h: usize, bs: usize, keep: f32) -> BlockIndex {
    let mut rng = Rng(seed);
    let heads = seqs
        .iter()
        .flat_map(|s| (0..h).map(move |_| s))
        .map(|s| {
            (0..s.num_query_blocks(bs))
                .map(|r| {
                    let causal = s.causal_key_blocks(r, bs) as u32;
                    let mut row: Vec<u32> = (0..causal).filter(|_| rng.uniform() < keep).collect();
                    if row.is_empty() {
                        row.push((rng.next_u64() % causal as u64) as u32);
                    }
                    row
                })
                .collect()
        })
        .collect();
    let index = BlockIndex::from_rows(seqs, h, bs, heads).unwrap();
    index
        .validate(ForcedBlocks {
            sink: false,
            diagonal: false,
        })
        .unwrap();
    index
}

#[test]
fn dense_index_equals_the_oracle_for_every_gqa_ratio() {
    let cpu = CpuBackend::new();
    for (i, &(h, hkv)) in [(4, 4), (4, 2), (8, 2), (8, 1)].iter().enumerate() {
        for &(n, bs) in &[(200, 64), (256, 32), (40, 64), (97, 16)] {
            let data = Data::new(i as u64 * 100 + n as u64, &[(n, n)], h, hkv, 32);
            let x = data.input();
            let index = BlockIndex::dense(&x.seqs, h, bs).unwrap();
            index.validate(ForcedBlocks::default()).unwrap();
            let got = cpu.sparse_attention(&x, &index).unwrap();
            let want = oracle::dense_attention_f64(&x).unwrap();
            let err = oracle::relative_l2_error(&out_f32(&got), &want.out);
            assert!(err <= 1e-5, "h {h} hkv {hkv} n {n} bs {bs}: rel L2 {err}");
            lse_close(got.lse.as_ref().unwrap(), &want.lse, 1e-6);
        }
    }
}

#[test]
fn dense_path_equals_the_oracle_on_awkward_head_dims_and_tiles() {
    for (i, &d) in [16usize, 59, 128].iter().enumerate() {
        let data = Data::new(7 + i as u64, &[(300, 300)], 4, 2, d);
        let x = data.input();
        let want = oracle::dense_attention_f64(&x).unwrap();
        for tiles in [
            Tiles::default(),
            Tiles {
                chunk_keys: 48,
                dense_block: 40,
                stack_rows: 1,
            },
            Tiles {
                chunk_keys: 1000,
                dense_block: 256,
                stack_rows: 2048,
            },
            Tiles {
                chunk_keys: 100,
                dense_block: 64,
                stack_rows: 70,
            },
        ] {
            let cpu = CpuBackend::new().with_tiles(tiles).unwrap();
            let got = cpu.dense_attention(&x).unwrap();
            let err = oracle::relative_l2_error(&out_f32(&got), &want.out);
            assert!(err <= 1e-5, "d {d} {tiles:?}: rel L2 {err}");
            lse_close(got.lse.as_ref().unwrap(), &want.lse, 1e-6);
        }
    }
}

#[test]
fn random_indices_equal_the_masked_oracle() {
    let cpu = CpuBackend::new();
    // Aligned sequences, a chunk starting mid-block (rows that may see no key), ragged batch.
    let lens = [(300, 300), (70, 250), (33, 33), (128, 512)];
    let data = Data::new(11, &lens, 4, 2, 24);
    let x = data.input();
    for (seed, bs, keep) in [(1, 32, 0.5), (2, 16, 0.2), (3, 64, 0.7), (4, 32, 0.05)] {
        let index = random_index(seed, &x.seqs, 4, bs, keep);
        let got = cpu.sparse_attention(&x, &index).unwrap();
        let want = oracle::masked_attention_f64(&x, &index).unwrap();
        let err = oracle::relative_l2_error(&out_f32(&got), &want.out);
        assert!(err <= 1e-5, "bs {bs} keep {keep}: rel L2 {err}");
        lse_close(got.lse.as_ref().unwrap(), &want.lse, 1e-6);
    }
}

#[test]
fn a_row_that_sees_no_key_is_zero_with_lse_minus_infinity() {
    // A chunk of 10 queries at positions 60..70, block 64: its one query block straddles key
    // blocks 0 and 1. Selecting block 1 alone, positions 60..=63 see no key.
    let data = Data::new(5, &[(10, 70)], 1, 1, 8);
    let x = data.input();
    let index = BlockIndex::from_rows(&x.seqs, 1, 64, vec![vec![vec![1]]]).unwrap();
    let got = CpuBackend::new().sparse_attention(&x, &index).unwrap();
    let lse = got.lse.unwrap();
    let out = got.out.to_f32_vec();
    for row in 0..4 {
        assert_eq!(lse[row], f32::NEG_INFINITY);
        assert!(out[row * 8..(row + 1) * 8].iter().all(|&v| v == 0.0));
    }
    assert!(lse[4..].iter().all(|v| v.is_finite()));
    let want = oracle::masked_attention_f64(&x, &index).unwrap();
    assert!(oracle::relative_l2_error(&out, &want.out) <= 1e-5);
}

#[test]
fn chunked_prefill_equals_the_oracle_and_the_unchunked_rows() {
    let cpu = CpuBackend::new();
    let (n, split) = (333, 200);
    let full = Data::new(21, &[(n, n)], 4, 2, 32);
    let x = full.input();
    let whole = cpu.dense_attention(&x).unwrap();
    let whole_out = out_f32(&whole);
    let row = 4 * 32;
    // Chunk 2: the last n − split queries over all n keys.
    let q2 = full.q[split * row..].to_vec();
    let x2 = AttentionInput::batched(&q2, &full.k, &full.v, 1, n - split, n, full.shape)
        .unwrap()
        .with_lse(true);
    let part = cpu.dense_attention(&x2).unwrap();
    let want = oracle::dense_attention_f64(&x2).unwrap();
    assert!(oracle::relative_l2_error(&out_f32(&part), &want.out) <= 1e-5);
    // Same rows as the unchunked run (tile boundaries differ, so not bit-identical).
    let err = oracle::relative_l2_error(
        &out_f32(&part),
        &whole_out[split * row..]
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    assert!(err <= 1e-5, "{err}");
    // Sparse over a chunk: every causal block of the chunk's geometry, via the index.
    let index = BlockIndex::dense(&x2.seqs, 4, 64).unwrap();
    assert_eq!(index.row(0, 0, 0), &[0, 1, 2, 3, 4]); // positions 200..=263 straddle blocks 3, 4
    let sparse = cpu.sparse_attention(&x2, &index).unwrap();
    assert!(oracle::relative_l2_error(&out_f32(&sparse), &want.out) <= 1e-5);
}

#[test]
fn ragged_batch_is_its_sequences_run_one_by_one() {
    let cpu = CpuBackend::new();
    let lens = [(150, 150), (64, 64), (20, 300), (1, 17)];
    let (h, hkv, d) = (4, 1, 16);
    let data = Data::new(31, &lens, h, hkv, d);
    let x = data.input();
    let index = random_index(9, &x.seqs, h, 32, 0.6);
    let batch_dense = cpu.dense_attention(&x).unwrap();
    let batch_sparse = cpu.sparse_attention(&x, &index).unwrap();
    for (si, s) in x.seqs.iter().enumerate() {
        let q = &data.q[s.q_start * h * d..(s.q_start + s.q_len) * h * d];
        let k = &data.k[s.k_start * hkv * d..(s.k_start + s.kv_len) * hkv * d];
        let v = &data.v[s.k_start * hkv * d..(s.k_start + s.kv_len) * hkv * d];
        let one = AttentionInput::batched(q, k, v, 1, s.q_len, s.kv_len, data.shape)
            .unwrap()
            .with_lse(true);
        let rows: Vec<Vec<u32>> = (0..s.num_query_blocks(32))
            .map(|r| index.row(si, 0, r).to_vec())
            .collect();
        let heads = (0..h)
            .map(|hd| {
                (0..s.num_query_blocks(32))
                    .map(|r| index.row(si, hd, r).to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(rows.len(), s.num_query_blocks(32));
        let one_index = BlockIndex::from_rows(&one.seqs, h, 32, heads).unwrap();
        let span = s.q_start * h * d..(s.q_start + s.q_len) * h * d;
        let lspan = s.q_start * h..(s.q_start + s.q_len) * h;
        let d1 = cpu.dense_attention(&one).unwrap();
        let s1 = cpu.sparse_attention(&one, &one_index).unwrap();
        // Each task only reads its own sequence, so results are bit-identical.
        assert_eq!(
            out_f32(&d1),
            out_f32(&batch_dense)[span.clone()],
            "seq {si}"
        );
        assert_eq!(out_f32(&s1), out_f32(&batch_sparse)[span], "seq {si}");
        assert_eq!(
            d1.lse.unwrap(),
            batch_dense.lse.as_ref().unwrap()[lspan.clone()]
        );
        assert_eq!(s1.lse.unwrap(), batch_sparse.lse.as_ref().unwrap()[lspan]);
    }
}

#[test]
fn lse_merge_of_two_disjoint_key_sets_equals_the_whole() {
    // A chunk of 64 queries over 256 keys, block 32: every query block sees ≥ 7 key blocks, so
    // even and odd blocks both give non-empty rows.
    let cpu = CpuBackend::new();
    let data = Data::new(41, &[(64, 256)], 4, 2, 32);
    let x = data.input();
    let s = x.seqs[0];
    let part = |parity: u32| {
        let rows: Vec<Vec<u32>> = (0..s.num_query_blocks(32))
            .map(|r| {
                (0..s.causal_key_blocks(r, 32) as u32)
                    .filter(|c| c % 2 == parity)
                    .collect()
            })
            .collect();
        let index = BlockIndex::from_rows(&x.seqs, 4, 32, vec![rows; 4]).unwrap();
        cpu.sparse_attention(&x, &index).unwrap()
    };
    let (even, odd) = (part(0), part(1));
    let (out, lse) = merge_partials(
        &out_f32(&even),
        even.lse.as_ref().unwrap(),
        &out_f32(&odd),
        odd.lse.as_ref().unwrap(),
        32,
    )
    .unwrap();
    let want = oracle::dense_attention_f64(&x).unwrap();
    let err = oracle::relative_l2_error(&out, &want.out);
    assert!(err <= 1e-5, "{err}");
    lse_close(&lse, &want.lse, 1e-6);
    // A −∞ partial is the neutral element.
    let (o, l) = merge_partials(&[1.0, 2.0], &[0.5], &[7.0, 7.0], &[f32::NEG_INFINITY], 2).unwrap();
    assert_eq!((o, l), (vec![1.0, 2.0], vec![0.5]));
    assert!(matches!(
        merge_partials(&[1.0], &[0.0], &[1.0, 2.0], &[0.0], 2),
        Err(Error::Shape(_))
    ));
}

#[test]
fn half_precision_inputs_come_back_in_their_dtype() {
    let cpu = CpuBackend::new();
    let data = Data::new(51, &[(180, 180), (50, 120)], 4, 2, 32);
    for dtype in [DType::F16, DType::BF16] {
        let (q, k, v) = (
            HostTensor::from_f32(data.q.clone(), dtype),
            HostTensor::from_f32(data.k.clone(), dtype),
            HostTensor::from_f32(data.v.clone(), dtype),
        );
        let x = AttentionInput::packed(
            q.as_ref(),
            k.as_ref(),
            v.as_ref(),
            &data.cu_q,
            &data.cu_k,
            data.shape,
        )
        .unwrap()
        .with_lse(true);
        let tol = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
        let want = oracle::dense_attention_f64(&x).unwrap(); // on the rounded inputs
        let index = random_index(3, &x.seqs, 4, 32, 0.5);
        let masked = oracle::masked_attention_f64(&x, &index).unwrap();
        for (got, want) in [
            (cpu.dense_attention(&x).unwrap(), &want),
            (cpu.sparse_attention(&x, &index).unwrap(), &masked),
        ] {
            assert_eq!(got.out.dtype(), dtype);
            let err = oracle::relative_l2_error(&out_f32(&got), &want.out);
            assert!(err <= tol, "{dtype}: rel L2 {err}");
            // The LSE is f32 whatever the dtype: no output rounding in it.
            lse_close(got.lse.as_ref().unwrap(), &want.lse, 1e-6);
        }
    }
    // The typed slices work directly too.
    let h: Vec<f16> = data.q[..64 * 4 * 32]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let b: Vec<bf16> = data.k[..64 * 2 * 32]
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    assert!(AttentionInput::batched(&h, &b, &b, 1, 64, 64, data.shape).is_err());
    // dtype mix
}

#[test]
fn lse_is_only_returned_when_asked_and_softmax_scale_is_honoured() {
    let cpu = CpuBackend::new();
    let data = Data::new(61, &[(100, 100)], 2, 2, 16);
    let x = data
        .input()
        .with_lse(false)
        .with_softmax_scale(0.05)
        .unwrap();
    let got = cpu.dense_attention(&x).unwrap();
    assert!(got.lse.is_none());
    let want = oracle::dense_attention_f64(&x).unwrap();
    assert!(oracle::relative_l2_error(&out_f32(&got), &want.out) <= 1e-5);
    let default = oracle::dense_attention_f64(&data.input()).unwrap();
    assert!(oracle::relative_l2_error(&out_f32(&got), &default.out) > 1e-2);
}

#[test]
fn thread_count_does_not_change_a_bit() {
    let data = Data::new(71, &[(260, 260), (90, 200)], 4, 2, 32);
    let x = data.input();
    let index = random_index(5, &x.seqs, 4, 32, 0.4);
    let one = CpuBackend::with_threads(1).unwrap();
    assert_eq!(one.threads(), 1);
    let two = CpuBackend::with_threads(2).unwrap();
    assert_eq!(
        one.sparse_attention(&x, &index).unwrap(),
        two.sparse_attention(&x, &index).unwrap()
    );
    assert_eq!(
        one.dense_attention(&x).unwrap(),
        CpuBackend::new().dense_attention(&x).unwrap()
    );
}

#[test]
fn captured_mass_is_exact_against_the_oracle() {
    let data = Data::new(81, &[(200, 200), (60, 230)], 4, 2, 16);
    let x = data.input();
    let dense = BlockIndex::dense(&x.seqs, 4, 32).unwrap();
    let mass = oracle::captured_mass(&x, &dense).unwrap();
    assert_eq!(mass.len(), x.total_q() * 4);
    assert!(
        mass.iter().all(|&m| (m - 1.0).abs() < 1e-12),
        "dense mass must be 1"
    );
    let index = random_index(6, &x.seqs, 4, 32, 0.3);
    let mass = oracle::captured_mass(&x, &index).unwrap();
    let all = oracle::dense_attention_f64(&x).unwrap().lse;
    let sel = oracle::masked_attention_f64(&x, &index).unwrap().lse;
    for (i, &m) in mass.iter().enumerate() {
        let want = (sel[i] - all[i]).exp();
        assert!((m - want).abs() < 1e-5, "row {i}: {m} vs {want}");
        assert!((0.0..=1.0 + 1e-12).contains(&m));
    }
}

#[test]
fn bad_inputs_are_typed_errors_not_panics() {
    let cpu = CpuBackend::new();
    let data = Data::new(91, &[(100, 100)], 4, 2, 16);
    let x = data.input();
    // An index for another length, another head count, a non-causal one, an empty row.
    let other = [Sequence {
        q_start: 0,
        k_start: 0,
        q_len: 90,
        kv_len: 90,
    }];
    for index in [
        BlockIndex::dense(&other, 4, 32).unwrap(),
        BlockIndex::dense(&x.seqs, 2, 32).unwrap(),
        BlockIndex::from_rows(&x.seqs, 4, 64, vec![vec![vec![0, 1], vec![0, 1]]; 4]).unwrap(),
        BlockIndex::from_rows(&x.seqs, 4, 64, vec![vec![vec![0], vec![]]; 4]).unwrap(),
    ] {
        assert!(matches!(
            cpu.sparse_attention(&x, &index),
            Err(Error::Index(_))
        ));
        assert!(matches!(
            oracle::masked_attention_f64(&x, &index),
            Err(Error::Index(_))
        ));
        assert!(matches!(
            oracle::captured_mass(&x, &index),
            Err(Error::Index(_))
        ));
    }
    // An input assembled by hand, bypassing the constructors, is still checked.
    let mut bad = data.q.clone();
    bad[5] = f32::INFINITY;
    let mut hand = x.clone();
    hand.q = TensorRef::F32(&bad);
    assert!(matches!(
        cpu.dense_attention(&hand),
        Err(Error::NonFinite { tensor: "q", .. })
    ));
    let mut short = x.clone();
    short.k = TensorRef::F32(&data.k[1..]);
    assert!(matches!(cpu.dense_attention(&short), Err(Error::Shape(_))));
    assert!(matches!(
        cpu.head_statistics(&short, &FlexPrefillConfig::default()),
        Err(Error::Shape(_))
    ));
    let bad_cfg = FlexPrefillConfig::default().with_block_size(48);
    assert!(matches!(
        cpu.head_statistics(&x, &bad_cfg),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        CpuBackend::with_threads(0),
        Err(Error::Backend { .. })
    ));
    assert!(CpuBackend::new()
        .with_tiles(Tiles {
            chunk_keys: 0,
            ..Tiles::default()
        })
        .is_err());
}

#[test]
fn heads_sharing_rows_are_stacked_without_changing_results() {
    // GQA 4:1; in each group heads 0 and 2 share their rows, 1 and 3 have their own. Stacking
    // limits from 1 row (no stacking) to everything must agree with the masked oracle.
    let data = Data::new(101, &[(200, 200), (37, 90)], 8, 2, 16);
    let x = data.input();
    let bs = 32;
    let shared = random_index(7, &x.seqs, 8, bs, 0.5);
    let own = random_index(8, &x.seqs, 8, bs, 0.5);
    let heads = x
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let (shared, own) = (&shared, &own);
            (0..8).map(move |h| {
                (0..s.num_query_blocks(bs))
                    .map(|r| match h % 4 {
                        0 | 2 => shared.row(si, h / 4, r).to_vec(),
                        _ => own.row(si, h, r).to_vec(),
                    })
                    .collect()
            })
        })
        .collect();
    let index = BlockIndex::from_rows(&x.seqs, 8, bs, heads).unwrap();
    let want = oracle::masked_attention_f64(&x, &index).unwrap();
    for stack_rows in [1, 40, 64, 512] {
        let cpu = CpuBackend::new()
            .with_tiles(Tiles {
                stack_rows,
                ..Tiles::default()
            })
            .unwrap();
        let got = cpu.sparse_attention(&x, &index).unwrap();
        let err = oracle::relative_l2_error(&out_f32(&got), &want.out);
        assert!(err <= 1e-5, "stack_rows {stack_rows}: rel L2 {err}");
        lse_close(got.lse.as_ref().unwrap(), &want.lse, 1e-6);
    }
}
