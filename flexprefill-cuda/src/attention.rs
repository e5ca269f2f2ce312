//! Block-sparse causal flash attention on the device (`kernels/attention.cu`), and the device
//! types it reads: sequences and the CSR block index, resident on the GPU.
//!
//! The kernel is FlashAttention-2's forward (online softmax, f32 accumulation, tensor cores
//! through `mma.sync` m16n8k16, `ldmatrix`, a `cp.async` ring) with one change: each CTA walks
//! the key blocks listed in its row of the [`BlockIndex`] instead of every causal block. With
//! no index it walks every causal block, which is this crate's dense attention.
//!
//! On Hopper two more kernels run the same walk: `kernels/attention_sm90.cu` (wgmma, every
//! thread loads and computes) and `kernels/attention_ws.cu` (warp-specialized: a TMA producer
//! and two wgmma consumer warpgroups, docs/CUDA.md draws its pipeline); [`AttnTile::auto_for`]
//! picks among them.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use flexprefill_core::{AttentionShape, BlockIndex, DType, Sequence};

use crate::device::CudaDevice;
use crate::error::{CudaError, Result};
use crate::launch::Launch;
use crate::registry::{KernelFamily, KernelKey};
use crate::workspace::{Buf, Scratch};

/// The attention kernel family (mma.sync, compute capability 8.0 and newer).
pub static ATTENTION: KernelFamily = KernelFamily {
    name: "attention",
    source: concat!(
        include_str!("../kernels/attention_params.cuh"),
        include_str!("../kernels/attention.cu")
    ),
};

/// The Hopper attention kernel family (wgmma, sm_90a): same parameters and semantics.
pub static ATTENTION_SM90: KernelFamily = KernelFamily {
    name: "attention_sm90",
    source: concat!(
        include_str!("../kernels/attention_params.cuh"),
        include_str!("../kernels/attention_wgmma.cuh"),
        include_str!("../kernels/attention_sm90.cu")
    ),
};

/// The warp-specialized Hopper attention kernel family (TMA producer warp, two wgmma consumer
/// warpgroups, mbarrier ring; sm_90a): same semantics, plus three tensor maps.
pub static ATTENTION_WS: KernelFamily = KernelFamily {
    name: "attention_ws",
    source: concat!(
        include_str!("../kernels/attention_params.cuh"),
        include_str!("../kernels/attention_wgmma.cuh"),
        include_str!("../kernels/attention_ws.cu")
    ),
};

// The dense-walk decision has its own module beside its kernel; its public names stay here.
pub(crate) use crate::dense_walk::choose_dense_walk_into;
pub use crate::dense_walk::{
    choose_dense_walk, dense_walk_density, DENSE_WALK, DENSE_WALK_DENSITY, SPARSE_BLOCK_COST,
};

/// 16-bit element types the attention kernel reads (bf16, f16).
pub trait DeviceElem: DeviceRepr + Copy + Default + Send + Sync + 'static {
    /// Its core dtype.
    const DTYPE: DType;
    /// Rounds an f32.
    fn from_f32(x: f32) -> Self;
    /// Widens to f32.
    fn to_f32(self) -> f32;
    /// Wraps a downloaded buffer as core's host tensor.
    fn into_host(v: Vec<Self>) -> flexprefill_core::HostTensor;
}

impl DeviceElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn into_host(v: Vec<Self>) -> flexprefill_core::HostTensor {
        flexprefill_core::HostTensor::BF16(v)
    }
}

impl DeviceElem for half::f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn into_host(v: Vec<Self>) -> flexprefill_core::HostTensor {
        flexprefill_core::HostTensor::F16(v)
    }
}

