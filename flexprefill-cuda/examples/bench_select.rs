//! Times FlexPrefill's device pattern search and index build, and the whole call, against this
//! crate's dense kernel (CUDA events, median of `REPS` after warm-up).
//!
//! Shape of issue 5: batch 1, 32 query heads, 8 kv heads, head_dim 128, bf16, causal; tau 0.1,
//! min_budget 1024; gamma 0.9 and 0.95; random data (Gaussian) and a structured testkit
//! workload (`mixed`). Run on a GPU machine:
//! `cargo run --release -p flexprefill-cuda --example bench_select -- [SIZES] [MODES] [GAMMAS]`,
//! e.g. `-- 32768,131072 original,faithful,sampled 0.9`: sizes (default 8192 to 131072),
//! selection modes (default `faithful`), gammas (default 0.9,0.95). `BENCH_DATA` names the
//! workloads, comma-separated: `random` (Gaussian) and the testkit kinds (`mixed`,
//! `sink_local`, `stripes`, `topics`, `needle`); default `random,mixed`. The worst head's estimated mass is the report's (the representative
//! rows' exact mass under the selection). Each input's mean-row oracle density at each gamma
//! (`flexprefill_cuda::oracle`, block 128) is printed once and stands beside every mode's
//! density in the table (`oracle` and `density/oracle`; `BENCH_ORACLE=0` skips it).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use flexprefill_core::{bf16, AttentionShape, FlexPrefillConfig, SelectionMode, Sequence};
use flexprefill_cuda::attention::{AttentionArgs, DeviceSeqs};
use flexprefill_cuda::internals::{estimation_scale, launch_stats, StatsLayout};
use flexprefill_cuda::select::{flex_prefill_device, launch_select};
use flexprefill_cuda::CudaBackend;
use flexprefill_testkit::workload::WorkloadKind;

mod common;
use common::{median, with_config, Res, H, HKV};

const REPS: usize = 10;
const D: usize = 128;

/// Gaussian-ish bf16 noise from a hash, filled on every core.
fn random_bf16(len: usize, seed: u64) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = seed ^ (t as u64).wrapping_mul(0x9E3779B97F4A7C15) ^ 0xD1B54A32D192ED03;
                for v in part.iter_mut() {
                    // sum of 4 uniforms ≈ normal (Irwin-Hall), scaled to unit variance
                    let mut acc = 0.0f32;
                    for _ in 0..4 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        acc += (x >> 40) as f32 / (1u64 << 24) as f32;
                    }
                    *v = bf16::from_f32((acc - 2.0) * 1.732);
                }
            });
        }
    });
    out
}

