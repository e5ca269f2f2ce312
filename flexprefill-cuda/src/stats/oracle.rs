//! The oracle density on the device: the yardstick `flexprefill_testkit::oracle` computes on
//! the CPU from the f64 attention, here from block-pooled probabilities on the GPU, so that a
//! long input (128k tokens, where the CPU's f64 attention is slow) can be placed against it.
//!
//! [`mean_row_block_mass`] runs `stats_oracle_block_mass` (`kernels/stats/sampled.cu`: the
//! sampled mode's estimator with every row of each query block taken, in groups of 16) and
//! downloads, per (sequence, head, query block, key block), the mean over the block's rows of
//! the softmax mass in the key block (bottom-right causal, ragged batches and chunks as the
//! other kernels). [`MeanRowBlockMass::oracle`] then cuts each query block on the host with
//! core's [`oracle_count`], the function the test kit's oracle counts with, so the two differ
//! only where the device's f32 probabilities (bf16 or f16 tensor-core dot products) reorder
//! or move a block across gamma.
//!
//! The every-row oracle needs every row's own block distribution and is not computed here.
//!
//! ```no_run
//! use flexprefill_core::{bf16, AttentionInput, AttentionShape};
//! use flexprefill_cuda::{oracle, CudaBackend};
//!
//! let gpu = CudaBackend::new()?;
//! let shape = AttentionShape::new(4, 2, 64)?;
//! let n = 2048;
//! let q = vec![bf16::from_f32(0.1); n * 4 * 64];
//! let kv = vec![bf16::from_f32(0.1); n * 2 * 64];
//! let x = AttentionInput::batched(&q, &kv, &kv, 1, n, n, shape)?;
//! let heads = oracle::mean_row_block_mass_host(&gpu, &x, 128)?.oracle(0.9)?;
//! println!("oracle density {:.3}", oracle::overall(&heads));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::sampled::{self, Rows};
use super::*;
use crate::attention::AttentionArgs;
use crate::workspace::Scratch;
use flexprefill_core::selection::oracle_count;
use flexprefill_core::Error;

/// The most bytes the mean-row map may take (on the device and again on the host): 4 GiB. At
/// 128k tokens, 32 heads and block 128 the map is 128 MiB; block 16 at that length would need
/// 8 GiB.
pub const MAX_MAP_BYTES: usize = 4 << 30;

/// Every (sequence, head, query block)'s mean-row mass per key block, on the host.
#[derive(Debug, Clone)]
pub struct MeanRowBlockMass {
    layout: StatsLayout,
    mass: Vec<f32>,
}

/// The mean-row oracle of one (sequence, head) at one gamma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeanRowOracle {
    /// Mean-row oracle blocks, summed over the head's query blocks.
    pub blocks: usize,
    /// Causal blocks of the sequence.
    pub causal_blocks: usize,
}

impl MeanRowOracle {
    /// Oracle blocks over causal blocks.
    pub fn density(&self) -> f64 {
        self.blocks as f64 / self.causal_blocks.max(1) as f64
    }
}

/// Overall mean-row oracle density of several heads: blocks over causal blocks, summed (the
/// test kit's `oracle::overall` on the mean row).
pub fn overall(heads: &[MeanRowOracle]) -> f64 {
    let blocks: usize = heads.iter().map(|o| o.blocks).sum();
    let causal: usize = heads.iter().map(|o| o.causal_blocks).sum();
    blocks as f64 / causal.max(1) as f64
}