/// Tile shape of one attention launch: speed only, never semantics (FA's kernel traits).
///
/// `bq` query rows per CTA (divides the index's block size: a 128-row block may be split into
/// two 64-row tiles that read the same index row), `bk` keys per pipeline step, `warps` per CTA
/// (each warp owns `bq / warps` rows, in 16-row m-tiles), `stages` of the K/V `cp.async` ring,
/// `q_in_regs` keeps Q's fragments in registers (one m-tile per warp only), `min_blocks` is the
/// `__launch_bounds__` occupancy hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttnTile {
    /// Query rows per CTA.
    pub bq: usize,
    /// Keys per pipeline step.
    pub bk: usize,
    /// Warps per CTA.
    pub warps: usize,
    /// K/V ring depth.
    pub stages: usize,
    /// Q fragments in registers.
    pub q_in_regs: bool,
    /// CTAs per SM the register allocation must allow.
    pub min_blocks: usize,
    /// Run the Hopper kernel (`kernels/attention_sm90.cu`, wgmma): `bq` is 64 per warpgroup,
    /// `warps` = `bq / 16`, `q_in_regs` unused; `stages` 3 turns on the overlap of the next
    /// tile's Q·Kᵀ with the current softmax (2: no overlap).
    pub wgmma: bool,
    /// Run the warp-specialized Hopper kernel (`kernels/attention_ws.cu`; `wgmma` is set too):
    /// a TMA producer warpgroup plus `bq / 64` consumer warpgroups (`warps` = `bq / 16 + 4`),
    /// `stages` the depth of the K/V ring.
    pub ws: bool,
}

impl AttnTile {
    /// The portable (mma.sync) tile we ship for `(head_dim, block_size)`.
    ///
    /// head_dim ≤ 128: FA2's hdim-128 forward shape, 128 query rows over 4 warps (32 rows, two
    /// m-tiles per warp: each K/V fragment read from shared memory feeds two MMAs, which keeps
    /// shared-memory bandwidth under the tensor-core rate), two CTAs per SM. 32-key steps: with
    /// 64 the S accumulators push ptxas to 255 registers and a spill, and on the H200 the
    /// 32-key tile ran 1–3% faster (311 against 304 TFLOP/s at 128k, docs/PERFORMANCE.md). Block 64 uses 64-row tiles (the
    /// tile may not straddle index rows). head_dim 256 halves the rows (the O accumulator is
    /// 256 floats per row) and the key step (shared memory). Blocks of 16 and 32 get tiles of
    /// their own size (correct everywhere, tuned nowhere).
    pub fn auto(head_dim: usize, block_size: usize) -> Self {
        let base = Self {
            bq: 128,
            bk: 32,
            warps: 4,
            stages: 2,
            q_in_regs: false,
            min_blocks: 2,
            wgmma: false,
            ws: false,
        };
        if head_dim > 128 {
            // The O accumulator is head_dim/2 floats per thread per 16 rows: one m-tile.
            let bq = block_size.min(64);
            return Self {
                bq,
                bk: block_size.min(32),
                warps: bq / 16,
                min_blocks: 1,
                ..base
            };
        }
        match block_size {
            // Blocks under 128 rows: one 16-row m-tile per warp, Q fragments in registers.
            16 | 32 | 64 => Self {
                bq: block_size,
                bk: block_size,
                warps: block_size / 16,
                q_in_regs: true,
                ..base
            },
            _ => base,
        }
    }

    /// The tile we ship for a device of compute capability `arch`: on Hopper for block 128 the
    /// warp-specialized TMA kernel ([`AttnTile::ws_for`], head_dim 64/128), else the wgmma
    /// kernel for head_dim 64 and 128 (two warpgroups, 128 query rows, 128-key tiles for block
    /// 128 and up; one warpgroup and 64-key tiles for block 64), [`AttnTile::auto`] elsewhere.
    /// Dense attention walks 128-blocks, so it always gets the warp-specialized kernel there.
    /// At block 64 the warp-specialized kernel (one consumer warpgroup) timed 1–2% behind the
    /// wgmma one on sparse indexes, so it is opt-in there.
    ///
    /// `FLEXPREFILL_ATTN` overrides the Hopper choice (A/B timing, and an escape hatch):
    /// `wgmma` never runs the warp-specialized kernel, `ws` runs it for every shape it takes,
    /// `mma` runs the portable kernel.
    pub fn auto_for(arch: (i32, i32), head_dim: usize, block_size: usize) -> Self {
        let choice = std::env::var("FLEXPREFILL_ATTN").unwrap_or_default();
        if arch != (9, 0) || choice == "mma" {
            return Self::auto(head_dim, block_size);
        }
        if choice == "ws" || (choice != "wgmma" && block_size == 128) {
            if let Some(t) = Self::ws_for(head_dim, block_size) {
                return t;
            }
        }
        if (head_dim == 64 || head_dim == 128) && block_size >= 64 {
            let bq = block_size.min(128);
            Self::wgmma(bq, block_size.min(128))
        } else {
            Self::auto(head_dim, block_size)
        }
    }

