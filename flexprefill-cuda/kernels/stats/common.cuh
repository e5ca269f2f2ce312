// Representative-attention statistics (FlexPrefill Algorithm 2 inputs), fused: the
// [H, bs, n] softmax of the representative queries is never materialised.
//
// For every (sequence, query head) the representative queries Q̂ are the last R = min(bs, q_len)
// queries of the chunk (positions pos_i = kv_len - R + i, bottom-right causal). With
// A = softmax(Q̂ Kᵀ · scale) over the keys each row may see:
//   vertical[j]          = (1/R) Σ_i A[i, j]
//   slash[δ]             = (1/R) Σ_i A[i, pos_i - δ]          (δ = 0 is the diagonal)
//   rep_block_mass[i, c] = Σ_{j in key block c} A[i, j]
// Two passes over the keys (row max/sum, then accumulate), each Q̂Kᵀ tile on the tensor cores
// (mma.sync m16n8k16, f32 accumulate). Every reduction runs in a fixed order (no float
// atomics), so the statistics are bit-reproducible run to run and device to device.
//
// Compile-time parameters (NVRTC -D): FP_BF16 (1: bf16 inputs, 0: f16), HEAD_DIM (64/128/256).

// This header holds what the mma.sync passes (stats/passes.cu) and the wgmma passes
// (stats/passes_sm90.cu) share: tile loads, the probe rows, and the per-tile reductions and
// write-outs (prologues/epilogues) of both passes; the stage files follow it in the one
// `stats` program (src/stats.rs).

#include "flexprefill_common.cuh"

#define HEAD_DIM KEY_HEAD_DIM
#define F32_INF __int_as_float(0x7f800000)
typedef uint16_t elem_t;  // bf16 or f16 bits (Elem picks the conversion and the mma)

FP_DEVICE float to_f32(elem_t x) { return Elem::to_float(x); }
FP_DEVICE elem_t from_f32(float x) { return Elem::from_float(x); }
// Rounds an f32 to bf16 and back (the original rounds its estimation logits to bf16).
FP_DEVICE float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// Tile geometry. Rows: 8 warps x 16 rows = 128 representative rows per row group (bs = 256
// gives two groups). Keys: 64 per tile, double-buffered with cp.async.
#define ROWS 128
#define KT 64
#define NWARPS 8
#define NTHREADS (NWARPS * 32)
#define DPAD (HEAD_DIM + 8)  // +16 bytes per row: ldmatrix rows hit distinct banks
#define MAXG 2               // row groups (R <= 256)
#define PQ 16                // probe rows: one m16 tile, shared by the warps (8 keys each)
#define PP 24                // pitch (floats) of a warp's 16 x 16 probability quarter strip:
                             // float2 stores and diagonal reads are conflict-free
#define NDIAG 79             // diagonals of a warp's 16 x 64 strip: row - col in [-63, 15]
#define DPITCH 80

static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16");

// SeqDesc: kernels/seq_desc.cuh, compiled in front of this header.

// The query rows a pass works on. Representative rows (probe = 0): the last `rep` queries of
// the chunk. Probe rows (probe = 1): core's `probe_queries`, at most PROBE_QUERIES single
// queries spread over the chunk before the representative block, k-th at (2k+1)·m/(2p) with
// m = q_len - rep, p = min(PROBE_QUERIES, ceil(m / bs)). Both bottom-right causal: row i sees
// keys 0..=pos(i).
#ifndef PROBE_QUERIES
#define PROBE_QUERIES 16  // the host passes core's selection::PROBE_QUERIES
#endif
static_assert(PROBE_QUERIES <= PQ, "the probe rows fill one m16 tile");
FP_DEVICE unsigned num_probes(const SeqDesc& sd, int bs) {
    const unsigned m = sd.q_len - sd.rep;
    return min((unsigned)PROBE_QUERIES, (m + bs - 1) / bs);
}
FP_DEVICE unsigned row_count(const SeqDesc& sd, int probe, int bs) { return probe ? num_probes(sd, bs) : sd.rep; }
// Chunk-relative query index of row i.
FP_DEVICE unsigned row_query(const SeqDesc& sd, int probe, int bs, unsigned i) {
    if (!probe) return sd.q_len - sd.rep + i;
    const unsigned long long m = sd.q_len - sd.rep, p = num_probes(sd, bs);
    if (p == 0) return 0;
    return (unsigned)((2ull * i + 1ull) * m / (2ull * p));
}
// The last key row i sees (kv_len < 2^31: the host checks), -1 for a padding row.
FP_DEVICE int last_key(const SeqDesc& sd, int probe, int bs, unsigned i) {
    if (i >= row_count(sd, probe, bs)) return -1;
    return (int)(sd.kv_len - sd.q_len) + (int)row_query(sd, probe, bs, i);
}

