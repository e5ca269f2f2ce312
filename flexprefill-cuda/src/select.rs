//! Pattern search, block selection and index build on the GPU (`kernels/select/`).
//!
//! [`launch_select`] queues, after [`crate::stats::launch_stats`], every step of Algorithms 2–4
//! on the device and leaves a CSR block index there ([`DeviceSelection::index`], ready for the
//! attention kernel), with no host synchronisation: the pattern decision, the pooled lines, the
//! gamma cuts, the per-row raises and top-ups all run on the device, and the index lives in a
//! fixed-capacity buffer (every causal block) so its size never has to be read back.
//!
//! The rules are core's ([`flexprefill_core::selection`], both [`SelectionMode`]s, both
//! [`QueryAwareCut`]s), replayed so that the GPU selects the same blocks as
//! `selection::build_index` on the same statistics; `kernels/select/` says how each cut is found
//! without a full sort and where the sums are replayed in core's order.
//!
//! [`SelectionMode`]: flexprefill_core::SelectionMode
//! [`QueryAwareCut`]: flexprefill_core::QueryAwareCut

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DeviceRepr};
use flexprefill_core::{
    selection, AttentionInput, BlockIndex, FlexPrefillConfig, HeadReport, HeadStatistics, Pattern,
    QueryAwareCut, SelectionMode, SparsityReport, TensorRef,
};

use crate::attention::DeviceBlockIndex;
use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::registry::{KernelFamily, KernelKey};
use crate::stats::{launch_pool_q, launch_stats, DeviceStats, StatsElem, StatsLayout};
use crate::workspace::{Buf, Scratch};

mod decide;
mod index;
mod plan;
mod query_aware;
mod sampled;
mod vertical_slash;

pub(crate) use plan::select_key;
use plan::{params, Common, Run, SelPlan};

/// The selection kernel family, one NVRTC program: the shared `SeqDesc`, the selection
/// header, then one file per stage.
pub(crate) static SELECT: KernelFamily = KernelFamily {
    name: "select",
    source: concat!(
        include_str!("../kernels/seq_desc.cuh"),
        "\n",
        include_str!("../kernels/select/common.cuh"),
        "\n",
        include_str!("../kernels/select/decide.cu"),
        "\n",
        include_str!("../kernels/select/vertical_slash.cu"),
        "\n",
        include_str!("../kernels/select/query_aware_map.cu"),
        "\n",
        include_str!("../kernels/select/query_aware_cut.cu"),
        "\n",
        include_str!("../kernels/select/query_aware_faithful.cu"),
        "\n",
        include_str!("../kernels/select/sampled_cut.cu"),
        "\n",
        include_str!("../kernels/select/index.cu")
    ),
};

/// Map entries per CTA of the flattened cut's histogram kernel (`sel_flat_hist`).
const FLAT_CHUNK: u32 = 8192;
/// Query-block rows × key blocks of one `sel_qa_map` tile (its `QM_ROWS`, `QM_COLS`; the
/// kernel's warp layout is built for exactly these), its head-dimension chunk (`QM_TK`) and
/// its threads.
const QM_ROWS: usize = 64;
const QM_COLS: usize = 128;
const QM_TK: usize = 16;
const QM_THREADS: u32 = 128;
/// Rows per warp and warps per CTA of `sel_qa_softmax` (its `QS_ROWS`, `QS_WARPS`).
const QS_ROWS: usize = 4;
const QS_WARPS: usize = 4;
/// Digits of the flattened cut taken over the whole map before the rest runs on the keys
/// under the fixed prefix (`sel_flat_compact` / `sel_flat_finish`; their `FLAT_FULL_DIGITS`).
const FLAT_FULL_DIGITS: usize = 2;
/// Probe events per CTA of `sel_fvs_probe_events` (its `EV_PER_CTA`).
const EV_PER_CTA: usize = 64;
/// Key blocks per CTA of `sel_qa_topup_prep` (its `TOPUP_COLS`: one warp's row segment).
const TOPUP_COLS: usize = 32;
/// Threads of `sel_qa_topup` (its `TOPUP_THREADS`): one per representative row.
const TOPUP_THREADS: usize = 256;
/// Floats per staged tile of `sel_qa_topup`: its register prefetch holds at most
/// `TOPUP_PER · TOPUP_THREADS` = 32 · 256; a larger tile means fewer round trips per row.
const TOPUP_TILE: usize = 8192;
/// The smallest tile tried when shared memory is short: 4 key blocks of the largest
/// representative block (block_size ≤ 256 rows).
const TOPUP_MIN_TILE: usize = 1024;

