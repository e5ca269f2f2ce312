//! Representative attention and head statistics on the GPU (`kernels/stats.cu`).
//!
//! [`launch_stats`] queues, on a caller's stream and without any host synchronisation, the
//! kernels that compute every (sequence, head)'s [`HeadStatistics`] into device buffers
//! ([`DeviceStats`]); `head_statistics` is the host-facing wrapper the [`Backend`] trait
//! uses (upload, launch, download, split per head).
//!
//! The representative softmax `A = softmax(Q̂·Kᵀ·e)` (`[H, R, kv_len]`, 1 GiB of f32 at 128k) is
//! never stored: pass 1 computes each row's max and sum of exponentials per key split, a merge
//! kernel combines the splits, and pass 2 recomputes the logits tile by tile on the tensor cores
//! and reduces them straight into the vertical line, the slash partials and the per-row block
//! masses. Every reduction runs in a fixed order, so the statistics are bit-reproducible.
//!
//! Conventions follow `flexprefill-cpu`'s `head_statistics` (the oracle): estimation scale
//! `e = 1/√D` in [`SelectionMode::Original`] and the input's softmax scale in
//! [`SelectionMode::Faithful`]; in `Original` with bf16 inputs the original's bf16 rounding
//! points are replayed (`Q̂s`, logits, `K̄`, `q̄`, estimate logits, `Q̄_r`).
//!
//! [`Backend`]: flexprefill_core::Backend

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use flexprefill_core::{
    AttentionInput, AttentionShape, DType, FlexPrefillConfig, HeadStatistics, SelectionMode,
    Sequence, TensorRef,
};

use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::registry::{KernelFamily, KernelKey};

/// Per-kernel timing for benches: with `FLEXPREFILL_PROFILE` set, every launch of the stats and
/// select paths records a CUDA event after it; [`profile_take`] syncs and returns the time of
/// each kernel. Off (no event, no sync) otherwise.
pub mod profile {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    use cudarc::driver::{CudaEvent, CudaStream};

    thread_local! {
        static MARKS: RefCell<Vec<(&'static str, CudaEvent)>> = const { RefCell::new(Vec::new()) };
    }

    /// Whether `FLEXPREFILL_PROFILE` is set (read once).
    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("FLEXPREFILL_PROFILE").is_some())
    }

    /// Records an event named `name` on `stream` (after the work queued so far).
    pub fn mark(stream: &CudaStream, name: &'static str) {
        if !enabled() {
            return;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        if let Ok(e) = stream.record_event(flags) {
            MARKS.with(|m| m.borrow_mut().push((name, e)));
        }
    }

    /// Waits for the last mark and returns (name, ms since the previous mark), emptying the list.
    pub fn take() -> Vec<(&'static str, f32)> {
        let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
        if let Some((_, last)) = marks.last() {
            let _ = last.synchronize();
        }
        marks
            .windows(2)
            .map(|w| (w[1].0, w[0].1.elapsed_ms(&w[1].1).unwrap_or(f32::NAN)))
            .collect()
    }
}
pub use profile::take as profile_take;

/// The statistics kernel family: `kernels/stats.cu` with `kernels/stats_sm90.cu` appended (the
/// Hopper passes, compiled in only with `STATS_WGMMA=1`: one module holds both passes' variant
/// and the shared merge, finalize, pooling and estimate kernels).
pub static STATS: KernelFamily = KernelFamily {
    name: "stats",
    source: concat!(
        include_str!("../kernels/stats.cu"),
        "\n",
        include_str!("../kernels/stats_sm90.cu")
    ),
};

/// Which implementation of the two representative-attention passes runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PassPath {
    /// `stats_pass1` / `stats_pass2`: mma.sync m16n8k16 (compute capability 8.0 and newer).
    Mma,
    /// `stats_pass1_sm90` / `stats_pass2_sm90`: wgmma m64n64k16 (sm_90a, head_dim 64 or 128);
    /// `overlap` issues the next unit's Q̂·Kᵀ before the current one is reduced.
    Wgmma { overlap: bool },
}

impl PassPath {
    /// The path for a device of compute capability `arch` and `head_dim`: wgmma on Hopper for
    /// head_dim 64 and 128 unless `FLEXPREFILL_STATS_MMA=1` (A/B against the mma.sync passes);
    /// `FLEXPREFILL_STATS_OVERLAP=1` turns on the wgmma path's issue-ahead (experimental: see
    /// `kernels/stats_sm90.cu`).
    fn choose(arch: (i32, i32), head_dim: usize) -> Self {
        let env_is = |name: &str, v: &str| std::env::var(name).is_ok_and(|x| x.trim() == v);
        if arch == (9, 0)
            && (head_dim == 64 || head_dim == 128)
            && !env_is("FLEXPREFILL_STATS_MMA", "1")
        {
            PassPath::Wgmma {
                overlap: env_is("FLEXPREFILL_STATS_OVERLAP", "1"),
            }
        } else {
            PassPath::Mma
        }
    }

    fn wgmma(self) -> bool {
        matches!(self, PassPath::Wgmma { .. })
    }

    /// Kernel names of pass 1 and pass 2.
    fn names(self) -> (&'static str, &'static str) {
        if self.wgmma() {
            ("stats_pass1_sm90", "stats_pass2_sm90")
        } else {
            ("stats_pass1", "stats_pass2")
        }
    }
}

/// Keys per split of pass 1/2: a multiple of every block size (≤ 256) and of the 64-key tile,
/// and ≥ the largest representative block, so each slash entry gets at most two split
/// partials. 1024 keys: 128 CTAs per head at 128k (4096 in all, ~16 waves on 132 SMs), each
/// loading its Q̂ rows once for 16 key tiles.
const SPLIT_KEYS: usize = 1024;
/// Rows per row group (8 warps × 16 rows), tile of keys, threads, warps: must match stats.cu.
const ROWS: usize = 128;
const KT: usize = 64;
const NTHREADS: u32 = 256;
const NWARPS: usize = 8;
/// Probe rows (one m16 tile riding along the representative passes), the pitch of a warp's
/// probability quarter strip and of its diagonal partials: must match stats.cu.
const PQ: usize = 16;
const PP: usize = 24;
const DPITCH: usize = 80;
/// Key-tile ring of the wgmma pass 1 (stats_sm90.cu's KSTAGES; pass 2 double-buffers) and the
/// slack that lets the kernels align their swizzled tiles to 1024 bytes.
const WG_STAGES: usize = 3;
const WG_ALIGN: usize = 1024;
const _: () = assert!(
    flexprefill_core::selection::PROBE_QUERIES <= PQ,
    "the probe rows must fit one m16 tile of the statistics kernels"
);

