//! # flexprefill-py
//!
//! The native half of the `flexprefill` Python package (the other half, in `python/`, holds the
//! public functions, the report classes and the transformers integration). It borrows q, k and
//! v through DLPack without a copy and runs FlexPrefill with the GIL released. On the CPU the
//! output comes back as a [`HostBuffer`] that NumPy (`__array_interface__`) and torch
//! (`__dlpack__`) adopt without a copy; CUDA tensors go to the CUDA backend on the caller's
//! current stream, which writes into an output torch allocated (`cuda.rs`).
//!
//! Build the wheel with `maturin build --release -m flexprefill-py/Cargo.toml`, or install it
//! with `pip install ./flexprefill-py`; `docs/PYTHON.md` documents the Python API.

mod call;
mod cuda;
mod dlpack;
mod errors;
mod report;

use flexprefill_core::{DType, HostTensor};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

pub(crate) use call::Request;

/// An output tensor owned by Rust, adopted by the caller's framework without a copy (NumPy
/// reads `__array_interface__`, torch `__dlpack__`); the adopting array keeps it alive.
///
/// bfloat16 appears to NumPy as uint16 (NumPy has no bfloat16; the Python layer views it as
/// `ml_dtypes.bfloat16`), to torch as `torch.bfloat16`.
#[pyclass(frozen, module = "flexprefill._native")]
pub struct HostBuffer {
    data: HostTensor,
    shape: Vec<usize>,
}

impl HostBuffer {
    pub(crate) fn new(data: HostTensor, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { data, shape }
    }

    pub(crate) fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Address of element 0. The buffer is never written from Rust after construction, so
    /// handing out a writable pointer to NumPy or torch is sound.
    pub(crate) fn data_ptr(&self) -> usize {
        match &self.data {
            HostTensor::F32(x) => x.as_ptr() as usize,
            HostTensor::F16(x) => x.as_ptr() as usize,
            HostTensor::BF16(x) => x.as_ptr() as usize,
        }
    }
}

#[pymethods]
impl HostBuffer {
    /// The shape, as a tuple.
    #[getter(shape)]
    fn py_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// `float32`, `float16` or `bfloat16`.
    #[getter(dtype)]
    fn py_dtype(&self) -> &'static str {
        match self.dtype() {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// NumPy's array interface (version 3): `np.asarray(buf)` views our memory.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let typestr = match self.dtype() {
            DType::F32 => "<f4",
            DType::F16 => "<f2",
            DType::BF16 => "<u2",
        };
        d.set_item("shape", pyo3::types::PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", typestr)?;
        d.set_item("data", (self.data_ptr(), false))?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    /// DLPack export: the capsule's manager holds a reference to this buffer.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        slf: &Bound<'_, Self>,
        stream: Option<&Bound<'_, PyAny>>,
        max_version: Option<&Bound<'_, PyAny>>,
        dl_device: Option<&Bound<'_, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyCapsule>> {
        // Host memory: there is no stream to order against and no device to move to.
        let _ = (stream, dl_device, copy);
        dlpack::export(slf, dlpack::parse_max_version(max_version))
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (dlpack::DL_CPU, 0)
    }

    fn __repr__(&self) -> String {
        format!(
            "HostBuffer(shape={:?}, dtype={})",
            self.shape,
            self.py_dtype()
        )
    }
}

/// The one entry point the Python layer calls; `flexprefill/_api.py` documents every argument.
/// `cu_seqlens_q` None means the batched form `[batch, seq, heads, head_dim]`.
#[pyfunction]
#[pyo3(signature = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gamma, tau,
    min_budget, max_budget, block_size, softmax_scale, selection, return_lse, return_report,
    stream, bf16_as_u16, out=None, lse=None, min_sparse_kv_len=None))]
