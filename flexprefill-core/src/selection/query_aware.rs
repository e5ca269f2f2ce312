//! Algorithm 4 (and Appendix F.4): query-aware index search on the pooled block map.

use half::bf16;

use crate::config::{FlexPrefillConfig, QueryAwareCut, SelectionMode};
use crate::error::{Error, Result};
use crate::input::Sequence;

use super::faithful::Coverage;
use super::grid::{add_forced, normalise, Grid};
use super::mass::{block_total, CutRule, GammaCut};
use super::{cumulative_mass_cut, probe_queries, rank_order, ranked, HeadStatistics};

/// The pooled block map `Â = rowsoftmax(Q̄·K̄ᵀ)` with the block-causal mask, `[nqb, nkb]`
/// row-major; masked entries are 0 and every row sums to 1.
///
/// `q_pooled` (`[nqb, head_dim]`) already carries the estimation scale (see
/// [`super::HeadStatistics::q_pooled`]). Row `r` sees key blocks `0..=d(r)` (the block-causal
/// mask, diagonal kept). `bf16_logits` rounds each logit to bf16 before the softmax, as the
/// original does on bf16 inputs. Logits accumulate in f64 and the softmax runs in f64, each
/// rounded once to f32, so the map does not depend on an accumulation order. Pooled inputs of
/// the wrong size are a typed error.
pub fn pooled_block_attention(
    q_pooled: &[f32],
    k_pooled: &[f32],
    head_dim: usize,
    seq: &Sequence,
    block_size: usize,
    bf16_logits: bool,
) -> Result<Vec<f32>> {
    if block_size == 0 {
        return Err(Error::Config("pooled_block_attention: block_size 0".into()));
    }
    let grid = Grid::new(seq, block_size);
    let (nqb, nkb) = (grid.nqb, grid.nkb);
    let f = "pooled_block_attention";
    super::check_len(f, "q_pooled", q_pooled.len(), nqb * head_dim)?;
    super::check_len(f, "k_pooled", k_pooled.len(), nkb * head_dim)?;
    let mut map = vec![0.0f32; nqb * nkb];
    let mut logits = vec![0.0f64; nkb];
    for r in 0..nqb {
        let q = &q_pooled[r * head_dim..(r + 1) * head_dim];
        let d = grid.last_diag(r);
        dots_f64(q, k_pooled, head_dim, &mut logits[..=d]);
        let mut max = f64::NEG_INFINITY;
        for l in logits[..=d].iter_mut() {
            let mut x = *l as f32;
            if bf16_logits {
                x = bf16::from_f32(x).to_f32();
            }
            *l = x as f64;
            max = max.max(*l);
        }
        let sum: f64 = logits[..=d].iter().map(|&l| (l - max).exp()).sum();
        for c in 0..=d {
            map[r * nkb + c] = ((logits[c] - max).exp() / sum) as f32;
        }
    }
    Ok(map)
}

/// `out[c] = Σ_t q[t]·k[c][t]`, each dot product accumulated in f64 sequentially over `t`
/// (the order every backend replays). Eight key blocks are in flight at once: the same
/// arithmetic per dot product, but the adds of different dots overlap instead of waiting on
/// one another (a sequential f64 sum is latency-bound).
fn dots_f64(q: &[f32], k_pooled: &[f32], head_dim: usize, out: &mut [f64]) {
    const W: usize = 8;
    let n = out.len();
    let mut c = 0;
    while c + W <= n {
        let ks: [&[f32]; W] =
            std::array::from_fn(|j| &k_pooled[(c + j) * head_dim..(c + j + 1) * head_dim]);
        let mut acc = [0.0f64; W];
        for (t, &a) in q.iter().enumerate() {
            let a = a as f64;
            for j in 0..W {
                acc[j] += a * ks[j][t] as f64;
            }
        }
        out[c..c + W].copy_from_slice(&acc);
        c += W;
    }
    for (cc, o) in out.iter_mut().enumerate().skip(c) {
        let k = &k_pooled[cc * head_dim..(cc + 1) * head_dim];
        *o = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
    }
}

