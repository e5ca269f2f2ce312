//! Algorithm 3: vertical-slash index search, lines extended to the whole causal map.
//!
//! The original's rules (compatibility mode, original-notes §5): token budgets
//! `K = #{prefix sums of the sorted line ≤ gamma} + 1`, converted to blocks as
//! `K // 128 + 1` (a literal 128, whatever the block size), clamped to `[mb, Mb]`; the lines
//! pooled to key blocks (vertical) and block-diagonal offsets (slash); the top-n of each, with
//! the sink column and the diagonal forced; columns and offsets extended to every query block.
//! The faithful mode's walk over token lines lives in `faithful.rs`.

use crate::config::{FlexPrefillConfig, SelectionMode};
use crate::error::Result;
use crate::input::Sequence;
use crate::report::Pattern;

use super::grid::{add_forced, normalise, Grid};
use super::mass::{CutRule, GammaCut};
use super::{cumulative_mass_cut, faithful, ranked, HeadStatistics};

/// How many block lines of each kind a vertical-slash extension takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineBudgets {
    /// Key-block columns (sink included).
    pub vertical: usize,
    /// Block-diagonal offsets (diagonal included).
    pub slash: usize,
}

/// The original's Stage C budgets, in blocks (original-notes §5).
///
/// Vertical-slash heads: `K` = the count of prefix sums (rank order, f64) that are `≤ gamma`,
/// plus one (crossing element included), `n = K // 128 + 1` (the literal 128 is the original's, independent of
/// `block_size`), raised to `mb = ceil(min_budget / bs)`, then capped at
/// `Mb = min(ceil(max_budget / bs), nkb)`, separately for each line. Query-aware heads get
/// `n_v = n_s = mb`, with no gamma and no cap.
pub fn original_line_budgets(
    stats: &HeadStatistics,
    num_key_blocks: usize,
    pattern: Pattern,
    cfg: &FlexPrefillConfig,
) -> LineBudgets {
    let mb = cfg.min_budget_blocks();
    if pattern == Pattern::QueryAware {
        return LineBudgets {
            vertical: mb,
            slash: mb,
        };
    }
    let cap = cfg
        .max_budget_blocks()
        .map_or(num_key_blocks, |m| m.min(num_key_blocks));
    let blocks = |line: &[f32]| {
        let k = prefix_count_plus_one_sorted(line, cfg.gamma);
        (k / ORIGINAL_BUDGET_DIVISOR + 1).max(mb).min(cap)
    };
    LineBudgets {
        vertical: blocks(&stats.vertical),
        slash: blocks(&stats.slash),
    }
}

/// The original converts token budgets to blocks with this literal (`K // 128 + 1`), whatever
/// `block_size` is; at block 64 that is about half the intended budget.
pub const ORIGINAL_BUDGET_DIVISOR: usize = 128;

/// `#{k : Σ_{i<k} sort_desc(line)[i] ≤ gamma} + 1`, the original's `score_cover_topk`.
///
/// Only the sorted values matter (equal values give equal prefix sums in any order), and the
/// prefix sums never come back under gamma once above it, so this sorts values, not indices.
/// Sums in f64: the original's GPU scan is closer to the exact sum than a sequential f32 sum.
fn prefix_count_plus_one_sorted(line: &[f32], gamma: f32) -> usize {
    let mut vals: Vec<f32> = line
        .iter()
        .map(|&x| if x.is_nan() { 0.0 } else { x })
        .collect();
    vals.sort_unstable_by(|a, b| b.total_cmp(a));
    let cut = GammaCut {
        rule: CutRule::AtMostPlusOne,
        min_blocks: 0,
        ..GammaCut::reach(gamma as f64)
    };
    cumulative_mass_cut(vals, &cut)
}

