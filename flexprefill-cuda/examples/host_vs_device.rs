//! The host API (`Backend::flex_prefill`: host tensors in and out) against the device API
//! (`select::flex_prefill_device` on buffers already on the GPU) on the same input: what the
//! copies cost and what the GPU itself spends. Batch 1, 32 query heads, 8 kv heads, head_dim
//! 128, bf16, the testkit's `mixed` workload, default config.
//!
//! `cargo run --release -p flexprefill-cuda --example host_vs_device -- [16384,131072]`
//!
//! Per length it prints the median of `REPS` timed calls after one warm-up: the host API's
//! wall time with its upload, device stages (CUDA events) and download; the device API's whole
//! call between two CUDA events; and dense attention the same two ways.

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use flexprefill_core::{AttentionInput, AttentionShape, Backend, FlexPrefillConfig, Sequence};
use flexprefill_cuda::attention::{AttentionArgs, DeviceSeqs};
use flexprefill_cuda::select::flex_prefill_device;
use flexprefill_cuda::CudaBackend;
use flexprefill_testkit::workload::WorkloadKind;

#[allow(dead_code)] // the shared helpers serve several benches
mod common;
use common::{median, workload_bf16, Res, H, HKV};

const REPS: usize = 5;
const D: usize = 128;

fn ms(d: Option<std::time::Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
}

fn main() -> Res<()> {
    let lens: Vec<usize> = std::env::args()
        .nth(1)
        .map(|a| a.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16384, 131072]);
    let gpu = CudaBackend::new()?;
    let cfg = FlexPrefillConfig::default();
    let shape = AttentionShape::new(H, HKV, D)?;
    println!(
        "device {}; {REPS} reps after one warm-up, medians",
        gpu.device().info().name
    );
    for n in lens {
        let (q, k, v) = workload_bf16(WorkloadKind::Mixed, n, D);
        let x = AttentionInput::batched(&q, &k, &v, 1, n, n, shape)?;

        // Host API.
        gpu.flex_prefill(&x, &cfg)?;
        let mut wall = Vec::new();
        let mut reports = Vec::new();
        for _ in 0..REPS {
            let t = Instant::now();
            let (_, r) = gpu.flex_prefill(&x, &cfg)?;
            wall.push(t.elapsed().as_secs_f32() * 1e3);
            reports.push(r);
        }
        let r = &reports[reports.len() / 2];
        let t = r.timings;
        println!(
            "n {n}: host API {:.2} ms wall (upload {}, device {:.2} [stats {}, select {}, attention {}], download {}); density {:.3}{}",
            median(wall),
            ms(t.upload),
            t.compute().as_secs_f64() * 1e3,
            ms(t.pattern_search),
            ms(t.index_build),
            ms(t.attention),
            ms(t.download),
            r.density(),
            r.dense_fallback.as_deref().map(|s| format!(" (dense: {s})")).unwrap_or_default()
        );
        gpu.dense_attention_timed(&x)?;
        let mut dwall = Vec::new();
        let mut dt = Vec::new();
        for _ in 0..REPS {
            let t = Instant::now();
            let (_, tm) = gpu.dense_attention_timed(&x)?;
            dwall.push(t.elapsed().as_secs_f32() * 1e3);
            dt.push(tm.compute().as_secs_f32() * 1e3);
        }
        println!(
            "n {n}: host API dense {:.2} ms wall, {:.2} ms on the device",
            median(dwall),
            median(dt)
        );

        // Device API on the backend's stream, inputs already on the GPU.
        let stream = gpu.stream().clone();
        let (qd, kd, vd) = (
            stream.clone_htod(&q)?,
            stream.clone_htod(&k)?,
            stream.clone_htod(&v)?,
        );
        let mut out = stream.alloc_zeros::<flexprefill_core::bf16>(n * H * D)?;
        let seqs = DeviceSeqs::new(
            &stream,
            &[Sequence {
                q_start: 0,
                k_start: 0,
                q_len: n,
                kv_len: n,
            }],
        )?;
        let args = AttentionArgs::new(&qd, &kd, &vd, shape, &seqs);
        let mut dev = Vec::new();
        let mut dense = Vec::new();
        for rep in 0..=REPS {
            let a = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let run = flex_prefill_device(&gpu, &stream, &args, &cfg, &mut out, None)?;
            let b = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            gpu.attention_device(&stream, &args, None, None, &mut out, None)?;
            let c = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            if rep > 0 {
                dev.push(a.elapsed_ms(&b)?);
                dense.push(b.elapsed_ms(&c)?);
            }
            drop(run);
        }
        println!(
            "n {n}: device API {:.2} ms (dense {:.2} ms), events around the whole call",
            median(dev),
            median(dense)
        );
    }
    Ok(())
}
