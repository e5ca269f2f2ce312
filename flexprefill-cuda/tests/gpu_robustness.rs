//! What the GPU backend does at its edges: sizes its kernels cannot address, inputs the device
//! memory cannot hold, two host threads on one backend, and repeated runs. Every test needs an
//! NVIDIA GPU (`--include-ignored` on the GPU machine) and skips, with a message, without a
//! driver.
//!
//! The size limits themselves are checked on the host by the crate's unit tests
//! (`select::plan::limit_tests`); here the device path shows that a refused call allocates and
//! launches nothing, and that an allocation the device cannot serve comes back as an error the
//! backend survives.

use cudarc::driver::{CudaSlice, CudaStream};
use flexprefill_core::{
    AttentionInput, AttentionOutput, AttentionShape, Backend, DType, FlexPrefillConfig, Sequence,
};
use flexprefill_cuda::attention::fill_normal;
use flexprefill_cuda::select::flex_prefill_device;
use flexprefill_cuda::{AttentionArgs, CudaBackend, CudaError, DeviceSeqs};
use flexprefill_testkit::owned::OwnedInput;
use flexprefill_testkit::workload::{generate, WorkloadKind, WorkloadSpec};
use half::bf16;
use std::sync::Arc;

/// The backend on device 0, or `None` (with a message) on a machine without a driver.
fn gpu() -> Option<CudaBackend> {
    if let Err(e) = flexprefill_cuda::device::driver_present() {
        println!("skipped: {e}");
        return None;
    }
    Some(CudaBackend::new().expect("a CUDA device (the driver is present)"))
}

fn workload(kind: WorkloadKind, len: usize, h: usize, hkv: usize, seed: u64) -> OwnedInput {
    let mut spec = WorkloadSpec::new(kind, len);
    (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.seed) = (h, hkv, 128, seed);
    generate(&spec).owned().to_dtype(DType::BF16)
}

fn bits(o: &AttentionOutput) -> (Vec<u32>, Option<Vec<u32>>) {
    let out = o.out.to_f32_vec().iter().map(|x| x.to_bits()).collect();
    let lse = o
        .lse
        .as_ref()
        .map(|l| l.iter().map(|x| x.to_bits()).collect());
    (out, lse)
}

/// Output bits, LSE bits and the per-head decisions (Debug keeps NaN and every digit) of the
/// host API's flex_prefill, and the bits of its dense attention.
type HostRun = (
    (Vec<u32>, Option<Vec<u32>>),
    String,
    (Vec<u32>, Option<Vec<u32>>),
);

fn host_run(b: &CudaBackend, x: &AttentionInput<'_>, cfg: &FlexPrefillConfig) -> HostRun {
    let (out, report) = b.flex_prefill(x, cfg).expect("flex_prefill");
    let dense = b.dense_attention(x).expect("dense_attention");
    (bits(&out), format!("{:?}", report.heads), bits(&dense))
}

/// Faithful selection with query-aware heads (tau 0.1) and a small budget floor, so that the
/// short inputs here select sparsely too.
fn faithful_qa() -> FlexPrefillConfig {
    let mut cfg = FlexPrefillConfig::default();
    let c = &mut cfg;
    c.tau = 0.1;
    c.min_budget = 256;
    cfg
}

fn device_bf16(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    stream.alloc_zeros::<bf16>(n).expect("device buffer")
}

fn download_bits(stream: &Arc<CudaStream>, x: &CudaSlice<bf16>) -> Vec<u16> {
    let v = stream.clone_dtoh(x).expect("download");
    v.iter().map(|a| a.to_bits()).collect()
}

/// q, k, v of one whole sequence on the device, N(0, 1) values drawn on the device.
struct DeviceInput {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    shape: AttentionShape,
    seqs: DeviceSeqs,
}

impl DeviceInput {
    fn new(b: &CudaBackend, len: usize, h: usize, hkv: usize, d: usize, seed: u64) -> Self {
        let stream = b.stream();
        let shape = AttentionShape::new(h, hkv, d).expect("shape");
        let (mut q, mut k, mut v) = (
            device_bf16(stream, len * h * d),
            device_bf16(stream, len * hkv * d),
            device_bf16(stream, len * hkv * d),
        );
        for (i, t) in [&mut q, &mut k, &mut v].into_iter().enumerate() {
            fill_normal(b.device(), stream, t, seed + i as u64, 1.0).expect("fill");
        }
        let seqs = DeviceSeqs::new(stream, &[Sequence::whole(len)]).expect("seqs");
        Self {
            q,
            k,
            v,
            shape,
            seqs,
        }
    }

