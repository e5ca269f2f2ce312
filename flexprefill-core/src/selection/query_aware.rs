//! Algorithm 4 (and Appendix F.4): query-aware index search on the pooled block map.

use half::bf16;

use crate::config::{FlexPrefillConfig, QueryAwareCut, SelectionMode};
use crate::error::{Error, Result};
use crate::input::Sequence;

use super::grid::Grid;
use super::{cumulative_mass_cut, rank_order, ranked};

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

/// Algorithm 4 for one query-aware head: the chosen key blocks of every query block (forced
/// blocks, minimum budget and any union added by the caller), rows sorted and unique.
///
/// - `Flattened`, `Original`: the original's `score_cover_idx` — sort the whole map
///   descending (ties: lower flat index first), keep the entries whose running sum is
///   `≤ gamma · nqb` (the crossing element is **excluded**, the opposite of Stage C). The cut
///   is global, so early rows (few blocks, large probabilities) are served first.
/// - `Flattened`, `Faithful`: the paper's rule on the same flattened map: the smallest top
///   set whose mass is `≥ gamma · nqb` (crossing included).
/// - `PerQueryBlock` (Appendix F.4, both modes): each row keeps its smallest top set with row
///   mass `≥ gamma`.
///
/// Masked (non-causal) entries are never kept; the original keeps them only at `gamma ≈ 1`
/// through f32 drift, where they are fully masked anyway.
pub fn query_aware_index_search(
    block_map: &[f32],
    seq: &Sequence,
    cfg: &FlexPrefillConfig,
) -> Result<Vec<Vec<u32>>> {
    if cfg.block_size == 0 {
        return Err(crate::error::Error::Config(
            "query_aware_index_search: block_size 0".into(),
        ));
    }
    let grid = Grid::new(seq, cfg.block_size);
    let (nqb, nkb) = (grid.nqb, grid.nkb);
    super::check_len(
        "query_aware_index_search",
        "block_map",
        block_map.len(),
        nqb * nkb,
    )?;
    let mut rows = vec![Vec::new(); nqb];
    match cfg.query_aware_cut {
        QueryAwareCut::PerQueryBlock => {
            for (r, row) in rows.iter_mut().enumerate() {
                let scores = &block_map[r * nkb..=r * nkb + grid.last_diag(r)];
                let order = ranked(scores);
                let k = cumulative_mass_cut(scores, &order, cfg.gamma)?;
                row.extend(order[..k].iter().map(|&c| c as u32));
            }
        }
        QueryAwareCut::Flattened => {
            // Only causal entries: the masked ones are 0 and sort last.
            let mut ids: Vec<usize> = (0..nqb)
                .flat_map(|r| r * nkb..=r * nkb + grid.last_diag(r))
                .collect();
            ids.sort_unstable_by(|&a, &b| rank_order(block_map, a, b));
            let mut acc = 0.0f64;
            match cfg.selection {
                SelectionMode::Original => {
                    // The original compares an f32 cumsum with the f32 of `gamma * nb`.
                    let target = (python_float(cfg.gamma) * nqb as f64) as f32 as f64;
                    for &id in &ids {
                        acc += block_map[id] as f64;
                        if acc > target {
                            break;
                        }
                        rows[id / nkb].push((id % nkb) as u32);
                    }
                }
                SelectionMode::Faithful | SelectionMode::Sampled => {
                    let target = cfg.gamma as f64 * nqb as f64;
                    for &id in &ids {
                        rows[id / nkb].push((id % nkb) as u32);
                        acc += block_map[id] as f64;
                        if acc >= target {
                            break;
                        }
                    }
                }
            }
        }
    }
    for row in &mut rows {
        row.sort_unstable();
    }
    Ok(rows)
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
        let rows = query_aware_index_search(&map3(), &Sequence::whole(6), &cfg).unwrap();
        assert_eq!(rows, vec![vec![0], vec![], vec![]]);
        // the paper's rule (faithful) includes the crossing element
        let f = FlexPrefillConfig {
            selection: SelectionMode::Faithful,
            ..cfg
        };
        assert_eq!(
            query_aware_index_search(&map3(), &Sequence::whole(6), &f).unwrap(),
            vec![vec![0], vec![0], vec![]]
        );
    }

    #[test]
    fn flattened_cut_serves_early_rows_first() {
        // gamma 0.8 → target 2.4: 1.0, 0.6, 0.5, 0.4 (=2.5 > 2.4, excluded)
        let cfg = FlexPrefillConfig {
            gamma: 0.8,
            block_size: 2,
            ..FlexPrefillConfig::original()
        };
        let rows = query_aware_index_search(&map3(), &Sequence::whole(6), &cfg).unwrap();
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
        let rows = query_aware_index_search(&map3(), &Sequence::whole(6), &cfg).unwrap();
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
