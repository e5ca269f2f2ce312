//! Compatibility mode equals a small, independent re-statement of the original's rules
//! (issue 6), on random head statistics.
//!
//! The re-statement below is written the way the authors' code is (original-notes §4–7):
//! the slash line indexed by *position* (`s[n−1]` is distance 0) and pooled with right zero
//! padding, block ids `r·nb + c`, one top-k per line with surplus entries turned into id 0,
//! the vertical/slash transform with out-of-range ids set to 0, `unique`, and the query-aware
//! `score_cover_idx` over the flattened map. It shares nothing with core's selection code but
//! the conventions the original leaves open and we fixed: ties go to the lower column,
//! offset or flat id; sums are exact (f64), as the original's GPU scans are unordered.
//! Values are drawn from a few levels, so ties actually happen.

use flexprefill_core::{
    selection, AttentionShape, FlexPrefillConfig, ForcedBlocks, HeadStatistics, Sequence,
};
use proptest::prelude::*;

#[derive(Debug)]
struct Knobs {
    n: usize,
    bs: usize,
    gamma: f32,
    tau: f32,
    min_budget: usize,
    max_budget: Option<usize>,
}

/// `torch.sort(x, descending)` + `cumsum` + `sum(cumsum <= score) + 1`.
fn score_cover_topk(x: &[f32], score: f32) -> usize {
    let mut v = x.to_vec();
    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut acc = 0.0f64;
    v.iter()
        .filter(|&&e| {
            acc += e as f64;
            acc <= score as f64
        })
        .count()
        + 1
}

