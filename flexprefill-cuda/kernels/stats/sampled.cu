// The sampled mode's estimate (SelectionMode::Sampled, core's selection/sampled.rs):
//   sampled_block_mass[r, c] = mean over the S = min(SAMPLED_ROWS, rows) sampled rows of query
//   block r of Σ_{j in key block c} softmax(q_i · Kᵀ · scale)[j], bottom-right causal.
// Part of the `stats` module: compiled after kernels/seq_desc.cuh and stats/common.cuh (tile
// geometry KT / DPAD, qk_tile, the element type).
//
// One CTA per (query block, kv head, slice of the GQA group): warp w holds the S sampled rows
// of query head (group slice + w) as one m16 tile, and the CTA streams the key tiles of the
// kv head once for all of them (cp.async, double-buffered), so the group's query heads share
// every K load. Two passes over the block's causal keys, as the representative rows: pass 1
// keeps each row's online (max, sum) of exp2, pass 2 recomputes the logits, takes
// p = exp2(x·s − m·s) · (1/l) (the CPU's softmax_log2_row: max, sum, one reciprocal) and sums
// them per key block (f32). The block's estimate is the mean of its S rows' block sums, f64,
// rows in order, rounded to f32 once: the CPU's arithmetic except for the order of the f32
// sums inside a row (tensor-core dot products, a quad tree instead of a sequential walk).
// Blocks past the block's last diagonal are written 0, as on the CPU.
//
// The same body with every row of the block taken (stats_oracle_block_mass, ALL = true) gives
// the oracle density's mean-row block mass (flexprefill_testkit::oracle): the block's rows in
// consecutive groups of 16 (one m16 tile per warp, as the sampled rows), each group's two
// passes as above, each group's rows summed in f64 and divided by the block's row count,
// the groups added in order in f32 into the output.

#define SP_ROWS 16  // core's SAMPLED_ROWS: the sampled rows fill one m16 tile
#ifndef SAMPLED_ROWS
#define SAMPLED_ROWS SP_ROWS
#endif
static_assert(SAMPLED_ROWS == SP_ROWS, "the sampled rows must fill exactly one m16 tile");

// The k-th sampled row of a query block of `rows` queries, relative to its first query
// (core's sampled_rows_of_block: ⌊(k+1)·rows / S⌋ − 1, the last row always sampled).
FP_DEVICE unsigned sampled_row(unsigned rows, unsigned s, unsigned k) { return (k + 1) * rows / s - 1; }

// One KT × HEAD_DIM key tile (keys j0.., kv head hk) into shared, keys past `nkeys` zeroed;
// every thread of the CTA takes part.
FP_DEVICE void sampled_load_k(elem_t* ks, const elem_t* __restrict__ k, const SeqDesc& sd, unsigned j0,
                              unsigned nkeys, int hk, int num_kv_heads) {
    constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < KT * CHUNKS; c += blockDim.x) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const unsigned j = j0 + r;
        const bool valid = j < nkeys;
        const elem_t* src = k + ((size_t)(sd.k_start + (valid ? j : 0)) * num_kv_heads + hk) * HEAD_DIM + col;
        cp_async_16(smem_u32(ks + r * DPAD + col), src, valid);
    }
}

// The warp's first S row values (row i's value in lane 4·(i % 8), register i / 8) summed in
// f64, rows in order; sampled_row_mean: that sum over S, as an f32 (core: the f64 sum of the
// rows' f32 block sums over the count).
FP_DEVICE double sampled_row_sum(const float (&t)[2], unsigned S) {
    double acc = 0.0;
    for (unsigned i = 0; i < S; ++i) {
        const float v = __shfl_sync(0xffffffffu, i < 8 ? t[0] : t[1], (int)(i % 8) * 4);
        acc += (double)v;
    }
    return acc;
}
FP_DEVICE float sampled_row_mean(const float (&t)[2], unsigned S) { return (float)(sampled_row_sum(t, S) / (double)S); }