/// One sequence as the kernels see it. Must match `SeqDesc` in `kernels/stats.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqDesc {
    q_start: u32,
    k_start: u32,
    q_len: u32,
    kv_len: u32,
    rep: u32,
    nkb: u32,
    nqb: u32,
    tok_off: u32,
    kb_off: u32,
    qb_off: u32,
    rep_off: u32,
    split_off: u32,
    nsplit: u32,
    pad: [u32; 3],
}

// SAFETY: plain old data (16 u32), laid out as the kernel's struct.
unsafe impl DeviceRepr for SeqDesc {}

/// Where each (sequence, head)'s statistics live in the flat device buffers, and the launch
/// geometry. Built on the host from the sequence lengths alone (no device read).
#[derive(Debug, Clone)]
pub struct StatsLayout {
    /// Query heads, kv heads, head_dim.
    pub shape: AttentionShape,
    /// Tokens per block.
    pub block_size: usize,
    /// The sequences.
    pub seqs: Vec<Sequence>,
    descs: Vec<SeqDesc>,
    /// (sequence, split) of every pass-1/2 CTA column.
    work: Vec<u32>,
    /// Sequence of every global key block / query block.
    kb_seq: Vec<u32>,
    qb_seq: Vec<u32>,
    /// Padded representative rows (128 or 256).
    rp: usize,
    /// Floats per slash partial.
    sl_stride: usize,
    total_tok: usize,
    total_kb: usize,
    total_qb: usize,
    total_rep: usize,
    /// Fill every output with NaN before the kernels run (tests: proves every element is
    /// written). Costs one memset per buffer; the host path sets it, the device path does not.
    pub poison: bool,
    /// Also measure core's probe queries (`HeadStatistics::probe_block_mass`): the faithful
    /// mode's selection uses them, the original's does not. Set by [`StatsLayout::with_probes`].
    pub probes: bool,
    total_probe: usize,
}

fn to_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| CudaError::Unsupported {
        op: "head_statistics",
        message: format!("{what} ({n}) does not fit u32"),
    })
}

impl StatsLayout {
    /// Plans the buffers for `seqs` (packed, as [`AttentionInput`] holds them).
    pub fn new(seqs: &[Sequence], shape: AttentionShape, block_size: usize) -> Result<Self> {
        let h = shape.num_heads;
        let mut descs = Vec::with_capacity(seqs.len());
        let mut work = Vec::new();
        let (mut kb_seq, mut qb_seq) = (Vec::new(), Vec::new());
        let (mut tok, mut kb, mut qb, mut rep_off, mut split) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        let mut probe_off = 0usize;
        let mut max_rep = 1;
        for (si, s) in seqs.iter().enumerate() {
            // The kernels index keys with i32 (masks in 32-bit arithmetic).
            if i32::try_from(s.kv_len).is_err() {
                return Err(CudaError::Unsupported {
                    op: "head_statistics",
                    message: format!("kv_len {} exceeds 2^31 - 1", s.kv_len),
                });
            }
            let rep = block_size.min(s.q_len);
            let nkb = s.num_key_blocks(block_size);
            let nqb = s.num_query_blocks(block_size);
            let nsplit = s.kv_len.div_ceil(SPLIT_KEYS);
            max_rep = max_rep.max(rep);
            descs.push(SeqDesc {
                q_start: to_u32(s.q_start, "q_start")?,
                k_start: to_u32(s.k_start, "k_start")?,
                q_len: to_u32(s.q_len, "q_len")?,
                kv_len: to_u32(s.kv_len, "kv_len")?,
                rep: rep as u32,
                nkb: to_u32(nkb, "key blocks")?,
                nqb: to_u32(nqb, "query blocks")?,
                tok_off: to_u32(tok, "token offset")?,
                kb_off: to_u32(kb, "key block offset")?,
                qb_off: to_u32(qb, "query block offset")?,
                rep_off: to_u32(rep_off, "representative offset")?,
                split_off: to_u32(split, "split offset")?,
                nsplit: to_u32(nsplit, "splits")?,
                pad: [to_u32(probe_off, "probe offset")?, 0, 0],
            });
            for sp in 0..nsplit {
                work.push(si as u32);
                work.push(sp as u32);
            }
            kb_seq.extend(std::iter::repeat_n(si as u32, nkb));
            qb_seq.extend(std::iter::repeat_n(si as u32, nqb));
            tok += s.kv_len;
            kb += nkb;
            qb += nqb;
            rep_off += rep * nkb;
            probe_off += flexprefill_core::selection::probe_queries(s, block_size).len() * nkb;
            split += nsplit;
        }
        // Flat outputs are indexed with u32 offsets times H inside the kernels' size_t math;
        // keep every product addressable.
        to_u32(tok * h, "vertical length")?;
        to_u32(rep_off * h, "rep_block_mass length")?;
        if split > 65535 {
            return Err(CudaError::Unsupported {
                op: "head_statistics",
                message: format!("{split} key splits exceed the grid limit 65535"),
            });
        }
        let rp = max_rep.div_ceil(ROWS) * ROWS;
        Ok(Self {
            shape,
            block_size,
            seqs: seqs.to_vec(),
            descs,
            work,
            kb_seq,
            qb_seq,
            rp,
            sl_stride: SPLIT_KEYS + rp - 1,
            total_tok: tok,
            total_kb: kb,
            total_qb: qb,
            total_rep: rep_off,
            poison: false,
            probes: false,
            total_probe: probe_off,
        })
    }

