//! DLPack, both ways: borrowing the memory of a NumPy array or torch tensor without a copy, and
//! handing our output to the caller's framework without a copy.
//!
//! DLPack is the one protocol every array framework speaks (`__dlpack__`, `__dlpack_device__`),
//! and unlike the buffer protocol it is in the stable ABI of every CPython we support and
//! carries device, bfloat16 and strides. Structs follow `dlpack.h` v1.0. A producer that also
//! publishes DLPack's C exchange API (`dlpack.h` 1.2; torch ≥ 2.10) is read through it instead:
//! the same managed tensor, exported by a C call rather than by the framework's Python code.

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyTuple};

use crate::errors::ArgError;
use crate::HostBuffer;

mod exchange;
pub(crate) use exchange::has_exchange_api;
use exchange::{export_fast, Exchange};

/// `DLDeviceType` values we tell apart.
pub(crate) const DL_CPU: i32 = 1;
pub(crate) const DL_CUDA: i32 = 2;
const DL_CUDA_HOST: i32 = 3;
pub(crate) const DL_CUDA_MANAGED: i32 = 13;

const DL_INT: u8 = 0;
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;

const FLAG_READ_ONLY: u64 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const LEGACY: &CStr = c"dltensor";
const VERSIONED: &CStr = c"dltensor_versioned";

/// Element types a borrowed tensor may have; only the first three are attention inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F16,
    BF16,
    /// bfloat16 seen through a uint16 view (NumPy has no bfloat16; ml_dtypes arrays cross so).
    U16,
    I32,
    I64,
    Other {
        code: u8,
        bits: u8,
        lanes: u16,
    },
}

impl Elem {
    fn from_dl(t: DLDataType) -> Self {
        match (t.code, t.bits, t.lanes) {
            (DL_FLOAT, 32, 1) => Elem::F32,
            (DL_FLOAT, 16, 1) => Elem::F16,
            (DL_BFLOAT, 16, 1) => Elem::BF16,
            (DL_UINT, 16, 1) => Elem::U16,
            (DL_INT, 32, 1) => Elem::I32,
            (DL_INT, 64, 1) => Elem::I64,
            _ => Elem::Other {
                code: t.code,
                bits: t.bits,
                lanes: t.lanes,
            },
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::U16 => 2,
            Elem::I64 => 8,
            Elem::Other { bits, lanes, .. } => (bits as usize * lanes as usize).div_ceil(8),
        }
    }

    /// The framework-neutral name users see in errors.
    pub(crate) fn name(self) -> String {
        match self {
            Elem::F32 => "float32".into(),
            Elem::F16 => "float16".into(),
            Elem::BF16 => "bfloat16".into(),
            Elem::U16 => "uint16".into(),
            Elem::I32 => "int32".into(),
            Elem::I64 => "int64".into(),
            Elem::Other { code, bits, lanes } => {
                let kind = match code {
                    DL_INT => "int",
                    DL_UINT => "uint",
                    DL_FLOAT => "float",
                    DL_BFLOAT => "bfloat",
                    5 => "complex",
                    6 => "bool",
                    _ => "dlpack code ",
                };
                if lanes == 1 {
                    format!("{kind}{bits}")
                } else {
                    format!("{kind}{bits}x{lanes}")
                }
            }
        }
    }
}

/// Where a tensor lives, from `__dlpack_device__` (asked before any capsule is made, so a CUDA
/// tensor can go to the CUDA path with the caller's stream).
pub(crate) fn device_of(
    obj: &Bound<'_, PyAny>,
    name: &'static str,
) -> Result<(i32, i32), ArgError> {
    let not_a_tensor = || {
        let ty = obj
            .get_type()
            .name()
            .map_or_else(|_| "?".to_string(), |n| n.to_string());
        ArgError::value(
            name,
            format!(
                "{name} must be a NumPy array or a torch tensor (an object with __dlpack__), got {ty}"
            ),
        )
    };
    let method = pyo3::intern!(obj.py(), "__dlpack_device__");
    if !obj.hasattr(method).unwrap_or(false) {
        return Err(not_a_tensor());
    }
    let dev = obj
        .call_method0(method)
        .map_err(|e| ArgError::value(name, format!("{name} cannot be exported by DLPack: {e}")))?;
    dev.extract::<(i32, i32)>().map_err(|_| not_a_tensor())
}

