//! Representative attention and head statistics on the GPU (`kernels/stats/`).
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

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use flexprefill_core::{
    AttentionInput, AttentionShape, DType, FlexPrefillConfig, HeadStatistics, SelectionMode,
    Sequence, TensorRef,
};

use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::registry::{KernelFamily, KernelKey};
use crate::workspace::{Buf, Scratch};

mod estimate;
mod layout;
pub mod oracle;
mod passes;
pub mod profile;
mod sampled;

pub use estimate::launch_pool_q;
pub(crate) use passes::key;
pub use passes::launch_stats;
pub(crate) use passes::launch_stats_in;
pub use profile::take as profile_take;

/// The statistics kernel family, one NVRTC program: the shared `SeqDesc`, the header the two
/// pass implementations share, the mma.sync passes, the pooling and estimate kernels, the
/// sampled mode's estimate (`kernels/stats/sampled.cu`), and the
/// Hopper passes (`kernels/stats/passes_sm90.cu`, compiled in only with `STATS_WGMMA=1`: one
/// module holds one passes' variant and the shared merge, finalize, pooling and estimate
/// kernels).
pub(crate) static STATS: KernelFamily = KernelFamily {
    name: "stats",
    source: concat!(
        include_str!("../kernels/seq_desc.cuh"),
        "\n",
        include_str!("../kernels/stats/common.cuh"),
        "\n",
        include_str!("../kernels/stats/passes.cu"),
        "\n",
        include_str!("../kernels/stats/estimate.cu"),
        "\n",
        include_str!("../kernels/stats/sampled.cu"),
        "\n",
        include_str!("../kernels/stats/passes_sm90.cu")
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
    /// `kernels/stats/passes_sm90.cu`).
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
/// Rows per row group (8 warps × 16 rows), tile of keys, threads, warps: must match
/// kernels/stats/common.cuh.
const ROWS: usize = 128;
const KT: usize = 64;
const NTHREADS: u32 = 256;
const NWARPS: usize = 8;
/// Probe rows (one m16 tile riding along the representative passes), the pitch of a warp's
/// probability quarter strip and of its diagonal partials: must match kernels/stats/common.cuh.
const PQ: usize = 16;
const PP: usize = 24;
const DPITCH: usize = 80;
/// Key-tile ring of the wgmma pass 1 (kernels/stats/passes_sm90.cu's KSTAGES; pass 2
/// double-buffers) and the slack that lets the kernels align their swizzled tiles to 1024 bytes.
const WG_STAGES: usize = 3;
const WG_ALIGN: usize = 1024;
const _: () = assert!(
    flexprefill_core::selection::PROBE_QUERIES <= PQ,
    "the probe rows must fit one m16 tile of the statistics kernels"
);

/// One sequence as the statistics and selection kernels see it: `kernels/seq_desc.cuh`, whose
/// `static_assert` checks the same 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeqDesc {
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
    probe_off: u32,
    qk_off: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<SeqDesc>() == 64);

// SAFETY: plain old data (16 u32, no padding), laid out as the kernel's struct.
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
    /// Also compute the sampled mode's estimate (`HeadStatistics::sampled_block_mass`). Set by
    /// [`StatsLayout::with_sampled`].
    pub sampled: bool,
    /// Σ nqb · nkb over the sequences (per head).
    total_qk: usize,
}

