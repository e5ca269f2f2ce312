//! Reading q/k/v from safetensors or `.npy` files and writing outputs.
//!
//! Everything a user can get wrong in a file is checked here, before any backend runs, and
//! reported as one line naming the tensor, the file and the values (rank, shape, dtype, the
//! first NaN), so the message alone is enough to fix the dump.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use flexprefill_core::{DType, HostTensor};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::npy;

/// One tensor read from a file.
#[derive(Debug)]
pub struct Loaded {
    /// `q`, `k` or `v` (the role, not the name in the file).
    pub role: &'static str,
    /// Where it came from, for messages (`FILE` or `FILE:name`).
    pub origin: String,
    /// Dimensions as stored.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: HostTensor,
}

/// q, k and v after every check, in the layout backends take (`[batch·seq, heads, head_dim]`).
#[derive(Debug)]
pub struct Qkv {
    /// Queries.
    pub q: HostTensor,
    /// Keys.
    pub k: HostTensor,
    /// Values.
    pub v: HostTensor,
    /// q's shape as stored (the output is written with it).
    pub q_shape: Vec<usize>,
    /// Sequences.
    pub batch: usize,
    /// Queries per sequence.
    pub q_len: usize,
    /// Keys per sequence (≥ `q_len`; larger for a chunked-prefill dump).
    pub kv_len: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Shared dtype.
    pub dtype: DType,
}

/// Where to find the three tensors.
#[derive(Debug, Clone)]
pub enum Source {
    /// One safetensors file with three named tensors.
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Tensor names for q, k, v.
        names: [String; 3],
    },
    /// Three `.npy` files.
    Npy {
        /// Files for q, k, v.
        paths: [PathBuf; 3],
    },
}

/// Reads, checks and assembles q/k/v.
pub fn load(source: &Source) -> Result<Qkv> {
    let (q, k, v) = read_tensors(source)?;
    match source {
        Source::Safetensors { path, .. } => {
            assemble(q, k, v).with_context(|| format!("in {}", path.display()))
        }
        // Each .npy origin already names its file.
        Source::Npy { .. } => assemble(q, k, v),
    }
}

fn read_tensors(source: &Source) -> Result<(Loaded, Loaded, Loaded)> {
    let [q, k, v] = match source {
        Source::Safetensors { path, names } => {
            safetensors_tensors(&read(path)?, names, &path.display().to_string())?
        }
        Source::Npy { paths } => {
            let mut out = Vec::with_capacity(3);
            for (role, path) in ["q", "k", "v"].into_iter().zip(paths) {
                let bytes = read(path)?;
                let a = npy::parse(&bytes)
                    .with_context(|| format!("cannot read {role} from {}", path.display()))?;
                out.push(Loaded {
                    role,
                    origin: path.display().to_string(),
                    shape: a.shape,
                    data: a.data,
                });
            }
            let [q, k, v]: [Loaded; 3] = out.try_into().expect("three roles pushed");
            [q, k, v]
        }
    };
    Ok((q, k, v))
}

