//! Oracle density: the fewest key blocks that keep gamma, from the exact attention.
//!
//! The yardstick for any selection rule. For each (head, query block) the key blocks are
//! ranked by their true mass averaged over the block's rows (descending, then block index
//! ascending); sink and diagonal blocks count like any other. The **mean-row** oracle takes
//! blocks in that order until the rows' mean mass reaches gamma: a lower bound on the blocks of
//! any selection that keeps gamma per query block on average. The **every-row** oracle takes
//! them in the same order until the block's worst row reaches gamma. The **frontier** is the
//! best mean mass (over all rows of the head) any selection of a given density can hold: the
//! blocks of every query block in one ranking by mass × rows, greedily.
//!
//! The order and the mean-row cut are core's [`oracle_order`] and [`oracle_count`], which the
//! CUDA backend's device oracle (`flexprefill_cuda::oracle`) counts with too.
//!
//! Everything comes from [`flexprefill_cpu::oracle::block_mass_f64`] (exponentials and sums in
//! f64), one (sequence, head) at a time, so memory stays at one `q_len × num_key_blocks` table.
//!
//! ```
//! use flexprefill_testkit::{generate, oracle, WorkloadKind, WorkloadSpec};
//!
//! let mut spec = WorkloadSpec::new(WorkloadKind::SinkLocal, 1024);
//! (spec.num_heads, spec.num_kv_heads, spec.head_dim) = (2, 1, 32);
//! let w = generate(&spec);
//! let heads = oracle::oracle_density(&w.input(), 64, 0.9)?;
//! // the every-row oracle never needs fewer blocks than the mean-row one
//! assert!(heads.iter().all(|o| o.every_row >= o.mean_row && o.mean_row > 0.0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use flexprefill_core::selection::{oracle_count, oracle_order};
use flexprefill_core::{AttentionInput, BlockIndex, Result, Sequence};
use flexprefill_cpu::oracle::block_mass_f64;

/// Each query row's exact attention per key block for one (sequence, head).
#[derive(Debug, Clone)]
pub struct HeadBlockMass {
    /// The sequence this table belongs to.
    pub seq: Sequence,
    /// Block size of the grid.
    pub block_size: usize,
    /// Key blocks per row.
    pub num_key_blocks: usize,
    /// `[q_len, num_key_blocks]`, rows sum to 1.
    pub mass: Vec<f64>,
}

/// Oracle densities of one (sequence, head) at one gamma.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadOracle {
    /// Mean-row oracle blocks / causal blocks.
    pub mean_row: f64,
    /// Every-row oracle blocks / causal blocks.
    pub every_row: f64,
    /// Mean-row oracle block count.
    pub mean_row_blocks: usize,
    /// Every-row oracle block count.
    pub every_row_blocks: usize,
    /// Causal blocks of the sequence.
    pub causal_blocks: usize,
}

impl HeadBlockMass {
    /// The table of `head` in sequence `seq` of `x` on a `block_size` grid.
    pub fn compute(
        x: &AttentionInput<'_>,
        seq: usize,
        head: usize,
        block_size: usize,
    ) -> Result<Self> {
        let mass = block_mass_f64(x, seq, head, block_size)?;
        let s = x.seqs[seq];
        Ok(Self {
            seq: s,
            block_size,
            num_key_blocks: s.num_key_blocks(block_size),
            mass,
        })
    }

    /// Query blocks of the grid.
    pub fn num_query_blocks(&self) -> usize {
        self.seq.num_query_blocks(self.block_size)
    }