/// True for device types whose memory the CUDA backend addresses.
pub(crate) fn is_cuda(device_type: i32) -> bool {
    device_type == DL_CUDA || device_type == DL_CUDA_MANAGED
}

/// A tensor's memory borrowed through DLPack. Its owner (the capsule, or the managed tensor
/// the C exchange API handed over) stays alive as long as this value, and with it the
/// producer's memory; a capsule is never renamed, so the producer's own capsule destructor
/// releases the tensor when we drop it, and a managed tensor goes back through its deleter.
pub(crate) struct Borrowed<'py> {
    _owner: Owner<'py>,
    /// The producer's C exchange API, when the tensor came through it (its current stream).
    exchange: Option<Exchange>,
    data: *const u8,
    /// `(DLPack device type, ordinal)` as the capsule states it.
    pub device: (i32, i32),
    pub elem: Elem,
    pub shape: Vec<usize>,
}

impl Borrowed<'_> {
    /// Elements in the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as a slice of `T`; the caller has checked that `T` is `self.elem`.
    ///
    /// # Safety
    /// `T` must have the size and alignment of `self.elem` (checked at import) and be valid for
    /// every bit pattern (f32, f16, bf16, u16, i32, i64 are).
    pub unsafe fn slice<T>(&self) -> &[T] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: import checked that the data pointer is non-null, aligned for the element
        // size, and that the tensor is compact row-major, so `len` elements follow it; the
        // capsule we hold keeps the memory alive for the lifetime of `self`.
        unsafe { std::slice::from_raw_parts(self.data.cast::<T>(), self.len()) }
    }
}

/// Where a borrowed tensor must live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memory {
    /// Host memory (CPU, or CUDA pinned host memory): read through a slice.
    Host,
    /// CUDA device memory: only its address is used, by the CUDA backend.
    Cuda,
}

impl<'py> Borrowed<'py> {
    /// A new compact tensor of `elem` and `shape` on this tensor's device, allocated by its
    /// producer through the C exchange API (torch: as `torch.empty` on the current stream);
    /// `None` when the tensor did not come through one or the producer offers no allocator.
    pub fn allocate_like(
        &self,
        py: Python<'py>,
        elem: Elem,
        shape: &[usize],
        name: &'static str,
    ) -> Result<Option<Bound<'py, PyAny>>, ArgError> {
        match self.exchange {
            Some(api) => api.allocate(py, self.device, elem, shape, name),
            None => Ok(None),
        }
    }

    /// The device address of element 0 (a CUDA tensor's `data_ptr()`).
    pub fn address(&self) -> u64 {
        self.data as usize as u64
    }

    /// The producer's current stream on this tensor's device (torch's
    /// `torch.cuda.current_stream(device)`), asked through its C exchange API; `None` when the
    /// tensor did not come through one.
    pub fn current_stream(
        &self,
        py: Python<'_>,
        name: &'static str,
    ) -> Result<Option<u64>, ArgError> {
        let Some(api) = self.exchange else {
            return Ok(None);
        };
        api.current_stream(py, self.device, name).map(Some)
    }
}

