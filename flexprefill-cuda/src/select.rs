//! Pattern search, block selection and index build on the GPU (`kernels/select.cu`).
//!
//! [`launch_select`] queues, after [`crate::stats::launch_stats`], every step of Algorithms 2–4
//! on the device and leaves a CSR block index there ([`DeviceSelection::index`], ready for the
//! attention kernel), with no host synchronisation: the pattern decision, the pooled lines, the
//! gamma cuts, the per-row raises and top-ups all run on the device, and the index lives in a
//! fixed-capacity buffer (every causal block) so its size never has to be read back.
//!
//! The rules are core's ([`flexprefill_core::selection`], both [`SelectionMode`]s, both
//! [`QueryAwareCut`]s), replayed so that the GPU selects the same blocks as
//! `selection::build_index` on the same statistics; `select.cu` says how each cut is found
//! without a full sort and where the sums are replayed in core's order.
//!
//! [`SelectionMode`]: flexprefill_core::SelectionMode
//! [`QueryAwareCut`]: flexprefill_core::QueryAwareCut

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, PushKernelArg};
use flexprefill_core::{
    selection, AttentionInput, BlockIndex, FlexPrefillConfig, HeadReport, HeadStatistics, Pattern,
    QueryAwareCut, SelectionMode, SparsityReport, TensorRef,
};

use crate::attention::DeviceBlockIndex;
use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::registry::{KernelFamily, KernelKey};
use crate::stats::{launch_pool_q, launch_stats, DeviceStats, StatsElem, StatsLayout};

/// The selection kernel family.
pub static SELECT: KernelFamily = KernelFamily {
    name: "select",
    source: include_str!("../kernels/select.cu"),
};

/// Per-sequence offsets of the selection buffers. Must match `SelSeq` in select.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SelSeq {
    words: u32,
    mask_off: u32,
    map_off: u32,
    row_off: u32,
    dist_off: u32,
    dense: u32,
    pad: [u32; 2],
}
// SAFETY: plain old data, laid out as the kernel's struct.
unsafe impl DeviceRepr for SelSeq {}

/// The configuration as the kernels read it. Must match `SelParams` in select.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SelParams {
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    block_size: i32,
    gamma: f32,
    tau: f32,
    original: i32,
    per_row: i32,
    sink: i32,
    diagonal: i32,
    mb: i32,
    cap: i32,
    bf16_logits: i32,
    pad: i32,
    gamma_py: f64,
}
// SAFETY: plain old data (13 i32/f32, one pad, one f64 at offset 56), as the kernel's struct.
unsafe impl DeviceRepr for SelParams {}

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
    pub pattern: CudaSlice<i32>,
    /// `[num_seqs · H]`: sqrt-JS distance of the decision (NaN for dense).
    pub js: CudaSlice<f32>,
    /// Total CSR rows.
    pub rows: usize,
}

