//! Synthetic q/k/v with planted attention structure (placeholder: the testkit helper fills in
//! the planted patterns; the API below is the contract other crates build against).

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// The planted structure of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// Attention sink plus a local window (slash lines).
    SinkLocal,
    /// Periodic vertical stripes.
    Stripes,
    /// Query-dependent block topics (the paper's "diverse" pattern).
    Topics,
    /// One far needle key that the last queries must retrieve.
    Needle,
    /// Plain Gaussian q/k/v.
    Random,
    /// Heads of the kinds above, mixed.
    Mixed,
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadSpec {
    /// Structure.
    pub kind: WorkloadKind,
    /// Sequences in the batch (uniform length).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// RNG seed.
    pub seed: u64,
}

/// Generated tensors, f32, layout `[batch·seq_len, heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct Workload {
    /// What was asked.
    pub spec: WorkloadSpec,
    /// Queries.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// For needle workloads: the needle's key position (per sequence).
    pub needle_position: Option<usize>,
}

/// Generates a workload (deterministic in `spec.seed`).
pub fn generate(spec: &WorkloadSpec) -> Workload {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    let n = Normal::new(0.0f32, 1.0).expect("unit normal is valid");
    let tokens = spec.batch * spec.seq_len;
    let mut draw = |len: usize| (0..len).map(|_| n.sample(&mut rng)).collect::<Vec<f32>>();
    let q = draw(tokens * spec.num_heads * spec.head_dim);
    let k = draw(tokens * spec.num_kv_heads * spec.head_dim);
    let v = draw(tokens * spec.num_kv_heads * spec.head_dim);
    Workload { spec: *spec, q, k, v, needle_position: None }
}
