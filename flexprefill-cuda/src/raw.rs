//! The device entry on raw pointers, for engines that hold their tensors in another library
//! (torch through DLPack, candle or mistral.rs with their own cudarc): no `CudaSlice` of ours
//! is needed, only device addresses, the caller's `CUstream` and the shape.
//!
//! Requirements: the NVIDIA driver of the backend (any version that runs CUDA 12 or newer),
//! the pointers and the stream in the backend's context (the device's primary context, as
//! torch and cudarc use by default). Make the backend with
//! [`CudaBackend::stream_ordered`]: its buffers are ordered by the caller's stream alone,
//! without cudarc's per-buffer events, which halves the host time of a call.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use flexprefill_core::{AttentionShape, DType, FlexPrefillConfig, Sequence};

use crate::attention::{AttentionArgs, DeviceElem, DeviceSeqs};
use crate::call::{run_in, DeviceRun};
use crate::error::{CudaError, Result};
use crate::stats::StatsElem;
use crate::workspace::{Scratch, Workspace};
use crate::CudaBackend;

/// A borrowed device buffer seen as a `CudaSlice`: leaked (never freed) when dropped, on
/// every path, errors included.
struct Borrowed<T>(ManuallyDrop<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must hold `len` elements of `T` on `stream`'s context for the wrapper's life.
    unsafe fn new(stream: &Arc<CudaStream>, ptr: CUdeviceptr, len: usize) -> Self {
        Self(ManuallyDrop::new(stream.upgrade_device_ptr(ptr, len)))
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` hands the pointer back without freeing it.
        let s = unsafe { ManuallyDrop::take(&mut self.0) };
        let _ = s.leak();
    }
}

/// FlexPrefill on raw device pointers, queued on the caller's stream `stream` (a
/// `cudaStream_t`/`CUstream` as an integer, as torch's `Stream.cuda_stream` gives it and any
/// cudarc version casts to; 0 is the legacy default stream). Every address is a
/// `CUdeviceptr`/`data_ptr()` as `u64`, so no cudarc type crosses the boundary.
///
/// Layouts, row-major, packed over the batch as [`flexprefill_core::AttentionInput::packed`]:
/// `q` and `out` `[total_q, num_heads, head_dim]`, `k` and `v` `[total_k, num_kv_heads,
/// head_dim]`, `lse` (when not 0) `[total_q, num_heads]` f32, where `total_q`/`total_k` are the
/// ends of the last of `seqs`. `dtype` is the element type of q, k, v and out (bf16 or f16).
/// `softmax_scale` `None` is `1/sqrt(head_dim)`. Every element of `out` (and `lse`) is written.
///
/// Everything is queued on `stream`; nothing waits for the GPU. The small descriptor upload
/// (sequence table) and the selection's work buffers are allocated on `stream` too (stream
/// ordered); [`flex_prefill_raw_with`] takes them from a [`Workspace`] instead. The returned [`DeviceRun`] keeps those buffers; read the decisions with
/// [`DeviceRun::report`] only when wanted (that synchronises), and drop it while `stream` is
/// still alive.
///
/// # Safety
/// - `q`, `k`, `v`, `out` (and `lse` unless 0) are device addresses in `backend`'s context,
///   each valid for the size above, and stay valid (not freed, not reused) until the work
///   queued on `stream` by this call has completed;
/// - `out` and `lse` do not overlap each other or the inputs;
/// - `stream` is a live stream of `backend`'s context, and outlives the returned
///   [`DeviceRun`];
/// - the caller orders its own reads of `out`/`lse` after this call on `stream` (any later
///   work on `stream` is ordered; another stream must wait on an event recorded there).
#[allow(clippy::too_many_arguments)]
pub unsafe fn flex_prefill_raw(
    backend: &CudaBackend,
    stream: u64,
    dtype: DType,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    shape: AttentionShape,
    seqs: &[Sequence],
    softmax_scale: Option<f32>,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceRun> {
    // SAFETY: the caller's contract.
    unsafe {
        entry(
            backend,
            None,
            stream,
            dtype,
            [q, k, v, out, lse],
            shape,
            seqs,
            softmax_scale,
            cfg,
        )
    }
}

/// [`flex_prefill_raw`] with every buffer (sequence table included) from `ws`: no device
/// allocation, no module load, no host synchronisation, so the call can be captured in a
/// CUDA graph on `stream` ([`crate::call::flex_prefill_device_with`] says what the workspace
/// promises and asks). A batch beyond the workspace's limits returns
/// [`CudaError::ExceedsWorkspace`] before anything is queued.
///
/// # Safety
/// [`flex_prefill_raw`]'s contract.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flex_prefill_raw_with(
    backend: &CudaBackend,
    ws: &mut Workspace,
    stream: u64,
    dtype: DType,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    shape: AttentionShape,
    seqs: &[Sequence],
    softmax_scale: Option<f32>,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceRun> {
    // SAFETY: the caller's contract.
    unsafe {
        entry(
            backend,
            Some(ws),
            stream,
            dtype,
            [q, k, v, out, lse],
            shape,
            seqs,
            softmax_scale,
            cfg,
        )
    }
}

/// Both raw entries: checks, then the call on fresh allocations or `ws`.
///
/// # Safety
/// [`flex_prefill_raw`]'s contract.
#[allow(clippy::too_many_arguments)]
unsafe fn entry(
    backend: &CudaBackend,
    ws: Option<&mut Workspace>,
    stream: u64,
    dtype: DType,
    [q, k, v, out, lse]: [u64; 5],
    shape: AttentionShape,
    seqs: &[Sequence],
    softmax_scale: Option<f32>,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceRun> {
    shape.validate()?;
    cfg.validate()?;
    if seqs.is_empty() {
        return Err(flexprefill_core::Error::Shape("no sequences".into()).into());
    }
    for (name, p) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        if p == 0 {
            return Err(CudaError::Unsupported {
                op: "flex_prefill_raw",
                message: format!("{name} is a null device pointer"),
            });
        }
    }
    if let Some(s) = softmax_scale {
        if !s.is_finite() || s <= 0.0 {
            return Err(flexprefill_core::Error::Config(format!(
                "softmax_scale ({s}) must be finite and > 0"
            ))
            .into());
        }
    }
    // SAFETY: the caller promises `stream` is a live stream of the backend's context; the
    // wrapper does not destroy it.
    let stream = unsafe {
        backend
            .device()
            .context()
            .wrap_borrowed_stream(stream as usize as CUstream)
    };
    let raw = Raw {
        q,
        k,
        v,
        out,
        lse,
        shape,
        seqs,
        total_q: seqs.iter().map(|s| s.q_start + s.q_len).max().unwrap_or(0),
        total_k: seqs.iter().map(|s| s.k_start + s.kv_len).max().unwrap_or(0),
        softmax_scale,
        cfg,
    };
    // SAFETY: the caller's contract covers each of these (addresses, sizes, lifetime).
    unsafe {
        match dtype {
            DType::BF16 => run::<half::bf16>(backend, ws, &stream, &raw),
            DType::F16 => run::<half::f16>(backend, ws, &stream, &raw),
            DType::F32 => Err(CudaError::Unsupported {
                op: "flex_prefill_raw",
                message: "f32 tensors: the kernels take bf16 or f16; convert first".into(),
            }),
        }
    }
}

/// The arguments of [`flex_prefill_raw`], with the token totals the sequences imply.
struct Raw<'a> {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    shape: AttentionShape,
    seqs: &'a [Sequence],
    total_q: usize,
    total_k: usize,
    softmax_scale: Option<f32>,
    cfg: &'a FlexPrefillConfig,
}

/// # Safety
/// [`flex_prefill_raw`]'s contract.
unsafe fn run<T: StatsElem + DeviceElem + DeviceRepr>(
    backend: &CudaBackend,
    ws: Option<&mut Workspace>,
    stream: &Arc<CudaStream>,
    r: &Raw<'_>,
) -> Result<DeviceRun> {
    let Raw {
        q,
        k,
        v,
        out,
        lse,
        shape,
        seqs,
        total_q,
        total_k,
        softmax_scale,
        cfg,
    } = *r;
    let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let mut scratch = match ws {
        Some(ws) => {
            ws.check(shape, <T as StatsElem>::DTYPE, seqs, cfg)?;
            ws.begin(stream)?
        }
        None => Scratch::alloc(),
    };
    let dseqs = DeviceSeqs::new_in(stream, &mut scratch, seqs)?;
    let qs = Borrowed::<T>::new(stream, q, total_q * h * d);
    let ks = Borrowed::<T>::new(stream, k, total_k * hkv * d);
    let vs = Borrowed::<T>::new(stream, v, total_k * hkv * d);
    let mut os = Borrowed::<T>::new(stream, out, total_q * h * d);
    let mut ls = (lse != 0).then(|| Borrowed::<f32>::new(stream, lse, total_q * h));
    let args = AttentionArgs {
        q: &qs.0,
        k: &ks.0,
        v: &vs.0,
        shape,
        seqs: &dseqs,
        softmax_scale,
    };
    let r = run_in(
        backend,
        stream,
        &mut scratch,
        &args,
        cfg,
        &mut os.0,
        ls.as_mut().map(|l| &mut *l.0),
        false,
        <T as StatsElem>::DTYPE,
        None,
    );
    scratch.finish();
    r
}

/// The decisions of a [`flex_prefill_raw`] call ([`DeviceRun::report`]), read back on the
/// caller's stream `stream` (the integer form, as for the call); synchronises that stream.
///
/// # Safety
/// `stream` is a live stream of `backend`'s context, the call's stream or one ordered after it.
pub unsafe fn report_raw(
    backend: &CudaBackend,
    stream: u64,
    run: &DeviceRun,
) -> Result<flexprefill_core::SparsityReport> {
    // SAFETY: the caller promises a live stream of this context; the wrapper does not own it.
    let stream = unsafe {
        backend
            .device()
            .context()
            .wrap_borrowed_stream(stream as usize as CUstream)
    };
    run.report(&stream)
}
