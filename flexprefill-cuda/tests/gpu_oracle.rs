//! The device oracle (`flexprefill_cuda::oracle`) against the test kit's f64 one on the GPU
//! (ignored without one): every mean-row block mass within bf16 tensor-core rounding of the
//! f64 attention's, and the mean-row oracle's block counts equal up to a block per head, on
//! GQA, f16, every block size, a ragged batch and chunks.

use flexprefill_core::{AttentionShape, DType, Sequence};
use flexprefill_cuda::attention::{AttentionArgs, DeviceSeqs};
use flexprefill_cuda::{oracle, CudaBackend, CudaError};
use flexprefill_testkit::oracle::{oracle_density, HeadBlockMass};
use flexprefill_testkit::owned::OwnedInput;
use flexprefill_testkit::workload::{generate, WorkloadKind, WorkloadSpec};

/// The backend, or `None` (with a message) where no driver is installed.
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

/// A fresh seed per run, printed so a failure can be replayed (`FLEXPREFILL_SEED`).
fn seed() -> u64 {
    let s = std::env::var("FLEXPREFILL_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {s}");
    s
}

fn workload(
    kind: WorkloadKind,
    len: usize,
    h: usize,
    hkv: usize,
    d: usize,
    seed: u64,
) -> OwnedInput {
    let mut spec = WorkloadSpec::new(kind, len);
    (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.seed) = (h, hkv, d, seed);
    generate(&spec).owned()
}

/// Two sequences of different lengths packed into one ragged input.
fn ragged(a: &OwnedInput, b: &OwnedInput) -> OwnedInput {
    let parts: Vec<_> = [a, b]
        .iter()
        .map(|o| (o.q.to_f32_vec(), o.k.to_f32_vec(), o.v.to_f32_vec()))
        .collect();
    OwnedInput::pack_f32(a.shape, &parts)
}

