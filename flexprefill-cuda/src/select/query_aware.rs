//! Query-aware selection (`kernels/select/query_aware_map.cu`, `query_aware_cut.cu`,
//! `query_aware_faithful.cu`).

use cudarc::driver::CudaStream;

use super::*;
use crate::launch::Launch;

/// The faithful top-up's prep, on `side`: it needs only the statistics and the patterns.
pub(super) fn topup_prep(r: &mut Run<'_>, side: &CudaStream) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/query_aware_faithful.cu; every
    // buffer is sized by the plan in `launch_select` for every index the kernels compute.
    unsafe {
        if r.faithful_qa {
            // The top-up's prep needs only the statistics and the patterns: it runs here, off
            // the query-aware chain's path (no profile mark: the marks time the main stream).
            let grid = (
                r.max_nkb.div_ceil(TOPUP_COLS) as u32,
                r.h as u32,
                r.nseq as u32,
            );
            Launch::new(side, &r.f("sel_qa_topup_prep")?, grid, 256, 0)
                .seqs_p_pattern(&r.c)
                .arg(&r.c.stats.rep_block_mass)
                .arg(&mut r.mass_t)
                .arg(&mut r.col_sum)
                .launch()?;
        }
    }
    Ok(())
}

/// The pooled map, its softmax, the calibration and the flattened cut (main stream).
pub(super) fn map_and_cut(r: &mut Run<'_>) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/query_aware_map.cu,
    // query_aware_cut.cu and query_aware_faithful.cu; every buffer is sized by the plan in
    // `launch_select` for every index the kernels compute.
    unsafe {
        if r.any_qa {
            Launch::new(
                r.stream,
                &r.f("sel_qa_map")?,
                r.map_grid,
                QM_THREADS,
                r.map_smem,
            )
            .arg(&r.c.stats.descs)
            .arg(&r.c.sel_d)
            .arg(&r.tiles_d)
            .arg(&r.c.p)
            .arg(&r.c.pattern)
            .arg(&r.c.stats.q_pooled)
            .arg(&r.c.stats.k_pooled)
            .arg(&mut r.mapb)
            .launch()?;
            let softmax_grid = (r.qb_all.div_ceil(QS_ROWS * QS_WARPS) as u32, r.h as u32, 1);
            Launch::new(
                r.stream,
                &r.f("sel_qa_softmax")?,
                softmax_grid,
                32 * QS_WARPS as u32,
                0,
            )
            .warp_rows(&r.c)
            .arg(&r.c.pattern)
            .arg(&mut r.mapb)
            .launch()?;
            crate::stats::profile::mark(r.stream, "sel_qa_map");
            Launch::new(r.stream, &r.f("sel_flat_init")?, r.grid_heads(), 32, 0)
                .seqs_p_pattern(&r.c)
                .arg(&mut r.flat_cut)
                .launch()?;
            crate::stats::profile::mark(r.stream, "sel_flat_init");
            // Per-row cuts rank every row; the flattened calibration only the probe rows.
            let sort_grid = match (r.cfg.query_aware_cut, r.probes) {
                (QueryAwareCut::PerQueryBlock, _) => r.grid_rows(),
                (QueryAwareCut::Flattened, true) => {
                    (selection::PROBE_QUERIES as u32, r.h as u32, r.nseq as u32)
                }
                (QueryAwareCut::Flattened, false) => (0, 0, 0),
            };
            if sort_grid.0 > 0 {
                Launch::new(r.stream, &r.f("sel_qa_sort")?, sort_grid, 256, r.sort_smem)
                    .rows(&r.c)
                    .arg(&r.mapb)
                    .arg(&mut r.order_b)
                    .arg(&mut r.run_b)
                    .launch()?;
            }
            crate::stats::profile::mark(r.stream, "sel_qa_sort");
            Launch::new(r.stream, &r.f("sel_qa_calib")?, r.grid_heads(), 1024, 0)
                .seqs_sel_p_pattern(&r.c)
                .arg(&r.mapb)
                .arg(&r.order_b)
                .arg(&r.run_b)
                .arg(&r.c.stats.probe_block_mass)
                .arg(&r.probe_tot)
                .arg(&r.probes_i)
                .arg(&mut r.cand_key)
                .arg(&mut r.cand_w)
                .arg(&mut r.t_b)
                .arg(&mut r.flat_cut)
                .arg(&mut r.cal)
                .launch()?;
            crate::stats::profile::mark(r.stream, "sel_qa_calib");
            let chunks = (r.max_map as u32).div_ceil(FLAT_CHUNK);
            Launch::new(
                r.stream,
                &r.f("sel_calib_before")?,
                (chunks, r.h as u32, r.nseq as u32),
                256,
                0,
            )
            .seqs_sel_p(&r.c)
            .arg(&r.mapb)
            .arg(&mut r.cal)
            .launch()?;
            crate::stats::profile::mark(r.stream, "sel_calib_before");
            Launch::new(
                r.stream,
                &r.f("sel_calib_finish")?,
                ((r.nseq * r.h) as u32, 1, 1),
                32,
                0,
            )
            .arg(&r.c.stats.descs)
            .arg(&r.c.p)
            .arg(&r.cal)
            .arg(&mut r.t_b)
            .arg(&mut r.flat_cut)
            .launch()?;
            crate::stats::profile::mark(r.stream, "sel_calib_finish");
            // The flattened cut, one 8-bit digit per (histogram, pick) pair of launches.
            let hist = r.f("sel_flat_hist")?;
            let pick = r.f("sel_flat_pick")?;
            for depth in 0..FLAT_FULL_DIGITS as i32 {
                Launch::new(r.stream, &hist, (chunks, r.h as u32, r.nseq as u32), 256, 0)
                    .seqs_sel_p(&r.c)
                    .arg(&r.mapb)
                    .arg(&r.flat_cut)
                    .arg(&depth)
                    .arg(&mut r.hist_cnt)
                    .arg(&mut r.hist_sum)
                    .launch()?;
                crate::stats::profile::mark(r.stream, "flat_hist");
                Launch::new(r.stream, &pick, ((r.nseq * r.h) as u32, 1, 1), 256, 0)
                    .arg(&depth)
                    .arg(&mut r.flat_cut)
                    .arg(&mut r.hist_cnt)
                    .arg(&mut r.hist_sum)
                    .arg(&mut r.kcut)
                    .launch()?;
                crate::stats::profile::mark(r.stream, "flat_pick");
            }
            // The remaining digits over the keys under the prefix only.
            Launch::new(
                r.stream,
                &r.f("sel_flat_compact")?,
                (chunks, r.h as u32, r.nseq as u32),
                256,
                0,
            )
            .seqs_sel_p(&r.c)
            .arg(&r.mapb)
            .arg(&r.flat_cut)
            .arg(&mut r.flat_list)
            .arg(&mut r.flat_len)
            .launch()?;
            Launch::new(r.stream, &r.f("sel_flat_finish")?, r.grid_heads(), 1024, 0)
                .seqs_sel_p(&r.c)
                .arg(&r.mapb)
                .arg(&r.flat_cut)
                .arg(&r.flat_list)
                .arg(&r.flat_len)
                .arg(&mut r.kcut)
                .launch()?;
            crate::stats::profile::mark(r.stream, "flat_finish");
        }
    }
    Ok(())
}