/// Pattern codes written by `sel_decide`.
const PAT_QA: i32 = 1;
const PAT_DENSE: i32 = 2;

/// The index and the per-head decisions of one call, on the device.
#[derive(Debug)]
pub struct DeviceSelection {
    /// CSR index (capacity: every causal block; entries past the last offset are unused).
    pub index: DeviceBlockIndex,
    /// `[num_seqs · H]`: 0 vertical-slash, 1 query-aware, 2 dense.
    pub pattern: Buf<i32>,
    /// `[num_seqs · H]`: sqrt-JS distance of the decision (NaN for dense).
    pub js: Buf<f32>,
    /// Total CSR rows.
    pub rows: usize,
}

/// Queues selection and index build for the statistics in `stats` (same block size as
/// `cfg`). `q` (the queries the statistics came from) lets the pooled queries be computed for
/// the query-aware heads only; pass `None` when `stats.q_pooled` is already filled (uploaded
/// statistics). No host synchronisation.
pub fn launch_select<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    q: Option<&CudaSlice<T>>,
    stats: &mut DeviceStats,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceSelection> {
    launch_select_in(dev, stream, &mut Scratch::alloc(), q, stats, cfg)
}

/// [`launch_select`] with its buffers from `scratch` (a workspace's or fresh allocations).
pub(crate) fn launch_select_in<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    scratch: &mut Scratch<'_>,
    q: Option<&CudaSlice<T>>,
    stats: &mut DeviceStats,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceSelection> {
    cfg.validate()?;
    let layout = stats.layout.clone();
    if layout.block_size != cfg.block_size {
        return Err(CudaError::Unsupported {
            op: "select",
            message: format!(
                "statistics were computed for block_size {}, config has {}",
                layout.block_size, cfg.block_size
            ),
        });
    }
    let h = layout.shape.num_heads;
    let bs = cfg.block_size;
    let nseq = layout.seqs.len();
    let mut p = params(&layout, cfg);
    p.bf16_logits = stats.emulate as i32;

    let plan = SelPlan::new(&layout, cfg)?;
    let (max_nkb, max_rep) = (plan.max_nkb, plan.max_rep);
    let total_rows = plan.rows * h;
    let any_qa = cfg.tau > 0.0;
    let nkb_all = layout.total_key_blocks() * h;
    let qb_all = layout.total_query_blocks();

    let qb_seq: Vec<u32> = layout
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| std::iter::repeat_n(si as u32, s.num_query_blocks(bs)))
        .collect();

    let key = select_key();
    let max_smem = dev.info().max_smem_per_block;
    let n2 = max_nkb.next_power_of_two();
    let sort_smem = 12 * n2;
    // The registry raises a function's dynamic-smem limit once, at first use, so ask for the
    // most any launch may need; the limit must leave room for the kernel's static shared
    // memory (a few KiB at most here), or the driver refuses it.
    let dyn_limit = max_smem - 8 * 1024;
    // The top-up stages `topup_tile` floats per tile, two tiles aliasing the sort keys, then
    // the ranking and one mask row (kernels/select/query_aware_faithful.cu, sel_qa_topup);
    // smaller tiles where shared memory is short (a tile holds at least one key block's
    // representative rows).
    let topup_bytes = |tile: usize| (8 * n2).max(8 * tile) + 4 * n2 + 4 * max_nkb.div_ceil(32);
    let mut topup_tile = TOPUP_TILE;
    while topup_tile > TOPUP_MIN_TILE && topup_bytes(topup_tile) > dyn_limit {
        topup_tile /= 2;
    }
    let topup_smem = topup_bytes(topup_tile);
    // sel_qa_topup runs one thread per representative row (rep ≤ block_size ≤ 256, which
    // the config's validation guarantees).
    if max_rep > TOPUP_THREADS {
        return Err(CudaError::Unsupported {
            op: "select",
            message: format!(
                "{max_rep} representative rows exceed the top-up's {TOPUP_THREADS} threads"
            ),
        });
    }
    let row_smem = 16 * n2 + 4 * max_nkb.div_ceil(32);
    if topup_smem > max_smem {
        return Err(CudaError::Unsupported {
            op: "select",
            message: format!("{max_nkb} key blocks per sequence need {topup_smem} bytes of shared memory to rank (device: {max_smem}); use a larger block_size"),
        });
    }
    if topup_smem.max(row_smem) > dyn_limit {
        return Err(CudaError::Unsupported {
            op: "select",
            message: format!("{max_nkb} key blocks per sequence need {topup_smem} bytes of shared memory to rank (device: {dyn_limit}); use a larger block_size"),
        });
    }
    // Query-aware map tiles (QM_ROWS query-block rows × QM_COLS key blocks of one sequence)
    // that touch the causal region: the whole tiles first, then those the diagonal crosses
    // (lighter: their warps above the diagonal only stage), so the tail of the launch is short.
    let map_smem = 2 * (QM_ROWS + QM_COLS) * (QM_TK + 1) * 8;
    let (mut tiles, mut diagonal_tiles): (Vec<[u32; 4]>, Vec<[u32; 4]>) = (Vec::new(), Vec::new());
    for (si, s) in layout.seqs.iter().enumerate() {
        let nqb = s.num_query_blocks(bs);
        for r0 in (0..nqb).step_by(QM_ROWS) {
            let r1 = (r0 + QM_ROWS).min(nqb) - 1;
            let (whole, reach) = (s.causal_key_blocks(r0, bs), s.causal_key_blocks(r1, bs));
            for c0 in (0..reach).step_by(QM_COLS) {
                let t = [si as u32, r0 as u32, c0 as u32, 0];
                if c0 + QM_COLS <= whole {
                    tiles.push(t);
                } else {
                    diagonal_tiles.push(t);
                }
            }
        }
    }
    tiles.append(&mut diagonal_tiles);
    let map_grid = (
        u32::try_from(tiles.len() * h).map_err(|_| CudaError::Unsupported {
            op: "select",
            message: format!("{} pooled-map tiles do not fit one launch", tiles.len() * h),
        })?,
        1,
        1,
    );
    let faithful_qa = any_qa && cfg.selection == SelectionMode::Faithful;
    let probes = layout.probes && cfg.selection == SelectionMode::Faithful;
    // Sizes of the buffers only some heads or modes use (one element otherwise): the pooled
    // map and the flattened cut's list (query-aware), the faithful rows in rank order with
    // running masses (map layout), the top-up's transposed representative masses
    // (rep_block_mass's layout), the probe events of the vertical-slash stop (PROBE_QUERIES
    // slots per key block) and the calibration's candidates (the same layout).
    let (heads, map_len) = (nseq * h, if any_qa { plan.map * h } else { 1 });
    let qa_len = if faithful_qa { plan.map * h } else { 1 };
    let topup_len = if faithful_qa { plan.rep_mass * h } else { 1 };
    let ev_len = if probes {
        nkb_all * selection::PROBE_QUERIES
    } else {
        1
    };
    let cand_len = if faithful_qa && probes { ev_len } else { 1 };
    // SAFETY (every `take`): each buffer is written by a kernel before any kernel reads it,
    // for exactly the heads whose consumers read it (the same pattern test on both sides):
    // pattern/js/vpool/spool by sel_pool_lines and sel_decide; vkey/probe_tot by
    // sel_fvs_prep, kstar by sel_fvs_stop, colsel/dist_prefix/diag_hit by sel_fvs_lines or
    // sel_ovs (offsel), ev_key/ev_w by sel_fvs_probe_events (every slot sel_fvs_stop reads,
    // only with probes); map by sel_qa_map, order_b/run_b by sel_qa_sort, t_b/cand_key/cand_w
    // by sel_qa_calib, flat_cut by sel_flat_init, kcut by sel_flat_pick, flat_list up to the
    // length sel_flat_compact wrote (read only that far); mass_t/col_sum by
    // sel_qa_topup_prep; mask by sel_extend; counts/offsets/cols by the compaction. `zeros`
    // buffers are read before written (cal, the digit histograms cleared again by each
    // sel_flat_pick, flat_len).
    let mut r = Run {
        dev,
        stream,
        cfg,
        key,
        dyn_limit,
        c: Common {
            sel_d: scratch.upload(stream, &plan.sel)?,
            qb_seq_d: scratch.upload(stream, &qb_seq)?,
            pattern: unsafe { scratch.take::<i32>(stream, heads) }?,
            stats,
            p,
            qb_all_u: qb_all as u32,
        },
        vpool: unsafe { scratch.take::<f32>(stream, nkb_all) }?,
        spool: unsafe { scratch.take::<f32>(stream, nkb_all) }?,
        js: unsafe { scratch.take::<f32>(stream, heads) }?,
        vkey: unsafe { scratch.take::<u64>(stream, nkb_all) }?,
        kstar: unsafe { scratch.take::<u64>(stream, heads) }?,
        colsel: unsafe { scratch.take::<u8>(stream, nkb_all) }?,
        offsel: unsafe { scratch.take::<u8>(stream, nkb_all) }?,
        dist_prefix: unsafe { scratch.take::<u32>(stream, plan.dist * h) }?,
        mapb: unsafe { scratch.take::<f32>(stream, map_len) }?,
        maskb: unsafe { scratch.take::<u32>(stream, plan.mask * h) }?,
        counts: unsafe { scratch.take::<u32>(stream, total_rows) }?,
        offsets: unsafe { scratch.take::<u32>(stream, total_rows + 1) }?,
        cols: unsafe { scratch.take::<u32>(stream, plan.causal * h) }?,
        tiles_d: scratch.upload(stream, &tiles.concat())?,
        kcut: unsafe { scratch.take::<u64>(stream, heads) }?,
        order_b: unsafe { scratch.take::<u32>(stream, qa_len) }?,
        run_b: unsafe { scratch.take::<f64>(stream, qa_len) }?,
        t_b: unsafe { scratch.take::<f64>(stream, heads) }?,
        mass_t: unsafe { scratch.take::<f32>(stream, topup_len) }?,
        col_sum: unsafe { scratch.take::<f32>(stream, topup_len) }?,
        ev_key: unsafe { scratch.take::<u64>(stream, ev_len) }?,
        ev_w: unsafe { scratch.take::<f64>(stream, ev_len) }?,
        cand_key: unsafe { scratch.take::<u64>(stream, cand_len) }?,
        cand_w: unsafe { scratch.take::<f64>(stream, cand_len) }?,
        flat_cut: unsafe { scratch.take::<u64>(stream, 6 * heads) }?,
        cal: scratch.zeros::<u64>(stream, 4 * heads)?,
        probe_tot: unsafe { scratch.take::<f64>(stream, heads * selection::PROBE_QUERIES) }?,
        hist_cnt: scratch.zeros::<u32>(stream, if any_qa { 256 * heads } else { 1 })?,
        hist_sum: scratch.zeros::<u64>(stream, if any_qa { 256 * heads } else { 1 })?,
        flat_list: unsafe { scratch.take::<u32>(stream, map_len) }?,
        flat_len: scratch.zeros::<u32>(stream, heads)?,
        // sel_fvs_lines' distance test per (r - c) for sel_extend: nkb + 1 entries per
        // (sequence, head).
        diag_hit: unsafe { scratch.take::<u8>(stream, (layout.total_key_blocks() + nseq) * h) }?,
        probes_i: probes as i32,
        h,
        nseq,
        bs,
        qb_all,
        max_nkb,
        max_map: plan.max_map,
        total_rows,
        any_qa,
        faithful_qa,
        probes,
        sort_smem,
        row_smem,
        map_smem,
        map_grid,
        topup_tile,
        topup_smem,
    };
    decide::launch(&mut r)?;
    if cfg.selection == SelectionMode::Sampled {
        // The pattern is decided for the report as in the other modes; the blocks are every
        // query block's own cut.
        sampled::launch(&mut r)?;
    } else {
        modes_select(&mut r, q, scratch)?;
    }
    index::launch(&mut r)?;
    let Run {
        c: Common { pattern, .. },
        js,
        offsets,
        cols,
        ..
    } = r;
    Ok(DeviceSelection {
        index: DeviceBlockIndex {
            block_size: bs,
            num_heads: h,
            head_row_start: scratch.upload(stream, &plan.head_row_start)?,
            row_offsets: offsets,
            col_indices: cols,
        },
        pattern,
        js,
        rows: total_rows,
    })
}

