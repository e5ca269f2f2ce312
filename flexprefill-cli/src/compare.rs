//! Sparse vs dense: output error and the attention mass each row actually kept.
//!
//! Captured mass comes from two log-sum-exps the backends already return: for query row `i`,
//! `LSE_sel(i)` over the selected blocks (sparse attention) and `LSE_all(i)` over every causal
//! key (dense attention). The true probability mass inside the selection is
//! `exp(LSE_sel(i) − LSE_all(i))`. So the check costs one dense pass with LSE on the fast path,
//! never an n×n matrix, and runs on whichever backend ran the attention.

use anyhow::{ensure, Result};
use flexprefill_core::{AttentionOutput, Sequence};

/// Rows count as below gamma only when they miss it by more than this: the two LSEs are f32
/// values summed in different orders, so `exp(ΔLSE)` carries ~1e-6·|LSE| of rounding; 1e-4
/// keeps a row whose selection is complete (mass 1 up to rounding) from ever counting.
pub const MASS_TOLERANCE: f64 = 1e-4;

/// One (sequence, head).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadComparison {
    /// ‖o − o_dense‖₂ / ‖o_dense‖₂.
    pub rel_l2: f64,
    /// max |o − o_dense|.
    pub max_abs: f64,
    /// Mean over query rows of exp(LSE_sel − LSE_all).
    pub mass_captured: f64,
    /// Smallest per-row captured mass.
    pub min_mass_captured: f64,
    /// Fraction of rows with captured mass < gamma − [`MASS_TOLERANCE`].
    pub rows_below_gamma: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Overall relative L2 error.
    pub rel_l2: f64,
    /// Overall max abs error.
    pub max_abs: f64,
    /// Mean captured mass over every (row, head).
    pub mass_captured: f64,
    /// Fraction of (row, head) pairs below gamma.
    pub rows_below_gamma: f64,
    /// Per (sequence, head), sequence-major (the order of `SparsityReport::heads`).
    pub heads: Vec<HeadComparison>,
    /// Per (sequence, head): every row's captured mass, `[q_len]` (for pictures).
    pub row_mass: Vec<Vec<f32>>,
}

/// Compares a sparse output against the dense one; both must carry LSE.
pub fn compare(
    sparse: &AttentionOutput,
    dense: &AttentionOutput,
    seqs: &[Sequence],
    num_heads: usize,
    head_dim: usize,
    gamma: f32,
) -> Result<Comparison> {
    let (o, od) = (sparse.out.to_f32_vec(), dense.out.to_f32_vec());
    ensure!(
        o.len() == od.len(),
        "sparse and dense outputs differ in size ({} vs {})",
        o.len(),
        od.len()
    );
    let (ls, ld) = match (&sparse.lse, &dense.lse) {
        (Some(a), Some(b)) => (a, b),
        _ => anyhow::bail!("the backend returned no log-sum-exp; cannot measure captured mass"),
    };
    let total_q: usize = seqs.iter().map(|s| s.q_len).sum();
    ensure!(
        ls.len() == total_q * num_heads && ld.len() == ls.len(),
        "log-sum-exp has {} and {} entries, expected {}",
        ls.len(),
        ld.len(),
        total_q * num_heads
    );
    let gamma = gamma as f64;
    let mut heads = Vec::with_capacity(seqs.len() * num_heads);
    let mut row_mass = Vec::with_capacity(seqs.len() * num_heads);
    let (mut err2, mut ref2, mut max_abs, mut mass_sum, mut below, mut rows) =
        (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize, 0usize);
    for s in seqs {
        for h in 0..num_heads {
            let (mut e2, mut r2, mut mx, mut msum, mut mmin, mut nb) =
                (0.0f64, 0.0f64, 0.0f64, 0.0f64, f64::INFINITY, 0usize);
            let mut masses = Vec::with_capacity(s.q_len);
            for t in s.q_start..s.q_start + s.q_len {
                let base = (t * num_heads + h) * head_dim;
                for (a, b) in o[base..base + head_dim]
                    .iter()
                    .zip(&od[base..base + head_dim])
                {
                    let d = (*a as f64) - (*b as f64);
                    e2 += d * d;
                    r2 += (*b as f64) * (*b as f64);
                    mx = mx.max(d.abs());
                }
                let i = t * num_heads + h;
                let m = ((ls[i] as f64) - (ld[i] as f64)).exp().min(1.0);
                masses.push(m as f32);
                msum += m;
                mmin = mmin.min(m);
                if m < gamma - MASS_TOLERANCE {
                    nb += 1;
                }
            }
            let n = s.q_len as f64;
            heads.push(HeadComparison {
                rel_l2: rel(e2, r2),
                max_abs: mx,
                mass_captured: msum / n,
                min_mass_captured: mmin,
                rows_below_gamma: nb as f64 / n,
            });
            row_mass.push(masses);
            err2 += e2;
            ref2 += r2;
            max_abs = max_abs.max(mx);
            mass_sum += msum;
            below += nb;
            rows += s.q_len;
        }
    }
    Ok(Comparison {
        rel_l2: rel(err2, ref2),
        max_abs,
        mass_captured: mass_sum / rows as f64,
        rows_below_gamma: below as f64 / rows as f64,
        heads,
        row_mass,
    })
}