/// The original's gamma as the Python float a caller wrote (core's `python_float`).
fn python_float(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

fn params(layout: &StatsLayout, cfg: &FlexPrefillConfig) -> SelParams {
    let s = layout.shape;
    SelParams {
        num_heads: s.num_heads as i32,
        num_kv_heads: s.num_kv_heads as i32,
        head_dim: s.head_dim as i32,
        block_size: cfg.block_size as i32,
        gamma: cfg.gamma,
        tau: cfg.tau,
        original: (cfg.selection == SelectionMode::Original) as i32,
        per_row: (cfg.query_aware_cut == QueryAwareCut::PerQueryBlock) as i32,
        sink: cfg.forced.sink as i32,
        diagonal: cfg.forced.diagonal as i32,
        mb: cfg.min_budget_blocks() as i32,
        cap: cfg.max_budget_blocks().map_or(0, |m| m as i32),
        bf16_logits: 0,
        pad: 0,
        gamma_py: python_float(cfg.gamma),
    }
}

/// The selection module's key: the constants the kernels and the host must agree on.
fn select_key() -> KernelKey {
    KernelKey::new(&SELECT, None, 0, 0)
        .define("PROBE_QUERIES", selection::PROBE_QUERIES as i64)
        .define("FLAT_CHUNK", FLAT_CHUNK as i64)
        .define("EV_PER_CTA", EV_PER_CTA as i64)
        .define("QM_COLS", QM_COLS as i64)
        .define("FLAT_FULL_DIGITS", FLAT_FULL_DIGITS as i64)
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

    // Host-side plan of the selection buffers (lengths only).
    let mut sel = Vec::with_capacity(nseq);
    let (mut mask, mut map, mut rows, mut dist, mut causal) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut max_nkb, mut max_rep, mut max_map) = (1usize, 1usize, 1usize);
    // rep_block_mass per head (Σ rep·nkb), the top-up's scratch layout
    let mut rep_mass = 0usize;
    let mut head_row_start = vec![0u32];
    for (si, s) in layout.seqs.iter().enumerate() {
        let (nqb, nkb) = (s.num_query_blocks(bs), s.num_key_blocks(bs));
        let words = nkb.div_ceil(32);
        let u = |n: usize| -> Result<u32> {
            u32::try_from(n).map_err(|_| CudaError::Unsupported {
                op: "select",
                message: format!("buffer offset {n} does not fit u32"),
            })
        };
        sel.push(SelSeq {
            words: u(words)?,
            mask_off: u(mask)?,
            map_off: u(map)?,
            row_off: u(rows)?,
            dist_off: u(dist)?,
            dense: selection::dense_fallback(s, cfg).is_some() as u32,
            pad: [0; 2],
        });
        mask += nqb * words;
        map += nqb * nkb;
        rows += nqb;
        dist += s.kv_len + 1;
        causal += s.total_causal_blocks(bs);
        max_nkb = max_nkb.max(nkb);
        max_map = max_map.max(nqb * nkb);
        max_rep = max_rep.max(layout.num_rep(si));
        rep_mass += layout.num_rep(si) * nkb;
        for _ in 0..h {
            let last = *head_row_start.last().expect("starts with 0");
            head_row_start.push(u(last as usize + nqb)?);
        }
    }
    u32::try_from(map * h).map_err(|_| CudaError::Unsupported {
        op: "select",
        message: format!(
            "pooled map of {} entries does not fit u32 indexing",
            map * h
        ),
    })?;
    let total_rows = rows * h;
    let any_qa = cfg.tau > 0.0;
    let nkb_all = layout.total_key_blocks() * h;
    let qb_all = layout.total_query_blocks();

    let sel_d = stream.clone_htod(&sel)?;
    let qb_seq: Vec<u32> = layout
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| std::iter::repeat_n(si as u32, s.num_query_blocks(bs)))
        .collect();
    let qb_seq_d = stream.clone_htod(&qb_seq)?;
    // SAFETY (allocations): each buffer is written by a kernel before any kernel reads it
    // (vpool/spool/pattern/js by sel_decide, vkey/kstar/colsel/dist by the mode's own kernels
    // for exactly the heads that later read them, mask by sel_extend, map by sel_qa_map for
    // query-aware heads, counts/offsets/cols by the compaction).
    let (
        mut vpool,
        mut spool,
        mut pattern,
        mut js,
        mut vkey,
        mut kstar,
        mut colsel,
        mut offsel,
        mut dist_prefix,
        mut mapb,
        mut maskb,
        mut counts,
        mut offsets,
        mut cols,
    ) = unsafe {
        (
            stream.alloc::<f32>(nkb_all.max(1))?,
            stream.alloc::<f32>(nkb_all.max(1))?,
            stream.alloc::<i32>((nseq * h).max(1))?,
            stream.alloc::<f32>((nseq * h).max(1))?,
            stream.alloc::<u64>(nkb_all.max(1))?,
            stream.alloc::<u64>((nseq * h).max(1))?,
            stream.alloc::<u8>(nkb_all.max(1))?,
            stream.alloc::<u8>(nkb_all.max(1))?,
            stream.alloc::<u32>((dist * h).max(1))?,
            stream.alloc::<f32>(if any_qa { (map * h).max(1) } else { 1 })?,
            stream.alloc::<u32>((mask * h).max(1))?,
            stream.alloc::<u32>(total_rows.max(1))?,
            stream.alloc::<u32>(total_rows + 1)?,
            stream.alloc::<u32>((causal * h).max(1))?,
        )
    };

    let key = select_key();
    let max_smem = dev.info().max_smem_per_block;
    let n2 = max_nkb.next_power_of_two();
    let sort_smem = 12 * n2;
    // The registry raises a function's dynamic-smem limit once, at first use, so ask for the
    // most any launch may need; the limit must leave room for the kernel's static shared
    // memory (a few KiB at most here), or the driver refuses it.
    let dyn_limit = max_smem - 8 * 1024;
    // The top-up stages `topup_tile` floats per tile, two tiles aliasing the sort keys, then
    // the ranking and one mask row (select.cu sel_qa_topup); smaller tiles where shared
    // memory is short (a tile holds at least one key block's representative rows).
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
    let tiles_d = stream.clone_htod(&tiles.concat())?;
    let qb_all_u = qb_all as u32;
    // SAFETY: written by sel_flat_pick for every flattened query-aware head before
    // sel_qa_flat_mark / sel_qa_build read it (no other head reads it).
    let mut kcut = unsafe { stream.alloc::<u64>((nseq * h).max(1)) }?;
    // Faithful query-aware rows in rank order with running masses (map layout), the
    // calibrated targets, and the probe events of the vertical-slash stop (PROBE_QUERIES
    // slots per key block). SAFETY: each is written by its producer kernel for exactly the heads whose
    // consumers read it (same pattern test on both sides).
    let faithful_qa = any_qa && cfg.selection == SelectionMode::Faithful;
    let qa_len = if faithful_qa { (map * h).max(1) } else { 1 };
    let mut order_b = unsafe { stream.alloc::<u32>(qa_len) }?;
    let mut run_b = unsafe { stream.alloc::<f64>(qa_len) }?;
    let mut t_b = unsafe { stream.alloc::<f64>((nseq * h).max(1)) }?;
    // The top-up's transposed representative masses and column scores (rep_block_mass's
    // layout; sel_qa_topup_prep writes both for every faithful query-aware head, whose
    // sel_qa_topup alone reads them).
    let topup_len = if faithful_qa {
        (rep_mass * h).max(1)
    } else {
        1
    };
    let mut mass_t = unsafe { stream.alloc::<f32>(topup_len) }?;
    let mut col_sum = unsafe { stream.alloc::<f32>(topup_len) }?;
    let probes = layout.probes && cfg.selection == SelectionMode::Faithful;
    let probes_i = probes as i32;
    let ev_len = if probes {
        (nkb_all * selection::PROBE_QUERIES).max(1)
    } else {
        1
    };
    let mut ev_key = unsafe { stream.alloc::<u64>(ev_len) }?;
    let mut ev_w = unsafe { stream.alloc::<f64>(ev_len) }?;
    // The query-aware calibration's candidate entries (same layout as the probe events; written
    // by sel_qa_calib before it reads them), and the flattened cut's state (6 u64 per head,
    // sel_flat_init) and digit histograms (zeroed here, cleared again by each sel_flat_pick).
    let cand_len = if faithful_qa && probes { ev_len } else { 1 };
    let mut cand_key = unsafe { stream.alloc::<u64>(cand_len) }?;
    let mut cand_w = unsafe { stream.alloc::<f64>(cand_len) }?;
    let mut flat_cut = unsafe { stream.alloc::<u64>(6 * (nseq * h).max(1)) }?;
    let mut cal = stream.alloc_zeros::<u64>(4 * (nseq * h).max(1))?;
    // Each probe's total mass (sel_fvs_prep, for every faithful head with probes).
    let mut probe_tot =
        unsafe { stream.alloc::<f64>((nseq * h * selection::PROBE_QUERIES).max(1)) }?;
    let hist_len = if any_qa { 256 * nseq * h } else { 1 };
    let mut hist_cnt = stream.alloc_zeros::<u32>(hist_len)?;
    let mut hist_sum = stream.alloc_zeros::<u64>(hist_len)?;
    // The flattened cut's candidate list (map layout, written by sel_flat_compact up to
    // flat_len, read only that far) and its lengths (zeroed here).
    let mut flat_list = unsafe { stream.alloc::<u32>(if any_qa { (map * h).max(1) } else { 1 }) }?;
    let mut flat_len = stream.alloc_zeros::<u32>((nseq * h).max(1))?;
    // sel_fvs_lines' distance test per (r - c) for sel_extend: nkb + 1 entries per (sequence,
    // head). SAFETY: written by sel_fvs_lines for every faithful vertical-slash head, the only
    // heads whose extension reads it.
    let mut diag_hit =
        unsafe { stream.alloc::<u8>(((layout.total_key_blocks() + nseq) * h).max(1)) }?;
    let f = |name: &'static str| {
        let dynamic = matches!(
            name,
            "sel_fvs_stop"
                | "sel_pool_lines"
                | "sel_qa_map"
                | "sel_qa_row"
                | "sel_qa_topup"
                | "sel_qa_sort"
                | "sel_qa_build"
        );
        dev.function(&SELECT, &key, name, if dynamic { dyn_limit } else { 0 })
    };
    let grid_heads = (h as u32, nseq as u32, 1);
    let grid_rows = (qb_all as u32, h as u32, 1);
    let lc = crate::launch_cfg;

    // SAFETY (all launches): argument lists match the kernels in select.cu; buffers are sized
    // by the plan above for every index the kernels compute.
    unsafe {
        let pool_grid = (max_nkb.div_ceil(32) as u32, h as u32, nseq as u32);
        launch!(stream, f("sel_pool_lines")?, lc(pool_grid, 256, 2 * 32 * (bs + 1) * 4);
            &stats.descs, &p, &stats.vertical, &stats.slash, &mut vpool, &mut spool)?;
        launch!(stream, f("sel_decide")?, lc(grid_heads, 1024, 0);
            &stats.descs, &sel_d, &p, &stats.estimate, &vpool, &mut pattern, &mut js)?;
        crate::stats::profile::mark(stream, "sel_decide");
    }
    if let Some(q) = q {
        if any_qa {
            launch_pool_q(dev, stream, q, stats, Some(&pattern))?;
        }
    }
    unsafe {
        // The vertical-slash heads' chain (and the prep it shares with the calibration: column
        // keys, probe totals) runs beside the query-aware one (each uses a few CTAs per head);
        // cudarc's event tracking orders the shared buffers, both join before the mask.
        let side = stream.fork()?;
        launch!(side, f("sel_fvs_prep")?, lc(grid_heads, 512, 0);
            &stats.descs, &p, &pattern, &stats.vertical, &stats.probe_block_mass, &probes_i,
            &mut vkey, &mut probe_tot)?;
        if probes {
            let chunks = (selection::PROBE_QUERIES * max_nkb).div_ceil(EV_PER_CTA) as u32;
            let grid = (chunks, h as u32, nseq as u32);
            launch!(side, f("sel_fvs_probe_events")?, lc(grid, 256, 0);
                &stats.descs, &p, &pattern, &stats.slash, &stats.probe_block_mass, &vkey,
                &probe_tot, &mut ev_key, &mut ev_w)?;
        }
        launch!(side, f("sel_fvs_stop")?, lc(grid_heads, 512, sort_smem);
            &stats.descs, &p, &pattern, &stats.slash, &stats.rep_block_mass, &probes_i, &ev_key,
            &ev_w, &vkey, &mut kstar)?;
        launch!(side, f("sel_fvs_lines")?, lc(grid_heads, 1024, 0);
            &stats.descs, &sel_d, &p, &pattern, &stats.slash, &vkey, &kstar, &mut colsel,
            &mut dist_prefix, &mut diag_hit)?;
        launch!(side, f("sel_ovs")?, lc(grid_heads, 1024, 0);
            &stats.descs, &p, &pattern, &stats.vertical, &stats.slash, &vpool, &spool, &mut colsel,
            &mut offsel)?;
        if faithful_qa {
            // The top-up's prep needs only the statistics and the patterns: it runs here, off
            // the query-aware chain's path (no profile mark: the marks time the main stream).
            let grid = (max_nkb.div_ceil(TOPUP_COLS) as u32, h as u32, nseq as u32);
            launch!(side, f("sel_qa_topup_prep")?, lc(grid, 256, 0);
                &stats.descs, &p, &pattern, &stats.rep_block_mass, &mut mass_t, &mut col_sum)?;
        }
        if any_qa {
            launch!(stream, f("sel_qa_map")?, lc(map_grid, QM_THREADS, map_smem);
                &stats.descs, &sel_d, &tiles_d, &p, &pattern, &stats.q_pooled, &stats.k_pooled,
                &mut mapb)?;
            let softmax_grid = (qb_all.div_ceil(QS_ROWS * QS_WARPS) as u32, h as u32, 1);
            launch!(stream, f("sel_qa_softmax")?, lc(softmax_grid, 32 * QS_WARPS as u32, 0);
                &stats.descs, &sel_d, &qb_seq_d, &qb_all_u, &p, &pattern, &mut mapb)?;
            crate::stats::profile::mark(stream, "sel_qa_map");
            launch!(stream, f("sel_flat_init")?, lc(grid_heads, 32, 0);
                &stats.descs, &p, &pattern, &mut flat_cut)?;
            crate::stats::profile::mark(stream, "sel_flat_init");
            // Per-row cuts rank every row; the flattened calibration only the probe rows.
            let sort_grid = match (cfg.query_aware_cut, probes) {
                (QueryAwareCut::PerQueryBlock, _) => grid_rows,
                (QueryAwareCut::Flattened, true) => {
                    (selection::PROBE_QUERIES as u32, h as u32, nseq as u32)
                }
                (QueryAwareCut::Flattened, false) => (0, 0, 0),
            };
            if sort_grid.0 > 0 {
                launch!(stream, f("sel_qa_sort")?, lc(sort_grid, 256, sort_smem);
                    &stats.descs, &sel_d, &qb_seq_d, &p, &pattern, &mapb, &mut order_b,
                    &mut run_b)?;
            }
            crate::stats::profile::mark(stream, "sel_qa_sort");
            launch!(stream, f("sel_qa_calib")?, lc(grid_heads, 1024, 0);
                &stats.descs, &sel_d, &p, &pattern, &mapb, &order_b, &run_b,
                &stats.probe_block_mass, &probe_tot, &probes_i, &mut cand_key, &mut cand_w,
                &mut t_b, &mut flat_cut, &mut cal)?;
            crate::stats::profile::mark(stream, "sel_qa_calib");
            let chunks = (max_map as u32).div_ceil(FLAT_CHUNK);
            launch!(stream, f("sel_calib_before")?, lc((chunks, h as u32, nseq as u32), 256, 0);
                &stats.descs, &sel_d, &p, &mapb, &mut cal)?;
            crate::stats::profile::mark(stream, "sel_calib_before");
            launch!(stream, f("sel_calib_finish")?, lc(((nseq * h) as u32, 1, 1), 32, 0);
                &stats.descs, &p, &cal, &mut t_b, &mut flat_cut)?;
            crate::stats::profile::mark(stream, "sel_calib_finish");
            // The flattened cut, one 8-bit digit per (histogram, pick) pair of launches.
            let hist = f("sel_flat_hist")?;
            let pick = f("sel_flat_pick")?;
            for depth in 0..FLAT_FULL_DIGITS as i32 {
                launch!(stream, hist, lc((chunks, h as u32, nseq as u32), 256, 0);
                    &stats.descs, &sel_d, &p, &mapb, &flat_cut, &depth, &mut hist_cnt,
                    &mut hist_sum)?;
                crate::stats::profile::mark(stream, "flat_hist");
                launch!(stream, pick, lc(((nseq * h) as u32, 1, 1), 256, 0);
                    &depth, &mut flat_cut, &mut hist_cnt, &mut hist_sum, &mut kcut)?;
                crate::stats::profile::mark(stream, "flat_pick");
            }
            // The remaining digits over the keys under the prefix only.
            launch!(stream, f("sel_flat_compact")?, lc((chunks, h as u32, nseq as u32), 256, 0);
                &stats.descs, &sel_d, &p, &mapb, &flat_cut, &mut flat_list, &mut flat_len)?;
            launch!(stream, f("sel_flat_finish")?, lc(grid_heads, 1024, 0);
                &stats.descs, &sel_d, &p, &mapb, &flat_cut, &flat_list, &flat_len, &mut kcut)?;
            crate::stats::profile::mark(stream, "flat_finish");
        }
        stream.join(&side)?;
        crate::stats::profile::mark(stream, "sel_vs_join");
        let ext_grid = (qb_all.div_ceil(8) as u32, h as u32, 1);
        launch!(stream, f("sel_extend")?, lc(ext_grid, 256, 0);
            &stats.descs, &sel_d, &qb_seq_d, &qb_all_u, &p, &pattern, &colsel, &offsel, &dist_prefix,
            &diag_hit, &mut maskb)?;
        crate::stats::profile::mark(stream, "sel_extend");
        if any_qa {
            launch!(stream, f("sel_qa_flat_mark")?, lc(grid_rows, 64, 0);
                &stats.descs, &sel_d, &qb_seq_d, &p, &pattern, &mapb, &kcut, &mut maskb)?;
            crate::stats::profile::mark(stream, "sel_qa_flat_mark");
            launch!(stream, f("sel_qa_row")?, lc(grid_rows, 256, row_smem);
                &stats.descs, &sel_d, &qb_seq_d, &p, &pattern, &mapb, &mut maskb)?;
            crate::stats::profile::mark(stream, "sel_qa_row");
            launch!(stream, f("sel_qa_build")?, lc(grid_rows, 128, 4 * max_nkb.div_ceil(32));
                &stats.descs, &sel_d, &qb_seq_d, &p, &pattern, &mapb, &order_b, &run_b, &t_b,
                &kcut, &mut maskb)?;
            crate::stats::profile::mark(stream, "sel_qa_build");
            if faithful_qa {
                let tile = topup_tile as u32;
                launch!(stream, f("sel_qa_topup")?, lc(grid_heads, TOPUP_THREADS as u32, topup_smem);
                    &stats.descs, &sel_d, &p, &pattern, &mass_t, &col_sum, &tile, &mut maskb)?;
                crate::stats::profile::mark(stream, "sel_qa_topup");
            }
        }
        launch!(stream, f("sel_count")?, lc(ext_grid, 256, 0);
            &stats.descs, &sel_d, &qb_seq_d, &qb_all_u, &p, &maskb, &mut counts)?;
        crate::stats::profile::mark(stream, "sel_count");
        let rows_u = total_rows as u32;
        launch!(stream, f("sel_scan")?, lc((1, 1, 1), 1024, 0);
            &counts, &rows_u, &mut offsets)?;
        crate::stats::profile::mark(stream, "sel_scan");
        launch!(stream, f("sel_write")?, lc(grid_rows, 32, 0);
            &stats.descs, &sel_d, &qb_seq_d, &qb_all_u, &p, &maskb, &offsets, &mut cols)?;
        crate::stats::profile::mark(stream, "sel_write");
    }
    Ok(DeviceSelection {
        index: DeviceBlockIndex {
            block_size: bs,
            num_heads: h,
            head_row_start: stream.clone_htod(&head_row_start)?,
            row_offsets: offsets,
            col_indices: cols,
        },
        pattern,
        js,
        rows: total_rows,
    })
}