    /// Offset of (seq, head)'s vertical and slash lines (`kv_len` floats each).
    pub fn line_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.tok_off as usize * self.shape.num_heads + head * d.kv_len as usize
    }

    /// Offset of (seq, head)'s estimate (`nkb` floats).
    pub fn estimate_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.kb_off as usize * self.shape.num_heads + head * d.nkb as usize
    }

    /// Measures the probe queries too (faithful mode).
    pub fn with_probes(mut self, probes: bool) -> Self {
        self.probes = probes;
        self
    }

    /// Probe queries of `seq` (core's `probe_queries`).
    pub fn num_probes(&self, seq: usize) -> usize {
        flexprefill_core::selection::probe_queries(&self.seqs[seq], self.block_size).len()
    }

    /// Offset of (seq, head)'s probe block masses (`probes · nkb` floats).
    pub fn probe_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.pad[0] as usize * self.shape.num_heads + head * self.num_probes(seq) * d.nkb as usize
    }

    /// Offset of (seq, head)'s representative block masses (`rep · nkb` floats).
    pub fn rep_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        d.rep_off as usize * self.shape.num_heads + head * (d.rep * d.nkb) as usize
    }

    /// Offset of (seq, kv_head)'s pooled keys (`nkb · D` floats).
    pub fn k_pooled_offset(&self, seq: usize, kv_head: usize) -> usize {
        let d = &self.descs[seq];
        (d.kb_off as usize * self.shape.num_kv_heads + kv_head * d.nkb as usize)
            * self.shape.head_dim
    }

    /// Offset of (seq, head)'s pooled queries (`nqb · D` floats).
    pub fn q_pooled_offset(&self, seq: usize, head: usize) -> usize {
        let d = &self.descs[seq];
        (d.qb_off as usize * self.shape.num_heads + head * d.nqb as usize) * self.shape.head_dim
    }

    /// Key blocks over all sequences.
    pub fn total_key_blocks(&self) -> usize {
        self.total_kb
    }

    /// Query blocks over all sequences.
    pub fn total_query_blocks(&self) -> usize {
        self.total_qb
    }

    /// Representative rows of `seq`.
    pub fn num_rep(&self, seq: usize) -> usize {
        self.descs[seq].rep as usize
    }

    /// Rows of the row-state buffers (`row_ml`, `lse2`) per (split or sequence, head): the
    /// padded representative rows, then the probe rows when they are measured.
    fn row_stride(&self) -> usize {
        self.rp + if self.measures_probes() { PQ } else { 0 }
    }

    fn measures_probes(&self) -> bool {
        self.probes && self.total_probe > 0
    }

    fn pass_smem(&self, pass2: bool, path: PassPath) -> usize {
        let d = self.shape.head_dim;
        let probe_rows = if self.measures_probes() { PQ } else { 0 };
        // partial sets of pass 2 (per-tile cross-warp partials): 3 with the wgmma overlap
        let sets = if path == (PassPath::Wgmma { overlap: true }) {
            3
        } else {
            2
        };
        let mut bytes = if path.wgmma() {
            // swizzled Q̂ and swizzled key tiles (no row padding: a 3-stage ring in pass 1,
            // double-buffered in pass 2), aligned to 1024 bytes; the probe rows padded as in
            // the mma.sync passes
            let stages = if pass2 { 2 } else { WG_STAGES };
            WG_ALIGN + (self.rp + stages * KT) * d * 2 + probe_rows * (d + 8) * 2
        } else {
            // key tiles: a 3-stage ring in pass 1, double-buffered in pass 2
            let stages = if pass2 { 2 } else { 3 };
            (self.rp + probe_rows + stages * KT) * (d + 8) * 2
        };
        if pass2 {
            // per-warp strips, then the double-buffered per-group column / diagonal partials,
            // the slash accumulator, the double-buffered probe partials, the probe block masses
            let blocks_per_split = SPLIT_KEYS / self.block_size;
            let groups = self.rp / ROWS;
            bytes += (NWARPS * 16 * PP
                + sets * groups * NWARPS * KT
                + sets * groups * NWARPS * DPITCH
                + self.sl_stride
                + sets * NWARPS * PQ
                + PQ * blocks_per_split)
                * 4;
        } else {
            bytes += NWARPS * PQ * 8;
        }
        bytes
    }
}

/// Every statistic of a batch, resident on the device, laid out as [`StatsLayout`] says.
#[derive(Debug)]
pub struct DeviceStats {
    /// The plan the buffers follow.
    pub layout: StatsLayout,
    /// Sequence descriptors (the selection kernels read them too).
    pub descs: CudaSlice<SeqDesc>,
    /// `[Σ kv_len · H]`.
    pub vertical: CudaSlice<f32>,
    /// `[Σ kv_len · H]`, by distance.
    pub slash: CudaSlice<f32>,
    /// `[Σ nkb · H]`.
    pub estimate: CudaSlice<f32>,
    /// `[Σ rep · nkb · H]`.
    pub rep_block_mass: CudaSlice<f32>,
    /// `[Σ probes · nkb · H]` when the layout measures probes (else one unused element).
    pub probe_block_mass: CudaSlice<f32>,
    /// `[Σ nkb · Hkv · D]` (per kv head: the query heads of a group share it).
    pub k_pooled: CudaSlice<f32>,
    /// `[Σ nqb · H · D]`; filled by [`launch_pool_q`].
    pub q_pooled: CudaSlice<f32>,
    /// Estimation scale `e` and whether the original's bf16 rounding is replayed.
    pub scale: f32,
    /// Replaying the original's bf16 rounding points.
    pub emulate: bool,
    dtype: DType,
    qb_seq: CudaSlice<u32>,
    /// The passes' implementation (selects the module `launch_pool_q` reuses).
    path: PassPath,
}

/// Element types the statistics kernels read.
pub trait StatsElem: DeviceRepr {
    /// Its dtype.
    const DTYPE: DType;
}
impl StatsElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl StatsElem for half::f16 {
    const DTYPE: DType = DType::F16;
}

