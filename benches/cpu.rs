//! CPU speed bar (criterion): at 16k tokens, 8 heads over 2 kv heads, d 128, f32 —
//! FlexPrefill (gamma 0.9) on structured workloads vs the CPU dense path, and matrixmultiply's
//! sgemm rate on the same cores as the peer of the dense path.
//!
//! `cargo bench -p flexprefill-benches --bench cpu` (a few minutes on 2 cores);
//! `FLEXPREFILL_BENCH_QUICK=1` for 4k tokens (about a minute).
//!
//! Throughput is reported in elements/s where one element is one FLOP: `2·n³` per sgemm
//! problem, and dense-equivalent `2·n²·d` per head for dense and FlexPrefill alike (so the
//! FlexPrefill figure is "the dense rate it would take to be this fast").

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flexprefill_benches::{
    dense_causal_flops, input, seq_len, workload, SgemmProblem, HEADS, HEAD_DIM, SGEMM_N,
};
use flexprefill_core::{Backend, FlexPrefillConfig};
use flexprefill_cpu::CpuBackend;
use flexprefill_testkit::workload::WorkloadKind;

fn cpu(c: &mut Criterion) {
    let n = seq_len();
    let backend = CpuBackend::new();
    let threads = backend.threads();
    let mut group = c.benchmark_group(format!("cpu_{n}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let mut gemm = SgemmProblem::new(SGEMM_N, threads);
    group.throughput(Throughput::Elements(gemm.flops() as u64));
    group.bench_function(format!("sgemm_{SGEMM_N}_x{threads}"), |b| {
        b.iter(|| gemm.run())
    });

    let flops = dense_causal_flops(n, HEADS, HEAD_DIM) as u64;
    group.throughput(Throughput::Elements(flops));
    let cfg = FlexPrefillConfig::default();
    for (name, kind) in [
        ("sink_local", WorkloadKind::SinkLocal),
        ("mixed", WorkloadKind::Mixed),
    ] {
        let w = workload(kind, n);
        let x = input(&w);
        if kind == WorkloadKind::SinkLocal {
            // Dense does not depend on the data: once is enough.
            group.bench_function("dense", |b| {
                b.iter(|| backend.dense_attention(&x).expect("dense runs"))
            });
        }
        let (_, report) = backend.select_index(&x, &cfg).expect("selection runs");
        eprintln!("{name}: density {:.3}", report.density());
        group.bench_function(format!("flexprefill_gamma0.9_{name}"), |b| {
            b.iter(|| backend.flex_prefill(&x, &cfg).expect("flex runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, cpu);
criterion_main!(benches);