/// q, k and v named `names` in the bytes of a safetensors file; `origin` names the file in
/// messages. Taking bytes, not a path, makes it the entry point the fuzz tests drive.
pub(crate) fn safetensors_tensors(
    bytes: &[u8],
    names: &[String; 3],
    origin: &str,
) -> Result<[Loaded; 3]> {
    let st = open_safetensors(bytes).with_context(|| format!("cannot read {origin}"))?;
    let mut out = Vec::with_capacity(3);
    for (role, name) in ["q", "k", "v"].into_iter().zip(names) {
        out.push(tensor_from_safetensors(&st, role, name).with_context(|| format!("in {origin}"))?);
    }
    Ok(out.try_into().expect("three roles pushed"))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Checks ranks, shapes, dtypes and finiteness; the one place that decides what a valid input is.
pub fn assemble(q: Loaded, k: Loaded, v: Loaded) -> Result<Qkv> {
    for t in [&q, &k, &v] {
        ensure!(
            t.shape.len() == 4 || t.shape.len() == 3,
            "{} ({}) has rank {} (shape {:?}); expected [batch, seq, heads, head_dim] \
             (or [seq, heads, head_dim] for one sequence)",
            t.role,
            t.origin,
            t.shape.len(),
            t.shape
        );
        if let Some(i) = t.shape.iter().position(|&d| d == 0) {
            bail!(
                "{} ({}) has an empty dimension {i} (shape {:?})",
                t.role,
                t.origin,
                t.shape
            );
        }
    }
    let dims = |t: &Loaded| -> [usize; 4] {
        match t.shape[..] {
            [b, s, h, d] => [b, s, h, d],
            [s, h, d] => [1, s, h, d],
            _ => unreachable!("rank checked above"),
        }
    };
    let ([b, q_len, num_heads, head_dim], kd, vd) = (dims(&q), dims(&k), dims(&v));
    ensure!(
        q.shape.len() == k.shape.len() && q.shape.len() == v.shape.len(),
        "q, k and v must have the same rank: q {:?}, k {:?}, v {:?}",
        q.shape,
        k.shape,
        v.shape
    );
    ensure!(
        kd == vd,
        "k and v must have the same shape: k {:?}, v {:?}",
        k.shape,
        v.shape
    );
    let [kb, kv_len, num_kv_heads, kdim] = kd;
    ensure!(
        kb == b,
        "batch differs: q has {b} sequences, k and v have {kb} (q {:?}, k {:?})",
        q.shape,
        k.shape
    );
    ensure!(
        kdim == head_dim,
        "head_dim differs: q has {head_dim}, k and v have {kdim} (q {:?}, k {:?})",
        q.shape,
        k.shape
    );
    ensure!(
        q_len <= kv_len,
        "q has {q_len} tokens per sequence but k and v only {kv_len} (q {:?}, k {:?}); \
         queries are the last q_len of kv_len positions",
        q.shape,
        k.shape
    );
    ensure!(
        num_heads % num_kv_heads == 0,
        "num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads}) \
         (q {:?}, k {:?})",
        q.shape,
        k.shape
    );
    ensure!(
        (1..=256).contains(&head_dim),
        "head_dim ({head_dim}) must be in 1..=256"
    );
    let dtype = q.data.dtype();
    ensure!(
        k.data.dtype() == dtype && v.data.dtype() == dtype,
        "q, k and v must share a dtype: q is {}, k is {}, v is {}",
        dtype,
        k.data.dtype(),
        v.data.dtype()
    );
    for t in [&q, &k, &v] {
        if let Some((i, value)) = t.data.as_ref().first_non_finite() {
            let [_, s, h, d] = dims(t);
            let at = [i / (s * h * d), i / (h * d) % s, i / d % h, i % d];
            bail!(
                "{} ({}) has a non-finite value ({value}) at [batch {}, token {}, head {}, dim {}]",
                t.role,
                t.origin,
                at[0],
                at[1],
                at[2],
                at[3]
            );
        }
    }
    Ok(Qkv {
        q_shape: q.shape,
        q: q.data,
        k: k.data,
        v: v.data,
        batch: b,
        q_len,
        kv_len,
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
    })
}

/// Parses a safetensors buffer, turning truncation into a message with the byte counts.
///
/// The safetensors crate reports a cut file as `MetadataIncompleteBuffer`; we read the header
/// ourselves first so the user sees how many bytes were promised and how many are there.
pub fn open_safetensors(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    ensure!(
        bytes.len() >= 8,
        "not a safetensors file: {} bytes, shorter than the 8-byte header length",
        bytes.len()
    );
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes checked"));
    let have = (bytes.len() - 8) as u64;
    ensure!(
        n <= have,
        "truncated or not a safetensors file: the header claims {n} bytes but only {have} follow"
    );
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n as usize])
            .context("not a safetensors file: its header is not a JSON object")?;
    let data_end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let data_have = have - n;
    ensure!(
        data_end <= data_have,
        "truncated file: the header describes {data_end} bytes of tensor data but only \
         {data_have} are there"
    );
    SafeTensors::deserialize(bytes).map_err(|e| anyhow::anyhow!("invalid safetensors file: {e:?}"))
}

fn tensor_from_safetensors(st: &SafeTensors<'_>, role: &'static str, name: &str) -> Result<Loaded> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(_) => {
            let mut names: Vec<_> = st.names().into_iter().cloned().collect();
            names.sort();
            bail!(
                "no tensor named '{name}' for {role} (the file has: {}); choose one with --{role}-name",
                if names.is_empty() {
                    "no tensors".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    };
    let dtype = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        other => bail!(
            "tensor '{name}' ({role}) has dtype {other:?}; supported: F32, F16, BF16 \
             (convert with .to(torch.float32) before saving)"
        ),
    };
    Ok(Loaded {
        role,
        origin: format!("tensor '{name}'"),
        shape: view.shape().to_vec(),
        data: npy::decode(view.data(), dtype),
    })
}

