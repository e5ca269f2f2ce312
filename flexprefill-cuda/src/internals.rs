//! The building blocks under [`CudaBackend`](crate::CudaBackend) and
//! [`select::flex_prefill_device`](crate::select::flex_prefill_device), for benches, compile
//! checks and tools: the statistics stage on its own ([`launch_stats`], [`StatsLayout`],
//! [`DeviceStats`]), per-kernel profiling ([`profile`]) and the kernel registry
//! ([`KernelKey`], [`compile_offline`]). The selection stage on given statistics is
//! [`select::launch_select`](crate::select::launch_select).
//!
//! Not a stable API: names, signatures and buffer layouts here change with the kernels.

pub use crate::registry::{
    arch_name, compile_offline, nvrtc_options, CompiledModule, KernelFamily, KernelKey,
    KernelRegistry,
};
pub use crate::stats::{
    estimation_scale, launch_pool_q, launch_stats, profile, profile_take, DeviceStats, StatsElem,
    StatsLayout,
};