impl DeviceSelection {
    /// Downloads the index and the per-head decisions (synchronises). `stats` gives each
    /// head's exact representative mass for the report; pass `None` to leave it NaN.
    pub fn to_host(
        &self,
        stream: &Arc<CudaStream>,
        layout: &StatsLayout,
        stats: Option<&[HeadStatistics]>,
    ) -> Result<(BlockIndex, Vec<HeadReport>)> {
        let offsets = stream.clone_dtoh(&self.index.row_offsets)?;
        let pattern = stream.clone_dtoh(&self.pattern)?;
        let js = stream.clone_dtoh(&self.js)?;
        stream.synchronize()?;
        let nnz = offsets[self.rows] as usize;
        let mut cols = vec![0u32; nnz];
        if nnz > 0 {
            stream.memcpy_dtoh(&self.index.col_indices.slice(..nnz), &mut cols)?;
            stream.synchronize()?;
        }
        let h = layout.shape.num_heads;
        let bs = self.index.block_size;
        let mut heads = Vec::with_capacity(layout.seqs.len() * h);
        let mut reports = Vec::with_capacity(layout.seqs.len() * h);
        let mut row = 0usize;
        for (si, s) in layout.seqs.iter().enumerate() {
            let nqb = s.num_query_blocks(bs);
            let nkb = s.num_key_blocks(bs);
            let causal = s.total_causal_blocks(bs);
            for head in 0..h {
                let rows: Vec<Vec<u32>> = (row..row + nqb)
                    .map(|i| cols[offsets[i] as usize..offsets[i + 1] as usize].to_vec())
                    .collect();
                row += nqb;
                let selected: usize = rows.iter().map(Vec::len).sum();
                let pat = match pattern[si * h + head] {
                    PAT_QA => Pattern::QueryAware,
                    PAT_DENSE => Pattern::Dense,
                    _ => Pattern::VerticalSlash,
                };
                let mass = match (pat, stats) {
                    (Pattern::Dense, _) => 1.0,
                    (_, Some(st)) => {
                        mean_rep_mass(&st[si * h + head].rep_block_mass, nkb, s, bs, &rows)
                    }
                    _ => f32::NAN,
                };
                reports.push(HeadReport::new(
                    si,
                    head,
                    pat,
                    js[si * h + head],
                    selected,
                    causal,
                    mass,
                ));
                heads.push(rows);
            }
        }
        let index = BlockIndex::from_rows(&layout.seqs, h, bs, heads)?;
        Ok((index, reports))
    }
}