/// What keeps a borrowed tensor's memory alive: the capsule `__dlpack__` returned, or the
/// managed tensor the C exchange API handed over (released through its deleter on drop).
enum Owner<'py> {
    Capsule(#[allow(dead_code)] Bound<'py, PyCapsule>),
    Managed(#[allow(dead_code)] Managed),
}

/// A `DLManagedTensorVersioned` we own: the producer's deleter runs once, on drop (with the GIL
/// held, as every `Borrowed` lives in a GIL-holding scope).
struct Managed(NonNull<DLManagedTensorVersioned>);

impl Drop for Managed {
    fn drop(&mut self) {
        // SAFETY: the producer handed us ownership of a live managed tensor; its deleter frees it
        // and is called exactly once, here.
        unsafe {
            if let Some(deleter) = (*self.0.as_ptr()).deleter {
                deleter(self.0.as_ptr());
            }
        }
    }
}

/// q, k or v, exported once: through the C exchange API when the producer has one (the device
/// then comes with the export), otherwise the object and its `__dlpack_device__`, borrowed
/// with `__dlpack__` once the call knows where it runs.
pub(crate) struct Source<'py> {
    obj: Bound<'py, PyAny>,
    pub name: &'static str,
    /// `(DLPack device type, ordinal)`.
    pub device: (i32, i32),
    fast: Option<(Managed, Exchange)>,
}

impl<'py> Source<'py> {
    pub fn new(obj: &Bound<'py, PyAny>, name: &'static str) -> Result<Self, ArgError> {
        let (device, fast) = match export_fast(obj) {
            Some((m, api)) => {
                // SAFETY: a live managed tensor we own.
                let d = unsafe { (*m.0.as_ptr()).dl_tensor.device };
                ((d.device_type, d.device_id), Some((m, api)))
            }
            None => (device_of(obj, name)?, None),
        };
        Ok(Self {
            obj: obj.clone(),
            name,
            device,
            fast,
        })
    }

    /// The tensor's memory, which must be in `memory`.
    pub fn borrow(self, memory: Memory) -> Result<Borrowed<'py>, ArgError> {
        match self.fast {
            Some((m, api)) => from_managed(m, Some(api), self.name, memory),
            None => borrow_python(&self.obj, self.name, memory),
        }
    }
}

/// The layout we read is DLPack 1.x's; a later major version may change it.
fn major_version_1(m: &DLManagedTensorVersioned, name: &'static str) -> Result<(), ArgError> {
    if m.version.major == 1 {
        return Ok(());
    }
    Err(ArgError::value(
        name,
        format!(
            "{name}: DLPack version {}.{} is not supported (expected 1.x)",
            m.version.major, m.version.minor
        ),
    ))
}

/// Borrows a versioned managed tensor the producer handed over.
fn from_managed<'py>(
    m: Managed,
    exchange: Option<Exchange>,
    name: &'static str,
    memory: Memory,
) -> Result<Borrowed<'py>, ArgError> {
    // SAFETY: a live managed tensor we own until `m` drops (it moves into the result).
    let mt = unsafe { &*m.0.as_ptr() };
    major_version_1(mt, name)?;
    // SAFETY: the producer's DLTensor, alive while `m` is.
    let (data, elem, shape) = unsafe { read_tensor(&mt.dl_tensor, name, memory)? };
    let device = (
        mt.dl_tensor.device.device_type,
        mt.dl_tensor.device.device_id,
    );
    Ok(Borrowed {
        _owner: Owner::Managed(m),
        exchange,
        data,
        device,
        elem,
        shape,
    })
}

/// Asks `obj` for a DLPack capsule (versioned first, so NumPy ≥ 2 can export read-only
/// arrays; older producers do not take `max_version`) and borrows its memory on the host.
pub(crate) fn borrow_host<'py>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
) -> Result<Borrowed<'py>, ArgError> {
    borrow(obj, name, Memory::Host)
}

/// [`borrow_host`] for tensors in `memory`: through the producer's C exchange API when it has
/// one, else `__dlpack__`.
pub(crate) fn borrow<'py>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
    memory: Memory,
) -> Result<Borrowed<'py>, ArgError> {
    match export_fast(obj) {
        Some((m, api)) => from_managed(m, Some(api), name, memory),
        None => borrow_python(obj, name, memory),
    }
}