/// The decimal a Python caller wrote for `gamma` (the shortest decimal of the f32, e.g. 0.9),
/// as the f64 the original multiplies with: it computes `gamma * num_blocks` in Python floats.
fn python_float(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

/// Algorithm 4 for one query-aware head: the chosen key blocks of every query block, rows
/// sorted and unique. `block_map` is [`pooled_block_attention`]'s map.
///
/// - `Original`: the original's cut alone (the caller unites it with the `mb` lines and the
///   forced blocks). `Flattened` is its `score_cover_idx`: sort the whole map descending
///   (ties: lower flat index first), keep the entries whose running sum is `≤ gamma · nqb`
///   (the crossing element is **excluded**, the opposite of Stage C); the cut is global, so
///   early rows (few blocks, large probabilities) are served first. `PerQueryBlock`
///   (Appendix F.4): each row keeps its smallest top set with row mass `≥ gamma`.
/// - `Faithful` (and `Sampled`, which has no query-aware step of its own): the paper's rule
///   (smallest top set reaching the target, crossing kept) on the same cut, each row raised
///   to `min(mb, causal)` blocks, forced blocks added. The target starts at `gamma`; with
///   probes (`stats.probe_block_mass`) it is calibrated: the smallest target whose selection
///   gives the probes an exact mean captured mass `≥ gamma` (bisection; the cut sets grow
///   with the target). Then the representative query blocks are topped up exactly until
///   every representative query holds `gamma` (`stats.rep_block_mass`).
///
/// Masked (non-causal) entries are never kept; the original keeps them only at `gamma ≈ 1`
/// through f32 drift, where they are fully masked anyway. Inputs of the wrong size are a
/// typed error.
pub fn query_aware_index_search(
    block_map: &[f32],
    stats: &HeadStatistics,
    seq: &Sequence,
    cfg: &FlexPrefillConfig,
) -> Result<Vec<Vec<u32>>> {
    if cfg.block_size == 0 {
        return Err(Error::Config(
            "query_aware_index_search: block_size 0".into(),
        ));
    }
    let grid = Grid::new(seq, cfg.block_size);
    let (nqb, nkb) = (grid.nqb, grid.nkb);
    let f = "query_aware_index_search";
    super::check_len(f, "block_map", block_map.len(), nqb * nkb)?;
    if cfg.selection != SelectionMode::Original {
        let rep = grid.num_rep() * nkb;
        super::check_len(f, "rep_block_mass", stats.rep_block_mass.len(), rep)?;
        if !stats.probe_block_mass.is_empty() {
            let probes = probe_queries(seq, cfg.block_size).len() * nkb;
            super::check_len(f, "probe_block_mass", stats.probe_block_mass.len(), probes)?;
        }
        return Ok(calibrated(block_map, stats, &grid, cfg));
    }
    let mut rows = vec![Vec::new(); nqb];
    match cfg.query_aware_cut {
        QueryAwareCut::PerQueryBlock => {
            for (r, row) in rows.iter_mut().enumerate() {
                let scores = &block_map[r * nkb..=r * nkb + grid.last_diag(r)];
                let order = ranked(scores);
                let cut = GammaCut::reach(cfg.gamma as f64 * block_total(scores));
                let k = cumulative_mass_cut(order.iter().map(|&c| scores[c]), &cut);
                row.extend(order[..k].iter().map(|&c| c as u32));
            }
        }
        QueryAwareCut::Flattened => {
            // Only causal entries: the masked ones are 0 and sort last.
            let ids = flattened_order(block_map, &grid);
            // The original compares its cumsum with the f32 of `gamma * nb`.
            let cut = GammaCut {
                target: (python_float(cfg.gamma) * nqb as f64) as f32 as f64,
                rule: CutRule::AtMost,
                min_blocks: 0,
                ..GammaCut::reach(0.0)
            };
            let k = cumulative_mass_cut(ids.iter().map(|&id| block_map[id]), &cut);
            for &id in &ids[..k] {
                rows[id / nkb].push((id % nkb) as u32);
            }
        }
    }
    for row in &mut rows {
        row.sort_unstable();
    }
    Ok(rows)
}

/// The causal entries of the map, flat ids `r·nkb + c`, in [`rank_order`].
fn flattened_order(block_map: &[f32], grid: &Grid) -> Vec<usize> {
    let nkb = grid.nkb;
    let mut ids: Vec<usize> = (0..grid.nqb)
        .flat_map(|r| r * nkb..=r * nkb + grid.last_diag(r))
        .collect();
    ids.sort_unstable_by(|&a, &b| rank_order(block_map, a, b));
    ids
}

/// The faithful query-aware cuts of the pooled map at any target `t`, with the paper's
/// convention (smallest top set reaching the target). The sets grow with `t`.
struct QueryAwareCuts<'a> {
    map: &'a [f32],
    grid: Grid,
    cut: QueryAwareCut,
    /// Each row's causal key blocks in rank order, with their rank in the flattened order
    /// (`Flattened`) or 0.
    orders: Vec<Vec<(u32, usize)>>,
    /// `PerQueryBlock`: each row's mass, summed in its rank order.
    totals: Vec<f64>,
    /// `Flattened`: the map's causal entries in rank order.
    flat: Vec<usize>,
    mb: usize,
}

