//! On a machine without the NVIDIA driver (CI) the constructor returns a typed error; it never
//! panics. Where the driver loads this test has nothing to check and says so (construction on
//! a GPU is what every GPU test does first).

use flexprefill_cuda::{CudaBackend, CudaError};

#[test]
fn constructor_returns_typed_error_without_driver() {
    // SAFETY: only asks whether libcuda.so can be opened.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!(
            "skipped: libcuda.so loads on this machine, so the no-driver path cannot be checked \
             here (the GPU tests construct the backend)"
        );
        return;
    }
    let Err(e) = CudaBackend::new() else {
        panic!("without libcuda.so the constructor must fail");
    };
    assert!(
        matches!(e, CudaError::NoDriver),
        "expected NoDriver, got {e}"
    );
    assert_eq!(
        e.to_string(),
        "no CUDA driver found (libcuda.so not loadable)"
    );
    // Through core's error type it stays one readable line.
    let core: flexprefill_core::Error = e.into();
    assert!(core.to_string().contains("libcuda.so"), "{core}");
}