    /// Row `i` (chunk-relative query index).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.mass[i * self.num_key_blocks..(i + 1) * self.num_key_blocks]
    }

    /// Chunk-relative query rows of query block `r`.
    pub fn rows_of(&self, r: usize) -> std::ops::Range<usize> {
        let bs = self.block_size;
        r * bs..((r + 1) * bs).min(self.seq.q_len)
    }

    /// Mean over the rows of query block `r` of their mass per causal key block
    /// (`causal_key_blocks(r)` values; rows summed in order, in f64).
    pub fn block_mean(&self, r: usize) -> Vec<f64> {
        let n = self.seq.causal_key_blocks(r, self.block_size);
        let rows = self.rows_of(r);
        let count = rows.len() as f64;
        let mut mean = vec![0.0f64; n];
        for i in rows {
            mean.iter_mut().zip(self.row(i)).for_each(|(m, &v)| *m += v);
        }
        mean.iter_mut().for_each(|m| *m /= count);
        mean
    }

    /// Key blocks of query block `r` in the oracle's order: mean mass descending, then
    /// block index ascending.
    pub fn block_order(&self, r: usize) -> (Vec<f64>, Vec<usize>) {
        let mean = self.block_mean(r);
        let order = oracle_order(&mean);
        (mean, order)
    }

    /// Mean-row and every-row oracle at `gamma`.
    pub fn oracle(&self, gamma: f64) -> HeadOracle {
        let (mut mean_blocks, mut every_blocks) = (0, 0);
        for r in 0..self.num_query_blocks() {
            let (mean, order) = self.block_order(r);
            let k_mean = oracle_count(&mean, gamma);
            let rows = self.rows_of(r);
            let mut per_row = vec![0.0f64; rows.len()];
            let mut k_every = order.len();
            for (k, &c) in order.iter().enumerate() {
                let mut worst = f64::INFINITY;
                for (acc, i) in per_row.iter_mut().zip(rows.clone()) {
                    *acc += self.row(i)[c];
                    worst = worst.min(*acc);
                }
                if worst >= gamma {
                    k_every = k + 1;
                    break;
                }
            }
            mean_blocks += k_mean;
            every_blocks += k_every;
        }
        let causal = self.seq.total_causal_blocks(self.block_size);
        HeadOracle {
            mean_row: mean_blocks as f64 / causal as f64,
            every_row: every_blocks as f64 / causal as f64,
            mean_row_blocks: mean_blocks,
            every_row_blocks: every_blocks,
            causal_blocks: causal,
        }
    }

    /// What each causal (query block, key block) adds to the head's mean mass over all rows:
    /// the block's mean-row mass times the block's share of the rows. Unsorted.
    pub fn gains(&self) -> Vec<f64> {
        let q_len = self.seq.q_len as f64;
        let mut gains = Vec::with_capacity(self.seq.total_causal_blocks(self.block_size));
        for r in 0..self.num_query_blocks() {
            let w = self.rows_of(r).len() as f64 / q_len;
            gains.extend(self.block_mean(r).into_iter().map(|m| m * w));
        }
        gains
    }

    /// The frontier: the best mean mass over all rows reachable with `k` blocks, for
    /// `k = 0..=causal_blocks` (`k + 1` values, increasing, concave, ending at 1 up to rounding).
    pub fn frontier(&self) -> Vec<f64> {
        frontier_of(self.gains())
    }

    /// Captured mass of every row (chunk-relative order) under `index` (head `head` of
    /// sequence `seq` of the index).
    pub fn captured(&self, index: &BlockIndex, seq: usize, head: usize) -> Vec<f64> {
        (0..self.seq.q_len)
            .map(|i| {
                let row = self.row(i);
                index
                    .row(seq, head, i / self.block_size)
                    .iter()
                    .map(|&c| row[c as usize])
                    .sum()
            })
            .collect()
    }
}

/// The frontier of any set of gains (several heads: each head's [`HeadBlockMass::gains`]
/// divided by the number of heads): sorted descending, cumulated, starting at 0. Taking the
/// largest gains first is optimal because every query block's own gains come in decreasing
/// order when its blocks are ranked by mass.
pub fn frontier_of(mut gains: Vec<f64>) -> Vec<f64> {
    gains.sort_by(|a, b| b.total_cmp(a));
    let mut out = Vec::with_capacity(gains.len() + 1);
    let mut acc = 0.0;
    out.push(0.0);
    for g in gains {
        acc += g;
        out.push(acc);
    }
    out
}

