//! # flexprefill-cpu
//!
//! FlexPrefill on the CPU: the exact f64 oracle every backend is tested against
//! ([`oracle`]), and a fast f32 backend ([`CpuBackend`]) that is a usable fallback where no GPU
//! is: block-sparse causal attention with an online softmax over the selected key blocks, GEMMs
//! through `matrixmultiply` on block tiles, parallel over (sequence, head, query block) with
//! rayon. It takes everything core describes: GQA, ragged batches, chunked prefill (bottom-right
//! causal), f32/f16/bf16 inputs (computed in f32, returned in q's dtype), and the LSE output for
//! merging partial results ([`merge_partials`]).
//!
//! Use [`CpuBackend`] through the [`Backend`] trait: `flex_prefill` runs the whole of Algorithm 1
//! (statistics here, selection in core, sparse attention here); `sparse_attention` takes an
//! index you built; `dense_attention` is the speed peer.
//!
//! ```
//! use flexprefill_core::{AttentionInput, AttentionShape, Backend, BlockIndex};
//! use flexprefill_cpu::{oracle, CpuBackend};
//!
//! // One sequence of 300 tokens, 4 query heads sharing 2 kv heads, head_dim 32.
//! let (n, shape) = (300, AttentionShape::new(4, 2, 32)?);
//! let wave = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).sin()).collect::<Vec<f32>>();
//! let (q, k, v) = (wave(n * 4 * 32, 0.37), wave(n * 2 * 32, 0.11), wave(n * 2 * 32, 0.23));
//! let x = AttentionInput::batched(&q, &k, &v, 1, n, n, shape)?.with_lse(true);
//!
//! let cpu = CpuBackend::new();
//! let dense = cpu.dense_attention(&x)?;
//! // Every query block keeps the sink block and its diagonal block: a streaming-style index.
//! let rows = (0..5u32).map(|r| vec![0, r]).collect::<Vec<_>>();
//! let index = BlockIndex::from_rows(&x.seqs, 4, 64, vec![rows; 4])?;
//! let sparse = cpu.sparse_attention(&x, &index)?;
//!
//! // Both agree with the f64 oracle, the sparse one with the oracle restricted to its blocks.
//! let want = oracle::dense_attention_f64(&x)?;
//! assert!(oracle::relative_l2_error(&dense.out.to_f32_vec(), &want.out) < 1e-5);
//! let want = oracle::masked_attention_f64(&x, &index)?;
//! assert!(oracle::relative_l2_error(&sparse.out.to_f32_vec(), &want.out) < 1e-5);
//! # Ok::<(), flexprefill_core::Error>(())
//! ```
//!
//! Errors are core's [`flexprefill_core::Error`]: every input (shapes, finiteness, the index's
//! agreement with the input and its invariants, the config) is checked before any work, and a
//! bad one is a typed error, never a panic.
#![deny(missing_docs)]

mod gemm;
mod merge;
pub mod oracle;
mod simd;
mod sparse;
mod stats;

use std::sync::Arc;

use flexprefill_core::{
    AttentionInput, AttentionOutput, Backend, BlockIndex, Error, FlexPrefillConfig, HeadStatistics,
    Result,
};

pub use flexprefill_core::Backend as _;
pub use merge::merge_partials;
pub use sparse::Tiles;

/// The CPU backend. Cheap to clone (the thread pool, if any, is shared).
///
/// Runs on rayon's global pool unless built [`CpuBackend::with_threads`]. The GEMMs are
/// single-threaded `matrixmultiply` calls; all parallelism is rayon's, over (sequence, head,
/// query block) tasks.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    pool: Option<Arc<rayon::ThreadPool>>,
    tiles: Tiles,
    /// Below this many keys a FlexPrefill call runs dense ([`Backend::min_sparse_kv_len`]).
    min_sparse_kv_len: usize,
}

impl CpuBackend {
    /// A backend on rayon's global thread pool (one thread per core by default, or
    /// `RAYON_NUM_THREADS`).
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend with its own pool of `threads` threads (so a caller can keep cores for other
    /// work, or pin a benchmark to one core).
    pub fn with_threads(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(cpu_error("thread count must be at least 1".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("flexprefill-cpu-{i}"))
            .build()
            .map_err(|e| cpu_error(format!("cannot start {threads} threads: {e}")))?;
        Ok(Self {
            pool: Some(Arc::new(pool)),
            ..Self::default()
        })
    }

    /// The same backend with a dense-or-sparse threshold: a FlexPrefill call whose longest
    /// sequence has fewer than `keys` keys runs dense (default 0: on the CPU the statistics
    /// cost about `block_size / (n / 2)` of a dense call, so sparsity pays at any length).
    pub fn with_min_sparse_kv_len(mut self, keys: usize) -> Self {
        self.min_sparse_kv_len = keys;
        self
    }

    /// Replaces the speed-only tiling knobs (see [`Tiles`]; results do not depend on them
    /// beyond f32 rounding).
    pub fn with_tiles(mut self, tiles: Tiles) -> Result<Self> {
        if tiles.chunk_keys == 0
            || tiles.stack_rows == 0
            || !(1..=1024).contains(&tiles.dense_block)
        {
            return Err(cpu_error(format!(
                "tiles: chunk_keys ({}) and stack_rows ({}) must be ≥ 1, dense_block ({}) in \
                 1..=1024",
                tiles.chunk_keys, tiles.stack_rows, tiles.dense_block
            )));
        }
        self.tiles = tiles;
        Ok(self)
    }

    /// The tiling in use.
    pub fn tiles(&self) -> Tiles {
        self.tiles
    }

    /// Threads this backend computes on.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

fn cpu_error(message: String) -> Error {
    Error::Backend {
        backend: "cpu",
        message,
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn min_sparse_kv_len(&self) -> usize {
        self.min_sparse_kv_len
    }

    /// Exact causal attention in f32: the sparse kernel over every causal block, tiled with
    /// [`Tiles::dense_block`] query rows.
    fn dense_attention(&self, x: &AttentionInput<'_>) -> Result<AttentionOutput> {
        x.validate()?;
        let index = BlockIndex::dense(&x.seqs, x.shape.num_heads, self.tiles.dense_block)?;
        Ok(self.install(|| sparse::block_sparse_attention(x, &index, self.tiles)))
    }

    /// Block-sparse causal attention over `index` (which must match `x` and pass
    /// [`BlockIndex::validate`] without forced blocks; it is checked here).
    fn sparse_attention(
        &self,
        x: &AttentionInput<'_>,
        index: &BlockIndex,
    ) -> Result<AttentionOutput> {
        x.validate()?;
        oracle::check_index(x, index)?;
        Ok(self.install(|| sparse::block_sparse_attention(x, index, self.tiles)))
    }

    /// [`HeadStatistics`] of every (sequence, head), computed for every sequence (dense
    /// fallback ones too: they are cheap, and callers may want them).
    fn head_statistics(
        &self,
        x: &AttentionInput<'_>,
        cfg: &FlexPrefillConfig,
    ) -> Result<Vec<HeadStatistics>> {
        self.install(|| stats::head_statistics(x, cfg))
    }
}