/// Right-zero-padded sum pooling.
fn sumpool(x: &[f32], bs: usize) -> Vec<f32> {
    let nb = x.len().div_ceil(bs);
    (0..nb)
        .map(|b| {
            (b * bs..(b + 1) * bs)
                .map(|j| x.get(j).copied().unwrap_or(0.0) as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

/// Indices of the `k` largest, ties by `tie_key` ascending.
fn topk(x: &[f32], k: usize, tie_key: impl Fn(usize) -> usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| {
        x[b].partial_cmp(&x[a])
            .unwrap()
            .then(tie_key(a).cmp(&tie_key(b)))
    });
    idx.truncate(k);
    idx
}

fn sqrt_js(p: &[f32], q: &[f32]) -> f32 {
    let mut a = 0.0f32;
    let mut b = 0.0f32;
    for (&x, &y) in p.iter().zip(q) {
        let m = (x + y) / 2.0;
        a += x * (x / m).ln();
        b += y * (y / m).ln();
    }
    (0.5 * a + 0.5 * b).sqrt()
}

/// The original's `get_active_blocks` for one head, B = 1, as sorted unique ids.
fn restated(st: &HeadStatistics, k: &Knobs, head_dim: usize) -> Vec<u64> {
    let (n, bs) = (k.n, k.bs);
    let nb = n.div_ceil(bs);
    let min_budget = k.min_budget.div_ceil(bs);
    let max_budget = k.max_budget.map_or(nb, |m| m.div_ceil(bs)).min(nb);
    if n <= (2 * bs).max(min_budget * bs) {
        // dense fallback: every causal block
        return (0..nb)
            .flat_map(|r| (0..=r).map(move |c| (r * nb + c) as u64))
            .collect();
    }
    let vertical = &st.vertical;
    let slash: Vec<f32> = (0..n).map(|j| st.slash[n - 1 - j]).collect();
    let clamp = |x: usize| {
        let x = if x < min_budget { min_budget } else { x };
        if x > max_budget {
            max_budget
        } else {
            x
        }
    };
    let mut num_v = clamp(score_cover_topk(vertical, k.gamma) / 128 + 1);
    let mut num_s = clamp(score_cover_topk(&slash, k.gamma) / 128 + 1);
    let mut v_pool = sumpool(vertical, bs);
    let mut s_pool = sumpool(&slash, bs);
    let js = sqrt_js(&st.estimate, &v_pool);
    let query_aware = js < k.tau;
    if query_aware {
        num_v = min_budget;
        num_s = min_budget;
    }
    v_pool[0] = f32::INFINITY;
    s_pool[nb - 1] = f32::INFINITY;
    let v_top = topk(&v_pool, num_v.min(nb), |c| c);
    // slash index sb is offset nb − 1 − sb; ties go to the lower offset
    let s_top: Vec<usize> = topk(&s_pool, num_s.min(nb), |sb| nb - 1 - sb)
        .into_iter()
        .map(|sb| nb - 1 - sb)
        .collect();
    let mut ids: Vec<u64> = Vec::new();
    for r in 0..nb {
        for &c in &v_top {
            ids.push(if r < c { 0 } else { (r * nb + c) as u64 });
        }
        for &o in &s_top {
            let id = (r + o) * nb + r;
            ids.push(if id >= nb * nb { 0 } else { id as u64 });
        }
    }
    if query_aware {
        let mut map = vec![0.0f32; nb * nb];
        for r in 0..nb {
            let logits: Vec<f64> = (0..=r)
                .map(|c| {
                    let qr = &st.q_pooled[r * head_dim..(r + 1) * head_dim];
                    let kc = &st.k_pooled[c * head_dim..(c + 1) * head_dim];
                    qr.iter()
                        .zip(kc)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32 as f64
                })
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            for c in 0..=r {
                map[r * nb + c] = ((logits[c] - m).exp() / z) as f32;
            }
        }
        let order = topk(&map, nb * nb, |i| i);
        let score = ((k.gamma as f64 * nb as f64) as f32) as f64;
        let mut acc = 0.0f64;
        for i in order {
            acc += map[i] as f64;
            if acc > score {
                break;
            }
            ids.push(i as u64);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    // the kernel ignores upper-triangle ids (fully masked); our index never holds them
    ids.retain(|&id| id as usize % nb <= id as usize / nb);
    ids
}

/// Probabilities drawn from a few levels (so ties happen), normalised to sum to 1.
fn dist(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(prop_oneof![Just(0u32), Just(1), Just(2), 1u32..40], len).prop_map(|w| {
        let s: u32 = w.iter().sum::<u32>().max(1);
        w.iter().map(|&x| x as f32 / s as f32).collect()
    })
}

fn case() -> impl Strategy<Value = (Knobs, HeadStatistics, usize)> {
    (
        prop_oneof![Just(16usize), Just(32), Just(64)],
        3usize..14,
        0usize..16,
        prop_oneof![Just(0.5f32), Just(0.8), Just(0.9), Just(0.95), 0.3f32..0.99],
        prop_oneof![Just(0.0f32), Just(0.1), Just(0.5), Just(1.0)],
        prop_oneof![Just(1usize), Just(16), Just(100), Just(300)],
        prop::option::of(prop_oneof![Just(16usize), Just(64), Just(200)]),
        any::<bool>(),
    )
        .prop_flat_map(
            |(bs, blocks, tail, gamma, tau, min_budget, max_budget, close)| {
                let n = (blocks - 1) * bs + 1 + tail.min(bs - 1);
                let nb = n.div_ceil(bs);
                let hd = 3usize;
                (
                    dist(n),
                    dist(n),
                    dist(nb),
                    prop::collection::vec(-3i8..4, nb * hd),
                    prop::collection::vec(-3i8..4, nb * hd),
                )
                    .prop_map(move |(vertical, slash, est, qp, kp)| {
                        // "close": the estimate is the truth, so the head can be query-aware
                        let estimate = if close { sumpool(&vertical, bs) } else { est };
                        let st = HeadStatistics::new(
                            vertical,
                            slash,
                            estimate,
                            qp.iter().map(|&x| x as f32 * 0.5).collect(),
                            kp.iter().map(|&x| x as f32 * 0.5).collect(),
                            Vec::new(),
                        );
                        let knobs = Knobs {
                            n,
                            bs,
                            gamma,
                            tau,
                            min_budget,
                            max_budget,
                        };
                        (knobs, st, hd)
                    })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn original_mode_equals_the_restatement((k, st, hd) in case()) {
        let cfg = FlexPrefillConfig::original().with_gamma(k.gamma).with_tau(k.tau).with_block_size(k.bs).with_min_budget(k.min_budget).with_max_budget(k.max_budget);
        let seq = Sequence { q_start: 0, k_start: 0, q_len: k.n, kv_len: k.n };
        let shape = AttentionShape::new(1, 1, hd).unwrap();
        let (index, _) = selection::build_index(&[seq], shape, &cfg, std::slice::from_ref(&st)).unwrap();
        index.validate(ForcedBlocks::default()).unwrap();
        prop_assert_eq!(index.flat_ids(0, 0), restated(&st, &k, hd));
    }
}
