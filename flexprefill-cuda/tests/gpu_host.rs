//! The host API, the raw-pointer entry and the persistent kernel cache on the GPU (ignored
//! without one): the host API runs the device-resident call between one upload and one download (same
//! bits, same decisions, same dense-or-sparse rule), the raw entry gives the device API's bits,
//! and a kernel cache changes nothing but the warm-up.

use std::time::Instant;

use cudarc::driver::{CudaSlice, DevicePtr};
use flexprefill_core::{
    bf16, AttentionInput, AttentionOutput, AttentionShape, Backend, DType, FlexPrefillConfig,
    HostTensor, Pattern, Sequence, SparsityReport,
};
use flexprefill_cuda::attention::{AttentionArgs, DeviceSeqs};
use flexprefill_cuda::select::flex_prefill_device;
use flexprefill_cuda::{CudaBackend, KernelCache};
use flexprefill_testkit::workload::{generate, WorkloadKind, WorkloadSpec};

const SHAPE: (usize, usize, usize) = (8, 2, 128);

/// The backend, or `None` (with a message) where no driver is installed.
fn gpu_with(cache: &KernelCache) -> Option<CudaBackend> {
    match CudaBackend::with_kernel_cache(0, cache) {
        Ok(g) => Some(g),
        Err(flexprefill_cuda::CudaError::NoDriver) => {
            println!("no NVIDIA driver: skipped");
            None
        }
        Err(e) => panic!("a CUDA device is needed: {e}"),
    }
}

fn gpu() -> Option<CudaBackend> {
    gpu_with(&KernelCache::FromEnv)
}

fn data(n: usize) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>) {
    let (h, hkv, d) = SHAPE;
    generate(&WorkloadSpec {
        kind: WorkloadKind::Mixed,
        batch: 1,
        seq_len: n,
        num_heads: h,
        num_kv_heads: hkv,
        head_dim: d,
        seed: n as u64 + 3,
    })
    .to_bf16()
}

fn shape() -> AttentionShape {
    AttentionShape::new(SHAPE.0, SHAPE.1, SHAPE.2).expect("valid shape")
}

fn bits(t: &HostTensor) -> Vec<u16> {
    match t {
        HostTensor::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
        other => panic!("expected bf16 output, got {:?}", other.dtype()),
    }
}

fn decisions(r: &SparsityReport) -> Vec<(Pattern, usize)> {
    r.heads
        .iter()
        .map(|h| (h.pattern, h.selected_blocks))
        .collect()
}

fn seq(n: usize) -> Sequence {
    Sequence {
        q_start: 0,
        k_start: 0,
        q_len: n,
        kv_len: n,
    }
}

/// The device API on uploaded copies of `q, k, v`: output, LSE and report.
fn device_call(
    gpu: &CudaBackend,
    n: usize,
    (q, k, v): &(Vec<bf16>, Vec<bf16>, Vec<bf16>),
) -> (Vec<u16>, Vec<u32>, SparsityReport) {
    let (h, _, d) = SHAPE;
    let s = gpu.stream().clone();
    let (qd, kd, vd) = (
        s.clone_htod(q).unwrap(),
        s.clone_htod(k).unwrap(),
        s.clone_htod(v).unwrap(),
    );
    let mut out: CudaSlice<bf16> = s.alloc_zeros(n * h * d).unwrap();
    let mut lse: CudaSlice<f32> = s.alloc_zeros(n * h).unwrap();
    let seqs = DeviceSeqs::new(&s, &[seq(n)]).unwrap();
    let args = AttentionArgs::new(&qd, &kd, &vd, shape(), &seqs);
    let cfg = FlexPrefillConfig::default();
    let run = flex_prefill_device(gpu, &s, &args, &cfg, &mut out, Some(&mut lse)).unwrap();
    let report = run.report(&s).unwrap();
    let o: Vec<bf16> = s.clone_dtoh(&out).unwrap();
    let l: Vec<f32> = s.clone_dtoh(&lse).unwrap();
    s.synchronize().unwrap();
    (
        o.iter().map(|x| x.to_bits()).collect(),
        l.iter().map(|x| x.to_bits()).collect(),
        report,
    )
}