// Query block `gb` of the batch as both kernels see it: its sequence, its rows, the S
// sampled ones, the position of its first query (`base`) and the last key any of its rows
// sees (`last`), the keys and key tiles that covers.
struct SampledBlock {
    SeqDesc sd;
    unsigned r, first, rows, S, nkeys, ntiles;
    int base, last;
};
FP_DEVICE SampledBlock sampled_block(const SeqDesc* __restrict__ seqs, const unsigned* __restrict__ qb_seq,
                                     unsigned gb, unsigned bs) {
    SampledBlock b;
    b.sd = seqs[qb_seq[gb]];
    b.r = gb - b.sd.qb_off;
    b.first = b.r * bs;
    b.rows = min(bs, b.sd.q_len - b.first);
    b.S = min((unsigned)SP_ROWS, b.rows);
    b.base = (int)(b.sd.kv_len - b.sd.q_len + b.first);
    b.last = b.base + (int)b.rows - 1;
    b.nkeys = (unsigned)b.last + 1;
    b.ntiles = (b.nkeys + KT - 1) / KT;
    return b;
}

// Tile row i's query, relative to the block's first: the i-th sampled row, or with ALL row
// i of the 16-row group `grp` (consecutive rows); and how many rows the tile holds.
template <bool ALL>
FP_DEVICE unsigned sampled_tile_row(const SampledBlock& b, unsigned grp, unsigned i) {
    return ALL ? grp * SP_ROWS + i : sampled_row(b.rows, b.S, i);
}
template <bool ALL>
FP_DEVICE unsigned sampled_tile_count(const SampledBlock& b, unsigned grp) {
    return ALL ? min((unsigned)SP_ROWS, b.rows - grp * SP_ROWS) : b.S;
}

// The tile rows (sampled_tile_row) of heads g0.. of kv head hk's group into shared (one
// 16-row tile per warp; rows past sampled_tile_count and heads past the group zeroed), every
// thread of the CTA taking part; and the last key of this thread's two rows (g4, g4 + 8), -1
// past the rows.
template <bool ALL>
FP_DEVICE void sampled_load_rows(elem_t* qs, const elem_t* __restrict__ q, const SampledBlock& b, int hk,
                                 int group, int g0, int num_heads, int (&lim_row)[2], unsigned grp = 0) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    const int nwarps = blockDim.x / 32;
    const unsigned n = sampled_tile_count<ALL>(b, grp);
    for (int c = threadIdx.x; c < nwarps * SP_ROWS * CHUNKS; c += blockDim.x) {
        const int w = c / (SP_ROWS * CHUNKS), i = (c / CHUNKS) % SP_ROWS, col = (c % CHUNKS) * 8;
        const bool valid = g0 + w < group && (unsigned)i < n;
        const unsigned tok = b.sd.q_start + b.first + (valid ? sampled_tile_row<ALL>(b, grp, i) : 0u);
        const int hh = hk * group + (valid ? g0 + w : 0);
        const elem_t* src = q + ((size_t)tok * num_heads + hh) * HEAD_DIM + col;
        cp_async_16(smem_u32(qs + (w * SP_ROWS + i) * DPAD + col), src, valid);
    }
    const unsigned g4 = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const unsigned i = g4 + 8 * rr;
        lim_row[rr] = i < n ? b.base + (int)sampled_tile_row<ALL>(b, grp, i) : -1;
    }
}