/// Every statistic of a batch, resident on the device, laid out as [`StatsLayout`] says.
#[derive(Debug)]
pub struct DeviceStats {
    /// The plan the buffers follow.
    pub layout: StatsLayout,
    /// Sequence descriptors (the selection kernels read them too).
    pub(crate) descs: Buf<SeqDesc>,
    /// `[Σ kv_len · H]`.
    pub vertical: Buf<f32>,
    /// `[Σ kv_len · H]`, by distance.
    pub slash: Buf<f32>,
    /// `[Σ nkb · H]`.
    pub estimate: Buf<f32>,
    /// `[Σ rep · nkb · H]`.
    pub rep_block_mass: Buf<f32>,
    /// `[Σ probes · nkb · H]` when the layout measures probes (else one unused element).
    pub probe_block_mass: Buf<f32>,
    /// `[Σ nkb · Hkv · D]` (per kv head: the query heads of a group share it).
    pub k_pooled: Buf<f32>,
    /// `[Σ nqb · H · D]`; filled by [`launch_pool_q`].
    pub q_pooled: Buf<f32>,
    /// `[Σ nqb · nkb · H]` when the layout computes the sampled estimate (else one unused
    /// element).
    pub sampled_block_mass: Buf<f32>,
    /// Estimation scale `e` and whether the original's bf16 rounding is replayed.
    pub scale: f32,
    /// Replaying the original's bf16 rounding points.
    pub emulate: bool,
    dtype: DType,
    qb_seq: Buf<u32>,
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

impl DeviceStats {
    /// Device statistics from host arrays already in the layout's flat order: vertical, slash,
    /// estimate, rep_block_mass, k_pooled (per kv head), q_pooled. For tests and tools. The
    /// sampled estimate is not among the parts: add it with
    /// [`DeviceStats::with_sampled_block_mass`] (until then the statistics have none).
    pub fn from_parts(
        stream: &Arc<CudaStream>,
        mut layout: StatsLayout,
        parts: [Vec<f32>; 7],
        emulate: bool,
    ) -> Result<Self> {
        layout.sampled = false;
        let up = |v: &Vec<f32>| -> Result<Buf<f32>> {
            if v.is_empty() {
                Ok(stream.clone_htod(&[0f32])?.into())
            } else {
                Ok(stream.clone_htod(v)?.into())
            }
        };
        let [vertical, slash, estimate, rbm, kp, qp, pm] = &parts;
        Ok(Self {
            descs: stream.clone_htod(&layout.descs)?.into(),
            qb_seq: stream.clone_htod(&layout.qb_seq)?.into(),
            vertical: up(vertical)?,
            slash: up(slash)?,
            estimate: up(estimate)?,
            rep_block_mass: up(rbm)?,
            k_pooled: up(kp)?,
            q_pooled: up(qp)?,
            probe_block_mass: up(pm)?,
            sampled_block_mass: stream.clone_htod(&[0f32])?.into(),
            scale: 0.0,
            emulate,
            dtype: DType::BF16,
            path: PassPath::Mma,
            layout,
        })
    }

    /// Replaces the sampled estimate with host values in the layout's flat order
    /// (`[Σ nqb · nkb · H]`, see [`StatsLayout::sampled_offset`]). For tests and tools.
    pub fn with_sampled_block_mass(
        mut self,
        stream: &Arc<CudaStream>,
        sampled: &[f32],
    ) -> Result<Self> {
        let want = self.layout.total_qk * self.layout.shape.num_heads;
        if sampled.len() != want {
            return Err(CudaError::BufferLen {
                op: "head_statistics",
                name: "sampled_block_mass",
                got: sampled.len(),
                want,
            });
        }
        self.layout.sampled = true;
        if !sampled.is_empty() {
            self.sampled_block_mass = stream.clone_htod(sampled)?.into();
        }
        Ok(self)
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
        let sbm = if l.sampled {
            stream.clone_dtoh(&self.sampled_block_mass)?
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
                let mut st = HeadStatistics::new(
                    vertical[lo..lo + s.kv_len].to_vec(),
                    slash[lo..lo + s.kv_len].to_vec(),
                    estimate[eo..eo + nkb].to_vec(),
                    qp[qo..qo + nqb * d].to_vec(),
                    kp[ko..ko + nkb * d].to_vec(),
                    rbm[ro..ro + rep * nkb].to_vec(),
                );
                st.probe_block_mass = if l.probes {
                    let po = l.probe_offset(si, head);
                    pm[po..po + l.num_probes(si) * nkb].to_vec()
                } else {
                    Vec::new()
                };
                if l.sampled {
                    let so = l.sampled_offset(si, head);
                    st.sampled_block_mass = sbm[so..so + nqb * nkb].to_vec();
                }
                st.bf16_pooled_logits = self.emulate;
                out.push(st);
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
    let mut layout = StatsLayout::for_mode(&x.seqs, x.shape, cfg)?;
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
pub(crate) mod tests;