impl MeanRowBlockMass {
    /// The sequences.
    pub fn seqs(&self) -> &[Sequence] {
        &self.layout.seqs
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// Query heads.
    pub fn num_heads(&self) -> usize {
        self.layout.shape.num_heads
    }

    /// Query block `r` of `head` in sequence `seq`: the mean-row mass of each of its causal
    /// key blocks (`Sequence::causal_key_blocks` values). `None` out of range.
    pub fn block_means(&self, seq: usize, head: usize, r: usize) -> Option<&[f32]> {
        let s = self.layout.seqs.get(seq)?;
        let bs = self.layout.block_size;
        if head >= self.num_heads() || r >= s.num_query_blocks(bs) {
            return None;
        }
        let at = self.layout.sampled_offset(seq, head) + r * s.num_key_blocks(bs);
        self.mass.get(at..at + s.causal_key_blocks(r, bs))
    }

    /// The mean-row oracle of every (sequence, head) at `gamma`, sequence-major: per query
    /// block [`oracle_count`] of its block means (widened to f64), summed over the blocks.
    pub fn oracle(&self, gamma: f64) -> Result<Vec<MeanRowOracle>> {
        if !(gamma > 0.0 && gamma <= 1.0) {
            return Err(Error::Config(format!("gamma ({gamma}) must be in (0, 1]")).into());
        }
        let bs = self.layout.block_size;
        let mut out = Vec::with_capacity(self.seqs().len() * self.num_heads());
        let mut means = Vec::new();
        for (si, s) in self.seqs().iter().enumerate() {
            for head in 0..self.num_heads() {
                let mut blocks = 0;
                for r in 0..s.num_query_blocks(bs) {
                    let row = self.block_means(si, head, r).unwrap_or(&[]);
                    means.clear();
                    means.extend(row.iter().map(|&v| f64::from(v)));
                    blocks += oracle_count(&means, gamma);
                }
                out.push(MeanRowOracle {
                    blocks,
                    causal_blocks: s.total_causal_blocks(bs),
                });
            }
        }
        Ok(out)
    }
}

/// The map's bytes for `layout`, or an error past [`MAX_MAP_BYTES`].
fn map_len(layout: &StatsLayout) -> Result<usize> {
    let n = layout
        .total_query_key_blocks()
        .saturating_mul(layout.shape.num_heads);
    let bytes = n.saturating_mul(std::mem::size_of::<f32>());
    if bytes > MAX_MAP_BYTES {
        return Err(CudaError::Unsupported {
            op: "oracle_density",
            message: format!(
                "the mean-row block mass map needs {bytes} bytes (at most {MAX_MAP_BYTES}): use a larger block_size or a shorter input"
            ),
        });
    }
    Ok(n)
}

/// The mean-row block masses of `args`' q and k (v is not read) on a `block_size` grid, at
/// `args`' softmax scale. Queues the kernel on `stream` and downloads: synchronises.
pub fn mean_row_block_mass<T: StatsElem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    args: &AttentionArgs<'_, T>,
    block_size: usize,
) -> Result<MeanRowBlockMass> {
    let mut cfg = FlexPrefillConfig::default();
    cfg.block_size = block_size;
    cfg.validate()?;
    let shape = args.shape;
    shape.validate()?;
    passes::check_head_dim(shape.head_dim)?;
    let seqs = args.seqs.seqs();
    let (total_q, total_k) = Sequence::check_packed(seqs)?;
    let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    for (name, got, want) in [
        ("q", args.q.len(), total_q.saturating_mul(h * d)),
        ("k", args.k.len(), total_k.saturating_mul(hkv * d)),
    ] {
        if got != want {
            return Err(CudaError::BufferLen {
                op: "oracle_density",
                name,
                got,
                want,
            });
        }
    }
    let layout = StatsLayout::new(seqs, shape, block_size)?;
    let n = map_len(&layout)?;
    let scale = args.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt());
    let path = PassPath::choose(dev.info().compute_capability, d);
    let kkey = passes::key(T::DTYPE, d, false, path);
    let mut scratch = Scratch::alloc();
    let descs = scratch.upload(stream, &layout.descs)?;
    let qb_seq = scratch.upload(stream, &layout.qb_seq)?;
    // NaN in every element the kernel fails to write: it would show in the oracle's counts.
    let mut out: Buf<f32> = crate::backend::poisoned::<f32>(stream, n)?.into();
    sampled::launch(
        dev,
        stream,
        &mut scratch,
        &kkey,
        args.q,
        args.k,
        &descs,
        &qb_seq,
        &layout,
        scale * std::f32::consts::LOG2_E,
        Rows::All,
        &mut out,
    )?;
    let mut mass = stream.clone_dtoh(&out)?;
    stream.synchronize()?;
    mass.truncate(n);
    Ok(MeanRowBlockMass { layout, mass })
}

/// [`mean_row_block_mass`] on host tensors (f32 rounded to bf16, as the backend's attention
/// does), on the backend's stream, at the input's softmax scale. Synchronises.
pub fn mean_row_block_mass_host(
    gpu: &crate::CudaBackend,
    x: &AttentionInput<'_>,
    block_size: usize,
) -> Result<MeanRowBlockMass> {
    x.validate()?;
    let stream = gpu.stream();
    let seqs = crate::attention::DeviceSeqs::new(stream, &x.seqs)?;
    fn typed<T: StatsElem>(
        gpu: &crate::CudaBackend,
        seqs: &crate::attention::DeviceSeqs,
        x: &AttentionInput<'_>,
        q: &[T],
        k: &[T],
        block_size: usize,
    ) -> Result<MeanRowBlockMass> {
        let stream = gpu.stream();
        let (q, k) = (stream.clone_htod(q)?, stream.clone_htod(k)?);
        let mut args = AttentionArgs::new(&q, &k, &k, x.shape, seqs);
        args.softmax_scale = Some(x.scale());
        mean_row_block_mass(gpu.device(), stream, &args, block_size)
    }
    match (x.q, x.k) {
        (TensorRef::BF16(q), TensorRef::BF16(k)) => typed(gpu, &seqs, x, q, k, block_size),
        (TensorRef::F16(q), TensorRef::F16(k)) => typed(gpu, &seqs, x, q, k, block_size),
        (TensorRef::F32(q), TensorRef::F32(k)) => {
            let cv = |t: &[f32]| {
                t.iter()
                    .map(|&a| half::bf16::from_f32(a))
                    .collect::<Vec<_>>()
            };
            typed(gpu, &seqs, x, &cv(q), &cv(k), block_size)
        }
        _ => Err(crate::backend::dtype_error(x)),
    }
}