// The block's key tiles through the double buffer: `sampled_first_tile` issues tile 0 (with
// whatever copies are in flight, the sampled rows), `sampled_tile(t)` issues tile t + 1 into
// the other buffer, waits for tile t and returns it after a barrier; the caller's barrier
// after using tile t frees its buffer for tile t + 2.
FP_DEVICE void sampled_first_tile(elem_t* ks, const elem_t* __restrict__ k, const SampledBlock& b, int hk,
                                  int num_kv_heads) {
    sampled_load_k(ks, k, b.sd, 0, b.nkeys, hk, num_kv_heads);
    cp_async_commit();
}
FP_DEVICE const elem_t* sampled_tile(elem_t* ks, const elem_t* __restrict__ k, const SampledBlock& b, unsigned t,
                                     int hk, int num_kv_heads) {
    if (t + 1 < b.ntiles) {
        sampled_load_k(ks + ((t + 1) & 1) * KT * DPAD, k, b.sd, (t + 1) * KT, b.nkeys, hk, num_kv_heads);
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
    return ks + (t & 1) * KT * DPAD;
}

// Tile t through that double buffer (sampled_tile) and, for an active warp, the tile's logits
// of the warp's 16 rows in `acc`: every thread must meet sampled_tile's barrier, only an
// active warp has rows to multiply. Returns `active`.
FP_DEVICE bool sampled_qk(float (&acc)[KT / 8][4], elem_t* ks, const elem_t* __restrict__ k, const elem_t* qs,
                          const SampledBlock& b, unsigned t, int hk, int num_kv_heads, bool active, int warp,
                          int lane) {
    const elem_t* kt = sampled_tile(ks, k, b, t, hk, num_kv_heads);
    if (active) qk_tile(acc, qs, kt, 0, warp, lane);
    return active;
}

// Row rr's (of the thread's two) max over the tile's keys up to `lim` (−inf when none). With
// MASK the keys past `lim` are set to −inf in `acc` too, for a caller that sums the tile
// without testing `lim` again (the one-pass kernel); the two-pass kernel tests it per key.
template <bool MASK>
FP_DEVICE float sampled_tile_max(float (&acc)[KT / 8][4], int rr, int lim) {
    float tmax = -F32_INF;
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (MASK) {
                const float x = nt * 8 + e <= lim ? acc[nt][2 * rr + e] : -F32_INF;
                acc[nt][2 * rr + e] = x;
                tmax = fmaxf(tmax, x);
            } else if (nt * 8 + e <= lim) {
                tmax = fmaxf(tmax, acc[nt][2 * rr + e]);
            }
        }
    return tmax;
}

// After n-tile nt of the tile at j0: when a block segment ends there inside the block's keys,
// the quad's sums of the segment (segsum cleared); a block wider than a tile adds them to `bm`
// until it ends. Returns the key block that ended, its two rows' sums in `tsum`, or -1 (no
// segment end, past the keys, or a wide block still open). Warp-uniform.
FP_DEVICE int sampled_segment_end(float (&segsum)[2], float (&bm)[2], float (&tsum)[2], int nt, unsigned j0,
                                  unsigned bs, unsigned nkeys) {
    const int seg = bs < KT ? (int)bs : KT;
    if (((nt + 1) * 8) % seg != 0) return -1;
    const unsigned seg_first = j0 + (nt + 1) * 8 - seg;
    if (seg_first >= nkeys) return -1;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float x = segsum[rr];
        x += __shfl_xor_sync(0xffffffffu, x, 1);
        x += __shfl_xor_sync(0xffffffffu, x, 2);
        segsum[rr] = 0.f;
        tsum[rr] = x;
    }
    if ((int)bs > KT) {
        bm[0] += tsum[0];
        bm[1] += tsum[1];
        if ((j0 + KT) % bs != 0 && j0 + KT < nkeys) return -1;
        tsum[0] = bm[0];
        tsum[1] = bm[1];
        bm[0] = 0.f;
        bm[1] = 0.f;
    }
    return (int)(seg_first / bs);
}

// Head h's row of query block r in the output: [qk_off·H + (h·nqb + r)·nkb + c].
FP_DEVICE float* sampled_out_row(float* out, const SeqDesc& sd, int num_heads, int h, unsigned r) {
    return out + (size_t)sd.qk_off * num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
}

