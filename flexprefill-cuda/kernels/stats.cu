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
#define PPAD (KT + 1)        // f32 P tile pitch: row-wise reads conflict-free
#define MAXG 2               // row groups (R <= 256)

static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16");

// One sequence of the packed batch, as the statistics kernels see it (host: stats.rs SeqDesc).
struct SeqDesc {
    unsigned q_start, k_start, q_len, kv_len;
    unsigned rep;        // R = min(block_size, q_len)
    unsigned nkb, nqb;   // key / query blocks
    unsigned tok_off;    // Σ kv_len of earlier sequences (per-token outputs: × H)
    unsigned kb_off;     // Σ nkb of earlier sequences
    unsigned qb_off;     // Σ nqb of earlier sequences
    unsigned rep_off;    // Σ rep · nkb of earlier sequences (× H)
    unsigned split_off;  // Σ key splits of earlier sequences
    unsigned nsplit;     // key splits of this sequence
    unsigned pad0, pad1, pad2;
};

// The query rows a pass works on. Representative rows (probe = 0): the last `rep` queries of
// the chunk. Probe rows (probe = 1): core's `probe_queries`, at most 32 single queries spread
// over the chunk before the representative block, k-th at (2k+1)·m/(2p) with m = q_len - rep,
// p = min(32, ceil(m / bs)). Both bottom-right causal: row i sees keys 0..=pos(i).
#ifndef PROBE_QUERIES
#define PROBE_QUERIES 16  // the host passes core's selection::PROBE_QUERIES
#endif
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
FP_DEVICE long long row_pos(const SeqDesc& sd, int probe, int bs, unsigned i) {
    return (long long)(sd.kv_len - sd.q_len) + row_query(sd, probe, bs, i);
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

// Loads Q̂ (the last R queries of the chunk, head h) into shared, rows R..ng*ROWS zeroed.
// With round_q, Q̂ is pre-multiplied by `scale` and rounded to the input dtype (the original's
// Q̂s = bf16(Q̂/√D)).
FP_DEVICE void load_q_hat(elem_t* qs, const elem_t* __restrict__ q, const SeqDesc& sd,
                                           int h, int num_heads, int ng, int round_q, float scale,
                                           int probe, int bs) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    const unsigned nrow = row_count(sd, probe, bs);
    for (int c = threadIdx.x; c < ng * ROWS * CHUNKS; c += NTHREADS) {
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

// Scaled base-2 logit of one accumulator element.
FP_DEVICE float logit2(float acc, float scale_log2, int round_logits) {
    // round_logits: the original rounds the (pre-scaled) logits to bf16 before the f32 softmax.
    return round_logits ? round_bf16(acc) * scale_log2 : acc * scale_log2;
}

// Pass 1: per (sequence, head, key split) the running row max and sum of exp2 over the split.
// Grid (num_heads, total_splits); out row_ml[(split_global * H + h) * rp + i] = (m, l).
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
stats_pass1(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
            const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
            int num_heads, int num_kv_heads, int split_keys, int rp,
            float scale, float scale_log2, int round_q, int round_logits,
            int probe, int block_size, float2* __restrict__ row_ml) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int h = blockIdx.x;
    const uint2 wk = work[blockIdx.y];
    const SeqDesc sd = seqs[wk.x];
    const unsigned sp = wk.y;
    const int hk = h / (num_heads / num_kv_heads);
    const unsigned nrow = row_count(sd, probe, block_size);
    if (nrow == 0) return;  // a chunk with no probe rows
    const int ng = (nrow + ROWS - 1) / ROWS;
    elem_t* qs = (elem_t*)smem;
    elem_t* ks = qs + ng * ROWS * DPAD;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned J0 = sp * split_keys;
    const unsigned J1 = min(J0 + split_keys, sd.kv_len);

    load_q_hat(qs, q, sd, h, num_heads, ng, round_q, scale, probe, block_size);
    load_k_tile(ks, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();

    float m_run[MAXG][2], l_run[MAXG][2];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
        for (int r = 0; r < 2; ++r) { m_run[g][r] = (-F32_INF); l_run[g][r] = 0.f; }

    int buf = 0;
    for (unsigned j0 = J0; j0 < J1; j0 += KT, buf ^= 1) {
        if (j0 + KT < J1) {
            load_k_tile(ks + (buf ^ 1) * KT * DPAD, k, sd, j0 + KT, hk, num_kv_heads);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const elem_t* kt = ks + buf * KT * DPAD;
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            if (g >= ng) continue;
            float acc[KT / 8][4];
            if ((unsigned)(g * ROWS + warp * 16) < nrow) {
                qk_tile(acc, qs, kt, g, warp, lane);
            } else {
                // no valid row in this warp (probes: 16 rows at most; short chunks): skip the
                // tensor-core work, every probability below is masked to 0
#pragma unroll
                for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = g * ROWS + warp * 16 + (lane / 4) + 8 * r;
                const long long last_key = (unsigned)i < nrow ? row_pos(sd, probe, block_size, i) : -1;
                float x[KT / 8][2];
                float tmax = (-F32_INF);
#pragma unroll
                for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        long long j = (long long)j0 + nt * 8 + 2 * (lane % 4) + e;
                        bool valid = (unsigned)i < nrow && j <= last_key && j < sd.kv_len;
                        x[nt][e] = valid ? logit2(acc[nt][2 * r + e], scale_log2, round_logits) : (-F32_INF);
                        tmax = fmaxf(tmax, x[nt][e]);
                    }
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 2));
                const float m_new = fmaxf(m_run[g][r], tmax);
                if (m_new != (-F32_INF)) {
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) sum += exp2f(x[nt][e] - m_new);
                    l_run[g][r] = l_run[g][r] * exp2f(m_run[g][r] - m_new) + sum;
                    m_run[g][r] = m_new;
                }
            }
        }
        __syncthreads();  // the tile is overwritten by the next prefetch
    }
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
        if (g >= ng) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[g][r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int i = g * ROWS + warp * 16 + (lane / 4) + 8 * r;
            if (lane % 4 == 0 && i < rp)
                row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rp + i] = make_float2(m_run[g][r], l);
        }
    }
}