// Which (sequence, head, key split) a pass-1 / pass-2 CTA reduces (grid (H, total splits)),
// and the sizes every pass opens with: kv head, row groups of the representative rows, probe
// rows, the split's keys [J0, J1).
struct SplitCta {
    int h, hk, ng;
    unsigned s, sp, nrow, np, J0, J1;
    SeqDesc sd;
};
FP_DEVICE SplitCta split_cta(const SeqDesc* seqs, const uint2* work, int num_heads, int num_kv_heads,
                             int split_keys, int probes, int block_size) {
    SplitCta c;
    c.h = blockIdx.x;
    const uint2 wk = work[blockIdx.y];
    c.s = wk.x;
    c.sd = seqs[wk.x];
    c.sp = wk.y;
    c.hk = c.h / (num_heads / num_kv_heads);
    c.nrow = c.sd.rep;
    c.ng = (c.nrow + ROWS - 1) / ROWS;
    c.np = probes ? num_probes(c.sd, block_size) : 0;
    c.J0 = c.sp * split_keys;
    c.J1 = min(c.J0 + split_keys, c.sd.kv_len);
    return c;
}
// Loads a KT x HEAD_DIM key tile (keys j0.., kv head hk) into shared, zero-filling keys >= kv_len.
FP_DEVICE void load_k_tile(elem_t* ks, const elem_t* __restrict__ k,
                                            const SeqDesc& sd, unsigned j0, int hk, int num_kv_heads) {
    constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < KT * CHUNKS; c += NTHREADS) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        unsigned j = j0 + r;
        bool valid = j < sd.kv_len;
        const elem_t* src =
            k + ((size_t)(sd.k_start + (valid ? j : 0)) * num_kv_heads + hk) * HEAD_DIM + col;
        cp_async_16(smem_u32(ks + r * DPAD + col), src, valid);
    }
}

// S = Q̂[rows 16w..16w+15 of group g] · K_tileᵀ for this warp: acc[nt][4] (nt = 8-key n-tile).
FP_DEVICE void qk_tile(float (&acc)[KT / 8][4], const elem_t* qs, const elem_t* ks,
                                        int g, int warp, int lane) {
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    const elem_t* qrow = qs + (g * ROWS + warp * 16 + (lane % 16)) * DPAD + (lane / 16) * 8;
    const int bkey = (lane & 7) + ((lane >> 4) << 3);
    const int bcol = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, smem_u32(qrow + kk * 16));
#pragma unroll
        for (int np = 0; np < KT / 16; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, smem_u32(ks + (np * 16 + bkey) * DPAD + kk * 16 + bcol));
            Elem::mma(acc[2 * np], a, b[0], b[1]);
            Elem::mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Two 8x8 b16 matrices; lanes 0-15 give the row addresses.
FP_DEVICE void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

// The probe rows' logits against this warp's 8 keys of the tile (keys 8w..8w+7): one m16n8
// C fragment, acc[2r + e] = S[probe lane/4 + 8r][key 8w + 2(lane%4) + e]. The probe rows ride
// along the representative passes: the key tile is loaded once for both.
FP_DEVICE void probe_tile(float (&acc)[4], const elem_t* qp, const elem_t* ks, int warp, int lane) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = 0.f;
    const elem_t* qrow = qp + (lane % 16) * DPAD + (lane / 16) * 8;
    const elem_t* krow = ks + (warp * 8 + (lane & 7)) * DPAD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        uint32_t a[4], b[2];
        ldmatrix_x4(a, smem_u32(qrow + kk * 16));
        ldmatrix_x2(b, smem_u32(krow + kk * 16));
        Elem::mma(acc, a, b[0], b[1]);
    }
}

