//! Properties every backend must satisfy, as functions over any [`Backend`].
//!
//! Each property takes a backend and an input (and, where needed, an index or a config), runs
//! the backend, and checks its answer against an independent reference: the f64 oracles of
//! `flexprefill_cpu::oracle` (naive loops that share no code with any kernel), the
//! paper's error bound, or the backend's own answer on a transformed input. A violation is an
//! `Err(Violation)` naming the property and the first offending row; inside `proptest!` the
//! `?` operator turns it into a test failure (proptest converts any `std::error::Error`).
//!
//! | property | checks |
//! |---|---|
//! | [`dense_equals_oracle`] | `dense_attention` = f64 oracle (output rel. L2, LSE) |
//! | [`dense_index_equals_oracle`] | `sparse_attention` with every causal block = f64 oracle |
//! | [`sparse_equals_masked_oracle`] | `sparse_attention` on any index = f64 oracle on the index's token mask |
//! | [`appendix_a_bound`] | `|A − A_S| ≤ (1 − a_S)·Σ_j |v_j|` per row and output dim (paper, Appendix A) |
//! | [`causality`] | changing k/v after position `i` leaves output rows `≤ i` bit-identical |
//! | [`ragged_equals_one_by_one`] | a packed ragged batch = its sequences run alone (index and output) |
//! | [`lse_merge_equals_unchunked`] | two key parts merged by LSE = the whole; a chunk = the rows of the full prefill |
//! | [`forced_blocks_present`] | `select_index` gives a valid index with the forced blocks, matching its report |
//! | [`representative_mass_at_least_gamma`] | faithful mode: the representative rows' exact mass ≥ gamma |
//! | [`output_rows_finite`] | `flex_prefill` output (and LSE) finite everywhere |
//! | [`flex_prefill_is_select_then_sparse`] | `flex_prefill` = `sparse_attention(select_index)` |
//!
//! Tolerances ([`output_tolerance`], [`lse_tolerance`]) are those of the agreement harness:
//! relative L2 1e-5 for f32 (a few ulps of f32 accumulation over short rows), 5e-3 for f16 and
//! 1e-2 for bf16 (output rounding, 2^-11 and 2^-8 relative per element, plus kernels that round
//! the softmax weights to the input dtype before the P·V product, as flash-attention does).

use flexprefill_core::{
    check_index_matches, AttentionInput, AttentionOutput, Backend, BlockIndex, DType,
    FlexPrefillConfig, HostTensor, Pattern, SelectionMode,
};
use flexprefill_cpu::oracle::{self, OracleOutput};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::owned::OwnedInput;

/// A property that does not hold: which one, and the first evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Property name (the function's).
    pub property: &'static str,
    /// What was seen.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.property, self.message)
    }
}

impl std::error::Error for Violation {}

/// Result of a property.
pub type PropResult = Result<(), Violation>;

fn violation(property: &'static str, message: impl Into<String>) -> Violation {
    Violation {
        property,
        message: message.into(),
    }
}

/// Runs a backend call, turning its error into a violation of `property`.
fn call<T>(
    property: &'static str,
    what: &str,
    r: flexprefill_core::Result<T>,
) -> Result<T, Violation> {
    r.map_err(|e| violation(property, format!("{what} failed: {e}")))
}

fn ensure(property: &'static str, ok: bool, message: impl FnOnce() -> String) -> PropResult {
    if ok {
        Ok(())
    } else {
        Err(violation(property, message()))
    }
}

/// Relative L2 tolerance of an output in `dtype` against the f64 oracle on the same inputs.
pub fn output_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        DType::BF16 => 1e-2,
    }
}

/// LSE tolerance: `|lse − lse_oracle| ≤ tol · (1 + |lse_oracle|)`. The LSE is f32 whatever the
/// dtype, but the scores it sums come from a GEMM that may run in the input dtype's precision
/// on a device; f32: a few ulps of the largest score.
pub fn lse_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 5e-3,
    }
}

/// Unit error `u` of one computed output element relative to `max_j |v_j|` (used where a bound
/// is per element rather than relative L2): f32 accumulation over short rows, or one rounding
/// of the softmax weights and one of the output in a 16-bit dtype.
pub fn element_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2.0 * 2f64.powi(-11) + 1e-5,
        DType::BF16 => 2.0 * 2f64.powi(-8) + 1e-5,
    }
}