impl<'a> QueryAwareCuts<'a> {
    fn new(map: &'a [f32], grid: Grid, cut: QueryAwareCut, mb: usize) -> Self {
        let nkb = grid.nkb;
        let mut totals = Vec::new();
        let mut flat = Vec::new();
        let orders = match cut {
            QueryAwareCut::PerQueryBlock => (0..grid.nqb)
                .map(|r| {
                    let scores = &map[r * nkb..=r * nkb + grid.last_diag(r)];
                    let order = ranked(scores);
                    totals.push(order.iter().map(|&c| scores[c] as f64).sum());
                    order.into_iter().map(|c| (c as u32, 0)).collect()
                })
                .collect(),
            QueryAwareCut::Flattened => {
                // One sort of the whole map; each row's order is its subsequence (ties go to
                // the lower flat id, i.e. the lower key block within a row, as `ranked`).
                flat = flattened_order(map, &grid);
                let mut orders: Vec<Vec<(u32, usize)>> = (0..grid.nqb)
                    .map(|r| Vec::with_capacity(grid.last_diag(r) + 1))
                    .collect();
                for (g, &id) in flat.iter().enumerate() {
                    orders[id / nkb].push(((id % nkb) as u32, g));
                }
                orders
            }
        };
        Self {
            map,
            grid,
            cut,
            orders,
            totals,
            flat,
            mb,
        }
    }

    /// The rows of `which` at target `t`: `PerQueryBlock`, each row's own smallest top set
    /// reaching `t` of its mass; `Flattened`, its entries of the smallest top set of the whole
    /// map reaching `t·nqb` (a prefix of the row's own ranking). Then at least
    /// `min(mb, causal)` blocks. Rows not in `which` stay empty.
    fn rows(&self, t: f64, which: impl IntoIterator<Item = usize>) -> Vec<Vec<u32>> {
        let nkb = self.grid.nkb;
        let global = match self.cut {
            QueryAwareCut::Flattened => {
                let cut = GammaCut::reach(t * self.grid.nqb as f64);
                cumulative_mass_cut(self.flat.iter().map(|&id| self.map[id]), &cut)
            }
            QueryAwareCut::PerQueryBlock => 0,
        };
        let mut rows = vec![Vec::new(); self.grid.nqb];
        for r in which {
            let order = &self.orders[r];
            let k = match self.cut {
                QueryAwareCut::PerQueryBlock => {
                    let cut = GammaCut {
                        min_blocks: self.mb.max(1),
                        ..GammaCut::reach(t * self.totals[r])
                    };
                    let scores = &self.map[r * nkb..];
                    cumulative_mass_cut(order.iter().map(|&(c, _)| scores[c as usize]), &cut)
                }
                QueryAwareCut::Flattened => order
                    .partition_point(|&(_, g)| g < global)
                    .max(self.mb.min(order.len())),
            };
            rows[r] = order[..k].iter().map(|&(c, _)| c).collect();
        }
        rows
    }
}