/// The faithful and original modes' selection into the block mask: the pooled queries of the
/// query-aware heads, the vertical-slash chain beside the query-aware one, then every head's
/// rows into the mask.
fn modes_select<T: StatsElem>(
    r: &mut Run<'_>,
    q: Option<&CudaSlice<T>>,
    scratch: &mut Scratch<'_>,
) -> Result<()> {
    let (dev, stream) = (r.dev, r.stream);
    if let Some(q) = q {
        if r.any_qa {
            launch_pool_q(dev, stream, q, r.c.stats, Some(&r.c.pattern))?;
        }
    }
    // The vertical-slash heads' chain (and the prep it shares with the calibration: column
    // keys, probe totals) runs beside the query-aware one (each uses a few CTAs per head);
    // cudarc's event tracking orders the shared buffers, both join before the mask.
    let side = scratch.side(stream)?;
    vertical_slash::launch(r, &side)?;
    query_aware::topup_prep(r, &side)?;
    query_aware::map_and_cut(r)?;
    stream.join(&side)?;
    crate::stats::profile::mark(stream, "sel_vs_join");
    vertical_slash::extend(r)?;
    query_aware::build(r)?;
    Ok(())
}

pub use crate::call::{
    flex_prefill_device, flex_prefill_device_with, DeviceRun, MIN_SPARSE_KV_LEN,
};

