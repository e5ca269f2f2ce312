//! One call from Python: arguments checked and named, then the CPU path (borrow by DLPack, run
//! with the GIL released, hand the output back without a copy).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use flexprefill_core::{
    bf16, f16, AttentionInput, AttentionShape, Backend, DType, FlexPrefillConfig, SelectionMode,
    Sequence, TensorRef,
};
use flexprefill_cpu::CpuBackend;
use pyo3::prelude::*;

use crate::dlpack::{self, Borrowed, Elem, Source};
use crate::errors::ArgError;
use crate::{report, HostBuffer};

/// Batched `[batch, seq, heads, head_dim]` or packed `[total, heads, head_dim]` with
/// flash-attn's `cu_seqlens`.
pub(crate) enum Layout<'py> {
    Batched,
    Varlen {
        cu_seqlens_q: Bound<'py, PyAny>,
        cu_seqlens_k: Bound<'py, PyAny>,
        max_seqlen_q: Option<i64>,
        max_seqlen_k: Option<i64>,
    },
}

impl<'py> Layout<'py> {
    pub fn from_args(
        cu_seqlens_q: Option<&Bound<'py, PyAny>>,
        cu_seqlens_k: Option<&Bound<'py, PyAny>>,
        max_seqlen_q: Option<i64>,
        max_seqlen_k: Option<i64>,
    ) -> Result<Self, ArgError> {
        match (cu_seqlens_q, cu_seqlens_k) {
            (None, None) => Ok(Layout::Batched),
            (Some(q), Some(k)) => Ok(Layout::Varlen {
                cu_seqlens_q: q.clone(),
                cu_seqlens_k: k.clone(),
                max_seqlen_q,
                max_seqlen_k,
            }),
            (None, Some(_)) => Err(ArgError::value(
                "cu_seqlens_q",
                "cu_seqlens_q is missing (cu_seqlens_k was given)",
            )),
            (Some(_), None) => Err(ArgError::value(
                "cu_seqlens_k",
                "cu_seqlens_k is missing (cu_seqlens_q was given)",
            )),
        }
    }

    pub fn is_varlen(&self) -> bool {
        matches!(self, Layout::Varlen { .. })
    }
}

/// The paper's knobs as Python passed them (ints unchecked, so a negative one gets an error
/// naming it rather than an OverflowError).
pub(crate) struct Knobs<'a> {
    pub gamma: f64,
    pub tau: f64,
    pub min_budget: i64,
    pub max_budget: Option<i64>,
    pub block_size: i64,
    pub softmax_scale: Option<f64>,
    pub selection: Option<&'a str>,
    /// Keys below which the call runs dense; None: the backend's own threshold.
    pub min_sparse_kv_len: Option<i64>,
}

/// A checked call, device not yet decided: the CPU path below and the CUDA path in `cuda.rs`
/// both start from it.
pub(crate) struct Request<'py> {
    pub q: Bound<'py, PyAny>,
    pub k: Bound<'py, PyAny>,
    pub v: Bound<'py, PyAny>,
    pub layout: Layout<'py>,
    pub cfg: FlexPrefillConfig,
    pub softmax_scale: Option<f32>,
    pub return_lse: bool,
    pub return_report: bool,
    /// Keys below which the call runs dense (None: the backend's own threshold).
    pub min_sparse_kv_len: Option<usize>,
    /// The Python layer viewed ml_dtypes bfloat16 arrays as uint16.
    pub bf16_as_u16: bool,
}

