//! Algorithm 3: vertical-slash index search, lines extended to the whole causal map.

use crate::config::FlexPrefillConfig;
use crate::input::Sequence;

use super::HeadStatistics;

/// Chosen key blocks per query block for a vertical-slash head. Returns the rows and the
/// representative mass kept.
pub fn vertical_slash_index_search(
    stats: &HeadStatistics,
    seq: &Sequence,
    cfg: &FlexPrefillConfig,
) -> (Vec<Vec<u32>>, f32) {
    let _ = (stats, seq, cfg);
    (Vec::new(), 0.0)
}