/// The vertical line pooled to key blocks: `V[c] = Σ_{j ∈ block c} v[j]`, `[nkb]`.
///
/// Accumulates in f64 and rounds once, so the result does not depend on a summation order.
pub fn pool_vertical(vertical: &[f32], block_size: usize) -> Vec<f32> {
    vertical
        .chunks(block_size)
        .map(|c| c.iter().map(|&x| x as f64).sum::<f64>() as f32)
        .collect()
}

/// The slash line (indexed by query–key distance, `s[0]` = diagonal) pooled to block-diagonal
/// offsets, `[nkb]`: offset `o` collects distances `[o·bs − pad, (o+1)·bs − 1 − pad]`, clipped
/// at 0, where `pad = nkb·bs − kv_len`.
///
/// Offset `o` is key block `d − o` for the query block whose last key block is `d`; measured
/// from the last query (position `kv_len − 1`, in key block `nkb − 1`), key block `nkb − 1 − o`
/// spans exactly these distances. This is the original's pooling of its position-indexed
/// slash (`S[sb]`, `sb = nkb − 1 − o`, zero right padding).
pub fn pool_slash(slash: &[f32], block_size: usize) -> Vec<f32> {
    let kv_len = slash.len();
    let nkb = kv_len.div_ceil(block_size);
    let pad = nkb * block_size - kv_len;
    (0..nkb)
        .map(|o| {
            let lo = (o * block_size).saturating_sub(pad);
            let hi = ((o + 1) * block_size - pad).min(kv_len);
            slash[lo..hi].iter().map(|&x| x as f64).sum::<f64>() as f32
        })
        .collect()
}

/// The top `n` lines of `scores` in [`super::rank_order`] (score descending, index ascending),
/// with line 0 (sink column or diagonal offset) forced first when `force_first` (the
/// original's `+inf`). Returns at most `scores.len()` lines.
pub fn top_lines(scores: &[f32], n: usize, force_first: bool) -> Vec<u32> {
    let mut s = scores.to_vec();
    if force_first && !s.is_empty() {
        s[0] = f32::INFINITY;
    }
    let mut order = ranked(&s);
    order.truncate(n.min(s.len()));
    order.into_iter().map(|i| i as u32).collect()
}

/// Extends key-block columns and block-diagonal offsets to every query block: column `c` gives
/// `(r, c)` for every row that sees block `c`; offset `o` gives `(r, d(r) − o)` where
/// `d(r) ≥ o` is the last key block of row `r`. Rows sorted, unique, causal; no forced blocks.
pub fn extend_lines(
    columns: &[u32],
    offsets: &[u32],
    seq: &Sequence,
    block_size: usize,
) -> Vec<Vec<u32>> {
    let grid = Grid::new(seq, block_size);
    let mut rows: Vec<Vec<u32>> = (0..grid.nqb)
        .map(|r| {
            let d = grid.last_diag(r) as u32;
            let mut row: Vec<u32> = columns.iter().copied().filter(|&c| c <= d).collect();
            row.extend(offsets.iter().filter(|&&o| o <= d).map(|&o| d - o));
            row
        })
        .collect();
    normalise(&mut rows);
    rows
}