    fn args(&self) -> AttentionArgs<'_, bf16> {
        AttentionArgs::new(&self.q, &self.k, &self.v, self.shape, &self.seqs)
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn offsets_past_u32_are_refused_before_any_allocation_or_launch() {
    let Some(b) = gpu() else { return };
    let stream = b.stream().clone();
    // 2^20 tokens in blocks of 16: 2^15 × 2^15 = 2^32 pooled-map entries for one head, one
    // past what the selection's 32-bit offsets address. The inputs themselves are small.
    let len = 1 << 20;
    let input = DeviceInput::new(&b, len, 1, 1, 64, 11);
    let mut out = device_bf16(&stream, len * 64);
    let args = input.args();
    let mut cfg = faithful_qa();
    cfg.block_size = 16;
    stream.synchronize().expect("sync");
    let (free_before, _) = cudarc::driver::result::mem_get_info().expect("mem_get_info");
    let r = flex_prefill_device(&b, &stream, &args, &cfg, &mut out, None);
    stream.synchronize().expect("sync");
    let (free_after, _) = cudarc::driver::result::mem_get_info().expect("mem_get_info");
    match r {
        Err(CudaError::Unsupported { op, message }) => {
            println!("refused ({op}): {message}");
            assert!(message.contains("32-bit"), "{message}");
        }
        Err(e) => panic!("expected CudaError::Unsupported, got {e}"),
        Ok(_) => panic!("2^32 pooled-map entries were accepted"),
    }
    assert_eq!(
        free_before, free_after,
        "the refused call allocated device memory"
    );
    assert!(
        download_bits(&stream, &out).iter().all(|&x| x == 0),
        "the refused call wrote the output (a kernel ran)"
    );
    // The backend still works after the refusal.
    let x = workload(WorkloadKind::Mixed, 1024, 2, 2, 5);
    b.flex_prefill(&x.input().expect("input"), &faithful_qa())
        .expect("a call after the refusal");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn an_input_the_device_cannot_hold_is_a_typed_error() {
    let Some(b) = gpu() else { return };
    let stream = b.stream().clone();
    // 2^17 tokens in blocks of 16, 8 heads, query-aware: the selection alone needs ~10 GB
    // (pooled map, its ranking and running masses). The inputs (~0.5 GB) go on first, then
    // a ballast takes all but 2 GB of what is free.
    let (len, h, d) = (1 << 17, 8, 64);
    let input = DeviceInput::new(&b, len, h, h, d, 21);
    let mut out = device_bf16(&stream, len * h * d);
    let args = input.args();
    let mut cfg = faithful_qa();
    cfg.block_size = 16;
    // A host input of the same size for the host API.
    let x = workload(WorkloadKind::Random, len, h, h, 3);
    let xi = x.input().expect("input");

    stream.synchronize().expect("sync");
    let (free, total) = cudarc::driver::result::mem_get_info().expect("mem_get_info");
    let keep = 2usize << 30;
    println!(
        "device memory: {} GiB free of {} GiB; ballast {} GiB",
        free >> 30,
        total >> 30,
        free.saturating_sub(keep) >> 30
    );
    let ballast = stream
        .alloc_zeros::<u8>(free.saturating_sub(keep))
        .expect("ballast");
    let r = flex_prefill_device(&b, &stream, &args, &cfg, &mut out, None);
    let r = r.and_then(|_| stream.synchronize().map_err(CudaError::from));
    match r {
        Err(CudaError::Driver(e)) => println!("device API: {e}"),
        Err(e) => panic!("expected an out-of-memory driver error, got {e}"),
        Ok(()) => panic!("~10 GB of selection buffers fit in 2 GB"),
    }
    match b.flex_prefill(&xi, &cfg) {
        Err(flexprefill_core::Error::Backend { backend, message }) => {
            println!("host API: {message}");
            assert_eq!(backend, "cuda");
            assert!(
                message.contains("OUT_OF_MEMORY") || message.contains("out of memory"),
                "{message}"
            );
        }
        Err(e) => panic!("expected a cuda backend error, got {e}"),
        Ok(_) => panic!("~10 GB of selection buffers fit in 2 GB"),
    }
    drop(ballast);
    stream.synchronize().expect("sync");
    // The backend survives: a smaller call runs to the end.
    let small = workload(WorkloadKind::Mixed, 2048, 2, 2, 9);
    b.flex_prefill(&small.input().expect("input"), &faithful_qa())
        .expect("a call after the out-of-memory errors");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn two_threads_on_one_backend_give_the_bits_of_one_by_one() {
    let Some(b) = gpu() else { return };
    let cfg = faithful_qa();
    let xa = workload(WorkloadKind::Mixed, 4096, 8, 2, 1);
    let xb = workload(WorkloadKind::Stripes, 3000, 8, 2, 2);
    let (ia, ib) = (xa.input().expect("a"), xb.input().expect("b"));
    let (want_a, want_b) = (host_run(&b, &ia, &cfg), host_run(&b, &ib, &cfg));
    for round in 0..3 {
        let (got_a, got_b) = std::thread::scope(|s| {
            let ta = s.spawn(|| host_run(&b, &ia, &cfg));
            let tb = s.spawn(|| host_run(&b, &ib, &cfg));
            (ta.join().expect("thread a"), tb.join().expect("thread b"))
        });
        assert!(
            got_a == want_a,
            "round {round}: input a differs from the serial run"
        );
        assert!(
            got_b == want_b,
            "round {round}: input b differs from the serial run"
        );
    }
    // And the two inputs are really different work (the comparison could not pass by
    // returning one answer for both).
    assert!(want_a.0 != want_b.0);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn repeated_runs_are_bitwise_identical() {
    let Some(b) = gpu() else { return };
    let stream = b.stream().clone();
    let cfg = faithful_qa();

    // The whole device-resident call, sparse path (kv_len ≥ MIN_SPARSE_KV_LEN), with LSE.
    let (len, h, hkv, d) = (32768, 8, 2, 128);
    let input = DeviceInput::new(&b, len, h, hkv, d, 31);
    let args = input.args();
    let device_run = || {
        let mut out = device_bf16(&stream, len * h * d);
        let mut lse = stream.alloc_zeros::<f32>(len * h).expect("lse");
        let run = flex_prefill_device(&b, &stream, &args, &cfg, &mut out, Some(&mut lse))
            .expect("flex_prefill_device");
        let lse: Vec<u32> = stream
            .clone_dtoh(&lse)
            .expect("download")
            .iter()
            .map(|x| x.to_bits())
            .collect();
        // The decisions and the index when the call ran sparse (it should at this length; a
        // dense decision still leaves output and LSE to compare).
        let selection = run.selection.map(|sel| {
            let dl32 = |x: &CudaSlice<u32>| stream.clone_dtoh(x).expect("download");
            let js: Vec<u32> = stream
                .clone_dtoh(&sel.js)
                .expect("download")
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let offsets = dl32(&sel.index.row_offsets);
            let used = *offsets.last().expect("offsets") as usize;
            let cols = dl32(&sel.index.col_indices)[..used].to_vec();
            let pattern: Vec<i32> = stream.clone_dtoh(&sel.pattern).expect("download");
            (pattern, js, offsets, cols)
        });
        (download_bits(&stream, &out), lse, selection)
    };
    let first = device_run();
    println!("device-resident call ran sparse: {}", first.2.is_some());
    for i in 1..3 {
        assert!(device_run() == first, "device run {i} differs from run 0");
    }

    // The host API.
    let x = workload(WorkloadKind::Mixed, 6000, 8, 2, 4).with_lse(true);
    let xi = x.input().expect("input");
    let first = host_run(&b, &xi, &cfg);
    assert!(first.0 .1.is_some(), "asked for the LSE");
    for i in 1..3 {
        assert!(
            host_run(&b, &xi, &cfg) == first,
            "host run {i} differs from run 0"
        );
    }
}
