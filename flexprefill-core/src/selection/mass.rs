//! The cumulative-mass cut: turning scores into "the smallest set holding gamma".

use std::cmp::Ordering;

use crate::error::{Error, Result};

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

/// Size of the smallest top set whose mass reaches `gamma · total`, where `total` is the sum
/// of all scores (the paper's rule: `min{k : Σ_{i<k} s[I_i] ≥ gamma}` on normalised scores).
///
/// `order` is `ranked(scores)`. Sums in f64, sequentially in rank order, so every backend can
/// reproduce it. Returns at least 1 when `scores` is not empty, and `scores.len()` when even
/// the whole set falls short through rounding. An `order` that is not a permutation of
/// `scores`' indices (wrong length, an index out of range) is a typed error.
pub fn cumulative_mass_cut(scores: &[f32], order: &[usize], gamma: f32) -> Result<usize> {
    super::check_len("cumulative_mass_cut", "order", order.len(), scores.len())?;
    if let Some(&i) = order.iter().find(|&&i| i >= scores.len()) {
        return Err(Error::Shape(format!(
            "cumulative_mass_cut: order holds index {i}, scores has {}",
            scores.len()
        )));
    }
    if scores.is_empty() {
        return Ok(0);
    }
    let total: f64 = scores.iter().map(|&s| s.max(0.0) as f64).sum();
    let target = gamma as f64 * total;
    let mut acc = 0.0f64;
    for (k, &i) in order.iter().enumerate() {
        acc += scores[i].max(0.0) as f64;
        if acc >= target {
            return Ok(k + 1);
        }
    }
    Ok(scores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_style_guide_convention() {
        // scores [0.5, 0.25, 0.25], gamma 0.75: the smallest set with mass ≥ gamma keeps 2
        // (the original's "count of prefix sums ≤ gamma, plus one" would keep 3).
        let s = [0.5, 0.25, 0.25];
        let o = ranked(&s);
        assert_eq!(o, vec![0, 1, 2]);
        assert_eq!(cumulative_mass_cut(&s, &o, 0.75).unwrap(), 2);
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
        let o = ranked(&s);
        assert_eq!(cumulative_mass_cut(&s, &o, 0.7).unwrap(), 1);
        assert_eq!(cumulative_mass_cut(&s, &o, 0.71).unwrap(), 2);
        assert_eq!(cumulative_mass_cut(&s, &o, 1.0).unwrap(), 3);
        assert_eq!(cumulative_mass_cut(&[], &[], 0.9).unwrap(), 0);
        // unnormalised scores are normalised by their sum
        let u = [2.0, 7.0, 1.0];
        assert_eq!(cumulative_mass_cut(&u, &ranked(&u), 0.71).unwrap(), 2);
        // a wrong order is a typed error, not a panic
        assert!(cumulative_mass_cut(&s, &[0, 1], 0.5).is_err());
        assert!(cumulative_mass_cut(&s, &[0, 1, 7], 0.5).is_err());
    }
}