/// Number of non-finite elements of an output and its LSE. Backends under test poison their
/// output buffers (NaN) before the kernels run, so an element a kernel never wrote counts here.
pub fn unwritten(out: &AttentionOutput) -> usize {
    let o = out
        .out
        .to_f32_vec()
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    let l = out
        .lse
        .as_ref()
        .map_or(0, |l| l.iter().filter(|v| v.is_nan()).count());
    o + l
}

/// Compares an output (and its LSE, if both have one) with the oracle. `what` names the call.
pub fn compare_with_oracle(
    property: &'static str,
    what: &str,
    got: &AttentionOutput,
    want: &OracleOutput,
    dtype: DType,
) -> PropResult {
    let out = got.out.to_f32_vec();
    ensure(property, out.len() == want.out.len(), || {
        format!(
            "{what}: output has {} elements, expected {}",
            out.len(),
            want.out.len()
        )
    })?;
    let bad = unwritten(got);
    ensure(property, bad == 0, || {
        format!("{what}: {bad} non-finite output/LSE elements (unwritten or overflow)")
    })?;
    let err = oracle::relative_l2_error(&out, &want.out);
    let tol = output_tolerance(dtype);
    ensure(property, err <= tol, || {
        format!("{what}: relative L2 error {err:.3e} > {tol:.0e} ({dtype})")
    })?;
    if let Some(lse) = &got.lse {
        let (i, e) = lse_error(lse, &want.lse);
        let tol = lse_tolerance(dtype);
        ensure(property, e <= tol, || {
            format!(
                "{what}: LSE row {i} is {} vs oracle {} (scaled error {e:.3e} > {tol:.0e})",
                lse[i], want.lse[i]
            )
        })?;
    }
    Ok(())
}

/// Worst scaled LSE error `|a − b| / (1 + |b|)` and its row; −∞ matches −∞ only.
pub fn lse_error(got: &[f32], want: &[f64]) -> (usize, f64) {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let g = g as f64;
            if g == w {
                0.0
            } else if !g.is_finite() || !w.is_finite() {
                f64::INFINITY
            } else {
                (g - w).abs() / (1.0 + w.abs())
            }
        })
        .enumerate()
        .fold((0, 0.0), |a, (i, e)| if e > a.1 { (i, e) } else { a })
}

fn oracle_call<T>(property: &'static str, r: flexprefill_core::Result<T>) -> Result<T, Violation> {
    call(property, "the f64 oracle", r)
}

/// `dense_attention` equals the f64 oracle (output within [`output_tolerance`], LSE within
/// [`lse_tolerance`] when `x.return_lse`).
pub fn dense_equals_oracle<B: Backend + ?Sized>(b: &B, x: &AttentionInput<'_>) -> PropResult {
    const P: &str = "dense_equals_oracle";
    let got = call(P, "dense_attention", b.dense_attention(x))?;
    let want = oracle_call(P, oracle::dense_attention_f64(x))?;
    compare_with_oracle(P, "dense_attention", &got, &want, x.dtype())
}

/// With every causal block selected, `sparse_attention` equals the dense f64 oracle: the
/// block-sparse path computes exact attention when nothing is skipped.
pub fn dense_index_equals_oracle<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    block_size: usize,
) -> PropResult {
    const P: &str = "dense_index_equals_oracle";
    let index = call(
        P,
        "BlockIndex::dense",
        BlockIndex::dense(&x.seqs, x.shape.num_heads, block_size),
    )?;
    let got = call(P, "sparse_attention", b.sparse_attention(x, &index))?;
    let want = oracle_call(P, oracle::dense_attention_f64(x))?;
    compare_with_oracle(P, "sparse_attention(dense index)", &got, &want, x.dtype())
}

/// `sparse_attention` on any valid index equals the f64 oracle restricted to the index's token
/// mask (`masked_attention_f64`, which expands the index independently of any kernel).
pub fn sparse_equals_masked_oracle<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    index: &BlockIndex,
) -> PropResult {
    const P: &str = "sparse_equals_masked_oracle";
    let got = call(P, "sparse_attention", b.sparse_attention(x, index))?;
    let want = oracle_call(P, oracle::masked_attention_f64(x, index))?;
    compare_with_oracle(P, "sparse_attention", &got, &want, x.dtype())
}