    /// The warp-specialized tile for `(head_dim, block_size)` on Hopper, if the kernel takes
    /// the shape (head_dim 64/128, block 64/128): 128 query rows over two consumer warpgroups
    /// and 128-key tiles for block 128, one consumer warpgroup and 64-key tiles for block 64.
    /// Ring depth 3 (`FLEXPREFILL_ATT_STAGES` overrides it): on the H200 with the chunked CTA
    /// order ([`tile_chunk`] 32), 128-row tiles at head_dim 128 ran sparse indexes at density
    /// 0.3 at 559–623 TFLOP/s with 3 stages against 557–597 with 2, dense 591 against 593 (32k,
    /// 128k); 64-row tiles had timed 390 against 383 dense with 3.
    pub fn ws_for(head_dim: usize, block_size: usize) -> Option<Self> {
        if !(head_dim == 64 || head_dim == 128) || !(block_size == 64 || block_size == 128) {
            return None;
        }
        let stages = env_parse::<usize>("FLEXPREFILL_ATT_STAGES")
            .filter(|s| (2..=4).contains(s))
            .unwrap_or(3);
        Some(Self::ws(block_size, block_size, stages))
    }

    /// A warp-specialized tile of `bq` query rows (64 per consumer warpgroup), `bk`-key steps
    /// and a `stages`-deep K/V ring.
    pub fn ws(bq: usize, bk: usize, stages: usize) -> Self {
        Self {
            bq,
            bk,
            warps: bq / 16 + 4,
            stages,
            q_in_regs: false,
            min_blocks: 1,
            wgmma: true,
            ws: true,
        }
    }

    /// A wgmma tile of `bq` query rows (64 per warpgroup) and `bk`-key steps.
    pub fn wgmma(bq: usize, bk: usize) -> Self {
        Self {
            bq,
            bk,
            warps: bq / 16,
            stages: 2,
            q_in_regs: false,
            min_blocks: 1,
            wgmma: true,
            ws: false,
        }
    }

    /// Tile shapes worth timing against each other on a new GPU (the bench's `--variants`):
    /// the portable default, wgmma shapes, mma.sync shapes.
    pub fn variants(head_dim: usize, block_size: usize) -> Vec<Self> {
        let base = Self::auto(head_dim, block_size);
        let mut v = vec![
            Self::auto(head_dim, block_size),
            Self::wgmma(128, 128),
            Self::ws(128, 128, 2),
            Self::ws(128, 128, 3),
            Self::ws(64, 64, 2),
            Self::ws(64, 64, 3),
            Self {
                stages: 3,
                ..Self::wgmma(128, 128)
            },
            Self {
                stages: 3,
                ..Self::wgmma(128, 64)
            },
            Self::wgmma(128, 64),
            Self::wgmma(64, 64),
            Self {
                min_blocks: 2,
                ..Self::wgmma(64, 64)
            },
            Self {
                stages: 3,
                min_blocks: 1,
                ..base
            },
            Self {
                bq: 128,
                warps: 8,
                q_in_regs: true,
                min_blocks: 1,
                ..base
            },
            Self {
                bq: 128,
                warps: 8,
                q_in_regs: false,
                min_blocks: 1,
                ..base
            },
            Self {
                bq: 64,
                warps: 4,
                q_in_regs: true,
                min_blocks: 2,
                ..base
            },
            Self {
                bq: 64,
                warps: 4,
                q_in_regs: true,
                stages: 3,
                min_blocks: 2,
                ..base
            },
            Self { bk: 64, ..base },
        ];
        v.retain(|t| t.check(head_dim, block_size).is_ok() && t.smem_bytes(head_dim) <= 227 * 1024);
        v
    }

