//! # flexprefill-testkit
//!
//! What every FlexPrefill backend is tested with: workloads with planted attention structure
//! ([`workload`]), proptest strategies for shapes, layouts, indices and configs
//! ([`strategies`]), properties any backend must satisfy ([`properties`]), and a
//! backend-agreement harness ([`agreement`]) that a new backend (the CUDA one, on the GPU
//! machine) runs against the CPU backend and the f64 oracle.
//!
//! ```
//! use flexprefill_core::Backend;
//! use flexprefill_cpu::CpuBackend;
//! use flexprefill_testkit::{properties, workload::{generate, WorkloadKind, WorkloadSpec}};
//!
//! // A needle the last queries must find, 2048 tokens, 4 heads over 2 kv heads, d 64.
//! let spec = WorkloadSpec { kind: WorkloadKind::Needle, batch: 1, seq_len: 2048,
//!                           num_heads: 4, num_kv_heads: 2, head_dim: 64, seed: 1 };
//! let w = generate(&spec);
//! let needle = w.needle_position.expect("needle workloads record it");
//! assert!(w.attention_row(0, 0, 2047)[needle] > 0.3);
//!
//! // Any backend must keep the paper's gamma promise in the faithful mode.
//! let cfg = flexprefill_core::FlexPrefillConfig::default().with_min_budget(256);
//! properties::representative_mass_at_least_gamma(&CpuBackend::new(), &w.input(), &cfg)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Depends on core and the CPU backend (whose `oracle` is the reference), never on a device
//! crate: backends depend on the testkit (as a dev-dependency), not the other way round.

/// The README's code blocks, run as doctests so its library example cannot go stale (the
/// testkit is the crate that depends on both core and the CPU backend the example uses).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod agreement;
pub mod error;
pub mod fuzz;
pub mod io;
pub mod oracle;
pub mod owned;
pub mod properties;
pub mod strategies;
pub mod workload;

pub use error::{Error, Result};
pub use owned::OwnedInput;
pub use workload::{generate, try_generate, Workload, WorkloadKind, WorkloadSpec};
