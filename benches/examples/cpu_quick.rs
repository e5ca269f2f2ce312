//! Quick CPU numbers: dense vs FlexPrefill vs sgemm, medians of a few runs, in about a minute
//! at 16k (seconds with `FLEXPREFILL_BENCH_QUICK=1`, 4k tokens).
//!
//! `cargo run --release -p flexprefill-benches --example cpu_quick`
//!
//! Environment: `FLEXPREFILL_BENCH_SEQ=n` for another length; `FLEXPREFILL_BENCH_REPS=r`
//! (default 3); `FLEXPREFILL_BENCH_KIND=mixed|sink_local|stripes|topics|needle|random`
//! (default mixed); `FLEXPREFILL_BENCH_SKIP_DENSE=1` to time FlexPrefill alone;
//! `FLEXPREFILL_BENCH_MASS=1` to also measure the captured attention mass above 8k tokens;
//! `FLEXPREFILL_BENCH_TILES=chunk_keys,dense_block,stack_rows` to try other [`flexprefill_cpu::Tiles`].

use std::time::Duration;

use flexprefill_benches::{
    dense_causal_flops, input, median_time, seq_len, workload, SgemmProblem, HEADS, HEAD_DIM,
    SGEMM_N,
};
use flexprefill_core::{Backend, FlexPrefillConfig};
use flexprefill_cpu::{oracle, CpuBackend};
use flexprefill_testkit::workload::WorkloadKind;

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = seq_len();
    let env = |k: &str| std::env::var(k).ok();
    let reps: usize = env("FLEXPREFILL_BENCH_REPS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let kind = match env("FLEXPREFILL_BENCH_KIND").as_deref() {
        None | Some("mixed") => WorkloadKind::Mixed,
        Some("sink_local") => WorkloadKind::SinkLocal,
        Some("stripes") => WorkloadKind::Stripes,
        Some("topics") => WorkloadKind::Topics,
        Some("needle") => WorkloadKind::Needle,
        Some("random") => WorkloadKind::Random,
        Some(other) => return Err(format!("unknown FLEXPREFILL_BENCH_KIND {other:?}").into()),
    };
    let skip_dense = env("FLEXPREFILL_BENCH_SKIP_DENSE").is_some_and(|v| v == "1");
    let mut cpu = CpuBackend::new();
    if let Some(t) = env("FLEXPREFILL_BENCH_TILES") {
        let parse = |v: Option<&str>| v.and_then(|v| v.trim().parse().ok());
        let mut it = t.split(',');
        let parsed = (parse(it.next()), parse(it.next()), parse(it.next()));
        let (Some(chunk_keys), Some(dense_block), Some(stack_rows)) = parsed else {
            return Err(format!(
                "FLEXPREFILL_BENCH_TILES={t:?}: expected chunk_keys,dense_block,stack_rows"
            )
            .into());
        };
        cpu = cpu.with_tiles(flexprefill_cpu::Tiles {
            chunk_keys,
            dense_block,
            stack_rows,
        })?;
    }
    let threads = cpu.threads();
    println!(
        "seq {n}, {HEADS} heads / 2 kv heads, d {HEAD_DIM}, f32, {threads} threads, \
         {reps} reps, workload {kind:?}, {:?}",
        cpu.tiles()
    );

    let mut gemm = SgemmProblem::new(SGEMM_N, threads);
    let t = median_time(reps.max(3), || gemm.run());
    let sgemm_gflops = gemm.flops() / t.as_secs_f64() / 1e9;
    println!(
        "sgemm {SGEMM_N}³ × {threads} threads: {:.1} ms, {sgemm_gflops:.1} GFLOP/s aggregate",
        ms(t)
    );

    let w = workload(kind, n);
    let x = input(&w);
    let flops = dense_causal_flops(n, HEADS, HEAD_DIM);
    let t_dense = (!skip_dense).then(|| {
        median_time(reps, || {
            cpu.dense_attention(&x).expect("dense runs");
        })
    });
    if let Some(t) = t_dense {
        let gflops = flops / t.as_secs_f64() / 1e9;
        println!(
            "dense: {:.1} ms, {gflops:.1} GFLOP/s = {:.2} of sgemm",
            ms(t),
            gflops / sgemm_gflops
        );
    }

    let cfg = FlexPrefillConfig::default();
    let (index, report) = cpu.select_index(&x, &cfg)?;
    let t_flex = median_time(reps, || {
        cpu.flex_prefill(&x, &cfg).expect("flex runs");
    });
    let t_stats = median_time(reps, || {
        cpu.head_statistics(&x, &cfg).expect("stats run");
    });
    let t_select = median_time(reps, || {
        cpu.select_index(&x, &cfg).expect("selection runs");
    });
    let t_sparse = median_time(reps, || {
        cpu.sparse_attention(&x, &index).expect("sparse runs");
    });
    let speedup = t_dense.map_or("n/a".into(), |d| {
        format!("{:.2}×", d.as_secs_f64() / t_flex.as_secs_f64())
    });
    println!(
        "flexprefill (gamma {}): {:.1} ms, {speedup} faster than dense; density {:.3}",
        cfg.gamma,
        ms(t_flex),
        report.density(),
    );
    println!(
        "  of which: statistics {:.1} ms, selection incl. statistics {:.1} ms, sparse attention \
         {:.1} ms",
        ms(t_stats),
        ms(t_select),
        ms(t_sparse)
    );
    for h in &report.heads {
        println!(
            "  head {}: {} density {:.3} js {:.3}",
            h.head, h.pattern, h.density, h.js_distance
        );
    }
    if n <= 8192 || env("FLEXPREFILL_BENCH_MASS").is_some() {
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