    /// Dynamic shared memory of one CTA, bytes: Q tile plus `stages` K and V tiles.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        if self.ws {
            // Plus the ring's mbarriers (q_full, and full/empty for K and V per stage).
            (self.bq + 2 * self.stages * self.bk) * head_dim * 2 + 1024 + (1 + 4 * self.stages) * 8
        } else if self.wgmma {
            // Tiles aligned to 1024 bytes (the swizzle reads address bits 7-9).
            (self.bq + 2 * self.stages * self.bk) * head_dim * 2 + 1024
        } else {
            // Rows of a multiple of 64 elements are swizzled in place, others padded by 8.
            let row = if head_dim.is_multiple_of(64) {
                head_dim
            } else {
                head_dim + 8
            };
            (self.bq + 2 * self.stages * self.bk) * row * 2
        }
    }

    /// The kernel family this tile runs.
    pub fn family(&self) -> &'static KernelFamily {
        if self.ws {
            &ATTENTION_WS
        } else if self.wgmma {
            &ATTENTION_SM90
        } else {
            &ATTENTION
        }
    }

    fn check(&self, head_dim: usize, block_size: usize) -> Result<()> {
        let bad = |m: String| {
            Err(CudaError::Unsupported {
                op: "attention",
                message: m,
            })
        };
        if !head_dim.is_multiple_of(16) || !(16..=256).contains(&head_dim) {
            return bad(format!(
                "head_dim ({head_dim}) must be a multiple of 16 in [16, 256]"
            ));
        }
        if ![16, 32, 64, 128, 256].contains(&block_size) {
            return bad(format!(
                "block_size ({block_size}) must be 16, 32, 64, 128 or 256"
            ));
        }
        if self.ws {
            let ok = self.wgmma
                && (head_dim == 64 || head_dim == 128)
                && (block_size == 64 || block_size == 128)
                && (self.bq == 64 || self.bq == 128)
                && self.bk == self.bq
                && block_size.is_multiple_of(self.bq)
                && self.warps == self.bq / 16 + 4
                && (2..=4).contains(&self.stages);
            return if ok {
                Ok(())
            } else {
                bad(format!(
                    "warp-specialized tile {self:?} invalid for head_dim {head_dim}, block {block_size}"
                ))
            };
        }
        if self.wgmma {
            let ok = (head_dim == 64 || head_dim == 128)
                && (self.bq == 64 || self.bq == 128)
                && (self.bk == 64 || self.bk == 128)
                && block_size.is_multiple_of(self.bq)
                && block_size.is_multiple_of(self.bk)
                && self.warps == self.bq / 16
                && (self.stages == 2 || self.stages == 3);
            return if ok {
                Ok(())
            } else {
                bad(format!(
                    "wgmma tile {self:?} invalid for head_dim {head_dim}, block {block_size}"
                ))
            };
        }
        let rows_per_warp = self.bq / self.warps.max(1);
        if self.warps == 0
            || !self.bq.is_multiple_of(16 * self.warps)
            || !block_size.is_multiple_of(self.bq)
        {
            return bad(format!(
                "tile bq {} with {} warps does not fit block {block_size}",
                self.bq, self.warps
            ));
        }
        if !self.bk.is_multiple_of(16) || !block_size.is_multiple_of(self.bk) || self.stages < 2 {
            return bad(format!(
                "tile bk {} / stages {} invalid for block {block_size}",
                self.bk, self.stages
            ));
        }
        if self.q_in_regs && rows_per_warp != 16 {
            return bad("q_in_regs needs 16 rows per warp".into());
        }
        Ok(())
    }

    /// The registry key of this tile for `(dtype, head_dim, block_size)`.
    pub fn kernel_key(&self, dtype: DType, head_dim: usize, block_size: usize) -> KernelKey {
        KernelKey::new(self.family(), Some(dtype), head_dim, block_size)
            .define("ATT_BQ", self.bq as i64)
            .define("ATT_BK", self.bk as i64)
            .define("ATT_WARPS", self.warps as i64)
            .define("ATT_STAGES", self.stages as i64)
            .define("ATT_Q_IN_REGS", self.q_in_regs as i64)
            .define("ATT_MINB", self.min_blocks as i64)
            .define("ATT_OVERLAP", (self.wgmma && self.stages == 3) as i64)
            .define("ATT_CHUNK", tile_chunk() as i64)
    }
}

/// Query tiles per L2 group in the Hopper kernels' CTA order (`ATT_CHUNK` in
/// attention_wgmma.cuh; 1 = plain head-fastest order). `FLEXPREFILL_ATT_CHUNK` overrides it.
pub fn tile_chunk() -> usize {
    env_parse::<usize>("FLEXPREFILL_ATT_CHUNK")
        .filter(|&c| (1..=256).contains(&c))
        .unwrap_or(TILE_CHUNK)
}