// Loads `npad` query rows (representative or probe rows, head h) into shared, rows past the
// row count zeroed. With round_q, the rows are pre-multiplied by `scale` and rounded to the
// input dtype (the original's Q̂s = bf16(Q̂/√D)).
FP_DEVICE void load_rows(elem_t* qs, const elem_t* __restrict__ q, const SeqDesc& sd,
                                          int h, int num_heads, int npad, int round_q, float scale,
                                          int probe, int bs) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    const unsigned nrow = row_count(sd, probe, bs);
    for (int c = threadIdx.x; c < npad * CHUNKS; c += NTHREADS) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        bool valid = (unsigned)r < nrow;
        const unsigned tok = sd.q_start + row_query(sd, probe, bs, valid ? r : 0);
        const elem_t* src = q + ((size_t)tok * num_heads + h) * HEAD_DIM + col;
        if (round_q) {
            elem_t* dst = qs + r * DPAD + col;
#pragma unroll
            for (int e = 0; e < 8; ++e) dst[e] = valid ? from_f32(to_f32(src[e]) * scale) : from_f32(0.f);
        } else {
            cp_async_16(smem_u32(qs + r * DPAD + col), src, valid);
        }
    }
}

// Emulating the original (selection mode Original on bf16 inputs): Q̂ is pre-scaled and
// rounded to the input dtype, and the logits are rounded to bf16 before the f32 softmax.
// A compile-time switch (the host's kernel key), so neither path carries the other's code.
#ifndef STATS_EMULATE
#define STATS_EMULATE 0
#endif
// 1: the module carries the Hopper passes (stats/passes_sm90.cu) instead of stats_pass1 /
// stats_pass2; everything else is shared.
#ifndef STATS_WGMMA
#define STATS_WGMMA 0
#endif

// The logit of one accumulator element before its base-2 scale (applied by the FFMA that
// also subtracts the row max / lse: exp2(raw·s - m·s)).
FP_DEVICE float raw_logit(float acc) {
#if STATS_EMULATE
    return round_bf16(acc);
#else
    return acc;
#endif
}

// Whether every row of the warp's 16 sees every key of the tile (no mask needed): the rows
// are representative rows i0..i0+15 < nrow, row i sees keys 0..=kv_len - nrow + i.
FP_DEVICE bool tile_unmasked(const SeqDesc& sd, unsigned nrow, int i0, unsigned j0) {
    return (unsigned)(i0 + 15) < nrow && (int)j0 + KT - 1 <= (int)(sd.kv_len - nrow) + i0;
}

// Row-state layout of row_ml / lse2: `rs` rows per (split or sequence, head); representative
// rows 0..rp, then (when the faithful mode measures probes) the PQ probe rows rp..rp+PQ.
// Per-row-group state (ng <= MAXG = 2 groups) lives in two register sets swapped after each
// group, so the group loop is not unrolled (one copy of its body).

// Pass 1's probe rows for one key tile: the online (max, sum) of each probe row over this
// warp's 8 keys (`pa`, raw logits; keys past the row's last visible one masked). Shared by
// the mma.sync pass and both wgmma variants.
FP_DEVICE void pass1_probe_update(const float (&pa)[4], const int (&plast)[2], unsigned j0, int warp, int lane,
                                  float sl, float (&pm)[2], float (&pl)[2]) {
    const int q4 = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int lim = plast[r] - ((int)j0 + warp * 8 + 2 * q4);
        const float x0 = (0 <= lim) ? raw_logit(pa[2 * r]) : (-F32_INF);
        const float x1 = (1 <= lim) ? raw_logit(pa[2 * r + 1]) : (-F32_INF);
        const float m_new = fmaxf(pm[r], fmaxf(x0, x1));
        if (m_new != (-F32_INF)) {
            const float ms = m_new * sl;
            pl[r] = pl[r] * fast_exp2((pm[r] - m_new) * sl) +
                    (fast_exp2(fmaf(x0, sl, -ms)) + fast_exp2(fmaf(x1, sl, -ms)));
            pm[r] = m_new;
        }
    }
}

// The 16×KT logits of this warp's rows of row group g (qk_tile), or zeros when none of its rows
// exists (short chunks: skips the tensor-core work; the callers mask every entry of such rows).
FP_DEVICE void qk_tile_rows(float (&acc)[KT / 8][4], const elem_t* qs, const elem_t* kt, int g, int warp, int lane,
                            int i0, unsigned nrow) {
    if ((unsigned)i0 < nrow) {
        qk_tile(acc, qs, kt, g, warp, lane);
    } else {
#pragma unroll
        for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    }
}

