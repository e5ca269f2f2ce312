//! What the host and the selection kernels share: the `#[repr(C)]` structs the kernels read
//! (`kernels/select/common.cuh`), the module's compile-time key, and [`Run`], the state one
//! call's stages launch from.

use super::*;
use crate::workspace::Buf;

/// Per-sequence offsets of the selection buffers. Must match `SelSeq` in kernels/select/common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SelSeq {
    pub(super) words: u32,
    pub(super) mask_off: u32,
    pub(super) map_off: u32,
    pub(super) row_off: u32,
    pub(super) dist_off: u32,
    pub(super) dense: u32,
    pub(super) pad: [u32; 2],
}
// SAFETY: plain old data, laid out as the kernel's struct.
unsafe impl DeviceRepr for SelSeq {}
const _: () = assert!(std::mem::size_of::<SelSeq>() == 32);

/// The configuration as the kernels read it. Must match `SelParams` in kernels/select/common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct SelParams {
    pub(super) num_heads: i32,
    pub(super) num_kv_heads: i32,
    pub(super) head_dim: i32,
    pub(super) block_size: i32,
    pub(super) gamma: f32,
    pub(super) tau: f32,
    pub(super) original: i32,
    pub(super) per_row: i32,
    pub(super) sink: i32,
    pub(super) diagonal: i32,
    pub(super) mb: i32,
    pub(super) cap: i32,
    pub(super) bf16_logits: i32,
    pub(super) pad: i32,
    pub(super) gamma_py: f64,
}
// SAFETY: plain old data (13 i32/f32, one pad, one f64 at offset 56), as the kernel's struct.
unsafe impl DeviceRepr for SelParams {}
const _: () = assert!(std::mem::size_of::<SelParams>() == 64);

/// The original's gamma as the Python float a caller wrote (core's `python_float`).
pub(super) fn python_float(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

pub(super) fn params(layout: &StatsLayout, cfg: &FlexPrefillConfig) -> SelParams {
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
pub(crate) fn select_key() -> KernelKey {
    KernelKey::new(&SELECT, None, 0, 0)
        .define("PROBE_QUERIES", selection::PROBE_QUERIES as i64)
        .define("FLAT_CHUNK", FLAT_CHUNK as i64)
        .define("EV_PER_CTA", EV_PER_CTA as i64)
        .define("QM_COLS", QM_COLS as i64)
        .define("FLAT_FULL_DIGITS", FLAT_FULL_DIGITS as i64)
}

/// Everything the selection stages share for one call: the plan's sizes, the kernels' inputs
/// and every buffer (each stage module launches its kernels from it, in the order
/// [`launch_select`] calls them).
pub(super) struct Run<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) stream: &'a Arc<CudaStream>,
    pub(super) stats: &'a mut DeviceStats,
    pub(super) cfg: &'a FlexPrefillConfig,
    pub(super) key: KernelKey,
    pub(super) dyn_limit: usize,
    pub(super) p: SelParams,
    pub(super) sel_d: Buf<SelSeq>,
    pub(super) qb_seq_d: Buf<u32>,
    pub(super) tiles_d: Buf<u32>,
    pub(super) qb_all_u: u32,
    pub(super) probes_i: i32,
    pub(super) h: usize,
    pub(super) nseq: usize,
    pub(super) bs: usize,
    pub(super) qb_all: usize,
    pub(super) max_nkb: usize,
    pub(super) max_map: usize,
    pub(super) total_rows: usize,
    pub(super) any_qa: bool,
    pub(super) faithful_qa: bool,
    pub(super) probes: bool,
    pub(super) sort_smem: usize,
    pub(super) row_smem: usize,
    pub(super) map_smem: usize,
    pub(super) map_grid: (u32, u32, u32),
    pub(super) topup_tile: usize,
    pub(super) topup_smem: usize,
    pub(super) vpool: Buf<f32>,
    pub(super) spool: Buf<f32>,
    pub(super) pattern: Buf<i32>,
    pub(super) js: Buf<f32>,
    pub(super) vkey: Buf<u64>,
    pub(super) kstar: Buf<u64>,
    pub(super) colsel: Buf<u8>,
    pub(super) offsel: Buf<u8>,
    pub(super) dist_prefix: Buf<u32>,
    pub(super) mapb: Buf<f32>,
    pub(super) maskb: Buf<u32>,
    pub(super) counts: Buf<u32>,
    pub(super) offsets: Buf<u32>,
    pub(super) cols: Buf<u32>,
    pub(super) kcut: Buf<u64>,
    pub(super) order_b: Buf<u32>,
    pub(super) run_b: Buf<f64>,
    pub(super) t_b: Buf<f64>,
    pub(super) mass_t: Buf<f32>,
    pub(super) col_sum: Buf<f32>,
    pub(super) ev_key: Buf<u64>,
    pub(super) ev_w: Buf<f64>,
    pub(super) cand_key: Buf<u64>,
    pub(super) cand_w: Buf<f64>,
    pub(super) flat_cut: Buf<u64>,
    pub(super) cal: Buf<u64>,
    pub(super) probe_tot: Buf<f64>,
    pub(super) hist_cnt: Buf<u32>,
    pub(super) hist_sum: Buf<u64>,
    pub(super) flat_list: Buf<u32>,
    pub(super) flat_len: Buf<u32>,
    pub(super) diag_hit: Buf<u8>,
}

impl Run<'_> {
    /// Selection kernel `name`; the ones launched with dynamic shared memory get their limit
    /// raised to the most any launch may need (the registry raises it once, at first use).
    pub(super) fn f(&self, name: &'static str) -> Result<CudaFunction> {
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
        self.dev.function(
            &SELECT,
            &self.key,
            name,
            if dynamic { self.dyn_limit } else { 0 },
        )
    }

    /// One CTA per (head, sequence).
    pub(super) fn grid_heads(&self) -> (u32, u32, u32) {
        (self.h as u32, self.nseq as u32, 1)
    }

    /// One CTA per (query block of the batch, head).
    pub(super) fn grid_rows(&self) -> (u32, u32, u32) {
        (self.qb_all as u32, self.h as u32, 1)
    }

    /// Eight query blocks per CTA (sel_extend, sel_count).
    pub(super) fn ext_grid(&self) -> (u32, u32, u32) {
        (self.qb_all.div_ceil(8) as u32, self.h as u32, 1)
    }
}
