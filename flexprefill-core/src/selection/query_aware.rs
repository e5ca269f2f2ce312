//! Algorithm 4 (and Appendix F.4): query-aware index search on the pooled block map.

use crate::config::FlexPrefillConfig;
use crate::input::Sequence;

/// The pooled block map `Â = rowsoftmax(Q̄·K̄ᵀ)` with the block-causal mask, `[nqb, nkb]`.
pub fn pooled_block_attention(
    q_pooled: &[f32],
    k_pooled: &[f32],
    head_dim: usize,
    seq: &Sequence,
    block_size: usize,
) -> Vec<f32> {
    let _ = (q_pooled, k_pooled, head_dim, seq, block_size);
    Vec::new()
}

/// Chosen key blocks per query block for a query-aware head (forced blocks and budgets added
/// by the caller). Returns the rows and the estimated mass kept.
pub fn query_aware_index_search(
    block_map: &[f32],
    seq: &Sequence,
    cfg: &FlexPrefillConfig,
) -> (Vec<Vec<u32>>, f32) {
    let _ = (block_map, seq, cfg);
    (Vec::new(), 0.0)
}