/// Mean over the representative queries of the exact captured mass (core's
/// `representative_mass`, f64 per query in ascending block order).
fn mean_rep_mass(
    m: &[f32],
    nkb: usize,
    s: &flexprefill_core::Sequence,
    bs: usize,
    rows: &[Vec<u32>],
) -> f32 {
    let rep = bs.min(s.q_len);
    if m.len() != rep * nkb || rep == 0 {
        return f32::NAN;
    }
    let mut total = 0f64;
    for i in 0..rep {
        let r = (s.q_len - rep + i) / bs;
        let row = &m[i * nkb..(i + 1) * nkb];
        total += rows[r].iter().map(|&c| row[c as usize] as f64).sum::<f64>() as f32 as f64;
    }
    (total / rep as f64) as f32
}

/// Uploads host statistics into device buffers laid out as `layout` (for running the device
/// selection on the CPU's statistics: the exact agreement test).
pub fn upload_stats(
    stream: &Arc<CudaStream>,
    layout: StatsLayout,
    stats: &[HeadStatistics],
    emulate: bool,
) -> Result<DeviceStats> {
    let h = layout.shape.num_heads;
    let hkv = layout.shape.num_kv_heads;
    let d = layout.shape.head_dim;
    let bs = layout.block_size;
    let seqs = layout.seqs.clone();
    if stats.len() != seqs.len() * h {
        return Err(flexprefill_core::Error::Shape(format!(
            "{} head statistics for {} sequences × {h} heads",
            stats.len(),
            seqs.len()
        ))
        .into());
    }
    let tot_tok: usize = seqs.iter().map(|s| s.kv_len).sum();
    let tot_kb = layout.total_key_blocks();
    let tot_qb = layout.total_query_blocks();
    let tot_rep: usize = (0..seqs.len())
        .map(|i| layout.num_rep(i) * seqs[i].num_key_blocks(bs))
        .sum();
    let mut vertical = vec![0f32; tot_tok * h];
    let mut slash = vec![0f32; tot_tok * h];
    let mut estimate = vec![0f32; tot_kb * h];
    let mut rbm = vec![0f32; tot_rep * h];
    let mut kp = vec![0f32; tot_kb * hkv * d];
    let mut qp = vec![0f32; tot_qb * h * d];
    let probes = stats.iter().any(|st| !st.probe_block_mass.is_empty());
    let layout = layout.with_probes(probes);
    let tot_probe: usize = (0..seqs.len())
        .map(|i| layout.num_probes(i) * seqs[i].num_key_blocks(bs))
        .sum();
    let mut pm = vec![0f32; tot_probe * h];
    for (si, s) in seqs.iter().enumerate() {
        let (nkb, nqb) = (s.num_key_blocks(bs), s.num_query_blocks(bs));
        for head in 0..h {
            let st = &stats[si * h + head];
            let lo = layout.line_offset(si, head);
            vertical[lo..lo + s.kv_len].copy_from_slice(&st.vertical);
            slash[lo..lo + s.kv_len].copy_from_slice(&st.slash);
            let eo = layout.estimate_offset(si, head);
            estimate[eo..eo + nkb].copy_from_slice(&st.estimate);
            let ro = layout.rep_offset(si, head);
            rbm[ro..ro + st.rep_block_mass.len()].copy_from_slice(&st.rep_block_mass);
            let ko = layout.k_pooled_offset(si, layout.shape.kv_head(head));
            kp[ko..ko + nkb * d].copy_from_slice(&st.k_pooled);
            let qo = layout.q_pooled_offset(si, head);
            qp[qo..qo + nqb * d].copy_from_slice(&st.q_pooled);
            if probes {
                let po = layout.probe_offset(si, head);
                pm[po..po + st.probe_block_mass.len()].copy_from_slice(&st.probe_block_mass);
            }
        }
    }
    DeviceStats::from_parts(
        stream,
        layout,
        [vertical, slash, estimate, rbm, kp, qp, pm],
        emulate,
    )
}

