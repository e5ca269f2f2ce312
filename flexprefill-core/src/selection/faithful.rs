//! The faithful mode's rules: selections that keep gamma on the representative queries by
//! construction (issue 6; the full rule set and its measurements are in `docs/SELECTION.md`).
//!
//! The representative queries' exact attention per key block (`rep_block_mass`) is known, so
//! instead of converting token counts to block counts as the original does, every step here
//! checks the exact captured mass of the representative rows and stops only when each holds
//! `gamma` of its attention.

use crate::config::FlexPrefillConfig;

use super::grid::{add_forced, normalise, Grid};
use super::{rank_order, ranked, HeadStatistics};

/// Exact captured mass of the representative queries while blocks are being added to the
/// query blocks that hold them.
pub(crate) struct RepCoverage<'a> {
    grid: Grid,
    mass: &'a [f32],
    /// Query blocks holding representative queries (one, or two when `q_len % bs != 0`).
    pub blocks: Vec<usize>,
    /// Representative queries (indices) of each of `blocks`.
    reps: Vec<std::ops::Range<usize>>,
    /// `covered[k][c]`: key block `c` already selected in query block `blocks[k]`.
    covered: Vec<Vec<bool>>,
    count: Vec<usize>,
    captured: Vec<f64>,
    target: Vec<f64>,
    short: usize,
}

impl<'a> RepCoverage<'a> {
    /// Nothing selected yet. Each representative query must reach `gamma` of its own total
    /// (its row of `rep_block_mass` sums to 1 up to rounding).
    pub fn new(grid: Grid, rep_block_mass: &'a [f32], gamma: f32) -> Self {
        let num_rep = grid.num_rep();
        let mut blocks: Vec<usize> = (0..num_rep).map(|i| grid.rep_block(i)).collect();
        blocks.dedup();
        let target: Vec<f64> = (0..num_rep)
            .map(|i| {
                let row = &rep_block_mass[i * grid.nkb..(i + 1) * grid.nkb];
                gamma as f64 * row.iter().map(|&x| x as f64).sum::<f64>()
            })
            .collect();
        let short = target.iter().filter(|&&t| t > 0.0).count();
        let reps = blocks
            .iter()
            .map(|&r| {
                let first = (0..num_rep)
                    .find(|&i| grid.rep_block(i) == r)
                    .unwrap_or(num_rep);
                let last = (first..num_rep)
                    .find(|&i| grid.rep_block(i) != r)
                    .unwrap_or(num_rep);
                first..last
            })
            .collect();
        Self {
            reps,
            grid,
            mass: rep_block_mass,
            covered: vec![vec![false; grid.nkb]; blocks.len()],
            count: vec![0; blocks.len()],
            blocks,
            captured: vec![0.0; num_rep],
            target,
            short,
        }
    }

    /// Representative queries (indices) of the `k`-th representative query block.
    fn reps_of(&self, k: usize) -> std::ops::Range<usize> {
        self.reps[k].clone()
    }

    /// Marks block `c` selected in the `k`-th representative query block.
    pub fn cover(&mut self, k: usize, c: usize) {
        if self.covered[k][c] {
            return;
        }
        self.covered[k][c] = true;
        self.count[k] += 1;
        for i in self.reps_of(k) {
            let before = self.captured[i] >= self.target[i];
            self.captured[i] += self.mass[i * self.grid.nkb + c] as f64;
            if !before && self.captured[i] >= self.target[i] {
                self.short -= 1;
            }
        }
    }

    /// Every representative query holds gamma.
    pub fn done(&self) -> bool {
        self.short == 0
    }

    /// Every representative query block has at least `min(mb, causal)` blocks.
    pub fn budget_met(&self, mb: usize) -> bool {
        self.blocks
            .iter()
            .zip(&self.count)
            .all(|(&r, &n)| n >= mb.min(self.grid.last_diag(r) + 1))
    }

    /// Adds the blocks of `rows` (whole index rows) to the coverage.
    pub fn cover_rows(&mut self, rows: &[Vec<u32>]) {
        for k in 0..self.blocks.len() {
            for &c in &rows[self.blocks[k]] {
                self.cover(k, c as usize);
            }
        }
    }

    /// Exact top-up: for each representative query block still short, adds its unselected
    /// causal key blocks in order of their total representative mass until every
    /// representative query holds gamma. Returns the added blocks as (query block, key block).
    pub fn top_up(&mut self, rows: &mut [Vec<u32>]) {
        for k in 0..self.blocks.len() {
            let r = self.blocks[k];
            let reps = self.reps_of(k);
            if reps.clone().all(|i| self.captured[i] >= self.target[i]) {
                continue;
            }
            let d = self.grid.last_diag(r);
            let nkb = self.grid.nkb;
            let score: Vec<f32> = (0..=d)
                .map(|c| {
                    if self.covered[k][c] {
                        f32::NEG_INFINITY
                    } else {
                        reps.clone()
                            .map(|i| self.mass[i * nkb + c] as f64)
                            .sum::<f64>() as f32
                    }
                })
                .collect();
            for c in ranked(&score) {
                if reps.clone().all(|i| self.captured[i] >= self.target[i]) || self.covered[k][c] {
                    break;
                }
                self.cover(k, c);
                rows[r].push(c as u32);
            }
        }
    }
}

