//! On a machine without the NVIDIA driver (CI) the constructor returns a typed error; it never
//! panics. On a GPU machine it must succeed instead.

use flexprefill_cuda::{CudaBackend, CudaError};

#[test]
fn constructor_returns_typed_error_without_driver() {
    // SAFETY: only asks whether libcuda.so can be opened.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    match CudaBackend::new() {
        Err(CudaError::NoDriver) => {
            assert!(!driver, "NoDriver although libcuda loads");
            let e = CudaBackend::new().unwrap_err();
            assert_eq!(
                e.to_string(),
                "no CUDA driver found (libcuda.so not loadable)"
            );
            // Through core's error type it stays one readable line.
            let core: flexprefill_core::Error = e.into();
            assert!(core.to_string().contains("libcuda.so"), "{core}");
        }
        Ok(b) => assert!(driver && b.device().info().compute_capability.0 >= 8),
        // A driver without a device, or without NVRTC, is also a typed error.
        Err(e) => assert!(
            driver
                && matches!(
                    e,
                    CudaError::NoDevice { .. } | CudaError::NoNvrtc | CudaError::Driver(_)
                ),
            "unexpected error {e}"
        ),
    }
}
