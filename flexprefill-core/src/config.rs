//! The paper's knobs, with the original code's defaults.

use crate::error::{Error, Result};

/// Which rule set turns scores into blocks.
///
/// The original code breaks the gamma promise in several documented ways (token budgets converted
/// as if contiguous, a global query-aware cut, one representative block standing in for every
/// row; see `docs/SELECTION.md`). `Faithful` is the default and keeps gamma on the representative
/// rows by construction; `Original` reproduces the authors' code, quirks included, for
/// comparison and for reproducing published numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectionMode {
    /// Cuts over block-pooled scores so the chosen blocks hold at least `gamma` of the
    /// representative attention mass (default).
    #[default]
    Faithful,
    /// Bit-for-bit the rules of the authors' code (github bytedance/FlexPrefill a24b27b):
    /// literal-128 token budgets, crossing element included for vertical-slash and excluded
    /// for query-aware, union of the query-aware set with the minimum-budget lines, NaN from
    /// `0·ln 0` making the head vertical-slash.
    Original,
    /// Every query block cuts its own row at gamma: a few of its queries, spread evenly over
    /// the block (last one included), get their exact attention per key block; their mean is
    /// the block's estimated distribution, and blocks are taken in its order until the estimate
    /// holds `gamma` plus a small margin (`docs/SELECTION.md`). Costs
    /// [`crate::selection::SAMPLED_ROWS`]`/block_size` of the `Q·Kᵀ` arithmetic; needs
    /// [`crate::HeadStatistics::sampled_block_mass`].
    Sampled,
}

/// How the query-aware cut (Algorithm 4) spends `gamma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryAwareCut {
    /// One cut over the flattened, normalised pooled map (Algorithm 4, the original's choice).
    #[default]
    Flattened,
    /// One cut per query block: each row of the pooled map keeps its smallest top set with row
    /// mass ≥ gamma (Appendix F.4).
    PerQueryBlock,
}

/// Blocks kept whatever the scores say.
///
/// The sink column keeps the attention-sink tokens that every row leans on; the diagonal keeps
/// each query's own key so no row is ever empty (an empty row would be a NaN in the softmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcedBlocks {
    /// Key block 0 in every query block row.
    pub sink: bool,
    /// The key block(s) holding each query block's own positions.
    pub diagonal: bool,
}

impl Default for ForcedBlocks {
    fn default() -> Self {
        Self {
            sink: true,
            diagonal: true,
        }
    }
}

/// FlexPrefill's knobs (paper Section 3 and Algorithm 1).
///
/// Defaults follow the original's README and the paper's experiments: `gamma` 0.9, `tau` 0.1,
/// `block_size` 128, `min_budget` 1024 tokens. Tile sizes and other speed-only settings live in
/// the backends, never here: everything in this struct changes *which* blocks are computed.
///
/// The struct is `#[non_exhaustive]` so a knob can be added without breaking callers: start
/// from [`FlexPrefillConfig::default`] (or [`FlexPrefillConfig::original`]) and set fields or
/// chain the `with_*` methods, then [`validate`](FlexPrefillConfig::validate) (backends do).
///
/// ```
/// use flexprefill_core::FlexPrefillConfig;
/// let cfg = FlexPrefillConfig::default().with_gamma(0.95).with_min_budget(512);
/// cfg.validate()?;
/// let mut same = FlexPrefillConfig::default();
/// same.gamma = 0.95;
/// same.min_budget = 512;
/// assert_eq!(cfg, same);
/// # Ok::<(), flexprefill_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FlexPrefillConfig {
    /// Cumulative attention threshold: the chosen blocks should hold at least this share of
    /// the attention mass. In (0, 1].
    pub gamma: f32,
    /// Pattern threshold on the sqrt-JS distance: below it a head is query-aware. ≥ 0; 0 means
    /// never query-aware.
    pub tau: f32,
    /// Tokens per block, for queries and keys alike. A power of two in [16, 256].
    pub block_size: usize,
    /// Minimum budget in tokens per head (rounded up to whole blocks). Clamped to the sequence:
    /// a budget larger than the sequence simply selects every causal block.
    pub min_budget: usize,
    /// Optional cap in tokens on the vertical-slash budget (Appendix F.6).
    pub max_budget: Option<usize>,
    /// Flattened (Algorithm 4) or per-query-block (Appendix F.4) query-aware cut.
    pub query_aware_cut: QueryAwareCut,
    /// Blocks always computed.
    pub forced: ForcedBlocks,
    /// Faithful (default) or original rules.
    pub selection: SelectionMode,
}

impl Default for FlexPrefillConfig {
    fn default() -> Self {
        Self {
            gamma: 0.9,
            tau: 0.1,
            block_size: 128,
            min_budget: 1024,
            max_budget: None,
            query_aware_cut: QueryAwareCut::Flattened,
            forced: ForcedBlocks::default(),
            selection: SelectionMode::Faithful,
        }
    }
}

