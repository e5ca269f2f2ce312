//! What the host and the selection kernels share: the `#[repr(C)]` structs the kernels read
//! (`kernels/select/common.cuh`), the module's compile-time key, and [`Run`], the state one
//! call's stages launch from.

use super::*;
use crate::launch::Launch;
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

/// The host-side plan of the selection buffers: per-sequence offsets and the totals the
/// allocations are sized from. Built from lengths alone, so a batch whose sizes the kernels
/// cannot address is refused before anything is allocated or launched.
#[derive(Debug)]
pub(super) struct SelPlan {
    pub(super) sel: Vec<SelSeq>,
    /// Σ nqb·words, Σ nqb·nkb, Σ nqb, Σ (kv_len + 1), Σ causal blocks (each × H on the device).
    pub(super) mask: usize,
    pub(super) map: usize,
    pub(super) rows: usize,
    pub(super) dist: usize,
    pub(super) causal: usize,
    pub(super) max_nkb: usize,
    pub(super) max_rep: usize,
    pub(super) max_map: usize,
    /// Σ rep·nkb: the top-up's scratch layout per head.
    pub(super) rep_mass: usize,
    /// First CSR row of each (sequence, head), then the total.
    pub(super) head_row_start: Vec<u32>,
}

/// The largest grid x dimension; y and z stop at 65535.
const GRID_X: usize = i32::MAX as usize;
const GRID_YZ: usize = 65535;

fn fits_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| CudaError::Unsupported {
        op: "select",
        message: format!("{what} ({n}) does not fit the kernels' 32-bit offsets"),
    })
}

fn fits_grid(n: usize, limit: usize, what: &str) -> Result<()> {
    if n > limit {
        return Err(CudaError::Unsupported {
            op: "select",
            message: format!("{what} ({n}) exceed the grid limit {limit}"),
        });
    }
    Ok(())
}

impl SelPlan {
    /// Offsets are u32 on the device (`SelSeq`, the CSR row offsets, the flattened cut's
    /// candidate list), so every flat buffer, heads included, must be addressable with them;
    /// the launch grids put heads and sequences on y / z and blocks on x.
    pub(super) fn new(layout: &StatsLayout, cfg: &FlexPrefillConfig) -> Result<Self> {
        let h = layout.shape.num_heads;
        let bs = cfg.block_size;
        let nseq = layout.seqs.len();
        fits_grid(h, GRID_YZ, "heads")?;
        fits_grid(nseq, GRID_YZ, "sequences")?;
        fits_grid(nseq * h, GRID_X, "(sequence, head) pairs")?;
        fits_grid(layout.total_query_blocks(), GRID_X, "query blocks")?;
        let mut sel = Vec::with_capacity(nseq);
        let (mut mask, mut map, mut rows, mut dist, mut causal) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        let (mut max_nkb, mut max_rep, mut max_map) = (1usize, 1usize, 1usize);
        let mut rep_mass = 0usize;
        let mut head_row_start = Vec::with_capacity(nseq * h + 1);
        head_row_start.push(0u32);
        for (si, s) in layout.seqs.iter().enumerate() {
            let (nqb, nkb) = (s.num_query_blocks(bs), s.num_key_blocks(bs));
            let words = nkb.div_ceil(32);
            sel.push(SelSeq {
                words: fits_u32(words, "mask words per row")?,
                mask_off: fits_u32(mask, "mask offset")?,
                map_off: fits_u32(map, "pooled-map offset")?,
                row_off: fits_u32(rows, "CSR row offset")?,
                dist_off: fits_u32(dist, "distance offset")?,
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
                let last = head_row_start.last().map_or(0, |&l| l as usize);
                head_row_start.push(fits_u32(last + nqb, "CSR rows")?);
            }
        }
        for (n, what) in [
            (mask, "mask words × heads"),
            (map, "pooled-map entries × heads"),
            (dist, "distance prefix entries × heads"),
            (causal, "causal blocks × heads (CSR column offsets)"),
            (rep_mass, "representative block masses × heads"),
        ] {
            fits_u32(n.saturating_mul(h), what)?;
        }
        fits_u32(rows.saturating_mul(h).saturating_add(1), "CSR row offsets")?;
        Ok(Self {
            sel,
            mask,
            map,
            rows,
            dist,
            causal,
            max_nkb,
            max_rep,
            max_map,
            rep_mass,
            head_row_start,
        })
    }
}

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

/// What most selection kernels read first: the sequence table, the configuration, the
/// per-sequence selection offsets, the query-block-to-sequence map and the pattern of every
/// head (the [`Launch`] helpers below push them in the kernels' parameter order). Apart from
/// the buffers the stages write, so a launch can borrow both.
pub(super) struct Common<'a> {
    pub(super) stats: &'a mut DeviceStats,
    pub(super) p: SelParams,
    pub(super) sel_d: Buf<SelSeq>,
    pub(super) qb_seq_d: Buf<u32>,
    pub(super) qb_all_u: u32,
    /// Written by `sel_decide`, read by every later stage.
    pub(super) pattern: Buf<i32>,
}