/// The query-aware heads' rows into the block mask.
pub(super) fn build(r: &mut Run<'_>) -> Result<()> {
    // SAFETY: argument lists match the kernels in kernels/select/query_aware_cut.cu and
    // query_aware_faithful.cu; every buffer is sized by the plan in `launch_select` for every index
    // the kernels compute.
    unsafe {
        if r.any_qa {
            Launch::new(r.stream, &r.f("sel_qa_flat_mark")?, r.grid_rows(), 64, 0)
                .rows(&r.c)
                .arg(&r.mapb)
                .arg(&r.kcut)
                .arg(&mut r.maskb)
                .launch()?;
            crate::stats::profile::mark(r.stream, "sel_qa_flat_mark");
            Launch::new(
                r.stream,
                &r.f("sel_qa_row")?,
                r.grid_rows(),
                256,
                r.row_smem,
            )
            .rows(&r.c)
            .arg(&r.mapb)
            .arg(&mut r.maskb)
            .launch()?;
            crate::stats::profile::mark(r.stream, "sel_qa_row");
            Launch::new(
                r.stream,
                &r.f("sel_qa_build")?,
                r.grid_rows(),
                128,
                4 * r.max_nkb.div_ceil(32),
            )
            .rows(&r.c)
            .arg(&r.mapb)
            .arg(&r.order_b)
            .arg(&r.run_b)
            .arg(&r.t_b)
            .arg(&r.kcut)
            .arg(&mut r.maskb)
            .launch()?;
            crate::stats::profile::mark(r.stream, "sel_qa_build");
            if r.faithful_qa {
                let tile = r.topup_tile as u32;
                Launch::new(
                    r.stream,
                    &r.f("sel_qa_topup")?,
                    r.grid_heads(),
                    TOPUP_THREADS as u32,
                    r.topup_smem,
                )
                .seqs_sel_p_pattern(&r.c)
                .arg(&r.mass_t)
                .arg(&r.col_sum)
                .arg(&tile)
                .arg(&mut r.maskb)
                .launch()?;
                crate::stats::profile::mark(r.stream, "sel_qa_topup");
            }
        }
    }
    Ok(())
}
