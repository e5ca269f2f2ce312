//! A workspace call on the GPU (ignored without one): a whole FlexPrefill call (statistics,
//! selection, index build, attention) captured in a CUDA graph and replayed on new inputs
//! gives the bits of a direct call; a call with a workspace allocates no device memory; calls
//! beyond the workspace's limits are typed errors.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use flexprefill_core::{bf16, AttentionShape, DType, FlexPrefillConfig, Pattern, Sequence};
use flexprefill_cuda::call::DeviceRun;
use flexprefill_cuda::raw::{flex_prefill_raw, flex_prefill_raw_with, report_raw};
use flexprefill_cuda::{CudaBackend, CudaError, Workspace, WorkspaceLimits};
use flexprefill_testkit::workload::{generate, WorkloadKind, WorkloadSpec};

const SHAPE: (usize, usize, usize) = (8, 2, 128);
/// Long enough that the call runs sparse (`MIN_SPARSE_KV_LEN`), so every stage is captured.
const N: usize = 16384;

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new() {
        Ok(g) => Some(g),
        Err(CudaError::NoDriver) => {
            println!("no NVIDIA driver: skipped");
            None
        }
        Err(e) => panic!("a CUDA device is needed: {e}"),
    }
}

fn shape() -> AttentionShape {
    AttentionShape::new(SHAPE.0, SHAPE.1, SHAPE.2).expect("valid shape")
}

fn seqs() -> [Sequence; 1] {
    [Sequence {
        q_start: 0,
        k_start: 0,
        q_len: N,
        kv_len: N,
    }]
}

fn limits() -> WorkspaceLimits {
    WorkspaceLimits::new(N, N, 2, shape(), DType::BF16, FlexPrefillConfig::default())
}

/// The call's device buffers, written in place between calls (a graph reads their addresses).
struct Io {
    s: Arc<CudaStream>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
}

impl Io {
    fn new(s: &Arc<CudaStream>) -> Self {
        let (h, hkv, d) = SHAPE;
        Self {
            s: s.clone(),
            q: s.alloc_zeros(N * h * d).unwrap(),
            k: s.alloc_zeros(N * hkv * d).unwrap(),
            v: s.alloc_zeros(N * hkv * d).unwrap(),
            out: s.alloc_zeros(N * h * d).unwrap(),
            lse: s.alloc_zeros(N * h).unwrap(),
        }
    }

    /// New input values (a workload per seed) into the same buffers.
    fn write(&mut self, seed: u64) {
        let (h, hkv, d) = SHAPE;
        let (q, k, v) = generate(&WorkloadSpec {
            kind: WorkloadKind::Mixed,
            batch: 1,
            seq_len: N,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            seed,
        })
        .to_bf16();
        self.s.memcpy_htod(&q, &mut self.q).unwrap();
        self.s.memcpy_htod(&k, &mut self.k).unwrap();
        self.s.memcpy_htod(&v, &mut self.v).unwrap();
        self.s.synchronize().unwrap();
    }

    fn ptrs(&self) -> [u64; 5] {
        let s = &self.s;
        [
            self.q.device_ptr(s).0,
            self.k.device_ptr(s).0,
            self.v.device_ptr(s).0,
            self.out.device_ptr(s).0,
            self.lse.device_ptr(s).0,
        ]
    }

    /// Output and LSE bits (synchronises).
    fn bits(&self) -> (Vec<u16>, Vec<u32>) {
        let o: Vec<bf16> = self.s.clone_dtoh(&self.out).unwrap();
        let l: Vec<f32> = self.s.clone_dtoh(&self.lse).unwrap();
        self.s.synchronize().unwrap();
        (
            o.iter().map(|x| x.to_bits()).collect(),
            l.iter().map(|x| x.to_bits()).collect(),
        )
    }

    fn stream_id(&self) -> u64 {
        self.s.cu_stream() as usize as u64
    }
}

/// The raw call on `io`'s buffers with `cfg`, with `ws` or (None) fresh allocations.
fn try_call(
    gpu: &CudaBackend,
    ws: Option<&mut Workspace>,
    io: &Io,
    cfg: &FlexPrefillConfig,
) -> Result<DeviceRun, CudaError> {
    let [q, k, v, o, l] = io.ptrs();
    let (st, dt, sh, sq) = (io.stream_id(), DType::BF16, shape(), seqs());
    // SAFETY: every pointer is a live allocation of `io` sized for `seqs()`, on the backend's
    // context, alive past every synchronize of this test; the stream is `io`'s own.
    unsafe {
        match ws {
            Some(ws) => flex_prefill_raw_with(gpu, ws, st, dt, q, k, v, o, l, sh, &sq, None, cfg),
            None => flex_prefill_raw(gpu, st, dt, q, k, v, o, l, sh, &sq, None, cfg),
        }
    }
}

