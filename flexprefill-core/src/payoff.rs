//! The one "does sparse pay off?" rule every entry point applies before any device work.
//!
//! FlexPrefill's own overhead (representative attention, pattern decision, selection, index
//! build) is paid before the sparse attention saves anything. Where that overhead is a large
//! share of a dense attention, a call that selects blocks is slower than dense, which is the
//! one thing a sparse attention must never be. So every entry point (the provided
//! [`crate::Backend::flex_prefill`], a backend's fused call, a command line) asks
//! [`dense_reason`] first, with the backend's own threshold
//! ([`crate::Backend::min_sparse_kv_len`]): the overhead is a property of the device, not of
//! the algorithm. Why each number is what it is: `docs/ARCHITECTURE.md` ("Dense or sparse").

use crate::config::FlexPrefillConfig;
use crate::input::Sequence;
use crate::report::{DenseReason, HeadReport, Pattern, SparsityReport};
use crate::selection;

/// Why the whole call should run dense attention, or `None` when selection can pay off.
///
/// Dense when every sequence is a dense fallback of the selection rule itself
/// ([`selection::dense_fallback`]: the budget alone covers almost every block), or when the
/// longest sequence has fewer than `min_sparse_kv_len` keys (the backend's overhead would not
/// be won back). A batch with one long sequence runs the sparse path; its short sequences
/// still get dense rows from selection. Reads lengths only: no device work, no sync.
pub fn dense_reason(
    seqs: &[Sequence],
    cfg: &FlexPrefillConfig,
    min_sparse_kv_len: usize,
) -> Option<String> {
    if let Some(reasons) = seqs
        .iter()
        .map(|s| selection::dense_fallback(s, cfg))
        .collect::<Option<Vec<_>>>()
    {
        return reasons.into_iter().next();
    }
    let longest = seqs.iter().map(|s| s.kv_len).max().unwrap_or(0);
    (longest < min_sparse_kv_len).then(|| {
        format!(
            "kv_len {longest} < {min_sparse_kv_len}: on this backend pattern search and index \
             build would cost more than sparsity saves; computed dense"
        )
    })
}

/// The report of a call that ran dense for `reason`: every (sequence, head) is
/// [`Pattern::Dense`] with all of its causal blocks, so the per-head table says the same
/// thing as [`SparsityReport::dense_fallback`]. Timings are left empty (stages that did not
/// run are `None`).
pub fn dense_report(
    seqs: &[Sequence],
    num_heads: usize,
    block_size: usize,
    reason: String,
) -> SparsityReport {
    let heads = seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let causal = s.total_causal_blocks(block_size);
            (0..num_heads).map(move |head| HeadReport {
                dense_reason: Some(DenseReason::CallRanDense),
                ..HeadReport::new(si, head, Pattern::Dense, f32::NAN, causal, causal, 1.0)
            })
        })
        .collect();
    SparsityReport {
        heads,
        dense_fallback: Some(reason),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize) -> Sequence {
        Sequence {
            q_start: 0,
            k_start: 0,
            q_len: n,
            kv_len: n,
        }
    }

    #[test]
    fn budget_rule_then_backend_threshold() {
        let cfg = FlexPrefillConfig::default(); // block 128, min_budget 1024
                                                // Covered by the budget: dense whatever the backend says.
        let r = dense_reason(&[seq(1024)], &cfg, 0).expect("budget covers 1024 keys");
        assert!(r.contains("min_budget"), "{r}");
        // Past the budget: sparse with no backend threshold, dense below it.
        assert_eq!(dense_reason(&[seq(4096)], &cfg, 0), None);
        let r = dense_reason(&[seq(4096)], &cfg, 16384).expect("4096 < 16384");
        assert!(r.contains("kv_len 4096 < 16384"), "{r}");
        assert_eq!(dense_reason(&[seq(16384)], &cfg, 16384), None);
        // The longest sequence decides for the batch.
        assert_eq!(dense_reason(&[seq(512), seq(20000)], &cfg, 16384), None);
        assert!(dense_reason(&[seq(512), seq(8000)], &cfg, 16384).is_some());
    }

    #[test]
    fn dense_report_lists_every_causal_block() {
        let seqs = [seq(300), seq(1000)];
        let rep = dense_report(&seqs, 2, 128, "why".into());
        assert_eq!(rep.heads.len(), 4);
        assert_eq!(rep.dense_fallback.as_deref(), Some("why"));
        assert_eq!(rep.density(), 1.0);
        assert!(rep.heads.iter().all(|h| h.pattern == Pattern::Dense));
        // 1000 tokens, block 128: 8 query blocks, 1 + 2 + ... + 8 = 36 causal blocks.
        assert_eq!(rep.heads[2].causal_blocks, 36);
        assert_eq!(rep.heads[3].selected_blocks, 36);
        assert_eq!((rep.heads[3].seq, rep.heads[3].head), (1, 1));
    }
}