impl FlexPrefillConfig {
    /// The authors' code's behaviour with the README's settings (compatibility mode).
    pub fn original() -> Self {
        Self {
            selection: SelectionMode::Original,
            ..Self::default()
        }
    }

    /// Sets [`gamma`](Self::gamma); the builders do not validate, [`validate`](Self::validate)
    /// does once all knobs are set.
    pub fn with_gamma(mut self, gamma: f32) -> Self {
        self.gamma = gamma;
        self
    }

    /// Sets [`tau`](Self::tau).
    pub fn with_tau(mut self, tau: f32) -> Self {
        self.tau = tau;
        self
    }

    /// Sets [`block_size`](Self::block_size) (tokens).
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }

    /// Sets [`min_budget`](Self::min_budget) (tokens).
    pub fn with_min_budget(mut self, min_budget: usize) -> Self {
        self.min_budget = min_budget;
        self
    }

    /// Sets [`max_budget`](Self::max_budget) (tokens, `None` for no cap).
    pub fn with_max_budget(mut self, max_budget: Option<usize>) -> Self {
        self.max_budget = max_budget;
        self
    }

    /// Sets [`query_aware_cut`](Self::query_aware_cut).
    pub fn with_query_aware_cut(mut self, cut: QueryAwareCut) -> Self {
        self.query_aware_cut = cut;
        self
    }

    /// Sets [`forced`](Self::forced).
    pub fn with_forced(mut self, forced: ForcedBlocks) -> Self {
        self.forced = forced;
        self
    }

    /// Sets [`selection`](Self::selection).
    pub fn with_selection(mut self, selection: SelectionMode) -> Self {
        self.selection = selection;
        self
    }

    /// Checks every knob; call before any work (backends do).
    pub fn validate(&self) -> Result<()> {
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(Error::Config(format!(
                "gamma ({}) must be in (0, 1]",
                self.gamma
            )));
        }
        if self.tau.is_nan() || self.tau < 0.0 || !self.tau.is_finite() {
            return Err(Error::Config(format!(
                "tau ({}) must be a finite number ≥ 0",
                self.tau
            )));
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(16..=256).contains(&bs) {
            return Err(Error::Config(format!(
                "block_size ({bs}) must be a power of two in [16, 256]"
            )));
        }
        if let Some(max) = self.max_budget {
            if max == 0 {
                return Err(Error::Config(
                    "max_budget (0) must be at least 1 token".into(),
                ));
            }
        }
        Ok(())
    }

    /// `min_budget` in blocks (at least one).
    pub fn min_budget_blocks(&self) -> usize {
        self.min_budget.div_ceil(self.block_size).max(1)
    }

    /// `max_budget` in blocks, if set.
    pub fn max_budget_blocks(&self) -> Option<usize> {
        self.max_budget.map(|t| t.div_ceil(self.block_size).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = FlexPrefillConfig::default();
        assert_eq!(
            (c.gamma, c.tau, c.block_size, c.min_budget),
            (0.9, 0.1, 128, 1024)
        );
        assert_eq!(c.selection, SelectionMode::Faithful);
        assert_eq!(
            FlexPrefillConfig::original().selection,
            SelectionMode::Original
        );
        c.validate().unwrap();
    }

    #[test]
    fn bad_knobs_are_typed_errors() {
        let ok = FlexPrefillConfig::default();
        for bad in [
            FlexPrefillConfig { gamma: 0.0, ..ok },
            FlexPrefillConfig { gamma: 1.5, ..ok },
            FlexPrefillConfig {
                gamma: f32::NAN,
                ..ok
            },
            FlexPrefillConfig { tau: -0.1, ..ok },
            FlexPrefillConfig {
                tau: f32::INFINITY,
                ..ok
            },
            FlexPrefillConfig {
                block_size: 96,
                ..ok
            },
            FlexPrefillConfig {
                block_size: 8,
                ..ok
            },
            FlexPrefillConfig {
                block_size: 512,
                ..ok
            },
            FlexPrefillConfig {
                max_budget: Some(0),
                ..ok
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
        FlexPrefillConfig {
            gamma: 1.0,
            block_size: 64,
            ..ok
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn budgets_round_up_to_blocks() {
        let c = FlexPrefillConfig {
            min_budget: 1000,
            max_budget: Some(129),
            ..Default::default()
        };
        assert_eq!(c.min_budget_blocks(), 8);
        assert_eq!(c.max_budget_blocks(), Some(2));
        assert_eq!(
            FlexPrefillConfig { min_budget: 0, ..c }.min_budget_blocks(),
            1
        );
    }
}