/// Below this many keys (every sequence of the batch) the whole device-resident call runs
/// dense: the pattern search and index build cost about half a dense attention at 8k on an H200 (0.66 ms
/// against 1.27 ms for 32 heads, d 128) and the sparse kernel needs a density under ~0.45 to
/// win back the rest, while at 32k they cost 3 ms against 19 ms. Measured in
/// docs/PERFORMANCE.md (bench_select).
pub const MIN_SPARSE_KV_LEN: usize = 16384;

/// The cheap, host-side decision of the whole call: `Some(reason)` when sparse attention cannot
/// pay off for this batch (every sequence shorter than [`MIN_SPARSE_KV_LEN`], or every sequence
/// a dense fallback of core's own rule), `None` to run pattern search, selection and sparse
/// attention. Reads lengths only: no device work, no sync.
pub fn sparse_pays_off(
    seqs: &[flexprefill_core::Sequence],
    cfg: &FlexPrefillConfig,
) -> Option<String> {
    if let Some(reasons) = seqs
        .iter()
        .map(|s| selection::dense_fallback(s, cfg))
        .collect::<Option<Vec<_>>>()
    {
        return reasons.into_iter().next();
    }
    let longest = seqs.iter().map(|s| s.kv_len).max().unwrap_or(0);
    (longest < MIN_SPARSE_KV_LEN).then(|| {
        format!(
            "kv_len {longest} < {MIN_SPARSE_KV_LEN}: on the GPU pattern search and index build cost more than sparsity saves here; computed dense"
        )
    })
}

