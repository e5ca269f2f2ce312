//! The exact references every fast path is tested against.
//!
//! [`dense_attention_f64`] and [`masked_attention_f64`] are deliberately naive: inputs widened
//! to f64, one query row at a time, scores, max, exponentials and the weighted sum of values all
//! in f64, no tiling, no online softmax. They share no code with the f32 kernels, so an
//! agreement between the two is evidence, not a tautology. [`masked_attention_f64`] expands a
//! [`BlockIndex`] to a token mask (as FlashInfer's block-sparse tests do), so it checks the
//! sparse kernels' reading of the index too.
//!
//! [`captured_mass`] is the measuring stick of the accuracy study: for each query row, the share
//! of its exact causal attention that falls inside the selected blocks. It streams over key
//! blocks (never an n×n matrix), so it runs at the lengths the benchmarks use.
//!
//! ```
//! use flexprefill_core::{AttentionInput, AttentionShape, BlockIndex};
//! use flexprefill_cpu::oracle;
//!
//! let shape = AttentionShape::new(2, 1, 4)?;
//! let q: Vec<f32> = (0..6 * 2 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
//! let kv: Vec<f32> = (0..6 * 4).map(|i| (i as f32 * 0.11).cos()).collect();
//! let x = AttentionInput::batched(&q, &kv, &kv, 1, 6, 6, shape)?;
//! let dense = oracle::dense_attention_f64(&x)?;
//! // With every block selected, the masked oracle is the dense one and the mass is 1.
//! let index = BlockIndex::dense(&x.seqs, 2, 16)?;
//! assert_eq!(oracle::masked_attention_f64(&x, &index)?, dense);
//! assert!(oracle::captured_mass(&x, &index)?.iter().all(|&m| (m - 1.0).abs() < 1e-12));
//! # Ok::<(), flexprefill_core::Error>(())
//! ```

use flexprefill_core::{
    check_index_matches, AttentionInput, BlockIndex, DType, Error, ForcedBlocks, HostTensor, Result,
};
use rayon::prelude::*;

use crate::gemm::{sgemm, View};
use crate::sparse::widen;

/// Output of the f64 oracles.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleOutput {
    /// `[total_q, num_heads, head_dim]`.
    pub out: Vec<f64>,
    /// Natural-log LSE of the scaled scores over the attended keys, `[total_q, num_heads]`;
    /// −∞ for a row that attends no key (its output is then 0).
    pub lse: Vec<f64>,
}

impl OracleOutput {
    /// The output rounded to f32.
    pub fn out_f32(&self) -> Vec<f32> {
        self.out.iter().map(|&v| v as f32).collect()
    }

    /// The LSE rounded to f32.
    pub fn lse_f32(&self) -> Vec<f32> {
        self.lse.iter().map(|&v| v as f32).collect()
    }

    /// As a backend would return it: output rounded to `dtype`, LSE to f32.
    pub fn to_attention_output(&self, dtype: DType) -> flexprefill_core::AttentionOutput {
        flexprefill_core::AttentionOutput {
            out: HostTensor::from_f32(self.out_f32(), dtype),
            lse: Some(self.lse_f32()),
        }
    }
}