impl<'py> Request<'py> {
    #[allow(clippy::too_many_arguments)] // the call's parts, each checked here
    pub fn parse(
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        layout: Result<Layout<'py>, ArgError>,
        knobs: Knobs<'_>,
        return_lse: bool,
        return_report: bool,
        bf16_as_u16: bool,
    ) -> Result<Self, ArgError> {
        let layout = layout?;
        let cfg = config(&knobs)?;
        let softmax_scale = match knobs.softmax_scale {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && (s as f32) > 0.0 => Some(s as f32),
            Some(s) => {
                return Err(ArgError::value(
                    "softmax_scale",
                    format!("softmax_scale ({s}) must be finite and > 0"),
                ))
            }
        };
        let min_sparse_kv_len = match knobs.min_sparse_kv_len {
            None => None,
            Some(n) => Some(usize::try_from(n).map_err(|_| {
                ArgError::value(
                    "min_sparse_kv_len",
                    format!("min_sparse_kv_len ({n}) must be ≥ 0 keys"),
                )
            })?),
        };
        Ok(Self {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            layout,
            cfg,
            softmax_scale,
            return_lse,
            return_report,
            min_sparse_kv_len,
            bf16_as_u16,
        })
    }
}

// Default + field assignment, not a struct literal: the config is becoming #[non_exhaustive].
#[allow(clippy::field_reassign_with_default)]
fn config(k: &Knobs<'_>) -> Result<FlexPrefillConfig, ArgError> {
    let tokens = |name: &'static str, v: i64| {
        usize::try_from(v)
            .map_err(|_| ArgError::value(name, format!("{name} ({v}) must be ≥ 0 tokens")))
    };
    let mut cfg = FlexPrefillConfig::default();
    cfg.gamma = k.gamma as f32;
    cfg.tau = k.tau as f32;
    cfg.min_budget = tokens("min_budget", k.min_budget)?;
    cfg.max_budget = k.max_budget.map(|m| tokens("max_budget", m)).transpose()?;
    cfg.block_size = tokens("block_size", k.block_size)?;
    cfg.selection = match k.selection {
        None | Some("faithful") => SelectionMode::Faithful,
        Some("original") => SelectionMode::Original,
        Some("sampled") => SelectionMode::Sampled,
        Some(other) => {
            return Err(ArgError::value(
                "selection",
                format!(
                    "selection ({other:?}) must be None, \"faithful\", \"original\" or \"sampled\""
                ),
            ))
        }
    };
    // f64 → f32 may round a value just outside a range onto its edge; check the f64 first.
    if !(k.gamma > 0.0 && k.gamma <= 1.0) {
        return Err(ArgError::value(
            "gamma",
            format!("gamma ({}) must be in (0, 1]", k.gamma),
        ));
    }
    cfg.validate().map_err(|e| ArgError::from_core(e, false))?;
    Ok(cfg)
}

/// What the native call returns to Python: output, LSE (or None), report dict (or None).
pub(crate) type Outcome = (Py<PyAny>, Py<PyAny>, Py<PyAny>);

/// Host seconds of the last call's Rust work (f64 bits), for `_native.last_call_seconds()`.
static LAST_CALL: AtomicU64 = AtomicU64::new(0);

/// Remembers the Rust-side seconds of a call: the whole backend call on the CPU, on CUDA what
/// a Rust caller of the device entry spends (see `cuda.rs`).
pub(crate) fn record_call_seconds(seconds: f64) {
    LAST_CALL.store(seconds.to_bits(), Ordering::Relaxed);
}

thread_local! {
    /// When the binding was entered, its Rust work started and ended, for the last call on
    /// this thread (`_native.last_call_breakdown()`).
    static MARKS: std::cell::Cell<[Option<std::time::Instant>; 3]> =
        const { std::cell::Cell::new([None; 3]) };
}

fn mark(i: usize) {
    MARKS.with(|m| {
        let mut v = m.get();
        v[i] = Some(std::time::Instant::now());
        if i == 0 {
            v[1] = None;
            v[2] = None;
        }
        m.set(v);
    });
}

/// The binding starts a call.
pub(crate) fn mark_entry() {
    mark(0)
}

/// The Rust work of a call starts (after parsing, export and checks).
pub(crate) fn mark_rust_start() {
    mark(1)
}

/// The Rust work of a call ended.
pub(crate) fn mark_rust_end() {
    mark(2)
}

