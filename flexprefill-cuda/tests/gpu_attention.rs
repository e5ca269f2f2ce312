//! The attention kernel against the f64 oracle of `flexprefill-cpu`, given the same index.
//!
//! Tolerances: bf16 rel L2 ≤ 1e-2, f16 ≤ 5e-3 (the bars). A plain bf16 implementation
//! rounds P to 8 bits before P·V (as FA2 and the original do) and the output once more: about
//! 2⁻⁹ relative per element, ~3e-3 in L2 on these inputs; the bar is 3× that (FA's test rule
//! is 2× a same-precision implementation). f16 keeps 11 bits, ~5e-4, bar 10×. LSE involves no
//! 16-bit rounding after the inputs: |Δ| ≤ 1e-3·(1 + |lse|).
//!
//! Every run draws fresh inputs (the seed is printed; set FLEXPREFILL_SEED to replay). The host
//! API poisons its output buffers with NaN, so an unwritten element fails the error check.

use flexprefill_core::{
    AttentionInput, AttentionShape, Backend, BlockIndex, DType, HostTensor, Sequence,
};
use flexprefill_cpu::oracle;
use flexprefill_cuda::{AttentionArgs, AttnTile, CudaBackend, DeviceBlockIndex, DeviceSeqs};

/// splitmix64: small, seedable, no dependency.
struct Rng(u64);
impl Rng {
    fn fresh(tag: &str) -> Self {
        let seed = std::env::var("FLEXPREFILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{tag}: seed {seed}");
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn gpu() -> CudaBackend {
    CudaBackend::new().expect("the GPU tests need a CUDA device")
}

/// q, k, v of `n_q` / `n_k` tokens, normal(0, amp) values, as `dtype`.
struct Data {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
}

fn data(
    rng: &mut Rng,
    dtype: DType,
    shape: AttentionShape,
    n_q: usize,
    n_k: usize,
    amp: f32,
) -> Data {
    let mut gen =
        |n: usize, a: f32| HostTensor::from_f32((0..n).map(|_| rng.normal() * a).collect(), dtype);
    Data {
        q: gen(n_q * shape.num_heads * shape.head_dim, amp),
        k: gen(n_k * shape.num_kv_heads * shape.head_dim, amp),
        v: gen(n_k * shape.num_kv_heads * shape.head_dim, 1.0),
    }
}

fn input<'a>(
    d: &'a Data,
    shape: AttentionShape,
    seqs: &[(usize, usize)],
    lse: bool,
) -> AttentionInput<'a> {
    let mut cu_q = vec![0];
    let mut cu_k = vec![0];
    for &(q, k) in seqs {
        cu_q.push(cu_q.last().unwrap() + q);
        cu_k.push(cu_k.last().unwrap() + k);
    }
    AttentionInput::packed(
        d.q.as_ref(),
        d.k.as_ref(),
        d.v.as_ref(),
        &cu_q,
        &cu_k,
        shape,
    )
    .unwrap()
    .with_lse(lse)
}

/// Random index: sink and diagonal blocks always, each other causal block with probability
/// `p`; `drop_lower_diag` keeps only the upper diagonal block of rows whose queries straddle two
/// key blocks (chunks starting mid-block), and no sink, so some rows attend no key at all.
fn random_index(
    rng: &mut Rng,
    seqs: &[Sequence],
    heads: usize,
    bs: usize,
    p: f64,
    drop_lower_diag: bool,
) -> BlockIndex {
    let mut all = Vec::new();
    for s in seqs {
        for _ in 0..heads {
            let rows = (0..s.num_query_blocks(bs))
                .map(|r| {
                    let diag: Vec<u32> = s.diagonal_key_blocks(r, bs).map(|c| c as u32).collect();
                    if drop_lower_diag {
                        return vec![*diag.last().unwrap()];
                    }
                    let mut row = vec![0u32];
                    row.extend(&diag);
                    for c in 0..s.causal_key_blocks(r, bs) {
                        if rng.uniform() < p {
                            row.push(c as u32);
                        }
                    }
                    row
                })
                .collect();
            all.push(rows);
        }
    }
    BlockIndex::from_rows(seqs, heads, bs, all).unwrap()
}

