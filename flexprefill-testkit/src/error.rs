//! The testkit's one error type.
//!
//! Workload specs and files come from users of the CLI (`flexprefill synth`, `--input`), so a bad
//! value is a typed error naming it, never a panic.

use std::path::PathBuf;

/// Everything the testkit's fallible functions can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A core check failed (shape, config, index).
    #[error(transparent)]
    Core(#[from] flexprefill_core::Error),
    /// A workload spec that cannot be generated.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// A workload kind name that is not one of [`crate::workload::WorkloadKind::ALL`].
    #[error("unknown workload kind '{0}' (expected sink_local, stripes, topics, needle, random or mixed)")]
    UnknownKind(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A safetensors file that cannot be read or written, or lacks what we need.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

/// Result alias of the testkit.
pub type Result<T, E = Error> = std::result::Result<T, E>;