/// Estimation scale and rounding mode for `cfg` (see the module docs).
pub fn estimation_scale(
    shape: AttentionShape,
    softmax_scale: f32,
    dtype: DType,
    cfg: &FlexPrefillConfig,
) -> (f32, bool) {
    let original = cfg.selection == SelectionMode::Original;
    let inv_sqrt_d = 1.0 / ((shape.head_dim as f64).sqrt() as f32);
    let e = if original { inv_sqrt_d } else { softmax_scale };
    (e, original && dtype == DType::BF16)
}

/// The statistics module for `dtype`, `head_dim` and the rounding mode (`emulate`: the
/// original's bf16 rounding points, compiled in or out).
fn key(dtype: DType, head_dim: usize, emulate: bool, path: PassPath) -> KernelKey {
    let k = KernelKey::new(&STATS, Some(dtype), head_dim, 0)
        .define(
            "PROBE_QUERIES",
            flexprefill_core::selection::PROBE_QUERIES as i64,
        )
        .define("STATS_EMULATE", emulate as i64);
    match path {
        PassPath::Mma => k,
        PassPath::Wgmma { overlap } => k
            .define("STATS_WGMMA", 1)
            .define("STATS_OVERLAP", overlap as i64),
    }
}

fn check_head_dim(d: usize) -> Result<()> {
    // The tiles step through head_dim in 16-wide mma slices (rows padded by 8 elements stay
    // bank-conflict-free for any multiple of 16); 256 bounds the shared memory.
    if d.is_multiple_of(16) && (16..=256).contains(&d) {
        Ok(())
    } else {
        Err(CudaError::Unsupported {
            op: "head_statistics",
            message: format!("head_dim {d} (supported: multiples of 16 up to 256)"),
        })
    }
}

/// Queues the statistics kernels (everything but `q_pooled`) on `stream`. No host sync.
///
/// `scale`/`emulate` come from [`estimation_scale`].
#[allow(clippy::too_many_arguments)]
pub fn launch_stats<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    layout: StatsLayout,
    scale: f32,
    emulate: bool,
) -> Result<DeviceStats> {
    let shape = layout.shape;
    check_head_dim(shape.head_dim)?;
    let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let need = |name: &'static str, got: usize, want: usize| -> Result<()> {
        if got != want {
            return Err(CudaError::BufferLen {
                op: "head_statistics",
                name,
                got,
                want,
            });
        }
        Ok(())
    };
    let total_q = layout.seqs.last().map_or(0, |s| s.q_start + s.q_len);
    need("q", q.len(), total_q * h * d)?;
    need("k", k.len(), layout.total_tok * hkv * d)?;
    let path = PassPath::choose(dev.info().compute_capability, d);
    let kkey = key(T::DTYPE, d, emulate, path);
    let smem1 = layout.pass_smem(false, path);
    let smem2 = layout.pass_smem(true, path);
    let max_smem = dev.info().max_smem_per_block;
    if smem2 > max_smem {
        return Err(CudaError::Unsupported {
            op: "head_statistics",
            message: format!("head_dim {d} with block_size {} needs {smem2} bytes of shared memory (device: {max_smem})", layout.block_size),
        });
    }
    // The registry raises a function's dynamic-smem limit once, at first use: ask for the
    // device maximum so a later launch with a larger block size is not refused.
    let (name1, name2) = path.names();
    let f_pass1 = dev.function(&STATS, &kkey, name1, max_smem)?;
    let f_merge = dev.function(&STATS, &kkey, "stats_merge", 0)?;
    let f_pass2 = dev.function(&STATS, &kkey, name2, max_smem)?;
    let f_final = dev.function(&STATS, &kkey, "stats_slash_finalize", 0)?;
    let f_pool_k = dev.function(&STATS, &kkey, "stats_pool_k", 0)?;
    let f_est_logits = dev.function(&STATS, &kkey, "stats_estimate_logits", 0)?;
    let f_est = dev.function(&STATS, &kkey, "stats_estimate", 0)?;

    let nseq = layout.seqs.len();
    let total_splits = layout.work.len() / 2;
    let descs = stream.clone_htod(&layout.descs)?;
    let work = stream.clone_htod(&layout.work)?;
    let kb_seq = stream.clone_htod(&layout.kb_seq)?;
    let qb_seq = stream.clone_htod(&layout.qb_seq)?;
    let poison = layout.poison;
    let alloc = |n: usize| -> Result<CudaSlice<f32>> {
        if poison {
            return crate::backend::poisoned::<f32>(stream, n);
        }
        // SAFETY: every buffer below is fully written by the kernels before it is read
        // (checked by the poisoned-buffer tests).
        Ok(unsafe { stream.alloc::<f32>(n.max(1)) }?)
    };
    let rs = layout.row_stride();
    // SAFETY: pass 1 writes the state of every row a later pass reads (the merge also combines
    // the padding rows of shorter sequences, into lse2 entries no pass reads).
    let mut row_ml = unsafe { stream.alloc::<[f32; 2]>((total_splits * h * rs).max(1)) }?;
    let mut lse2 = alloc(nseq * h * rs)?;
    let mut slash_part = alloc(total_splits * h * layout.sl_stride)?;
    let mut vertical = alloc(layout.total_tok * h)?;
    let mut slash = alloc(layout.total_tok * h)?;
    let mut estimate = alloc(layout.total_kb * h)?;
    let mut rep_block_mass = alloc(layout.total_rep * h)?;
    let mut probe_block_mass = alloc(if layout.probes {
        layout.total_probe * h
    } else {
        1
    })?;
    let mut k_pooled = alloc(layout.total_kb * hkv * d)?;
    let q_pooled = alloc(layout.total_qb * h * d)?;

    let (h_i, hkv_i, split_i, rp_i, bs_i) = (
        h as i32,
        hkv as i32,
        SPLIT_KEYS as i32,
        layout.rp as i32,
        layout.block_size as i32,
    );
    // With round_q, Q̂ already carries the scale: the logits only change base.
    let scale_log2 = if emulate {
        std::f32::consts::LOG2_E
    } else {
        scale * std::f32::consts::LOG2_E
    };
    let sl_i = layout.sl_stride as i32;
    let emu_i = emulate as i32;
    let rs_i = rs as i32;
    // The probe rows ride along the representative passes (the key tiles are loaded once).
    let probes_i = layout.measures_probes() as i32;
    let grid_pass = (h as u32, total_splits as u32, 1);
    profile::mark(stream, "start");
    // SAFETY (all launches): argument lists match the kernels' signatures in stats.cu; every
    // buffer is sized by StatsLayout for the indices the kernels compute.
    unsafe {
        launch!(stream, f_pass1, crate::launch_cfg(grid_pass, NTHREADS, smem1);
            q, k, &descs, &work, &h_i, &hkv_i, &split_i, &rp_i, &rs_i, &scale, &scale_log2,
            &probes_i, &bs_i, &mut row_ml)?;
        profile::mark(stream, name1);
        launch!(stream, f_merge, crate::launch_cfg((h as u32, nseq as u32, 1), 256, 0);
            &descs, &row_ml, &h_i, &rs_i, &mut lse2)?;
        profile::mark(stream, "stats_merge");
        launch!(stream, f_pass2, crate::launch_cfg(grid_pass, NTHREADS, smem2);
            q, k, &descs, &work, &h_i, &hkv_i, &split_i, &rp_i, &rs_i, &bs_i, &scale, &scale_log2,
            &lse2, &sl_i, &mut vertical, &mut rep_block_mass, &mut slash_part, &probes_i,
            &mut probe_block_mass)?;
        profile::mark(stream, name2);
        let max_kv = layout.seqs.iter().map(|s| s.kv_len).max().unwrap_or(1);
        let grid_final = (max_kv.div_ceil(256) as u32, h as u32, nseq as u32);
        launch!(stream, f_final, crate::launch_cfg(grid_final, 256, 0);
            &descs, &slash_part, &h_i, &split_i, &sl_i, &mut slash)?;
        profile::mark(stream, "stats_slash_finalize");
        let grid_pool = (layout.total_kb as u32, hkv as u32, 1);
        launch!(stream, f_pool_k, crate::launch_cfg(grid_pool, (d / 4) as u32, 0);
            k, &descs, &kb_seq, &hkv_i, &bs_i, &emu_i, &mut k_pooled)?;
        profile::mark(stream, "stats_pool_k");
        // stats.cu's EST_TILE: key blocks per stats_estimate_logits CTA.
        let est_tile = if d <= 128 { 64 } else { 32 };
        let max_nkb = layout
            .seqs
            .iter()
            .map(|s| s.num_key_blocks(layout.block_size))
            .max()
            .unwrap_or(1);
        let grid_est = (max_nkb.div_ceil(est_tile) as u32, h as u32, nseq as u32);
        launch!(stream, f_est_logits, crate::launch_cfg(grid_est, 256, 0);
            q, &descs, &k_pooled, &h_i, &hkv_i, &scale, &emu_i, &mut estimate)?;
        launch!(stream, f_est, crate::launch_cfg((h as u32, nseq as u32, 1), 256, 0);
            &descs, &h_i, &mut estimate)?;
        profile::mark(stream, "stats_estimate");
    }
    Ok(DeviceStats {
        layout,
        descs,
        vertical,
        slash,
        estimate,
        rep_block_mass,
        probe_block_mass,
        k_pooled,
        q_pooled,
        scale,
        emulate,
        dtype: T::DTYPE,
        qb_seq,
        path,
    })
}

