//! The fast path: block-sparse causal attention in f32.
//!
//! One task per (sequence, query block, group of query heads that share a kv head and select the
//! same key blocks) — one CSR row, stacked over those heads — run by rayon, heaviest
//! rows first so the long rows at the bottom of the causal triangle do not end up alone on one
//! core at the end. Each task walks its key blocks in index order, [`Tiles::chunk_keys`] keys'
//! worth of blocks at a time (consecutive blocks read in place, scattered ones gathered), so
//! that every index turns into few, large GEMMs:
//!
//! ```text
//! S = Q_blk·K_chunkᵀ·(scale·log₂e)        matrixmultiply, S column-major
//! causal limit per row, online softmax    simd::online_softmax_tile_cm (m, l, rescale factors)
//! acc = acc·corr + P·V_chunk              matrixmultiply, beta = 1
//! out = acc / l,  lse = (m + log₂ l)·ln 2
//! ```
//!
//! GQA needs no K/V copy: query head `h` simply reads kv head `h / group` through the strides,
//! and the heads of a group with equal index rows are stacked into one query matrix. A
//! query row that sees no key inside its selected blocks (possible only when an index omits the
//! diagonal blocks of a chunk that starts mid-block) gets output 0 and LSE −∞, the neutral
//! element of the LSE merge.

use std::borrow::Cow;

use flexprefill_core::{AttentionInput, AttentionOutput, BlockIndex, HostTensor, TensorRef};
use rayon::prelude::*;

use crate::gemm::{sgemm, sgemm_strided, View};
use crate::simd::online_softmax_tile_cm;

/// Speed-only tiling knobs of the f32 kernel (they never change which keys are attended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    /// Most keys one `Q·Kᵀ` GEMM covers: selected blocks are taken this many keys' worth at a
    /// time. On the 2-core Zen 4 of docs/PERFORMANCE.md (dense, 4k tokens, d 128) 512 was at
    /// least as fast as 256 and 1024, within the noise of a shared machine.
    pub chunk_keys: usize,
    /// Query rows per task for [`crate::CpuBackend`]'s dense path (the sparse path uses the
    /// index's block size).
    pub dense_block: usize,
    /// Most query rows one task stacks: the query heads of a GQA group that select the same
    /// key blocks (all of them, for dense) share one pair of GEMMs per key chunk, up to this
    /// many rows in total.
    pub stack_rows: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        Self {
            chunk_keys: 512,
            dense_block: 128,
            stack_rows: 512,
        }
    }
}

/// q, k and v widened to f32 once (borrowed when they already are f32).
pub(crate) struct F32Qkv<'a> {
    pub q: Cow<'a, [f32]>,
    pub k: Cow<'a, [f32]>,
    pub v: Cow<'a, [f32]>,
}

pub(crate) fn widen(t: TensorRef<'_>) -> Cow<'_, [f32]> {
    match t {
        TensorRef::F32(x) => Cow::Borrowed(x),
        other => {
            // Convert in parallel: at 16k tokens this is tens of millions of elements.
            let mut out = vec![0.0f32; other.len()];
            out.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
                other.read_f32(i << 16, c);
            });
            Cow::Owned(out)
        }
    }
}

impl<'a> F32Qkv<'a> {
    pub fn new(x: &AttentionInput<'a>) -> Self {
        Self {
            q: widen(x.q),
            k: widen(x.k),
            v: widen(x.v),
        }
    }
}

/// One unit of work: query block `qblock` of `seq` for the query heads in `heads`, which all
/// read the same kv head and select the same key blocks (CSR row `csr_row` of the first one).
struct Task {
    seq: usize,
    heads: Vec<usize>,
    qblock: usize,
    csr_row: usize,
    cost: usize,
}

#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    corr: Vec<f32>,
    tmp: Vec<f32>,
    valid: Vec<u32>,
}