fn host_call(
    gpu: &CudaBackend,
    n: usize,
    qkv: &(Vec<bf16>, Vec<bf16>, Vec<bf16>),
) -> (AttentionOutput, SparsityReport) {
    let x = AttentionInput::batched(&qkv.0, &qkv.1, &qkv.2, 1, n, n, shape())
        .unwrap()
        .with_lse(true);
    gpu.flex_prefill(&x, &FlexPrefillConfig::default()).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn host_api_is_the_device_call_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let n = 16384;
    let qkv = data(n);
    let (out, rep) = host_call(&gpu, n, &qkv);
    let (o, l, drep) = device_call(&gpu, n, &qkv);
    assert_eq!(
        bits(&out.out),
        o,
        "output differs from the device-resident call"
    );
    let lse: Vec<u32> = out.lse.unwrap().iter().map(|x| x.to_bits()).collect();
    assert_eq!(lse, l, "lse differs from the device-resident call");
    assert_eq!(rep.dense_fallback, None, "16k must run sparse on the GPU");
    assert_eq!(decisions(&rep), decisions(&drep));
    assert!(rep.density() < 1.0, "density {}", rep.density());
    let t = rep.timings;
    assert!(t.device_clock);
    for (name, v) in [
        ("pattern_search", t.pattern_search),
        ("index_build", t.index_build),
        ("attention", t.attention),
        ("upload", t.upload),
        ("download", t.download),
    ] {
        assert!(v.is_some(), "{name} missing");
    }
    println!("16k host API timings: {t:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn short_input_runs_dense_and_the_report_says_why() {
    let Some(gpu) = gpu() else { return };
    let n = 4096;
    let qkv = data(n);
    let (out, rep) = host_call(&gpu, n, &qkv);
    let why = rep
        .dense_fallback
        .as_deref()
        .expect("4k runs dense on the GPU");
    assert!(why.contains("16384"), "{why}");
    assert!(rep.heads.iter().all(|h| h.pattern == Pattern::Dense));
    assert_eq!(rep.density(), 1.0);
    assert_eq!(rep.timings.pattern_search, None, "no pattern search ran");
    assert_eq!(rep.timings.index_build, None, "no index build ran");
    let x = AttentionInput::batched(&qkv.0, &qkv.1, &qkv.2, 1, n, n, shape())
        .unwrap()
        .with_lse(true);
    let dense = gpu.dense_attention(&x).unwrap();
    assert_eq!(
        bits(&out.out),
        bits(&dense.out),
        "the dense fallback is the dense kernel"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn f32_host_input_rounds_to_bf16_and_returns_f32() {
    let Some(gpu) = gpu() else { return };
    let n = 16384;
    let qkv = data(n);
    let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let (q, k, v) = (f(&qkv.0), f(&qkv.1), f(&qkv.2));
    let x = AttentionInput::batched(&q, &k, &v, 1, n, n, shape()).unwrap();
    let (out, _) = gpu.flex_prefill(&x, &FlexPrefillConfig::default()).unwrap();
    assert_eq!(out.out.dtype(), DType::F32);
    let (o, _, _) = device_call(&gpu, n, &qkv);
    let want: Vec<f32> = o.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    match out.out {
        HostTensor::F32(got) => assert_eq!(got, want, "exact bf16 inputs give the bf16 result"),
        _ => unreachable!(),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn raw_entry_is_the_device_api_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let n = 16384;
    let (h, _, d) = SHAPE;
    let qkv = data(n);
    let (want_o, want_l, want_rep) = device_call(&gpu, n, &qkv);
    let s = gpu.stream().clone();
    let (qd, kd, vd) = (
        s.clone_htod(&qkv.0).unwrap(),
        s.clone_htod(&qkv.1).unwrap(),
        s.clone_htod(&qkv.2).unwrap(),
    );
    let out: CudaSlice<bf16> = s.alloc_zeros(n * h * d).unwrap();
    let lse: CudaSlice<f32> = s.alloc_zeros(n * h).unwrap();
    let p = |b: &CudaSlice<bf16>| b.device_ptr(&s).0;
    let (qp, kp, vp, op) = (p(&qd), p(&kd), p(&vd), p(&out));
    let lp = lse.device_ptr(&s).0;
    // SAFETY: every pointer is a live allocation of the right size on the backend's context,
    // kept alive until after the synchronize below; the stream is the backend's own.
    let run = unsafe {
        flexprefill_cuda::raw::flex_prefill_raw(
            &gpu,
            s.cu_stream() as usize as u64,
            DType::BF16,
            qp,
            kp,
            vp,
            op,
            lp,
            shape(),
            &[seq(n)],
            None,
            &FlexPrefillConfig::default(),
        )
    }
    .unwrap();
    // SAFETY: the call's own stream.
    let rep =
        unsafe { flexprefill_cuda::raw::report_raw(&gpu, s.cu_stream() as usize as u64, &run) }
            .unwrap();
    let o: Vec<bf16> = s.clone_dtoh(&out).unwrap();
    let l: Vec<f32> = s.clone_dtoh(&lse).unwrap();
    s.synchronize().unwrap();
    assert_eq!(o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want_o);
    assert_eq!(l.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want_l);
    assert_eq!(decisions(&rep), decisions(&want_rep));
    // A null pointer is a typed error, not a crash.
    let e = unsafe {
        flexprefill_cuda::raw::flex_prefill_raw(
            &gpu,
            s.cu_stream() as usize as u64,
            DType::BF16,
            0,
            kp,
            vp,
            op,
            0,
            shape(),
            &[seq(n)],
            None,
            &FlexPrefillConfig::default(),
        )
    };
    assert!(e.is_err());
}

/// Calls without a workspace take their buffers from FlexPrefill's own pool, which keeps them
/// across a synchronisation (the device's default pool would hand them back, and the next call
/// would map them again) until `release_cached_memory`. Run with `--test-threads 1`: another
/// test's call would hold pool memory of its own.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn pool_keeps_work_buffers_across_synchronisations_until_released() {
    let Some(gpu) = gpu() else { return };
    let n = 16384;
    let qkv = data(n);
    let ordinal = gpu.stream().context().ordinal();
    let first = device_call(&gpu, n, &qkv);
    gpu.stream().synchronize().unwrap();
    let kept = flexprefill_cuda::reserved_bytes(ordinal).unwrap();
    assert!(
        kept > 0,
        "the pool handed its memory back at the synchronisation"
    );
    // A second call reuses the kept memory (same bits, nothing more reserved).
    let second = device_call(&gpu, n, &qkv);
    gpu.stream().synchronize().unwrap();
    assert_eq!(first.0, second.0);
    assert_eq!(flexprefill_cuda::reserved_bytes(ordinal).unwrap(), kept);
    flexprefill_cuda::release_cached_memory().unwrap();
    assert_eq!(flexprefill_cuda::reserved_bytes(ordinal).unwrap(), 0);
    // And the pool serves calls again after the release.
    let third = device_call(&gpu, n, &qkv);
    assert_eq!(first.0, third.0);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn kernel_cache_on_and_off_give_the_same_bits_and_a_new_registry_hits_it() {
    let dir = std::env::temp_dir().join(format!("fp-gpu-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Some(cold) = gpu_with(&KernelCache::Dir(dir.clone())) else {
        return;
    };
    let n = 16384;
    let qkv = data(n);
    let (a, ra) = host_call(&cold, n, &qkv);
    let reg = cold.device().registry();
    assert!(reg.compiled_modules() > 0);
    assert_eq!(reg.disk_cache_hits(), 0, "the cache folder was empty");

    let warm = gpu_with(&KernelCache::Dir(dir.clone())).unwrap();
    let t = Instant::now();
    let (b, rb) = host_call(&warm, n, &qkv);
    println!(
        "first call of a registry with a warm cache: {:?}",
        t.elapsed()
    );
    let reg = warm.device().registry();
    assert_eq!(reg.compiled_modules(), 0, "a warm cache compiles nothing");
    assert!(reg.disk_cache_hits() > 0);

    let off = gpu_with(&KernelCache::Off).unwrap();
    let (c, rc) = host_call(&off, n, &qkv);
    assert!(off.device().registry().compiled_modules() > 0);
    assert_eq!(off.device().registry().disk_cache_hits(), 0);

    assert_eq!(bits(&a.out), bits(&b.out));
    assert_eq!(bits(&a.out), bits(&c.out));
    assert_eq!(decisions(&ra), decisions(&rb));
    assert_eq!(decisions(&ra), decisions(&rc));
    let _ = std::fs::remove_dir_all(dir);
}