/// What [`flex_prefill_device`] did.
#[derive(Debug)]
pub struct DeviceRun {
    /// The selection (None when the call ran dense).
    pub selection: Option<DeviceSelection>,
    /// Why the call ran dense, if it did (goes into the sparsity report).
    pub dense_reason: Option<String>,
}

/// The whole FlexPrefill call on device buffers, queued on `stream` with no host sync:
/// the cheap [`sparse_pays_off`] decision, then either the dense kernel, or statistics,
/// selection and block-sparse attention over the device index.
pub fn flex_prefill_device<T: StatsElem + crate::attention::DeviceElem>(
    backend: &crate::CudaBackend,
    stream: &Arc<CudaStream>,
    args: &crate::attention::AttentionArgs<'_, T>,
    cfg: &FlexPrefillConfig,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<DeviceRun> {
    cfg.validate()?;
    let seqs = args.seqs.seqs();
    if let Some(reason) = sparse_pays_off(seqs, cfg) {
        backend.attention_device(stream, args, None, None, out, lse)?;
        return Ok(DeviceRun {
            selection: None,
            dense_reason: Some(reason),
        });
    }
    let dev = backend.device();
    let layout = StatsLayout::new(seqs, args.shape, cfg.block_size)?
        .with_probes(cfg.selection == SelectionMode::Faithful);
    let scale = args
        .softmax_scale
        .unwrap_or(1.0 / (args.shape.head_dim as f32).sqrt());
    let (scale, emulate) =
        crate::stats::estimation_scale(args.shape, scale, <T as StatsElem>::DTYPE, cfg);
    let mut st = launch_stats(dev, stream, args.q, args.k, layout, scale, emulate)?;
    let sel = launch_select(dev, stream, Some(args.q), &mut st, cfg)?;
    backend.attention_device(stream, args, Some(&sel.index), None, out, lse)?;
    Ok(DeviceRun {
        selection: Some(sel),
        dense_reason: None,
    })
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
    let layout = StatsLayout::new(&x.seqs, x.shape, cfg.block_size)?
        .with_probes(cfg.selection == SelectionMode::Faithful);
    let (scale, emulate) = crate::stats::estimation_scale(x.shape, x.scale(), x.dtype(), cfg);
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
        _ => {
            return Err(flexprefill_core::Error::DType {
                q: x.q.dtype().name(),
                k: x.k.dtype().name(),
                v: x.v.dtype().name(),
            }
            .into())
        }
    };
    let dense_fallback = x
        .seqs
        .iter()
        .map(|s| selection::dense_fallback(s, cfg))
        .collect::<Option<Vec<_>>>()
        .and_then(|r| r.into_iter().next());
    let mut report = SparsityReport::new(heads, dense_fallback);
    report.timings.index_build = t0.elapsed();
    Ok((index, report))
}

