//! Host time of the raw-pointer entry called from a Rust program the way the Python package
//! calls it: the Rust side of `flexprefill-py/benches/overhead.py`, so that "Python call minus
//! Rust call" can also be read as two programs that each pay their own host effects.
//!
//! `cargo run --release -p flexprefill-cuda --example raw_host_time -- [SEQ] [ITERS]`
//!
//! Batch 1, 32 query heads over 8 kv heads, head_dim 128, bf16, standard normal q, k and v
//! (the bench's inputs are NumPy normals: another draw of the same distribution), the default
//! config, a backend made with `CudaBackend::stream_ordered` (as the Python package makes its
//! own). Each call is `raw::flex_prefill_raw` plus dropping the `DeviceRun` it returns, timed
//! on the host, started as overhead.py's `queued` (the second and third of bursts of three,
//! the GPU still busy) and `sync` (after `cuStreamSynchronize`, the GPU idle) rows.

use std::time::Instant;

use cudarc::driver::{CudaSlice, DevicePtr};
use flexprefill_core::{bf16, AttentionShape, DType, FlexPrefillConfig, Sequence};
use flexprefill_cuda::attention::fill_normal;
use flexprefill_cuda::{raw, CudaBackend};

#[allow(dead_code)] // the shared helpers serve several benches
mod common;
use common::{median, Res, H, HKV};

const D: usize = 128;

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32768);
    let iters: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let gpu = CudaBackend::stream_ordered(0)?;
    let s = gpu.stream().clone();
    let dev = gpu.device();
    let mut q: CudaSlice<bf16> = s.alloc_zeros(n * H * D)?;
    let mut k: CudaSlice<bf16> = s.alloc_zeros(n * HKV * D)?;
    let mut v: CudaSlice<bf16> = s.alloc_zeros(n * HKV * D)?;
    fill_normal(dev, &s, &mut q, 1, 1.0)?;
    fill_normal(dev, &s, &mut k, 2, 1.0)?;
    fill_normal(dev, &s, &mut v, 3, 1.0)?;
    let out: CudaSlice<bf16> = s.alloc_zeros(n * H * D)?;
    let ptr = |b: &CudaSlice<bf16>| b.device_ptr(&s).0;
    let (qp, kp, vp, op) = (ptr(&q), ptr(&k), ptr(&v), ptr(&out));
    let shape = AttentionShape::new(H, HKV, D)?;
    let seqs = [Sequence {
        q_start: 0,
        k_start: 0,
        q_len: n,
        kv_len: n,
    }];
    let cfg = FlexPrefillConfig::default();
    let stream = s.cu_stream() as usize as u64;
    // SAFETY: q, k, v and out are live allocations of the sizes the shape implies on the
    // backend's context, kept alive (and not otherwise used) until after the last
    // synchronisation below; the stream is the backend's own.
    let queue = || unsafe {
        raw::flex_prefill_raw(
            &gpu,
            stream,
            DType::BF16,
            qp,
            kp,
            vp,
            op,
            0,
            shape,
            &seqs,
            None,
            &cfg,
        )
    };
    let call = || -> Res<f64> {
        let t = Instant::now();
        drop(queue()?);
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..20 {
        s.synchronize()?;
        call()?;
    }
    let mut queued = Vec::new();
    while queued.len() < iters {
        s.synchronize()?;
        call()?;
        queued.push(call()? as f32 * 1e6);
        queued.push(call()? as f32 * 1e6);
    }
    let mut idle = Vec::new();
    for _ in 0..iters {
        s.synchronize()?;
        idle.push(call()? as f32 * 1e6);
    }
    s.synchronize()?;
    let run = queue()?;
    // SAFETY: the report is read on the call's own stream.
    let rep = unsafe { raw::report_raw(&gpu, stream, &run) }?;
    drop(run);
    s.synchronize()?;
    println!(
        "raw entry from Rust, seq {n}, 32/8 heads, d {D}, bf16 ({}, density {:.3}), {iters} calls per row",
        if rep.dense_fallback.is_some() { "dense" } else { "sparse" },
        rep.density()
    );
    println!("queued  rust call median {:10.1} us", median(queued));
    println!("sync    rust call median {:10.1} us", median(idle));
    Ok(())
}