// Merges the per-split (max, sum) of every representative row, splits in ascending order:
// lse2[(seq * H + h) * rp + i] = log2 Σ_j exp2(logit2_ij). Grid (num_heads, num_seqs), 256 threads.
extern "C" __global__ void stats_merge(const SeqDesc* __restrict__ seqs, const float2* __restrict__ row_ml,
                                       int num_heads, int rp, float* __restrict__ lse2) {
    // One warp per row; lanes stride the splits, then fixed xor trees (deterministic).
    const int h = blockIdx.x, s = blockIdx.y;
    const SeqDesc sd = seqs[s];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    for (int i = warp; i < rp; i += nw) {
        float m = (-F32_INF);
        for (unsigned sp = lane; sp < sd.nsplit; sp += 32)
            m = fmaxf(m, row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rp + i].x);
        m = warp_max(m);
        float l = 0.f;
        if (m != (-F32_INF))
            for (unsigned sp = lane; sp < sd.nsplit; sp += 32) {
                float2 ml = row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rp + i];
                if (ml.x != (-F32_INF)) l += ml.y * exp2f(ml.x - m);
            }
        l = warp_sum(l);
        if (lane == 0) lse2[((size_t)s * num_heads + h) * rp + i] = (m == (-F32_INF)) ? F32_INF : m + log2f(l);
    }
}