/// Groups the query heads of each (sequence, kv head, query block) whose index rows are equal
/// (always, for the dense index) into tasks of at most `stack_rows` stacked query rows.
fn build_tasks(x: &AttentionInput<'_>, index: &BlockIndex, stack_rows: usize) -> Vec<Task> {
    let h = x.shape.num_heads;
    let group = x.shape.group_size();
    let bs = index.block_size();
    let (starts, offsets, cols) = (
        index.head_row_start(),
        index.row_offsets(),
        index.col_indices(),
    );
    let row_of = |si: usize, head: usize, r: usize| starts[si * h + head] as usize + r;
    let cols_of = |row: usize| &cols[offsets[row] as usize..offsets[row + 1] as usize];
    let mut tasks = Vec::with_capacity(index.num_rows());
    for (si, s) in x.seqs.iter().enumerate() {
        for r in 0..s.num_query_blocks(bs) {
            let rows = bs.min(s.q_len - r * bs);
            let max_heads = (stack_rows / rows).max(1);
            for kvh in 0..x.shape.num_kv_heads {
                let mut buckets: Vec<Task> = Vec::new();
                for head in kvh * group..(kvh + 1) * group {
                    let csr_row = row_of(si, head, r);
                    let mine = cols_of(csr_row);
                    match buckets
                        .iter_mut()
                        .find(|t| t.heads.len() < max_heads && cols_of(t.csr_row) == mine)
                    {
                        Some(t) => {
                            t.heads.push(head);
                            t.cost += mine.len();
                        }
                        None => buckets.push(Task {
                            seq: si,
                            heads: vec![head],
                            qblock: r,
                            csr_row,
                            cost: mine.len(),
                        }),
                    }
                }
                tasks.extend(buckets);
            }
        }
    }
    // Heaviest first (stable, so the schedule is deterministic; results never depend on it).
    tasks.sort_by_key(|t| std::cmp::Reverse(t.cost));
    tasks
}

/// Runs the kernel over every row of `index` (already checked against `x`).
pub(crate) fn block_sparse_attention(
    x: &AttentionInput<'_>,
    index: &BlockIndex,
    tiles: Tiles,
) -> AttentionOutput {
    let qkv = F32Qkv::new(x);
    let (h, d) = (x.shape.num_heads, x.shape.head_dim);
    let bs = index.block_size();
    let tasks = build_tasks(x, index, tiles.stack_rows);

    let scale_log2 = x.scale() * std::f32::consts::LOG2_E;
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, t| {
            run_task(x, &qkv, index, t, scale_log2, tiles.chunk_keys, scratch)
        })
        .collect();

    let total_q = x.total_q();
    let mut out = vec![0.0f32; total_q * h * d];
    let mut lse = vec![0.0f32; total_q * h];
    for (t, (o, l)) in tasks.iter().zip(results) {
        let tok0 = x.seqs[t.seq].q_start + t.qblock * bs;
        let rows = l.len() / t.heads.len();
        for (g, &head) in t.heads.iter().enumerate() {
            for i in 0..rows {
                let (src, at) = (g * rows + i, (tok0 + i) * h + head);
                out[at * d..(at + 1) * d].copy_from_slice(&o[src * d..(src + 1) * d]);
                lse[at] = l[src];
            }
        }
    }
    AttentionOutput {
        out: HostTensor::from_f32(out, x.dtype()),
        lse: x.return_lse.then_some(lse),
    }
}