// One warp's share of a pass-1 tile (16 representative rows × KT keys, the mma C-fragment
// layout, which the wgmma accumulators share): the causal mask, then the online row max and
// sum (m0/l0 of the row group in flight, swapped with m1/l1 between row groups). The mma.sync
// pass and both wgmma variants call it, so all three reduce in the same order.
FP_DEVICE void pass1_reduce_tile(float (&acc)[KT / 8][4], const SeqDesc& sd, unsigned nrow, int i0, unsigned j0,
                                 float sl, int lane, float (&m0)[2], float (&l0)[2], float (&m1)[2],
                                 float (&l1)[2], int ng) {
    const int q4 = lane % 4, g4 = lane / 4;
    if (tile_unmasked(sd, nrow, i0, j0)) {
#pragma unroll
        for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = raw_logit(acc[nt][e]);
    } else {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // column c = nt*8 + e of this thread is visible iff c <= lim
            const int i = i0 + g4 + 8 * r;
            const int lim = ((unsigned)i < nrow ? (int)(sd.kv_len - nrow) + i : -1) - (int)j0 - 2 * q4;
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    acc[nt][2 * r + e] = (nt * 8 + e <= lim) ? raw_logit(acc[nt][2 * r + e]) : (-F32_INF);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float tmax = (-F32_INF);
#pragma unroll
        for (int nt = 0; nt < KT / 8; ++nt) tmax = fmaxf(tmax, fmaxf(acc[nt][2 * r], acc[nt][2 * r + 1]));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 2));
        const float m_new = fmaxf(m0[r], tmax);
        if (m_new != (-F32_INF)) {
            const float ms = m_new * sl;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) sum += fast_exp2(fmaf(acc[nt][2 * r + e], sl, -ms));
            l0[r] = l0[r] * fast_exp2((m0[r] - m_new) * sl) + sum;
            m0[r] = m_new;
        }
    }
    if (ng == 2) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float t = m0[r]; m0[r] = m1[r]; m1[r] = t;
            t = l0[r]; l0[r] = l1[r]; l1[r] = t;
        }
    }
}

// The end of a pass-1 CTA: each representative row's (max, sum) of its split (the quad's
// partial sums in a fixed xor tree) and, with probes, the probe rows' (max, sum) merged over
// the 8 warps in order. Shared by the mma.sync pass and both wgmma variants. Contains a
// barrier when `probes` (uniform over the CTA).
FP_DEVICE void pass1_write_rows(const SeqDesc& sd, unsigned sp, int h, int num_heads, int rp, int rs, int ng,
                                float sl, int warp, int lane, const float (&m0)[2], const float (&l0)[2],
                                const float (&m1)[2], const float (&l1)[2], int probes, float (&pm)[2],
                                float (&pl)[2], float2* pml, float2* __restrict__ row_ml) {
    const int q4 = lane % 4, g4 = lane / 4;
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g >= ng) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = g == 0 ? l0[r] : l1[r];
            const float m = (g == 0 ? m0[r] : m1[r]) * sl;
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int i = g * ROWS + warp * 16 + g4 + 8 * r;
            if (q4 == 0 && i < rp)
                row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rs + i] = make_float2(m, l);
        }
    }
    if (probes) {
        // Probe rows: (m, l) over the quad's keys (fixed xor tree), then over the 8 warps in order.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            pm[r] *= sl;  // base-2 units from here on
#pragma unroll
            for (int o = 1; o <= 2; o <<= 1) {
                const float om = __shfl_xor_sync(0xffffffff, pm[r], o);
                const float ol = __shfl_xor_sync(0xffffffff, pl[r], o);
                const float nm = fmaxf(pm[r], om);
                pl[r] = (nm == (-F32_INF)) ? 0.f : pl[r] * fast_exp2(pm[r] - nm) + ol * fast_exp2(om - nm);
                pm[r] = nm;
            }
            if (q4 == 0) pml[warp * PQ + g4 + 8 * r] = make_float2(pm[r], pl[r]);
        }
        __syncthreads();
        if (threadIdx.x < PQ) {
            float m = (-F32_INF), l = 0.f;
            for (int w = 0; w < NWARPS; ++w) {
                const float2 v = pml[w * PQ + threadIdx.x];
                const float nm = fmaxf(m, v.x);
                l = (nm == (-F32_INF)) ? 0.f : l * fast_exp2(m - nm) + v.y * fast_exp2(v.x - nm);
                m = nm;
            }
            row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rs + rp + threadIdx.x] = make_float2(m, l);
        }
    }
}

