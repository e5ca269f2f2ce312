//! DLPack's C exchange API: the C functions a framework publishes to export its tensors,
//! name its current stream and allocate new tensors without running Python (torch ≥ 2.10).

use std::ffi::{c_int, c_void, CStr};
use std::ptr::NonNull;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyType};

use super::{
    DLDataType, DLDevice, DLManagedTensorVersioned, DLPackVersion, DLTensor, Elem, Managed,
    DL_BFLOAT, DL_FLOAT,
};
use crate::errors::ArgError;

/// DLPack's C exchange API (dlpack.h 1.2 and later; `DLPackExchangeAPI`), which a framework
/// publishes as the capsule `type(tensor).__dlpack_c_exchange_api__` (torch ≥ 2.10): C functions
/// that export a tensor and name the current stream without running any Python. `__dlpack__`
/// costs a few microseconds per tensor in torch's Python code (argument checks, device and
/// stream logic), the current stream as much again; through this table each is a C call.
#[repr(C)]
struct ExchangeApi {
    version: DLPackVersion,
    prev_api: *mut c_void,
    managed_tensor_allocator: Option<
        unsafe extern "C" fn(
            *mut DLTensor,
            *mut *mut DLManagedTensorVersioned,
            *mut c_void,
            Option<SetError>,
        ) -> c_int,
    >,
    managed_tensor_from_py_object_no_sync:
        Option<unsafe extern "C" fn(*mut c_void, *mut *mut DLManagedTensorVersioned) -> c_int>,
    managed_tensor_to_py_object_no_sync:
        Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned, *mut *mut c_void) -> c_int>,
    dltensor_from_py_object_no_sync: *const c_void,
    current_work_stream: Option<unsafe extern "C" fn(c_int, i32, *mut *mut c_void) -> c_int>,
}

const EXCHANGE_API: &CStr = c"dlpack_exchange_api";

/// The allocator's error callback: `(error_ctx, kind, message)`.
type SetError = unsafe extern "C" fn(*mut c_void, *const std::ffi::c_char, *const std::ffi::c_char);

/// Keeps the allocator's error message (`error_ctx` is a `String`).
unsafe extern "C" fn keep_error(
    ctx: *mut c_void,
    kind: *const std::ffi::c_char,
    message: *const std::ffi::c_char,
) {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the producer passes NUL-terminated strings, alive during the call.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: `ctx` is the `&mut String` `Exchange::allocate` passed, alive during the call.
    let out = unsafe { &mut *ctx.cast::<String>() };
    *out = format!("{}: {}", text(kind), text(message));
}

/// A producer's exchange table. The table is static in the producer ("must stay alive
/// throughout the lifetime of the process"), so its address is kept as a plain integer.
#[derive(Clone, Copy)]
pub(super) struct Exchange(usize);