/// Seconds of the last call on this thread before its Rust work (parse, DLPack export,
/// checks) and from the end of its Rust work to `now` (results, releases); `None` where a
/// mark is missing (a call that failed, or a CPU call).
pub(crate) fn binding_seconds(now: std::time::Instant) -> Option<(f64, f64)> {
    let [entry, start, end] = MARKS.with(|m| m.get());
    let (entry, start, end) = (entry?, start?, end?);
    Some((
        start.duration_since(entry).as_secs_f64(),
        now.duration_since(end).as_secs_f64(),
    ))
}

/// The seconds [`record_call_seconds`] kept last (process-wide; the overhead bench reads it
/// right after its own call).
pub(crate) fn last_call_seconds() -> f64 {
    f64::from_bits(LAST_CALL.load(Ordering::Relaxed))
}

/// The one CPU backend of the process (rayon's global pool).
fn cpu() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(CpuBackend::new)
}

/// The CPU path: borrow q/k/v, check them, run with the GIL released.
pub(crate) fn flex_prefill_cpu<'py>(
    py: Python<'py>,
    req: &Request<'py>,
    qkv: Qkv<'py>,
) -> Result<Outcome, ArgError> {
    let (q, k, v) = borrow_qkv(qkv, dlpack::Memory::Host)?;
    let dtype = input_dtype(q.elem, "q", req.bf16_as_u16)?;
    same_dtype(req, &q, &k, &v)?;
    let varlen = req.layout.is_varlen();
    let core = |e| ArgError::from_core(e, varlen);
    let (geometry, out_shape, lse_shape) = geometry(&req.layout, &q, &k, &v)?;
    // SAFETY: `input_dtype` checked that q's element type is the one read here, and k and v
    // have q's element type.
    let (tq, tk, tv) = unsafe { (as_ref(&q, dtype), as_ref(&k, dtype), as_ref(&v, dtype)) };
    let started = std::time::Instant::now();
    let mut x = match &geometry {
        Geometry::Batched {
            batch,
            q_len,
            kv_len,
            shape,
        } => AttentionInput::batched(tq, tk, tv, *batch, *q_len, *kv_len, *shape),
        Geometry::Varlen { cu_q, cu_k, shape } => {
            AttentionInput::packed(tq, tk, tv, cu_q, cu_k, *shape)
        }
    }
    .map_err(core)?
    .with_lse(req.return_lse);
    if let Some(s) = req.softmax_scale {
        x = x.with_softmax_scale(s).map_err(core)?;
    }
    let cfg = req.cfg;
    let backend = match req.min_sparse_kv_len {
        Some(n) => cpu().clone().with_min_sparse_kv_len(n),
        None => cpu().clone(),
    };
    let result = py.detach(|| backend.flex_prefill(&x, &cfg));
    let (out, rep) = result.map_err(core)?;
    let call_seconds = started.elapsed().as_secs_f64();
    record_call_seconds(call_seconds);
    let out_buf = Py::new(py, HostBuffer::new(out.out, out_shape))
        .map_err(|e| ArgError::runtime("q", e.to_string()))?
        .into_any();
    let lse = match out.lse {
        Some(l) if req.return_lse => Py::new(
            py,
            HostBuffer::new(flexprefill_core::HostTensor::F32(l), lse_shape),
        )
        .map_err(|e| ArgError::runtime("q", e.to_string()))?
        .into_any(),
        _ => py.None(),
    };
    let rep = if req.return_report {
        report::to_dict(py, &rep, backend.name(), call_seconds)
            .map_err(|e| ArgError::runtime("return_report", e.to_string()))?
            .into_any()
            .unbind()
    } else {
        py.None()
    };
    Ok((out_buf, lse, rep))
}

/// q, k and v of a call, each exported once ([`Source`]); q's device decides the backend.
pub(crate) type Qkv<'py> = [Source<'py>; 3];

