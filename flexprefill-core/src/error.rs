//! One error type for everything a caller can get wrong.
//!
//! Messages are lowercase and name the offending values, so a one-line CLI report is enough to
//! fix the input (`num_heads (30) is not a multiple of num_kv_heads (8)`).

/// Everything that can go wrong in core, and in any backend that reports through it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration knob is outside its domain.
    #[error("invalid config: {0}")]
    Config(String),
    /// Shapes of q/k/v or the sequence layout do not agree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// `num_heads` must be a multiple of `num_kv_heads` (GQA).
    #[error("num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")]
    GqaRatio {
        /// Query heads.
        num_heads: usize,
        /// Key/value heads.
        num_kv_heads: usize,
    },
    /// Head dimension outside 1..=256.
    #[error("head_dim ({0}) must be in 1..=256")]
    HeadDim(usize),
    /// A sequence with no query or no key.
    #[error("sequence {seq} is empty (q_len {q_len}, kv_len {kv_len})")]
    EmptySequence {
        /// Sequence number inside the batch.
        seq: usize,
        /// Its query count.
        q_len: usize,
        /// Its key count.
        kv_len: usize,
    },
    /// Chunked prefill needs the queries to be the last `q_len` of the `kv_len` positions.
    #[error("sequence {seq}: q_len ({q_len}) is larger than kv_len ({kv_len})")]
    QueryLongerThanKeys {
        /// Sequence number inside the batch.
        seq: usize,
        /// Its query count.
        q_len: usize,
        /// Its key count.
        kv_len: usize,
    },
    /// `cu_seqlens` must start at 0, never decrease, and end at the token count.
    #[error("invalid cu_seqlens: {0}")]
    CuSeqlens(String),
    /// NaN or infinity in an input tensor.
    #[error("tensor {tensor} has a non-finite value ({value}) at element {index}")]
    NonFinite {
        /// `q`, `k` or `v`.
        tensor: &'static str,
        /// Flat element index.
        index: usize,
        /// The value, printed.
        value: String,
    },
    /// The three tensors must share a dtype.
    #[error("dtype mismatch: q is {q}, k is {k}, v is {v}")]
    DType {
        /// q's dtype name.
        q: &'static str,
        /// k's dtype name.
        k: &'static str,
        /// v's dtype name.
        v: &'static str,
    },
    /// A block index that breaks an invariant (see [`crate::BlockIndex::validate`]).
    #[error("invalid block index: {0}")]
    Index(String),
    /// The backend cannot run this request (no device, unsupported shape on this backend, ...).
    #[error("{backend}: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;
