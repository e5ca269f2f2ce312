//! The faithful mode's exact-mass bookkeeping (`Coverage`, also used by the query-aware
//! calibration in `query_aware.rs`) and its vertical-slash walk: selections that keep gamma
//! on the representative queries by construction (the full rule set and its measurements are
//! in `docs/SELECTION.md`).
//!
//! The representative queries' exact attention per key block (`rep_block_mass`) is known, so
//! instead of converting token counts to block counts as the original does, every step here
//! checks the exact captured mass of the representative rows and stops only when each holds
//! `gamma` of its attention. When the backend also measured a few probe queries spread over
//! the chunk ([`super::probe_queries`]), the selection also keeps the probes' mean captured
//! mass at `gamma`: the last block alone cannot tell whether earlier rows look like it.

use crate::config::FlexPrefillConfig;

use super::grid::{add_forced, normalise, Grid};
use super::mass::LazyRanked;
use super::{probe_queries, HeadStatistics};

/// Exact captured mass of tracked query rows (the representative queries, each of which
/// must reach gamma, and optional probe queries, whose mean must reach gamma) while key
/// blocks are being selected in the query blocks that hold them.
pub(crate) struct Coverage<'a> {
    grid: Grid,
    /// Query blocks holding at least one tracked row.
    pub blocks: Vec<usize>,
    /// Tracked rows (indices into the per-row vectors) of each of `blocks`.
    rows_of: Vec<Vec<usize>>,
    /// `covered[k][c]`: key block `c` selected in query block `blocks[k]`.
    covered: Vec<Vec<bool>>,
    count: Vec<usize>,
    mass: Vec<&'a [f32]>,
    captured: Vec<f64>,
    total: Vec<f64>,
    is_rep: Vec<bool>,
    gamma: f64,
    rep_short: usize,
    probe_fraction_sum: f64,
    num_probes: usize,
}

impl<'a> Coverage<'a> {
    /// Nothing selected yet. `rep_block_mass` is `[num_rep, nkb]` for the representative
    /// queries; `probe_block_mass` is `[num_probes, nkb]` for [`probe_queries`] (may be
    /// empty). Each row's target is relative to its own total (1 up to rounding).
    pub fn new(
        grid: Grid,
        rep_block_mass: &'a [f32],
        probe_block_mass: &'a [f32],
        gamma: f32,
    ) -> Self {
        let nkb = grid.nkb;
        // Representative rows only when their masses are given (the probe-only coverage of
        // the query-aware calibration passes none).
        let num_rep = if rep_block_mass.is_empty() {
            0
        } else {
            grid.num_rep()
        };
        let mut block_of: Vec<usize> = (0..num_rep).map(|i| grid.rep_block(i)).collect();
        let mut mass: Vec<&[f32]> = rep_block_mass.chunks_exact(nkb).collect();
        let mut is_rep = vec![true; mass.len()];
        if !probe_block_mass.is_empty() {
            let probes = probe_queries(&grid.seq, grid.bs);
            block_of.extend(probes.iter().map(|&i| i / grid.bs));
            mass.extend(probe_block_mass.chunks_exact(nkb));
            is_rep.resize(mass.len(), false);
        }
        let mut blocks = block_of.clone();
        blocks.sort_unstable();
        blocks.dedup();
        let mut rows_of = vec![Vec::new(); blocks.len()];
        for (t, b) in block_of.iter().enumerate() {
            let k = blocks
                .binary_search(b)
                .expect("every tracked row's block is listed");
            rows_of[k].push(t);
        }
        let total: Vec<f64> = mass
            .iter()
            .map(|m| m.iter().map(|&x| x as f64).sum())
            .collect();
        let gamma = gamma as f64;
        let num_probes = is_rep.iter().filter(|&&r| !r).count();
        Self {
            grid,
            covered: vec![vec![false; nkb]; blocks.len()],
            count: vec![0; blocks.len()],
            blocks,
            rows_of,
            captured: vec![0.0; mass.len()],
            rep_short: is_rep
                .iter()
                .zip(&total)
                .filter(|(&r, &t)| r && t > 0.0)
                .count(),
            mass,
            total,
            is_rep,
            gamma,
            probe_fraction_sum: 0.0,
            num_probes,
        }
    }

    fn holds(&self, t: usize) -> bool {
        self.captured[t] >= self.gamma * self.total[t]
    }