/// Faithful vertical-slash selection (Algorithm 3 with an honest budget).
///
/// Candidates are the token lines of the representative queries: key tokens `j` scored by the
/// vertical line `v[j]` and query–key distances `δ` scored by the slash line `s[δ]`, merged in
/// one ranking (score descending; vertical first, then lower index, on ties). They are taken
/// in that order; a key token selects its key-block column, a distance selects, in every query
/// block, every key block that distance reaches from one of the block's queries (one or two
/// blocks: the whole token diagonal, not the original's one block diagonal). After each
/// line the representative queries' exact captured mass is updated from `rep_block_mass`;
/// the walk stops when every representative query holds `gamma` of its attention and the
/// representative query blocks hold at least `min(mb, causal)` blocks.
///
/// The blocks are then extended to every query block and the forced blocks added.
pub(crate) fn vertical_slash(
    stats: &HeadStatistics,
    grid: &Grid,
    cfg: &FlexPrefillConfig,
) -> Vec<Vec<u32>> {
    let bs = grid.bs;
    let kv_len = grid.seq.kv_len;
    let mb = cfg.min_budget_blocks();
    let mut cov = RepCoverage::new(*grid, &stats.rep_block_mass, cfg.gamma);
    let mut columns = vec![false; grid.nkb];
    let mut distances = vec![false; kv_len];

    // Forced blocks count from the start.
    let mut forced_rows = vec![Vec::new(); grid.nqb];
    add_forced(&mut forced_rows, grid, cfg.forced);
    cov.cover_rows(&forced_rows);
    if cfg.forced.sink {
        columns[0] = true;
    }

    let v_order = ranked(&stats.vertical);
    let s_order = ranked(&stats.slash);
    let (mut iv, mut is) = (0, 0);
    while !(cov.done() && cov.budget_met(mb)) && (iv < v_order.len() || is < s_order.len()) {
        let take_vertical = match (v_order.get(iv), s_order.get(is)) {
            (Some(&j), Some(&d)) => stats.vertical[j] >= stats.slash[d] || stats.slash[d].is_nan(),
            (Some(_), None) => true,
            _ => false,
        };
        if take_vertical {
            let c = v_order[iv] / bs;
            iv += 1;
            if columns[c] {
                continue;
            }
            columns[c] = true;
            for k in 0..cov.blocks.len() {
                if c <= grid.last_diag(cov.blocks[k]) {
                    cov.cover(k, c);
                }
            }
        } else {
            let delta = s_order[is];
            is += 1;
            distances[delta] = true;
            for k in 0..cov.blocks.len() {
                let (first, last) = grid.rows(cov.blocks[k]);
                if last < delta {
                    continue;
                }
                for c in (first.max(delta) - delta) / bs..=(last - delta) / bs {
                    cov.cover(k, c);
                }
            }
        }
    }

    let mut rows = extend_columns_and_distances(grid, &columns, &distances);
    add_forced(&mut rows, grid, cfg.forced);
    // The walk above already covers gamma; this only matters if the lines ran out first.
    cov.top_up(&mut rows);
    normalise(&mut rows);
    rows
}

/// Extends selected key-block columns and token distances to every query block: row `r` gets
/// column `c ≤ d(r)`, and key block `c` when some selected distance `δ` links one of the row's
/// queries `p` to a key in block `c` (`(p − δ) / bs = c`). Uses a prefix count over distances,
/// so each (row, block) check is O(1). Rows sorted and unique.
pub(crate) fn extend_columns_and_distances(
    grid: &Grid,
    columns: &[bool],
    distances: &[bool],
) -> Vec<Vec<u32>> {
    let bs = grid.bs;
    let mut prefix = vec![0u32; distances.len() + 1];
    for (i, &d) in distances.iter().enumerate() {
        prefix[i + 1] = prefix[i] + d as u32;
    }
    (0..grid.nqb)
        .map(|r| {
            let (first, last) = grid.rows(r);
            (0..=grid.last_diag(r))
                .filter(|&c| {
                    if columns[c] {
                        return true;
                    }
                    // distances from a query in [first, last] to a key in [c·bs, c·bs + bs − 1]
                    let lo = first.saturating_sub(c * bs + bs - 1);
                    let hi = last - c * bs;
                    prefix[hi + 1] > prefix[lo]
                })
                .map(|c| c as u32)
                .collect()
        })
        .collect()
}