/// Queues the pooled queries `Q̄_r` (the query-aware map's input). With `qa_flag`
/// (`[num_seqs · H]` i32, nonzero = query-aware) only those heads are computed: the decision
/// stays on the device and vertical-slash heads cost nothing.
pub fn launch_pool_q<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    q: &CudaSlice<T>,
    stats: &mut DeviceStats,
    qa_flag: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let l = &stats.layout;
    let f = dev.function(
        &STATS,
        &key(T::DTYPE, l.shape.head_dim, stats.emulate, stats.path),
        "stats_pool_q",
        0,
    )?;
    let h_i = l.shape.num_heads as i32;
    let bs_i = l.block_size as i32;
    let emu_i = stats.emulate as i32;
    let grid = (l.total_qb as u32, l.shape.num_heads as u32, 1);
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: ((l.shape.head_dim / 4) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    if l.total_qb == 0 {
        return Ok(());
    }
    let null: u64 = 0;
    // SAFETY: arguments match `stats_pool_q`; a null flag pointer means "every head".
    unsafe {
        let mut b = stream.launch_builder(&f);
        b.arg(q)
            .arg(&stats.descs)
            .arg(&stats.qb_seq)
            .arg(&h_i)
            .arg(&bs_i)
            .arg(&stats.scale)
            .arg(&emu_i);
        match qa_flag {
            Some(flag) => b.arg(flag),
            None => b.arg(&null),
        };
        b.arg(&mut stats.q_pooled).launch(cfg)?;
    }
    profile::mark(stream, "stats_pool_q");
    Ok(())
}

impl DeviceStats {
    /// Device statistics from host arrays already in the layout's flat order: vertical, slash,
    /// estimate, rep_block_mass, k_pooled (per kv head), q_pooled. For tests and tools.
    pub fn from_parts(
        stream: &Arc<CudaStream>,
        layout: StatsLayout,
        parts: [Vec<f32>; 7],
        emulate: bool,
    ) -> Result<Self> {
        let up = |v: &Vec<f32>| -> Result<CudaSlice<f32>> {
            if v.is_empty() {
                Ok(stream.clone_htod(&[0f32])?)
            } else {
                Ok(stream.clone_htod(v)?)
            }
        };
        let [vertical, slash, estimate, rbm, kp, qp, pm] = &parts;
        Ok(Self {
            descs: stream.clone_htod(&layout.descs)?,
            qb_seq: stream.clone_htod(&layout.qb_seq)?,
            vertical: up(vertical)?,
            slash: up(slash)?,
            estimate: up(estimate)?,
            rep_block_mass: up(rbm)?,
            k_pooled: up(kp)?,
            q_pooled: up(qp)?,
            probe_block_mass: up(pm)?,
            scale: 0.0,
            emulate,
            dtype: DType::BF16,
            path: PassPath::Mma,
            layout,
        })
    }

