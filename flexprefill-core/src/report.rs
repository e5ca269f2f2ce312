//! What FlexPrefill decided, per head: the numbers behind the paper's Figures 9 and 10.

use std::time::Duration;

/// The sparse pattern chosen for a head (Algorithm 2), or dense when sparse cannot pay off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// sqrt-JS(estimate, truth) < tau: pooled Q·K block scores pick blocks per query block.
    QueryAware,
    /// The estimate is unreliable: column and diagonal lines from the representative queries.
    VerticalSlash,
    /// Every causal block: the sequence is too short for sparsity to pay off, or the head's
    /// selection ended up with every causal block (its `js_distance` shows the decision).
    Dense,
}

impl Pattern {
    /// `query_aware`, `vertical_slash` or `dense`, as in reports.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::QueryAware => "query_aware",
            Pattern::VerticalSlash => "vertical_slash",
            Pattern::Dense => "dense",
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a head computes every causal block ([`Pattern::Dense`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenseReason {
    /// The sequence is no longer than the sparse threshold `max(2·block_size, min_budget)`:
    /// selection is skipped (`selection::dense_fallback`).
    ShortSequence,
    /// Selection ran and its blocks are every causal block of the sequence; the head's
    /// `js_distance` still shows the pattern decision.
    SelectedEveryBlock,
    /// The whole call ran dense (`SparsityReport::dense_fallback` says why).
    CallRanDense,
    /// Selection kept so many blocks that block-sparse attention would cost more than the
    /// dense walk (the CUDA backend decides this per head on the device); the head computed
    /// every causal block.
    SparseCostsMore,
}

impl DenseReason {
    /// `short_sequence`, `selected_every_block`, `call_ran_dense` or `sparse_costs_more`, as in
    /// reports.
    pub fn name(self) -> &'static str {
        match self {
            DenseReason::ShortSequence => "short_sequence",
            DenseReason::SelectedEveryBlock => "selected_every_block",
            DenseReason::CallRanDense => "call_ran_dense",
            DenseReason::SparseCostsMore => "sparse_costs_more",
        }
    }
}

impl std::fmt::Display for DenseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One (sequence, head)'s decision.
///
/// `#[non_exhaustive]`: backends outside core build it with [`HeadReport::new`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HeadReport {
    /// Sequence number in the batch.
    pub seq: usize,
    /// Query head.
    pub head: usize,
    /// Chosen pattern.
    pub pattern: Pattern,
    /// sqrt-JS distance between the pooled estimate and the true block distribution (Eq. 2);
    /// NaN when not computed (dense) or when the original's `0·ln 0` quirk produced it.
    pub js_distance: f32,
    /// Blocks computed.
    pub selected_blocks: usize,
    /// Causal blocks (what dense computes).
    pub causal_blocks: usize,
    /// `selected_blocks / causal_blocks`.
    pub density: f64,
    /// Mean share of the representative queries' attention inside the chosen blocks, exact
    /// (from `HeadStatistics::rep_block_mass`) for either pattern; 1 for dense heads, NaN when
    /// the backend did not measure the representative block masses (allowed in original mode).
    pub estimated_mass: f32,
    /// Why the head is [`Pattern::Dense`]; `None` for a sparse head.
    pub dense_reason: Option<DenseReason>,
}

impl HeadReport {
    /// The report of a head whose rule chose `pattern` and `selected_blocks` of
    /// `causal_blocks`: a `pattern` of [`Pattern::Dense`] means the sequence was too short
    /// for selection; a sparse pattern whose blocks are every causal block is reported
    /// dense ([`crate::selection::reported_pattern`]), so a head that computes everything
    /// never shows under a sparse pattern's name. Every backend builds its reports here, so
    /// their patterns and reasons agree.
    pub fn new(
        seq: usize,
        head: usize,
        pattern: Pattern,
        js_distance: f32,
        selected_blocks: usize,
        causal_blocks: usize,
        estimated_mass: f32,
    ) -> Self {
        let reported = crate::selection::reported_pattern(pattern, selected_blocks, causal_blocks);
        let dense_reason = match (pattern, reported) {
            (Pattern::Dense, _) => Some(DenseReason::ShortSequence),
            (_, Pattern::Dense) => Some(DenseReason::SelectedEveryBlock),
            _ => None,
        };
        Self {
            seq,
            head,
            pattern: reported,
            js_distance,
            selected_blocks,
            causal_blocks,
            // derived, so it cannot disagree with the counts (1 when there is no causal block)
            density: if causal_blocks == 0 {
                1.0
            } else {
                selected_blocks as f64 / causal_blocks as f64
            },
            estimated_mass,
            dense_reason,
        }
    }
}

/// Time split of one call. A stage that did not run is `None`, never a zero: a call that ran
/// dense has no pattern search and no index build, and a host backend has no transfers.
///
/// Host backends measure with the host clock. The CUDA backend measures device stages with
/// CUDA events around the queued work (`device_clock` is then `true`), so the stage times are
/// what the GPU spent, not what the host waited; its host API also reports the copies of the
/// inputs and outputs apart, so they are never mistaken for attention time.
///
/// `#[non_exhaustive]`: start from `Timings::default()` and set fields.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct Timings {
    /// Representative attention (the statistics of the last query block) and, on host
    /// backends, the pattern decision. On the CUDA backend: the statistics kernels.
    pub pattern_search: Option<Duration>,
    /// Block selection and CSR build. On the CUDA backend: the selection kernels, which also
    /// take the pattern decision.
    pub index_build: Option<Duration>,
    /// Attention: block-sparse, or dense when the call ran dense.
    pub attention: Option<Duration>,
    /// Host-to-device copies of the inputs (host API of a device backend only).
    pub upload: Option<Duration>,
    /// Device-to-host copies of the outputs (host API of a device backend only).
    pub download: Option<Duration>,
    /// `true` when the three stage times are device times from CUDA events, `false` for the
    /// host clock.
    pub device_clock: bool,
}

impl Timings {
    /// Sum of the stages that ran (pattern search, index build, attention), transfers apart.
    pub fn compute(&self) -> Duration {
        [self.pattern_search, self.index_build, self.attention]
            .into_iter()
            .flatten()
            .sum()
    }
}

/// Everything FlexPrefill decided in one call.
///
/// `#[non_exhaustive]`: backends outside core build it with [`SparsityReport::new`] (or
/// `Default`) and set the timings afterwards.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct SparsityReport {
    /// One entry per (sequence, head), sequence-major.
    pub heads: Vec<HeadReport>,
    /// Why the call ran dense, if it did (e.g. sequence shorter than the minimum budget).
    pub dense_fallback: Option<String>,
    /// Time split.
    pub timings: Timings,
}

impl SparsityReport {
    /// The per-head decisions and the dense-fallback reason, with zero timings.
    pub fn new(heads: Vec<HeadReport>, dense_fallback: Option<String>) -> Self {
        Self {
            heads,
            dense_fallback,
            timings: Timings::default(),
        }
    }

    /// Selected over causal blocks over all heads.
    pub fn density(&self) -> f64 {
        let sel: usize = self.heads.iter().map(|h| h.selected_blocks).sum();
        let causal: usize = self.heads.iter().map(|h| h.causal_blocks).sum();
        if causal == 0 {
            1.0
        } else {
            sel as f64 / causal as f64
        }
    }
}