/// `obj.__dlpack__()`, versioned when the producer takes `max_version`. CUDA tensors are
/// exported with `stream=-1`: the CUDA path runs on the caller's current stream, the one the
/// producer's writes are ordered on, so there is nothing for the producer to synchronise.
fn borrow_python<'py>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
    memory: Memory,
) -> Result<Borrowed<'py>, ArgError> {
    let py = obj.py();
    let kwargs = PyDict::new(py);
    let set = |k: &str, v: Bound<'_, PyAny>| {
        kwargs
            .set_item(k, v)
            .map_err(|e| ArgError::runtime(name, e.to_string()))
    };
    set(
        "max_version",
        (1, 0)
            .into_pyobject(py)
            .map_err(|e| ArgError::runtime(name, e.to_string()))?
            .into_any(),
    )?;
    if memory == Memory::Cuda {
        // DLPack's "no synchronisation" stream: we run on the stream the producer's writes
        // are ordered on (without it torch would make its default stream wait for the current
        // one, tying a side stream to the default stream).
        set(
            "stream",
            (-1i64)
                .into_pyobject(py)
                .map_err(|e| ArgError::runtime(name, e.to_string()))?
                .into_any(),
        )?;
    }
    let method = pyo3::intern!(py, "__dlpack__");
    let capsule = match obj.call_method(method, (), Some(&kwargs)) {
        Ok(c) => c,
        Err(e) if e.is_instance_of::<PyTypeError>(py) => {
            // An older producer: no max_version (and perhaps no stream) keyword.
            let _ = kwargs.del_item("max_version");
            match obj.call_method(method, (), Some(&kwargs)) {
                Ok(c) => c,
                Err(e) if e.is_instance_of::<PyTypeError>(py) => obj
                    .call_method0(method)
                    .map_err(|e| export_error(py, name, e))?,
                Err(e) => return Err(export_error(py, name, e)),
            }
        }
        Err(e) => return Err(export_error(py, name, e)),
    };
    let capsule = capsule.cast_into::<PyCapsule>().map_err(|_| {
        ArgError::value(
            name,
            format!("{name}.__dlpack__() did not return a capsule"),
        )
    })?;
    let versioned = capsule.is_valid_checked(Some(VERSIONED));
    let (tensor, read_only) = if versioned {
        let p = capsule
            .pointer_checked(Some(VERSIONED))
            .map_err(|e| ArgError::value(name, format!("{name}: bad DLPack capsule ({e})")))?;
        // SAFETY: a valid "dltensor_versioned" capsule points to a DLManagedTensorVersioned
        // that lives until the capsule is destroyed; we hold the capsule.
        let m = unsafe { &*p.as_ptr().cast::<DLManagedTensorVersioned>() };
        major_version_1(m, name)?;
        (&m.dl_tensor, m.flags & FLAG_READ_ONLY != 0)
    } else {
        let p = capsule.pointer_checked(Some(LEGACY)).map_err(|_| {
            ArgError::value(
                name,
                format!("{name}.__dlpack__() returned a capsule that is neither dltensor nor dltensor_versioned"),
            )
        })?;
        // SAFETY: a valid "dltensor" capsule points to a DLManagedTensor that lives until the
        // capsule is destroyed; we hold the capsule.
        let m = unsafe { &*p.as_ptr().cast::<DLManagedTensor>() };
        (&m.dl_tensor, false)
    };
    let _ = read_only; // we only read
                       // SAFETY: `tensor` is the producer's DLTensor, alive while the capsule is.
    let (data, elem, shape) = unsafe { read_tensor(tensor, name, memory)? };
    Ok(Borrowed {
        _owner: Owner::Capsule(capsule),
        exchange: None,
        data,
        device: (tensor.device.device_type, tensor.device.device_id),
        elem,
        shape,
    })
}

fn export_error(py: Python<'_>, name: &'static str, e: PyErr) -> ArgError {
    let why = e.to_string();
    if e.is_instance_of::<PyBufferError>(py) && why.contains("readonly") {
        ArgError::value(
            name,
            format!("{name} is read-only and this NumPy cannot export read-only arrays (NumPy >= 2 can); pass {name}.copy() ({why})"),
        )
    } else {
        ArgError::value(name, format!("{name} cannot be exported by DLPack: {why}"))
    }
}

