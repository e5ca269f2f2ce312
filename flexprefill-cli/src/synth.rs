//! Synthetic workloads with planted structure (flexprefill-testkit), for `synth` and `demo`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use flexprefill_core::{DType, HostTensor};
use flexprefill_testkit::workload::{self, WorkloadKind, WorkloadSpec};

use crate::io::{self, Qkv};

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// One far needle key the last queries must retrieve.
    Needle,
    /// Attention sink plus a local window (slash lines).
    Local,
    /// Periodic vertical stripes.
    Stripes,
    /// Query-dependent block topics (query-aware heads).
    Topics,
    /// Plain Gaussian q/k/v (no structure).
    Random,
    /// Heads of the kinds above, mixed.
    Mixed,
}

impl Kind {
    /// The testkit's name for it.
    pub fn workload(self) -> WorkloadKind {
        match self {
            Kind::Needle => WorkloadKind::Needle,
            Kind::Local => WorkloadKind::SinkLocal,
            Kind::Stripes => WorkloadKind::Stripes,
            Kind::Topics => WorkloadKind::Topics,
            Kind::Random => WorkloadKind::Random,
            Kind::Mixed => WorkloadKind::Mixed,
        }
    }

    /// The `--kind` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Needle => "needle",
            Kind::Local => "local",
            Kind::Stripes => "stripes",
            Kind::Topics => "topics",
            Kind::Random => "random",
            Kind::Mixed => "mixed",
        }
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DTypeArg {
    /// Core's dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Generates a workload and returns it as checked q/k/v in `dtype`, plus the needle position.
pub fn generate(spec: &WorkloadSpec, dtype: DType) -> Result<(Qkv, Option<usize>)> {
    let w = workload::try_generate(spec).context("cannot generate the workload")?;
    let shape_q = vec![spec.batch, spec.seq_len, spec.num_heads, spec.head_dim];
    let shape_kv = vec![spec.batch, spec.seq_len, spec.num_kv_heads, spec.head_dim];
    let mk = |role, shape: &Vec<usize>, data: Vec<f32>| io::Loaded {
        role,
        origin: "synthetic workload".into(),
        shape: shape.clone(),
        data: HostTensor::from_f32(data, dtype),
    };
    let qkv = io::assemble(
        mk("q", &shape_q, w.q),
        mk("k", &shape_kv, w.k),
        mk("v", &shape_kv, w.v),
    )?;
    Ok((qkv, w.needle_position))
}

/// `synth`: writes q/k/v of a workload to a safetensors file, with the spec as metadata.
pub fn write(
    spec: &WorkloadSpec,
    kind: Kind,
    dtype: DType,
    out: &Path,
) -> Result<(Qkv, Option<usize>)> {
    let (qkv, needle) = generate(spec, dtype)?;
    let mut meta = HashMap::new();
    meta.insert("generator".to_string(), "flexprefill synth".to_string());
    meta.insert("kind".to_string(), kind.name().to_string());
    meta.insert("seed".to_string(), spec.seed.to_string());
    if let Some(p) = needle {
        meta.insert("needle_position".to_string(), p.to_string());
    }
    let kv_shape = [qkv.batch, qkv.kv_len, qkv.num_kv_heads, qkv.head_dim];
    io::write_safetensors(
        out,
        &[
            ("q", &qkv.q_shape, &qkv.q),
            ("k", &kv_shape, &qkv.k),
            ("v", &kv_shape, &qkv.v),
        ],
        Some(meta),
    )?;
    Ok((qkv, needle))
}