    /// Marks key block `c` selected in the `k`-th tracked query block.
    pub fn cover(&mut self, k: usize, c: usize) {
        if self.covered[k][c] {
            return;
        }
        self.covered[k][c] = true;
        self.count[k] += 1;
        for &t in &self.rows_of[k] {
            let m = self.mass[t][c] as f64;
            if self.is_rep[t] {
                let before = self.holds(t);
                self.captured[t] += m;
                if !before && self.holds(t) {
                    self.rep_short -= 1;
                }
            } else {
                self.captured[t] += m;
                if self.total[t] > 0.0 {
                    self.probe_fraction_sum += m / self.total[t];
                }
            }
        }
    }

    /// Every representative query holds gamma, and so does the mean probe.
    pub fn done(&self) -> bool {
        self.rep_short == 0 && self.probes_done()
    }

    /// The probes' mean captured fraction reaches gamma (true without probes).
    pub fn probes_done(&self) -> bool {
        self.probe_fraction_sum >= self.gamma * self.num_probes as f64 - 1e-12
    }

    /// Every representative query block has at least `min(mb, causal)` blocks.
    pub fn budget_met(&self, mb: usize) -> bool {
        self.blocks
            .iter()
            .zip(&self.count)
            .zip(&self.rows_of)
            .all(|((&r, &n), rows)| {
                !rows.iter().any(|&t| self.is_rep[t]) || n >= mb.min(self.grid.last_diag(r) + 1)
            })
    }

    /// Some representative query block already holds `cap` blocks.
    pub fn reached(&self, cap: usize) -> bool {
        self.count
            .iter()
            .zip(&self.rows_of)
            .any(|(&n, rows)| n >= cap && rows.iter().any(|&t| self.is_rep[t]))
    }

    /// Adds the blocks of whole index rows.
    pub fn cover_rows(&mut self, rows: &[Vec<u32>]) {
        for k in 0..self.blocks.len() {
            for &c in &rows[self.blocks[k]] {
                self.cover(k, c as usize);
            }
        }
    }