// The two-pass body of stats_sampled (ALL = false: the S sampled rows) and of
// stats_oracle_block_mass (ALL = true: every row, in groups of 16). Grid (Σ nqb, Hkv,
// ceil(group / heads_per_cta)), 32·heads_per_cta threads; dynamic smem
// (heads_per_cta·16 + 2·KT)·DPAD elements. Query blocks are taken from the last one of the batch
// down (the longest rows first, so the short ones fill the tail of the launch). `sl` = scale ·
// log2 e. out: [qk_off·H + (h·nqb + r)·nkb + c].
template <bool ALL>
FP_DEVICE void sampled_two_pass(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
                                const SeqDesc* __restrict__ seqs, const unsigned* __restrict__ qb_seq,
                                unsigned total_qb, int num_heads, int num_kv_heads, int heads_per_cta,
                                int block_size, float sl, float* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int nwarps = blockDim.x / 32;
    elem_t* qs = (elem_t*)smem_raw;             // [warp][16][DPAD]
    elem_t* ks = qs + nwarps * SP_ROWS * DPAD;  // [2][KT][DPAD]
    const unsigned bs = block_size;
    const SampledBlock b = sampled_block(seqs, qb_seq, total_qb - 1 - blockIdx.x, bs);
    const SeqDesc& sd = b.sd;
    const unsigned r = b.r, nkeys = b.nkeys, ntiles = b.ntiles;
    const int last = b.last;
    const int group = num_heads / num_kv_heads, hk = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q4 = lane % 4;
    const int g0 = blockIdx.z * heads_per_cta;  // first head of the group this CTA holds
    const bool active = g0 + warp < group;
    const int h = hk * group + g0 + warp;
    const unsigned ngrp = ALL ? (b.rows + SP_ROWS - 1) / SP_ROWS : 1;

    for (unsigned grp = 0; grp < ngrp; ++grp) {
        const unsigned S = sampled_tile_count<ALL>(b, grp);
        int lim_row[2];
        sampled_load_rows<ALL>(qs, q, b, hk, group, g0, num_heads, lim_row, grp);
        float m[2] = {-F32_INF, -F32_INF}, l[2] = {0.f, 0.f};  // pass 1: online max / sum (raw max)
        float ms[2] = {0.f, 0.f}, inv[2] = {0.f, 0.f};         // pass 2: max · sl and 1 / sum
        float bm[2] = {0.f, 0.f};                              // a block wider than a tile, so far
        float* orow = sampled_out_row(out, sd, num_heads, h, r);

        for (int pass = 0; pass < 2; ++pass) {
            sampled_first_tile(ks, k, b, hk, num_kv_heads);
            for (unsigned t = 0; t < ntiles; ++t) {
                float acc[KT / 8][4];
                if (sampled_qk(acc, ks, k, qs, b, t, hk, num_kv_heads, active, warp, lane)) {
                    const unsigned j0 = t * KT;
                    if (pass == 0) {
#pragma unroll
                        for (int rr = 0; rr < 2; ++rr) {
                            const int lim = lim_row[rr] - (int)j0 - 2 * q4;
                            const float m_new = fmaxf(m[rr], sampled_tile_max<false>(acc, rr, lim));
                            if (m_new != -F32_INF) {
                                const float mss = m_new * sl;
                                float sum = 0.f;
#pragma unroll
                                for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
                                    for (int e = 0; e < 2; ++e)
                                        if (nt * 8 + e <= lim) sum += fast_exp2(fmaf(acc[nt][2 * rr + e], sl, -mss));
                                l[rr] = l[rr] * fast_exp2((m[rr] - m_new) * sl) + sum;
                                m[rr] = m_new;
                            }
                        }
                    } else {
                        float segsum[2] = {0.f, 0.f}, tsum[2];
#pragma unroll
                        for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
                            for (int rr = 0; rr < 2; ++rr) {
                                const int lim = lim_row[rr] - (int)j0 - 2 * q4;
#pragma unroll
                                for (int e = 0; e < 2; ++e)
                                    if (nt * 8 + e <= lim)
                                        segsum[rr] += fast_exp2(fmaf(acc[nt][2 * rr + e], sl, -ms[rr])) * inv[rr];
                            }
                            const int c = sampled_segment_end(segsum, bm, tsum, nt, j0, bs, nkeys);
                            if (c >= 0) {
                                if (ALL) {
                                    // This group's share of the block's mean; lane 0 wrote the
                                    // earlier groups' share of the same entry itself.
                                    const float v = (float)(sampled_row_sum(tsum, S) / (double)b.rows);
                                    if (lane == 0) orow[c] = grp == 0 ? v : orow[c] + v;
                                } else {
                                    const float v = sampled_row_mean(tsum, S);
                                    if (lane == 0) orow[c] = v;
                                }
                            }
                        }
                    }
                }
                __syncthreads();  // the buffer is refilled by the next iteration's load
            }
            if (pass == 0 && active) {
                // Each row's (max, sum) over its quad (fixed xor tree: every lane of the quad gets
                // the same values), then max·sl and the reciprocal of the sum.
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
                    for (int o = 1; o <= 2; o <<= 1) {
                        const float om = __shfl_xor_sync(0xffffffffu, m[rr], o);
                        const float ol = __shfl_xor_sync(0xffffffffu, l[rr], o);
                        const float nm = fmaxf(m[rr], om);
                        l[rr] = nm == -F32_INF ? 0.f : l[rr] * fast_exp2((m[rr] - nm) * sl) + ol * fast_exp2((om - nm) * sl);
                        m[rr] = nm;
                    }
                    ms[rr] = m[rr] * sl;
                    inv[rr] = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
                }
            }
        }
    }
    if (active) {
        float* orow = sampled_out_row(out, sd, num_heads, h, r);
        for (unsigned c = (unsigned)last / bs + 1 + lane; c < sd.nkb; c += 32) orow[c] = 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(256)
stats_sampled(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const SeqDesc* __restrict__ seqs,
              const unsigned* __restrict__ qb_seq, unsigned total_qb, int num_heads, int num_kv_heads,
              int heads_per_cta, int block_size, float sl, float* __restrict__ out) {
    sampled_two_pass<false>(q, k, seqs, qb_seq, total_qb, num_heads, num_kv_heads, heads_per_cta, block_size, sl,
                            out);
}

// The oracle's mean-row block mass: stats_sampled's grid and arguments, every row of each
// query block (sampled_two_pass<true>); out[c] = (1/rows) Σ_rows Σ_{j in c} softmax(row)[j].
// One CTA per SM in the launch bounds: with the loop over row groups ptxas would otherwise cap
// it at 128 registers and spill (head_dim 64, 96, 256).
extern "C" __global__ void __launch_bounds__(256, 1)
stats_oracle_block_mass(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
                        const SeqDesc* __restrict__ seqs, const unsigned* __restrict__ qb_seq, unsigned total_qb,
                        int num_heads, int num_kv_heads, int heads_per_cta, int block_size, float sl,
                        float* __restrict__ out) {
    sampled_two_pass<true>(q, k, seqs, qb_seq, total_qb, num_heads, num_kv_heads, heads_per_cta, block_size, sl,
                           out);
}

// ---- one pass (opt-in: FLEXPREFILL_SAMPLED_ONEPASS=1) ----------------------------------------
//
// The same estimate from one pass over the keys instead of two: each row keeps one running max
// shared by its quad (so the quad's partial sums share a reference), each key block's sum is
// taken relative to the running max when the block ends and stored with that max in the CTA's
// slot of `scratch` ([slot][warp][16 rows][max_nkb] (sum, max) pairs); once the row's final max
// M and sum L are known, block c of row i is (f32) s·exp2((m − M)·s_l) · (1/L) and the rows are
// averaged in f64 in order as in the two-pass kernel. Persistent: gridDim.x slots take the
// (query block, kv head, group slice) items from `counter` (zeroed by the host), longest rows
// first. Same grid semantics otherwise; dynamic smem as stats_sampled plus 2·16 floats a warp.
extern "C" __global__ void __launch_bounds__(256)
stats_sampled_1p(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const SeqDesc* __restrict__ seqs,
                 const unsigned* __restrict__ qb_seq, unsigned total_qb, int num_heads, int num_kv_heads,
                 int heads_per_cta, int block_size, float sl, float* __restrict__ out,
                 unsigned* __restrict__ counter, unsigned zdim, unsigned max_nkb, float2* __restrict__ scratch) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ unsigned item_s;
    const int nwarps = blockDim.x / 32;
    elem_t* qs = (elem_t*)smem_raw;                      // [warp][16][DPAD]
    elem_t* ks = qs + nwarps * SP_ROWS * DPAD;           // [2][KT][DPAD]
    float* row_ml = (float*)(ks + 2 * KT * DPAD);        // [warp][16][2]: the row max M, 1/L
    const int group = num_heads / num_kv_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q4 = lane % 4, g4 = lane / 4;
    const unsigned bs = block_size, total_items = total_qb * (unsigned)num_kv_heads * zdim;
    float2* slot = scratch + ((size_t)blockIdx.x * nwarps + warp) * SP_ROWS * max_nkb;
    for (;;) {
        if (threadIdx.x == 0) item_s = atomicAdd(counter, 1u);
        __syncthreads();
        const unsigned item = item_s;
        __syncthreads();  // every thread holds the item before thread 0 takes the next
        if (item >= total_items) break;
        const unsigned per_qb = (unsigned)num_kv_heads * zdim;
        const unsigned gb = total_qb - 1 - item / per_qb;
        const int hk = (int)((item % per_qb) / zdim), g0 = (int)(item % zdim) * heads_per_cta;
        const SampledBlock b = sampled_block(seqs, qb_seq, gb, bs);
        const SeqDesc& sd = b.sd;
        const unsigned r = b.r, S = b.S, nkeys = b.nkeys, ntiles = b.ntiles;
        const int last = b.last;
        const bool active = g0 + warp < group;
        const int h = hk * group + g0 + warp;
        int lim_row[2];
        sampled_load_rows<false>(qs, q, b, hk, group, g0, num_heads, lim_row);
        float m[2] = {-F32_INF, -F32_INF}, l[2] = {0.f, 0.f}, bm[2] = {0.f, 0.f};
        sampled_first_tile(ks, k, b, hk, num_kv_heads);
        for (unsigned t = 0; t < ntiles; ++t) {
            float acc[KT / 8][4];
            if (sampled_qk(acc, ks, k, qs, b, t, hk, num_kv_heads, active, warp, lane)) {
                const unsigned j0 = t * KT;
                // The mask, then the quad's running max (one reference for its partial sums).
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const int lim = lim_row[rr] - (int)j0 - 2 * q4;
                    float tmax = sampled_tile_max<true>(acc, rr, lim);
                    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
                    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
                    if (tmax > m[rr]) {
                        const float f = m[rr] == -F32_INF ? 0.f : fast_exp2((m[rr] - tmax) * sl);
                        l[rr] *= f;
                        bm[rr] *= f;
                        m[rr] = tmax;
                    }
                }
                float segsum[2] = {0.f, 0.f}, tsum[2];
#pragma unroll
                for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr) {
                        const float ms = m[rr] * sl;
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float x = acc[nt][2 * rr + e];
                            const float p = x == -F32_INF ? 0.f : fast_exp2(fmaf(x, sl, -ms));
                            segsum[rr] += p;
                            l[rr] += p;
                        }
                    }
                    const int c = sampled_segment_end(segsum, bm, tsum, nt, j0, bs, nkeys);
                    if (c >= 0 && q4 == 0) {
                        slot[(size_t)g4 * max_nkb + c] = make_float2(tsum[0], m[0]);
                        slot[(size_t)(g4 + 8) * max_nkb + c] = make_float2(tsum[1], m[1]);
                    }
                }
            }
            __syncthreads();  // the buffer is refilled by the next iteration's load
        }
        if (active) {
            // Each row's sum over its quad (one reference max: a plain fixed tree), then the
            // block values of the S rows averaged in f64, rows in order.
            float* ml = row_ml + warp * SP_ROWS * 2;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float x = l[rr];
                x += __shfl_xor_sync(0xffffffffu, x, 1);
                x += __shfl_xor_sync(0xffffffffu, x, 2);
                if (q4 == 0) {
                    ml[(g4 + 8 * rr) * 2] = m[rr];
                    ml[(g4 + 8 * rr) * 2 + 1] = x > 0.f ? 1.f / x : 0.f;
                }
            }
            __syncwarp();
            float* orow = out + (size_t)sd.qk_off * num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
            const unsigned nblk = (unsigned)last / bs + 1;
            for (unsigned c = lane; c < sd.nkb; c += 32) {
                if (c >= nblk) {
                    orow[c] = 0.f;
                    continue;
                }
                double a = 0.0;
                for (unsigned i = 0; i < S; ++i) {
                    const float2 v = slot[(size_t)i * max_nkb + c];
                    const float M = ml[i * 2], inv = ml[i * 2 + 1];
                    a += (double)(v.x * fast_exp2((v.y - M) * sl) * inv);
                }
                orow[c] = (float)(a / (double)S);
            }
        }
        __syncthreads();  // shared rows and the slot are reused by the next item
    }
}