// Pass 2: probabilities tile by tile; vertical (exclusive per split), rep_block_mass (whole
// blocks per split: split_keys is a multiple of the block size) and per-split slash partials
// slash_part[(split_global * H + h) * sl_stride + L], L = δ - δ_min(split).
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
stats_pass2(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
            const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
            int num_heads, int num_kv_heads, int split_keys, int rp, int block_size,
            float scale, float scale_log2, int round_q, int round_logits,
            const float* __restrict__ lse2, int sl_stride,
            float* __restrict__ vertical, float* __restrict__ rep_block_mass,
            float* __restrict__ slash_part, int probe) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int h = blockIdx.x;
    const uint2 wk = work[blockIdx.y];
    const SeqDesc sd = seqs[wk.x];
    const unsigned sp = wk.y;
    const int hk = h / (num_heads / num_kv_heads);
    // Probe rows (probe = 1) only need their block masses, written to rep_block_mass at the
    // probe layout (pad0 = Σ probes·nkb of earlier sequences); no lines.
    const unsigned nrow = row_count(sd, probe, block_size);
    if (nrow == 0) return;  // a chunk with no probe rows
    const int ng = (nrow + ROWS - 1) / ROWS;
    elem_t* qs = (elem_t*)smem;
    elem_t* ks = qs + ng * ROWS * DPAD;
    float* ps = (float*)(ks + 2 * KT * DPAD);
    float* wcol = ps + ROWS * PPAD;       // [NWARPS][KT] per-warp column sums
    float* slash_acc = wcol + NWARPS * KT; // sl_stride floats
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned J0 = sp * split_keys;
    const unsigned J1 = min(J0 + split_keys, sd.kv_len);
    const float inv_r = 1.f / (float)sd.rep;

    for (int i = threadIdx.x; i < sl_stride; i += NTHREADS) slash_acc[i] = 0.f;
    load_q_hat(qs, q, sd, h, num_heads, ng, round_q, scale, probe, block_size);
    load_k_tile(ks, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();

    float row_lse[MAXG][2];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = g * ROWS + warp * 16 + (lane / 4) + 8 * r;
            row_lse[g][r] = (i < rp && g < ng) ? lse2[((size_t)wk.x * num_heads + h) * rp + i] : F32_INF;
        }
    // Running block mass of the two rows this thread reduces (blocks >= KT span several tiles).
    float bm_run[MAXG][2];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) bm_run[g][0] = bm_run[g][1] = 0.f;

    float* vert_out = vertical + (size_t)sd.tok_off * num_heads + (size_t)h * sd.kv_len;
    float* rbm_out = probe ? rep_block_mass + (size_t)sd.pad0 * num_heads + (size_t)h * nrow * sd.nkb
                           : rep_block_mass + (size_t)sd.rep_off * num_heads + (size_t)h * sd.rep * sd.nkb;
    const int seg = block_size < KT ? block_size : KT;  // columns per block segment in a tile

    int buf = 0;
    for (unsigned j0 = J0; j0 < J1; j0 += KT, buf ^= 1) {
        if (j0 + KT < J1) {
            load_k_tile(ks + (buf ^ 1) * KT * DPAD, k, sd, j0 + KT, hk, num_kv_heads);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const elem_t* kt = ks + buf * KT * DPAD;
        float vsum = 0.f;  // column sum, threads < KT
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            if (g >= ng) continue;
            float acc[KT / 8][4];
            if ((unsigned)(g * ROWS + warp * 16) < nrow) {
                qk_tile(acc, qs, kt, g, warp, lane);
            } else {
                // no valid row in this warp (probes: 16 rows at most; short chunks): skip the
                // tensor-core work, every probability below is masked to 0
#pragma unroll
                for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
            }
            float pv[2][KT / 8][2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int ii = warp * 16 + (lane / 4) + 8 * r;
                const int i = g * ROWS + ii;
                const long long last_key = (unsigned)i < nrow ? row_pos(sd, probe, block_size, i) : -1;
                float segsum = 0.f;
#pragma unroll
                for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int jj = nt * 8 + 2 * (lane % 4) + e;
                        long long j = (long long)j0 + jj;
                        bool valid = (unsigned)i < nrow && j <= last_key && j < sd.kv_len;
                        float p = valid ? exp2f(logit2(acc[nt][2 * r + e], scale_log2, round_logits) - row_lse[g][r]) : 0.f;
                        ps[ii * PPAD + jj] = p;
                        pv[r][nt][e] = p;
                        segsum += p;
                    }
                    // End of a block segment inside the tile: reduce the quad, emit or carry.
                    if (((nt + 1) * 8) % seg == 0) {
                        float t = segsum;
                        t += __shfl_xor_sync(0xffffffff, t, 1);
                        t += __shfl_xor_sync(0xffffffff, t, 2);
                        segsum = 0.f;
                        const unsigned seg_first = j0 + (nt + 1) * 8 - seg;
                        if (seg_first < sd.kv_len) {
                            const unsigned c = seg_first / block_size;
                            const bool block_ends = ((nt + 1) * 8 == KT) ? ((j0 + KT) % block_size == 0 || j0 + KT >= sd.kv_len)
                                                                        : true;
                            if (block_size <= KT) {
                                if (lane % 4 == 0 && (unsigned)i < nrow) rbm_out[(size_t)i * sd.nkb + c] = t;
                            } else {
                                bm_run[g][r] += t;
                                if (block_ends) {
                                    if (lane % 4 == 0 && (unsigned)i < nrow) rbm_out[(size_t)i * sd.nkb + c] = bm_run[g][r];
                                    bm_run[g][r] = 0.f;
                                }
                            }
                        }
                    }
                }
            }
            // Column sums over the warp's 16 rows from the registers (fixed xor tree).
