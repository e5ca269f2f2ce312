//! The selection algorithms of the paper, as pure functions over f32 slices.
//!
//! Backends compute [`HeadStatistics`] (the only part that touches q and k at O(bs·n·d)), then
//! [`build_index`] turns them into a [`BlockIndex`] and per-head reports. Nothing here spawns
//! threads, touches a device or does I/O: the caller parallelises over heads.
//!
//! | step | paper | function |
//! |---|---|---|
//! | pattern decision | Algorithm 2, Eq. 2 | [`sparse_pattern_search`], [`js_distance`] |
//! | vertical-slash selection | Algorithm 3 | [`vertical_slash_index_search`] |
//! | query-aware selection | Algorithm 4, Appendix F.4 | [`query_aware_index_search`] |
//! | the gamma cut | Eq. 3, Appendix B | [`cumulative_mass_cut`] |
//! | per-query-block cut (sampled mode) | Eq. 3 on each query block's own estimate | [`sampled_block_cut`] |
//!
//! `select_head` runs them in every mode: the pattern search always, then
//! [`vertical_slash_index_search`] or [`query_aware_index_search`] (original and faithful
//! modes), or [`sampled_block_cut`] per query block (sampled mode). Every cut of ranked scores
//! at gamma, in every mode, is one call of [`cumulative_mass_cut`]; what the modes change is
//! a [`GammaCut`]'s target, its [`CutRule`] and its bounds. The faithful vertical-slash walk
//! is not such a cut: it stops on the exact mass of every representative query, not on a
//! running sum of the scores it ranks.
//! Every public function here checks the sizes of what it is given and answers a bad one
//! with [`Error::Shape`], never a panic.

//!
//! Three rule sets ([`SelectionMode`]): `Original` reproduces the authors' code, quirks
//! included; `Faithful` (the default) keeps gamma on the representative queries by
//! construction; `Sampled` cuts every query block on its own sampled estimate. All are written
//! down, with every difference, in `docs/SELECTION.md`.

mod faithful;
mod grid;
mod js;
mod mass;
mod pattern;
mod query_aware;
mod sampled;
mod vertical_slash;

pub use js::{js_distance, js_distance_original};
pub(crate) use mass::ranked;
pub use mass::{
    block_total, cumulative_mass_cut, oracle_count, oracle_order, rank_order, CutRule, GammaCut,
};
pub use pattern::sparse_pattern_search;
pub use query_aware::{pooled_block_attention, query_aware_index_search};
pub use sampled::{
    sampled_block_cut, sampled_queries, sampled_rows_of_block, SAMPLED_MARGIN, SAMPLED_ROWS,
};
pub use vertical_slash::{original_line_budgets, vertical_slash_index_search, LineBudgets};

use crate::config::{FlexPrefillConfig, SelectionMode};
use crate::error::{Error, Result};
use crate::index::BlockIndex;
use crate::input::{AttentionShape, Sequence};
use crate::report::{HeadReport, Pattern};

use grid::{add_forced, normalise, representative_mass, Grid};