/// Writes named tensors (with their shapes) to a safetensors file.
///
/// The header is written here rather than by `safetensors::serialize`, whose metadata is a
/// `HashMap` serialised in random order: with sorted keys the same workload gives the same
/// bytes, so a file's checksum identifies a report's input. Layout (the format's spec): u64
/// little-endian header length, the JSON header padded with spaces to a multiple of 8, then the
/// tensors' bytes back to back in the order given.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &[usize], &HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let sorted: BTreeMap<String, String> = meta.into_iter().collect();
        header.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    }
    let mut offset = 0usize;
    let mut data = Vec::new();
    for (name, shape, t) in tensors {
        let elems: usize = shape.iter().product();
        ensure!(
            elems == t.len(),
            "tensor {name}: shape {shape:?} holds {elems} elements, data has {}",
            t.len()
        );
        let dtype = match t.dtype() {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        };
        let bytes = npy::encode(t);
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
        data.extend_from_slice(&bytes);
    }
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + data.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the attention output `o` next to the inputs' format: `.npy` when the path says so,
/// safetensors otherwise.
pub fn write_output(path: &Path, shape: &[usize], o: &HostTensor) -> Result<()> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        let bytes = npy::to_bytes(shape, o)?;
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
    } else {
        write_safetensors(path, &[("o", shape, o)], None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(role: &'static str, shape: &[usize]) -> Loaded {
        let n = shape.iter().product();
        Loaded {
            role,
            origin: format!("tensor '{role}'"),
            shape: shape.to_vec(),
            data: HostTensor::F32((0..n).map(|i| (i % 7) as f32 * 0.1).collect()),
        }
    }

    /// `assemble` on q, k, v of these shapes.
    fn assemble_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Result<Qkv> {
        assemble(loaded("q", q), loaded("k", k), loaded("v", v))
    }

    #[test]
    fn gqa_and_chunked_shapes_are_accepted() {
        let x = assemble_shapes(&[2, 8, 4, 16], &[2, 24, 2, 16], &[2, 24, 2, 16]).unwrap();
        assert_eq!(
            (
                x.batch,
                x.q_len,
                x.kv_len,
                x.num_heads,
                x.num_kv_heads,
                x.head_dim
            ),
            (2, 8, 24, 4, 2, 16)
        );
        let x = assemble_shapes(&[8, 4, 16], &[8, 4, 16], &[8, 4, 16]).unwrap();
        assert_eq!(x.batch, 1);
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let e = assemble_shapes(&[1, 8, 4, 16], &[1, 8, 2, 16], &[1, 9, 2, 16])
            .unwrap_err()
            .to_string();
        assert!(e.contains("k and v must have the same shape"), "{e}");
        let e = assemble_shapes(&[1, 8, 3, 16], &[1, 8, 2, 16], &[1, 8, 2, 16])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_heads (3) is not a multiple of num_kv_heads (2)"),
            "{e}"
        );
        let e = assemble_shapes(&[8, 16], &[8, 16], &[8, 16])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2"), "{e}");
    }

    #[test]
    fn nan_is_located() {
        let mut q = loaded("q", &[1, 4, 2, 3]);
        if let HostTensor::F32(x) = &mut q.data {
            x[(2 * 2 + 1) * 3 + 2] = f32::NAN;
        }
        let e = assemble(q, loaded("k", &[1, 4, 2, 3]), loaded("v", &[1, 4, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[batch 0, token 2, head 1, dim 2]"), "{e}");
    }

    #[test]
    fn safetensors_round_trip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let t = HostTensor::F32(vec![1.0, 2.0, 3.0, 4.0]);
        let meta = HashMap::from([("b".to_string(), "2".to_string()), ("a".into(), "1".into())]);
        write_safetensors(&p, &[("o", &[1, 2, 2], &t)], Some(meta)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = open_safetensors(&bytes).unwrap();
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["a"], "1");
        assert!(String::from_utf8_lossy(&bytes).contains(r#"{"__metadata__":{"a":"1","b":"2"}"#));
        let l = tensor_from_safetensors(&st, "q", "o").unwrap();
        assert_eq!((l.shape, l.data), (vec![1, 2, 2], t));
        let e = open_safetensors(&bytes[..bytes.len() - 1])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = tensor_from_safetensors(&st, "q", "q")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no tensor named 'q'") && e.contains("the file has: o"),
            "{e}"
        );
    }
}
