//! safetensors files of q/k/v, `[batch, seq, heads, head_dim]`, the layout of flash-attn and of
//! the reference vectors in `shared/reference/vectors`.
//!
//! A file holds `q` `[B, n, H, D]`, `k` and `v` `[B, n, Hkv, D]` in f32, f16 or bf16, optional
//! further tensors (e.g. a reference output `o`) and string metadata (workload kind, seed,
//! needle position). The CLI's `synth` writes these and `demo`/`run` read them back.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use flexprefill_core::{AttentionInput, AttentionShape, DType, HostTensor, TensorRef};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::owned::OwnedInput;
use crate::workload::Workload;

/// q/k/v read from a file, plus whatever else it held.
#[derive(Debug, Clone, PartialEq)]
pub struct Qkv {
    /// Queries, flat `[batch·seq_len, num_heads, head_dim]`.
    pub q: HostTensor,
    /// Keys, flat `[batch·seq_len, num_kv_heads, head_dim]`.
    pub k: HostTensor,
    /// Values, same shape as keys.
    pub v: HostTensor,
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Heads and width.
    pub shape: AttentionShape,
    /// The file's string metadata.
    pub metadata: HashMap<String, String>,
    /// Other tensors of the file, by name: shape and values.
    pub extra: BTreeMap<String, (Vec<usize>, HostTensor)>,
}