/// What a backend measures for one (sequence, head) before selection.
///
/// The representative queries are the last `min(block_size, q_len)` queries of the sequence
/// (Algorithm 2: `Q̂ = Q[-block_size:]`); `A = softmax(Q̂Kᵀ·scale)` over all keys with the
/// causal mask (bottom-right aligned).
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct HeadStatistics {
    /// Vertical line, `[kv_len]`: `v[j] = mean_i A[i, j]`; sums to 1.
    pub vertical: Vec<f32>,
    /// Slash line by query–key distance, `[kv_len]`: `s[δ] = (1/|Q̂|) Σ_i A[i, pos_i − δ]`;
    /// `s[0]` is the diagonal; sums to 1.
    pub slash: Vec<f32>,
    /// Pooled estimate `ā = softmax(mean(Q̂)·K̄ᵀ·scale)` over key blocks, `[num_key_blocks]`,
    /// no causal mask (as the paper and the original).
    pub estimate: Vec<f32>,
    /// Mean of q over each query block, times the estimation scale, `[num_query_blocks, head_dim]`
    /// (the input of the query-aware map, Algorithm 4).
    pub q_pooled: Vec<f32>,
    /// Mean of k over each key block, `[num_key_blocks, head_dim]`.
    pub k_pooled: Vec<f32>,
    /// Attention of each representative query summed over each key block,
    /// `[num_rep, num_key_blocks]` row-major, representative queries in position order (the
    /// last `num_rep = min(block_size, q_len)` queries of the chunk). Each row sums to 1. With it
    /// the captured mass of any block set on the representative rows is exact, which is what
    /// the faithful mode's gamma promise is checked against.
    pub rep_block_mass: Vec<f32>,
    /// Attention of each probe query summed over each key block, `[num_probes, nkb]`, probes
    /// as [`probe_queries`] places them (a few single queries spread over the chunk before
    /// the representative ones); each row sums to 1. Optional: empty means not measured.
    /// With it the faithful mode also keeps the probes' mean captured mass at gamma, which
    /// the last block alone cannot promise for earlier rows (`docs/SELECTION.md`); the
    /// original mode ignores it. Costs about `PROBE_QUERIES / (2·block_size)` of the
    /// representative attention's arithmetic (6% at block 128).
    pub probe_block_mass: Vec<f32>,
    /// Round the pooled query-aware logits `Q̄·K̄ᵀ` (Algorithm 4) to bf16 before their softmax,
    /// as the original does on its bf16 inputs. Backends set it when `selection == Original`
    /// and the input dtype is BF16 (together with the other bf16 rounding points they emulate
    /// in the fields above), so compatibility decisions match the authors' code bit for bit;
    /// `false` (the default) keeps the map in f32.
    pub bf16_pooled_logits: bool,
    /// Estimated attention of each query block per key block, `[num_query_blocks, nkb]`: the
    /// mean, over the block's [`sampled_queries`] rows (in order, f64), of each row's exact
    /// attention summed per key block. Needed by [`SelectionMode::Sampled`] only; empty
    /// otherwise.
    pub sampled_block_mass: Vec<f32>,
}

impl HeadStatistics {
    /// The statistics every mode reads; the optional ones (`probe_block_mass`,
    /// `sampled_block_mass`, `bf16_pooled_logits`) start empty / false and are set as fields.
    /// (The struct is `#[non_exhaustive]` so that new statistics are not breaking changes.)
    pub fn new(
        vertical: Vec<f32>,
        slash: Vec<f32>,
        estimate: Vec<f32>,
        q_pooled: Vec<f32>,
        k_pooled: Vec<f32>,
        rep_block_mass: Vec<f32>,
    ) -> Self {
        Self {
            vertical,
            slash,
            estimate,
            q_pooled,
            k_pooled,
            rep_block_mass,
            ..Self::default()
        }
    }
}

/// Why `seq` is computed dense, or `None` when selection can pay off.
///
/// The original's rule: a sequence no longer than `max(2·block_size, min_budget)` is dense,
/// since the budget alone would cover (almost) every block.
pub fn dense_fallback(seq: &Sequence, cfg: &FlexPrefillConfig) -> Option<String> {
    let limit = (2 * cfg.block_size).max(cfg.min_budget_blocks() * cfg.block_size);
    (seq.kv_len <= limit).then(|| {
        format!(
            "kv_len {} ≤ max(2·block_size, min_budget) = {limit}: computed dense",
            seq.kv_len
        )
    })
}

/// What selection decided for one (sequence, head).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSelection {
    /// Chosen pattern ([`Pattern::Dense`] for dense-fallback sequences).
    pub pattern: Pattern,
    /// sqrt-JS distance of the pattern decision (NaN when not computed).
    pub js_distance: f32,
    /// Key blocks per query block, sorted and unique, forced blocks included.
    pub rows: Vec<Vec<u32>>,
    /// Exact captured mass of each representative query (the last `min(bs, q_len)` queries)
    /// under `rows`, from [`HeadStatistics::rep_block_mass`]; empty when that is empty.
    pub representative_mass: Vec<f32>,
}

