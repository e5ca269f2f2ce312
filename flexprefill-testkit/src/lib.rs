//! # flexprefill-testkit
//!
//! Workloads with planted attention structure, proptest strategies, properties, and a
//! backend-agreement harness any backend can plug into.

pub mod workload;
