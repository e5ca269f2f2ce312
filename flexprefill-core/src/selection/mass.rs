//! The cumulative-mass cut: turning scores into "the smallest set holding gamma".

use std::cmp::Ordering;

/// The one total order of the whole workspace: score descending, then index ascending.
///
/// Every backend ranks with it, so CPU and CUDA select identical blocks on equal scores.
/// NaN sorts last.
#[inline]
pub fn rank_order(scores: &[f32], a: usize, b: usize) -> Ordering {
    let (x, y) = (scores[a], scores[b]);
    match (x.is_nan(), y.is_nan()) {
        (true, true) => a.cmp(&b),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => y.partial_cmp(&x).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
    }
}

/// Indices of `scores` in [`rank_order`].
pub fn ranked(scores: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_unstable_by(|&a, &b| rank_order(scores, a, b));
    idx
}

/// Indices of `scores` in [`rank_order`], produced lazily: the first `k` cost
/// `O(n + k log k)` instead of a full sort, which matters when a walk usually stops early.
///
/// Yields exactly the sequence of [`ranked`]: each refill partitions the remaining indices
/// with `select_nth_unstable_by` under the same total order, then sorts only the chunk taken
/// (chunks double, so a walk to the end still costs `O(n log n)`).
pub(crate) struct LazyRanked<'a> {
    scores: &'a [f32],
    rest: Vec<usize>,
    chunk: Vec<usize>,
    pos: usize,
    size: usize,
}

impl<'a> LazyRanked<'a> {
    pub(crate) fn new(scores: &'a [f32], first_chunk: usize) -> Self {
        Self {
            scores,
            rest: (0..scores.len()).collect(),
            chunk: Vec::new(),
            pos: 0,
            size: first_chunk.max(1),
        }
    }

    /// The next index without consuming it.
    pub(crate) fn peek(&mut self) -> Option<usize> {
        if self.pos == self.chunk.len() {
            if self.rest.is_empty() {
                return None;
            }
            let s = self.scores;
            let m = self.size.min(self.rest.len());
            if m < self.rest.len() {
                self.rest
                    .select_nth_unstable_by(m - 1, |&a, &b| rank_order(s, a, b));
            }
            self.chunk.clear();
            self.chunk.extend(self.rest.drain(..m));
            self.chunk.sort_unstable_by(|&a, &b| rank_order(s, a, b));
            self.pos = 0;
            self.size *= 2;
        }
        Some(self.chunk[self.pos])
    }
}

impl Iterator for LazyRanked<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let i = self.peek()?;
        self.pos += 1;
        Some(i)
    }
}

/// Where a gamma cut stops relative to the block whose mass crosses the target: the one
/// rule that differs between the modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutRule {
    /// The paper's rule (faithful and sampled modes): the smallest top set whose mass reaches
    /// the target, crossing block kept.
    Reach,
    /// The original's query-aware `score_cover_idx`: blocks while the running sum stays
    /// `≤ target`, crossing block dropped.
    AtMost,
    /// The original's Stage C `score_cover_topk`: the count of prefix sums `≤ target`, plus
    /// one. Can exceed the number of scores by one, as the original's count does.
    AtMostPlusOne,
}

/// One gamma cut: its target, its rule, and what it starts from and may not pass.
///
/// Every selection mode states its cuts in these terms, so the arithmetic of "blocks in
/// rank order until the mass reaches gamma" exists once and a device backend replays one
/// loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaCut {
    /// Absolute mass to reach (gamma times the caller's total: how the total is summed is
    /// the caller's, since the modes sum it in different orders).
    pub target: f64,
    /// The crossing-block rule.
    pub rule: CutRule,
    /// Mass already held before the first ranked block (forced blocks taken first).
    pub held: f64,
    /// Blocks taken even past the target.
    pub min_blocks: usize,
    /// Blocks never exceeded, even short of the target (an explicit `max_budget`).
    pub max_blocks: Option<usize>,
}