impl HeadSelection {
    /// Mean of [`Self::representative_mass`] (NaN when it is empty).
    pub fn mean_representative_mass(&self) -> f32 {
        let m = &self.representative_mass;
        (m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64) as f32
    }

    /// Smallest of [`Self::representative_mass`] (NaN when it is empty).
    pub fn min_representative_mass(&self) -> f32 {
        self.representative_mass
            .iter()
            .copied()
            .reduce(f32::min)
            .unwrap_or(f32::NAN)
    }
}

/// How many probe queries [`probe_queries`] places (at most). 16 and 32 gave the same
/// accuracy on the testkit workloads at 16k (docs/ACCURACY.md); 16 costs half.
pub const PROBE_QUERIES: usize = 16;

/// The probe queries of a sequence: chunk-relative query indices at which a backend may
/// measure the exact attention per key block, besides the representative queries, so the
/// faithful mode can check its selection on rows the last block does not represent.
///
/// `min(PROBE_QUERIES, ceil(m / bs))` queries, where `m = q_len − min(bs, q_len)` counts the
/// queries before the representative ones: the midpoints of that many equal segments of
/// `0..m`, ascending. Empty when `m = 0`.
pub fn probe_queries(seq: &Sequence, block_size: usize) -> Vec<usize> {
    let m = seq.q_len - block_size.min(seq.q_len);
    let p = PROBE_QUERIES.min(m.div_ceil(block_size));
    (0..p).map(|k| (2 * k + 1) * m / (2 * p)).collect()
}

/// A public selection function's typed error for an input of the wrong size.
pub(crate) fn check_len(func: &str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{func}: {what} has {got} values, expected {want}"
        )))
    }
}

/// Checks that one head's statistics have the lengths `seq` implies.
fn check_statistics(
    stats: &HeadStatistics,
    seq: &Sequence,
    head_dim: usize,
    cfg: &FlexPrefillConfig,
) -> Result<()> {
    let grid = Grid::new(seq, cfg.block_size);
    let bad = |what: &str, got: usize, want: usize| {
        Err(Error::Shape(format!(
            "head statistics: {what} has {got} values, expected {want} (q_len {}, kv_len {}, block_size {})",
            seq.q_len, seq.kv_len, cfg.block_size
        )))
    };
    let checks = [
        ("vertical", stats.vertical.len(), seq.kv_len),
        ("slash", stats.slash.len(), seq.kv_len),
        ("estimate", stats.estimate.len(), grid.nkb),
        ("q_pooled", stats.q_pooled.len(), grid.nqb * head_dim),
        ("k_pooled", stats.k_pooled.len(), grid.nkb * head_dim),
    ];
    for (what, got, want) in checks {
        if got != want {
            return bad(what, got, want);
        }
    }
    let rep = grid.num_rep() * grid.nkb;
    let rep_ok = stats.rep_block_mass.len() == rep
        || (stats.rep_block_mass.is_empty() && cfg.selection == SelectionMode::Original);
    if !rep_ok {
        return bad("rep_block_mass", stats.rep_block_mass.len(), rep);
    }
    if cfg.selection == SelectionMode::Sampled
        && stats.sampled_block_mass.len() != grid.nqb * grid.nkb
    {
        return bad(
            "sampled_block_mass",
            stats.sampled_block_mass.len(),
            grid.nqb * grid.nkb,
        );
    }
    let probes = probe_queries(seq, cfg.block_size).len() * grid.nkb;
    if !stats.probe_block_mass.is_empty() && stats.probe_block_mass.len() != probes {
        return bad("probe_block_mass", stats.probe_block_mass.len(), probes);
    }
    Ok(())
}