struct Data {
    name: String,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

/// `random` is Gaussian q/k/v drawn here (the tables' "random" since issue 5); any other name
/// is a testkit workload kind (`mixed`, `sink_local`, `stripes`, `topics`, `needle`).
fn data(n: usize, name: &str) -> Res<Data> {
    if name == "random" {
        return Ok(Data {
            name: name.into(),
            q: random_bf16(n * H * D, 1 + n as u64),
            k: random_bf16(n * HKV * D, 2 + n as u64),
            v: random_bf16(n * HKV * D, 3 + n as u64),
        });
    }
    let kind: WorkloadKind = name.parse()?;
    let (q, k, v) = common::workload_bf16(kind, n, D);
    Ok(Data {
        name: kind.name().into(),
        q,
        k,
        v,
    })
}

fn time_ms(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Res<()>) -> Res<f32> {
    let ctx = stream.context();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
    a.record(stream)?;
    f()?;
    b.record(stream)?;
    b.synchronize()?;
    Ok(a.elapsed_ms(&b)?)
}

/// Mean captured mass over every (row, head), and the lowest head mean: per row the share of
/// the full softmax mass the sparse call kept, `exp(lse_sparse - lse_dense)` (token-major LSEs).
fn captured_mass(dense: &[f32], sparse: &[f32]) -> (f64, f64) {
    let mut per_head = vec![0.0f64; H];
    for (i, (d, s)) in dense.iter().zip(sparse).enumerate() {
        per_head[i % H] += f64::from(s - d).exp();
    }
    let rows = (dense.len() / H) as f64;
    let means: Vec<f64> = per_head.iter().map(|m| m / rows).collect();
    let mean = means.iter().sum::<f64>() / H as f64;
    (mean, means.iter().copied().fold(f64::INFINITY, f64::min))
}

fn main() -> Res<()> {
    let sizes: Vec<usize> = std::env::args()
        .nth(1)
        .map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![8192, 32768, 65536, 131072]);
    let modes: Vec<SelectionMode> = match std::env::args().nth(2) {
        None => vec![SelectionMode::Faithful],
        Some(a) => a
            .split(',')
            .map(|m| match m.trim() {
                "faithful" => Ok(SelectionMode::Faithful),
                "original" => Ok(SelectionMode::Original),
                "sampled" => Ok(SelectionMode::Sampled),
                other => Err(format!(
                    "selection mode {other:?}: expected faithful, original or sampled"
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let gammas: Vec<f32> = std::env::args()
        .nth(3)
        .map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0.9, 0.95]);
    let be = CudaBackend::new()?;
    let dev = be.device().clone();
    let stream = dev.stream().clone();
    println!("device: {} ({} SMs)", dev.info().name, dev.info().sm_count);
    let shape = AttentionShape::new(H, HKV, D)?;
    println!("| seq | data | selection | gamma | stats ms | select ms | search+index ms | sparse attn ms | sparse path ms | dense ms | sparse path/dense | whole call ms | whole/dense | density | oracle | density/oracle | worst head est. mass | QA heads | mass mean | worst head mass |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        // BENCH_DATA: the workloads, comma-separated (default random,mixed).
        let kinds = std::env::var("BENCH_DATA").unwrap_or_else(|_| "random,mixed".into());
        for kind in kinds.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let t = std::time::Instant::now();
            let dt = data(n, kind)?;
            let gen_s = t.elapsed().as_secs_f32();
            let seqs = vec![Sequence {
                q_start: 0,
                k_start: 0,
                q_len: n,
                kv_len: n,
            }];
            let q: CudaSlice<bf16> = stream.clone_htod(&dt.q)?;
            let k: CudaSlice<bf16> = stream.clone_htod(&dt.k)?;
            let v: CudaSlice<bf16> = stream.clone_htod(&dt.v)?;
            let dseqs = DeviceSeqs::new(&stream, &seqs)?;
            let mut out: CudaSlice<bf16> = stream.alloc_zeros(n * H * D)?;
            let args = AttentionArgs::new(&q, &k, &v, shape, &dseqs);
            // dense baseline
            for _ in 0..2 {
                be.attention_device(&stream, &args, None, None, &mut out, None)?;
            }
            let mut dense = Vec::new();
            for _ in 0..REPS {
                dense.push(time_ms(&stream, || {
                    Ok(be.attention_device(&stream, &args, None, None, &mut out, None)?)
                })?);
            }
            let dense = median(dense);
            // Dense LSE per (token, head): the captured mass of a row is exp(lse_sparse - lse_dense).
            let mut lse: CudaSlice<f32> = stream.alloc_zeros(n * H)?;
            be.attention_device(&stream, &args, None, None, &mut out, Some(&mut lse))?;
            let lse_dense = stream.clone_dtoh(&lse)?;
            // The mean-row oracle of this input at every gamma (one kernel, cut per gamma);
            // BENCH_ORACLE=0 skips it (profiling).
            let mut oracle = Vec::with_capacity(gammas.len());
            if std::env::var("BENCH_ORACLE").map_or(true, |v| v.trim() != "0") {
                let t = std::time::Instant::now();
                let block_size = FlexPrefillConfig::default().block_size;
                let map = flexprefill_cuda::oracle::mean_row_block_mass(
                    &dev, &stream, &args, block_size,
                )?;
                let map_ms = t.elapsed().as_secs_f64() * 1e3;
                for &gamma in &gammas {
                    let o = flexprefill_cuda::oracle::overall(&map.oracle(f64::from(gamma))?);
                    eprintln!(
                        "oracle {n} {} gamma {gamma}: mean-row oracle density {o:.4} (block {block_size}; map {map_ms:.0} ms)",
                        dt.name
                    );
                    oracle.push((gamma, o));
                }
            }
            for (&mode, &gamma) in modes
                .iter()
                .flat_map(|m| gammas.iter().map(move |g| (m, g)))
            {
                let cfg = with_config(FlexPrefillConfig::default(), |c| {
                    c.selection = mode;
                    c.gamma = gamma;
                    c.tau = 0.1;
                    c.min_budget = 1024;
                });
                let mode_name = match mode {
                    SelectionMode::Original => "original",
                    SelectionMode::Sampled => "sampled",
                    _ => "faithful",
                };
                let layout = StatsLayout::for_mode(&seqs, shape, &cfg)?;
                let (scale, emulate) = estimation_scale(
                    shape,
                    1.0 / (D as f32).sqrt(),
                    flexprefill_core::DType::BF16,
                    &cfg,
                );
                let (mut ts, mut tsel, mut tatt, mut twhole) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                // Host time spent queueing the search (layout upload, allocations, launches):
                // when it exceeds the device time, the device waits on the host.
                let mut thost = Vec::new();
                let mut last = None;
                for rep in 0..REPS + 2 {
                    let ctx = stream.context();
                    let fl = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                    let e: Vec<_> = (0..4)
                        .map(|_| ctx.new_event(fl))
                        .collect::<Result<_, _>>()?;
                    e[0].record(&stream)?;
                    let host = std::time::Instant::now();
                    let mut st =
                        launch_stats(&dev, &stream, &q, &k, layout.clone(), scale, emulate)?;
                    e[1].record(&stream)?;
                    let sel = launch_select(&dev, &stream, Some(&q), &mut st, &cfg)?;
                    e[2].record(&stream)?;
                    let host_ms = host.elapsed().as_secs_f64() * 1e3;
                    be.attention_device(&stream, &args, Some(&sel.index), None, &mut out, None)?;
                    e[3].record(&stream)?;
                    e[3].synchronize()?;
                    if rep >= 2 {
                        ts.push(e[0].elapsed_ms(&e[1])?);
                        tsel.push(e[1].elapsed_ms(&e[2])?);
                        tatt.push(e[2].elapsed_ms(&e[3])?);
                        twhole.push(e[0].elapsed_ms(&e[3])?);
                        thost.push(host_ms as f32);
                    }
                    last = Some((sel, st));
                }
                // The whole call as a user runs it (cheap dense decision included).
                let mut whole = Vec::new();
                let mut reason = None;
                let mut worst_mass = f32::NAN;
                for rep in 0..REPS + 2 {
                    let mut r = None;
                    let t = time_ms(&stream, || {
                        r = Some(flex_prefill_device(
                            &be, &stream, &args, &cfg, &mut out, None,
                        )?);
                        Ok(())
                    })?;
                    if rep >= 2 {
                        whole.push(t);
                    }
                    if rep == REPS + 1 {
                        if let Some(run) = &r {
                            worst_mass = run
                                .report(&stream)?
                                .heads
                                .iter()
                                .map(|h| h.estimated_mass)
                                .fold(f32::INFINITY, f32::min);
                        }
                    }
                    reason = r.and_then(|r| r.dense_reason);
                }
                let whole_call = median(whole);
                if flexprefill_cuda::internals::profile::enabled() && gamma == gammas[0] {
                    let _ = flexprefill_cuda::internals::profile_take();
                    let mut st =
                        launch_stats(&dev, &stream, &q, &k, layout.clone(), scale, emulate)?;
                    let _sel = launch_select(&dev, &stream, Some(&q), &mut st, &cfg)?;
                    let prof = flexprefill_cuda::internals::profile_take();
                    let line: Vec<String> =
                        prof.iter().map(|(n, ms)| format!("{n} {ms:.3}")).collect();
                    eprintln!("profile {n} {}: {}", dt.name, line.join(", "));
                }
                // BENCH_NCU=1: one search (statistics + selection) between cuProfilerStart/Stop,
                // for `ncu --profile-from-start off` (per-kernel durations without the overlap).
                if std::env::var_os("BENCH_NCU").is_some() && gamma == gammas[0] {
                    stream.synchronize()?;
                    cudarc::driver::profiler_start()?;
                    let mut st =
                        launch_stats(&dev, &stream, &q, &k, layout.clone(), scale, emulate)?;
                    let _sel = launch_select(&dev, &stream, Some(&q), &mut st, &cfg)?;
                    stream.synchronize()?;
                    cudarc::driver::profiler_stop()?;
                }
                flex_prefill_device(&be, &stream, &args, &cfg, &mut out, Some(&mut lse))?;
                let (mass_mean, mass_worst) = captured_mass(&lse_dense, &stream.clone_dtoh(&lse)?);
                let (sel, _st) = last.expect("ran");
                let offs = stream.clone_dtoh(&sel.index.row_offsets)?;
                let pat = stream.clone_dtoh(&sel.pattern)?;
                stream.synchronize()?;
                let causal = seqs[0].total_causal_blocks(cfg.block_size) * H;
                let density = offs[sel.rows] as f64 / causal as f64;
                let od = oracle
                    .iter()
                    .find(|(g, _)| *g == gamma)
                    .map_or(f64::NAN, |&(_, o)| o);
                let qa = pat.iter().filter(|&&p| p == 1).count();
                let (a, b, c, w) = (median(ts), median(tsel), median(tatt), median(twhole));
                eprintln!(
                    "host {n} {} {mode_name} gamma {gamma}: queueing the search took {:.3} ms on the host",
                    dt.name,
                    median(thost)
                );
                println!(
                    "| {n} | {} | {mode_name} | {gamma} | {a:.3} | {b:.3} | {:.3} | {c:.3} | {w:.3} | {dense:.3} | {:.2} | {whole_call:.3}{} | {:.2} | {density:.3} | {od:.3} | {:.2} | {worst_mass:.4} | {qa}/{H} | {mass_mean:.4} | {mass_worst:.4} |",
                    dt.name,
                    a + b,
                    w / dense,
                    if reason.is_some() { " (dense)" } else { "" },
                    whole_call / dense,
                    density / od
                );
            }
            eprintln!("({} data at {n}: generated in {gen_s:.1} s)", dt.name);
        }
    }
    Ok(())
}
