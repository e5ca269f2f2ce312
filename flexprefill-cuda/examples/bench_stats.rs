//! Times the device statistics alone (`launch_stats`, the representative attention of
//! Algorithm 2 and the faithful mode's probe rows), CUDA events, median of `REPS` after warm-up,
//! then one profiled call (`FLEXPREFILL_PROFILE=1`: time of every kernel).
//!
//! Shape of issue 5: batch 1, 32 query heads, 8 kv heads, bf16, block 128; head_dim 128 (and
//! any other given as the second argument). Run on a GPU machine:
//! `cargo run --release -p flexprefill-cuda --example bench_stats -- 131072 128,96`.

use cudarc::driver::CudaSlice;
use flexprefill_core::{bf16, AttentionShape, DType, FlexPrefillConfig, SelectionMode, Sequence};
use flexprefill_cuda::internals::{estimation_scale, launch_stats, profile, StatsLayout};
use flexprefill_cuda::CudaBackend;

#[allow(dead_code)] // the shared helpers serve several benches
mod common;
use common::{median, with_config, Res, H, HKV};

const REPS: usize = 20;

/// Uniform bf16 noise in [-2, 2) from a xorshift (the cost does not depend on the data).
fn noise(len: usize, seed: u64) -> Vec<bf16> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
        })
        .collect()
}

fn list(arg: Option<String>, default: &[usize]) -> Vec<usize> {
    arg.map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let sizes = list(args.next(), &[131072]);
    let dims = list(args.next(), &[128]);
    let be = CudaBackend::new()?;
    let dev = be.device().clone();
    let stream = dev.stream().clone();
    println!("device: {} ({} SMs)", dev.info().name, dev.info().sm_count);
    for &d in &dims {
        for &n in &sizes {
            let shape = AttentionShape::new(H, HKV, d)?;
            let seqs = vec![Sequence {
                q_start: 0,
                k_start: 0,
                q_len: n,
                kv_len: n,
            }];
            let q: CudaSlice<bf16> = stream.clone_htod(&noise(n * H * d, 1 + n as u64))?;
            let k: CudaSlice<bf16> = stream.clone_htod(&noise(n * HKV * d, 2 + n as u64))?;
            for faithful in [true, false] {
                let cfg = with_config(FlexPrefillConfig::default(), |c| {
                    c.selection = if faithful {
                        SelectionMode::Faithful
                    } else {
                        SelectionMode::Original
                    }
                });
                let layout = StatsLayout::new(&seqs, shape, cfg.block_size)?.with_probes(faithful);
                let (scale, emulate) =
                    estimation_scale(shape, 1.0 / (d as f32).sqrt(), DType::BF16, &cfg);
                let ctx = stream.context();
                let fl = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let mut ts = Vec::new();
                for rep in 0..REPS + 2 {
                    let (a, b) = (ctx.new_event(fl)?, ctx.new_event(fl)?);
                    a.record(&stream)?;
                    let st = launch_stats(&dev, &stream, &q, &k, layout.clone(), scale, emulate)?;
                    b.record(&stream)?;
                    b.synchronize()?;
                    drop(st);
                    if rep >= 2 {
                        ts.push(a.elapsed_ms(&b)?);
                    }
                }
                let _ = profile::take();
                let line = if profile::enabled() {
                    let _st = launch_stats(&dev, &stream, &q, &k, layout.clone(), scale, emulate)?;
                    let prof = profile::take();
                    let l: Vec<String> =
                        prof.iter().map(|(n, ms)| format!("{n} {ms:.3}")).collect();
                    l.join(", ")
                } else {
                    String::new()
                };
                println!(
                    "stats n {n} d {d} {}: {:.3} ms (median of {REPS}) | {line}",
                    if faithful {
                        "faithful (probes)"
                    } else {
                        "original (no probes)"
                    },
                    median(ts)
                );
            }
        }
    }
    Ok(())
}