/// Pattern search and index selection for one (sequence, head) that is not a dense fallback:
/// Algorithm 2, then Algorithm 3 or 4 under `cfg.selection`, forced blocks included.
///
/// `Original` (original-notes §3–7): vertical-slash heads take the top pooled lines with the
/// literal-128 token budgets; query-aware heads take the flattened (or per-row) cut of the
/// pooled map united with `mb` columns and `mb` diagonals. `Faithful`: see
/// `docs/SELECTION.md`; every representative query holds `gamma` of its attention.
pub fn select_head(
    stats: &HeadStatistics,
    seq: &Sequence,
    head_dim: usize,
    cfg: &FlexPrefillConfig,
) -> Result<HeadSelection> {
    check_statistics(stats, seq, head_dim, cfg)?;
    let bs = cfg.block_size;
    let grid = Grid::new(seq, bs);
    let (pattern, js) = sparse_pattern_search(stats, bs, cfg)?;
    // The pooled block map: what a query-aware head selects from, in both modes.
    let query_aware_map = if pattern == Pattern::QueryAware {
        Some(pooled_block_attention(
            &stats.q_pooled,
            &stats.k_pooled,
            head_dim,
            seq,
            bs,
            stats.bf16_pooled_logits,
        )?)
    } else {
        None
    };
    let rows = match (cfg.selection, &query_aware_map) {
        (SelectionMode::Original, _) => {
            let budgets = original_line_budgets(stats, grid.nkb, pattern, cfg);
            let mut rows = vertical_slash_index_search(stats, seq, cfg, budgets)?;
            if let Some(map) = &query_aware_map {
                let qa = query_aware_index_search(map, stats, seq, cfg)?;
                for (row, extra) in rows.iter_mut().zip(qa) {
                    row.extend(extra);
                }
                normalise(&mut rows);
            }
            rows
        }
        (SelectionMode::Faithful, Some(map)) => query_aware_index_search(map, stats, seq, cfg)?,
        // The paper's Algorithm 3 entry point; in this mode it runs the faithful walk over the
        // statistics' own probe rows (budgets are the original's only).
        (SelectionMode::Faithful, None) => {
            let budgets = LineBudgets {
                vertical: 0,
                slash: 0,
            };
            vertical_slash_index_search(stats, seq, cfg, budgets)?
        }
        (SelectionMode::Sampled, _) => {
            sampled::sampled_selection(&stats.sampled_block_mass, &grid, cfg)
        }
    };
    let representative_mass = representative_mass(&grid, &rows, &stats.rep_block_mass);
    Ok(HeadSelection {
        pattern,
        js_distance: js,
        rows,
        representative_mass,
    })
}

/// The pattern a head reports: [`Pattern::Dense`] when its blocks are every causal block,
/// whatever rule chose them, so a head that computes everything never shows under a sparse
/// pattern's name (its `js_distance` still tells what the decision was). Backends building
/// their own reports use it too, so their patterns match the CPU's.
pub fn reported_pattern(pattern: Pattern, selected_blocks: usize, causal_blocks: usize) -> Pattern {
    if selected_blocks >= causal_blocks {
        Pattern::Dense
    } else {
        pattern
    }
}

/// Every causal block, with the forced-block convention: what a dense-fallback head computes.
fn dense_selection(seq: &Sequence, cfg: &FlexPrefillConfig) -> HeadSelection {
    let grid = Grid::new(seq, cfg.block_size);
    let mut rows = grid.dense_rows();
    add_forced(&mut rows, &grid, cfg.forced);
    normalise(&mut rows);
    HeadSelection {
        pattern: Pattern::Dense,
        js_distance: f32::NAN,
        rows,
        representative_mass: vec![1.0; grid.num_rep()],
    }
}