/// Dense attention on the GPU against the f64 oracle, output and lse.
fn check_dense(gpu: &CudaBackend, inp: &AttentionInput<'_>, tag: &str, dtype: DType) {
    let got = gpu.dense_attention(inp).unwrap();
    let want = oracle::dense_attention_f64(inp).unwrap();
    check(tag, dtype, &got, &want, true);
}

fn check(
    tag: &str,
    dtype: DType,
    got: &flexprefill_core::AttentionOutput,
    want: &oracle::OracleOutput,
    lse: bool,
) {
    let g = got.out.to_f32_vec();
    assert_eq!(g.len(), want.out.len(), "{tag}: output length");
    let nan = g.iter().filter(|v| v.is_nan()).count();
    assert_eq!(
        nan, 0,
        "{tag}: {nan} output elements unwritten (NaN poison) or NaN"
    );
    let err = oracle::relative_l2_error(&g, &want.out);
    let bar = if dtype == DType::F16 { 5e-3 } else { 1e-2 };
    println!("{tag}: rel L2 {err:.2e} (bar {bar:.0e})");
    assert!(err <= bar, "{tag}: rel L2 {err:.3e} > {bar:.0e}");
    if lse {
        let l = got.lse.as_ref().expect("lse asked for");
        assert_eq!(l.len(), want.lse.len(), "{tag}: lse length");
        for (i, (&a, &b)) in l.iter().zip(&want.lse).enumerate() {
            if b == f64::NEG_INFINITY {
                assert_eq!(a, f32::NEG_INFINITY, "{tag}: lse[{i}] of an empty row");
            } else {
                assert!(
                    (a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()),
                    "{tag}: lse[{i}] {a} vs {b}"
                );
            }
        }
    } else {
        assert!(got.lse.is_none());
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dense_matches_oracle_awkward_lengths_gqa_dtypes() {
    let gpu = gpu();
    let mut rng = Rng::fresh("dense");
    for dtype in [DType::BF16, DType::F16] {
        for (h, hkv, d) in [(4, 1, 128), (4, 4, 64), (8, 2, 256), (2, 1, 128)] {
            let shape = AttentionShape::new(h, hkv, d).unwrap();
            for n in [1, 37, 128, 200, 1025] {
                let x = data(&mut rng, dtype, shape, n, n, 1.0);
                let inp = input(&x, shape, &[(n, n)], true);
                check_dense(
                    &gpu,
                    &inp,
                    &format!("dense {dtype} h{h}/{hkv} d{d} n{n}"),
                    dtype,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sparse_matches_masked_oracle_ragged_chunked() {
    let gpu = gpu();
    let mut rng = Rng::fresh("sparse");
    // (q_len, kv_len): full prefill, chunk starting mid-block, chunk shorter than a block,
    // a single query, a sequence shorter than a block.
    let layout = [(700, 700), (300, 1000), (50, 333), (1, 517), (40, 40)];
    for dtype in [DType::BF16, DType::F16] {
        for (h, hkv, d) in [(8, 2, 128), (4, 4, 64), (4, 1, 256)] {
            for bs in [64, 128] {
                let shape = AttentionShape::new(h, hkv, d).unwrap();
                let nq: usize = layout.iter().map(|s| s.0).sum();
                let nk: usize = layout.iter().map(|s| s.1).sum();
                let amp = if bs == 64 { 2.0 } else { 1.0 }; // sharper softmax half the time
                let x = data(&mut rng, dtype, shape, nq, nk, amp);
                let lse = rng.below(2) == 0;
                let inp = input(&x, shape, &layout, lse);
                let index = random_index(&mut rng, &inp.seqs, h, bs, 0.3, false);
                let got = gpu.sparse_attention(&inp, &index).unwrap();
                let want = oracle::masked_attention_f64(&inp, &index).unwrap();
                let tag = format!("sparse {dtype} h{h}/{hkv} d{d} bs{bs} lse {lse}");
                check(&tag, dtype, &got, &want, lse);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn odd_head_dims_and_small_blocks_match_oracle() {
    let gpu = gpu();
    let mut rng = Rng::fresh("odd shapes");
    let layout = [(333, 333), (70, 260)];
    for (h, hkv, d, bs) in [
        (4, 2, 96, 64),
        (4, 1, 32, 32),
        (2, 2, 48, 16),
        (4, 2, 80, 128),
        (2, 1, 160, 128),
        (2, 1, 96, 256),
    ] {
        let shape = AttentionShape::new(h, hkv, d).unwrap();
        let x = data(&mut rng, DType::BF16, shape, 403, 593, 1.0);
        let inp = input(&x, shape, &layout, true);
        let index = random_index(&mut rng, &inp.seqs, h, bs, 0.3, false);
        let got = gpu.sparse_attention(&inp, &index).unwrap();
        let want = oracle::masked_attention_f64(&inp, &index).unwrap();
        check(
            &format!("odd h{h}/{hkv} d{d} bs{bs}"),
            DType::BF16,
            &got,
            &want,
            true,
        );
        check_dense(
            &gpu,
            &inp,
            &format!("odd dense h{h}/{hkv} d{d}"),
            DType::BF16,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn rows_without_keys_give_zero_and_minus_infinity_lse() {
    let gpu = gpu();
    let mut rng = Rng::fresh("empty rows");
    let shape = AttentionShape::new(4, 2, 128).unwrap();
    // A chunk that starts mid-block: its query blocks straddle two key blocks; listing only the
    // upper one leaves the first queries of each block with no key.
    let layout = [(300, 1000)];
    let x = data(&mut rng, DType::BF16, shape, 300, 1000, 1.0);
    let inp = input(&x, shape, &layout, true);
    let index = random_index(&mut rng, &inp.seqs, 4, 128, 0.0, true);
    let got = gpu.sparse_attention(&inp, &index).unwrap();
    let want = oracle::masked_attention_f64(&inp, &index).unwrap();
    assert!(
        want.lse.contains(&f64::NEG_INFINITY),
        "the case has empty rows"
    );
    check("empty rows", DType::BF16, &got, &want, true);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sparse_with_every_block_is_dense_bit_for_bit() {
    let gpu = gpu();
    let mut rng = Rng::fresh("dense index");
    let shape = AttentionShape::new(8, 2, 128).unwrap();
    let layout = [(1000, 1000), (200, 777)];
    let x = data(&mut rng, DType::BF16, shape, 1200, 1777, 1.0);
    let inp = input(&x, shape, &layout, true);
    let index = BlockIndex::dense(&inp.seqs, 8, 128).unwrap();
    let a = gpu.dense_attention(&inp).unwrap();
    let b = gpu.sparse_attention(&inp, &index).unwrap();
    assert_eq!(
        a, b,
        "the dense walk and a full index must run the same tiles in the same order"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn f32_inputs_run_as_bf16() {
    let gpu = gpu();
    let mut rng = Rng::fresh("f32");
    let shape = AttentionShape::new(4, 2, 64).unwrap();
    let x = data(&mut rng, DType::F32, shape, 333, 333, 1.0);
    let inp = input(&x, shape, &[(333, 333)], false);
    let got = gpu.dense_attention(&inp).unwrap();
    assert_eq!(got.out.dtype(), DType::F32);
    let want = oracle::dense_attention_f64(&inp).unwrap();
    check("f32 as bf16", DType::BF16, &got, &want, false);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn unsupported_shapes_are_typed_errors() {
    let gpu = gpu();
    let shape = AttentionShape::new(2, 1, 40).unwrap();
    let q = vec![half::bf16::from_f32(0.5); 10 * 2 * 40];
    let kv = vec![half::bf16::from_f32(0.5); 10 * 40];
    let inp = AttentionInput::batched(&q, &kv, &kv, 1, 10, 10, shape).unwrap();
    let e = gpu.dense_attention(&inp).unwrap_err();
    assert!(e.to_string().contains("head_dim (40)"), "{e}");
}

/// Uploads bf16 q, k, v.
fn upload_bf16(
    stream: &std::sync::Arc<flexprefill_cuda::cudarc::driver::CudaStream>,
    x: &Data,
) -> (
    flexprefill_cuda::cudarc::driver::CudaSlice<half::bf16>,
    flexprefill_cuda::cudarc::driver::CudaSlice<half::bf16>,
    flexprefill_cuda::cudarc::driver::CudaSlice<half::bf16>,
) {
    let up = |t: &HostTensor| match t {
        HostTensor::BF16(v) => stream.clone_htod(v).unwrap(),
        _ => unreachable!("bf16 data"),
    };
    (up(&x.q), up(&x.k), up(&x.v))
}

/// Every tile shape the bench compares and the automatic one, those the device can run.
fn device_tiles(gpu: &CudaBackend, d: usize, bs: usize) -> Vec<AttnTile> {
    let cc = gpu.device().info().compute_capability;
    let mut tiles = AttnTile::variants(d, bs);
    tiles.push(AttnTile::auto_for(cc, d, bs));
    tiles.retain(|t| !t.wgmma || cc == (9, 0));
    tiles
}

/// Both kernels (portable mma.sync, Hopper wgmma where the device has it) against the oracle
/// through the device API, every tile shape the bench compares, on poisoned output buffers.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn every_tile_shape_matches_oracle_through_device_api() {
    let gpu = gpu();
    let stream = gpu.stream().clone();
    let mut rng = Rng::fresh("tiles");
    for (d, bs) in [(128, 128), (64, 128), (128, 64), (64, 64)] {
        let shape = AttentionShape::new(8, 2, d).unwrap();
        let layout = [(600, 600), (130, 1000)];
        let x = data(&mut rng, DType::BF16, shape, 730, 1600, 1.0);
        let inp = input(&x, shape, &layout, true);
        let index = random_index(&mut rng, &inp.seqs, 8, bs, 0.4, false);
        let want = oracle::masked_attention_f64(&inp, &index).unwrap();
        let (q, k, v) = upload_bf16(&stream, &x);
        let seqs = DeviceSeqs::new(&stream, &inp.seqs).unwrap();
        let dindex = DeviceBlockIndex::upload(&stream, &index).unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            shape,
            seqs: &seqs,
            softmax_scale: Some(0.1),
        };
        let inp = inp.with_softmax_scale(0.1).unwrap();
        let want_scaled = oracle::masked_attention_f64(&inp, &index).unwrap();
        assert_ne!(want, want_scaled);
        for t in device_tiles(&gpu, d, bs) {
            let mut out = stream
                .clone_htod(&vec![half::bf16::NAN; 730 * 8 * d])
                .unwrap();
            let mut lse = stream.clone_htod(&vec![f32::NAN; 730 * 8]).unwrap();
            gpu.attention_device(
                &stream,
                &args,
                Some(&dindex),
                Some(t),
                &mut out,
                Some(&mut lse),
            )
            .unwrap();
            let got = flexprefill_core::AttentionOutput {
                out: HostTensor::BF16(stream.clone_dtoh(&out).unwrap()),
                lse: Some(stream.clone_dtoh(&lse).unwrap()),
            };
            check(
                &format!("tile {t:?} d{d} bs{bs}"),
                DType::BF16,
                &got,
                &want_scaled,
                true,
            );
        }
    }
}

/// The testkit's agreement harness on its device-backend list (`standard_cases`: head_dim 64
/// and 128, blocks 64 and 128, ragged, chunked, awkward lengths, both selection modes): dense
/// and sparse attention against the f64 oracle, and the whole `flex_prefill` (GPU statistics,
/// core selection, GPU attention) against the CPU backend's selection. bf16 only (f16 runs the
/// same kernels, checked above; f32 inputs run as bf16 here, see `CudaBackend`, below the
/// harness's f32 tolerance by design). The quick list uses head_dim 32/48 and block 32, which
/// this backend rejects with typed errors.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn testkit_agreement_standard_cases() {
    use flexprefill_testkit::agreement::{self, AgreementOptions};
    let opts = AgreementOptions {
        dtypes: vec![DType::BF16],
        ..Default::default()
    };
    // The standard cases are short (at most a few thousand tokens), where the GPU's
    // dense-or-sparse rule runs dense: threshold 0 exercises selection and sparse attention,
    // the default threshold the dense decision (every head reported dense, dense output).
    for (what, gpu) in [
        ("sparse path (threshold 0)", gpu().with_min_sparse_kv_len(0)),
        ("default threshold", gpu()),
    ] {
        let report = agreement::check_backend_with(&gpu, &agreement::standard_cases(), &opts);
        println!("{what}:\n{report}");
        assert!(report.passed(), "backend disagreement, {what}:\n{report}");
    }
}

/// The sampled selection mode through the same harness: the standard cases of the faithful
/// default (every workload kind at blocks 64 and 128, ragged, chunked alone and ragged,
/// awkward lengths, `max_budget`) rerun with `SelectionMode::Sampled`. Both backends compute
/// their own estimate (bf16 tensor cores vs f32 on the CPU, equal up to the last bits) and
/// cut it with the same rule in the same order, so a block may flip only where a row's
/// running mass lands within rounding of its target or two blocks' estimates within rounding
/// of each other straddle it (every query block has a cut here, about 1000 rows per case):
/// 16 blocks per case at most, where a wrong row or offset flips hundreds. The cut itself is
/// checked exactly on shared statistics by the crate's
/// `select::tests::device_selection_equals_core_on_the_same_statistics`.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn testkit_agreement_sampled_selection() {
    use flexprefill_core::SelectionMode;
    use flexprefill_testkit::agreement::{self, AgreementOptions};
    let opts = AgreementOptions {
        dtypes: vec![DType::BF16],
        max_selection_mismatch: 16,
        ..Default::default()
    };
    let cases: Vec<_> = agreement::standard_cases()
        .into_iter()
        .filter(|c| c.config.selection == SelectionMode::Faithful)
        .filter(|c| c.config.query_aware_cut == flexprefill_core::QueryAwareCut::Flattened)
        .map(|mut c| {
            c.config.selection = SelectionMode::Sampled;
            c.name.push_str("/sampled");
            c
        })
        .collect();
    assert!(cases.len() >= 15, "{} sampled cases", cases.len());
    if let Err(flexprefill_cuda::CudaError::NoDriver) = CudaBackend::new() {
        println!("no NVIDIA driver: skipped");
        return;
    }
    for (what, gpu) in [
        ("sparse path (threshold 0)", gpu().with_min_sparse_kv_len(0)),
        ("default threshold", gpu()),
    ] {
        let report = agreement::check_backend_with(&gpu, &cases, &opts);
        println!("{what}:\n{report}");
        assert!(report.passed(), "backend disagreement, {what}:\n{report}");
        let flipped: usize = report
            .cases
            .iter()
            .filter_map(|c| c.selection_mismatch)
            .sum();
        println!("{what}: {flipped} blocks differ from the CPU's over every case");
    }
}

/// The dense-walk decision of the FlexPrefill call (`choose_dense_walk`): a head whose
/// selection reaches the threshold is flagged and walks every causal block, so its output and
/// LSE are dense attention's bit for bit even where its index leaves blocks out; an unflagged
/// head walks its rows exactly as without flags. Every kernel family (every tile the bench
/// compares, and the automatic one), heads with 4 kinds of index side by side.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dense_walk_flags_dense_heads_and_walks_them_dense() {
    use flexprefill_cuda::attention::{
        choose_dense_walk, launch_attention_walk, DENSE_WALK_DENSITY,
    };
    let gpu = match CudaBackend::new() {
        Ok(g) => g,
        Err(flexprefill_cuda::CudaError::NoDriver) => {
            println!("no NVIDIA driver: skipped");
            return;
        }
        Err(e) => panic!("a CUDA device is needed: {e}"),
    };
    let stream = gpu.stream().clone();
    let mut rng = Rng::fresh("dense walk");
    let h = 4;
    for (d, bs) in [(128, 128), (64, 128), (128, 64), (64, 64)] {
        let shape = AttentionShape::new(h, 2, d).unwrap();
        let layout = [(1100, 1100), (300, 1000)];
        let (tq, tk) = (1400, 2100);
        let x = data(&mut rng, DType::BF16, shape, tq, tk, 1.0);
        let inp = input(&x, shape, &layout, true);
        // Head 0: every causal block. Head 1: all but block 1 of rows with 3 or more (density
        // about 0.9, above the threshold). Head 2: sink and diagonal. Head 3: random, p 0.3.
        let sparse = random_index(&mut rng, &inp.seqs, h, bs, 0.3, false);
        let mut all = Vec::new();
        for (si, s) in inp.seqs.iter().enumerate() {
            for head in 0..h {
                let rows: Vec<Vec<u32>> = (0..s.num_query_blocks(bs))
                    .map(|r| {
                        let n = s.causal_key_blocks(r, bs) as u32;
                        match head {
                            0 => (0..n).collect(),
                            1 => (0..n).filter(|&c| n < 3 || c != 1).collect(),
                            2 => {
                                let mut row = vec![0u32];
                                row.extend(s.diagonal_key_blocks(r, bs).map(|c| c as u32));
                                row
                            }
                            _ => sparse.row(si, head, r).to_vec(),
                        }
                    })
                    .collect();
                all.push(rows);
            }
        }
        let index = BlockIndex::from_rows(&inp.seqs, h, bs, all).unwrap();
        let want_flags: Vec<u8> = (0..inp.seqs.len())
            .flat_map(|si| (0..h).map(move |head| (si, head)))
            .map(|(si, head)| {
                let sel = index.selected_blocks(si, head) as f64;
                u8::from(sel >= DENSE_WALK_DENSITY * index.causal_blocks(si) as f64)
            })
            .collect();
        for (si, f) in want_flags.chunks(h).enumerate() {
            assert_eq!(f, [1, 1, 0, 0], "d{d} bs{bs} seq {si}: the index kinds");
        }
        let (q, k, v) = upload_bf16(&stream, &x);
        let seqs = DeviceSeqs::new(&stream, &inp.seqs).unwrap();
        let dindex = DeviceBlockIndex::upload(&stream, &index).unwrap();
        let args = AttentionArgs::new(&q, &k, &v, shape, &seqs);
        let flags =
            choose_dense_walk(gpu.device(), &stream, &seqs, &dindex, DENSE_WALK_DENSITY).unwrap();
        assert_eq!(
            stream.clone_dtoh(&flags).unwrap(),
            want_flags,
            "d{d} bs{bs}"
        );
        for (m, want) in [(1.01, 0u8), (0.0, 1u8)] {
            let f = choose_dense_walk(gpu.device(), &stream, &seqs, &dindex, m).unwrap();
            let got = stream.clone_dtoh(&f).unwrap();
            assert!(got.iter().all(|&x| x == want), "threshold {m}: {got:?}");
        }
        for t in device_tiles(&gpu, d, bs) {
            let run = |index: Option<&DeviceBlockIndex>, walk: Option<&_>| {
                let mut out = stream
                    .clone_htod(&vec![half::bf16::NAN; tq * h * d])
                    .unwrap();
                let mut lse = stream.clone_htod(&vec![f32::NAN; tq * h]).unwrap();
                launch_attention_walk(
                    gpu.device(),
                    &stream,
                    &args,
                    index,
                    walk,
                    Some(t),
                    &mut out,
                    Some(&mut lse),
                )
                .unwrap();
                let o: Vec<u16> = stream
                    .clone_dtoh(&out)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let l: Vec<u32> = stream
                    .clone_dtoh(&lse)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                (o, l)
            };
            let dense = run(None, None);
            let listed = run(Some(&dindex), None);
            let walked = run(Some(&dindex), Some(&flags));
            // (token, head) pairs of each head, through the sequences' flags.
            let mut differs = [false; 4];
            for (si, s) in inp.seqs.iter().enumerate() {
                for tok in s.q_start..s.q_start + s.q_len {
                    for head in 0..h {
                        let (o, l) = (
                            (tok * h + head) * d..(tok * h + head + 1) * d,
                            tok * h + head,
                        );
                        let want = if want_flags[si * h + head] == 1 {
                            &dense
                        } else {
                            &listed
                        };
                        assert_eq!(
                            (&walked.0[o.clone()], walked.1[l]),
                            (&want.0[o.clone()], want.1[l]),
                            "tile {t:?} d{d} bs{bs} seq {si} token {tok} head {head}"
                        );
                        differs[head] |=
                            listed.0[o.clone()] != dense.0[o] || listed.1[l] != dense.1[l];
                    }
                }
            }
            // The flag matters: head 1's index leaves blocks out; head 0's lists them all.
            assert_eq!(differs, [false, true, true, true], "tile {t:?} d{d} bs{bs}");
        }
    }
}
