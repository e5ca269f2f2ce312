//! Vertical-slash selection and the extension of every head's rows into the block mask
//! (`kernels/select/vertical_slash.cu`).

use cudarc::driver::CudaStream;

use super::*;
use crate::launch::Launch;

/// The vertical-slash chain on `side` (it runs beside the query-aware one).
pub(super) fn launch(r: &mut Run<'_>, side: &CudaStream) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/vertical_slash.cu; every buffer is
    // sized by the plan in `launch_select` for every index the kernels compute.
    unsafe {
        // The vertical-slash heads' chain (and the prep it shares with the calibration: column
        // keys, probe totals) runs beside the query-aware one (each uses a few CTAs per head);
        // cudarc's event tracking orders the shared buffers, both join before the mask.
        Launch::new(side, &r.f("sel_fvs_prep")?, r.grid_heads(), 512, 0)
            .seqs_p_pattern(&r.c)
            .arg(&r.c.stats.vertical)
            .arg(&r.c.stats.probe_block_mass)
            .arg(&r.probes_i)
            .arg(&mut r.vkey)
            .arg(&mut r.probe_tot)
            .launch()?;
        if r.probes {
            let chunks = (selection::PROBE_QUERIES * r.max_nkb).div_ceil(EV_PER_CTA) as u32;
            let grid = (chunks, r.h as u32, r.nseq as u32);
            Launch::new(side, &r.f("sel_fvs_probe_events")?, grid, 256, 0)
                .seqs_p_pattern(&r.c)
                .arg(&r.c.stats.slash)
                .arg(&r.c.stats.probe_block_mass)
                .arg(&r.vkey)
                .arg(&r.probe_tot)
                .arg(&mut r.ev_key)
                .arg(&mut r.ev_w)
                .launch()?;
        }
        Launch::new(
            side,
            &r.f("sel_fvs_stop")?,
            r.grid_heads(),
            512,
            r.sort_smem,
        )
        .seqs_p_pattern(&r.c)
        .arg(&r.c.stats.slash)
        .arg(&r.c.stats.rep_block_mass)
        .arg(&r.probes_i)
        .arg(&r.ev_key)
        .arg(&r.ev_w)
        .arg(&r.vkey)
        .arg(&mut r.kstar)
        .launch()?;
        Launch::new(side, &r.f("sel_fvs_lines")?, r.grid_heads(), 1024, 0)
            .seqs_sel_p_pattern(&r.c)
            .arg(&r.c.stats.slash)
            .arg(&r.vkey)
            .arg(&r.kstar)
            .arg(&mut r.colsel)
            .arg(&mut r.dist_prefix)
            .arg(&mut r.diag_hit)
            .launch()?;
        Launch::new(side, &r.f("sel_ovs")?, r.grid_heads(), 1024, 0)
            .seqs_p_pattern(&r.c)
            .arg(&r.c.stats.vertical)
            .arg(&r.c.stats.slash)
            .arg(&r.vpool)
            .arg(&r.spool)
            .arg(&mut r.colsel)
            .arg(&mut r.offsel)
            .launch()?;
    }
    Ok(())
}

/// Every head's rows into the block mask (after both chains joined).
pub(super) fn extend(r: &mut Run<'_>) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/vertical_slash.cu; every buffer is
    // sized by the plan in `launch_select` for every index the kernels compute.
    unsafe {
        let ext_grid = r.ext_grid();
        Launch::new(r.stream, &r.f("sel_extend")?, ext_grid, 256, 0)
            .warp_rows(&r.c)
            .arg(&r.c.pattern)
            .arg(&r.colsel)
            .arg(&r.offsel)
            .arg(&r.dist_prefix)
            .arg(&r.diag_hit)
            .arg(&mut r.maskb)
            .launch()?;
        crate::stats::profile::mark(r.stream, "sel_extend");
    }
    Ok(())
}