/// The mean-row oracle density of every (sequence, head) of `x` at `gamma` on a `block_size`
/// grid, sequence-major (the test kit's `oracle_density`, mean row only). Synchronises.
pub fn oracle_density(
    gpu: &crate::CudaBackend,
    x: &AttentionInput<'_>,
    block_size: usize,
    gamma: f64,
) -> Result<Vec<MeanRowOracle>> {
    mean_row_block_mass_host(gpu, x, block_size)?.oracle(gamma)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{backend_or_skip, ragged, seed, workload};
    use super::*;
    use crate::attention::DeviceSeqs;
    use flexprefill_testkit::oracle::{oracle_density, HeadBlockMass};
    use flexprefill_testkit::owned::OwnedInput;
    use flexprefill_testkit::workload::WorkloadKind;

    fn layout(seqs: &[Sequence], heads: usize, bs: usize) -> StatsLayout {
        let shape = AttentionShape::new(heads, 1, 64).expect("shape");
        StatsLayout::new(seqs, shape, bs).expect("layout")
    }

    /// A host map built by hand: the cut per query block, the causal prefix of each row, the
    /// ranges and the overall density.
    #[test]
    fn oracle_of_a_hand_built_map() {
        // One sequence of 40 tokens at block 16: 3 query blocks with 1, 2, 3 causal blocks.
        let l = layout(&[Sequence::whole(40)], 1, 16);
        let mut mass = vec![f32::NAN; 9];
        mass[0] = 1.0; // r 0: one block
        mass[3..5].copy_from_slice(&[0.3, 0.7]); // r 1: 0.7 alone reaches 0.6, not 0.8
        mass[6..9].copy_from_slice(&[0.5, 0.1, 0.4]); // r 2: 0.5 + 0.4 = 0.9
        let m = MeanRowBlockMass { layout: l, mass };
        assert_eq!(m.block_means(0, 0, 1), Some(&[0.3f32, 0.7][..]));
        assert_eq!(m.block_means(0, 0, 3), None);
        assert_eq!(m.block_means(0, 1, 0), None);
        assert_eq!(m.block_means(1, 0, 0), None);
        let o = m.oracle(0.6).expect("gamma");
        assert_eq!(
            o,
            vec![MeanRowOracle {
                blocks: 1 + 1 + 2,
                causal_blocks: 6
            }]
        );
        let o = m.oracle(0.8).expect("gamma");
        assert_eq!(o[0].blocks, 1 + 2 + 2);
        assert!((overall(&o) - 5.0 / 6.0).abs() < 1e-12);
        assert!(m.oracle(0.0).is_err() && m.oracle(1.5).is_err() && m.oracle(f64::NAN).is_err());
    }

    /// An absurd map is refused before anything is allocated.
    #[test]
    fn a_map_past_the_limit_is_refused() {
        let ok = layout(&[Sequence::whole(131_072)], 32, 128);
        assert_eq!(map_len(&ok).expect("128 MiB"), 32 * 1024 * 1024);
        let big = layout(&[Sequence::whole(131_072)], 32, 16);
        assert!(matches!(
            map_len(&big),
            Err(CudaError::Unsupported {
                op: "oracle_density",
                ..
            })
        ));
    }

    /// Per block, |device mean-row mass − f64 mean-row mass| ≤ this: bf16 inputs are exact in both,
    /// the device's logits are f32 tensor-core sums and its probabilities f32.
    const TOL: f64 = 2e-3;

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn mean_row_block_mass_matches_the_f64_oracle() {
        let Some(gpu) = backend_or_skip() else {
            return;
        };
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
                "mixed 1800 bf16 bs 256",
                workload(WorkloadKind::Mixed, 1800, 4, 2, 128, seed + 3).to_dtype(DType::BF16),
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
            let got = mean_row_block_mass_host(&gpu, &x, *bs).expect("device oracle");
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
                    overall(&dev),
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
        let Some(gpu) = backend_or_skip() else {
            return;
        };
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
        let ok = mean_row_block_mass(dev, &stream, &args, 64).expect("valid call");
        // Equal logits: every row spreads evenly over its keys, the mean-row masses sum to 1.
        for r in 0..n.div_ceil(64) {
            let m = ok.block_means(0, 3, r).expect("in range");
            let total: f64 = m.iter().map(|&v| v as f64).sum();
            assert!((total - 1.0).abs() < 1e-4, "block {r}: {m:?}");
        }
        assert!(matches!(
            mean_row_block_mass(dev, &stream, &args, 100),
            Err(CudaError::Core(flexprefill_core::Error::Config(_)))
        ));
        let bad_k = AttentionArgs::new(&q, &short, &short, shape, &seqs);
        assert!(matches!(
            mean_row_block_mass(dev, &stream, &bad_k, 64),
            Err(CudaError::BufferLen { name: "k", .. })
        ));
        assert!(ok.oracle(0.0).is_err());
    }
}