// The last key each of this thread's two probe rows sees (rows lane/4 and lane/4 + 8 of the
// m16 probe tile; -1 past the probes or without them), and the last key any probe row sees
// (returned: the last probe sees most).
FP_DEVICE int probe_last_keys(int (&plast)[2], const SeqDesc& sd, unsigned np, int block_size, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) plast[r] = np ? last_key(sd, 1, block_size, (lane / 4) + 8 * r) : -1;
    return np ? last_key(sd, 1, block_size, np - 1) : -1;
}

// The per-thread state both pass-2 implementations open with: this thread's representative
// rows' lse (re-read per tile: L1 hits, fewer live registers), the probe rows' lse and last keys
// (pmax: the last probe sees most), and the CTA's slices of the vertical line and the
// representative block masses.
struct Pass2Rows {
    const float* lse_rows;
    float* vert_out;
    float* rbm_out;
    float plse[2];
    int plast[2];
    int pmax;
};
FP_DEVICE Pass2Rows pass2_rows(const SplitCta& cta, const float* __restrict__ lse2, float* vertical,
                               float* rep_block_mass, int num_heads, int rs, int rp, int warp, int lane,
                               int block_size) {
    const SeqDesc& sd = cta.sd;
    Pass2Rows pr;
    pr.lse_rows = lse2 + ((size_t)cta.s * num_heads + cta.h) * rs + warp * 16 + (lane / 4);
    pr.vert_out = vertical + (size_t)sd.tok_off * num_heads + (size_t)cta.h * sd.kv_len;
    pr.rbm_out = rep_block_mass + (size_t)sd.rep_off * num_heads + (size_t)cta.h * sd.rep * sd.nkb;
#pragma unroll
    for (int r = 0; r < 2; ++r)
        pr.plse[r] = cta.np ? lse2[((size_t)cta.s * num_heads + cta.h) * rs + rp + (lane / 4) + 8 * r] : F32_INF;
    pr.pmax = probe_last_keys(pr.plast, sd, cta.np, block_size, lane);
    return pr;
}

// Pass 2's accumulators of the split (shared memory): the slash entries and the probe block
// masses, zeroed before the first tile.
FP_DEVICE void pass2_clear(float* slash_acc, int sl_stride, float* pacc, int nbs) {
    for (int i = threadIdx.x; i < sl_stride; i += NTHREADS) slash_acc[i] = 0.f;
    for (int i = threadIdx.x; i < PQ * nbs; i += NTHREADS) pacc[i] = 0.f;
}

// Pass 2's outputs of the split, after the last tile's partials are combined (a barrier first:
// slash_acc and pacc are complete after it): the slash partials (mean over the representative
// rows) and the probe rows' block masses of the split's blocks.
FP_DEVICE void pass2_write_split(const SeqDesc& sd, unsigned sp, int h, int num_heads, int sl_stride, float inv_r,
                                 const float* slash_acc, float* __restrict__ slash_part, unsigned np, int nbs,
                                 unsigned J0, int block_size, const float* pacc,
                                 float* __restrict__ probe_block_mass) {
    __syncthreads();
    float* out = slash_part + ((size_t)(sd.split_off + sp) * num_heads + h) * sl_stride;
    for (int i = threadIdx.x; i < sl_stride; i += NTHREADS) out[i] = slash_acc[i] * inv_r;
    if (np) {
        float* pbm_out = probe_block_mass + (size_t)sd.probe_off * num_heads + (size_t)h * np * sd.nkb;
        for (int i = threadIdx.x; i < PQ * nbs; i += NTHREADS) {
            const unsigned row = i / nbs, c = J0 / block_size + i % nbs;
            if (row < np && c < sd.nkb) pbm_out[(size_t)row * sd.nkb + c] = pacc[i];
        }
    }
}

