//! The one trait between the algorithm and a device.
//!
//! Backends supply three primitives (dense attention, block-sparse attention over a given
//! index, and the per-head statistics of the representative queries); the provided
//! [`Backend::flex_prefill`] runs core's selection between them. A backend overrides the
//! provided methods only to fuse steps (the CUDA backend keeps everything on the device).

use std::time::Instant;

use crate::config::FlexPrefillConfig;
use crate::error::{Error, Result};
use crate::index::BlockIndex;
use crate::input::{AttentionInput, AttentionOutput};
use crate::payoff;
use crate::report::{SparsityReport, Timings};
use crate::selection::{self, HeadStatistics};

/// A device that can run FlexPrefill. Host tensors in, host tensors out.
pub trait Backend {
    /// Short name for reports (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// Exact causal attention over every key (bottom-right aligned for chunks).
    fn dense_attention(&self, x: &AttentionInput<'_>) -> Result<AttentionOutput>;

    /// [`Backend::dense_attention`] with its time, measured as [`Backend::flex_prefill`]
    /// measures its stages (the host clock by default; device backends override it with
    /// device times and transfers apart), so the two compare like for like.
    fn dense_attention_timed(&self, x: &AttentionInput<'_>) -> Result<(AttentionOutput, Timings)> {
        let t = Instant::now();
        let out = self.dense_attention(x)?;
        let timings = Timings {
            attention: Some(t.elapsed()),
            ..Timings::default()
        };
        Ok((out, timings))
    }

    /// Causal attention restricted to the blocks of `index` (online softmax over the listed
    /// key blocks, token-level causal mask inside them).
    fn sparse_attention(
        &self,
        x: &AttentionInput<'_>,
        index: &BlockIndex,
    ) -> Result<AttentionOutput>;

    /// [`HeadStatistics`] of every (sequence, head), sequence-major.
    fn head_statistics(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<Vec<HeadStatistics>>;

    /// Pattern search and index selection (Algorithms 2–4), without the attention.
    fn select_index(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<(BlockIndex, SparsityReport)> {
        cfg.validate()?;
        let t0 = Instant::now();
        let stats = self.head_statistics(x, cfg)?;
        let t1 = Instant::now();
        let (index, heads) = selection::build_index(&x.seqs, x.shape, cfg, &stats)?;
        let t2 = Instant::now();
        let dense_fallback = payoff::dense_reason(&x.seqs, cfg, 0);
        let mut report = SparsityReport {
            heads,
            dense_fallback,
            ..Default::default()
        };
        report.timings.pattern_search = Some(t1 - t0);
        report.timings.index_build = Some(t2 - t1);
        Ok((index, report))
    }

    /// Shortest key length (longest sequence of a batch) at which this backend's pattern
    /// search and index build are won back by the sparse attention; below it
    /// [`Backend::flex_prefill`] runs dense ([`payoff::dense_reason`]). The default, 0,
    /// leaves only selection's own budget rule; a backend whose overhead is a large share of
    /// its dense attention at moderate lengths raises it.
    fn min_sparse_kv_len(&self) -> usize {
        0
    }

    /// Algorithm 1: pattern search, index selection, block-sparse attention; dense attention
    /// (and a report that says why) when [`payoff::dense_reason`] says sparsity cannot pay
    /// off on this backend.
    fn flex_prefill(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<(AttentionOutput, SparsityReport)> {
        cfg.validate()?;
        if let Some(reason) = payoff::dense_reason(&x.seqs, cfg, self.min_sparse_kv_len()) {
            let t = Instant::now();
            let out = self.dense_attention(x)?;
            let mut report =
                payoff::dense_report(&x.seqs, x.shape.num_heads, cfg.block_size, reason);
            report.timings.attention = Some(t.elapsed());
            return Ok((out, report));
        }
        let (index, mut report) = self.select_index(x, cfg)?;
        let t = Instant::now();
        let out = self.sparse_attention(x, &index)?;
        report.timings.attention = Some(t.elapsed());
        Ok((out, report))
    }
}

/// Checks that `index` was built for `x` (same sequences, heads); backends call it first in
/// `sparse_attention`.
pub fn check_index_matches(x: &AttentionInput<'_>, index: &BlockIndex) -> Result<()> {
    if index.num_heads() != x.shape.num_heads {
        return Err(Error::Index(format!(
            "index has {} heads, input has {}",
            index.num_heads(),
            x.shape.num_heads
        )));
    }
    let same = index.seqs().len() == x.seqs.len()
        && index
            .seqs()
            .iter()
            .zip(&x.seqs)
            .all(|(a, b)| a.q_len == b.q_len && a.kv_len == b.kv_len);
    if !same {
        return Err(Error::Index(
            "index was built for other sequence lengths".into(),
        ));
    }
    Ok(())
}