/// Per block, |device mean-row mass − f64 mean-row mass| ≤ this: bf16 inputs are exact in both,
/// the device's logits are f32 tensor-core sums and its probabilities f32.
const TOL: f64 = 2e-3;

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn mean_row_block_mass_matches_the_f64_oracle() {
    let Some(gpu) = gpu() else { return };
    let seed = seed();
    let long = workload(WorkloadKind::Mixed, 1300, 4, 2, 128, seed + 5);
    let cases: Vec<(&str, OwnedInput, usize)> = vec![
        (
            "sink_local 700 bf16 GQA 4, d64, bs 64",
            workload(WorkloadKind::SinkLocal, 700, 8, 2, 64, seed).to_dtype(DType::BF16),
            64,
        ),
        (
            "topics 1000 f16 d128 bs 128 (partial block)",
            workload(WorkloadKind::Topics, 1000, 4, 1, 128, seed + 1).to_dtype(DType::F16),
            128,
        ),
        (
            "random 600 bf16 d96 bs 16",
            workload(WorkloadKind::Random, 600, 2, 2, 96, seed + 2).to_dtype(DType::BF16),
            16,
        ),
        (
            "stripes 900 bf16 bs 256",
            workload(WorkloadKind::Stripes, 900, 4, 2, 128, seed + 3).to_dtype(DType::BF16),
            256,
        ),
        (
            "ragged 500 + 800 bf16 bs 32",
            ragged(
                &workload(WorkloadKind::SinkLocal, 500, 4, 2, 64, seed + 4),
                &workload(WorkloadKind::Topics, 800, 4, 2, 64, seed + 6),
            )
            .to_dtype(DType::BF16),
            32,
        ),
        (
            "chunk q 1000..1300 of 1300 bf16 bs 128 (q_len < kv_len)",
            long.chunk(1000, 1300)
                .expect("valid chunk")
                .to_dtype(DType::BF16),
            128,
        ),
        (
            "chunk of 37 queries mid-block bf16 bs 64",
            long.chunk(1263, 1300)
                .expect("valid chunk")
                .to_dtype(DType::BF16),
            64,
        ),
    ];
    for (what, owned, bs) in &cases {
        let x = owned.input().expect("valid input");
        let got = oracle::mean_row_block_mass_host(&gpu, &x, *bs).expect("device oracle");
        assert_eq!(got.seqs(), &x.seqs[..], "{what}");
        let mut worst = 0f64;
        for (si, s) in x.seqs.iter().enumerate() {
            for head in 0..x.shape.num_heads {
                let want = HeadBlockMass::compute(&x, si, head, *bs).expect("cpu table");
                for r in 0..s.num_query_blocks(*bs) {
                    let g = got.block_means(si, head, r).expect("in range");
                    let c = want.block_mean(r);
                    assert_eq!(g.len(), c.len(), "{what}: seq {si} head {head} block {r}");
                    for (j, (&a, &b)) in g.iter().zip(&c).enumerate() {
                        let d = (a as f64 - b).abs();
                        assert!(
                            d <= TOL,
                            "{what}: seq {si} head {head} block {r} key block {j}: device {a} vs f64 {b}"
                        );
                        worst = worst.max(d);
                    }
                }
            }
        }
        for gamma in [0.9, 0.95] {
            let dev = got.oracle(gamma).expect("valid gamma");
            let cpu = oracle_density(&x, *bs, gamma).expect("cpu oracle");
            assert_eq!(dev.len(), cpu.len(), "{what}");
            let mut differ = 0;
            for (i, (d, c)) in dev.iter().zip(&cpu).enumerate() {
                assert_eq!(d.causal_blocks, c.causal_blocks, "{what} head {i}");
                let diff = d.blocks.abs_diff(c.mean_row_blocks);
                assert!(
                    diff <= 1,
                    "{what} gamma {gamma} head {i}: device {} blocks, f64 {}",
                    d.blocks,
                    c.mean_row_blocks
                );
                differ += usize::from(diff > 0);
            }
            let cpu_overall = flexprefill_testkit::oracle::overall(&cpu).0;
            eprintln!(
                "{what} gamma {gamma}: oracle density device {:.4}, f64 {cpu_overall:.4}; {differ} of {} heads one block apart",
                oracle::overall(&dev),
                dev.len()
            );
        }
        eprintln!("{what}: worst block mass difference {worst:.2e}");
    }
}

/// The device entry refuses what it cannot run with typed errors, before any launch.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn bad_arguments_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let stream = gpu.stream().clone();
    let shape = AttentionShape::new(4, 2, 64).expect("shape");
    let n = 300;
    let seqs = DeviceSeqs::new(&stream, &[Sequence::whole(n)]).expect("seqs");
    let q = stream
        .alloc_zeros::<flexprefill_core::bf16>(n * 4 * 64)
        .expect("q");
    let k = stream
        .alloc_zeros::<flexprefill_core::bf16>(n * 2 * 64)
        .expect("k");
    let short = stream
        .alloc_zeros::<flexprefill_core::bf16>(n * 2 * 64 - 1)
        .expect("short k");
    let dev = gpu.device();
    let args = AttentionArgs::new(&q, &k, &k, shape, &seqs);
    let ok = oracle::mean_row_block_mass(dev, &stream, &args, 64).expect("valid call");
    // Equal logits: every row spreads evenly over its keys, the mean-row masses sum to 1.
    for r in 0..n.div_ceil(64) {
        let m = ok.block_means(0, 3, r).expect("in range");
        let total: f64 = m.iter().map(|&v| v as f64).sum();
        assert!((total - 1.0).abs() < 1e-4, "block {r}: {m:?}");
    }
    assert!(matches!(
        oracle::mean_row_block_mass(dev, &stream, &args, 100),
        Err(CudaError::Core(flexprefill_core::Error::Config(_)))
    ));
    let bad_k = AttentionArgs::new(&q, &short, &short, shape, &seqs);
    assert!(matches!(
        oracle::mean_row_block_mass(dev, &stream, &bad_k, 64),
        Err(CudaError::BufferLen { name: "k", .. })
    ));
    assert!(ok.oracle(0.0).is_err());
}
