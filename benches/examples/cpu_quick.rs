//! Quick CPU numbers: dense vs FlexPrefill vs sgemm, medians of a few runs, in about a minute
//! at 16k (seconds with `FLEXPREFILL_BENCH_QUICK=1`, 4k tokens).
//!
//! `cargo run --release -p flexprefill-benches --example cpu_quick`
//!
//! Environment: `FLEXPREFILL_BENCH_SEQ=n` for another length; `FLEXPREFILL_BENCH_REPS=r`
//! (default 3); `FLEXPREFILL_BENCH_KIND=mixed|sink_local|stripes|topics|needle|random`
//! (default mixed); `FLEXPREFILL_BENCH_SKIP_DENSE=1` to time FlexPrefill alone;
//! `FLEXPREFILL_BENCH_MASS=1` to also measure the captured attention mass above 8k tokens;
//! `FLEXPREFILL_BENCH_TILES=chunk_keys,dense_block,stack_rows` to try other [`flexprefill_cpu::Tiles`];
//! `FLEXPREFILL_BENCH_INTERLEAVE=r` to finish with `r` interleaved rounds of sgemm, dense and
//! FlexPrefill on the sink_local and mixed workloads, reporting per-round ratios of wall and CPU
//! time (robust to other processes loading the machine, unlike separate medians).

use std::time::Duration;

use flexprefill_benches::{
    dense_causal_flops, input, median, median_time, seq_len, timed, workload, SgemmProblem, HEADS,
    HEAD_DIM, SGEMM_N,
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
    if let Some(rounds) = env("FLEXPREFILL_BENCH_INTERLEAVE").and_then(|s| s.parse().ok()) {
        interleaved(&cpu, n, rounds);
    }
    Ok(())
}

/// `rounds` rounds of sgemm (3 runs), dense, FlexPrefill on sink_local and on mixed, back to
/// back, so each round's ratios compare runs that saw the same machine load.
fn interleaved(cpu: &CpuBackend, n: usize, rounds: usize) {
    let cfg = FlexPrefillConfig::default();
    let (wa, wb) = (
        workload(WorkloadKind::SinkLocal, n),
        workload(WorkloadKind::Mixed, n),
    );
    let (xa, xb) = (input(&wa), input(&wb));
    let mut gemm = SgemmProblem::new(SGEMM_N, cpu.threads());
    let flops = dense_causal_flops(n, HEADS, HEAD_DIM);
    let (mut dense_vs_gemm, mut sa, mut sb) = (vec![], vec![], vec![]);
    let (mut dense_vs_gemm_cpu, mut sa_cpu, mut sb_cpu) = (vec![], vec![], vec![]);
    println!("interleaved rounds (wall ms / cpu ms): sgemm×3, dense, flex sink_local, flex mixed");
    for _ in 0..rounds {
        let g = timed(|| (0..3).for_each(|_| gemm.run()));
        let d = timed(|| {
            cpu.dense_attention(&xa).expect("dense runs");
        });
        let a = timed(|| {
            cpu.flex_prefill(&xa, &cfg).expect("flex runs");
        });
        let b = timed(|| {
            cpu.flex_prefill(&xb, &cfg).expect("flex runs");
        });
        let f = |t: std::time::Duration| t.as_secs_f64();
        let gw = 3.0 * gemm.flops() / f(g.0);
        let dw = flops / f(d.0);
        dense_vs_gemm.push(dw / gw);
        sa.push(f(d.0) / f(a.0));
        sb.push(f(d.0) / f(b.0));
        let cpu_ms = |t: Option<std::time::Duration>| t.map_or(f64::NAN, ms);
        if let (Some(gc), Some(dc), Some(ac), Some(bc)) = (g.1, d.1, a.1, b.1) {
            dense_vs_gemm_cpu.push((flops / f(dc)) / (3.0 * gemm.flops() / f(gc)));
            sa_cpu.push(f(dc) / f(ac));
            sb_cpu.push(f(dc) / f(bc));
        }
        println!(
            "  sgemm {:.0}/{:.0} ({:.1} GFLOP/s)  dense {:.0}/{:.0} ({:.1} GFLOP/s)  sink_local \
             {:.0}/{:.0}  mixed {:.0}/{:.0}",
            ms(g.0),
            cpu_ms(g.1),
            gw / 1e9,
            ms(d.0),
            cpu_ms(d.1),
            dw / 1e9,
            ms(a.0),
            cpu_ms(a.1),
            ms(b.0),
            cpu_ms(b.1)
        );
    }
    println!(
        "median per-round ratios, wall: dense/sgemm rate {:.2}, speedup sink_local {:.2}×, \
         mixed {:.2}×",
        median(&mut dense_vs_gemm),
        median(&mut sa),
        median(&mut sb)
    );
    println!(
        "median per-round ratios, cpu time: dense/sgemm rate {:.2}, speedup sink_local {:.2}×, \
         mixed {:.2}×",
        median(&mut dense_vs_gemm_cpu),
        median(&mut sa_cpu),
        median(&mut sb_cpu)
    );
}
