//! Device memory for calls made without a [`crate::Workspace`]: one stream-ordered memory pool
//! per device that keeps its memory between calls.
//!
//! cudarc allocates from the device's default pool, whose release threshold is 0: every
//! synchronisation hands the unused memory back to the driver, so the next call maps its work
//! buffers again. On an H200 at 32k that was 40% of the host time of a queued call (968 µs
//! against 585 µs with the memory kept, `docs/PERFORMANCE.md`). A pool of our own keeps what
//! it reserved (as torch's caching allocator does) without changing the default pool that
//! other code in the process may use; [`release_cached_memory`] hands it back on demand, and
//! `FLEXPREFILL_POOL_KEEP_BYTES` caps what a synchronisation leaves reserved (0: the driver's
//! default behaviour).

use std::sync::{Arc, Mutex};

use cudarc::driver::result::mem_pool;
use cudarc::driver::{sys, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::error::Result;

/// A pool handle; the driver's pools may be used from any thread.
struct Pool(sys::CUmemoryPool);
// SAFETY: a CUmemoryPool is a driver handle with no thread affinity.
unsafe impl Send for Pool {}

/// One pool per device ordinal, created on first use and kept for the process.
static POOLS: Mutex<Vec<(usize, Pool)>> = Mutex::new(Vec::new());

/// Bytes a pool keeps reserved across synchronisations (`FLEXPREFILL_POOL_KEEP_BYTES`, default
/// all of them).
fn keep_bytes() -> u64 {
    crate::attention::env_parse("FLEXPREFILL_POOL_KEEP_BYTES").unwrap_or(u64::MAX)
}

/// The pool of `stream`'s device, or `None` where the device has no stream-ordered allocator
/// (cudarc then allocates synchronously, which keeps nothing to cache).
fn pool_of(stream: &Arc<CudaStream>) -> Result<Option<sys::CUmemoryPool>> {
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    let ordinal = ctx.ordinal();
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(o, _)| *o == ordinal) {
        return Ok(Some(p.0));
    }
    // SAFETY: zero is a valid bit pattern for the props struct (plain integers, a null
    // pointer and reserved bytes); the fields that matter are set below.
    let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
    props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = ordinal as i32;
    ctx.bind_to_thread()?;
    // SAFETY: `props` is a valid, fully initialised CUmemPoolProps.
    let pool = unsafe { mem_pool::create(&props) }?;
    let mut keep = keep_bytes();
    // SAFETY: a live pool; RELEASE_THRESHOLD takes a u64.
    unsafe {
        mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
    }?;
    pools.push((ordinal, Pool(pool)));
    Ok(Some(pool))
}

/// `n` elements (at least one) on `stream`'s device, from the caching pool, queued on `stream`;
/// freed stream-ordered when the slice drops.
///
/// # Safety
/// The contents are unspecified: every element must be written before it is read.
pub(crate) unsafe fn alloc<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    let n = n.max(1);
    let Some(pool) = pool_of(stream)? else {
        // SAFETY: the caller's contract.
        return Ok(unsafe { stream.alloc::<T>(n) }?);
    };
    stream.context().bind_to_thread()?;
    // SAFETY: a live pool and stream of the current context; the slice below owns the
    // allocation and frees it with cuMemFreeAsync (cudarc does on a device with async alloc).
    unsafe {
        let ptr = mem_pool::alloc_async(pool, n * std::mem::size_of::<T>(), stream.cu_stream())?;
        Ok(stream.upgrade_device_ptr::<T>(ptr, n))
    }
}

/// [`alloc`], zeroed on `stream`.
pub(crate) fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: zeroed right below, on the same stream, before anything reads it.
    let mut buf = unsafe { alloc::<T>(stream, n) }?;
    stream.memset_zeros(&mut buf)?;
    Ok(buf)
}

/// `src` (at least one element) in a new [`alloc`] buffer, copied on `stream`.
pub(crate) fn clone_htod<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &[T],
) -> Result<CudaSlice<T>> {
    // SAFETY: the copy below writes the first `src.len()` elements before anything reads
    // them; callers pass non-empty tables.
    let mut buf = unsafe { alloc::<T>(stream, src.len()) }?;
    stream.memcpy_htod(src, &mut buf)?;
    Ok(buf)
}

/// Hands the memory the FlexPrefill pools hold but no call uses back to the driver (like
/// torch's `empty_cache`). Memory of calls still queued stays until they finish.
pub fn release_cached_memory() -> Result<()> {
    let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    for (_, p) in pools.iter() {
        // SAFETY: a live pool (pools are never destroyed).
        unsafe { mem_pool::trim_to(p.0, 0) }?;
    }
    Ok(())
}

/// Bytes the FlexPrefill pool of device `ordinal` holds reserved (0 before its first call).
pub fn reserved_bytes(ordinal: usize) -> Result<u64> {
    pool_attribute(
        ordinal,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
    )
}

/// Bytes of the FlexPrefill pool of device `ordinal` that live buffers use (0 before its
/// first call): what calls still hold, as against what the pool keeps for the next ones.
pub fn used_bytes(ordinal: usize) -> Result<u64> {
    pool_attribute(
        ordinal,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
    )
}

/// A u64 attribute of the pool of device `ordinal`, 0 when it has none yet.
fn pool_attribute(ordinal: usize, attr: sys::CUmemPool_attribute) -> Result<u64> {
    let pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_, p)) = pools.iter().find(|(o, _)| *o == ordinal) else {
        return Ok(0);
    };
    let mut v = 0u64;
    // SAFETY: a live pool; the memory attributes write a u64.
    unsafe { mem_pool::get_attribute(p.0, attr, (&mut v as *mut u64).cast()) }?;
    Ok(v)
}