fn rel(err2: f64, ref2: f64) -> f64 {
    if ref2 == 0.0 {
        if err2 == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (err2 / ref2).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexprefill_core::HostTensor;

    #[test]
    fn hand_checked_numbers() {
        // One sequence of 2 queries, 1 head, head_dim 2.
        let seqs = [Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 2,
            kv_len: 2,
        }];
        let dense = AttentionOutput {
            out: HostTensor::F32(vec![3.0, 4.0, 0.0, 0.0]),
            lse: Some(vec![0.0, 1.0]),
        };
        let sparse = AttentionOutput {
            out: HostTensor::F32(vec![3.0, 4.5, 0.0, 0.0]),
            lse: Some(vec![0.0, 1.0 + (0.5f32).ln()]),
        };
        let c = compare(&sparse, &dense, &seqs, 1, 2, 0.9).unwrap();
        assert!((c.rel_l2 - 0.1).abs() < 1e-12, "{}", c.rel_l2);
        assert_eq!(c.max_abs, 0.5);
        assert!((c.heads[0].mass_captured - 0.75).abs() < 1e-6);
        assert!((c.heads[0].min_mass_captured - 0.5).abs() < 1e-6);
        assert_eq!(c.heads[0].rows_below_gamma, 0.5);
    }

    /// The LSE route gives the same per-row mass as the CPU oracle's streaming
    /// `captured_mass` (an independent computation from q and k), on an index that skips
    /// blocks, with GQA and two sequences.
    #[test]
    fn lse_mass_matches_the_oracle() {
        use flexprefill_core::{AttentionInput, AttentionShape, Backend, BlockIndex};
        use flexprefill_cpu::{oracle, CpuBackend};
        let (n, h, hkv, d, bs) = (200, 4, 2, 16, 32);
        let wave = |len: usize, f: f32| {
            (0..len)
                .map(|i| (i as f32 * f).sin() * 2.0)
                .collect::<Vec<f32>>()
        };
        let (q, k, v) = (
            wave(2 * n * h * d, 0.37),
            wave(2 * n * hkv * d, 0.11),
            wave(2 * n * hkv * d, 0.23),
        );
        let shape = AttentionShape::new(h, hkv, d).unwrap();
        let x = AttentionInput::batched(&q, &k, &v, 2, n, n, shape)
            .unwrap()
            .with_lse(true);
        let nqb = n.div_ceil(bs) as u32;
        // Sink, diagonal and every third block.
        let rows: Vec<Vec<u32>> = (0..nqb)
            .map(|r| {
                (0..=r)
                    .filter(|&c| c == 0 || c == r || (c + r) % 3 == 0)
                    .collect()
            })
            .collect();
        let index = BlockIndex::from_rows(&x.seqs, h, bs, vec![rows; 2 * h]).unwrap();
        let cpu = CpuBackend::new();
        let sparse = cpu.sparse_attention(&x, &index).unwrap();
        let dense = cpu.dense_attention(&x).unwrap();
        let c = compare(&sparse, &dense, &x.seqs, h, d, 0.9).unwrap();
        let want = oracle::captured_mass(&x, &index).unwrap();
        let mut worst = 0.0f64;
        for (si, s) in x.seqs.iter().enumerate() {
            for hh in 0..h {
                for (i, m) in c.row_mass[si * h + hh].iter().enumerate() {
                    let w = want[(s.q_start + i) * h + hh];
                    worst = worst.max((*m as f64 - w).abs());
                }
            }
        }
        // f32 LSEs of logits up to ~|q||k|/sqrt(d) ≈ 16: rounding ~1e-6 relative per LSE.
        assert!(worst < 1e-4, "worst per-row difference {worst}");
        assert!(
            c.rows_below_gamma > 0.0,
            "the index skips blocks, some rows lose mass"
        );
    }
}
