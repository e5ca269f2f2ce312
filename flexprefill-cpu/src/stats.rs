//! [`HeadStatistics`]: what selection needs to know about each (sequence, head).
//!
//! Per (sequence, head), with `Q̂` the last `min(block_size, q_len)` queries of the chunk and `e`
//! the estimation scale (`1/√D` in [`SelectionMode::Original`], as the original ignores
//! `softmax_scale` there; the input's softmax scale in [`SelectionMode::Faithful`]):
//!
//! ```text
//! A      = softmax(Q̂·Kᵀ·e), bottom-right causal       one GEMM [num_rep × kv_len]
//! vertical[j] = mean_i A[i, j]      slash[δ] = mean_i A[i, pos_i − δ]
//! rep_block_mass[i, c] = Σ_{j ∈ block c} A[i, j]
//! probe_block_mass: the same for core's probe queries (faithful mode only)
//! K̄      = block means of K                           k_pooled
//! ā      = softmax(mean(Q̂·e)·K̄ᵀ), no causal mask      estimate
//! Q̄_r    = block means of the chunk's queries · e     q_pooled
//! ```
//!
//! In [`SelectionMode::Original`] with bf16 inputs the original's bf16 rounding points are
//! replayed (notes §3, §4, §6) so that the compatibility mode takes the original's decisions
//! near `tau` and near the gamma cut: `Q̂s = bf16(Q̂·(1/√D))`, logits `bf16(Q̂s·Kᵀ)` (f32
//! accumulation), `K̄ = bf16(f32 sum / count)`, `q̄ = bf16(mean Q̂s)`, estimate logits
//! `bf16(q̄·K̄ᵀ)`, and `Q̄_r = bf16(bf16(zero-padded mean)·bs/count / √D)` (the last, partial
//! block rescaled by the original's extra bf16 step). Softmaxes and line sums stay f32, as there.
//! The pooled-map logits `bf16(Q̄·K̄ᵀ)` belong to the pooled map, which core computes; the
//! statistics ask for them through `bf16_pooled_logits`.

use flexprefill_core::selection::{probe_queries, sampled_rows_of_block};
use flexprefill_core::{
    bf16, AttentionInput, DType, FlexPrefillConfig, HeadStatistics, Result, SelectionMode,
};
use rayon::prelude::*;

use crate::gemm::{sgemm, View};
use crate::simd::softmax_log2_row;
use crate::sparse::widen;