/// `‖got − want‖₂ / ‖want‖₂` (0 when both are 0), the error measure of the tests.
pub fn relative_l2_error(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Exact causal attention (bottom-right aligned for chunks), GQA, ragged batches, in f64.
pub fn dense_attention_f64(x: &AttentionInput<'_>) -> Result<OracleOutput> {
    x.validate()?;
    Ok(attention_f64(x, None, |_, _, _| Vec::new()))
}

/// Exact attention restricted to the blocks of `index`, expanded to tokens, with the causal
/// mask on top: query at position `p` in query block `r` sees key `j` iff `j ≤ p` and key block
/// `j / block_size` is listed in row `r`. In f64.
pub fn masked_attention_f64(x: &AttentionInput<'_>, index: &BlockIndex) -> Result<OracleOutput> {
    x.validate()?;
    check_index(x, index)?;
    let bs = index.block_size();
    Ok(attention_f64(x, Some(bs), |seq, head, r| {
        let mut allowed = vec![false; x.seqs[seq].num_key_blocks(bs)];
        for &c in index.row(seq, head, r) {
            allowed[c as usize] = true;
        }
        allowed
    }))
}

/// Checks an index against the input before any kernel reads it: same sequences and heads, a
/// sane block size, and the structural invariants (monotone offsets, sorted unique causal
/// columns, no empty row; forced blocks are a selection policy, not required here).
pub(crate) fn check_index(x: &AttentionInput<'_>, index: &BlockIndex) -> Result<()> {
    check_index_matches(x, index)?;
    if index.block_size() == 0 {
        return Err(Error::Index("block_size is 0".into()));
    }
    index.validate(ForcedBlocks {
        sink: false,
        diagonal: false,
    })
}

/// The naive loop. With `block_size` set, `allowed(seq, head, qblock)` lists which key blocks
/// that query block may read; without it every causal key is read.
fn attention_f64<F>(
    x: &AttentionInput<'_>,
    block_size: Option<usize>,
    allowed_blocks: F,
) -> OracleOutput
where
    F: Fn(usize, usize, usize) -> Vec<bool> + Sync,
{
    let (h, d) = (x.shape.num_heads, x.shape.head_dim);
    let scale = x.scale() as f64;
    let to64 = |t: flexprefill_core::TensorRef<'_>| -> Vec<f64> {
        (0..t.len()).map(|i| t.get_f32(i) as f64).collect()
    };
    let (q, k, v) = (to64(x.q), to64(x.k), to64(x.v));

    let jobs: Vec<(usize, usize)> = (0..x.seqs.len())
        .flat_map(|s| (0..h).map(move |hd| (s, hd)))
        .collect();
    let per_head: Vec<(usize, usize, Vec<f64>, Vec<f64>)> = jobs
        .par_iter()
        .map(|&(si, head)| {
            let s = &x.seqs[si];
            let kvh = x.shape.kv_head(head);
            let mut out = vec![0.0f64; s.q_len * d];
            let mut lse = vec![f64::NEG_INFINITY; s.q_len];
            let mut scores = Vec::with_capacity(s.kv_len);
            let (mut allowed_r, mut allowed) = (usize::MAX, Vec::new());
            for i in 0..s.q_len {
                let pos = s.query_offset() + i;
                if let Some(bs) = block_size {
                    if i / bs != allowed_r {
                        allowed_r = i / bs;
                        allowed = allowed_blocks(si, head, allowed_r);
                    }
                }
                let qrow = &q[x.q_offset(s.q_start + i, head)..][..d];
                scores.clear();
                for j in 0..=pos {
                    if block_size.is_some_and(|bs| !allowed[j / bs]) {
                        continue;
                    }
                    let krow = &k[x.kv_offset(s.k_start + j, kvh)..][..d];
                    let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    scores.push((j, dot * scale));
                }
                if scores.is_empty() {
                    continue;
                }
                let m = scores
                    .iter()
                    .map(|&(_, s)| s)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0f64;
                let orow = &mut out[i * d..(i + 1) * d];
                for &(j, sc) in &scores {
                    let p = (sc - m).exp();
                    sum += p;
                    let vrow = &v[x.kv_offset(s.k_start + j, kvh)..][..d];
                    orow.iter_mut().zip(vrow).for_each(|(o, &vv)| *o += p * vv);
                }
                orow.iter_mut().for_each(|o| *o /= sum);
                lse[i] = m + sum.ln();
            }
            (si, head, out, lse)
        })
        .collect();

    let total_q = x.total_q();
    let mut out = vec![0.0f64; total_q * h * d];
    let mut lse = vec![f64::NEG_INFINITY; total_q * h];
    for (si, head, o, l) in per_head {
        let s = &x.seqs[si];
        for i in 0..s.q_len {
            let at = (s.q_start + i) * h + head;
            out[at * d..(at + 1) * d].copy_from_slice(&o[i * d..(i + 1) * d]);
            lse[at] = l[i];
        }
    }
    OracleOutput { out, lse }
}