/// Frontier value at `density` (linear between block counts).
pub fn frontier_at(frontier: &[f64], density: f64) -> f64 {
    let n = frontier.len() - 1;
    let x = density.clamp(0.0, 1.0) * n as f64;
    let lo = x.floor() as usize;
    let hi = (lo + 1).min(n);
    let t = x - lo as f64;
    frontier[lo] * (1.0 - t) + frontier[hi] * t
}

/// Mean-row and every-row oracle density of every (sequence, head) of `x`, sequence-major.
pub fn oracle_density(
    x: &AttentionInput<'_>,
    block_size: usize,
    gamma: f64,
) -> Result<Vec<HeadOracle>> {
    let mut out = Vec::new();
    for s in 0..x.seqs.len() {
        for h in 0..x.shape.num_heads {
            out.push(HeadBlockMass::compute(x, s, h, block_size)?.oracle(gamma));
        }
    }
    Ok(out)
}

/// Overall density of several heads' oracles: blocks over causal blocks, summed.
pub fn overall(heads: &[HeadOracle]) -> (f64, f64) {
    let causal: usize = heads.iter().map(|o| o.causal_blocks).sum();
    let mean: usize = heads.iter().map(|o| o.mean_row_blocks).sum();
    let every: usize = heads.iter().map(|o| o.every_row_blocks).sum();
    (mean as f64 / causal as f64, every as f64 / causal as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexprefill_core::AttentionShape;

    #[test]
    fn oracle_on_a_hand_built_table() {
        // 2 query blocks of 2 rows over 2 key blocks (bs 2, 4 tokens).
        let seq = Sequence::whole(4);
        let t = HeadBlockMass {
            seq,
            block_size: 2,
            num_key_blocks: 2,
            mass: vec![1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.9, 0.1],
        };
        // block 0: one block; block 1: means (0.7, 0.3): 0.7 < 0.8 → two blocks, every row too.
        let o = t.oracle(0.8);
        assert_eq!(
            (o.mean_row_blocks, o.every_row_blocks, o.causal_blocks),
            (3, 3, 3)
        );
        // gamma 0.7: mean row holds with one block, the worst row (0.5) does not
        let o = t.oracle(0.7);
        assert_eq!((o.mean_row_blocks, o.every_row_blocks), (2, 3));
        let f = t.frontier();
        assert_eq!(f.len(), 4);
        assert!((f[1] - 0.5).abs() < 1e-12 && (f[2] - 0.85).abs() < 1e-12);
        assert!((f[3] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn tables_sum_to_one_and_index_mass_matches_the_cpu_oracle() {
        let shape = AttentionShape::new(2, 1, 8).unwrap();
        let n = 200;
        let q: Vec<f32> = (0..n * 2 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..n * 8).map(|i| (i as f32 * 0.11).cos()).collect();
        let x = AttentionInput::batched(&q, &k, &k, 1, n, n, shape).unwrap();
        let rows: Vec<Vec<u32>> = (0..7u32).map(|r| vec![0, r]).collect();
        let index = BlockIndex::from_rows(&x.seqs, 2, 32, vec![rows.clone(), rows]).unwrap();
        let want = flexprefill_cpu::oracle::captured_mass(&x, &index).unwrap();
        for h in 0..2 {
            let t = HeadBlockMass::compute(&x, 0, h, 32).unwrap();
            for i in 0..n {
                assert!((t.row(i).iter().sum::<f64>() - 1.0).abs() < 1e-9);
            }
            let got = t.captured(&index, 0, h);
            for i in 0..n {
                assert!((got[i] - want[i * 2 + h]).abs() < 1e-6, "row {i}");
            }
        }
    }
}
