//! Quick CPU numbers: dense vs FlexPrefill vs sgemm, medians of a few runs, in about a minute
//! at 16k (less with `FLEXPREFILL_BENCH_QUICK=1`, 4k tokens).
//!
//! `cargo run --release -p flexprefill-benches --example cpu_quick`
//! Environment: `FLEXPREFILL_BENCH_SEQ=n` for another length, `FLEXPREFILL_BENCH_REPS=r`
//! (default 3), `FLEXPREFILL_BENCH_KIND=mixed|sink_local|stripes|topics|needle|random` (default mixed).

use flexprefill_benches::{
    dense_causal_flops, input, median_time, seq_len, workload, SgemmProblem, HEADS, HEAD_DIM,
    SGEMM_N,
};
use flexprefill_core::{Backend, FlexPrefillConfig};
use flexprefill_cpu::{oracle, CpuBackend};
use flexprefill_testkit::workload::WorkloadKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = seq_len();
    let reps: usize = std::env::var("FLEXPREFILL_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let kind = match std::env::var("FLEXPREFILL_BENCH_KIND").as_deref() {
        Err(_) | Ok("mixed") => WorkloadKind::Mixed,
        Ok("sink_local") => WorkloadKind::SinkLocal,
        Ok("stripes") => WorkloadKind::Stripes,
        Ok("topics") => WorkloadKind::Topics,
        Ok("needle") => WorkloadKind::Needle,
        Ok("random") => WorkloadKind::Random,
        Ok(other) => return Err(format!("unknown FLEXPREFILL_BENCH_KIND {other:?}").into()),
    };
    let cpu = CpuBackend::new();
    let threads = cpu.threads();
    println!("seq {n}, {HEADS} heads / 2 kv heads, d {HEAD_DIM}, f32, {threads} threads, {reps} reps, workload {kind:?}");

    let mut gemm = SgemmProblem::new(SGEMM_N, threads);
    let t = median_time(reps.max(3), || gemm.run());
    let sgemm_gflops = gemm.flops() / t.as_secs_f64() / 1e9;
    println!(
        "sgemm {SGEMM_N}³ × {threads} threads: {:.1} ms, {sgemm_gflops:.1} GFLOP/s aggregate",
        t.as_secs_f64() * 1e3
    );

    let w = workload(kind, n);
    let x = input(&w);
    let flops = dense_causal_flops(n, HEADS, HEAD_DIM);
    let t_dense = median_time(reps, || {
        cpu.dense_attention(&x).expect("dense runs");
    });
    let dense_gflops = flops / t_dense.as_secs_f64() / 1e9;
    println!(
        "dense: {:.1} ms, {dense_gflops:.1} GFLOP/s = {:.2} of sgemm",
        t_dense.as_secs_f64() * 1e3,
        dense_gflops / sgemm_gflops
    );

    let cfg = FlexPrefillConfig::default();
    let (index, report) = cpu.select_index(&x, &cfg)?;
    let t_flex = median_time(reps, || {
        cpu.flex_prefill(&x, &cfg).expect("flex runs");
    });
    let t_stats = median_time(reps, || {
        cpu.head_statistics(&x, &cfg).expect("stats run");
    });
    let t_sparse = median_time(reps, || {
        cpu.sparse_attention(&x, &index).expect("sparse runs");
    });
    println!(
        "flexprefill (gamma {}): {:.1} ms = {:.2}× faster than dense; density {:.3}; statistics {:.1} ms, sparse attention {:.1} ms",
        cfg.gamma,
        t_flex.as_secs_f64() * 1e3,
        t_dense.as_secs_f64() / t_flex.as_secs_f64(),
        report.density(),
        t_stats.as_secs_f64() * 1e3,
        t_sparse.as_secs_f64() * 1e3,
    );
    for h in &report.heads {
        println!(
            "  head {}: {} density {:.3} js {:.3}",
            h.head, h.pattern, h.density, h.js_distance
        );
    }
    if n <= 8192 || std::env::var("FLEXPREFILL_BENCH_MASS").is_ok() {
        let mass = oracle::captured_mass(&x, &index)?;
        let mean = mass.iter().sum::<f64>() / mass.len() as f64;
        let below = mass.iter().filter(|&&m| m < cfg.gamma as f64).count();
        println!(
            "captured mass: mean {mean:.4}, rows below gamma {below} of {}",
            mass.len()
        );
    }
    Ok(())
}
