//! The sampled mode's per-query-block cut (`kernels/select/sampled_cut.cu`): every row of the
//! block mask from the row's own estimate (`DeviceStats::sampled_block_mass`).

use super::*;
use crate::launch::Launch;
use flexprefill_core::selection::SAMPLED_MARGIN;

/// Threads of `sel_sampled_cut` (its `__launch_bounds__`).
const CUT_THREADS: u32 = 128;

/// Writes every (sequence, head, query block) row of the mask: the sampled cut, or every
/// causal block for a dense-fallback sequence.
pub(super) fn launch(r: &mut Run<'_>) -> Result<()> {
    if !r.c.stats.layout.sampled {
        return Err(CudaError::Unsupported {
            op: "select",
            message: "the sampled selection needs statistics computed with the sampled \
                      estimate (StatsLayout::with_sampled)"
                .into(),
        });
    }
    // core's sampled_selection: the target fraction in f64, capped at 1.
    let target = (r.cfg.gamma as f64 + SAMPLED_MARGIN as f64).min(1.0);
    // SAFETY: the arguments match `sel_sampled_cut` in kernels/select/sampled_cut.cu; the
    // sampled estimate holds Σ nqb · nkb · H floats (the layout's `sampled_offset`), the mask
    // the plan's rows of `words` words per head, and `row_smem` covers the sort of the
    // largest row (16 bytes per padded key block) and one mask row.
    unsafe {
        Launch::new(
            r.stream,
            &r.f("sel_sampled_cut")?,
            r.grid_rows(),
            CUT_THREADS,
            r.row_smem,
        )
        .arg(&r.c.stats.descs)
        .arg(&r.c.sel_d)
        .arg(&r.c.qb_seq_d)
        .arg(&r.c.p)
        .arg(&target)
        .arg(&r.c.stats.sampled_block_mass)
        .arg(&mut r.maskb)
        .launch()?;
    }
    crate::stats::profile::mark(r.stream, "sel_sampled_cut");
    Ok(())
}