/// One task: returns the normalised output rows `[heads·rows, d]` (head-major) and their
/// natural-log LSE.
///
/// The query rows of the task's heads are stacked into one `[heads·rows, d]` matrix, so each
/// key chunk is packed by matrixmultiply once for all of them: with 128-row blocks the packing
/// of K and V otherwise costs about a third of the GEMM time (measured with perf on the 2-core
/// Zen 4), and stacking a GQA group of 4 cuts it by 4.
fn run_task(
    x: &AttentionInput<'_>,
    qkv: &F32Qkv<'_>,
    index: &BlockIndex,
    t: &Task,
    scale_log2: f32,
    chunk_keys: usize,
    sc: &mut Scratch,
) -> (Vec<f32>, Vec<f32>) {
    let (hkv, d) = (x.shape.num_kv_heads, x.shape.head_dim);
    let kvh = x.shape.kv_head(t.heads[0]);
    let bs = index.block_size();
    let s = &x.seqs[t.seq];
    let q_row0 = t.qblock * bs;
    let rows = bs.min(s.q_len - q_row0);
    let srows = rows * t.heads.len();
    let pos0 = s.query_offset() + q_row0; // absolute position of the first row
    let cols = &index.col_indices()
        [index.row_offsets()[t.csr_row] as usize..index.row_offsets()[t.csr_row + 1] as usize];

    let Scratch {
        q: qbuf,
        s: s_buf,
        kbuf,
        vbuf,
        m,
        l,
        corr,
        tmp,
        valid,
    } = sc;
    // Stacked queries, column-major ([d, srows]) so that matrixmultiply packs them from
    // contiguous memory.
    qbuf.resize(srows * d, 0.0);
    for (g, &head) in t.heads.iter().enumerate() {
        for i in 0..rows {
            let at = x.q_offset(s.q_start + q_row0 + i, head);
            let row = g * rows + i;
            for (dd, &v) in qkv.q[at..at + d].iter().enumerate() {
                qbuf[dd * srows + row] = v;
            }
        }
    }
    let q_view = View::new(&qbuf[..srows * d], 1, srows);
    let kv_base = x.kv_offset(s.k_start, kvh);
    let k_all = &qkv.k[kv_base..];
    let v_all = &qkv.v[kv_base..];
    let kv_rs = hkv * d;

    let mut acc = vec![0.0f32; srows * d];
    m.clear();
    m.resize(srows, f32::NEG_INFINITY);
    l.clear();
    l.resize(srows, 0.0);
    corr.resize(srows, 1.0);
    tmp.resize(srows, 0.0);
    valid.resize(srows, 0);

    let per_chunk = (chunk_keys / bs).max(1);
    let block_keys = |c: u32| (((c as usize) + 1) * bs).min(s.kv_len) - c as usize * bs;
    // Balanced chunks (9 blocks at 4 per chunk → 3·3, not 4·4·1): a lone trailing block would
    // pay a whole GEMM call's fixed cost for a quarter of the work.
    let nchunks = cols.len().div_ceil(per_chunk);
    let per_chunk = cols.len().div_ceil(nchunks.max(1)).max(1);
    for blocks in cols.chunks(per_chunk) {
        // Consecutive blocks are read in place through the strides; scattered ones are gathered
        // into one contiguous key range first, so that one pair of GEMMs covers them all (the
        // copy costs what matrixmultiply's packing of the same blocks costs, and saves
        // re-packing Q once per block). Either way the keys stay in ascending position order,
        // so each row's visible keys remain a prefix of the chunk.
        let width: usize = blocks.iter().map(|&c| block_keys(c)).sum();
        let consecutive = blocks.windows(2).all(|w| w[1] == w[0] + 1);
        let (k_view, v_view) = if consecutive {
            let k0 = blocks[0] as usize * bs;
            (
                View::new(&k_all[k0 * kv_rs..], kv_rs, 1),
                View::new(&v_all[k0 * kv_rs..], kv_rs, 1),
            )
        } else {
            kbuf.clear();
            vbuf.clear();
            for &c in blocks {
                for j in c as usize * bs..c as usize * bs + block_keys(c) {
                    kbuf.extend_from_slice(&k_all[j * kv_rs..j * kv_rs + d]);
                    vbuf.extend_from_slice(&v_all[j * kv_rs..j * kv_rs + d]);
                }
            }
            (View::new(kbuf, d, 1), View::new(vbuf, d, 1))
        };

        // S is column-major ([width, srows]); see `online_softmax_tile_cm` for why.
        s_buf.resize(srows * width, 0.0);
        let st = &mut s_buf[..srows * width];
        sgemm_strided(
            srows,
            d,
            width,
            scale_log2,
            q_view,
            k_view.t(),
            0.0,
            st,
            1,
            srows,
        );

        // Visible keys per row (the same for every stacked head).
        for (r, v) in valid[..rows].iter_mut().enumerate() {
            let p = pos0 + r;
            let mut seen = 0;
            for &c in blocks {
                let k0 = c as usize * bs;
                if p < k0 {
                    break;
                }
                seen += (p - k0 + 1).min(block_keys(c));
            }
            *v = seen as u32;
        }
        for g in 1..t.heads.len() {
            valid.copy_within(0..rows, g * rows);
        }
        online_softmax_tile_cm(st, width, valid, m, l, corr, tmp);
        for (arow, &c) in acc.chunks_exact_mut(d).zip(corr.iter()) {
            if c != 1.0 {
                arow.iter_mut().for_each(|a| *a *= c);
            }
        }
        sgemm(
            srows,
            width,
            d,
            1.0,
            View::new(st, 1, srows),
            v_view,
            1.0,
            &mut acc,
            d,
        );
    }

    let mut lse = vec![0.0f32; srows];
    for (r, arow) in acc.chunks_exact_mut(d).enumerate() {
        let l = l[r];
        if l > 0.0 {
            let inv = 1.0 / l;
            arow.iter_mut().for_each(|a| *a *= inv);
            lse[r] = (m[r] + l.log2()) * std::f32::consts::LN_2;
        } else {
            arow.fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
    (acc, lse)
}