impl GammaCut {
    /// The paper's cut at `target` from nothing held, at least one block (the convention of
    /// `min{k : Σ_{i<k} s[I_i] ≥ gamma}`, which is never 0 on a non-empty set), no cap.
    pub fn reach(target: f64) -> Self {
        Self {
            target,
            rule: CutRule::Reach,
            held: 0.0,
            min_blocks: 1,
            max_blocks: None,
        }
    }
}

/// Sum of `scores` in index order, f64, each counted as [`cumulative_mass_cut`] counts it:
/// the total a per-row target `gamma · total` is taken of.
pub fn block_total(scores: &[f32]) -> f64 {
    scores.iter().map(|&s| block_mass(s)).sum()
}

/// A score as mass: NaN and negative scores hold none.
#[inline]
pub(crate) fn block_mass(s: f32) -> f64 {
    if s.is_nan() {
        0.0
    } else {
        s.max(0.0) as f64
    }
}

/// The gamma cut (Eq. 3, Appendix B): how many of `masses`, given in [`rank_order`] (score
/// descending, then block index ascending), the selection takes.
///
/// Blocks are added one at a time, f64, sequentially in the order given, starting from
/// `cut.held`, so every backend reproduces the count; the cut stops before a block when
/// `max_blocks` are taken, or when `min_blocks` are taken and the rule says the target is
/// met (`Reach`: the running mass is `≥ target`; `AtMost`, `AtMostPlusOne`: the next block
/// would take it `> target`). Returns at most the number of masses, plus one under
/// `AtMostPlusOne`.
pub fn cumulative_mass_cut(masses: impl IntoIterator<Item = f32>, cut: &GammaCut) -> usize {
    let mut acc = cut.held;
    let mut k = 0;
    for s in masses {
        if cut.max_blocks.is_some_and(|m| k >= m) {
            break;
        }
        let m = block_mass(s);
        if k >= cut.min_blocks {
            let met = match cut.rule {
                CutRule::Reach => acc >= cut.target,
                CutRule::AtMost | CutRule::AtMostPlusOne => acc + m > cut.target,
            };
            if met {
                break;
            }
        }
        acc += m;
        k += 1;
    }
    k + usize::from(cut.rule == CutRule::AtMostPlusOne)
}

/// Key blocks in the oracle density's order: mean-row mass descending (`f64::total_cmp`),
/// then block index ascending.
pub fn oracle_order(block_means: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..block_means.len()).collect();
    order.sort_by(|&a, &b| block_means[b].total_cmp(&block_means[a]).then(a.cmp(&b)));
    order
}

