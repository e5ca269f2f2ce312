//! The CUDA crate's error type.
//!
//! One enum for everything the device can get wrong: a missing driver or NVRTC, an unsupported
//! GPU, a kernel that does not compile (NVRTC's log and options kept, as cudarc's
//! `CompileError` keeps them), a driver call that fails, or an input this backend cannot run.
//! It converts into [`flexprefill_core::Error`] so the [`flexprefill_core::Backend`] methods
//! report through core's type: input errors stay core's own variants, device errors become
//! `Error::Backend { backend: "cuda", .. }`.

use cudarc::driver::DriverError;

/// Everything that can go wrong on the GPU side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda.so` cannot be loaded: no NVIDIA driver on this machine (CI, a laptop).
    #[error("no CUDA driver found (libcuda.so not loadable)")]
    NoDriver,
    /// `libnvrtc.so` cannot be loaded, so no kernel can be compiled.
    #[error(
        "no NVRTC library found (libnvrtc.so not loadable): install the CUDA toolkit or add its lib64 to LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// The driver loads but sees no device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal} ({count} found)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver sees.
        count: usize,
    },
    /// The kernels need `mma.sync` on bf16 and `cp.async` (compute capability 8.0 or newer).
    #[error("compute capability {major}.{minor} is not supported (need 8.0 or newer)")]
    UnsupportedArch {
        /// Major version.
        major: i32,
        /// Minor version.
        minor: i32,
    },
    /// A driver call failed (launch, copy, allocation, module load).
    #[error("cuda driver: {0}")]
    Driver(#[from] DriverError),
    /// NVRTC rejected a kernel; the log says why.
    #[error("nvrtc could not compile kernel family `{family}` ({key}) with options {options:?}: {status}\n{log}")]
    Compile {
        /// Kernel family (the `.cu` file).
        family: &'static str,
        /// The compile-time key, printed.
        key: String,
        /// Options passed to NVRTC.
        options: Vec<String>,
        /// NVRTC's status name.
        status: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A request this backend cannot run (dtype, head_dim, block_size outside what its kernels
    /// were built for), named with the op.
    #[error("cuda {op}: {message}")]
    Unsupported {
        /// The operation (`sparse_attention`, ...).
        op: &'static str,
        /// What is not supported, with the values.
        message: String,
    },
    /// A step whose GPU kernels are not written yet.
    #[error("cuda {0}: not yet implemented on the GPU")]
    NotYet(&'static str),
    /// A device buffer of the wrong length handed to the device-resident API.
    #[error("cuda {op}: buffer `{name}` has {got} elements, expected {want}")]
    BufferLen {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        name: &'static str,
        /// Its length.
        got: usize,
        /// The length needed.
        want: usize,
    },
    /// A call larger than the [`crate::Workspace`] it was given was planned for.
    #[error("cuda workspace: {what} ({got}) exceed the workspace's maximum ({max}); create a larger workspace")]
    ExceedsWorkspace {
        /// What ran over (sequences, query tokens, device bytes, ...).
        what: String,
        /// The call's amount.
        got: usize,
        /// The workspace's.
        max: usize,
    },
    /// An input error found by core's checks.
    #[error(transparent)]
    Core(#[from] flexprefill_core::Error),
}

impl From<CudaError> for flexprefill_core::Error {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Core(e) => e,
            other => flexprefill_core::Error::Backend {
                backend: "cuda",
                message: other.to_string(),
            },
        }
    }
}

/// Result alias of the CUDA crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;