/// See [`tile_chunk`]. Timed on the H200 (32 q / 8 kv heads, d 128, 32k and 128k): sparse
/// indexes at density 0.3 ran at 510–589 TFLOP/s in the plain order and 559–623 with chunks of
/// 32 tiles (L2 hit rate of the plain order 50% sparse against 88% dense); dense unchanged
/// (586–593 against 586–599).
const TILE_CHUNK: usize = 32;

/// The value of the environment variable `name` when it parses as a `T` (surrounding blanks
/// ignored); unset or unparsable: `None`, so the caller's default applies.
pub(crate) fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// The sequences of a batch, on the device (`[q_start, k_start, q_len, kv_len]` as u32 each)
/// and on the host (grid sizes are host decisions). Build once per batch layout.
#[derive(Debug)]
pub struct DeviceSeqs {
    host: Vec<Sequence>,
    dev: Buf<u32>,
}

impl DeviceSeqs {
    /// Uploads `seqs` on `stream`.
    pub fn new(stream: &std::sync::Arc<CudaStream>, seqs: &[Sequence]) -> Result<Self> {
        Self::new_in(stream, &mut Scratch::alloc(), seqs)
    }

    /// Uploads `seqs` on `stream` into `scratch` (a workspace's pinned table, or a fresh
    /// allocation).
    pub(crate) fn new_in(
        stream: &std::sync::Arc<CudaStream>,
        scratch: &mut Scratch<'_>,
        seqs: &[Sequence],
    ) -> Result<Self> {
        if seqs.is_empty() {
            return Err(flexprefill_core::Error::Shape(
                "no sequence: batch must be at least 1".into(),
            )
            .into());
        }
        let flat = seq_words(seqs)?;
        Ok(Self {
            host: seqs.to_vec(),
            dev: scratch.upload(stream, &flat)?,
        })
    }

    /// The host copy.
    pub fn seqs(&self) -> &[Sequence] {
        &self.host
    }

    /// The device array, 4 u32 per sequence.
    pub fn device(&self) -> &CudaSlice<u32> {
        &self.dev
    }

    /// Query tokens over all sequences.
    pub fn total_q(&self) -> usize {
        self.host.last().map_or(0, |s| s.q_start + s.q_len)
    }

    /// Key tokens over all sequences.
    pub fn total_k(&self) -> usize {
        self.host.last().map_or(0, |s| s.k_start + s.kv_len)
    }
}

/// `[q_start, k_start, q_len, kv_len]` of every sequence as the kernel reads them: u32, and
/// the kernel adds row numbers to the starts in 32-bit arithmetic, so each sequence's ends
/// must fit too.
pub(crate) fn seq_words(seqs: &[Sequence]) -> Result<Vec<u32>> {
    let mut flat = Vec::with_capacity(seqs.len() * 4);
    for s in seqs {
        let ends = [
            s.q_start.saturating_add(s.q_len),
            s.k_start.saturating_add(s.kv_len),
        ];
        for v in ends {
            u32::try_from(v).map_err(|_| CudaError::Unsupported {
                op: "attention",
                message: format!("token offset {v} does not fit u32"),
            })?;
        }
        // Each value is at most one of the ends checked above.
        flat.extend([s.q_start, s.k_start, s.q_len, s.kv_len].map(|v| v as u32));
    }
    Ok(flat)
}

/// A [`BlockIndex`] resident on the device, in the same CSR layout (rows ordered (sequence,
/// head, query block)).
///
/// `col_indices` may be longer than `row_offsets[last]` (a fixed-capacity buffer filled by a
/// device-side selection that never syncs with the host): entries past the last offset are
/// never read.
#[derive(Debug)]
pub struct DeviceBlockIndex {
    /// Tokens per block.
    pub block_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// `[num_seqs * num_heads + 1]`: first CSR row of each (sequence, head).
    pub head_row_start: Buf<u32>,
    /// `[rows + 1]` offsets into `col_indices`.
    pub row_offsets: Buf<u32>,
    /// Key blocks, ascending within a row.
    pub col_indices: Buf<u32>,
}