/// The mean-row oracle's cut of one query block: how many key blocks, taken in
/// [`oracle_order`], it takes until their mean-row masses (`block_means[c]`: the true mass of
/// key block `c` averaged over the block's rows) reach `gamma`, summed in f64 in that order;
/// all of them when they never do.
///
/// Its own walk rather than [`cumulative_mass_cut`]: the oracle ranks exact f64 masses and
/// must not round them to the f32 scores a selection cuts, and every backend that reports the
/// oracle (the test kit's f64 attention, the CUDA kernel's block-pooled probabilities) counts
/// with this one function.
pub fn oracle_count(block_means: &[f64], gamma: f64) -> usize {
    let mut acc = 0.0;
    for (k, c) in oracle_order(block_means).into_iter().enumerate() {
        acc += block_means[c];
        if acc >= gamma {
            return k + 1;
        }
    }
    block_means.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_count_takes_the_heaviest_blocks_until_gamma() {
        // order: 1 (0.5), then 0 and 3 tie at 0.2 (index ascending), then 2 (0.1)
        let m = [0.2, 0.5, 0.1, 0.2];
        assert_eq!(oracle_order(&m), vec![1, 0, 3, 2]);
        assert_eq!(oracle_count(&m, 0.5), 1);
        assert_eq!(oracle_count(&m, 0.65), 2);
        assert_eq!(oracle_count(&m, 0.71), 3);
        assert_eq!(oracle_count(&m, 1.0), 4);
        // masses that round short of gamma: every block
        assert_eq!(oracle_count(&[0.3, 0.3], 0.9), 2);
        assert_eq!(oracle_count(&[], 0.9), 0);
        // the first block is counted even at gamma 0
        assert_eq!(oracle_count(&m, 0.0), 1);
    }

    /// The cut of `scores` at `gamma` of their total, the paper's rule.
    fn reach(scores: &[f32], gamma: f32) -> usize {
        let cut = GammaCut::reach(gamma as f64 * block_total(scores));
        cumulative_mass_cut(ranked(scores).iter().map(|&i| scores[i]), &cut)
    }

    #[test]
    fn the_style_guide_convention() {
        // scores [0.5, 0.25, 0.25], gamma 0.75: the smallest set with mass ≥ gamma keeps 2;
        // the original's "count of prefix sums ≤ gamma, plus one" keeps 3.
        let s = [0.5, 0.25, 0.25];
        assert_eq!(ranked(&s), vec![0, 1, 2]);
        assert_eq!(reach(&s, 0.75), 2);
        let plus_one = GammaCut {
            rule: CutRule::AtMostPlusOne,
            min_blocks: 0,
            ..GammaCut::reach(0.75)
        };
        assert_eq!(cumulative_mass_cut(s, &plus_one), 3);
        // and the query-aware `score_cover_idx` drops the crossing block: 2 (0.75 ≤ 0.75)
        let at_most = GammaCut {
            rule: CutRule::AtMost,
            ..plus_one
        };
        assert_eq!(cumulative_mass_cut(s, &at_most), 2);
        assert_eq!(
            cumulative_mass_cut(
                s,
                &GammaCut {
                    target: 0.7,
                    ..at_most
                }
            ),
            1
        );
        // every prefix sum ≤ 1: the count plus one passes the number of scores
        assert_eq!(
            cumulative_mass_cut(
                s,
                &GammaCut {
                    target: 1.0,
                    ..plus_one
                }
            ),
            4
        );
    }

    #[test]
    fn held_mass_min_and_max_blocks() {
        let s = [0.5f32, 0.2, 0.2, 0.1];
        // 0.3 held: 0.5 brings 0.8 ≥ 0.75
        let c = GammaCut {
            held: 0.3,
            ..GammaCut::reach(0.75)
        };
        assert_eq!(cumulative_mass_cut(s, &c), 1);
        // held already past the target: nothing more without a minimum
        let c0 = GammaCut {
            held: 0.8,
            min_blocks: 0,
            ..c
        };
        assert_eq!(cumulative_mass_cut(s, &c0), 0);
        assert_eq!(
            cumulative_mass_cut(
                s,
                &GammaCut {
                    min_blocks: 3,
                    ..c0
                }
            ),
            3
        );
        // the cap wins over the target
        let capped = GammaCut {
            max_blocks: Some(2),
            ..GammaCut::reach(0.95)
        };
        assert_eq!(cumulative_mass_cut(s, &capped), 2);
    }

    #[test]
    fn ties_break_by_lower_index() {
        let s = [0.1, 0.3, 0.3, f32::NAN, 0.3];
        assert_eq!(ranked(&s), vec![1, 2, 4, 0, 3]);
    }

    #[test]
    fn lazy_ranking_is_the_full_ranking() {
        let s: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 13) as f32 * 0.25).collect();
        for first in [1, 3, 64, 5000] {
            assert_eq!(LazyRanked::new(&s, first).collect::<Vec<_>>(), ranked(&s));
        }
        let mut it = LazyRanked::new(&[0.5, f32::NAN, 0.7], 1);
        assert_eq!(it.peek(), Some(2));
        assert_eq!(it.collect::<Vec<_>>(), vec![2, 0, 1]);
    }

    #[test]
    fn cut_edges() {
        let s = [0.2, 0.7, 0.1];
        assert_eq!(reach(&s, 0.7), 1);
        assert_eq!(reach(&s, 0.71), 2);
        assert_eq!(reach(&s, 1.0), 3);
        assert_eq!(reach(&[], 0.9), 0);
        // unnormalised scores are cut at gamma of their sum
        assert_eq!(reach(&[2.0, 7.0, 1.0], 0.71), 2);
        // NaN and negative scores hold no mass
        assert_eq!(reach(&[0.5, f32::NAN, -1.0, 0.5], 1.0), 2);
    }
}
