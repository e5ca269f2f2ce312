//! Block geometry of one sequence as the selection steps see it, and the per-row block lists
//! they produce.

use crate::config::ForcedBlocks;
use crate::input::Sequence;

/// One sequence's query/key block grid (see [`Sequence`]): key blocks start at key 0, query
/// blocks at the chunk's first query, so with `q_len == kv_len` this is the original's grid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    pub seq: Sequence,
    pub bs: usize,
    pub nqb: usize,
    pub nkb: usize,
}

impl Grid {
    pub fn new(seq: &Sequence, bs: usize) -> Self {
        Self {
            seq: *seq,
            bs,
            nqb: seq.num_query_blocks(bs),
            nkb: seq.num_key_blocks(bs),
        }
    }

    /// Absolute positions (first, last) of query block `r`.
    #[inline]
    pub fn rows(&self, r: usize) -> (usize, usize) {
        self.seq.query_block_positions(r, self.bs)
    }

    /// `d(r)`: the last key block query block `r` sees (holds its last query). Slash offset `o`
    /// of row `r` is key block `d(r) − o`.
    #[inline]
    pub fn last_diag(&self, r: usize) -> usize {
        self.rows(r).1 / self.bs
    }

    /// The first key block holding one of row `r`'s own queries (`d(r) − 1` when a chunk
    /// starts mid-block, else `d(r)`).
    #[inline]
    pub fn first_diag(&self, r: usize) -> usize {
        self.rows(r).0 / self.bs
    }

    /// Number of representative queries: the last `min(bs, q_len)` of the chunk.
    #[inline]
    pub fn num_rep(&self) -> usize {
        self.bs.min(self.seq.q_len)
    }

    /// Query block of representative query `i` (position order).
    #[inline]
    pub fn rep_block(&self, i: usize) -> usize {
        (self.seq.q_len - self.num_rep() + i) / self.bs
    }

    /// Every causal block of every row.
    pub fn dense_rows(&self) -> Vec<Vec<u32>> {
        (0..self.nqb)
            .map(|r| (0..=self.last_diag(r) as u32).collect())
            .collect()
    }
}

/// The grid of a chunk of `q_len` queries at the end of `kv_len` keys (tests).
#[cfg(test)]
pub(crate) fn test_grid(q_len: usize, kv_len: usize, bs: usize) -> Grid {
    Grid::new(
        &Sequence {
            q_start: 0,
            k_start: 0,
            q_len,
            kv_len,
        },
        bs,
    )
}

/// Adds the forced blocks to every row: the sink (key block 0) and the diagonal key block(s)
/// holding the row's own queries (two when a chunk starts mid-block).
pub(crate) fn add_forced(rows: &mut [Vec<u32>], grid: &Grid, forced: ForcedBlocks) {
    for (r, row) in rows.iter_mut().enumerate() {
        if forced.sink {
            row.push(0);
        }
        if forced.diagonal {
            row.extend(grid.first_diag(r) as u32..=grid.last_diag(r) as u32);
        }
    }
}

/// Sorts and deduplicates every row (the CSR invariant).
pub(crate) fn normalise(rows: &mut [Vec<u32>]) {
    for row in rows {
        row.sort_unstable();
        row.dedup();
    }
}

/// Captured mass of each representative query under `rows`: `Σ_{c ∈ rows[r_i]} M[i][c]`, from
/// `rep_block_mass` (`[num_rep, nkb]`). Rows must be sorted and unique. Empty when
/// `rep_block_mass` is empty.
pub(crate) fn representative_mass(
    grid: &Grid,
    rows: &[Vec<u32>],
    rep_block_mass: &[f32],
) -> Vec<f32> {
    if rep_block_mass.is_empty() {
        return Vec::new();
    }
    (0..grid.num_rep())
        .map(|i| {
            let m = &rep_block_mass[i * grid.nkb..(i + 1) * grid.nkb];
            let s: f64 = rows[grid.rep_block(i)]
                .iter()
                .map(|&c| m[c as usize] as f64)
                .sum();
            s as f32
        })
        .collect()
}