/// Checks a DLTensor (device, dtype, compact row-major layout, alignment) and returns its
/// data pointer, element type and shape.
///
/// # Safety
/// `t` must be a DLTensor whose `shape` (and `strides`, if non-null) point to `ndim` values.
unsafe fn read_tensor(
    t: &DLTensor,
    name: &'static str,
    memory: Memory,
) -> Result<(*const u8, Elem, Vec<usize>), ArgError> {
    let dev = t.device.device_type;
    let fits = match memory {
        Memory::Host => dev == DL_CPU || dev == DL_CUDA_HOST,
        // Managed memory is addressable by the device as well.
        Memory::Cuda => is_cuda(dev),
    };
    if !fits {
        let wants = match memory {
            Memory::Host => "host (CPU) memory",
            Memory::Cuda => "CUDA device memory, like q",
        };
        return Err(ArgError::value(
            name,
            format!("{name} is on DLPack device type {dev}; this call takes {wants} here"),
        ));
    }
    let ndim = usize::try_from(t.ndim)
        .map_err(|_| ArgError::value(name, format!("{name} has ndim {}", t.ndim)))?;
    let dims: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: the producer promises `ndim` shape entries.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let mut shape = Vec::with_capacity(ndim);
    for &d in dims {
        shape.push(usize::try_from(d).map_err(|_| {
            ArgError::value(name, format!("{name} has a negative dimension ({d})"))
        })?);
    }
    let elem = Elem::from_dl(t.dtype);
    if !t.strides.is_null() && ndim > 0 {
        // SAFETY: non-null strides have `ndim` entries.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut want: i64 = 1;
        for (i, (&d, &s)) in shape.iter().zip(strides).enumerate().rev() {
            // Size-1 dimensions may carry any stride; they never move the pointer.
            if d != 1 && s != want {
                return Err(ArgError::value(
                    name,
                    format!(
                        "{name} is not contiguous (shape {shape:?}, strides {strides:?} in elements; \
                         dimension {i} should have stride {want}): pass {name}.contiguous() \
                         (torch) or np.ascontiguousarray({name})"
                    ),
                ));
            }
            want = want.saturating_mul(d as i64);
        }
    }
    let numel: usize = shape.iter().product();
    let data = (t.data as *const u8).wrapping_add(t.byte_offset as usize);
    if numel > 0 {
        if t.data.is_null() {
            return Err(ArgError::value(
                name,
                format!("{name} has a null data pointer"),
            ));
        }
        let align = elem.size().max(1);
        if !(data as usize).is_multiple_of(align) {
            return Err(ArgError::value(
                name,
                format!("{name}'s data is not aligned to its {align}-byte elements; pass a copy"),
            ));
        }
    }
    Ok((data, elem, shape))
}