/// The leading parameters the selection kernels share (`kernels/select/*.cu`), each helper
/// named by the C parameters it pushes, in that order: a call site's argument list is its
/// helper's parameters followed by its own.
impl<'a> Launch<'a> {
    /// `(seqs, p, pattern)`.
    pub(super) fn seqs_p_pattern(self, c: &'a Common<'_>) -> Self {
        self.arg(&c.stats.descs).arg(&c.p).arg(&c.pattern)
    }

    /// `(seqs, sel, p)`.
    pub(super) fn seqs_sel_p(self, c: &'a Common<'_>) -> Self {
        self.arg(&c.stats.descs).arg(&c.sel_d).arg(&c.p)
    }

    /// `(seqs, sel, p, pattern)`.
    pub(super) fn seqs_sel_p_pattern(self, c: &'a Common<'_>) -> Self {
        self.seqs_sel_p(c).arg(&c.pattern)
    }

    /// `(seqs, sel, qb_seq, p, pattern)`: one CTA per query-block row.
    pub(super) fn rows(self, c: &'a Common<'_>) -> Self {
        self.arg(&c.stats.descs)
            .arg(&c.sel_d)
            .arg(&c.qb_seq_d)
            .arg(&c.p)
            .arg(&c.pattern)
    }

    /// `(seqs, sel, qb_seq, total_qb, p)`: one warp per query-block row.
    pub(super) fn warp_rows(self, c: &'a Common<'_>) -> Self {
        self.arg(&c.stats.descs)
            .arg(&c.sel_d)
            .arg(&c.qb_seq_d)
            .arg(&c.qb_all_u)
            .arg(&c.p)
    }
}

/// Everything the selection stages share for one call: the plan's sizes, the kernels' common
/// inputs and every buffer (each stage module launches its kernels from it, in the order
/// [`launch_select`] calls them).
pub(super) struct Run<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) stream: &'a Arc<CudaStream>,
    pub(super) cfg: &'a FlexPrefillConfig,
    pub(super) key: KernelKey,
    pub(super) dyn_limit: usize,
    pub(super) c: Common<'a>,
    pub(super) tiles_d: Buf<u32>,
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
                | "sel_sampled_cut"
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

/// The size limits, checked on the host alone (no GPU needed).
#[cfg(test)]
mod limit_tests {
    use super::*;
    use flexprefill_core::{AttentionShape, Sequence};

    fn cfg16() -> FlexPrefillConfig {
        crate::stats::tests::with_config(FlexPrefillConfig::default(), |c| c.block_size = 16)
    }

    fn plan(len: usize, heads: usize) -> Result<SelPlan> {
        let shape = AttentionShape::new(heads, 1, 64)?;
        let layout = StatsLayout::new(&[Sequence::whole(len)], shape, 16)?;
        SelPlan::new(&layout, &cfg16())
    }

    fn refused(r: Result<impl std::fmt::Debug>, what: &str) {
        match r {
            Err(CudaError::Unsupported { message, .. }) => {
                assert!(message.contains(what), "{message:?} should name {what:?}")
            }
            other => panic!("expected an Unsupported error naming {what:?}, got {other:?}"),
        }
    }

    #[test]
    fn pooled_map_is_refused_past_u32() {
        // 2^19 tokens in blocks of 16: 2^15 query × 2^15 key blocks = 2^30 map entries per
        // head; three heads fit 32-bit offsets, four do not.
        let ok = plan(1 << 19, 3).expect("3 · 2^30 entries fit u32");
        assert_eq!(ok.map, 1 << 30);
        assert_eq!(ok.head_row_start.len(), 4);
        refused(plan(1 << 19, 4), "pooled-map entries");
        // 2^20 tokens: 2^32 entries for a single head.
        refused(plan(1 << 20, 1), "pooled-map entries");
    }

    #[test]
    fn heads_and_splits_are_refused_past_the_grid() {
        let shape = AttentionShape::new(70_000, 70_000, 64).expect("shape");
        refused(
            StatsLayout::new(&[Sequence::whole(1024)], shape, 128),
            "heads",
        );
        // 64 sequences of 2^20 keys: 65536 key splits, one past the limit.
        let seqs: Vec<Sequence> = (0..64)
            .map(|i| Sequence {
                q_start: i << 20,
                k_start: i << 20,
                ..Sequence::whole(1 << 20)
            })
            .collect();
        let shape = AttentionShape::new(1, 1, 64).expect("shape");
        refused(StatsLayout::new(&seqs, shape, 128), "key splits");
        assert!(StatsLayout::new(&seqs[..63], shape, 128).is_ok());
    }

    #[test]
    fn sequence_ends_must_fit_u32() {
        let at = |q_start: usize| Sequence {
            q_start,
            ..Sequence::whole(1024)
        };
        assert!(crate::attention::seq_words(&[at(u32::MAX as usize - 1024)]).is_ok());
        refused(
            crate::attention::seq_words(&[at(u32::MAX as usize - 1023)]),
            "token offset",
        );
        refused(
            crate::attention::seq_words(&[Sequence {
                k_start: usize::MAX,
                ..Sequence::whole(1)
            }]),
            "token offset",
        );
    }
}
