//! Where CUDA tensors go: q, k and v (and the output and LSE the Python layer allocated with
//! torch on q's device) are borrowed by DLPack as device addresses, and the CUDA backend's
//! raw-pointer entry queues the whole call on the caller's current torch stream. Nothing is
//! copied, nothing waits for the GPU unless the report is asked for (reading it back
//! synchronises that stream only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use flexprefill_core::{DType, Sequence, SparsityReport};
use flexprefill_cuda::{raw, CudaBackend, CudaError};
use pyo3::prelude::*;

use crate::call::{self, borrow_qkv, device_name, geometry, input_dtype, same_dtype, Outcome, Qkv};
use crate::dlpack::{self, Borrowed, Elem, Memory};
use crate::errors::ArgError;
use crate::{report, Request};

/// Whether CUDA tensors run in this build (`flexprefill._native.CUDA`); the CUDA tests read it.
pub(crate) const AVAILABLE: bool = true;

/// A device's backend, or why it cannot run.
type Opened = Result<Arc<CudaBackend>, String>;

/// One backend per device ordinal for the whole process (context, kernel registry): the first
/// call on a device pays the setup, later calls find it here. A device that cannot run keeps
/// its reason, so every call on it gets the same error without retrying the driver.
///
/// Only the first call on a device releases the GIL here (opening the driver and the context
/// takes a while); later calls find the backend without giving up the GIL.
fn backend(py: Python<'_>, ordinal: i32) -> Opened {
    static BACKENDS: OnceLock<Mutex<HashMap<i32, Opened>>> = OnceLock::new();
    let map = BACKENDS.get_or_init(Mutex::default);
    let lock = || map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(opened) = lock().get(&ordinal) {
        return opened.clone();
    }
    py.detach(|| {
        lock()
            .entry(ordinal)
            .or_insert_with(|| {
                let o =
                    usize::try_from(ordinal).map_err(|_| format!("device ordinal {ordinal}"))?;
                // torch orders every tensor by its streams: the backend need not track
                // its buffers with events (half the host time of a call).
                CudaBackend::stream_ordered(o)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    })
}

/// The CUDA path. `out` (and `lse` when `return_lse`) are the caller-framework tensors the
/// output is written into; `stream` is the caller's current stream (`cudaStream_t` as an
/// integer), `None` to ask q's producer through its DLPack C exchange API (torch's
/// `current_stream(q.device)`).
pub(crate) fn flex_prefill_cuda<'py>(
    py: Python<'py>,
    req: &Request<'py>,
    qkv: Qkv<'py>,
    stream: Option<usize>,
    out: Option<&Bound<'py, PyAny>>,
    lse: Option<&Bound<'py, PyAny>>,
) -> Result<Outcome, ArgError> {
    let device = qkv[0].device;
    let (q, k, v) = borrow_qkv(qkv, Memory::Cuda)?;
    let dtype = match q.elem {
        Elem::F32 => {
            return Err(ArgError::value(
                "q",
                "q has dtype float32 on CUDA; the CUDA kernels take float16 or bfloat16 \
                 (tensor cores): pass q, k and v as .to(torch.bfloat16), or CPU tensors",
            ))
        }
        e => input_dtype(e, "q", false)?,
    };
    same_dtype(req, &q, &k, &v)?;
    let varlen = req.layout.is_varlen();
    let (geo, out_shape, lse_shape) = geometry(&req.layout, &q, &k, &v)?;
    let seqs = geo.seqs(varlen)?;
    let shape = geo.shape();
    // The device before the output: without a usable GPU nothing else matters.
    let gpu = backend(py, device.1).map_err(|why| {
        ArgError::runtime(
            "q",
            format!("no usable GPU for {}: {why}", device_name(device)),
        )
    })?;
    // The output (and LSE): the tensors the Python layer allocated, or, when q's framework
    // offers an allocator in its C exchange API, new ones from it (torch: as `torch.empty` on
    // the current stream), which saves the Python layer's `torch.empty`.
    let out_obj = match out {
        Some(o) => o.clone(),
        None => q
            .allocate_like(py, q.elem, &out_shape, "out")?
            .ok_or_else(|| {
                ArgError::value(
                    "q",
                    format!(
                        "q is on {}: CUDA tensors must be torch tensors (the output is allocated \
                     with torch on q's device)",
                        device_name(device)
                    ),
                )
            })?,
    };
    let out = destination(&out_obj, "out", device, q.elem, &out_shape)?;
    let lse_obj = match (req.return_lse, lse) {
        (true, Some(l)) => Some(l.clone()),
        (true, None) => Some(
            q.allocate_like(py, Elem::F32, &lse_shape, "lse")?
                .ok_or_else(|| {
                    ArgError::value("lse", "return_lse is set but no LSE tensor was allocated")
                })?,
        ),
        (false, _) => None,
    };
    let lse_buf = match &lse_obj {
        Some(l) => Some(destination(l, "lse", device, Elem::F32, &lse_shape)?),
        None => None,
    };
    let stream = match stream {
        Some(s) => s as u64,
        None => q.current_stream(py, "q")?.ok_or_else(|| {
            ArgError::runtime(
                "q",
                format!(
                    "the current stream of {} is unknown: q did not come through DLPack's C \
                     exchange API",
                    device_name(device)
                ),
            )
        })?,
    };
    let call = Call {
        stream,
        dtype,
        q: q.address(),
        k: k.address(),
        v: v.address(),
        out: out.address(),
        lse: lse_buf.as_ref().map_or(0, Borrowed::address),
        seqs,
        softmax_scale: req.softmax_scale,
        report: req.return_report,
    };
    // The shared backend as it is, or a copy (two reference counts) with the call's threshold.
    let own;
    let gpu: &CudaBackend = match req.min_sparse_kv_len {
        Some(n) => {
            own = gpu.as_ref().clone().with_min_sparse_kv_len(n);
            &own
        }
        None => &gpu,
    };
    let cfg = req.cfg;
    // The exports go back to torch now, while its code is still in the host's caches: the
    // call needs only the addresses, and the tensors stay alive through the Python objects
    // the caller passed (this function's arguments) until it returns.
    drop((q, k, v, out, lse_buf));
    call::mark_rust_start();
    // SAFETY: q, k, v, out and lse are live device tensors of q's device (checked above:
    // device, dtype, compact layout and the element counts the shape implies), held by the
    // caller's tensor objects, which are arguments of this call; out and lse are fresh
    // allocations of the Python layer, so they overlap nothing. The stream is the caller's
    // current torch stream on that device, alive beyond this call, and the caller reads out
    // and lse after us on it (or after an event recorded on it), as torch orders any kernel.
    let (result, Seconds { queued, rust }) = py.detach(|| unsafe { call.run(gpu, shape, &cfg) });
    call::record_call_seconds(rust);
    call::mark_rust_end();
    let rep = result.map_err(|e| cuda_error(e, varlen, device))?;
    let rep = match rep {
        Some(r) => report::to_dict(py, &r, "cuda", queued)
            .map_err(|e| ArgError::runtime("return_report", e.to_string()))?
            .into_any()
            .unbind(),
        None => py.None(),
    };
    let lse_obj = lse_obj.map_or_else(|| py.None(), Bound::unbind);
    Ok((out_obj.unbind(), lse_obj, rep))
}

/// Borrows an output tensor and checks it is what the call writes: `elem` elements, `shape`,
/// compact, on `device`.
fn destination<'py>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
    device: (i32, i32),
    elem: Elem,
    shape: &[usize],
) -> Result<Borrowed<'py>, ArgError> {
    let t = dlpack::borrow(obj, name, Memory::Cuda)?;
    if t.device.1 != device.1 {
        return Err(ArgError::value(
            name,
            format!(
                "{name} is on {} but q is on {}",
                device_name(t.device),
                device_name(device)
            ),
        ));
    }
    if t.elem != elem || t.shape != shape {
        return Err(ArgError::value(
            name,
            format!(
                "{name} is {} {:?}, the call writes {} {shape:?}",
                t.elem.name(),
                t.shape,
                elem.name()
            ),
        ));
    }
    Ok(t)
}