// The cross-warp step of pass 2 for one tile (keys j0..j0+KT), run by every thread of the CTA
// once all warps have written the tile's partials (set `wc` / `dpt` per row group, `pwt`):
// column sums (threads < KT, warps in order) into the vertical line, diagonal sums (threads
// >= KT, one slash entry each, warps then row groups in order) into the split's slash
// accumulator, probe block partials
// (threads < PQ · blocks per tile) into the split's probe block masses.
FP_DEVICE void pass2_combine(const SeqDesc& sd, int ng, unsigned j0, unsigned J0, unsigned J1,
                             int block_size, int nbs, int sl_stride, unsigned np, float inv_r,
                             const float* wc, const float* dpt, const float* pwt,
                             float* slash_acc, float* pacc, float* vert_out) {
    const int t = threadIdx.x;
    float vs = 0.f;
    if (t < KT) {
        for (int g = 0; g < ng; ++g) {
            const float* wcg = wc + g * NWARPS * KT;
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) s += wcg[w * KT + t];
            vs += s;
        }
    } else {
        // Slash entries: group g's diagonal e (e in [-(KT-1), ROWS-1]) lands on entry
        // L = J1 - 1 - j0 + g·ROWS + e, so the groups overlap on L. One thread owns each L and
        // adds the groups in order (warp w holds diagonal e at d' = e - 16w + 63 when that is
        // in [0, NDIAG)), so no two threads update one entry.
        const int ne = KT + ng * ROWS - 1;
        for (int i = t - KT; i < ne; i += (int)blockDim.x - KT) {
            const int E = i - (KT - 1);
            const int L = (int)(J1 - 1 - j0) + E;
            if (L < 0 || L >= sl_stride) continue;
            float a = slash_acc[L];
            for (int g = 0; g < ng; ++g) {
                const int e = E - g * ROWS;
                if (e < -(KT - 1) || e > ROWS - 1) continue;
                const float* dpg = dpt + g * NWARPS * DPITCH;
                float s = 0.f;
#pragma unroll
                for (int w = 0; w < NWARPS; ++w) {
                    const int d = e - 16 * w + 63;
                    if (d >= 0 && d < NDIAG) s += dpg[w * DPITCH + d];
                }
                a += s;
            }
            slash_acc[L] = a;
        }
    }
    if (t < KT && j0 + t < sd.kv_len) vert_out[j0 + t] = vs * inv_r;
    if (np) {
        // Probe block masses: the warps of each block in order, then the tiles in order.
        const int nbt = block_size >= KT ? 1 : KT / block_size;  // blocks in a tile
        const int wpb = NWARPS / nbt;                            // warps per block
        if (t < PQ * nbt) {
            const int row = t % PQ, b = t / PQ;
            float s = 0.f;
            for (int w = b * wpb; w < (b + 1) * wpb; ++w) s += pwt[w * PQ + row];
            pacc[row * nbs + (int)(j0 - J0) / block_size + b] += s;
        }
    }
}

