//! Pattern decision (`kernels/select/decide.cu`): pooled lines, then each head's pattern.

use super::*;
use crate::launch::Launch;

/// Pools the lines to blocks and decides every head's pattern.
pub(super) fn launch(r: &mut Run<'_>) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/decide.cu; every buffer is sized
    // by the plan in `launch_select` for every index the kernels compute.
    unsafe {
        let pool_grid = (r.max_nkb.div_ceil(32) as u32, r.h as u32, r.nseq as u32);
        Launch::new(
            r.stream,
            &r.f("sel_pool_lines")?,
            pool_grid,
            256,
            2 * 32 * (r.bs + 1) * 4,
        )
        .arg(&r.c.stats.descs)
        .arg(&r.c.p)
        .arg(&r.c.stats.vertical)
        .arg(&r.c.stats.slash)
        .arg(&mut r.vpool)
        .arg(&mut r.spool)
        .launch()?;
        Launch::new(r.stream, &r.f("sel_decide")?, r.grid_heads(), 1024, 0)
            .arg(&r.c.stats.descs)
            .arg(&r.c.sel_d)
            .arg(&r.c.p)
            .arg(&r.c.stats.estimate)
            .arg(&r.vpool)
            .arg(&mut r.c.pattern)
            .arg(&mut r.js)
            .launch()?;
        crate::stats::profile::mark(r.stream, "sel_decide");
    }
    Ok(())
}
