//! One GPU: its context, a default stream, what we read off it, and its kernel registry.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute_enum as Attr;
use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{CudaError, Result};
use crate::kcache::KernelCache;
use crate::registry::{CompiledModule, KernelFamily, KernelKey, KernelRegistry};

/// Facts about the device that kernels and launches depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Name as the driver reports it (`NVIDIA H200`).
    pub name: String,
    /// Compute capability (9, 0 on Hopper).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// Largest dynamic shared memory one block may opt into, bytes.
    pub max_smem_per_block: usize,
    /// L2 cache, bytes.
    pub l2_bytes: usize,
}

/// A GPU ready for our kernels. Cheap to share (`Arc`); everything in it is thread-safe.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    registry: KernelRegistry,
}

/// Checks that the driver library can be loaded. cudarc panics on the first driver call
/// without it, so every entry point calls this first.
pub fn driver_present() -> Result<()> {
    // SAFETY: only tries to open the shared library; touches no driver state.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoDriver)
    }
}

/// Whether environment variable `name` is set to `0`, `off` or `false`.
fn env_flag_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"))
}

impl CudaDevice {
    /// Opens device `ordinal`: checks driver and NVRTC, creates (retains) the primary context
    /// and a stream, reads the device's facts.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        Self::with_kernel_cache(ordinal, &KernelCache::FromEnv)
    }

    /// [`CudaDevice::new`] with an explicit persistent kernel cache setting (the default reads
    /// the environment, see [`KernelCache`]).
    pub fn with_kernel_cache(ordinal: usize, cache: &KernelCache) -> Result<Arc<Self>> {
        Self::open(ordinal, cache, !env_flag_off("FLEXPREFILL_EVENT_TRACKING"))
    }

    /// Opens device `ordinal`; `event_tracking: false` turns cudarc's per-buffer event
    /// tracking off in the new context before it has any stream or buffer (see
    /// [`crate::CudaBackend::stream_ordered`]).
    pub(crate) fn open(
        ordinal: usize,
        cache: &KernelCache,
        event_tracking: bool,
    ) -> Result<Arc<Self>> {
        driver_present()?;
        // SAFETY: only tries to open the shared library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc);
        }
        cudarc::driver::result::init()?;
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        if !event_tracking {
            // SAFETY: set before this context has any stream or buffer; the calls order their
            // buffers by stream order alone then (the selection's side chain runs on the call
            // stream, `Scratch::side`).
            unsafe { ctx.disable_event_tracking() };
        }
        let compute_capability = ctx.compute_capability()?;
        if compute_capability.0 < 8 {
            return Err(CudaError::UnsupportedArch {
                major: compute_capability.0,
                minor: compute_capability.1,
            });
        }
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability,
            sm_count: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            max_smem_per_block: ctx
                .attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize,
            l2_bytes: ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
        };
        let stream = ctx.new_stream()?;
        let registry = KernelRegistry::new(ctx.clone(), compute_capability, cache);
        Ok(Arc::new(Self {
            ctx,
            stream,
            info,
            registry,
        }))
    }

    /// The context (bound to the calling thread by cudarc where needed).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the host-API ([`flexprefill_core::Backend`]) methods run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Facts read off the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The kernel registry (compile at first use, cached per key).
    pub fn registry(&self) -> &KernelRegistry {
        &self.registry
    }

    /// Shorthand for `registry().function(..)`.
    pub fn function(
        &self,
        family: &KernelFamily,
        key: &KernelKey,
        name: &'static str,
        dynamic_smem: usize,
    ) -> Result<cudarc::driver::CudaFunction> {
        self.registry.function(family, key, name, dynamic_smem)
    }

    /// Shorthand for `registry().module(..)` (NVRTC's resource report is in its `log`).
    pub fn module(&self, family: &KernelFamily, key: &KernelKey) -> Result<Arc<CompiledModule>> {
        self.registry.module(family, key)
    }
}