#[cfg(test)]
mod tests {
    //! GPU tests (ignored without a GPU). The exact test feeds the CPU's statistics to the
    //! device selection, so both paths see identical numbers and must pick identical blocks;
    //! the end-to-end test runs everything on the device and counts disagreements.

    use super::*;
    use crate::stats::tests::{device, ragged, seed, workload};
    use flexprefill_core::{Backend, DType, ForcedBlocks};
    use flexprefill_cpu::CpuBackend;
    use flexprefill_testkit::owned::OwnedInput;
    use flexprefill_testkit::workload::WorkloadKind;

    fn configs() -> Vec<(&'static str, FlexPrefillConfig)> {
        let f = FlexPrefillConfig::default().with_min_budget(256);
        let o = FlexPrefillConfig::original().with_min_budget(256);
        vec![
            ("faithful", f),
            ("faithful tau 0.4", f.with_tau(0.4)),
            (
                "faithful per-row tau 0.4",
                f.with_tau(0.4)
                    .with_query_aware_cut(QueryAwareCut::PerQueryBlock),
            ),
            (
                "faithful gamma 0.95 bs 64",
                f.with_gamma(0.95).with_block_size(64),
            ),
            ("original", o),
            ("original tau 0.4", o.with_tau(0.4)),
            (
                "original per-row tau 0.4 max budget",
                o.with_tau(0.4)
                    .with_query_aware_cut(QueryAwareCut::PerQueryBlock)
                    .with_max_budget(Some(512)),
            ),
            (
                "original gamma 0.8 bs 64",
                o.with_gamma(0.8).with_block_size(64),
            ),
        ]
    }

    fn inputs(seed: u64) -> Vec<(&'static str, OwnedInput)> {
        let long = workload(WorkloadKind::Mixed, 3000, 8, 2, 128, seed + 10);
        vec![
            (
                "mixed 4096",
                workload(WorkloadKind::Mixed, 4096, 8, 2, 128, seed).to_dtype(DType::BF16),
            ),
            (
                "topics 3000",
                workload(WorkloadKind::Topics, 3000, 4, 2, 128, seed + 1).to_dtype(DType::BF16),
            ),
            (
                "stripes 2500 f16",
                workload(WorkloadKind::Stripes, 2500, 4, 1, 64, seed + 2).to_dtype(DType::F16),
            ),
            (
                "random 2048",
                workload(WorkloadKind::Random, 2048, 4, 2, 128, seed + 3).to_dtype(DType::BF16),
            ),
            (
                "needle 3333",
                workload(WorkloadKind::Needle, 3333, 4, 2, 128, seed + 4).to_dtype(DType::BF16),
            ),
            (
                "chunk 2200..3000",
                long.chunk(2200, 3000).expect("chunk").to_dtype(DType::BF16),
            ),
            ("ragged 900 + 2100 + 300", {
                let a = ragged(
                    &workload(WorkloadKind::SinkLocal, 900, 8, 2, 128, seed + 5),
                    &workload(WorkloadKind::Topics, 2100, 8, 2, 128, seed + 6),
                );
                ragged(
                    &a,
                    &workload(WorkloadKind::Stripes, 300, 8, 2, 128, seed + 7),
                )
                .to_dtype(DType::BF16)
            }),
        ]
    }