    /// Exact top-up of the representative query blocks: a block still holding a
    /// representative query under gamma gets its unselected causal key blocks in order of
    /// their total mass over the block's representative queries until every one holds gamma.
    pub fn top_up_representatives(&mut self, rows: &mut [Vec<u32>]) {
        for k in 0..self.blocks.len() {
            let r = self.blocks[k];
            let reps: Vec<usize> = self.rows_of[k]
                .iter()
                .copied()
                .filter(|&t| self.is_rep[t])
                .collect();
            if reps.iter().all(|&t| self.holds(t)) {
                continue;
            }
            let d = self.grid.last_diag(r);
            let score: Vec<f32> = (0..=d)
                .map(|c| {
                    if self.covered[k][c] {
                        f32::NEG_INFINITY
                    } else {
                        reps.iter().map(|&t| self.mass[t][c] as f64).sum::<f64>() as f32
                    }
                })
                .collect();
            for c in LazyRanked::new(&score, 16) {
                if reps.iter().all(|&t| self.holds(t)) || self.covered[k][c] {
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
/// blocks: the whole token diagonal, not the original's one block diagonal). After each line
/// the exact captured mass of the representative queries (and probes) is updated; the walk
/// stops when every representative query holds `gamma` of its attention, the probes' mean
/// does too, and the representative query blocks hold at least `min(mb, causal)` blocks.
///
/// The lines are then extended to every query block and the forced blocks added.
pub(crate) fn vertical_slash(
    stats: &HeadStatistics,
    probe_block_mass: &[f32],
    grid: &Grid,
    cfg: &FlexPrefillConfig,
) -> Vec<Vec<u32>> {
    let bs = grid.bs;
    let mb = cfg.min_budget_blocks();
    let mut cov = Coverage::new(*grid, &stats.rep_block_mass, probe_block_mass, cfg.gamma);
    let mut columns = vec![false; grid.nkb];
    let mut distances = vec![false; grid.seq.kv_len];

    // Forced blocks count from the start.
    let mut forced_rows = vec![Vec::new(); grid.nqb];
    add_forced(&mut forced_rows, grid, cfg.forced);
    cov.cover_rows(&forced_rows);
    if cfg.forced.sink {
        columns[0] = true;
    }

    // The walk usually stops after a few hundred lines: rank lazily.
    let mut v_order = LazyRanked::new(&stats.vertical, 4 * bs);
    let mut s_order = LazyRanked::new(&stats.slash, 4 * bs);
    // An explicit max_budget caps the walk (blocks per representative query block), even
    // short of gamma: the promise yields to the caller's cap, and the report shows the mass.
    let cap = cfg.max_budget_blocks();
    let capped = |cov: &Coverage<'_>| cap.is_some_and(|m| cov.reached(m));
    loop {
        if capped(&cov) || (cov.done() && cov.budget_met(mb)) {
            break;
        }
        let take_vertical = match (v_order.peek(), s_order.peek()) {
            (Some(j), Some(d)) => stats.vertical[j] >= stats.slash[d] || stats.slash[d].is_nan(),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_vertical {
            let c = v_order.next().expect("peeked") / bs;
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
            let delta = s_order.next().expect("peeked");
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
    // The walk already covers gamma; this only matters if the lines ran out first.
    if !capped(&cov) {
        cov.top_up_representatives(&mut rows);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::grid::test_grid as grid;

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
        let rows = vertical_slash(&stripes_stats(), &[], &g, &cfg);
        // forced sink + diagonal hold 0.6; column 1 (key 5, v = 0.3) brings 0.9 ≥ 0.85.
        assert_eq!(
            rows,
            vec![vec![0], vec![0, 1], vec![0, 1, 2], vec![0, 1, 3]]
        );
        // gamma 0.95 needs block 2 as well: the next line is key 9 (v = 0.1)
        let cfg95 = FlexPrefillConfig { gamma: 0.95, ..cfg };
        let rows = vertical_slash(&stripes_stats(), &[], &g, &cfg95);
        assert_eq!(rows[3], vec![0, 1, 2, 3]);
    }

    #[test]
    fn max_budget_caps_the_walk_even_short_of_gamma() {
        let g = grid(16, 16, 4);
        let cfg = FlexPrefillConfig {
            gamma: 0.95,
            block_size: 4,
            min_budget: 1,
            max_budget: Some(8), // 2 blocks: the forced sink and diagonal already
            ..Default::default()
        };
        let rows = vertical_slash(&stripes_stats(), &[], &g, &cfg);
        assert_eq!(rows[3], vec![0, 3]);
        let cfg = FlexPrefillConfig {
            max_budget: Some(12),
            ..cfg
        };
        assert_eq!(
            vertical_slash(&stripes_stats(), &[], &g, &cfg)[3],
            vec![0, 1, 3]
        );
    }

    #[test]
    fn probes_keep_the_walk_going_for_earlier_rows() {
        // 32 tokens, bs 4: 8 blocks; 4 reps in block 7. Probes sit in blocks 0..7.
        let g = grid(32, 32, 4);
        let probes = probe_queries(&g.seq, 4);
        assert!(!probes.is_empty() && probes.iter().all(|&i| i < 28));
        let nkb = 8;
        // reps: everything on the sink and the diagonal → forced blocks alone hold 1
        let mut rep = vec![0.0f32; 4 * nkb];
        for i in 0..4 {
            rep[i * nkb] = 0.5;
            rep[i * nkb + 7] = 0.5;
        }
        // probes: half their mass on key block 1 (a column the reps do not look at)
        let mut probe = vec![0.0f32; probes.len() * nkb];
        for (k, &i) in probes.iter().enumerate() {
            let r = i / 4;
            if r >= 1 {
                probe[k * nkb + 1] += 0.5;
                probe[k * nkb + r] += 0.5;
            } else {
                probe[k * nkb] = 1.0;
            }
        }
        let mut vertical = vec![0.0f32; 32];
        vertical[0] = 0.5;
        vertical[30] = 0.4;
        vertical[5] = 0.1; // key 5 (block 1) is the best remaining line
        let stats = HeadStatistics {
            vertical,
            slash: vec![0.0; 32],
            rep_block_mass: rep,
            ..Default::default()
        };
        let cfg = FlexPrefillConfig {
            gamma: 0.9,
            block_size: 4,
            min_budget: 1,
            ..Default::default()
        };
        let without = vertical_slash(&stats, &[], &g, &cfg);
        assert!(!without[5].contains(&1));
        let with = vertical_slash(&stats, &probe, &g, &cfg);
        assert!(with[5].contains(&1), "{with:?}");
    }

    #[test]
    fn top_up_adds_the_heaviest_missing_blocks_of_the_representative_block() {
        let g = grid(16, 16, 4);
        let s = stripes_stats();
        let mut rows = vec![vec![0], vec![0, 1], vec![0, 2], vec![0, 3]];
        let mut cov = Coverage::new(g, &s.rep_block_mass, &[], 0.7);
        cov.cover_rows(&rows);
        assert!(!cov.done());
        cov.top_up_representatives(&mut rows);
        assert!(cov.done());
        assert_eq!(rows[3], vec![0, 3, 1]);
    }
}
