//! The agreement harness on the CPU backend itself (the CUDA crate runs the same harness on
//! the GPU machine with `standard_cases`).

use flexprefill_core::DType;
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::agreement::{self, AgreementOptions};

#[test]
fn cpu_backend_agrees_with_the_oracle_on_the_quick_cases() {
    let opts = AgreementOptions {
        dtypes: vec![DType::F32, DType::BF16, DType::F16],
        ..Default::default()
    };
    let report =
        agreement::assert_backend_agrees(&CpuBackend::new(), &agreement::quick_cases(), &opts);
    assert_eq!(report.cases.len(), 3 * agreement::quick_cases().len());
    // the quick cases exercise real sparsity, not only dense fallbacks
    assert!(
        report
            .cases
            .iter()
            .any(|c| c.density.is_some_and(|d| d < 0.9)),
        "{report}"
    );
}

/// The full device list on the CPU (minutes of f64 oracle on 2 cores): run it when the list
/// changes, so that a device backend failing it is the device's fault.
#[test]
#[ignore = "slow: the full standard list, minutes of f64 oracle on 2 cores"]
fn cpu_backend_agrees_with_the_oracle_on_the_standard_cases() {
    let t = std::time::Instant::now();
    let report = agreement::assert_backend_agrees(
        &CpuBackend::new(),
        &agreement::standard_cases(),
        &AgreementOptions::default(),
    );
    println!("{report}\n{:?}", t.elapsed());
}
