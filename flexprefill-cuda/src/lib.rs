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
//! at 436–443 TFLOP/s (1.26–1.38× PyTorch SDPA's flash backend) and the block-sparse one at
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
//!
//! [`CudaSlice`]: cudarc::driver::CudaSlice

pub mod attention;
mod backend;
pub mod device;
mod error;
pub mod registry;
pub mod select;
pub mod stats;

pub use attention::{AttentionArgs, AttnTile, DeviceBlockIndex, DeviceElem, DeviceSeqs};
pub use backend::CudaBackend;
pub use device::{CudaDevice, DeviceInfo};
pub use error::{CudaError, Result};

/// cudarc, re-exported so callers of the device API use the same version.
pub use cudarc;