/// Σ_j |v_j| and max_j |v_j| per (query row, head, output dim) over the row's causal keys, in
/// f64, `[total_q, H, D]` each.
fn abs_value_sums(x: &AttentionInput<'_>) -> (Vec<f64>, Vec<f64>) {
    let (h, hkv, d) = (x.shape.num_heads, x.shape.num_kv_heads, x.shape.head_dim);
    let total = x.total_q() * h * d;
    let (mut sums, mut maxs) = (vec![0.0f64; total], vec![0.0f64; total]);
    for s in &x.seqs {
        for g in 0..hkv {
            // running Σ|v| and max|v| over keys 0..=pos, recorded at each query position
            let (mut acc, mut mx) = (vec![0.0f64; d], vec![0.0f64; d]);
            for j in 0..s.kv_len {
                let off = x.kv_offset(s.k_start + j, g);
                for e in 0..d {
                    let a = (x.v.get_f32(off + e) as f64).abs();
                    acc[e] += a;
                    mx[e] = mx[e].max(a);
                }
                if j >= s.query_offset() {
                    let i = j - s.query_offset();
                    for head in g * (h / hkv)..(g + 1) * (h / hkv) {
                        let o = x.q_offset(s.q_start + i, head);
                        sums[o..o + d].copy_from_slice(&acc);
                        maxs[o..o + d].copy_from_slice(&mx);
                    }
                }
            }
        }
    }
    (sums, maxs)
}

/// The paper's Appendix A bound, per query row `i`, head and output dim `e`:
///
/// ```text
/// |A_e − A_S,e| ≤ (1 − a_S) · Σ_{j ≤ i} |v_{j,e}|  +  u · max_{j ≤ i} |v_{j,e}|
/// ```
///
/// `A` is the exact causal attention (f64 oracle), `A_S` the backend's `sparse_attention` over
/// `index`, `a_S` the exact share of row `i`'s attention inside the selected blocks
/// (`captured_mass`, f64). The slack `u·max|v|` ([`element_tolerance`]) covers the backend's
/// own rounding of `A_S` (a convex combination of the `v_j`, so its error scales with
/// `max|v_j|`). The bound is the paper's: `A − A_S = Σ_{j∉S} a_j v_j − (1/a_S − 1) Σ_{j∈S} a_j v_j`,
/// and `a_j ≤ 1 − a_S` off `S`, `Σ_{j∈S} a_j = a_S` on it.
pub fn appendix_a_bound<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    index: &BlockIndex,
) -> PropResult {
    const P: &str = "appendix_a_bound";
    let got = call(P, "sparse_attention", b.sparse_attention(x, index))?;
    let a_s = got.out.to_f32_vec();
    let full = oracle_call(P, oracle::dense_attention_f64(x))?;
    let mass = oracle_call(P, oracle::captured_mass(x, index))?;
    let (sums, maxs) = abs_value_sums(x);
    let (h, d) = (x.shape.num_heads, x.shape.head_dim);
    let u = element_tolerance(x.dtype());
    for (row, &m) in mass.iter().enumerate() {
        ensure(P, (0.0..=1.0 + 1e-9).contains(&m), || {
            format!(
                "captured mass {m} of row {} head {} outside [0, 1]",
                row / h,
                row % h
            )
        })?;
        for e in 0..d {
            let i = row * d + e;
            let err = (full.out[i] - a_s[i] as f64).abs();
            let bound = (1.0 - m).max(0.0) * sums[i] + u * maxs[i];
            ensure(P, err <= bound, || {
                format!(
                    "token {} head {} dim {e}: |A − A_S| = {err:.3e} > (1 − a_S)·Σ|v| + u·max|v| \
                     = (1 − {m:.6})·{:.4} + {u:.1e}·{:.4} = {bound:.3e}",
                    row / h,
                    row % h,
                    sums[i],
                    maxs[i]
                )
            })?;
        }
    }
    Ok(())
}

