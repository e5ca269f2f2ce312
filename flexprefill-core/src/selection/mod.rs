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

mod js;
mod mass;
mod pattern;
mod pool;
mod query_aware;
mod vertical_slash;

pub use js::{js_distance, js_distance_original};
pub use mass::{cumulative_mass_cut, original_prefix_count_plus_one, rank_order, ranked};
pub use pattern::sparse_pattern_search;
pub use pool::{block_sums, mean_pool_rows};
pub use query_aware::{pooled_block_attention, query_aware_index_search};
pub use vertical_slash::vertical_slash_index_search;

use crate::config::FlexPrefillConfig;
use crate::error::Result;
use crate::index::BlockIndex;
use crate::input::{AttentionShape, Sequence};
use crate::report::HeadReport;

/// What a backend measures for one (sequence, head) before selection.
///
/// The representative queries are the last `min(block_size, q_len)` queries of the sequence
/// (Algorithm 2: `Q̂ = Q[-block_size:]`); `A = softmax(Q̂Kᵀ·scale)` over all keys with the
/// causal mask (bottom-right aligned).
#[derive(Debug, Clone, PartialEq, Default)]
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
    /// Round the pooled query-aware logits `Q̄·K̄ᵀ` (Algorithm 4) to bf16 before their softmax,
    /// as the original does on its bf16 inputs. Backends set it when `selection == Original`
    /// and the input dtype is BF16 (together with the other bf16 rounding points they emulate
    /// in the fields above), so compatibility decisions match the authors' code bit for bit;
    /// `false` (the default) keeps the map in f32.
    pub bf16_pooled_logits: bool,
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
    let _ = (seqs, shape, cfg, stats);
    Err(crate::Error::Backend {
        backend: "core",
        message: "build_index: not implemented yet".into(),
    })
}