impl DeviceBlockIndex {
    /// Uploads a host index on `stream`.
    pub fn upload(stream: &std::sync::Arc<CudaStream>, index: &BlockIndex) -> Result<Self> {
        // An empty index still needs a non-null buffer.
        let cols: &[u32] = if index.col_indices().is_empty() {
            &[0]
        } else {
            index.col_indices()
        };
        Ok(Self {
            block_size: index.block_size(),
            num_heads: index.num_heads(),
            head_row_start: stream.clone_htod(index.head_row_start())?.into(),
            row_offsets: stream.clone_htod(index.row_offsets())?.into(),
            col_indices: stream.clone_htod(cols)?.into(),
        })
    }
}

/// Kernel parameters, passed by value. Must match `AttnParams` in
/// `kernels/attention_params.cuh`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    head_row_start: u64,
    row_offsets: u64,
    col_indices: u64,
    dense_walk: u64,
    seqs: u64,
    num_heads: u32,
    num_kv_heads: u32,
    group: u32,
    num_tiles: u32,
    scale_log2: f32,
}

// SAFETY: plain old data, laid out as the kernel's struct (repr(C), same field order and types).
unsafe impl DeviceRepr for AttnParams {}

/// A TMA tensor map (`CUtensorMap`, 128 opaque bytes), passed to the warp-specialized kernel by
/// value as a `__grid_constant__` parameter.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct TmaMap([u64; 16]);

// SAFETY: plain old data, the 128 bytes cuTensorMapEncodeTiled wrote, laid out as the kernel's
// `TmaMap` (64-byte aligned, 16 u64).
unsafe impl DeviceRepr for TmaMap {}

/// The tensor map of a `[tokens, heads, head_dim]` 16-bit tensor at `addr`, as a 3-d tensor
/// (d, head, token) read in boxes of 64 elements (128 bytes, one swizzle atom row) × 1 head ×
/// `rows` tokens, 128-byte swizzled: the atom layout the wgmma descriptors read. Tokens past
/// the tensor's end read as zeros.
fn tensor_map(
    addr: u64,
    dtype: DType,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    rows: usize,
) -> Result<TmaMap> {
    use cudarc::driver::sys;
    let unsupported = |message: String| CudaError::Unsupported {
        op: "attention",
        message,
    };
    if !addr.is_multiple_of(16) {
        return Err(unsupported(format!(
            "TMA needs 16-byte aligned tensors, got address {addr:#x}"
        )));
    }
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let dims = [head_dim as u64, heads as u64, tokens.max(1) as u64];
    // Byte strides of dims 1 and 2 (dim 0 is contiguous).
    let strides = [(head_dim * 2) as u64, (heads * head_dim * 2) as u64];
    let boxes = [64u32, 1, rows as u32];
    let elem_strides = [1u32, 1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array holds `rank` (or rank − 1 for the strides) entries and outlives the
    // call; `map` is written by the driver before it is read; the address is a live device
    // allocation of `tokens · heads · head_dim` elements (checked by the caller).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            3,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
        Ok(TmaMap(map.assume_init().opaque))
    }
}

/// Raw device address of a slice, for parameter structs. The crate's contexts run without
/// cudarc's event tracking: ordering is the stream's, so the returned guard has nothing to do.
pub(crate) fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Everything one attention launch reads and writes, on the device.
#[derive(Debug)]
pub struct AttentionArgs<'a, T> {
    /// Queries `[total_q, num_heads, head_dim]`.
    pub q: &'a CudaSlice<T>,
    /// Keys `[total_k, num_kv_heads, head_dim]`.
    pub k: &'a CudaSlice<T>,
    /// Values `[total_k, num_kv_heads, head_dim]`.
    pub v: &'a CudaSlice<T>,
    /// Head counts and width.
    pub shape: AttentionShape,
    /// The sequences.
    pub seqs: &'a DeviceSeqs,
    /// Softmax scale; `None` is `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

impl<'a, T> AttentionArgs<'a, T> {
    /// The arguments with the default softmax scale (`1/sqrt(head_dim)`); set
    /// `softmax_scale` on the result for another.
    pub fn new(
        q: &'a CudaSlice<T>,
        k: &'a CudaSlice<T>,
        v: &'a CudaSlice<T>,
        shape: AttentionShape,
        seqs: &'a DeviceSeqs,
    ) -> Self {
        Self {
            q,
            k,
            v,
            shape,
            seqs,
            softmax_scale: None,
        }
    }
}