/// [`try_call`] with the default config, which must succeed.
fn call(gpu: &CudaBackend, ws: Option<&mut Workspace>, io: &Io) -> DeviceRun {
    try_call(gpu, ws, io, &FlexPrefillConfig::default()).unwrap()
}

fn decisions(gpu: &CudaBackend, io: &Io, run: &DeviceRun) -> Vec<(Pattern, usize)> {
    // SAFETY: the call's own stream.
    let rep = unsafe { report_raw(gpu, io.stream_id(), run) }.unwrap();
    rep.heads
        .iter()
        .map(|h| (h.pattern, h.selected_blocks))
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_captured_call_replays_with_the_bits_of_a_direct_call() {
    let Some(gpu) = gpu() else { return };
    let ctx = gpu.device().context().clone();
    // Stream capture records one stream's work: cudarc's per-buffer event tracking would make
    // the captured stream wait on events of other, uncaptured streams. Off before any buffer
    // of the test or the workspaces is made (the workspace then keeps its whole call on the
    // caller's stream).
    // SAFETY: every buffer below is used on `s` alone (and freed after its last use there).
    unsafe { ctx.disable_event_tracking() };
    // A stream of its own: the legacy default stream cannot be captured.
    let s = ctx.new_stream().unwrap();
    let (mut graph_io, mut ref_io) = (Io::new(&s), Io::new(&s));
    let mut ws_graph = Workspace::new(&gpu, &s, limits()).unwrap();
    let mut ws_ref = Workspace::new(&gpu, &s, limits()).unwrap();

    // Seed 0 through the graph's workspace directly, then captured.
    graph_io.write(0);
    let direct = call(&gpu, Some(&mut ws_graph), &graph_io);
    let direct_bits = graph_io.bits();
    let direct_dec = decisions(&gpu, &graph_io, &direct);
    assert!(
        direct_dec.iter().any(|&(p, _)| p != Pattern::Dense),
        "the call must run sparse so that every stage is captured"
    );
    drop(direct);
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = call(&gpu, Some(&mut ws_graph), &graph_io);
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded the call");
    // The workspace now belongs to the graph.
    graph_io.write(0);
    let again = try_call(
        &gpu,
        Some(&mut ws_graph),
        &graph_io,
        &FlexPrefillConfig::default(),
    );
    assert!(matches!(again, Err(CudaError::Unsupported { .. })));

    let mut previous = None;
    for seed in [0u64, 11, 12, 13] {
        graph_io.write(seed);
        ref_io.write(seed);
        graph.launch().unwrap();
        let got = graph_io.bits();
        let got_dec = decisions(&gpu, &graph_io, &captured);
        let want_run = call(&gpu, Some(&mut ws_ref), &ref_io);
        let want = ref_io.bits();
        let want_dec = decisions(&gpu, &ref_io, &want_run);
        assert_eq!(got.0, want.0, "output bits, seed {seed}");
        assert_eq!(got.1, want.1, "lse bits, seed {seed}");
        assert_eq!(got_dec, want_dec, "decisions, seed {seed}");
        if seed == 0 {
            assert_eq!(got, direct_bits, "the replay of the captured inputs");
            assert_eq!(got_dec, direct_dec);
        }
        // New inputs reach the replay (an output frozen at capture would fail here).
        if let Some(p) = previous.replace(got.0.clone()) {
            assert_ne!(p, got.0, "seed {seed} gave the previous seed's output");
        }
        // The allocating API is the same pipeline: same bits.
        let alloc_run = call(&gpu, None, &ref_io);
        assert_eq!(ref_io.bits(), want, "allocating call, seed {seed}");
        assert_eq!(decisions(&gpu, &ref_io, &alloc_run), want_dec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_workspace_call_allocates_no_device_memory() {
    let Some(gpu) = gpu() else { return };
    let ctx = gpu.device().context().clone();
    let s = ctx.new_stream().unwrap();
    let mut io = Io::new(&s);
    io.write(5);
    let mut ws = Workspace::new(&gpu, &s, limits()).unwrap();
    // Bytes in use by stream-ordered allocations: FlexPrefill's pool, which the allocating
    // API's work buffers come from, and the device's default pool (cudarc's own `alloc`);
    // free device memory would not show them, since both pools keep what they reserved.
    let used = || -> u64 {
        use cudarc::driver::sys;
        ctx.bind_to_thread().unwrap();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut v: u64 = 0;
        // SAFETY: out-pointers to locals of the types the driver writes; the context is bound.
        unsafe {
            assert_eq!(
                sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()),
                sys::CUresult::CUDA_SUCCESS
            );
            assert_eq!(
                sys::cuMemPoolGetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                ),
                sys::CUresult::CUDA_SUCCESS
            );
        }
        v + flexprefill_cuda::used_bytes(ctx.ordinal()).unwrap()
    };
    // The probe sees a call's allocations: the allocating API's buffers are in use while its
    // run is alive.
    s.synchronize().unwrap();
    let before = used();
    let run = call(&gpu, None, &io);
    let during = used();
    drop(run);
    s.synchronize().unwrap();
    assert!(
        during > before,
        "pool bytes in use {before} -> {during}: the probe does not see the allocating call"
    );
    // A workspace call: nothing, on any of several calls.
    let _ = call(&gpu, Some(&mut ws), &io);
    s.synchronize().unwrap();
    let before = used();
    for _ in 0..3 {
        let run = call(&gpu, Some(&mut ws), &io);
        assert_eq!(used(), before, "a workspace call allocated device memory");
        drop(run);
    }
    s.synchronize().unwrap();
    assert_eq!(used(), before);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn calls_beyond_the_workspace_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let ctx = gpu.device().context().clone();
    let s = ctx.new_stream().unwrap();
    let io = Io::new(&s);
    let small = WorkspaceLimits::new(
        N / 2,
        N / 2,
        1,
        shape(),
        DType::BF16,
        FlexPrefillConfig::default(),
    );
    let mut ws = Workspace::new(&gpu, &s, small).unwrap();
    let cfg = FlexPrefillConfig::default();
    // Refused before anything is queued.
    let e = try_call(&gpu, Some(&mut ws), &io, &cfg);
    assert!(
        matches!(e, Err(CudaError::ExceedsWorkspace { got, max, .. }) if got == N && max == N / 2),
        "{e:?}"
    );
    // Another block size needs other buffers.
    let mut other = cfg;
    other.block_size = 64;
    let mut ws = Workspace::new(&gpu, &s, limits()).unwrap();
    let e = try_call(&gpu, Some(&mut ws), &io, &other);
    assert!(matches!(e, Err(CudaError::Unsupported { .. })), "{e:?}");
}

/// The sampled selection mode through a workspace planned for it: a captured call replays
/// with the bits and decisions of a direct workspace call and of the allocating call (so the
/// sampled statistics and cut queue no host synchronisation and fit the planned buffers).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_captured_sampled_call_replays_with_the_bits_of_a_direct_call() {
    let Some(gpu) = gpu() else { return };
    let mut cfg = FlexPrefillConfig::default();
    cfg.selection = flexprefill_core::SelectionMode::Sampled;
    let limits = WorkspaceLimits::new(N, N, 2, shape(), DType::BF16, cfg);
    let ctx = gpu.device().context().clone();
    // SAFETY: every buffer below is used on `s` alone (see the test above).
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let (mut graph_io, mut ref_io) = (Io::new(&s), Io::new(&s));
    let mut ws_graph = Workspace::new(&gpu, &s, limits.clone()).unwrap();
    let mut ws_ref = Workspace::new(&gpu, &s, limits).unwrap();
    graph_io.write(0);
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let captured = try_call(&gpu, Some(&mut ws_graph), &graph_io, &cfg).unwrap();
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the capture recorded the call");
    for seed in [0u64, 21] {
        graph_io.write(seed);
        ref_io.write(seed);
        graph.launch().unwrap();
        let got = graph_io.bits();
        let got_dec = decisions(&gpu, &graph_io, &captured);
        assert!(
            got_dec.iter().any(|&(p, _)| p != Pattern::Dense),
            "the call must run sparse so that the sampled stages are captured"
        );
        let want_run = try_call(&gpu, Some(&mut ws_ref), &ref_io, &cfg).unwrap();
        let want = ref_io.bits();
        assert_eq!(got, want, "output and lse bits, seed {seed}");
        assert_eq!(got_dec, decisions(&gpu, &ref_io, &want_run), "seed {seed}");
        let alloc_run = try_call(&gpu, None, &ref_io, &cfg).unwrap();
        assert_eq!(ref_io.bits(), want, "allocating call, seed {seed}");
        assert_eq!(
            decisions(&gpu, &ref_io, &alloc_run),
            got_dec,
            "allocating call, seed {seed}"
        );
    }
}
