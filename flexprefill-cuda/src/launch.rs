//! The one way this crate queues a kernel: [`Launch`] carries the function, the geometry (grid,
//! one-dimensional block, dynamic shared memory) and the arguments in kernel order, and its
//! only unsafe step is [`Launch::launch`], whose contract every call site states.

use cudarc::driver::{CudaFunction, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::error::Result;

/// A kernel launch being assembled: build it with [`Launch::new`] and [`Launch::arg`], queue it
/// with [`Launch::launch`].
#[must_use = "a launch does nothing until `launch` is called"]
pub(crate) struct Launch<'a> {
    args: LaunchArgs<'a>,
    cfg: LaunchConfig,
}

impl<'a> Launch<'a> {
    /// `func` on `stream` over `grid`, blocks of `threads` threads, `smem` bytes of dynamic
    /// shared memory (the function's limit must already allow it: the registry raises it).
    pub(crate) fn new(
        stream: &'a CudaStream,
        func: &'a CudaFunction,
        grid: (u32, u32, u32),
        threads: u32,
        smem: usize,
    ) -> Self {
        Self {
            args: stream.launch_builder(func),
            cfg: LaunchConfig {
                grid_dim: grid,
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            },
        }
    }

    /// Appends the next kernel argument: a scalar or `#[repr(C)]` struct by reference, or a
    /// device buffer (`&CudaSlice` read, `&mut CudaSlice` written: cudarc orders the stream's
    /// work on it).
    pub(crate) fn arg<A>(mut self, a: A) -> Self
    where
        LaunchArgs<'a>: PushKernelArg<A>,
    {
        self.args.arg(a);
        self
    }

    /// Queues the kernel.
    ///
    /// # Safety
    /// The arguments pushed must match the kernel's parameter list in number, order and type
    /// (device buffers for pointers, the same `#[repr(C)]` layout for structs), and every
    /// buffer must hold every element the kernel indexes for this geometry and these
    /// arguments.
    pub(crate) unsafe fn launch(mut self) -> Result<()> {
        if crate::workspace::planning() {
            // A workspace plan: buffers are fake addresses, nothing may run.
            return Ok(());
        }
        // SAFETY: the caller upholds the argument contract above; the builder keeps every
        // argument borrowed until the launch is queued.
        unsafe { self.args.launch(self.cfg) }?;
        Ok(())
    }
}
