//! Algorithm 2: sparse pattern search.

use crate::config::{FlexPrefillConfig, SelectionMode};
use crate::error::{Error, Result};
use crate::report::Pattern;

use super::vertical_slash::pool_vertical;
use super::{js_distance, js_distance_original, HeadStatistics};

/// Decides query-aware vs vertical-slash for one head: `sqrt-JS(ā, â) < tau` (strict), with
/// `ā = stats.estimate` and `â` the key-block sums of the vertical line (the true block
/// distribution of the representative queries). Returns the pattern and the distance.
///
/// `Original` uses [`js_distance_original`]: an exact zero in either distribution gives NaN,
/// `NaN < tau` is false and the head silently becomes vertical-slash (original-notes §4).
/// `Faithful` uses [`js_distance`] (`0·ln 0 = 0`), so an underflowed block cannot decide the
/// pattern. With `tau = 0` no head is query-aware in either mode. An `estimate` that does not
/// have one value per key block of `vertical` is a typed error.
pub fn sparse_pattern_search(
    stats: &HeadStatistics,
    block_size: usize,
    cfg: &FlexPrefillConfig,
) -> Result<(Pattern, f32)> {
    if block_size == 0 {
        return Err(Error::Config("sparse_pattern_search: block_size 0".into()));
    }
    let truth = pool_vertical(&stats.vertical, block_size);
    super::check_len(
        "sparse_pattern_search",
        "estimate",
        stats.estimate.len(),
        truth.len(),
    )?;
    let d = match cfg.selection {
        SelectionMode::Original => js_distance_original(&stats.estimate, &truth),
        SelectionMode::Faithful | SelectionMode::Sampled => js_distance(&stats.estimate, &truth),
    };
    let pattern = if d < cfg.tau {
        Pattern::QueryAware
    } else {
        Pattern::VerticalSlash
    };
    Ok((pattern, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(vertical: Vec<f32>, estimate: Vec<f32>) -> HeadStatistics {
        HeadStatistics {
            vertical,
            estimate,
            ..Default::default()
        }
    }

    #[test]
    fn equal_distributions_are_query_aware_and_tau_is_strict() {
        // bs 2: truth = [0.5, 0.5] = estimate → d = 0
        let s = stats(vec![0.25, 0.25, 0.25, 0.25], vec![0.5, 0.5]);
        let cfg = FlexPrefillConfig {
            block_size: 2,
            ..Default::default()
        };
        assert_eq!(
            sparse_pattern_search(&s, 2, &cfg).unwrap(),
            (Pattern::QueryAware, 0.0)
        );
        // tau 0: d < 0 never holds
        let never = FlexPrefillConfig { tau: 0.0, ..cfg };
        assert_eq!(
            sparse_pattern_search(&s, 2, &never).unwrap().0,
            Pattern::VerticalSlash
        );
    }

    #[test]
    fn disjoint_is_vertical_slash_at_sqrt_ln2() {
        let s = stats(vec![0.5, 0.5, 0.0, 0.0], vec![0.0, 1.0]);
        let (p, d) = sparse_pattern_search(&s, 2, &FlexPrefillConfig::default()).unwrap();
        assert_eq!(p, Pattern::VerticalSlash);
        assert!((d - 2f32.ln().sqrt()).abs() < 1e-6);
    }

    #[test]
    fn original_nan_quirk_turns_a_close_head_vertical_slash() {
        // estimate [0.5, 0.5, 0], truth [0.5, 0.5, 0]: identical, but the exact zeros give
        // 0·ln 0 = NaN in the original's formula.
        let s = stats(vec![0.5, 0.0, 0.5, 0.0, 0.0, 0.0], vec![0.5, 0.5, 0.0]);
        let orig = FlexPrefillConfig::original();
        let (p, d) = sparse_pattern_search(&s, 2, &orig).unwrap();
        assert!(d.is_nan());
        assert_eq!(p, Pattern::VerticalSlash);
        let (p, d) = sparse_pattern_search(&s, 2, &FlexPrefillConfig::default()).unwrap();
        assert_eq!((p, d), (Pattern::QueryAware, 0.0));
    }
}