#[inline]
fn bf16r(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

pub(crate) fn head_statistics(
    x: &AttentionInput<'_>,
    cfg: &FlexPrefillConfig,
) -> Result<Vec<HeadStatistics>> {
    cfg.validate()?;
    x.validate()?;
    let original = cfg.selection == SelectionMode::Original;
    let emulate = original && x.dtype() == DType::BF16;
    let (h, hkv, d) = (x.shape.num_heads, x.shape.num_kv_heads, x.shape.head_dim);
    let bs = cfg.block_size;
    // torch divides a bf16 tensor by a Python float as a multiplication by the f32 reciprocal
    // (its CUDA `div` by a CPU scalar), so the emulation multiplies by `inv_sqrt_d` too.
    let inv_sqrt_d = 1.0 / ((d as f64).sqrt() as f32);
    let e = if original { inv_sqrt_d } else { x.scale() };
    let (q, k) = (widen(x.q), widen(x.k));
    let kv_rs = hkv * d;

    // K̄ per (sequence, kv head), shared by the query heads of a GQA group.
    let kv_jobs: Vec<(usize, usize)> = (0..x.seqs.len())
        .flat_map(|s| (0..hkv).map(move |g| (s, g)))
        .collect();
    let k_pooled: Vec<Vec<f32>> = kv_jobs
        .par_iter()
        .map(|&(si, g)| {
            let s = &x.seqs[si];
            let mut out = Vec::with_capacity(s.num_key_blocks(bs) * d);
            for c in 0..s.num_key_blocks(bs) {
                let (k0, k1) = (c * bs, ((c + 1) * bs).min(s.kv_len));
                let mut sum = vec![0.0f32; d];
                for j in k0..k1 {
                    let row = &k[x.kv_offset(s.k_start + j, g)..][..d];
                    sum.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
                }
                let n = (k1 - k0) as f32;
                out.extend(
                    sum.iter()
                        .map(|&v| if emulate { bf16r(v / n) } else { v / n }),
                );
            }
            out
        })
        .collect();

    let jobs: Vec<(usize, usize)> = (0..x.seqs.len())
        .flat_map(|s| (0..h).map(move |hd| (s, hd)))
        .collect();
    let stats = jobs
        .par_iter()
        .map(|&(si, head)| {
            let s = &x.seqs[si];
            let kvh = x.shape.kv_head(head);
            let kbar = &k_pooled[si * hkv + kvh];
            let (nqb, nkb) = (s.num_query_blocks(bs), s.num_key_blocks(bs));
            let nrep = bs.min(s.q_len);
            let rep_row0 = s.q_len - nrep;
            let first_pos = s.kv_len - nrep; // absolute position of representative query 0

            // Q̂s, the scaled representative queries.
            let mut qh = vec![0.0f32; nrep * d];
            for (i, row) in qh.chunks_exact_mut(d).enumerate() {
                let src = &q[x.q_offset(s.q_start + rep_row0 + i, head)..][..d];
                for (o, &v) in row.iter_mut().zip(src) {
                    *o = if emulate {
                        bf16r(v * inv_sqrt_d)
                    } else {
                        v * e
                    };
                }
            }

            // A = softmax(Q̂s·Kᵀ) with the causal limit, in place over the logits. The faithful
            // mode's probe queries (same scale, no emulation there) ride in the same GEMM as
            // extra rows below the representative ones: one pass over K instead of two.
            let n = s.kv_len;
            let k_all = &k[x.kv_offset(s.k_start, kvh)..];
            let k_t = View::new(k_all, kv_rs, 1).t();
            let mut positions: Vec<usize> = (first_pos..s.kv_len).collect();
            let probes = if cfg.selection == SelectionMode::Faithful {
                probe_queries(s, bs)
            } else {
                Vec::new()
            };
            let mut rows_q = qh.clone();
            for &qi in &probes {
                let src = &q[x.q_offset(s.q_start + qi, head)..][..d];
                rows_q.extend(src.iter().map(|&v| v * e));
                positions.push(s.query_offset() + qi);
            }
            let a = causal_softmax_rows(&rows_q, &positions, k_t, n, d, emulate);
            let (a, a_probe) = a.split_at(nrep * n);
            let mut vertical = vec![0.0f32; n];
            let mut slash = vec![0.0f32; n];
            let mut rep_block_mass = vec![0.0f32; nrep * nkb];
            for (i, row) in a.chunks_exact(n).enumerate() {
                let pos = first_pos + i;
                let live = &row[..=pos];
                vertical[..=pos]
                    .iter_mut()
                    .zip(live.iter())
                    .for_each(|(acc, &p)| *acc += p);
                slash[..=pos]
                    .iter_mut()
                    .zip(live.iter().rev())
                    .for_each(|(acc, &p)| *acc += p);
                block_sums_into(live, bs, &mut rep_block_mass[i * nkb..(i + 1) * nkb]);
            }
            // The probe queries' exact block mass (faithful mode only: the original ignores
            // it), with the same scale and causal limit as the representative rows.
            let mut probe_block_mass = vec![0.0f32; probes.len() * nkb];
            for ((row, out), &pi) in a_probe
                .chunks_exact(n)
                .zip(probe_block_mass.chunks_exact_mut(nkb))
                .zip(&positions[nrep..])
            {
                block_sums_into(&row[..=pi], bs, out);
            }
            let inv_rep = 1.0 / nrep as f32;
            vertical.iter_mut().for_each(|v| *v *= inv_rep);
            slash.iter_mut().for_each(|v| *v *= inv_rep);

            // ā = softmax(q̄·K̄ᵀ) over key blocks, no causal mask.
            let mut qbar = vec![0.0f32; d];
            for row in qh.chunks_exact(d) {
                qbar.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            }
            qbar.iter_mut().for_each(|v| {
                *v *= inv_rep;
                if emulate {
                    *v = bf16r(*v);
                }
            });
            let mut estimate: Vec<f32> = kbar
                .chunks_exact(d)
                .map(|kb| {
                    let dot: f32 = qbar.iter().zip(kb).map(|(a, b)| a * b).sum();
                    if emulate {
                        bf16r(dot)
                    } else {
                        dot
                    }
                })
                .collect();
            softmax_in_place(&mut estimate);

            // Q̄_r: block means of the chunk's queries, times the estimation scale.
            let mut q_pooled = Vec::with_capacity(nqb * d);
            for r in 0..nqb {
                let (r0, r1) = (r * bs, ((r + 1) * bs).min(s.q_len));
                let mut sum = vec![0.0f32; d];
                for i in r0..r1 {
                    let row = &q[x.q_offset(s.q_start + i, head)..][..d];
                    sum.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
                }
                let count = r1 - r0;
                q_pooled.extend(sum.iter().map(|&v| {
                    if emulate {
                        // The original: bf16 mean over the zero-padded block, the partial last
                        // block rescaled by bs/count in bf16 (×bs is exact), then /√D in bf16.
                        let mut m = bf16r(v * (1.0 / bs as f32));
                        if count < bs {
                            m = bf16r(m * bs as f32 * (1.0 / count as f32));
                        }
                        bf16r(m * inv_sqrt_d)
                    } else {
                        v / count as f32 * e
                    }
                }));
            }

            let sampled_block_mass = if cfg.selection == SelectionMode::Sampled {
                sampled_block_mass(&q, x, s, head, k_t, e, bs, d)
            } else {
                Vec::new()
            };

            let mut st = HeadStatistics::new(
                vertical,
                slash,
                estimate,
                q_pooled,
                kbar.clone(),
                rep_block_mass,
            );
            st.probe_block_mass = probe_block_mass;
            st.sampled_block_mass = sampled_block_mass;
            st.bf16_pooled_logits = emulate;
            st
        })
        .collect();
    Ok(stats)
}

/// The sampled mode's estimate (`HeadStatistics::sampled_block_mass`, `[nqb, nkb]`): the
/// sampled rows of a group of query blocks share one GEMM over the keys the group's last row
/// sees (about 256 rows per GEMM, so the logits stay a few MB at 64k); each row's block sums
/// (f32) are averaged per query block in f64, rows in order.
#[allow(clippy::too_many_arguments)]
fn sampled_block_mass(
    q: &[f32],
    x: &AttentionInput<'_>,
    s: &flexprefill_core::Sequence,
    head: usize,
    k_t: View<'_>,
    e: f32,
    bs: usize,
    d: usize,
) -> Vec<f32> {
    let (nqb, nkb) = (s.num_query_blocks(bs), s.num_key_blocks(bs));
    let per_group = (256 / flexprefill_core::selection::SAMPLED_ROWS).max(1);
    let mut out = vec![0.0f32; nqb * nkb];
    let mut sums = vec![0.0f32; nkb];
    for g0 in (0..nqb).step_by(per_group) {
        let g1 = (g0 + per_group).min(nqb);
        let mut rows_q = Vec::new();
        let mut positions = Vec::new();
        let mut owner = Vec::new();
        for r in g0..g1 {
            let first = r * bs;
            let rows = bs.min(s.q_len - first);
            for i in sampled_rows_of_block(rows) {
                let src = &q[x.q_offset(s.q_start + first + i, head)..][..d];
                rows_q.extend(src.iter().map(|&v| v * e));
                positions.push(s.query_offset() + first + i);
                owner.push(r);
            }
        }
        let n = positions.last().map_or(0, |&p| p + 1);
        let a = causal_softmax_rows(&rows_q, &positions, k_t, n, d, false);
        let mut acc = vec![0.0f64; nkb];
        let mut count = 0usize;
        for (i, row) in a.chunks_exact(n).enumerate() {
            block_sums_into(&row[..=positions[i]], bs, &mut sums);
            acc.iter_mut().zip(&sums).for_each(|(a, &v)| *a += v as f64);
            count += 1;
            let r = owner[i];
            if owner.get(i + 1) != Some(&r) {
                out[r * nkb..(r + 1) * nkb]
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(o, &v)| *o = (v / count as f64) as f32);
                acc.fill(0.0);
                count = 0;
            }
        }
    }
    out
}