impl<'py> Request<'py> {
    pub fn sources(&self) -> Result<Qkv<'py>, ArgError> {
        Ok([
            Source::new(&self.q, "q")?,
            Source::new(&self.k, "k")?,
            Source::new(&self.v, "v")?,
        ])
    }
}

/// Borrows q, k and v from `memory`, after checking that k and v are on q's device (before
/// their memory is checked, so a mix gets an error naming the tensor, not a failed export).
pub(crate) fn borrow_qkv<'py>(
    [q, k, v]: Qkv<'py>,
    memory: dlpack::Memory,
) -> Result<(Borrowed<'py>, Borrowed<'py>, Borrowed<'py>), ArgError> {
    let q_dev = q.device;
    for t in [&k, &v] {
        let (name, dev) = (t.name, t.device);
        let same = if dlpack::is_cuda(q_dev.0) {
            dlpack::is_cuda(dev.0) && dev.1 == q_dev.1
        } else {
            !dlpack::is_cuda(dev.0)
        };
        if !same {
            return Err(ArgError::value(
                name,
                format!(
                    "{name} is on {} but q is on {}: q, k and v must be on one device",
                    device_name(dev),
                    device_name(q_dev)
                ),
            ));
        }
    }
    Ok((q.borrow(memory)?, k.borrow(memory)?, v.borrow(memory)?))
}

/// k and v must have q's element type.
pub(crate) fn same_dtype(
    req: &Request<'_>,
    q: &Borrowed<'_>,
    k: &Borrowed<'_>,
    v: &Borrowed<'_>,
) -> Result<(), ArgError> {
    for (name, t) in [("k", k), ("v", v)] {
        if t.elem != q.elem {
            return Err(ArgError::value(
                name,
                format!(
                    "{name} has dtype {} but q has {}: q, k and v must share one dtype",
                    shown(t.elem, req.bf16_as_u16),
                    shown(q.elem, req.bf16_as_u16)
                ),
            ));
        }
    }
    Ok(())
}

/// `cpu`, `cuda:0`, or the DLPack device number for anything else.
pub(crate) fn device_name((ty, id): (i32, i32)) -> String {
    match ty {
        dlpack::DL_CPU => "the CPU".into(),
        dlpack::DL_CUDA | dlpack::DL_CUDA_MANAGED => format!("cuda:{id}"),
        other => format!("DLPack device type {other}"),
    }
}

pub(crate) fn shown(e: Elem, bf16_as_u16: bool) -> String {
    if bf16_as_u16 && e == Elem::U16 {
        "bfloat16".into()
    } else {
        e.name()
    }
}

pub(crate) fn input_dtype(
    e: Elem,
    name: &'static str,
    bf16_as_u16: bool,
) -> Result<DType, ArgError> {
    match e {
        Elem::F32 => Ok(DType::F32),
        Elem::F16 => Ok(DType::F16),
        Elem::BF16 => Ok(DType::BF16),
        Elem::U16 if bf16_as_u16 => Ok(DType::BF16),
        other => Err(ArgError::value(
            name,
            format!(
                "{name} has dtype {}; FlexPrefill takes float32, float16 or bfloat16",
                other.name()
            ),
        )),
    }
}

/// Borrows `t` as a core tensor of `dtype`.
///
/// # Safety
/// `t`'s element type must be `dtype` (or uint16 standing for bfloat16).
unsafe fn as_ref<'a>(t: &'a Borrowed<'_>, dtype: DType) -> TensorRef<'a> {
    // SAFETY: the caller matched the element type; f32, f16 and bf16 accept every bit pattern
    // and have the size and alignment import checked.
    unsafe {
        match dtype {
            DType::F32 => TensorRef::F32(t.slice::<f32>()),
            DType::F16 => TensorRef::F16(t.slice::<f16>()),
            DType::BF16 => TensorRef::BF16(t.slice::<bf16>()),
        }
    }
}