/// Faithful query-aware selection: the cut of [`super::query_aware_index_search`] (per query
/// block or flattened, paper conventions), then every row raised to its estimated `gamma` and
/// to `min(mb, causal)` blocks from its own ranking of the pooled map, the forced blocks, and
/// the exact top-up of the representative query blocks.
pub(crate) fn query_aware(
    block_map: &[f32],
    stats: &HeadStatistics,
    grid: &Grid,
    cfg: &FlexPrefillConfig,
) -> Vec<Vec<u32>> {
    let mut rows = super::query_aware_index_search(block_map, &grid.seq, cfg);
    let mb = cfg.min_budget_blocks();
    let nkb = grid.nkb;
    for (r, row) in rows.iter_mut().enumerate() {
        let d = grid.last_diag(r);
        let scores = &block_map[r * nkb..=r * nkb + d];
        let mut mass: f64 = row.iter().map(|&c| scores[c as usize] as f64).sum();
        let want = mb.min(d + 1);
        if mass >= cfg.gamma as f64 && row.len() >= want {
            continue;
        }
        let mut order: Vec<usize> = (0..=d).collect();
        order.sort_unstable_by(|&a, &b| rank_order(scores, a, b));
        let mut have = vec![false; d + 1];
        row.iter().for_each(|&c| have[c as usize] = true);
        for c in order {
            if mass >= cfg.gamma as f64 && row.len() >= want {
                break;
            }
            if !have[c] {
                have[c] = true;
                row.push(c as u32);
                mass += scores[c] as f64;
            }
        }
    }
    add_forced(&mut rows, grid, cfg.forced);
    normalise(&mut rows);
    let mut cov = RepCoverage::new(*grid, &stats.rep_block_mass, cfg.gamma);
    cov.cover_rows(&rows);
    cov.top_up(&mut rows);
    normalise(&mut rows);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Sequence;

    fn grid(q_len: usize, kv_len: usize, bs: usize) -> Grid {
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

    #[test]
    fn a_distance_reaches_one_or_two_key_blocks_per_row() {
        // 4 blocks of 4 tokens. Distance 4 (a multiple of bs): exactly one block diagonal;
        // distance 5: the token diagonal crosses two block diagonals.
        let g = grid(16, 16, 4);
        let cols = vec![false; 4];
        let mut dist = vec![false; 16];
        dist[4] = true;
        assert_eq!(
            extend_columns_and_distances(&g, &cols, &dist),
            vec![vec![], vec![0], vec![1], vec![2]]
        );
        dist[4] = false;
        dist[5] = true;
        assert_eq!(
            extend_columns_and_distances(&g, &cols, &dist),
            vec![vec![], vec![0], vec![0, 1], vec![1, 2]]
        );
    }

    /// One representative block (16 tokens, bs 4, 4 reps). Attention of every rep query:
    /// sink block 0 holds 0.5, key block 1 0.3, block 2 0.1, block 3 (diagonal) 0.1.
    fn stripes_stats() -> HeadStatistics {
        let nkb = 4;
        let mut rep = vec![0.0f32; 4 * nkb];
        for i in 0..4 {
            rep[i * nkb..(i + 1) * nkb].copy_from_slice(&[0.5, 0.3, 0.1, 0.1]);
        }
        // token lines consistent with it: key 5 is a vertical stripe (0.3), key 0 the sink
        let mut vertical = vec![0.0f32; 16];
        vertical[0] = 0.5;
        vertical[5] = 0.3;
        vertical[9] = 0.1;
        vertical[14] = 0.1;
        // the slash line spreads the same mass over distances
        let slash = vec![1.0 / 16.0; 16];
        HeadStatistics {
            vertical,
            slash,
            rep_block_mass: rep,
            ..Default::default()
        }
    }

    #[test]
    fn vertical_walk_stops_at_gamma_on_the_representative_rows() {
        let g = grid(16, 16, 4);
        let cfg = FlexPrefillConfig {
            gamma: 0.85,
            block_size: 4,
            min_budget: 1,
            ..Default::default()
        };
        let rows = vertical_slash(&stripes_stats(), &g, &cfg);
        // forced sink + diagonal hold 0.6; column 1 (key 5, v = 0.3) brings 0.9 ≥ 0.85.
        assert_eq!(
            rows,
            vec![vec![0], vec![0, 1], vec![0, 1, 2], vec![0, 1, 3]]
        );
        // gamma 0.95 needs block 2 as well: the next line is key 9 (v = 0.1)
        let cfg95 = FlexPrefillConfig { gamma: 0.95, ..cfg };
        let rows = vertical_slash(&stripes_stats(), &g, &cfg95);
        assert_eq!(rows[3], vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_up_adds_the_heaviest_missing_blocks_of_the_representative_block() {
        let g = grid(16, 16, 4);
        let s = stripes_stats();
        let mut rows = vec![vec![0], vec![0, 1], vec![0, 2], vec![0, 3]];
        let mut cov = RepCoverage::new(g, &s.rep_block_mass, 0.7);
        cov.cover_rows(&rows);
        assert!(!cov.done());
        cov.top_up(&mut rows);
        assert!(cov.done());
        assert_eq!(rows[3], vec![0, 3, 1]);
    }
}
