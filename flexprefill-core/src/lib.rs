//! # flexprefill-core
//!
//! The shared vocabulary of FlexPrefill (Lai et al., ICLR 2025), a context-aware sparse
//! attention for long-sequence prefill: configuration, errors, the sparse block index, the
//! [`Backend`] trait, and the selection algorithms of the paper as pure functions.
//!
//! Use this crate to write a backend or to drive selection yourself; to run attention, pick a
//! backend crate (`flexprefill-cpu`, `flexprefill-cuda`). Core has no device type, no thread
//! pool and no I/O.
//!
//! ```
//! use flexprefill_core::{selection, BlockIndex, FlexPrefillConfig, ForcedBlocks, Sequence};
//!
//! let cfg = FlexPrefillConfig::default(); // gamma 0.9, tau 0.1, block 128, min budget 1024
//! cfg.validate()?;
//!
//! // The paper's Eq. 2 distance: 0 for equal distributions.
//! assert_eq!(selection::js_distance(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
//!
//! // A dense index over one 1000-token sequence with 2 heads: 8 query blocks, 36 causal blocks.
//! let seq = Sequence { q_start: 0, k_start: 0, q_len: 1000, kv_len: 1000 };
//! let index = BlockIndex::dense(&[seq], 2, cfg.block_size)?;
//! index.validate(ForcedBlocks::default())?;
//! assert_eq!(index.selected_blocks(0, 1), 36);
//! # Ok::<(), flexprefill_core::Error>(())
//! ```
#![deny(missing_docs)]

mod backend;
mod config;
mod error;
mod index;
mod input;
pub mod payoff;
mod report;
pub mod selection;
mod tensor;

pub use backend::{check_index_matches, Backend};
pub use config::{FlexPrefillConfig, ForcedBlocks, QueryAwareCut, SelectionMode};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use index::BlockIndex;
pub use input::{AttentionInput, AttentionOutput, AttentionShape, Sequence};
pub use report::{DenseReason, HeadReport, Pattern, SparsityReport, Timings};
pub use selection::HeadStatistics;
pub use tensor::{DType, HostTensor, TensorRef};