// One warp's share of a pass-2 tile (16 representative rows × KT keys, the mma C-fragment
// layout, which the wgmma accumulators share): logits to probabilities in place, then the
// block masses (bm0: the running mass of blocks wider than a tile, swapped with bm1 between
// row groups), the diagonal sums through the warp's shared-memory strip and the column sums.
// The mma.sync pass and both wgmma variants call it, so all three reduce in the same order.
FP_DEVICE void pass2_reduce_tile(float (&acc)[KT / 8][4], const SeqDesc& sd, unsigned nrow, int i0, unsigned j0,
                                 const float* lse_rows, int g, float sl, int lane, int warp, float* strip, int seg,
                                 int block_size, float* rbm_out, float (&bm0)[2], float (&bm1)[2], float* dp,
                                 float* wc, int ng) {
    const int q4 = lane % 4, g4 = lane / 4;
    if (tile_unmasked(sd, nrow, i0, j0)) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float lse = lse_rows[g * ROWS + 8 * r];
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    acc[nt][2 * r + e] = fast_exp2(fmaf(raw_logit(acc[nt][2 * r + e]), sl, -lse));
        }
    } else {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + g4 + 8 * r;
            // rep row i sees keys 0..=kv_len - rep + i
            const int lim = ((unsigned)i < nrow ? (int)(sd.kv_len - nrow) + i : -1) - (int)j0 - 2 * q4;
            const float lse = (unsigned)i < nrow ? lse_rows[g * ROWS + 8 * r] : F32_INF;
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    acc[nt][2 * r + e] = (nt * 8 + e <= lim)
                        ? fast_exp2(fmaf(raw_logit(acc[nt][2 * r + e]), sl, -lse)) : 0.f;
        }
    }
    float cs[2][2];       // this thread's two rows summed, per column of the quarter
    float segsum[2] = {0.f, 0.f};
    float dacc = 0.f;     // diagonal sum carried between quarter strips
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
        float pv[2][2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = acc[nt][2 * r + e];
                pv[r][e] = p;
                segsum[r] += p;
            }
            *(float2*)&strip[(g4 + 8 * r) * PP + (nt & 1) * 8 + 2 * q4] = make_float2(pv[r][0], pv[r][1]);
        }
        cs[nt & 1][0] = pv[0][0] + pv[1][0];
        cs[nt & 1][1] = pv[0][1] + pv[1][1];
        // End of a block segment inside the tile: reduce the quad, emit or carry.
        if (((nt + 1) * 8) % seg == 0) {
            const unsigned seg_first = j0 + (nt + 1) * 8 - seg;
            const bool block_ends = ((nt + 1) * 8 == KT) ? ((j0 + KT) % block_size == 0 || j0 + KT >= sd.kv_len)
                                                        : true;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = i0 + g4 + 8 * r;
                float t = segsum[r];
                t += __shfl_xor_sync(0xffffffff, t, 1);
                t += __shfl_xor_sync(0xffffffff, t, 2);
                segsum[r] = 0.f;
                if (seg_first < sd.kv_len) {
                    const unsigned c = seg_first / block_size;
                    if (block_size <= KT) {
                        if (q4 == 0 && (unsigned)i < nrow) rbm_out[(size_t)i * sd.nkb + c] = t;
                    } else {
                        bm0[r] += t;
                        if (block_ends) {
                            if (q4 == 0 && (unsigned)i < nrow) rbm_out[(size_t)i * sd.nkb + c] = bm0[r];
                            bm0[r] = 0.f;
                        }
                    }
                }
            }
        }
        if (nt & 1) {
            // Quarter strip kq = nt/2 (columns 16kq..16kq+15) is in shared: lane x < 31
            // sums its diagonal row - col = x - 15 - 16kq, i.e. local index
            // d' = row - col + 63 = x + 48 - 16kq, rows in ascending order.
            const int kq = nt / 2;
            __syncwarp();
            float s = 0.f;
#pragma unroll 4
            for (int rr = 0; rr < 16; ++rr) {
                const int c = rr + 15 - lane;
                if (c >= 0 && c < 16) s += strip[rr * PP + c];
            }
            if (kq == 0) {
                dacc = s;
            } else {
                // lane x - 16 held diagonal d' = x + 48 - 16kq in the previous quarter
                const float carried = __shfl_up_sync(0xffffffff, dacc, 16);
                dacc = (lane >= 16 ? carried : 0.f) + s;
            }
            if (kq < KT / 16 - 1) {
                // diagonals the next quarter does not reach are complete
                if (lane >= 15 && lane < 31) dp[lane + 48 - 16 * kq] = dacc;
            } else if (lane < 31) {
                dp[lane] = dacc;
            }
            // Column sums of the quarter over the warp's 16 rows: halving xor butterfly
            // over the row lanes (4 -> 2 -> 1 values per lane, then a plain xor sum).
            float v[4] = {cs[0][0], cs[0][1], cs[1][0], cs[1][1]};
#pragma unroll
            for (int m = 16, hh = 2; m >= 8; m >>= 1, hh >>= 1) {
                const bool up = (lane & m) != 0;
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    if (kk < hh) {
                        const float send = up ? v[kk] : v[kk + hh];
                        const float keep = up ? v[kk + hh] : v[kk];
                        v[kk] = keep + __shfl_xor_sync(0xffffffff, send, m);
                    }
                }
            }
            v[0] += __shfl_xor_sync(0xffffffff, v[0], 4);
            if ((lane & 4) == 0) {
                // v index 2·bit16 + bit8: n-tile 2kq + bit16, element bit8
                const int col = (2 * kq + ((lane >> 4) & 1)) * 8 + 2 * q4 + ((lane >> 3) & 1);
                wc[(g * NWARPS + warp) * KT + col] = v[0];
            }
            __syncwarp();
        }
    }
    if (ng == 2) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float t = bm0[r];
            bm0[r] = bm1[r];
            bm1[r] = t;
        }
    }
}