/// Refuses, before any device work, sizes the selection kernels cannot address (32-bit
/// offsets, launch-grid limits): the whole call checks this before its statistics launch.
pub(crate) fn check_sizes(layout: &StatsLayout, cfg: &FlexPrefillConfig) -> Result<()> {
    SelPlan::new(layout, cfg).map(|_| ())
}

/// Host-facing selection: statistics and selection on the device, index and reports back.
pub(crate) fn select_index(
    dev: &CudaDevice,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> Result<(BlockIndex, SparsityReport)> {
    cfg.validate()?;
    x.validate()?;
    let stream = dev.stream();
    let layout = StatsLayout::for_mode(&x.seqs, x.shape, cfg)?;
    let (scale, emulate) = crate::stats::estimation_scale(x.shape, x.scale(), x.dtype(), cfg);
    SelPlan::new(&layout, cfg)?;
    #[allow(clippy::too_many_arguments)]
    fn run<T: StatsElem + cudarc::driver::ValidAsZeroBits>(
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        q: &[T],
        k: &[T],
        layout: StatsLayout,
        scale: f32,
        emulate: bool,
        cfg: &FlexPrefillConfig,
    ) -> Result<(BlockIndex, Vec<HeadReport>)> {
        let (qd, kd) = (stream.clone_htod(q)?, stream.clone_htod(k)?);
        let t0 = std::time::Instant::now();
        let mut st = launch_stats(dev, stream, &qd, &kd, layout.clone(), scale, emulate)?;
        let sel = launch_select(dev, stream, Some(&qd), &mut st, cfg)?;
        let host_stats = st.to_host(stream)?;
        let _ = t0;
        sel.to_host(stream, &layout, Some(&host_stats))
    }
    let t0 = std::time::Instant::now();
    let (index, heads) = match (x.q, x.k) {
        (TensorRef::BF16(q), TensorRef::BF16(k)) => {
            run(dev, stream, q, k, layout, scale, emulate, cfg)?
        }
        (TensorRef::F16(q), TensorRef::F16(k)) => {
            run(dev, stream, q, k, layout, scale, emulate, cfg)?
        }
        (TensorRef::F32(q), TensorRef::F32(k)) => {
            let cv = |t: &[f32]| {
                t.iter()
                    .map(|&a| half::bf16::from_f32(a))
                    .collect::<Vec<_>>()
            };
            run(dev, stream, &cv(q), &cv(k), layout, scale, false, cfg)?
        }
        _ => return Err(crate::backend::dtype_error(x)),
    };
    let dense_fallback = x
        .seqs
        .iter()
        .map(|s| selection::dense_fallback(s, cfg))
        .collect::<Option<Vec<_>>>()
        .and_then(|r| r.into_iter().next());
    let mut report = SparsityReport::new(heads, dense_fallback);
    report.timings.index_build = Some(t0.elapsed());
    Ok((index, report))
}

#[cfg(test)]
mod tests;