/// Algorithm 3 for one head: the chosen key blocks of every query block, forced blocks
/// included, rows sorted and unique.
///
/// `Original`: the original's top-`n` pooled lines with `budgets` from
/// [`original_line_budgets`] (query-aware heads call this too, with `n_v = n_s = mb`).
/// `Faithful`: token lines taken greedily until every representative query holds `gamma`
/// and the probes (if `stats.probe_block_mass` is given) hold it on average (see
/// `docs/SELECTION.md`); `budgets` is ignored.
pub fn vertical_slash_index_search(
    stats: &HeadStatistics,
    seq: &Sequence,
    cfg: &FlexPrefillConfig,
    budgets: LineBudgets,
) -> Result<Vec<Vec<u32>>> {
    if cfg.block_size == 0 {
        return Err(crate::error::Error::Config(
            "vertical_slash_index_search: block_size 0".into(),
        ));
    }
    let grid = Grid::new(seq, cfg.block_size);
    let f = "vertical_slash_index_search";
    super::check_len(f, "vertical", stats.vertical.len(), seq.kv_len)?;
    super::check_len(f, "slash", stats.slash.len(), seq.kv_len)?;
    if cfg.selection != SelectionMode::Original {
        let rep = grid.num_rep() * grid.nkb;
        super::check_len(f, "rep_block_mass", stats.rep_block_mass.len(), rep)?;
        if !stats.probe_block_mass.is_empty() {
            let probes = super::probe_queries(seq, cfg.block_size).len() * grid.nkb;
            super::check_len(f, "probe_block_mass", stats.probe_block_mass.len(), probes)?;
        }
    }
    Ok(match cfg.selection {
        SelectionMode::Original => {
            let columns = top_lines(
                &pool_vertical(&stats.vertical, cfg.block_size),
                budgets.vertical,
                cfg.forced.sink,
            );
            let offsets = top_lines(
                &pool_slash(&stats.slash, cfg.block_size),
                budgets.slash,
                cfg.forced.diagonal,
            );
            let mut rows = extend_lines(&columns, &offsets, seq, cfg.block_size);
            add_forced(&mut rows, &grid, cfg.forced);
            normalise(&mut rows);
            rows
        }
        SelectionMode::Faithful | SelectionMode::Sampled => {
            faithful::vertical_slash(stats, &stats.probe_block_mass, &grid, cfg)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_use_the_literal_128_and_clamp_min_then_max() {
        // vertical: one token holds everything → K = 1 → 1 // 128 + 1 = 1 block, raised to mb.
        let mut v = vec![0.0f32; 1000];
        v[3] = 1.0;
        // slash: 300 equal tokens of 1/300: prefix sums ≤ 0.5 count 150 → K = 151 → 2 blocks.
        let s: Vec<f32> = (0..1000)
            .map(|i| if i < 300 { 1.0 / 300.0 } else { 0.0 })
            .collect();
        let stats = HeadStatistics {
            vertical: v,
            slash: s,
            ..Default::default()
        };
        let cfg = FlexPrefillConfig {
            gamma: 0.5,
            min_budget: 1,
            block_size: 64,
            ..FlexPrefillConfig::original()
        };
        let b = original_line_budgets(&stats, 16, Pattern::VerticalSlash, &cfg);
        // 151 // 128 + 1 = 2 (the literal 128: at block 64 the "right" count would be 3)
        assert_eq!(
            b,
            LineBudgets {
                vertical: 1,
                slash: 2
            }
        );
        // min budget 3 blocks of 64 raises both; max budget 1 block then caps both (max wins)
        let cfg2 = FlexPrefillConfig {
            min_budget: 150,
            ..cfg
        };
        assert_eq!(
            original_line_budgets(&stats, 16, Pattern::VerticalSlash, &cfg2),
            LineBudgets {
                vertical: 3,
                slash: 3
            }
        );
        let cfg3 = FlexPrefillConfig {
            max_budget: Some(64),
            ..cfg2
        };
        assert_eq!(
            original_line_budgets(&stats, 16, Pattern::VerticalSlash, &cfg3),
            LineBudgets {
                vertical: 1,
                slash: 1
            }
        );
        // query-aware heads: mb each, no cap
        assert_eq!(
            original_line_budgets(&stats, 16, Pattern::QueryAware, &cfg3),
            LineBudgets {
                vertical: 3,
                slash: 3
            }
        );
    }

    #[test]
    fn prefix_count_includes_the_crossing_element_and_an_exact_hit_keeps_one_more() {
        // sorted [0.5, 0.25, 0.25]: prefix sums 0.5, 0.75, 1.0
        assert_eq!(prefix_count_plus_one_sorted(&[0.25, 0.5, 0.25], 0.6), 2);
        assert_eq!(prefix_count_plus_one_sorted(&[0.25, 0.5, 0.25], 0.75), 3);
        assert_eq!(prefix_count_plus_one_sorted(&[0.25, 0.5, 0.25], 1.0), 4);
    }

    #[test]
    fn slash_pooling_by_offset_with_padding() {
        // kv_len 10, bs 4 → nkb 3, pad 2. offset 0: distances [0, 1]; 1: [2, 5]; 2: [6, 9].
        let s: Vec<f32> = (0..10).map(|d| d as f32).collect();
        assert_eq!(pool_slash(&s, 4), vec![1.0, 14.0, 30.0]);
        assert_eq!(pool_vertical(&s, 4), vec![6.0, 22.0, 17.0]);
        // no padding: plain chunks
        assert_eq!(pool_slash(&s[..8], 4), vec![6.0, 22.0]);
    }

    #[test]
    fn top_lines_force_line_zero_and_break_ties_low_first() {
        assert_eq!(top_lines(&[0.0, 0.3, 0.3, 0.4], 3, true), vec![0, 3, 1]);
        assert_eq!(top_lines(&[0.0, 0.3, 0.3, 0.4], 3, false), vec![3, 1, 2]);
        assert_eq!(top_lines(&[0.5, 0.5], 9, true), vec![0, 1]);
    }

    #[test]
    fn extension_of_columns_and_offsets() {
        // 4 blocks of 16: column 1, offsets 0 and 2.
        let rows = extend_lines(&[1], &[0, 2], &Sequence::whole(64), 16);
        assert_eq!(rows, vec![vec![0], vec![1], vec![0, 1, 2], vec![1, 3]]);
    }

    #[test]
    fn extension_in_a_chunk_counts_offsets_from_the_last_diagonal_block() {
        // kv 100, q 40 (positions 60..99), bs 16: query blocks [60,75], [76,91], [92,99];
        // d(r) = 4, 5, 6. Offset 1 → key blocks 3, 4, 5; column 5 only for rows 1 and 2.
        let s = Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 40,
            kv_len: 100,
        };
        let rows = extend_lines(&[5], &[1], &s, 16);
        assert_eq!(rows, vec![vec![3], vec![4, 5], vec![5]]);
        let grid = Grid::new(&s, 16);
        let mut forced = rows.clone();
        add_forced(&mut forced, &grid, Default::default());
        normalise(&mut forced);
        // row 0 holds positions 60..75: key blocks 3 and 4 are both diagonal
        assert_eq!(forced, vec![vec![0, 3, 4], vec![0, 4, 5], vec![0, 5, 6]]);
    }

    #[test]
    fn original_search_end_to_end_on_a_tiny_head() {
        // 64 tokens, bs 16, 4 blocks. Vertical mass on key block 2, slash on distance 16..31.
        let mut vertical = vec![0.0f32; 64];
        vertical[40] = 0.6;
        vertical[0] = 0.4;
        let mut slash = vec![0.0f32; 64];
        slash[20] = 0.7;
        slash[0] = 0.3;
        let stats = HeadStatistics {
            vertical,
            slash,
            ..Default::default()
        };
        let cfg = FlexPrefillConfig {
            min_budget: 32, // mb = 2
            block_size: 16,
            ..FlexPrefillConfig::original()
        };
        let b = original_line_budgets(&stats, 4, Pattern::VerticalSlash, &cfg);
        assert_eq!(
            b,
            LineBudgets {
                vertical: 2,
                slash: 2
            }
        );
        let rows = vertical_slash_index_search(&stats, &Sequence::whole(64), &cfg, b).unwrap();
        // a line of the wrong length is a typed error, not a panic
        let mut short = stats.clone();
        short.slash.pop();
        assert!(vertical_slash_index_search(&short, &Sequence::whole(64), &cfg, b).is_err());
        // columns {0, 2}, offsets {0, 1}
        assert_eq!(
            rows,
            vec![vec![0], vec![0, 1], vec![0, 1, 2], vec![0, 2, 3]]
        );
    }
}