/// The faithful query-aware selection (see [`query_aware_index_search`]).
fn calibrated(
    block_map: &[f32],
    stats: &HeadStatistics,
    grid: &Grid,
    cfg: &FlexPrefillConfig,
) -> Vec<Vec<u32>> {
    let cuts = QueryAwareCuts::new(
        block_map,
        *grid,
        cfg.query_aware_cut,
        cfg.min_budget_blocks(),
    );
    let probe_block_mass = &stats.probe_block_mass[..];
    let mut t = cfg.gamma as f64;
    if !probe_block_mass.is_empty() {
        let probe_mean = |t: f64| {
            let mut cov = Coverage::new(*grid, &[], probe_block_mass, cfg.gamma);
            let mut rows = cuts.rows(t, cov.blocks.clone());
            add_forced(&mut rows, grid, cfg.forced);
            cov.cover_rows(&rows);
            cov.probes_done()
        };
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        if probe_mean(hi) {
            for _ in 0..16 {
                let mid = 0.5 * (lo + hi);
                if probe_mean(mid) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
        } else {
            // Even the whole estimated mass misses (blocks the map rounds to 0 hold probe
            // mass): any target above 1 takes every causal block, which holds all of it.
            hi = 2.0;
        }
        t = hi;
    }
    let mut rows = cuts.rows(t, 0..grid.nqb);
    add_forced(&mut rows, grid, cfg.forced);
    normalise(&mut rows);
    let mut cov = Coverage::new(*grid, &stats.rep_block_mass, &[], cfg.gamma);
    cov.cover_rows(&rows);
    cov.top_up_representatives(&mut rows);
    normalise(&mut rows);
    rows
}

/// Per-row estimated mass of `rows` under the pooled map: `Σ_{c ∈ rows[r]} Â[r, c]`.
#[cfg(test)]
fn estimated_row_mass(block_map: &[f32], nkb: usize, rows: &[Vec<u32>]) -> Vec<f64> {
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .map(|&c| block_map[r * nkb + c as usize] as f64)
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::selection::grid::test_grid as grid;

    /// Mean over probes of the captured share under `rows`.
    fn probe_mean(g: &Grid, probe: &[f32], rows: &[Vec<u32>]) -> f64 {
        let probes = probe_queries(&g.seq, g.bs);
        let nkb = g.nkb;
        probes
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                rows[i / g.bs]
                    .iter()
                    .map(|&c| probe[k * nkb + c as usize] as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / probes.len() as f64
    }

    #[test]
    fn query_aware_target_is_raised_until_the_probes_hold_gamma() {
        // 8 blocks of 4 tokens; 7 probes, one in each block 0..6. The pooled map is sure that
        // every row attends key block 0 (0.9) — the probes actually spread evenly.
        let g = grid(32, 32, 4);
        let (nqb, nkb) = (8, 8);
        let mut map = vec![0.0f32; nqb * nkb];
        for r in 0..nqb {
            if r == 0 {
                map[0] = 1.0;
                continue;
            }
            map[r * nkb] = 0.9;
            for c in 1..=r {
                map[r * nkb + c] = 0.1 / r as f32;
            }
        }
        let probes = probe_queries(&g.seq, 4);
        assert_eq!(probes, vec![2, 6, 10, 14, 18, 22, 26]);
        let mut probe = vec![0.0f32; probes.len() * nkb];
        for (k, &i) in probes.iter().enumerate() {
            let r = i / 4;
            for c in 0..=r {
                probe[k * nkb + c] = 1.0 / (r + 1) as f32;
            }
        }
        let stats = HeadStatistics {
            rep_block_mass: {
                let mut m = vec![0.0f32; 4 * nkb];
                (0..4).for_each(|i| m[i * nkb] = 1.0);
                m
            },
            ..Default::default()
        };
        for cut in [QueryAwareCut::PerQueryBlock, QueryAwareCut::Flattened] {
            let cfg = FlexPrefillConfig {
                gamma: 0.8,
                block_size: 4,
                min_budget: 1,
                query_aware_cut: cut,
                ..Default::default()
            };
            let blind = calibrated(&map, &stats, &g, &cfg);
            assert!(probe_mean(&g, &probe, &blind) < 0.8, "{cut:?}");
            let probed = HeadStatistics {
                probe_block_mass: probe.clone(),
                ..stats.clone()
            };
            let rows = calibrated(&map, &probed, &g, &cfg);
            let m = probe_mean(&g, &probe, &rows);
            assert!(m >= 0.8 - 1e-9, "{cut:?}: {m}");
            // and not much more than needed: one block short of it would miss gamma
            assert!(m < 0.95, "{cut:?}: {m}");
        }
    }

    #[test]
    fn pooled_map_is_block_causal_and_rows_sum_to_one() {
        // 3 blocks of 2 tokens, head_dim 1: q̄ = [0, 1, 2], k̄ = [1, 0, ln 2 / 2]
        let q = [0.0, 1.0, 2.0];
        let k = [1.0, 0.0, 2f32.ln() / 2.0];
        let m = pooled_block_attention(&q, &k, 1, &Sequence::whole(6), 2, false).unwrap();
        // row 0: only block 0
        assert_eq!(&m[0..3], &[1.0, 0.0, 0.0]);
        // row 1: logits [1, 0] → [e/(e+1), 1/(e+1)]
        let e = std::f32::consts::E;
        assert!((m[3] - e / (e + 1.0)).abs() < 1e-6 && m[5] == 0.0);
        // row 2: logits [2, 0, ln 2] → weights e², 1, 2
        let z = e * e + 3.0;
        assert!((m[6] - e * e / z).abs() < 1e-6);
        assert!((m[7] - 1.0 / z).abs() < 1e-6);
        assert!((m[8] - 2.0 / z).abs() < 1e-6);
    }

    #[test]
    fn bf16_logits_round_before_the_softmax() {
        // logit 1.00390625 (= 1 + 2⁻⁸) is not a bf16 value: it rounds (to even) to 1.0
        let q = [0.0, 1.0];
        let k = [1.0 + 1.0 / 256.0, 0.0];
        let exact = pooled_block_attention(&q, &k, 1, &Sequence::whole(4), 2, false).unwrap();
        let rounded = pooled_block_attention(&q, &k, 1, &Sequence::whole(4), 2, true).unwrap();
        let e = std::f32::consts::E;
        assert!((rounded[2] - e / (e + 1.0)).abs() < 1e-7);
        assert!(exact[2] > rounded[2]);
    }

    /// The original's cut of [`map3`] (it reads no statistics).
    fn original_cut(cfg: &FlexPrefillConfig) -> Vec<Vec<u32>> {
        query_aware_index_search(
            &map3(),
            &HeadStatistics::default(),
            &Sequence::whole(6),
            cfg,
        )
        .unwrap()
    }

    /// 3×3 map: row 0 = [1], row 1 = [0.6, 0.4], row 2 = [0.5, 0.3, 0.2]. Total mass 3.
    fn map3() -> Vec<f32> {
        vec![1.0, 0.0, 0.0, 0.6, 0.4, 0.0, 0.5, 0.3, 0.2]
    }

    #[test]
    fn original_flattened_cut_excludes_the_crossing_element() {
        // gamma 0.5 → target 1.5. Sorted: 1.0 (0,0), 0.6 (1,0), 0.5 ... running 1.0, 1.6 > 1.5
        let cfg = FlexPrefillConfig {
            gamma: 0.5,
            block_size: 2,
            ..FlexPrefillConfig::original()
        };
        let none = HeadStatistics::default();
        let rows = original_cut(&cfg);
        assert_eq!(rows, vec![vec![0], vec![], vec![]]);
        // the paper's rule (faithful) includes the crossing element (row 1's block 0); no
        // forced blocks, mb 1 raises row 2 to one block; the representative queries (row 2)
        // hold all their mass on block 0, so the top-up adds nothing
        let f = FlexPrefillConfig {
            selection: SelectionMode::Faithful,
            min_budget: 2,
            forced: crate::config::ForcedBlocks {
                sink: false,
                diagonal: false,
            },
            ..cfg
        };
        let reps = HeadStatistics {
            rep_block_mass: vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            ..Default::default()
        };
        assert_eq!(
            query_aware_index_search(&map3(), &reps, &Sequence::whole(6), &f).unwrap(),
            vec![vec![0], vec![0], vec![0]]
        );
        // the faithful path needs the representative block masses: a typed error without
        assert!(query_aware_index_search(&map3(), &none, &Sequence::whole(6), &f).is_err());
    }

    #[test]
    fn flattened_cut_serves_early_rows_first() {
        // gamma 0.8 → target 2.4: 1.0, 0.6, 0.5, 0.4 (=2.5 > 2.4, excluded)
        let cfg = FlexPrefillConfig {
            gamma: 0.8,
            block_size: 2,
            ..FlexPrefillConfig::original()
        };
        let rows = original_cut(&cfg);
        // row 2 keeps only 0.5 of its mass although gamma is 0.8
        assert_eq!(rows, vec![vec![0], vec![0], vec![0]]);
    }

    #[test]
    fn per_query_block_cut_keeps_gamma_in_every_row() {
        let cfg = FlexPrefillConfig {
            gamma: 0.75,
            block_size: 2,
            query_aware_cut: QueryAwareCut::PerQueryBlock,
            ..FlexPrefillConfig::original()
        };
        let rows = original_cut(&cfg);
        assert_eq!(rows, vec![vec![0], vec![0, 1], vec![0, 1]]);
        let mass = estimated_row_mass(&map3(), 3, &rows);
        assert!(mass.iter().all(|&m| m >= 0.75), "{mass:?}");
    }

    #[test]
    fn interleaved_dots_are_the_sequential_ones_bit_for_bit() {
        let d = 37;
        let q: Vec<f32> = (0..d)
            .map(|i| ((i * 7919) % 101) as f32 * 0.013 - 0.6)
            .collect();
        let k: Vec<f32> = (0..19 * d)
            .map(|i| ((i * 104729) % 97) as f32 * 0.021 - 1.0)
            .collect();
        let mut out = vec![0.0f64; 19];
        dots_f64(&q, &k, d, &mut out);
        for (c, &o) in out.iter().enumerate() {
            let mut want = 0.0f64;
            for t in 0..d {
                want += q[t] as f64 * k[c * d + t] as f64;
            }
            assert_eq!(o.to_bits(), want.to_bits(), "block {c}");
        }
    }

    #[test]
    fn python_gamma_is_the_decimal() {
        assert_eq!(python_float(0.9), 0.9f64);
        assert_eq!(python_float(0.95), 0.95f64);
    }
}