/// `softmax(qs·Kᵀ)` of each row of `qs` (already scaled) over keys `0..=positions[i]`,
/// `[rows, n]` row-major, zeros past each row's position.
///
/// Without emulation the logits come out of the GEMM in log2 units (the multiplication folded
/// into alpha) for the vectorised exp2; with it they are rounded to bf16 in natural units
/// first and go through libm's exp, as torch's do.
fn causal_softmax_rows(
    qs: &[f32],
    positions: &[usize],
    k_t: View<'_>,
    n: usize,
    d: usize,
    emulate: bool,
) -> Vec<f32> {
    let rows = positions.len();
    let mut a = vec![0.0f32; rows * n];
    let alpha = if emulate {
        1.0
    } else {
        std::f32::consts::LOG2_E
    };
    sgemm(rows, d, n, alpha, View::new(qs, d, 1), k_t, 0.0, &mut a, n);
    for (row, &pos) in a.chunks_exact_mut(n).zip(positions) {
        let (live, dead) = row.split_at_mut(pos + 1);
        dead.fill(0.0);
        if emulate {
            live.iter_mut().for_each(|v| *v = bf16r(*v));
            softmax_in_place(live);
        } else {
            softmax_log2_row(live);
        }
    }
    a
}

/// `out[c] = Σ` of `row` over consecutive blocks of `bs` (the last one may be partial); blocks
/// past the end of `row` stay 0.
fn block_sums_into(row: &[f32], bs: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (o, blk) in out.iter_mut().zip(row.chunks(bs)) {
        *o = blk.iter().sum();
    }
}

fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}