/// One call's device addresses and plain values (no Python object: it runs without the GIL).
struct Call {
    stream: u64,
    dtype: DType,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    seqs: Vec<Sequence>,
    softmax_scale: Option<f32>,
    report: bool,
}

/// Host seconds of a call's Rust work.
struct Seconds {
    /// `flex_prefill_raw` alone: queueing the work (the report's `call` time).
    queued: f64,
    /// What a Rust caller of the device entry spends on the same call, the base the binding's
    /// overhead is measured against: `flex_prefill_raw`, the report when asked (which waits
    /// for the stream), and dropping the returned `DeviceRun` (which queues the release of its
    /// work buffers on the stream).
    rust: f64,
}

impl Call {
    /// Queues the call; reads the report back (synchronising the stream) only when asked.
    ///
    /// # Safety
    /// `flex_prefill_raw`'s contract for the addresses and the stream.
    unsafe fn run(
        &self,
        gpu: &CudaBackend,
        shape: flexprefill_core::AttentionShape,
        cfg: &flexprefill_core::FlexPrefillConfig,
    ) -> (Result<Option<SparsityReport>, CudaError>, Seconds) {
        let started = Instant::now();
        // SAFETY: forwarded from the caller.
        let run = unsafe {
            raw::flex_prefill_raw(
                gpu,
                self.stream,
                self.dtype,
                self.q,
                self.k,
                self.v,
                self.out,
                self.lse,
                shape,
                &self.seqs,
                self.softmax_scale,
                cfg,
            )
        };
        let queued = started.elapsed().as_secs_f64();
        let result = run.and_then(|run| {
            if self.report {
                // SAFETY: the call's own stream.
                unsafe { raw::report_raw(gpu, self.stream, &run) }.map(Some)
            } else {
                Ok(None)
            }
            // `run` drops here: its work buffers are freed in order on the stream.
        });
        let rust = started.elapsed().as_secs_f64();
        (result, Seconds { queued, rust })
    }
}

/// The CUDA crate's error as Python sees it: input errors name their argument, everything
/// else is a `DeviceError`.
fn cuda_error(e: CudaError, varlen: bool, device: (i32, i32)) -> ArgError {
    match e {
        CudaError::Core(e) => ArgError::from_core(e, varlen),
        CudaError::Unsupported { .. } => ArgError::value("q", e.to_string()),
        other => ArgError::runtime("q", format!("{}: {other}", device_name(device))),
    }
}
