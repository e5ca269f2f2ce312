//! # flexprefill-testkit
//!
//! Workloads with planted attention structure, proptest strategies, properties, and a
//! backend-agreement harness any backend can plug into.

pub mod error;
pub mod io;
pub mod owned;
pub mod workload;

pub use error::{Error, Result};
pub use owned::OwnedInput;
pub use workload::{generate, try_generate, Workload, WorkloadKind, WorkloadSpec};