impl Exchange {
    fn api(self) -> &'static ExchangeApi {
        // SAFETY: made only from a checked `dlpack_exchange_api` capsule of major version 1,
        // whose table outlives the process's use of it.
        unsafe { &*(self.0 as *const ExchangeApi) }
    }

    /// The table of `obj`'s type, if it publishes one we can use (looked up on the type once
    /// and remembered with a reference to the type, so the address cannot be reused).
    pub(super) fn of(obj: &Bound<'_, PyAny>) -> Option<Self> {
        static TYPES: Mutex<Vec<(Py<PyType>, Option<Exchange>)>> = Mutex::new(Vec::new());
        let ty = obj.get_type();
        let types = || TYPES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, e)) = types().iter().find(|(t, _)| t.as_ptr() == ty.as_ptr()) {
            return *e;
        }
        // Without the lock: an attribute lookup may run Python code, which may switch threads.
        let found = Self::lookup(&ty);
        let mut types = types();
        // Few tensor types cross a process (torch.Tensor, Parameter, ndarray, ...); beyond that
        // a type is looked up per call rather than kept.
        if types.len() < 32 && !types.iter().any(|(t, _)| t.as_ptr() == ty.as_ptr()) {
            types.push((ty.unbind(), found));
        }
        found
    }

    fn lookup(ty: &Bound<'_, PyType>) -> Option<Self> {
        let py = ty.py();
        // The standard name, then the one it had before DLPack 1.3 (a capsule there too in
        // the releases that shipped it; the integer form of earlier builds is not used).
        let cap = ty
            .getattr(pyo3::intern!(py, "__dlpack_c_exchange_api__"))
            .or_else(|_| ty.getattr(pyo3::intern!(py, "__c_dlpack_exchange_api__")))
            .ok()?;
        let cap = cap.cast::<PyCapsule>().ok()?;
        let p = cap.pointer_checked(Some(EXCHANGE_API)).ok()?;
        // SAFETY: a "dlpack_exchange_api" capsule points to a DLPackExchangeAPI, whose header
        // (version first) is stable across versions.
        let api = unsafe { &*p.as_ptr().cast::<ExchangeApi>() };
        // The spec: a consumer checks the major version; minor versions only append.
        (api.version.major == 1
            && api.managed_tensor_from_py_object_no_sync.is_some()
            && api.current_work_stream.is_some())
        .then_some(Exchange(p.as_ptr() as usize))
    }

    /// Exports `obj` as an owned managed tensor, without a stream synchronisation (the call
    /// runs on the producer's current stream); `None` when the producer refuses (its error is
    /// cleared: `__dlpack__` then says why in the framework's own words, without the C++
    /// backtrace torch's C functions put in the message).
    fn export(self, obj: &Bound<'_, PyAny>) -> Option<Managed> {
        let f = self.api().managed_tensor_from_py_object_no_sync?;
        let mut out: *mut DLManagedTensorVersioned = std::ptr::null_mut();
        // SAFETY: `obj` is of the type the table was found on, alive, and we hold the GIL.
        let rc = unsafe { f(obj.as_ptr().cast(), &mut out) };
        match NonNull::new(out) {
            Some(m) if rc == 0 => Some(Managed(m)),
            // On failure `out` is not ours, whatever it holds.
            _ => {
                let _ = PyErr::take(obj.py());
                None
            }
        }
    }

    /// A new, uninitialised, compact tensor of `elem` and `shape` on `device`, allocated by
    /// the producer (torch: its caching allocator on the device's current stream, as
    /// `torch.empty` does) and returned as the producer's own Python object; `None` when the
    /// table has no allocator, an error when the producer refuses.
    pub(super) fn allocate<'py>(
        self,
        py: Python<'py>,
        device: (i32, i32),
        elem: Elem,
        shape: &[usize],
        name: &'static str,
    ) -> Result<Option<Bound<'py, PyAny>>, ArgError> {
        let api = self.api();
        let (Some(alloc), Some(to_py)) = (
            api.managed_tensor_allocator,
            api.managed_tensor_to_py_object_no_sync,
        ) else {
            return Ok(None);
        };
        let dtype = match elem {
            Elem::F32 => DLDataType {
                code: DL_FLOAT,
                bits: 32,
                lanes: 1,
            },
            Elem::F16 => DLDataType {
                code: DL_FLOAT,
                bits: 16,
                lanes: 1,
            },
            Elem::BF16 => DLDataType {
                code: DL_BFLOAT,
                bits: 16,
                lanes: 1,
            },
            _ => return Ok(None),
        };
        let mut dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut proto = DLTensor {
            data: std::ptr::null_mut(),
            device: DLDevice {
                device_type: device.0,
                device_id: device.1,
            },
            ndim: dims.len() as i32,
            dtype,
            shape: dims.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        };
        let mut error = String::new();
        let mut out: *mut DLManagedTensorVersioned = std::ptr::null_mut();
        // SAFETY: a C function of the producer's table, called with the GIL held; the
        // prototype (and the shape it points to) and the error string outlive the call.
        let rc = unsafe {
            alloc(
                &mut proto,
                &mut out,
                (&mut error as *mut String).cast(),
                Some(keep_error),
            )
        };
        let fail = |why: String| {
            ArgError::runtime(
                name,
                format!(
                    "allocating {name} ({} {shape:?}) failed: {why}",
                    elem.name()
                ),
            )
        };
        let Some(managed) = NonNull::new(out).filter(|_| rc == 0) else {
            let why = PyErr::take(py).map_or(error, |e| e.to_string());
            return Err(fail(why));
        };
        let mut obj: *mut c_void = std::ptr::null_mut();
        // SAFETY: hands the live managed tensor we got to the producer, which owns it from
        // here whatever the outcome (the spec: the function consumes it).
        let rc = unsafe { to_py(managed.as_ptr(), &mut obj) };
        if rc != 0 || obj.is_null() {
            let why = PyErr::take(py).map_or_else(|| "no object".into(), |e| e.to_string());
            return Err(fail(why));
        }
        // SAFETY: a new reference to the producer's tensor object.
        Ok(Some(unsafe { Bound::from_owned_ptr(py, obj.cast()) }))
    }

    pub(super) fn current_stream(
        self,
        py: Python<'_>,
        device: (i32, i32),
        name: &'static str,
    ) -> Result<u64, ArgError> {
        let Some(f) = self.api().current_work_stream else {
            return Ok(0);
        };
        let mut stream: *mut c_void = std::ptr::null_mut();
        // SAFETY: a C function of the producer's table, called with the GIL held.
        let rc = unsafe { f(device.0, device.1, &mut stream) };
        if rc != 0 {
            let why =
                PyErr::take(py).map_or_else(|| "unknown error".to_string(), |e| e.to_string());
            return Err(ArgError::runtime(
                name,
                format!("the current stream of {name}'s device is unknown: {why}"),
            ));
        }
        Ok(stream as usize as u64)
    }
}

/// Whether `obj`'s type offers a C exchange API this module uses.
pub(crate) fn has_exchange_api(obj: &Bound<'_, PyAny>) -> bool {
    Exchange::of(obj).is_some()
}

/// Exports `obj` through its type's C exchange API when it has one and the export succeeds;
/// `None` leaves it to `__dlpack__`, which then accepts it or says why not. A tensor that
/// requires grad goes that way too: `__dlpack__` refuses it (torch: the result would leave
/// autograd silently), the C export does not check.
pub(super) fn export_fast(obj: &Bound<'_, PyAny>) -> Option<(Managed, Exchange)> {
    let api = Exchange::of(obj)?;
    let grad = obj
        .getattr(pyo3::intern!(obj.py(), "requires_grad"))
        .and_then(|g| g.is_truthy())
        .unwrap_or(false);
    if grad {
        return None;
    }
    Some((api.export(obj)?, api))
}