/// Share of each query row's exact causal attention inside the blocks of `index`:
/// `exp(LSE over the selected keys − LSE over all causal keys)`, `[total_q, num_heads]`
/// (token-major like the LSE output); 0 for a row whose selected blocks hold no visible key.
///
/// Streams over (sequence, head, query block) tasks and key blocks with an online max, so
/// memory stays at one block tile per thread. Scores come from an f32 GEMM of the f32-widened
/// inputs (rounding error about `d·ε·|q||k|·scale`, ~10⁻⁶ on realistic logits); exponentials and
/// sums are f64, so a mass of 1 − 10⁻⁶ is resolved.
pub fn captured_mass(x: &AttentionInput<'_>, index: &BlockIndex) -> Result<Vec<f64>> {
    x.validate()?;
    check_index(x, index)?;
    let (h, hkv, d) = (x.shape.num_heads, x.shape.num_kv_heads, x.shape.head_dim);
    let bs = index.block_size();
    let (q, k) = (widen(x.q), widen(x.k));
    let scale = x.scale();

    let tasks: Vec<(usize, usize, usize)> = x
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..h).flat_map(move |hd| (0..s.num_query_blocks(bs)).map(move |r| (si, hd, r)))
        })
        .collect();
    let results: Vec<Vec<f64>> = tasks
        .par_iter()
        .map_init(Vec::new, |tile: &mut Vec<f32>, &(si, head, r)| {
            let s = &x.seqs[si];
            let kvh = x.shape.kv_head(head);
            let row0 = r * bs;
            let rows = bs.min(s.q_len - row0);
            let pos0 = s.query_offset() + row0;
            let selected = index.row(si, head, r);
            let q_view = View::new(&q[x.q_offset(s.q_start + row0, head)..], h * d, 1);
            let kv_rs = hkv * d;
            let k_all = &k[x.kv_offset(s.k_start, kvh)..];
            // Online (max, Σ over all causal keys, Σ over selected keys) per row, in f64.
            let mut m = vec![f64::NEG_INFINITY; rows];
            let mut all = vec![0.0f64; rows];
            let mut sel = vec![0.0f64; rows];
            let mut next_sel = 0;
            for c in 0..s.causal_key_blocks(r, bs) {
                let is_sel = selected.get(next_sel) == Some(&(c as u32));
                if is_sel {
                    next_sel += 1;
                }
                let k0 = c * bs;
                let width = bs.min(s.kv_len - k0);
                tile.resize(rows * width, 0.0);
                let kt = View::new(&k_all[k0 * kv_rs..], kv_rs, 1).t();
                sgemm(rows, d, width, scale, q_view, kt, 0.0, tile, width);
                for (i, srow) in tile.chunks_exact(width).take(rows).enumerate() {
                    let p = pos0 + i;
                    if p < k0 {
                        continue;
                    }
                    let live = &srow[..(p - k0 + 1).min(width)];
                    let tmax = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    if tmax > m[i] {
                        let c = (m[i] - tmax).exp();
                        all[i] *= c;
                        sel[i] *= c;
                        m[i] = tmax;
                    }
                    let part: f64 = live.iter().map(|&v| (v as f64 - m[i]).exp()).sum();
                    all[i] += part;
                    if is_sel {
                        sel[i] += part;
                    }
                }
            }
            sel.iter().zip(&all).map(|(s, a)| s / a).collect()
        })
        .collect();

    let mut mass = vec![0.0f64; x.total_q() * h];
    for (&(si, head, r), rows) in tasks.iter().zip(results) {
        let s = &x.seqs[si];
        for (i, v) in rows.into_iter().enumerate() {
            mass[(s.q_start + r * bs + i) * h + head] = v;
        }
    }
    Ok(mass)
}

/// Each query row's exact causal attention summed per key block, for one (sequence, head):
/// `[q_len, num_key_blocks]` row-major, each row summing to 1 (0 past the row's causal limit).
///
/// The table every density oracle and mass measure of the accuracy study is derived from
/// (`flexprefill_testkit::oracle`): with it, the captured mass of any block set is a sum, and
/// the fewest blocks holding gamma is a sort. Scores from an f32 GEMM as in [`captured_mass`];
/// max, exponentials and sums in f64. Memory: the table (`q_len · num_key_blocks` f64) plus one
/// `block_size × kv_len` f32 tile per thread.
pub fn block_mass_f64(
    x: &AttentionInput<'_>,
    seq: usize,
    head: usize,
    block_size: usize,
) -> Result<Vec<f64>> {
    x.validate()?;
    let Some(s) = x.seqs.get(seq).copied() else {
        return Err(Error::Shape(format!(
            "block_mass_f64: sequence {seq} of {}",
            x.seqs.len()
        )));
    };
    if head >= x.shape.num_heads || block_size == 0 {
        return Err(Error::Shape(format!(
            "block_mass_f64: head {head} of {}, block_size {block_size}",
            x.shape.num_heads
        )));
    }
    let (h, hkv, d) = (x.shape.num_heads, x.shape.num_kv_heads, x.shape.head_dim);
    let bs = block_size;
    let nkb = s.num_key_blocks(bs);
    let (q, k) = (widen(x.q), widen(x.k));
    let scale = x.scale();
    let kvh = x.shape.kv_head(head);
    let kv_rs = hkv * d;
    let k_all = &k[x.kv_offset(s.k_start, kvh)..];
    let blocks: Vec<Vec<f64>> = (0..s.num_query_blocks(bs))
        .into_par_iter()
        .map_init(Vec::new, |tile: &mut Vec<f32>, r| {
            let row0 = r * bs;
            let rows = bs.min(s.q_len - row0);
            let (pos0, last) = s.query_block_positions(r, bs);
            let width = last + 1;
            tile.resize(rows * width, 0.0);
            let q_view = View::new(&q[x.q_offset(s.q_start + row0, head)..], h * d, 1);
            let kt = View::new(k_all, kv_rs, 1).t();
            sgemm(rows, d, width, scale, q_view, kt, 0.0, tile, width);
            let mut out = vec![0.0f64; rows * nkb];
            for (i, srow) in tile.chunks_exact(width).take(rows).enumerate() {
                let live = &srow[..=pos0 + i];
                let m = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let o = &mut out[i * nkb..(i + 1) * nkb];
                for (c, blk) in live.chunks(bs).enumerate() {
                    o[c] = blk.iter().map(|&v| (v as f64 - m).exp()).sum();
                }
                let total: f64 = o.iter().sum();
                o.iter_mut().for_each(|v| *v /= total);
            }
            out
        })
        .collect();
    Ok(blocks.concat())
}