#[allow(clippy::too_many_arguments)] // mirrors the Python signature one to one
fn attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    cu_seqlens_q: Option<&Bound<'py, PyAny>>,
    cu_seqlens_k: Option<&Bound<'py, PyAny>>,
    max_seqlen_q: Option<i64>,
    max_seqlen_k: Option<i64>,
    gamma: f64,
    tau: f64,
    min_budget: i64,
    max_budget: Option<i64>,
    block_size: i64,
    softmax_scale: Option<f64>,
    selection: Option<&str>,
    return_lse: bool,
    return_report: bool,
    stream: Option<usize>,
    bf16_as_u16: bool,
    out: Option<&Bound<'py, PyAny>>,
    lse: Option<&Bound<'py, PyAny>>,
    min_sparse_kv_len: Option<i64>,
) -> PyResult<(Py<PyAny>, Py<PyAny>, Py<PyAny>)> {
    call::mark_entry();
    let request = Request::parse(
        q,
        k,
        v,
        call::Layout::from_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        call::Knobs {
            gamma,
            tau,
            min_budget,
            max_budget,
            block_size,
            softmax_scale,
            selection,
            min_sparse_kv_len,
        },
        return_lse,
        return_report,
        bf16_as_u16,
    )
    .map_err(|e| e.into_pyerr(py))?;
    let qkv = request.sources().map_err(|e| e.into_pyerr(py))?;
    let device = qkv[0].device;
    let outcome = if dlpack::is_cuda(device.0) {
        cuda::flex_prefill_cuda(py, &request, qkv, stream, out, lse)
    } else {
        call::flex_prefill_cpu(py, &request, qkv)
    }
    .map_err(|e| e.into_pyerr(py))?;
    Ok(outcome)
}

/// Host seconds of the last call's Rust work: on the CPU the whole backend call, on CUDA what
/// a Rust caller of the device entry spends on it (`flex_prefill_raw` queueing the work, the
/// report's readback when asked, dropping the returned `DeviceRun`; not the GPU's execution).
/// The base `benches/overhead.py` subtracts from a Python call's time.
#[pyfunction]
fn last_call_seconds() -> f64 {
    call::last_call_seconds()
}

/// `(before, after)`: host seconds of the last CUDA call on this thread in the binding before
/// its Rust work (argument parsing, DLPack export, checks) and from the end of that work to
/// this query (results, the return to Python, the caller's code up to here); `None` after a
/// failed or CPU call. `benches/overhead.py --breakdown` reads it right after a call.
#[pyfunction]
fn last_call_breakdown() -> Option<(f64, f64)> {
    call::binding_seconds(std::time::Instant::now())
}

/// Whether a CUDA call on `obj` can leave its stream to the native side: `obj`'s type offers
/// DLPack's C exchange API, which names the producer's current stream (torch ≥ 2.10). The
/// Python layer asks once per type and otherwise passes `torch.cuda.current_stream()`.
#[pyfunction]
fn stream_from_producer(obj: &Bound<'_, PyAny>) -> bool {
    dlpack::has_exchange_api(obj)
}

/// Hands the device memory FlexPrefill keeps between CUDA calls back to the driver
/// (`flexprefill.empty_cache()`, like `torch.cuda.empty_cache()` for torch's allocator). Memory
/// of calls still queued is released once they finish. A no-op before any CUDA call.
#[pyfunction]
fn empty_cache(py: Python<'_>) -> PyResult<()> {
    flexprefill_cuda::release_cached_memory().map_err(|e| {
        errors::ArgError {
            kind: errors::Kind::Runtime,
            argument: None,
            message: e.to_string(),
        }
        .into_pyerr(py)
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HostBuffer>()?;
    m.add_function(wrap_pyfunction!(attention, m)?)?;
    m.add_function(wrap_pyfunction!(last_call_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(last_call_breakdown, m)?)?;
    m.add_function(wrap_pyfunction!(stream_from_producer, m)?)?;
    m.add_function(wrap_pyfunction!(empty_cache, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA", cuda::AVAILABLE)?;
    Ok(())
}