/// `__dlpack__` of [`HostBuffer`]: a capsule whose manager keeps a reference to the buffer, so
/// the consumer's tensor owns our memory without a copy. Versioned when the consumer asks for
/// DLPack ≥ 1.0, legacy otherwise (older torch and NumPy).
pub(crate) fn export(
    buf: &Bound<'_, HostBuffer>,
    max_version: Option<(u32, u32)>,
) -> PyResult<Py<PyCapsule>> {
    let py = buf.py();
    let b = buf.get();
    let dtype = match b.dtype() {
        flexprefill_core::DType::F32 => DLDataType {
            code: DL_FLOAT,
            bits: 32,
            lanes: 1,
        },
        flexprefill_core::DType::F16 => DLDataType {
            code: DL_FLOAT,
            bits: 16,
            lanes: 1,
        },
        flexprefill_core::DType::BF16 => DLDataType {
            code: DL_BFLOAT,
            bits: 16,
            lanes: 1,
        },
    };
    let mut shape: Vec<i64> = b.shape().iter().map(|&d| d as i64).collect();
    let tensor = DLTensor {
        data: b.data_ptr() as *mut c_void,
        device: DLDevice {
            device_type: DL_CPU,
            device_id: 0,
        },
        ndim: shape.len() as i32,
        dtype,
        // The Vec's heap buffer does not move when the Vec moves into the ctx below.
        shape: shape.as_mut_ptr(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let ctx: *mut c_void = Box::into_raw(Box::new(ExportCtx {
        _owner: buf.clone().unbind(),
        _shape: shape,
    }))
    .cast();
    let versioned = matches!(max_version, Some((major, _)) if major >= 1);
    let (ptr, name, destructor): (*mut c_void, &'static CStr, ffi::PyCapsule_Destructor) =
        if versioned {
            let m = Box::new(DLManagedTensorVersioned {
                version: DLPackVersion { major: 1, minor: 0 },
                manager_ctx: ctx,
                deleter: Some(delete_versioned),
                flags: 0,
                dl_tensor: tensor,
            });
            (
                Box::into_raw(m).cast(),
                VERSIONED,
                capsule_destructor_versioned,
            )
        } else {
            let m = Box::new(DLManagedTensor {
                dl_tensor: tensor,
                manager_ctx: ctx,
                deleter: Some(delete_legacy),
            });
            (Box::into_raw(m).cast(), LEGACY, capsule_destructor_legacy)
        };
    let nn = NonNull::new(ptr).expect("Box::into_raw never returns null");
    // SAFETY: `ptr` is a live, boxed managed tensor named as DLPack requires; the destructor
    // frees it unless a consumer renamed the capsule (then the consumer calls the deleter).
    match unsafe { PyCapsule::new_with_pointer_and_destructor(py, nn, name, Some(destructor)) } {
        Ok(c) => Ok(c.unbind()),
        Err(e) => {
            // SAFETY: the capsule was not created, so nobody else owns `ptr`.
            unsafe {
                if versioned {
                    delete_versioned(ptr.cast());
                } else {
                    delete_legacy(ptr.cast());
                }
            }
            Err(e)
        }
    }
}

/// What an exported tensor keeps alive: our buffer, and the shape array DLPack points into.
struct ExportCtx {
    _owner: Py<HostBuffer>,
    _shape: Vec<i64>,
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    if let Some(m) = NonNull::new(m) {
        // SAFETY: `m` and its ctx were made by `export` with Box::into_raw and are freed once
        // (DLPack calls the deleter exactly once). Dropping the Py handle without the GIL is
        // deferred by PyO3's reference pool.
        unsafe {
            let m = Box::from_raw(m.as_ptr());
            drop(Box::from_raw(m.manager_ctx.cast::<ExportCtx>()));
        }
    }
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    if let Some(m) = NonNull::new(m) {
        // SAFETY: as in `delete_legacy`.
        unsafe {
            let m = Box::from_raw(m.as_ptr());
            drop(Box::from_raw(m.manager_ctx.cast::<ExportCtx>()));
        }
    }
}

unsafe extern "C" fn capsule_destructor_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: called by CPython with a capsule; a consumer that took the tensor renamed it.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, LEGACY.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, LEGACY.as_ptr());
            delete_legacy(p.cast());
        }
    }
}

unsafe extern "C" fn capsule_destructor_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: as in `capsule_destructor_legacy`.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, VERSIONED.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, VERSIONED.as_ptr());
            delete_versioned(p.cast());
        }
    }
}

/// `(major, minor)` out of a `max_version` argument, `None` when absent or malformed (then the
/// legacy capsule every consumer understands).
pub(crate) fn parse_max_version(v: Option<&Bound<'_, PyAny>>) -> Option<(u32, u32)> {
    let v = v?;
    if v.is_none() {
        return None;
    }
    let t = v.cast::<PyTuple>().ok()?;
    t.extract::<(u32, u32)>().ok()
}