pub(crate) enum Geometry {
    Batched {
        batch: usize,
        q_len: usize,
        kv_len: usize,
        shape: AttentionShape,
    },
    Varlen {
        cu_q: Vec<usize>,
        cu_k: Vec<usize>,
        shape: AttentionShape,
    },
}

impl Geometry {
    pub fn shape(&self) -> AttentionShape {
        match self {
            Geometry::Batched { shape, .. } | Geometry::Varlen { shape, .. } => *shape,
        }
    }

    /// The packed sequences, checked as core checks an input (none empty, q_len ≤ kv_len): the
    /// CUDA path has no host tensors to build a core input from.
    pub fn seqs(&self, varlen: bool) -> Result<Vec<Sequence>, ArgError> {
        let core = |e| ArgError::from_core(e, varlen);
        let seqs = match self {
            Geometry::Batched {
                batch,
                q_len,
                kv_len,
                ..
            } => Sequence::uniform(*batch, *q_len, *kv_len),
            Geometry::Varlen { cu_q, cu_k, .. } => {
                Sequence::from_cu_seqlens(cu_q, cu_k).map_err(core)?
            }
        };
        Sequence::check_packed(&seqs).map_err(core)?;
        Ok(seqs)
    }
}

/// Checks the shapes of q, k, v (and the cu_seqlens) against the layout; returns the geometry
/// and the shapes of the output and of the LSE (token-major, as the backends write them).
pub(crate) fn geometry(
    layout: &Layout<'_>,
    q: &Borrowed<'_>,
    k: &Borrowed<'_>,
    v: &Borrowed<'_>,
) -> Result<(Geometry, Vec<usize>, Vec<usize>), ArgError> {
    let (rank, form) = match layout {
        Layout::Batched => (4, "[batch, seq, heads, head_dim]"),
        Layout::Varlen { .. } => (3, "[total_tokens, heads, head_dim]"),
    };
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.shape.len() != rank {
            return Err(ArgError::value(
                name,
                format!("{name} must be {rank}-D {form}, got shape {:?}", t.shape),
            ));
        }
    }
    if v.shape != k.shape {
        return Err(ArgError::value(
            "v",
            format!(
                "v has shape {:?} but k has {:?}: they must match",
                v.shape, k.shape
            ),
        ));
    }
    let d = q.shape[rank - 1];
    if k.shape[rank - 1] != d {
        return Err(ArgError::value(
            "k",
            format!(
                "k has head_dim {} but q has {d} (last dimension)",
                k.shape[rank - 1]
            ),
        ));
    }
    let (heads, kv_heads) = (q.shape[rank - 2], k.shape[rank - 2]);
    let shape =
        AttentionShape::new(heads, kv_heads, d).map_err(|e| ArgError::from_core(e, false))?;
    match layout {
        Layout::Batched => {
            let (batch, q_len, kv_len) = (q.shape[0], q.shape[1], k.shape[1]);
            if k.shape[0] != batch {
                return Err(ArgError::value(
                    "k",
                    format!("k has batch {} but q has {batch}", k.shape[0]),
                ));
            }
            if batch == 0 || q_len == 0 {
                return Err(ArgError::value(
                    "q",
                    format!(
                        "q has shape {:?}: batch and seq must be at least 1",
                        q.shape
                    ),
                ));
            }
            if kv_len == 0 {
                return Err(ArgError::value(
                    "k",
                    format!("k has shape {:?}: seq must be at least 1", k.shape),
                ));
            }
            if q_len > kv_len {
                return Err(ArgError::value(
                    "q",
                    format!(
                        "q has {q_len} queries per sequence but k has {kv_len} keys: q_len must be \
                         ≤ kv_len (a chunk's queries are the last q_len positions)"
                    ),
                ));
            }
            Ok((
                Geometry::Batched {
                    batch,
                    q_len,
                    kv_len,
                    shape,
                },
                vec![batch, q_len, heads, d],
                vec![batch, q_len, heads],
            ))
        }
        Layout::Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
        } => {
            let cu_q = cu_seqlens("cu_seqlens_q", cu_seqlens_q, "q", q.shape[0])?;
            let cu_k = cu_seqlens("cu_seqlens_k", cu_seqlens_k, "k", k.shape[0])?;
            if cu_q.len() != cu_k.len() {
                return Err(ArgError::value(
                    "cu_seqlens_k",
                    format!(
                        "cu_seqlens_k has {} entries but cu_seqlens_q has {}: one per sequence \
                         boundary in both",
                        cu_k.len(),
                        cu_q.len()
                    ),
                ));
            }
            check_max("max_seqlen_q", *max_seqlen_q, "cu_seqlens_q", &cu_q)?;
            check_max("max_seqlen_k", *max_seqlen_k, "cu_seqlens_k", &cu_k)?;
            let total = q.shape[0];
            Ok((
                Geometry::Varlen { cu_q, cu_k, shape },
                vec![total, heads, d],
                vec![total, heads],
            ))
        }
    }
}