impl Qkv {
    /// Borrows it as a uniform-batch input (checks everything, NaN included).
    pub fn input(&self) -> Result<AttentionInput<'_>> {
        Ok(AttentionInput::batched(
            self.q.as_ref(),
            self.k.as_ref(),
            self.v.as_ref(),
            self.batch,
            self.seq_len,
            self.seq_len,
            self.shape,
        )?)
    }

    /// An owned input (q/k/v copied).
    pub fn owned(&self) -> Result<OwnedInput> {
        let seqs = self.input()?.seqs;
        Ok(OwnedInput {
            q: self.q.clone(),
            k: self.k.clone(),
            v: self.v.clone(),
            shape: self.shape,
            seqs,
            softmax_scale: None,
            return_lse: false,
        })
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

/// Little-endian bytes of a tensor.
pub fn tensor_bytes(t: TensorRef<'_>) -> Vec<u8> {
    match t {
        TensorRef::F32(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorRef::F16(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorRef::BF16(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes named tensors with their shapes (element counts must match) and string metadata.
pub fn save_tensors(
    path: &Path,
    tensors: &[(&str, &[usize], TensorRef<'_>)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, t)| tensor_bytes(*t)).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, t), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(st_dtype(t.dtype()), shape.to_vec(), b).map_err(|e| {
            Error::Safetensors(format!(
                "tensor {name}: shape {shape:?} does not hold {} elements ({e:?})",
                t.len()
            ))
        })?;
        views.push((name.to_string(), view));
    }
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize_to_file(views, &meta, path)
        .map_err(|e| Error::Safetensors(format!("{}: cannot write: {e:?}", path.display())))
}

/// Writes q/k/v as `[batch, seq_len, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn save_qkv(
    path: &Path,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
    batch: usize,
    seq_len: usize,
    shape: AttentionShape,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let qs = [batch, seq_len, shape.num_heads, shape.head_dim];
    let ks = [batch, seq_len, shape.num_kv_heads, shape.head_dim];
    save_tensors(
        path,
        &[("q", &qs, q), ("k", &ks, k), ("v", &ks, v)],
        metadata,
    )
}

fn read_tensor(view: &TensorView<'_>, name: &str) -> Result<HostTensor> {
    let b = view.data();
    let t = match view.dtype() {
        StDtype::F32 => HostTensor::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        StDtype::F64 => HostTensor::F32(
            b.chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
        ),
        StDtype::F16 => HostTensor::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        StDtype::BF16 => HostTensor::BF16(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        other => {
            return Err(Error::Safetensors(format!(
                "tensor {name} has dtype {other:?}; expected f32, f64, f16 or bf16"
            )))
        }
    };
    Ok(t)
}

/// Reads q/k/v (`[B, n, H, D]` and `[B, n, Hkv, D]`, or `[n, H, D]` as `B = 1`) and every other
/// tensor and metadata entry of a safetensors file.
pub fn load_qkv(path: &Path) -> Result<Qkv> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let where_ = || path.display().to_string();
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors(format!("{}: invalid header ({e:?})", where_())))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Safetensors(format!("{}: invalid file ({e:?})", where_())))?;
    let get = |name: &str| -> Result<(Vec<usize>, HostTensor)> {
        let view = st
            .tensor(name)
            .map_err(|_| Error::Safetensors(format!("{}: no tensor named '{name}'", where_())))?;
        let mut shape = view.shape().to_vec();
        if shape.len() == 3 {
            shape.insert(0, 1);
        }
        if shape.len() != 4 {
            return Err(Error::Safetensors(format!(
                "{}: tensor {name} has shape {:?}; expected [batch, seq, heads, head_dim]",
                where_(),
                view.shape()
            )));
        }
        Ok((shape, read_tensor(&view, name)?))
    };
    let (qs, q) = get("q")?;
    let (ks, k) = get("k")?;
    let (vs, v) = get("v")?;
    if ks != vs || qs[0] != ks[0] || qs[1] != ks[1] || qs[3] != ks[3] {
        return Err(Error::Safetensors(format!(
            "{}: q {qs:?}, k {ks:?}, v {vs:?} do not agree on batch, seq_len and head_dim \
             (k and v must match exactly)",
            where_()
        )));
    }
    let shape = AttentionShape::new(qs[2], ks[2], qs[3])?;
    let mut extra = BTreeMap::new();
    for (name, view) in st.tensors() {
        if !matches!(name.as_str(), "q" | "k" | "v") {
            let t = read_tensor(&view, &name)?;
            extra.insert(name, (view.shape().to_vec(), t));
        }
    }
    Ok(Qkv {
        q,
        k,
        v,
        batch: qs[0],
        seq_len: qs[1],
        shape,
        metadata,
        extra,
    })
}

impl Workload {
    /// Metadata describing the workload (kind, seed, shape, per-head kinds, needle position).
    pub fn metadata(&self) -> HashMap<String, String> {
        let s = &self.spec;
        let mut m = HashMap::new();
        m.insert("generator".into(), "flexprefill-testkit".into());
        m.insert("kind".into(), s.kind.name().into());
        m.insert("seed".into(), s.seed.to_string());
        m.insert("seq_len".into(), s.seq_len.to_string());
        m.insert(
            "head_kinds".into(),
            self.plan
                .head_kinds
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(","),
        );
        if let Some(p) = self.needle_position {
            m.insert("needle_position".into(), p.to_string());
        }
        m
    }

    /// Writes q/k/v in `dtype` as `[batch, seq_len, heads, head_dim]` with [`Self::metadata`].
    pub fn save_safetensors(&self, path: &Path, dtype: DType) -> Result<()> {
        let x = self.input_as(dtype);
        save_qkv(
            path,
            x.q.as_ref(),
            x.k.as_ref(),
            x.v.as_ref(),
            self.spec.batch,
            self.spec.seq_len,
            x.shape,
            &self.metadata(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{generate, WorkloadKind, WorkloadSpec};

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "flexprefill-testkit-{}-{name}.safetensors",
            std::process::id()
        ))
    }

    #[test]
    fn round_trip_in_every_dtype() {
        let mut s = WorkloadSpec::new(WorkloadKind::Needle, 300);
        s.batch = 2;
        s.head_dim = 32;
        let w = generate(&s);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let p = tmp(dt.name());
            w.save_safetensors(&p, dt).unwrap();
            let back = load_qkv(&p).unwrap();
            std::fs::remove_file(&p).ok();
            assert_eq!(back.q, w.input_as(dt).q);
            assert_eq!(back.v, w.input_as(dt).v);
            assert_eq!((back.batch, back.seq_len), (2, 300));
            assert_eq!(back.shape, w.shape());
            assert_eq!(
                back.metadata.get("needle_position"),
                w.needle_position.map(|p| p.to_string()).as_ref()
            );
            back.input().unwrap();
        }
    }

    #[test]
    fn reads_the_reference_vectors_layout_and_rejects_bad_files() {
        let shape = AttentionShape::new(2, 1, 4).unwrap();
        let q = vec![0.5f32; 3 * 2 * 4];
        let kv = vec![0.25f32; 3 * 4];
        let o = vec![1.0f32; 3 * 2 * 4];
        let p = tmp("extra");
        save_tensors(
            &p,
            &[
                ("q", &[1, 3, 2, 4], TensorRef::F32(&q)),
                ("k", &[1, 3, 1, 4], TensorRef::F32(&kv)),
                ("v", &[1, 3, 1, 4], TensorRef::F32(&kv)),
                ("o", &[1, 3, 2, 4], TensorRef::F32(&o)),
            ],
            &HashMap::new(),
        )
        .unwrap();
        let back = load_qkv(&p).unwrap();
        assert_eq!(back.shape, shape);
        assert_eq!(back.extra["o"].0, vec![1, 3, 2, 4]);
        // k with another seq_len
        save_tensors(
            &p,
            &[
                ("q", &[1, 3, 2, 4], TensorRef::F32(&q)),
                ("k", &[1, 2, 1, 6], TensorRef::F32(&kv)),
                ("v", &[1, 3, 1, 4], TensorRef::F32(&kv)),
            ],
            &HashMap::new(),
        )
        .unwrap();
        assert!(matches!(load_qkv(&p), Err(Error::Safetensors(_))));
        std::fs::write(&p, b"not a safetensors file").unwrap();
        assert!(matches!(load_qkv(&p), Err(Error::Safetensors(_))));
        std::fs::remove_file(&p).ok();
        assert!(matches!(load_qkv(&p), Err(Error::Io { .. })));
        // a shape that does not hold the data
        assert!(save_tensors(&p, &[("q", &[2, 2], TensorRef::F32(&q))], &HashMap::new()).is_err());
    }
}