/// Causal attention reads no future key: replacing k and v of sequence `seq` at every key
/// position `> cut` (absolute, inside the sequence) leaves the output rows of queries at
/// positions `≤ cut` bit-identical, for `dense_attention` and for `sparse_attention` with a
/// fixed `index` (masked keys contribute exact zeros, so equality is exact). Rows of other
/// sequences must not change either.
///
/// `flex_prefill` as a whole is *not* causal in this sense, by design: the representative
/// queries are the last ones, so future keys change which blocks an early row gets.
pub fn causality<B: Backend + ?Sized>(
    b: &B,
    x: &OwnedInput,
    index: &BlockIndex,
    seq: usize,
    cut: usize,
    seed: u64,
) -> PropResult {
    const P: &str = "causality";
    let s = *x
        .seqs
        .get(seq)
        .ok_or_else(|| violation(P, format!("no sequence {seq}")))?;
    let mut y = x.clone();
    let mut k = y.k.to_f32_vec();
    let mut v = y.v.to_f32_vec();
    let kw = x.shape.num_kv_heads * x.shape.head_dim;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for j in cut + 1..s.kv_len {
        let o = (s.k_start + j) * kw;
        for e in o..o + kw {
            let (a, c): (f32, f32) = (
                StandardNormal.sample(&mut rng),
                StandardNormal.sample(&mut rng),
            );
            k[e] = 3.0 * a;
            v[e] = 10.0 * c;
        }
    }
    y.k = HostTensor::from_f32(k, x.dtype());
    y.v = HostTensor::from_f32(v, x.dtype());
    let (xa, ya) = (call(P, "input", x.input())?, call(P, "input", y.input())?);
    let rw = x.shape.num_heads * x.shape.head_dim;
    let keep = |si: usize, i: usize| si != seq || x.seqs[si].query_offset() + i <= cut;
    for (what, before, after) in [
        (
            "dense_attention",
            call(P, "dense_attention", b.dense_attention(&xa))?,
            call(P, "dense_attention", b.dense_attention(&ya))?,
        ),
        (
            "sparse_attention",
            call(P, "sparse_attention", b.sparse_attention(&xa, index))?,
            call(P, "sparse_attention", b.sparse_attention(&ya, index))?,
        ),
    ] {
        let (o1, o2) = (before.out.to_f32_vec(), after.out.to_f32_vec());
        for (si, sq) in x.seqs.iter().enumerate() {
            for i in 0..sq.q_len {
                if !keep(si, i) {
                    continue;
                }
                let r = (sq.q_start + i) * rw..(sq.q_start + i + 1) * rw;
                let same = o1[r.clone()]
                    .iter()
                    .zip(&o2[r])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                ensure(P, same, || {
                    format!(
                        "{what}: sequence {si} query {i} (position {}) changed when keys after \
                         position {cut} of sequence {seq} changed",
                        sq.query_offset() + i
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// A ragged packed batch gives, for every sequence, exactly what that sequence gives alone:
/// the same selected blocks (`select_index`, every head and query block) and the same output
/// (`flex_prefill` and `dense_attention`, relative L2 ≤ tolerance/10 of the dtype: the same
/// computation, only batched).
pub fn ragged_equals_one_by_one<B: Backend + ?Sized>(
    b: &B,
    x: &OwnedInput,
    cfg: &FlexPrefillConfig,
) -> PropResult {
    const P: &str = "ragged_equals_one_by_one";
    let xa = call(P, "input", x.input())?;
    let (index, _) = call(P, "select_index(batch)", b.select_index(&xa, cfg))?;
    let (out, _) = call(P, "flex_prefill(batch)", b.flex_prefill(&xa, cfg))?;
    let dense = call(P, "dense_attention(batch)", b.dense_attention(&xa))?;
    let (out, dense) = (out.out.to_f32_vec(), dense.out.to_f32_vec());
    let rw = x.shape.num_heads * x.shape.head_dim;
    let tol = output_tolerance(x.dtype()) / 10.0;
    for (si, s) in x.seqs.iter().enumerate() {
        let one = x.sequence(si);
        let oa = call(P, "input", one.input())?;
        let (idx1, _) = call(P, "select_index(one)", b.select_index(&oa, cfg))?;
        for h in 0..x.shape.num_heads {
            for r in 0..s.num_query_blocks(cfg.block_size) {
                ensure(P, index.row(si, h, r) == idx1.row(0, h, r), || {
                    format!(
                        "sequence {si} head {h} query block {r}: batch selects {:?}, alone {:?}",
                        index.row(si, h, r),
                        idx1.row(0, h, r)
                    )
                })?;
            }
        }
        let (o1, _) = call(P, "flex_prefill(one)", b.flex_prefill(&oa, cfg))?;
        let d1 = call(P, "dense_attention(one)", b.dense_attention(&oa))?;
        let rows = s.q_start * rw..(s.q_start + s.q_len) * rw;
        for (what, batch, alone) in [
            ("flex_prefill", &out[rows.clone()], o1.out.to_f32_vec()),
            ("dense_attention", &dense[rows.clone()], d1.out.to_f32_vec()),
        ] {
            let want: Vec<f64> = alone.iter().map(|&v| v as f64).collect();
            let err = oracle::relative_l2_error(batch, &want);
            ensure(P, err <= tol, || {
                format!("{what}: sequence {si} in the batch vs alone: relative L2 {err:.3e} > {tol:.0e}")
            })?;
        }
    }
    Ok(())
}

/// Merges two partial results over disjoint key sets of the same rows, in f64:
/// `lse = ln(e^a + e^b)`, `out = e^(a−lse)·out_a + e^(b−lse)·out_b`.
pub fn merge_by_lse(
    out_a: &[f32],
    lse_a: &[f32],
    out_b: &[f32],
    lse_b: &[f32],
    head_dim: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0f64; out_a.len()];
    let mut lse = vec![f64::NEG_INFINITY; lse_a.len()];
    for r in 0..lse_a.len() {
        let (a, b) = (lse_a[r] as f64, lse_b[r] as f64);
        let m = a.max(b);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let l = m + ((a - m).exp() + (b - m).exp()).ln();
        let (wa, wb) = ((a - l).exp(), (b - l).exp());
        for e in 0..head_dim {
            let i = r * head_dim + e;
            out[i] = wa * out_a[i] as f64 + wb * out_b[i] as f64;
        }
        lse[r] = l;
    }
    (out, lse)
}

/// Chunked prefill and the LSE merge, for sequence `seq` of a full-prefill input (`q_len ==
/// kv_len`), the chunk of queries `chunk_start..kv_len` and a key split at key block
/// `split_block` (`1 ≤ split_block`, `split_block · block_size ≤ chunk_start`):
///
/// 1. the chunk (queries `chunk_start..`, all keys, bottom-right causal) through
///    `dense_attention` gives the same rows (and LSE) as the full prefill;
/// 2. `sparse_attention` over key blocks `0..split_block` (the "prefix cache" part: every
///    chunk query sees all of it) and over blocks `split_block..` (the new part, causal), each
///    with its LSE, merged by [`merge_by_lse`], equal the dense f64 oracle of the chunk
///    (output and LSE).
///
/// Vacuous (Ok) when the sequence is too short for such a split.
pub fn lse_merge_equals_unchunked<B: Backend + ?Sized>(
    b: &B,
    x: &OwnedInput,
    seq: usize,
    chunk_start: usize,
    split_block: usize,
    block_size: usize,
) -> PropResult {
    const P: &str = "lse_merge_equals_unchunked";
    let one = x.sequence(seq).with_lse(true);
    let n = one.seqs[0].kv_len;
    if split_block == 0 || split_block * block_size > chunk_start || chunk_start >= n {
        return Ok(());
    }
    let dtype = x.dtype();
    let chunk = one
        .chunk(chunk_start, n)
        .ok_or_else(|| violation(P, "input is not a full prefill (q_len < kv_len)"))?;
    let (fa, ca) = (
        call(P, "input", one.input())?,
        call(P, "input", chunk.input())?,
    );
    // 1. chunk = rows of the full prefill
    let full = call(P, "dense_attention(full)", b.dense_attention(&fa))?;
    let part = call(P, "dense_attention(chunk)", b.dense_attention(&ca))?;
    let rw = x.shape.num_heads * x.shape.head_dim;
    let want: Vec<f64> = full.out.to_f32_vec()[chunk_start * rw..]
        .iter()
        .map(|&v| v as f64)
        .collect();
    let err = oracle::relative_l2_error(&part.out.to_f32_vec(), &want);
    let tol = output_tolerance(dtype);
    ensure(P, err <= tol, || {
        format!("chunk {chunk_start}..{n} vs the same rows of the full prefill: relative L2 {err:.3e} > {tol:.0e}")
    })?;
    if let (Some(pl), Some(fl)) = (&part.lse, &full.lse) {
        let want: Vec<f64> = fl[chunk_start * x.shape.num_heads..]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (i, e) = lse_error(pl, &want);
        ensure(P, e <= lse_tolerance(dtype), || {
            format!("chunk LSE row {i}: {} vs full prefill {} ", pl[i], want[i])
        })?;
    } else {
        return Err(violation(P, "dense_attention returned no LSE though asked"));
    }
    // 2. two key parts merged by their LSE = the chunk
    let s = ca.seqs[0];
    let h = x.shape.num_heads;
    let rows = |prefix: bool| -> Vec<Vec<Vec<u32>>> {
        let per_head: Vec<Vec<u32>> = (0..s.num_query_blocks(block_size))
            .map(|r| {
                let causal = s.causal_key_blocks(r, block_size) as u32;
                if prefix {
                    (0..split_block as u32).collect()
                } else {
                    (split_block as u32..causal).collect()
                }
            })
            .collect();
        vec![per_head; h]
    };
    let mut parts = Vec::new();
    for prefix in [true, false] {
        let idx = call(
            P,
            "BlockIndex::from_rows",
            BlockIndex::from_rows(&ca.seqs, h, block_size, rows(prefix)),
        )?;
        let o = call(P, "sparse_attention(part)", b.sparse_attention(&ca, &idx))?;
        let lse = o
            .lse
            .clone()
            .ok_or_else(|| violation(P, "sparse_attention returned no LSE though asked"))?;
        parts.push((o.out.to_f32_vec(), lse));
    }
    let d = x.shape.head_dim;
    let (out, lse) = merge_by_lse(&parts[0].0, &parts[0].1, &parts[1].0, &parts[1].1, d);
    let want = oracle_call(P, oracle::dense_attention_f64(&ca))?;
    let out32: Vec<f32> = out.iter().map(|&v| v as f32).collect();
    let err = oracle::relative_l2_error(&out32, &want.out);
    ensure(P, err <= tol, || {
        format!(
            "key blocks 0..{split_block} and {split_block}.. merged by LSE vs the oracle: relative L2 {err:.3e} > {tol:.0e}"
        )
    })?;
    let lse32: Vec<f32> = lse.iter().map(|&v| v as f32).collect();
    let (i, e) = lse_error(&lse32, &want.lse);
    ensure(P, e <= lse_tolerance(dtype), || {
        format!("merged LSE row {i}: {} vs oracle {}", lse[i], want.lse[i])
    })
}

/// `select_index` returns an index that fits the input, passes every structural check with
/// the config's forced blocks (sink column, diagonal block(s) of every row), and whose report
/// has one entry per (sequence, head) with the index's block counts.
pub fn forced_blocks_present<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> PropResult {
    const P: &str = "forced_blocks_present";
    let (index, report) = call(P, "select_index", b.select_index(x, cfg))?;
    call(P, "index vs input", check_index_matches(x, &index))?;
    ensure(P, index.block_size() == cfg.block_size, || {
        format!(
            "index block size {} != config {}",
            index.block_size(),
            cfg.block_size
        )
    })?;
    call(
        P,
        "BlockIndex::validate(cfg.forced)",
        index.validate(cfg.forced),
    )?;
    let h = x.shape.num_heads;
    ensure(P, report.heads.len() == x.seqs.len() * h, || {
        format!(
            "{} head reports for {} × {h} heads",
            report.heads.len(),
            x.seqs.len()
        )
    })?;
    for hr in &report.heads {
        let sel = index.selected_blocks(hr.seq, hr.head);
        ensure(
            P,
            hr.selected_blocks == sel && hr.causal_blocks == index.causal_blocks(hr.seq),
            || {
                format!(
                    "report of sequence {} head {}: {} of {} blocks, index has {sel} of {}",
                    hr.seq,
                    hr.head,
                    hr.selected_blocks,
                    hr.causal_blocks,
                    index.causal_blocks(hr.seq)
                )
            },
        )?;
    }
    Ok(())
}

/// Slack of the gamma promise: the selection reads the representative rows' block masses as
/// f32 (`HeadStatistics::rep_block_mass`), the check recomputes them exactly in f64.
pub const GAMMA_SLACK: f64 = 1e-4;

/// **Faithful mode only** (`SelectionMode::Faithful`, no `max_budget`): for every (sequence,
/// head) the representative queries (the last `min(block_size, q_len)` queries of the
/// sequence) keep at least `gamma` of their exact attention inside the selected blocks:
/// `captured_mass ≥ gamma − GAMMA_SLACK` on each of those rows. Checked on every head, whatever
/// its pattern (vertical-slash, query-aware, dense). The original mode does not keep this
/// promise (issue 6 measures how far it falls), and a `max_budget` cap may break it by design;
/// for those configs this returns a violation saying the precondition failed.
pub fn representative_mass_at_least_gamma<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> PropResult {
    const P: &str = "representative_mass_at_least_gamma";
    ensure(
        P,
        cfg.selection == SelectionMode::Faithful && cfg.max_budget.is_none(),
        || {
            format!(
            "precondition: holds for SelectionMode::Faithful without max_budget, got {:?} / {:?}",
            cfg.selection, cfg.max_budget
        )
        },
    )?;
    let (index, report) = call(P, "select_index", b.select_index(x, cfg))?;
    let mass = oracle_call(P, oracle::captured_mass(x, &index))?;
    let h = x.shape.num_heads;
    for hr in &report.heads {
        let s = x.seqs[hr.seq];
        let reps = cfg.block_size.min(s.q_len);
        for i in s.q_len - reps..s.q_len {
            let m = mass[(s.q_start + i) * h + hr.head];
            ensure(P, m >= cfg.gamma as f64 - GAMMA_SLACK, || {
                format!(
                    "sequence {} head {} ({}): representative query {i} (position {}) keeps \
                     {m:.6} < gamma {} of its attention; selected {} of {} blocks",
                    hr.seq,
                    hr.head,
                    hr.pattern,
                    s.query_offset() + i,
                    cfg.gamma,
                    hr.selected_blocks,
                    hr.causal_blocks
                )
            })?;
        }
    }
    Ok(())
}

/// `flex_prefill` writes a finite value to every output element (and LSE entry, when asked)
/// for finite inputs: every row keeps its diagonal, so no softmax is empty.
pub fn output_rows_finite<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> PropResult {
    const P: &str = "output_rows_finite";
    let (out, _) = call(P, "flex_prefill", b.flex_prefill(x, cfg))?;
    let o = out.out.to_f32_vec();
    let want = x.total_q() * x.shape.num_heads * x.shape.head_dim;
    ensure(P, o.len() == want, || {
        format!("output has {} elements, expected {want}", o.len())
    })?;
    if let Some(i) = o.iter().position(|v| !v.is_finite()) {
        let rw = x.shape.num_heads * x.shape.head_dim;
        return Err(violation(
            P,
            format!(
                "output token {} head {} dim {} is {}",
                i / rw,
                (i % rw) / x.shape.head_dim,
                i % x.shape.head_dim,
                o[i]
            ),
        ));
    }
    if x.return_lse {
        let lse = out.lse.ok_or_else(|| violation(P, "no LSE though asked"))?;
        ensure(P, lse.len() == x.total_q() * x.shape.num_heads, || {
            format!("LSE has {} entries", lse.len())
        })?;
        if let Some(i) = lse.iter().position(|v| !v.is_finite()) {
            return Err(violation(P, format!("LSE entry {i} is {}", lse[i])));
        }
    }
    Ok(())
}

/// `flex_prefill` is `sparse_attention` on the index `select_index` chooses (bit-identical
/// output): a backend that fuses the two steps must not change the result. Only meaningful for
/// a backend that overrides `flex_prefill`; with the provided method it holds by construction.
pub fn flex_prefill_is_select_then_sparse<B: Backend + ?Sized>(
    b: &B,
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> PropResult {
    const P: &str = "flex_prefill_is_select_then_sparse";
    let (fused, r1) = call(P, "flex_prefill", b.flex_prefill(x, cfg))?;
    let (index, r2) = call(P, "select_index", b.select_index(x, cfg))?;
    let split = call(P, "sparse_attention", b.sparse_attention(x, &index))?;
    let pat = |r: &flexprefill_core::SparsityReport| -> Vec<(Pattern, usize)> {
        r.heads
            .iter()
            .map(|h| (h.pattern, h.selected_blocks))
            .collect()
    };
    ensure(P, pat(&r1) == pat(&r2), || {
        "flex_prefill and select_index report different patterns or block counts".into()
    })?;
    ensure(P, fused.out == split.out && fused.lse == split.lse, || {
        let (a, b) = (fused.out.to_f32_vec(), split.out.to_f32_vec());
        let i = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x.to_bits() != y.to_bits())
            .unwrap_or(0);
        format!(
            "outputs differ first at element {i}: {} vs {}",
            a.get(i).copied().unwrap_or(f32::NAN),
            b.get(i).copied().unwrap_or(f32::NAN)
        )
    })
}