/// Algorithm 1 minus the attention: decides each head's pattern and selects its blocks.
///
/// `stats` holds one entry per (sequence, head), sequence-major, for every sequence (entries of
/// dense-fallback sequences are ignored and may be empty). Returns the index and one report per
/// (sequence, head).
pub fn build_index(
    seqs: &[Sequence],
    shape: AttentionShape,
    cfg: &FlexPrefillConfig,
    stats: &[HeadStatistics],
) -> Result<(BlockIndex, Vec<HeadReport>)> {
    cfg.validate()?;
    shape.validate()?;
    let h = shape.num_heads;
    if stats.len() != seqs.len() * h {
        return Err(Error::Shape(format!(
            "{} head statistics for {} sequences × {} heads",
            stats.len(),
            seqs.len(),
            h
        )));
    }
    let mut heads = Vec::with_capacity(stats.len());
    let mut reports = Vec::with_capacity(stats.len());
    for (si, seq) in seqs.iter().enumerate() {
        let dense = dense_fallback(seq, cfg).is_some();
        let causal = seq.total_causal_blocks(cfg.block_size);
        for head in 0..h {
            let sel = if dense {
                dense_selection(seq, cfg)
            } else {
                select_head(&stats[si * h + head], seq, shape.head_dim, cfg)?
            };
            let selected: usize = sel.rows.iter().map(Vec::len).sum();
            reports.push(HeadReport::new(
                si,
                head,
                sel.pattern,
                sel.js_distance,
                selected,
                causal,
                sel.mean_representative_mass(),
            ));
            heads.push(sel.rows);
        }
    }
    let index = BlockIndex::from_rows(seqs, h, cfg.block_size, heads)?;
    Ok((index, reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueryAwareCut;

    fn seq(q_len: usize, kv_len: usize) -> Sequence {
        Sequence {
            q_start: 0,
            k_start: 0,
            q_len,
            kv_len,
        }
    }

    /// Statistics of one head over `kv_len` keys (bs 16): every representative query puts
    /// `sink` on key 0, `local` on its own key, `stripe` on key `stripe_at`, and the rest
    /// uniformly over its causal keys. Lines and block masses are exact for that attention.
    fn planted(
        s: &Sequence,
        bs: usize,
        sink: f32,
        local: f32,
        stripe: f32,
        stripe_at: usize,
    ) -> HeadStatistics {
        let grid = Grid::new(s, bs);
        let nrep = grid.num_rep();
        let (n, nkb) = (s.kv_len, grid.nkb);
        let mut vertical = vec![0.0f64; n];
        let mut slash = vec![0.0f64; n];
        let mut rep = vec![0.0f32; nrep * nkb];
        for i in 0..nrep {
            let p = n - nrep + i;
            let mut a = vec![0.0f64; n];
            let rest = 1.0 - (sink + local + stripe) as f64;
            for x in a.iter_mut().take(p + 1) {
                *x = rest / (p + 1) as f64;
            }
            a[0] += sink as f64;
            a[p] += local as f64;
            a[stripe_at.min(p)] += stripe as f64;
            for j in 0..=p {
                vertical[j] += a[j] / nrep as f64;
                slash[p - j] += a[j] / nrep as f64;
                rep[i * nkb + j / bs] += a[j] as f32;
            }
        }
        HeadStatistics {
            vertical: vertical.iter().map(|&x| x as f32).collect(),
            slash: slash.iter().map(|&x| x as f32).collect(),
            // far from the truth: vertical-slash in both modes
            estimate: (0..nkb).map(|c| if c == 1 { 1.0 } else { 0.0 }).collect(),
            q_pooled: vec![0.0; grid.nqb * 2],
            k_pooled: vec![0.0; nkb * 2],
            rep_block_mass: rep,
            ..Default::default()
        }
    }

    fn cfg(selection: SelectionMode) -> FlexPrefillConfig {
        FlexPrefillConfig {
            block_size: 16,
            min_budget: 16,
            gamma: 0.9,
            selection,
            ..Default::default()
        }
    }

    #[test]
    fn build_index_dense_fallback_and_sparse_heads() {
        let shape = AttentionShape::new(2, 1, 2).unwrap();
        let short = seq(32, 32); // ≤ 2·bs: dense
        let long = seq(160, 160);
        let st = planted(&long, 16, 0.3, 0.3, 0.3, 70);
        let stats = vec![
            HeadStatistics::default(),
            HeadStatistics::default(),
            st.clone(),
            st,
        ];
        for mode in [SelectionMode::Original, SelectionMode::Faithful] {
            let (index, reports) = build_index(&[short, long], shape, &cfg(mode), &stats).unwrap();
            index.validate(Default::default()).unwrap();
            assert_eq!(reports.len(), 4);
            assert_eq!(reports[0].pattern, Pattern::Dense);
            assert_eq!(
                reports[0].dense_reason,
                Some(crate::report::DenseReason::ShortSequence)
            );
            assert_eq!(reports[0].density, 1.0);
            assert_eq!(reports[2].pattern, Pattern::VerticalSlash);
            assert_eq!(reports[2].dense_reason, None);
            assert_eq!(reports[2].causal_blocks, 55);
            assert!(reports[2].density < 1.0);
            // the stripe column (key 70 → block 4): faithful finds it in every later row; the
            // original's `K // 128 + 1` budget is one column here, the forced sink.
            for r in 5..10 {
                let found = index.row(1, 0, r).contains(&4);
                assert_eq!(found, mode == SelectionMode::Faithful, "{mode:?} row {r}");
            }
        }
    }

    #[test]
    fn a_head_that_selects_every_causal_block_reports_dense() {
        let s = seq(64, 64);
        let st = planted(&s, 16, 0.2, 0.2, 0.2, 20);
        let shape = AttentionShape::new(1, 1, 2).unwrap();
        let mut c = cfg(SelectionMode::Faithful);
        c.gamma = 1.0;
        let (index, reports) = build_index(&[s], shape, &c, std::slice::from_ref(&st)).unwrap();
        assert_eq!(reports[0].selected_blocks, reports[0].causal_blocks);
        assert_eq!(index.density(), 1.0);
        assert_eq!(reports[0].pattern, Pattern::Dense);
        assert_eq!(
            reports[0].dense_reason,
            Some(crate::report::DenseReason::SelectedEveryBlock)
        );
        assert!(reports[0].js_distance.is_finite());
        // a sparse selection keeps its pattern's name
        c.gamma = 0.5;
        let (_, reports) = build_index(&[s], shape, &c, &[st]).unwrap();
        assert!(reports[0].density < 1.0);
        assert_eq!(reports[0].pattern, Pattern::VerticalSlash);
        assert_eq!(reports[0].dense_reason, None);
    }

    #[test]
    fn faithful_keeps_gamma_on_every_representative_query_original_does_not() {
        // bs 16, 320 tokens, mb 1: sink 0.2, local 0.2, stripe 0.2, 0.4 spread uniformly.
        let s = seq(320, 320);
        let st = planted(&s, 16, 0.2, 0.2, 0.2, 100);
        let base = FlexPrefillConfig {
            min_budget: 1,
            ..cfg(SelectionMode::Faithful)
        };
        for gamma in [0.7, 0.8, 0.9, 0.95] {
            let c = FlexPrefillConfig { gamma, ..base };
            let sel = select_head(&st, &s, 2, &c).unwrap();
            assert!(
                sel.min_representative_mass() >= gamma,
                "gamma {gamma}: {}",
                sel.min_representative_mass()
            );
            let orig = select_head(
                &st,
                &s,
                2,
                &FlexPrefillConfig {
                    selection: SelectionMode::Original,
                    ..c
                },
            )
            .unwrap();
            // the original's literal-128 budget takes 1 block per line here: 0.6 + a little
            assert!(
                orig.min_representative_mass() < 0.7,
                "{}",
                orig.min_representative_mass()
            );
        }
    }

    #[test]
    fn chunked_prefill_selection_is_valid_with_two_diagonal_blocks() {
        // 100 queries at the end of 250 keys: query blocks start mid key block.
        let s = seq(100, 250);
        let st = planted(&s, 16, 0.3, 0.3, 0.2, 40);
        let shape = AttentionShape::new(1, 1, 2).unwrap();
        for mode in [SelectionMode::Original, SelectionMode::Faithful] {
            let (index, reports) =
                build_index(&[s], shape, &cfg(mode), std::slice::from_ref(&st)).unwrap();
            index.validate(Default::default()).unwrap();
            // query block 0 holds positions 150..165: diagonal key blocks 9 and 10
            assert!(index.row(0, 0, 0).ends_with(&[9, 10]));
            assert!(reports[0].estimated_mass > 0.0);
        }
    }

    #[test]
    fn query_aware_heads_unite_the_cut_with_min_budget_lines_in_original_mode() {
        let s = seq(64, 64);
        let grid = Grid::new(&s, 16);
        let mut st = planted(&s, 16, 0.25, 0.25, 0.25, 20);
        // estimate = truth → distance 0 → query-aware
        st.estimate = vertical_slash::pool_vertical(&st.vertical, 16);
        // pooled q/k: every query block prefers key block 0 strongly
        st.q_pooled = vec![4.0, 0.0, 4.0, 0.0, 4.0, 0.0, 4.0, 0.0];
        st.k_pooled = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let c = FlexPrefillConfig {
            min_budget: 1,
            block_size: 16,
            query_aware_cut: QueryAwareCut::Flattened,
            ..FlexPrefillConfig::original()
        };
        let sel = select_head(&st, &s, 2, &c).unwrap();
        assert_eq!(sel.pattern, Pattern::QueryAware);
        assert_eq!(sel.js_distance, 0.0);
        // mb = 1: sink column + diagonal; the cut adds nothing new (block 0 already in)
        assert_eq!(
            sel.rows,
            grid_rows(&grid, &[&[0], &[0, 1], &[0, 2], &[0, 3]])
        );
        // faithful: every row raised to gamma under the pooled map, plus forced blocks
        let f = FlexPrefillConfig {
            selection: SelectionMode::Faithful,
            ..c
        };
        let sel = select_head(&st, &s, 2, &f).unwrap();
        sel.rows.iter().for_each(|r| assert_eq!(r[0], 0));
        assert!(sel.min_representative_mass() >= 0.9);
    }

    fn grid_rows(_g: &Grid, rows: &[&[u32]]) -> Vec<Vec<u32>> {
        rows.iter().map(|r| r.to_vec()).collect()
    }

    #[test]
    fn probe_queries_are_midpoints_before_the_representative_block() {
        // 1000 tokens, bs 100: 900 queries before the last block → 9 probes, midpoints of
        // nine 100-query segments.
        assert_eq!(
            probe_queries(&seq(1000, 1000), 100),
            (0..9).map(|k| 50 + 100 * k).collect::<Vec<_>>()
        );
        // long sequences get PROBE_QUERIES of them
        assert_eq!(probe_queries(&seq(16384, 16384), 128).len(), PROBE_QUERIES);
        // chunk of 40 queries, bs 16: 24 before the representative ones → 2 probes
        assert_eq!(probe_queries(&seq(40, 1000), 16), vec![6, 18]);
        // a chunk no longer than a block has none
        assert!(probe_queries(&seq(16, 1000), 16).is_empty());
    }

    #[test]
    fn bad_statistics_are_typed_errors() {
        let shape = AttentionShape::new(1, 1, 2).unwrap();
        let s = seq(320, 320);
        let c = cfg(SelectionMode::Faithful);
        assert!(matches!(
            build_index(&[s], shape, &c, &[]),
            Err(Error::Shape(_))
        ));
        let mut st = planted(&s, 16, 0.3, 0.3, 0.3, 5);
        st.slash.pop();
        assert!(matches!(
            build_index(&[s], shape, &c, &[st.clone()]),
            Err(Error::Shape(m)) if m.contains("slash")
        ));
        let mut st = planted(&s, 16, 0.3, 0.3, 0.3, 5);
        st.probe_block_mass = vec![0.0; 7];
        assert!(matches!(
            build_index(&[s], shape, &c, std::slice::from_ref(&st)),
            Err(Error::Shape(m)) if m.contains("probe_block_mass")
        ));
        let mut st = planted(&s, 16, 0.3, 0.3, 0.3, 5);
        st.rep_block_mass.clear();
        assert!(build_index(&[s], shape, &c, std::slice::from_ref(&st)).is_err());
        // the original does not need the representative block masses
        let (_, rep) = build_index(&[s], shape, &cfg(SelectionMode::Original), &[st]).unwrap();
        assert!(rep[0].estimated_mass.is_nan());
    }
}
