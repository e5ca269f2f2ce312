//! # flexprefill-cuda
//!
//! FlexPrefill (Lai et al., ICLR 2025) on NVIDIA GPUs: block-sparse causal flash attention on
//! tensor cores (and the same kernel as a dense baseline), with pattern search and index
//! selection on the device. Kernels are `.cu` files compiled by NVRTC at first use for the
//! device's exact arch and cached per compile-time key; the crate builds and its tests run on
//! machines without a GPU, where [`CudaBackend::new`] returns [`CudaError::NoDriver`].
//!
//! Use it when you have an NVIDIA GPU (compute capability 8.0 or newer; tuned on Hopper) and
//! long prefills; use `flexprefill-cpu` as the exact oracle and fallback. Attention takes bf16
//! and f16 (f32 host inputs are rounded to bf16), head_dim any multiple of 16 up to 256, blocks
//! 16–256, GQA, ragged batches, chunked prefill and LSE output; on an H200 the dense kernel runs
//! at 436–457 TFLOP/s (1.26–1.39× PyTorch SDPA's flash backend) and the block-sparse one at
//! 380–401 TFLOP/s on the blocks it computes (`docs/PERFORMANCE.md`).
//!
//! ```no_run
//! use flexprefill_core::{AttentionInput, AttentionShape, Backend, BlockIndex, bf16};
//! use flexprefill_cuda::CudaBackend;
//!
//! let gpu = CudaBackend::new()?; // typed error without a driver, never a panic
//! let shape = AttentionShape::new(32, 8, 128)?;
//! let n = 4096;
//! let q = vec![bf16::from_f32(0.1); n * 32 * 128];
//! let kv = vec![bf16::from_f32(0.1); n * 8 * 128];
//! let x = AttentionInput::batched(&q, &kv, &kv, 1, n, n, shape)?;
//! let dense = gpu.dense_attention(&x)?;
//! let index = BlockIndex::dense(&x.seqs, 32, 128)?;
//! let sparse = gpu.sparse_attention(&x, &index)?; // same result: every block listed
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Two APIs:
//! - the core [`flexprefill_core::Backend`] trait, host tensors in and out (agreement tests,
//!   simple use);
//! - the device-resident API: [`CudaBackend::attention_device`] over [`CudaSlice`]s
//!   (`cudarc::driver::CudaSlice`) on a stream you give, with [`DeviceSeqs`] and
//!   [`DeviceBlockIndex`] already on the GPU; nothing synchronises with the host.
//!   [`select::flex_prefill_device`] is the whole FlexPrefill call on that API: statistics,
//!   pattern decision, selection, index build and block-sparse attention, all queued on the
//!   stream (at 128k on an H200: 113 ms, 3.8× SDPA's flash backend, `docs/PERFORMANCE.md`).
//!
//! The host API's [`flexprefill_core::Backend::flex_prefill`] is that same device-resident call between
//! one upload (pinned staging, f16/bf16 as they are) and one download, with stage times from
//! CUDA events and the transfers reported apart. [`raw::flex_prefill_raw`] is the device-resident call on
//! raw device pointers and the caller's `CUstream`, for engines whose tensors live in another
//! library (torch, or another cudarc). Compiled kernels persist on disk between processes
//! ([`KernelCache`]).
//!
//! For engines that call it every step: a [`Workspace`], sized once for the largest batch
//! ([`WorkspaceLimits`]), holds every buffer of a call in one allocation and loads every kernel
//! up front; [`call::flex_prefill_device_with`] and [`raw::flex_prefill_raw_with`] then allocate
//! nothing and never wait for the GPU, so a call can be captured in a CUDA graph and replayed
//! (`docs/CUDA.md`, "Workspaces and CUDA graphs").
//!
//! An engine's prefill step, with q/k/v already on the GPU (token-major, packed sequences as
//! in [`flexprefill_core::AttentionInput::packed`]):
//!
//! ```no_run
//! use flexprefill_core::{bf16, AttentionShape, FlexPrefillConfig, Sequence};
//! use flexprefill_cuda::cudarc::driver::CudaSlice;
//! use flexprefill_cuda::{select, AttentionArgs, CudaBackend, DeviceSeqs};
//!
//! let gpu = CudaBackend::new()?;
//! let stream = gpu.stream().clone(); // or any stream of the same context
//! let shape = AttentionShape::new(32, 8, 128)?;
//! // Two prompts of a ragged batch; the second is a chunk: its 1024 queries see 3072 keys.
//! let seqs = [
//!     Sequence { q_start: 0, k_start: 0, q_len: 40_000, kv_len: 40_000 },
//!     Sequence { q_start: 40_000, k_start: 40_000, q_len: 1024, kv_len: 3072 },
//! ];
//! let (tq, tk) = (41_024, 43_072);
//! let q: CudaSlice<bf16> = stream.alloc_zeros(tq * 32 * 128)?; // your activations
//! let k: CudaSlice<bf16> = stream.alloc_zeros(tk * 8 * 128)?;
//! let v: CudaSlice<bf16> = stream.alloc_zeros(tk * 8 * 128)?;
//! let mut out: CudaSlice<bf16> = stream.alloc_zeros(tq * 32 * 128)?;
//! let mut lse: CudaSlice<f32> = stream.alloc_zeros(tq * 32)?; // for merging chunks
//! let dseqs = DeviceSeqs::new(&stream, &seqs)?;
//! let args = AttentionArgs { q: &q, k: &k, v: &v, shape, seqs: &dseqs, softmax_scale: None };
//! let run = select::flex_prefill_device(
//!     &gpu, &stream, &args, &FlexPrefillConfig::default(), &mut out, Some(&mut lse),
//! )?;
//! // Nothing has waited for the GPU yet; `run.dense_reason` says when sparsity could not pay
//! // off and the dense kernel ran instead, `run.selection` holds the index and the decisions.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`CudaSlice`]: cudarc::driver::CudaSlice

pub mod attention;
mod backend;
pub mod call;
#[cfg(test)]
mod compile_tests;
mod dense_walk;
pub mod device;
mod error;
pub mod internals;
mod kcache;
mod launch;
mod pool;
pub mod raw;
mod registry;
pub mod select;
mod staging;
mod stats;
pub mod workspace;

pub use attention::{AttentionArgs, AttnTile, DeviceBlockIndex, DeviceElem, DeviceSeqs};
pub use backend::CudaBackend;
pub use device::{CudaDevice, DeviceInfo};
pub use error::{CudaError, Result};
pub use kcache::{cache_key, KernelCache};
pub use pool::{release_cached_memory, reserved_bytes, used_bytes};
pub use workspace::{Buf, Workspace, WorkspaceLimits, WorkspaceSize};

// The oracle density on the device: a yardstick beside the prefill, not part of it.
pub use stats::oracle;

/// cudarc, re-exported so callers of the device API use the same version.
pub use cudarc;