/// Reads a cu_seqlens argument (a host int32/int64 tensor or a sequence of ints) and checks it
/// against the tensor it cuts.
fn cu_seqlens(
    name: &'static str,
    obj: &Bound<'_, PyAny>,
    tensor: &str,
    tokens: usize,
) -> Result<Vec<usize>, ArgError> {
    let raw: Vec<i64> = if obj.hasattr("__dlpack__").unwrap_or(false) {
        let t = dlpack::borrow_host(obj, name)?;
        if t.shape.len() != 1 {
            return Err(ArgError::value(
                name,
                format!("{name} must be 1-D, got shape {:?}", t.shape),
            ));
        }
        // SAFETY: the element type is matched before each read.
        match t.elem {
            Elem::I32 => unsafe { t.slice::<i32>() }
                .iter()
                .map(|&x| x as i64)
                .collect(),
            Elem::I64 => unsafe { t.slice::<i64>() }.to_vec(),
            other => {
                return Err(ArgError::value(
                    name,
                    format!(
                        "{name} has dtype {}; it must be int32 or int64",
                        other.name()
                    ),
                ))
            }
        }
    } else {
        obj.extract::<Vec<i64>>().map_err(|_| {
            ArgError::value(
                name,
                format!("{name} must be an int32/int64 tensor or a sequence of ints"),
            )
        })?
    };
    let mut cu = Vec::with_capacity(raw.len());
    for (i, &x) in raw.iter().enumerate() {
        cu.push(
            usize::try_from(x)
                .map_err(|_| ArgError::value(name, format!("{name}[{i}] is negative ({x})")))?,
        );
    }
    if cu.len() < 2 {
        return Err(ArgError::value(
            name,
            format!(
                "{name} needs at least 2 entries (batch + 1), got {}",
                cu.len()
            ),
        ));
    }
    if cu[0] != 0 {
        return Err(ArgError::value(
            name,
            format!("{name} must start at 0, starts at {}", cu[0]),
        ));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(ArgError::value(
            name,
            format!(
                "{name} decreases at entry {} ({} after {})",
                i + 1,
                cu[i + 1],
                cu[i]
            ),
        ));
    }
    let last = cu[cu.len() - 1];
    if last != tokens {
        return Err(ArgError::value(
            name,
            format!("{name} ends at {last} but {tensor} has {tokens} tokens"),
        ));
    }
    Ok(cu)
}

/// flash-attn sizes its grid by `max_seqlen_*`; a value below the real maximum is a caller bug
/// we report rather than silently ignore. `None` (not given) is allowed.
fn check_max(
    name: &'static str,
    given: Option<i64>,
    cu_name: &str,
    cu: &[usize],
) -> Result<(), ArgError> {
    let Some(given) = given else { return Ok(()) };
    let longest = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    if given < 0 || (given as u64) < longest as u64 {
        return Err(ArgError::value(
            name,
            format!(
                "{name} ({given}) is smaller than the longest sequence in {cu_name} ({longest})"
            ),
        ));
    }
    Ok(())
}