/// Launches attention on `stream`: over `index`'s blocks, or dense causal when `index` is
/// `None`. Writes every element of `out` (`[total_q, num_heads, head_dim]`) and, when given,
/// of `lse` (`[total_q, num_heads]`, natural log). Asynchronous: nothing waits for the GPU.
pub fn launch_attention<T: DeviceElem>(
    dev: &CudaDevice,
    stream: &CudaStream,
    args: &AttentionArgs<'_, T>,
    index: Option<&DeviceBlockIndex>,
    tile: Option<AttnTile>,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    launch_attention_walk(dev, stream, args, index, None, tile, out, lse)
}

/// [`launch_attention`] with the per-(sequence, head) flags of [`choose_dense_walk`]: a
/// flagged head walks every causal block instead of its index rows (its output is then dense
/// attention's, bit for bit); `None` walks the index as listed.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_walk<T: DeviceElem>(
    dev: &CudaDevice,
    stream: &CudaStream,
    args: &AttentionArgs<'_, T>,
    index: Option<&DeviceBlockIndex>,
    dense_walk: Option<&CudaSlice<u8>>,
    tile: Option<AttnTile>,
    out: &mut CudaSlice<T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    const OP: &str = "attention";
    let shape = args.shape;
    shape.validate()?;
    let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let seqs = args.seqs.seqs();
    let (total_q, total_k) = (args.seqs.total_q(), args.seqs.total_k());
    for (name, got, want) in [
        ("q", args.q.len(), total_q * h * d),
        ("k", args.k.len(), total_k * hkv * d),
        ("v", args.v.len(), total_k * hkv * d),
        ("out", out.len(), total_q * h * d),
    ] {
        if got != want {
            return Err(CudaError::BufferLen {
                op: OP,
                name,
                got,
                want,
            });
        }
    }
    if let Some(f) = dense_walk {
        if f.len() != seqs.len() * h {
            return Err(CudaError::BufferLen {
                op: OP,
                name: "dense_walk",
                got: f.len(),
                want: seqs.len() * h,
            });
        }
    }
    if let Some(l) = lse.as_ref() {
        if l.len() != total_q * h {
            return Err(CudaError::BufferLen {
                op: OP,
                name: "lse",
                got: l.len(),
                want: total_q * h,
            });
        }
    }
    // Dense attention runs with the index-free walk; its "block" only sets the key-tile grid.
    let block_size = index.map_or(128, |i| i.block_size);
    if let Some(i) = index {
        if i.num_heads != h {
            return Err(flexprefill_core::Error::Index(format!(
                "index has {} heads, input has {h}",
                i.num_heads
            ))
            .into());
        }
        let rows: usize = seqs
            .iter()
            .map(|s| s.num_query_blocks(block_size))
            .sum::<usize>()
            * h;
        if i.head_row_start.len() != seqs.len() * h + 1 || i.row_offsets.len() != rows + 1 {
            return Err(flexprefill_core::Error::Index(format!(
                "device index has {} head starts and {} row offsets, the input needs {} and {}",
                i.head_row_start.len(),
                i.row_offsets.len(),
                seqs.len() * h + 1,
                rows + 1
            ))
            .into());
        }
    }
    let tile =
        tile.unwrap_or_else(|| AttnTile::auto_for(dev.info().compute_capability, d, block_size));
    if tile.wgmma && dev.info().compute_capability != (9, 0) {
        return Err(CudaError::Unsupported {
            op: OP,
            message: format!(
                "the wgmma tile needs compute capability 9.0, the device has {:?}",
                dev.info().compute_capability
            ),
        });
    }
    tile.check(d, block_size)?;
    let num_tiles = seqs
        .iter()
        .map(|s| s.q_len.div_ceil(tile.bq))
        .max()
        .unwrap_or(0);
    if num_tiles > 65535 || seqs.len() > 65535 || h > 65535 {
        return Err(CudaError::Unsupported {
            op: OP,
            message: format!(
                "grid too large: {num_tiles} query tiles, {} sequences, {h} heads",
                seqs.len()
            ),
        });
    }
    let smem = tile.smem_bytes(d);
    if smem > dev.info().max_smem_per_block {
        return Err(CudaError::Unsupported {
            op: OP,
            message: format!(
                "tile needs {smem} bytes of shared memory, the device allows {}",
                dev.info().max_smem_per_block
            ),
        });
    }
    let key = tile.kernel_key(T::DTYPE, d, block_size);
    let func = dev.function(tile.family(), &key, "attn_fwd", smem)?;

    let scale = args.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt());
    let params = AttnParams {
        q: dptr(args.q, stream),
        k: dptr(args.k, stream),
        v: dptr(args.v, stream),
        out: dptr(out, stream),
        lse: lse.as_ref().map_or(0, |l| dptr(l, stream)),
        head_row_start: index.map_or(0, |i| dptr(&i.head_row_start, stream)),
        row_offsets: index.map_or(0, |i| dptr(&i.row_offsets, stream)),
        col_indices: index.map_or(0, |i| dptr(&i.col_indices, stream)),
        dense_walk: dense_walk.map_or(0, |f| dptr(f, stream)),
        seqs: dptr(args.seqs.device(), stream),
        num_heads: h as u32,
        num_kv_heads: hkv as u32,
        group: shape.group_size() as u32,
        num_tiles: num_tiles as u32,
        scale_log2: scale * std::f32::consts::LOG2_E,
    };
    // The warp-specialized kernel takes three tensor maps (q, k, v) before the parameters.
    let maps = if tile.ws {
        Some([
            tensor_map(params.q, T::DTYPE, total_q, h, d, tile.bq)?,
            tensor_map(params.k, T::DTYPE, total_k, hkv, d, tile.bk)?,
            tensor_map(params.v, T::DTYPE, total_k, hkv, d, tile.bk)?,
        ])
    } else {
        None
    };
    // Heads fastest (a GQA group's CTAs run side by side and share K/V in L2), query tiles
    // slowest and walked last-first by the kernel (heavy rows first).
    let grid = (h as u32, seqs.len() as u32, num_tiles as u32);
    let mut launch = Launch::new(stream, &func, grid, (tile.warps * 32) as u32, smem);
    if let Some(maps) = &maps {
        launch = launch.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]);
    }
    let launch = launch.arg(&params);
    // SAFETY: `params` matches the kernel's struct; every pointer is a live allocation of the
    // length checked above (index buffers and dense_walk are checked against the sequences' row
    // and head counts, and column values are trusted to be causal block numbers as
    // `BlockIndex::validate` checks);
    // `out` and `lse` are exclusively borrowed for the launch; the tensor maps describe q, k
    // and v at those lengths.
    unsafe { launch.launch() }?;
    Ok(())
}