    fn diff_heads(a: &BlockIndex, b: &BlockIndex) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for s in 0..a.seqs().len() {
            for h in 0..a.num_heads() {
                let nqb = a.seqs()[s].num_query_blocks(a.block_size());
                if (0..nqb).any(|r| a.row(s, h, r) != b.row(s, h, r)) {
                    out.push((s, h));
                }
            }
        }
        out
    }

    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so)"]
    fn stats_and_select_kernels_compile() {
        use crate::registry::compile_offline;
        for arch in [(9, 0), (8, 0)] {
            let key = select_key();
            compile_offline(&SELECT, &key, arch)
                .unwrap_or_else(|e| panic!("select sm{arch:?}: {e}"));
            for dtype in [DType::BF16, DType::F16] {
                for d in [64, 128, 256] {
                    let key = KernelKey::new(&crate::stats::STATS, Some(dtype), d, 0)
                        .define("PROBE_QUERIES", selection::PROBE_QUERIES as i64)
                        .define("FLAT_CHUNK", FLAT_CHUNK as i64)
                        .define("EV_PER_CTA", EV_PER_CTA as i64)
                        .define("QM_COLS", QM_COLS as i64)
                        .define("FLAT_FULL_DIGITS", FLAT_FULL_DIGITS as i64);
                    compile_offline(&crate::stats::STATS, &key, arch)
                        .unwrap_or_else(|e| panic!("stats {dtype} d{d} sm{arch:?}: {e}"));
                }
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn device_selection_equals_core_on_the_same_statistics() {
        let dev = device();
        let stream = dev.stream().clone();
        let cpu = CpuBackend::new();
        let seed = seed();
        let mut checked = 0;
        let mut qa_heads = 0;
        for (what, owned) in inputs(seed) {
            let x = owned.input().expect("input");
            for (cname, cfg) in configs() {
                let stats = cpu.head_statistics(&x, &cfg).expect("cpu stats");
                let (want, want_rep) =
                    selection::build_index(&x.seqs, x.shape, &cfg, &stats).expect("core");
                want.validate(cfg.forced).expect("core index valid");
                let layout = StatsLayout::new(&x.seqs, x.shape, cfg.block_size).expect("layout");
                let emulate = stats.first().is_some_and(|s| s.bf16_pooled_logits);
                let mut dst =
                    upload_stats(&stream, layout.clone(), &stats, emulate).expect("upload");
                let sel = launch_select::<half::bf16>(&dev, &stream, None, &mut dst, &cfg)
                    .expect("select");
                let (got, got_rep) = sel
                    .to_host(&stream, &layout, Some(&stats))
                    .expect("download");
                got.validate(cfg.forced).expect("device index valid");
                for (g, w) in got_rep.iter().zip(&want_rep) {
                    assert_eq!(
                        g.pattern, w.pattern,
                        "{what} / {cname}: seq {} head {} pattern (js gpu {} cpu {})",
                        g.seq, g.head, g.js_distance, w.js_distance
                    );
                    qa_heads += (g.pattern == Pattern::QueryAware) as usize;
                }
                let bad = diff_heads(&got, &want);
                assert!(
                    bad.is_empty(),
                    "{what} / {cname}: heads {bad:?} select other blocks; first: gpu {:?} cpu {:?}",
                    bad.first().map(
                        |&(s, h)| (0..want.seqs()[s].num_query_blocks(cfg.block_size))
                            .map(|r| got.row(s, h, r).to_vec())
                            .collect::<Vec<_>>()
                    ),
                    bad.first().map(
                        |&(s, h)| (0..want.seqs()[s].num_query_blocks(cfg.block_size))
                            .map(|r| want.row(s, h, r).to_vec())
                            .collect::<Vec<_>>()
                    )
                );
                checked += want_rep.len();
            }
        }
        eprintln!("identical selection on {checked} heads ({qa_heads} query-aware)");
        assert!(
            qa_heads > 0,
            "the configurations should exercise query-aware heads"
        );
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn device_path_end_to_end_agrees_with_cpu_path() {
        let dev = device();
        let cpu = CpuBackend::new();
        let seed = seed();
        let (mut heads, mut differ) = (0usize, 0usize);
        for (what, owned) in inputs(seed + 100) {
            let x = owned.input().expect("input");
            for (cname, cfg) in configs() {
                let (want, want_rep) = cpu.select_index(&x, &cfg).expect("cpu");
                let (got, got_rep) = select_index(&dev, &x, &cfg).expect("gpu");
                got.validate(cfg.forced).expect("device index valid");
                assert_eq!(got_rep.heads.len(), want_rep.heads.len());
                let bad = diff_heads(&got, &want);
                for &(s, h) in &bad {
                    let (g, w) = (
                        &got_rep.heads[s * x.shape.num_heads + h],
                        &want_rep.heads[s * x.shape.num_heads + h],
                    );
                    eprintln!("{what} / {cname}: seq {s} head {h} differs: gpu {:?} js {} blocks {} | cpu {:?} js {} blocks {}",
                        g.pattern, g.js_distance, g.selected_blocks, w.pattern, w.js_distance, w.selected_blocks);
                }
                heads += want_rep.heads.len();
                differ += bad.len();
            }
        }
        eprintln!(
            "end to end: {differ} of {heads} heads differ (statistics differ in the last bits)"
        );
        // Statistics are computed differently (tensor cores vs CPU sgemm), so a head sitting on
        // a decision boundary may differ; more than 2% would be a bug, not rounding.
        assert!(differ * 50 <= heads, "{differ} of {heads} heads differ");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn dense_fallback_and_forced_blocks() {
        let dev = device();
        let seed = seed();
        // 900 tokens ≤ min_budget 1024: every head dense, every causal block listed.
        let owned = workload(WorkloadKind::Random, 900, 4, 2, 64, seed).to_dtype(DType::BF16);
        let x = owned.input().expect("input");
        let cfg = FlexPrefillConfig::default();
        let (idx, rep) = select_index(&dev, &x, &cfg).expect("gpu");
        assert_eq!(idx, BlockIndex::dense(&x.seqs, 4, 128).expect("dense"));
        assert!(rep.dense_fallback.is_some());
        assert!(rep.heads.iter().all(|h| h.pattern == Pattern::Dense));
        // no forced blocks, min budget 1 block: the same blocks as the CPU path
        let cfg = FlexPrefillConfig::default()
            .with_forced(ForcedBlocks {
                sink: false,
                diagonal: false,
            })
            .with_min_budget(1);
        let owned =
            workload(WorkloadKind::SinkLocal, 2000, 4, 2, 64, seed + 1).to_dtype(DType::BF16);
        let x = owned.input().expect("input");
        let (idx, _) = select_index(&dev, &x, &cfg).expect("gpu");
        let (want, _) = CpuBackend::new().select_index(&x, &cfg).expect("cpu");
        assert!(
            diff_heads(&idx, &want).len() <= 1,
            "{:?}",
            diff_heads(&idx, &want)
        );
    }
}
