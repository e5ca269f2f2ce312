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