    /// Downloads everything and splits it per (sequence, head), sequence-major. Synchronises.
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<Vec<HeadStatistics>> {
        let l = &self.layout;
        let vertical = stream.clone_dtoh(&self.vertical)?;
        let slash = stream.clone_dtoh(&self.slash)?;
        let estimate = stream.clone_dtoh(&self.estimate)?;
        let rbm = stream.clone_dtoh(&self.rep_block_mass)?;
        let kp = stream.clone_dtoh(&self.k_pooled)?;
        let qp = stream.clone_dtoh(&self.q_pooled)?;
        let pm = if l.probes {
            stream.clone_dtoh(&self.probe_block_mass)?
        } else {
            Vec::new()
        };
        stream.synchronize()?;
        let (h, d) = (l.shape.num_heads, l.shape.head_dim);
        let mut out = Vec::with_capacity(l.seqs.len() * h);
        for (si, s) in l.seqs.iter().enumerate() {
            let (nkb, nqb) = (
                s.num_key_blocks(l.block_size),
                s.num_query_blocks(l.block_size),
            );
            let rep = l.num_rep(si);
            for head in 0..h {
                let lo = l.line_offset(si, head);
                let eo = l.estimate_offset(si, head);
                let ro = l.rep_offset(si, head);
                let ko = l.k_pooled_offset(si, l.shape.kv_head(head));
                let qo = l.q_pooled_offset(si, head);
                out.push(HeadStatistics {
                    vertical: vertical[lo..lo + s.kv_len].to_vec(),
                    slash: slash[lo..lo + s.kv_len].to_vec(),
                    estimate: estimate[eo..eo + nkb].to_vec(),
                    q_pooled: qp[qo..qo + nqb * d].to_vec(),
                    k_pooled: kp[ko..ko + nkb * d].to_vec(),
                    rep_block_mass: rbm[ro..ro + rep * nkb].to_vec(),
                    probe_block_mass: if l.probes {
                        let po = l.probe_offset(si, head);
                        pm[po..po + l.num_probes(si) * nkb].to_vec()
                    } else {
                        Vec::new()
                    },
                    bf16_pooled_logits: self.emulate,
                });
            }
        }
        Ok(out)
    }