#pragma unroll
            for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float c = pv[0][nt][e] + pv[1][nt][e];
                    c += __shfl_xor_sync(0xffffffff, c, 4);
                    c += __shfl_xor_sync(0xffffffff, c, 8);
                    c += __shfl_xor_sync(0xffffffff, c, 16);
                    if (lane < 4) wcol[warp * KT + nt * 8 + 2 * lane + e] = c;
                }
            __syncthreads();
            const int t = threadIdx.x;
            if (probe) {
                // block masses only
            } else if (t < KT) {
                float s = 0.f;
                for (int w = 0; w < NWARPS; ++w) s += wcol[w * KT + t];
                vsum += s;
            } else if (t < KT + KT + ROWS - 1) {
                // Diagonal e = ii - jj of the tile (e in [-(KT-1), ROWS-1]).
                const int e = t - KT - (KT - 1);
                const int lo = e > 0 ? e : 0;
                const int hi = (KT - 1 + e) < (ROWS - 1) ? (KT - 1 + e) : (ROWS - 1);
                float s = 0.f;
                for (int ii = lo; ii <= hi; ++ii) s += ps[ii * PPAD + (ii - e)];
                const int L = (int)(J1 - 1 - j0) + g * ROWS + e;
                if (L >= 0 && L < sl_stride) slash_acc[L] += s;
            }
            __syncthreads();
        }
        if (!probe && threadIdx.x < KT && j0 + threadIdx.x < sd.kv_len) vert_out[j0 + threadIdx.x] = vsum * inv_r;
    }
    if (probe) return;
    float* out = slash_part + ((size_t)(sd.split_off + sp) * num_heads + h) * sl_stride;
    for (int i = threadIdx.x; i < sl_stride; i += NTHREADS) out[i] = slash_acc[i] * inv_r;
}

// Sums the (at most two) split partials of every slash entry, splits in ascending order.
// Grid (ceil(max_kv / 256), num_heads, num_seqs).
extern "C" __global__ void stats_slash_finalize(const SeqDesc* __restrict__ seqs, const float* __restrict__ slash_part,
                                                int num_heads, int split_keys, int sl_stride,
                                                float* __restrict__ slash) {
    const int h = blockIdx.y, s = blockIdx.z;
    const SeqDesc sd = seqs[s];
    const unsigned d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= sd.kv_len) return;
    // Keys at distance d from some representative row: [kv_len - R - d, kv_len - 1 - d].
    const long long jhi = (long long)sd.kv_len - 1 - d;
    const long long jlo = (long long)sd.kv_len - sd.rep - d;
    const unsigned sp_lo = jlo < 0 ? 0 : (unsigned)(jlo / split_keys);
    const unsigned sp_hi = (unsigned)(jhi / split_keys);
    float acc = 0.f;
    for (unsigned sp = sp_lo; sp <= sp_hi && sp < sd.nsplit; ++sp) {
        const unsigned J1 = min((sp + 1) * (unsigned)split_keys, sd.kv_len);
        const long long dmin = (long long)sd.kv_len - sd.rep - (J1 - 1);
        const long long L = (long long)d - dmin;
        if (L >= 0 && L < sl_stride)
            acc += slash_part[((size_t)(sd.split_off + sp) * num_heads + h) * sl_stride + L];
    }
    slash[(size_t)sd.tok_off * num_heads + (size_t)h * sd.kv_len + d] = acc;
}

// Mean of K over each key block, per kv head: k_pooled[((kb_off · Hkv) + hk · nkb + c) · D + d].
// Rows summed in order in f32, divided by the real row count. Grid (Σ nkb, num_kv_heads), D threads.
extern "C" __global__ void stats_pool_k(const elem_t* __restrict__ k, const SeqDesc* __restrict__ seqs,
                                        const unsigned* __restrict__ kb_seq, int num_kv_heads, int block_size,
                                        int emulate, float* __restrict__ k_pooled) {
    const unsigned gb = blockIdx.x;
    const int hk = blockIdx.y;
    const SeqDesc sd = seqs[kb_seq[gb]];
    const unsigned c = gb - sd.kb_off;
    const unsigned first = c * block_size;
    const unsigned last = min(first + block_size, sd.kv_len);
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float acc = 0.f;
#pragma unroll 8
        for (unsigned j = first; j < last; ++j)
            acc += to_f32(k[((size_t)(sd.k_start + j) * num_kv_heads + hk) * HEAD_DIM + d]);
        const float m = acc / (float)(last - first);
        k_pooled[(((size_t)sd.kb_off * num_kv_heads) + (size_t)hk * sd.nkb + c) * HEAD_DIM + d] =
            emulate ? round_bf16(m) : m;
    }
}