/// Utility kernels (device-side random fills for benches and tests).
pub static UTIL: KernelFamily = KernelFamily {
    name: "util",
    source: include_str!("../kernels/util.cu"),
};

/// Fills `x` with `amp · N(0, 1)` values drawn from a counter-based hash of `seed`, on the
/// device (benches need gigabytes of random bf16 without a host round trip).
pub fn fill_normal<T: DeviceElem>(
    dev: &CudaDevice,
    stream: &CudaStream,
    x: &mut CudaSlice<T>,
    seed: u64,
    amp: f32,
) -> Result<()> {
    let key = KernelKey::new(&UTIL, Some(T::DTYPE), 0, 0);
    let f = dev.function(&UTIL, &key, "fill_normal", 0)?;
    let n = x.len() as u64;
    let blocks = (dev.info().sm_count * 8) as u32;
    let launch = Launch::new(stream, &f, (blocks, 1, 1), 256, 0)
        .arg(x)
        .arg(&n)
        .arg(&seed)
        .arg(&amp);
    // SAFETY: the kernel writes x[0..n) and nothing else; argument types match its signature.
    unsafe { launch.launch() }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AttnTile;

    #[test]
    fn warp_specialized_tiles_are_valid_and_fit_shared_memory() {
        for d in [64, 128] {
            for bs in [64, 128] {
                let t = AttnTile::ws_for(d, bs).expect("head_dim 64/128, block 64/128");
                assert!(t.ws && t.wgmma && t.bq == bs && t.warps == bs / 16 + 4);
                t.check(d, bs).unwrap();
                assert!(t.smem_bytes(d) <= 227 * 1024, "{t:?} d{d}");
            }
        }
        assert_eq!(AttnTile::ws_for(96, 128), None);
        assert_eq!(AttnTile::ws_for(128, 256), None);
        // A 128-row tile would straddle two 64-blocks (two CSR rows).
        assert!(AttnTile::ws(128, 128, 2).check(128, 64).is_err());
        assert!(AttnTile::ws(128, 128, 5).check(128, 128).is_err());
    }
}