    /// dtype of the q/k the statistics were computed from.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Host-facing statistics: uploads q and k (f32 rounded to bf16, as the backend's attention
/// does), runs every kernel, downloads. Synchronises.
pub(crate) fn head_statistics(
    dev: &CudaDevice,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> Result<Vec<HeadStatistics>> {
    cfg.validate()?;
    x.validate()?;
    let stream = dev.stream();
    let mut layout = StatsLayout::new(&x.seqs, x.shape, cfg.block_size)?
        .with_probes(cfg.selection == SelectionMode::Faithful);
    layout.poison = true;
    let (scale, emulate) = estimation_scale(x.shape, x.scale(), x.dtype(), cfg);
    match (x.q, x.k) {
        (TensorRef::BF16(q), TensorRef::BF16(k)) => {
            let (qd, kd) = (stream.clone_htod(q)?, stream.clone_htod(k)?);
            let mut st = launch_stats(dev, stream, &qd, &kd, layout, scale, emulate)?;
            launch_pool_q(dev, stream, &qd, &mut st, None)?;
            st.to_host(stream)
        }
        (TensorRef::F16(q), TensorRef::F16(k)) => {
            let (qd, kd) = (stream.clone_htod(q)?, stream.clone_htod(k)?);
            let mut st = launch_stats(dev, stream, &qd, &kd, layout, scale, emulate)?;
            launch_pool_q(dev, stream, &qd, &mut st, None)?;
            st.to_host(stream)
        }
        (TensorRef::F32(q), TensorRef::F32(k)) => {
            let cv = |t: &[f32]| {
                t.iter()
                    .map(|&a| half::bf16::from_f32(a))
                    .collect::<Vec<_>>()
            };
            let (qd, kd) = (stream.clone_htod(&cv(q))?, stream.clone_htod(&cv(k))?);
            let mut st = launch_stats(dev, stream, &qd, &kd, layout, scale, false)?;
            launch_pool_q(dev, stream, &qd, &mut st, None)?;
            st.to_host(stream)
        }
        _ => Err(flexprefill_core::Error::DType {
            q: x.q.dtype().name(),
            k: x.k.dtype().name(),
            v: x.v.dtype().name(),
        }
        .into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! GPU tests (ignored without a GPU): the device statistics against the CPU oracle's
    //! `head_statistics` on testkit workloads, every output element written (poisoned first).

    use super::*;
    use flexprefill_core::Backend;
    use flexprefill_cpu::CpuBackend;
    use flexprefill_testkit::owned::OwnedInput;
    use flexprefill_testkit::workload::{generate, WorkloadKind, WorkloadSpec};

    pub(crate) fn device() -> Arc<CudaDevice> {
        CudaDevice::new(0).expect("a CUDA device (run with --include-ignored on the GPU machine)")
    }

    /// A fresh seed per run (inputs differ between runs), printed so a failure can be replayed.
    pub(crate) fn seed() -> u64 {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        eprintln!("seed {s}");
        s
    }

    pub(crate) fn workload(
        kind: WorkloadKind,
        len: usize,
        h: usize,
        hkv: usize,
        d: usize,
        seed: u64,
    ) -> OwnedInput {
        let spec = WorkloadSpec {
            kind,
            batch: 1,
            seq_len: len,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            seed,
        };
        generate(&spec).owned()
    }

    /// Two sequences of different lengths packed into one ragged input.
    pub(crate) fn ragged(a: &OwnedInput, b: &OwnedInput) -> OwnedInput {
        let parts: Vec<_> = [a, b]
            .iter()
            .map(|o| (o.q.to_f32_vec(), o.k.to_f32_vec(), o.v.to_f32_vec()))
            .collect();
        OwnedInput::pack_f32(a.shape, &parts)
    }

    fn l1(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs())
            .sum()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f64 {
        let scale = b
            .iter()
            .fold(0f64, |m, &y| m.max(y.abs() as f64))
            .max(1e-30);
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs() / scale)
            .fold(0.0, f64::max)
    }

    /// Compares every field; returns the worst line L1 distance seen.
    pub(crate) fn compare(
        gpu: &[HeadStatistics],
        cpu: &[HeadStatistics],
        line_tol: f64,
        what: &str,
    ) -> f64 {
        assert_eq!(gpu.len(), cpu.len());
        let mut worst = 0f64;
        for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
            for (name, a, b) in [
                ("vertical", &g.vertical, &c.vertical),
                ("slash", &g.slash, &c.slash),
                ("estimate", &g.estimate, &c.estimate),
            ] {
                assert!(
                    a.iter().all(|x| x.is_finite()),
                    "{what} head {i}: {name} has a non-finite value (unwritten?)"
                );
                let d = l1(a, b);
                worst = worst.max(d);
                assert!(
                    d <= line_tol,
                    "{what} head {i}: {name} L1 distance {d:e} > {line_tol:e}"
                );
            }
            let nkb = c.estimate.len();
            assert_eq!(
                g.rep_block_mass.len(),
                c.rep_block_mass.len(),
                "{what}: rep_block_mass length"
            );
            for (r, (a, b)) in g
                .rep_block_mass
                .chunks(nkb)
                .zip(c.rep_block_mass.chunks(nkb))
                .enumerate()
            {
                assert!(
                    a.iter().all(|x| x.is_finite()),
                    "{what} head {i} rep row {r}: non-finite"
                );
                let d = l1(a, b);
                assert!(d <= line_tol, "{what} head {i} rep row {r}: L1 {d:e}");
            }
            assert_eq!(
                g.probe_block_mass.len(),
                c.probe_block_mass.len(),
                "{what}: probe_block_mass length"
            );
            for (r, (a, b)) in g
                .probe_block_mass
                .chunks(nkb.max(1))
                .zip(c.probe_block_mass.chunks(nkb.max(1)))
                .enumerate()
            {
                assert!(
                    a.iter().all(|x| x.is_finite()),
                    "{what} head {i} probe {r}: non-finite"
                );
                let d = l1(a, b);
                assert!(d <= line_tol, "{what} head {i} probe {r}: L1 {d:e}");
            }
            for (name, a, b) in [
                ("k_pooled", &g.k_pooled, &c.k_pooled),
                ("q_pooled", &g.q_pooled, &c.q_pooled),
            ] {
                assert!(
                    a.iter().all(|x| x.is_finite()),
                    "{what} head {i}: {name} non-finite"
                );
                let d = max_rel(a, b);
                assert!(
                    d <= 1e-2,
                    "{what} head {i}: {name} max relative difference {d:e}"
                );
            }
        }
        eprintln!("{what}: worst line L1 {worst:.3e}");
        worst
    }

    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so)"]
    fn stats_kernels_compile_without_spills_at_d128() {
        use crate::registry::compile_offline;
        let mut spills = Vec::new();
        for arch in [(9, 0), (8, 0)] {
            for dtype in [DType::BF16, DType::F16] {
                for d in [64, 96, 128, 256] {
                    let (_, log) =
                        compile_offline(&STATS, &key(dtype, d, false, PassPath::Mma), arch)
                            .unwrap_or_else(|e| panic!("stats {dtype} d{d} sm{arch:?}: {e}"));
                    if arch == (9, 0) && dtype == DType::BF16 {
                        println!("sm90 {dtype} d{d}\n{log}");
                    }
                    // ptxas: "N bytes stack frame, S bytes spill stores, L bytes spill loads".
                    // None at head_dim 128 on Hopper (the tuned shape); at most 16 bytes (a
                    // few registers) elsewhere.
                    for line in log.lines().filter(|l| l.contains("spill stores")) {
                        let stores: usize = line
                            .split(',')
                            .find(|f| f.contains("spill stores"))
                            .and_then(|f| f.split_whitespace().next())
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(usize::MAX);
                        let limit = if d == 128 && arch == (9, 0) { 0 } else { 16 };
                        if stores > limit {
                            spills.push(format!("stats {dtype} d{d} sm{arch:?}: {line}"));
                        }
                    }
                }
            }
        }
        assert!(spills.is_empty(), "spills:\n{}", spills.join("\n"));
    }

    /// (function, spill-store bytes) of every function in a `ptxas -v` log.
    fn spills_per_function(log: &str) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut current = None;
        for line in log.lines() {
            if let Some(i) = line.find("Function properties for ") {
                current = Some(
                    line[i + "Function properties for ".len()..]
                        .trim()
                        .to_string(),
                );
            } else if line.contains("spill stores") {
                let stores = line
                    .split(',')
                    .find(|f| f.contains("spill stores"))
                    .and_then(|f| f.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                out.push((current.take().unwrap_or_default(), stores));
            }
        }
        out
    }

    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so)"]
    fn wgmma_passes_compile_for_hopper_without_spills() {
        use crate::registry::compile_offline;
        for dtype in [DType::BF16, DType::F16] {
            for d in [64, 128] {
                for (emulate, overlap) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let path = PassPath::Wgmma { overlap };
                    let (_, log) = compile_offline(&STATS, &key(dtype, d, emulate, path), (9, 0))
                        .unwrap_or_else(|e| panic!("stats wgmma {dtype} d{d} {path:?}: {e}"));
                    if log.trim().is_empty() {
                        // The GPU machine's NVRTC 13.0 returns no ptxas report at all (the one
                        // on the build machine does): compiled, but nothing to inspect.
                        println!("{dtype} d{d} {path:?}: compiled; NVRTC gave no ptxas report, spill check not possible with this NVRTC");
                        continue;
                    }
                    let passes: Vec<_> = spills_per_function(&log)
                        .into_iter()
                        .filter(|(f, _)| f.ends_with("_sm90"))
                        .collect();
                    assert_eq!(passes.len(), 2, "both wgmma passes compiled: {log}");
                    for (f, stores) in passes {
                        assert_eq!(stores, 0, "{f} {dtype} d{d} {path:?} spills: {log}");
                    }
                    // ptxas must not serialize the wgmma (C7514/C7518) nor inject waits (C7517).
                    assert!(
                        !log.contains("serialized") && !log.contains("is injected"),
                        "{dtype} d{d} {path:?}: {log}"
                    );
                    let regs: Vec<&str> = log.lines().filter(|l| l.contains("registers")).collect();
                    println!("sm90a wgmma {dtype} d{d} emulate {emulate} {path:?}: {regs:?}");
                }
            }
        }
    }

    #[test]
    fn wgmma_path_only_on_hopper_at_head_dim_64_and_128() {
        // The env switches are read at launch; this test only covers the arch/head_dim rule
        // when neither is set (CI sets none).
        if std::env::var_os("FLEXPREFILL_STATS_MMA").is_some()
            || std::env::var_os("FLEXPREFILL_STATS_OVERLAP").is_some()
        {
            return;
        }
        let wg = PassPath::Wgmma { overlap: false };
        assert_eq!(PassPath::choose((9, 0), 128), wg);
        assert_eq!(PassPath::choose((9, 0), 64), wg);
        assert_eq!(PassPath::choose((9, 0), 96), PassPath::Mma);
        assert_eq!(PassPath::choose((8, 0), 128), PassPath::Mma);
        assert_eq!(PassPath::choose((10, 0), 128), PassPath::Mma);
        assert_eq!(wg.names(), ("stats_pass1_sm90", "stats_pass2_sm90"));
        assert_eq!(PassPath::Mma.names(), ("stats_pass1", "stats_pass2"));
        // The wgmma layout fits the device limit at the largest representative block.
        let seqs = [Sequence {
            q_start: 0,
            k_start: 0,
            q_len: 4096,
            kv_len: 4096,
        }];
        for bs in [16, 64, 128, 256] {
            let l = StatsLayout::new(
                &seqs,
                AttentionShape::new(32, 8, 128).expect("valid shape"),
                bs,
            )
            .expect("layout")
            .with_probes(true);
            for path in [wg, PassPath::Wgmma { overlap: true }] {
                let (p1, p2) = (l.pass_smem(false, path), l.pass_smem(true, path));
                assert!(p1.max(p2) <= 227 * 1024, "bs {bs} {path:?}");
                // Block 128 (the tuned shape): two CTAs per SM (228 KiB, 1 KiB reserved per CTA).
                if bs == 128 {
                    assert!(2 * (p1.max(p2) + 1024) <= 228 * 1024, "{path:?}: {p1} {p2}");
                }
            }
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn statistics_match_the_cpu_oracle() {
        let dev = device();
        let cpu = CpuBackend::new();
        let seed = seed();
        let faithful = FlexPrefillConfig::default();
        let original = FlexPrefillConfig::original();
        let cases: Vec<(&str, OwnedInput, FlexPrefillConfig, f64)> = vec![
            (
                "sink_local 2048 bf16",
                workload(WorkloadKind::SinkLocal, 2048, 4, 2, 128, seed).to_dtype(DType::BF16),
                faithful,
                2e-3,
            ),
            (
                "stripes 3000 f16 (partial block)",
                workload(WorkloadKind::Stripes, 3000, 4, 1, 128, seed + 1).to_dtype(DType::F16),
                faithful,
                2e-3,
            ),
            (
                "topics 2048 bf16 original (bf16 emulation)",
                workload(WorkloadKind::Topics, 2048, 4, 2, 128, seed + 2).to_dtype(DType::BF16),
                original,
                2e-2,
            ),
            (
                "random 1500 bf16 d64",
                workload(WorkloadKind::Random, 1500, 4, 4, 64, seed + 3).to_dtype(DType::BF16),
                faithful,
                2e-3,
            ),
            (
                "needle 2500 bf16 bs64",
                workload(WorkloadKind::Needle, 2500, 2, 1, 128, seed + 4).to_dtype(DType::BF16),
                faithful.with_block_size(64),
                2e-3,
            ),
            (
                "mixed 1800 bf16 bs256",
                workload(WorkloadKind::Mixed, 1800, 4, 2, 128, seed + 5).to_dtype(DType::BF16),
                faithful.with_block_size(256),
                2e-3,
            ),
            (
                "topics 1400 bf16 d96 bs32",
                workload(WorkloadKind::Topics, 1400, 4, 2, 96, seed + 10).to_dtype(DType::BF16),
                faithful.with_block_size(32),
                2e-3,
            ),
            (
                "stripes 1000 bf16 bs16",
                workload(WorkloadKind::Stripes, 1000, 2, 1, 64, seed + 6).to_dtype(DType::BF16),
                faithful.with_block_size(16),
                2e-3,
            ),
        ];
        let long = workload(WorkloadKind::Mixed, 2600, 4, 2, 128, seed + 7);
        let chunk = long
            .chunk(2000, 2600)
            .expect("valid chunk")
            .to_dtype(DType::BF16);
        let tiny = long
            .chunk(2550, 2600)
            .expect("valid chunk")
            .to_dtype(DType::BF16);
        let rag = ragged(
            &workload(WorkloadKind::SinkLocal, 700, 4, 2, 128, seed + 8),
            &workload(WorkloadKind::Stripes, 1300, 4, 2, 128, seed + 9),
        )
        .to_dtype(DType::BF16);
        let mut cases = cases;
        cases.push(("chunk q 2000..2600 of 2600", chunk, faithful, 2e-3));
        cases.push(("chunk of 50 queries (R < bs)", tiny, faithful, 2e-3));
        cases.push(("ragged 700 + 1300", rag, faithful, 2e-3));
        for (what, owned, cfg, tol) in &cases {
            let x = owned.input().expect("valid input");
            let want = cpu.head_statistics(&x, cfg).expect("cpu statistics");
            let got = head_statistics(&dev, &x, cfg).expect("gpu statistics");
            compare(&got, &want, *tol, what);
        }
    }
}