// Mean of q over each query block (blocks start at the chunk's first query), times `scale`:
// q_pooled[((qb_off · H) + h · nqb + r) · D + d]. Heads whose flag is 0 (not query-aware) are
// skipped when `qa_flag` is given. Grid (Σ nqb, num_heads), D threads.
extern "C" __global__ void stats_pool_q(const elem_t* __restrict__ q, const SeqDesc* __restrict__ seqs,
                                        const unsigned* __restrict__ qb_seq, int num_heads, int block_size,
                                        float scale, int emulate, const int* __restrict__ qa_flag,
                                        float* __restrict__ q_pooled) {
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    if (qa_flag != nullptr && qa_flag[s * num_heads + h] == 0) return;
    const unsigned r = gb - sd.qb_off;
    const unsigned first = r * block_size;
    const unsigned last = min(first + block_size, sd.q_len);
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float acc = 0.f;
#pragma unroll 8
        for (unsigned i = first; i < last; ++i)
            acc += to_f32(q[((size_t)(sd.q_start + i) * num_heads + h) * HEAD_DIM + d]);
        const unsigned count = last - first;
        float m;
        if (emulate) {
            // The original: bf16 mean over the zero-padded block, a partial block rescaled by
            // bs/count in bf16, then times 1/√D (`scale`) in bf16.
            m = round_bf16(acc * (1.f / (float)block_size));
            if (count < (unsigned)block_size) m = round_bf16(m * (float)block_size * (1.f / (float)count));
            m = round_bf16(m * scale);
        } else {
            m = acc / (float)count * scale;
        }
        q_pooled[(((size_t)sd.qb_off * num_heads) + (size_t)h * sd.nqb + r) * HEAD_DIM + d] = m;
    }
}

// Block reductions in a fixed tree order (deterministic). `red` holds NTHREADS/32 floats.
FP_DEVICE float block_max(float v, float* red) {
    v = warp_max(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
    return m;
}
FP_DEVICE float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += red[w];
    return s;
}

// The pooled estimate ā = softmax(q̄ · K̄ᵀ) over key blocks, no causal mask, with
// q̄ = mean of the representative rows of Q̂·e. Emulate: the original's bf16 rounding of Q̂s,
// q̄ and the logits. Grid (num_heads, num_seqs), 256 threads.
// estimate[(kb_off · H) + h · nkb + c].
extern "C" __global__ void __launch_bounds__(256)
stats_estimate(const elem_t* __restrict__ q, const SeqDesc* __restrict__ seqs, const float* __restrict__ k_pooled,
               int num_heads, int num_kv_heads, float scale, int emulate, float* __restrict__ estimate) {
    __shared__ float qbar[HEAD_DIM];
    __shared__ float red[32];
    const int h = blockIdx.x;
    const SeqDesc sd = seqs[blockIdx.y];
    const int hk = h / (num_heads / num_kv_heads);
    const unsigned first = sd.q_start + sd.q_len - sd.rep;
    const float inv_rep = 1.f / (float)sd.rep;
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float acc = 0.f;
        for (unsigned i = 0; i < sd.rep; ++i) {
            float x = to_f32(q[((size_t)(first + i) * num_heads + h) * HEAD_DIM + d]) * scale;
            acc += emulate ? round_bf16(x) : x;
        }
        acc *= inv_rep;
        qbar[d] = emulate ? round_bf16(acc) : acc;
    }
    __syncthreads();
    const float* kb = k_pooled + ((size_t)sd.kb_off * num_kv_heads + (size_t)hk * sd.nkb) * HEAD_DIM;
    float* out = estimate + (size_t)sd.kb_off * num_heads + (size_t)h * sd.nkb;
    float m = -F32_INF;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) {
        float dot = 0.f;
        for (int d = 0; d < HEAD_DIM; ++d) dot += qbar[d] * kb[(size_t)c * HEAD_DIM + d];
        if (emulate) dot = round_bf16(dot);
        out[c] = dot;
        m = fmaxf(m, dot);
    }
    m = block_max(m, red);
    float s = 0.f;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) {
        float e = expf(out[c] - m);
        out[c] = e;
        s += e;
    }
    s = block_sum(s, red);
    const float inv = 1.f / s;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) out[c] = out[c] * inv;
}
