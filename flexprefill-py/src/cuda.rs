//! Where CUDA tensors go. This build has no CUDA path yet: every CUDA call ends here with a
//! `DeviceError` naming the device, before any memory is touched.
//!
//! The CUDA path plugs in here and nowhere else: `request` holds the checked knobs and the
//! q/k/v objects (not yet exported), `device` is q's `(DLPack device type, ordinal)` and
//! `stream` the caller's current torch stream (`cudaStream_t` as an integer, passed by the
//! Python layer for torch CUDA tensors). The intended body: export q, k, v (and int32
//! `cu_seqlens` on the device) with `__dlpack__(stream=stream)`, check them as `call.rs` does
//! for host tensors, allocate the output (and LSE) with the caller's framework, call the CUDA
//! backend's raw-pointer entry on `stream` with the GIL released, and return
//! `(out, lse, report)` as the CPU path does. The Python layer adopts any object with
//! `__dlpack__`, so nothing else changes.

use pyo3::prelude::*;

use crate::call::{device_name, Outcome};
use crate::errors::ArgError;
use crate::Request;

/// Whether CUDA tensors run in this build (`flexprefill._native.CUDA`); the CUDA tests read it.
pub(crate) const AVAILABLE: bool = false;

pub(crate) fn flex_prefill_cuda(
    _py: Python<'_>,
    _request: &Request<'_>,
    device: (i32, i32),
    _stream: Option<usize>,
) -> Result<Outcome, ArgError> {
    Err(ArgError::runtime(
        "q",
        format!(
            "CUDA tensors are not supported by this build yet (q is on {}); move q, k and v \
             to the CPU (.cpu()) to run on the CPU backend",
            device_name(device)
        ),
    ))
}
