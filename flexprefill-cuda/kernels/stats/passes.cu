// Representative attention on mma.sync (pass 1, merge, pass 2, slash finalize).
// Part of the `stats` module: compiled after kernels/seq_desc.cuh and stats/common.cuh
// (src/stats.rs concatenates the family), one NVRTC program for every statistics kernel.

// Pass 1: per (sequence, head, key split) the running row max and sum of exp2 over the split,
// for the representative rows and (probes = 1) the probe rows. Keys in a 3-stage cp.async
// ring (one barrier per tile). Grid (num_heads, total_splits);
// out row_ml[(split_global * H + h) * rs + i] = (m, l), m in base-2 logit units.
#if !STATS_WGMMA
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
stats_pass1(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
            const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
            int num_heads, int num_kv_heads, int split_keys, int rp, int rs,
            float scale, float scale_log2, int probes, int block_size, float2* __restrict__ row_ml) {
    extern __shared__ __align__(16) unsigned char smem[];
    const SplitCta cta = split_cta(seqs, work, num_heads, num_kv_heads, split_keys, probes, block_size);
    const int h = cta.h, hk = cta.hk, ng = cta.ng;
    const unsigned sp = cta.sp, nrow = cta.nrow, np = cta.np, J0 = cta.J0, J1 = cta.J1;
    const SeqDesc& sd = cta.sd;
    elem_t* qs = (elem_t*)smem;
    elem_t* qp = qs + ng * ROWS * DPAD;
    elem_t* ks = qp + (probes ? PQ * DPAD : 0);
    float2* pml = (float2*)(ks + 3 * KT * DPAD);  // [NWARPS][PQ] probe (m, l) per warp
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float sl = scale_log2;

    load_rows(qs, q, sd, h, num_heads, ng * ROWS, STATS_EMULATE, scale, 0, block_size);
    if (np) load_rows(qp, q, sd, h, num_heads, PQ, STATS_EMULATE, scale, 1, block_size);
    load_k_tile(ks, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();
    if (J0 + KT < J1) {
        load_k_tile(ks + KT * DPAD, k, sd, J0 + KT, hk, num_kv_heads);
        cp_async_commit();
    }

    // Running (max of raw logits, sum of exp2) of this thread's two rows: group in flight
    // (m0, l0) and the other group (m1, l1).
    float m0[2] = {(-F32_INF), (-F32_INF)}, l0[2] = {0.f, 0.f};
    float m1[2] = {(-F32_INF), (-F32_INF)}, l1[2] = {0.f, 0.f};
    // Probe rows: this thread's two rows (lane/4, lane/4 + 8) over the warp's 8 keys per tile.
    float pm[2] = {(-F32_INF), (-F32_INF)}, pl[2] = {0.f, 0.f};
    int plast[2];
    const int pmax = probe_last_keys(plast, sd, np, block_size, lane);

    int buf = 0;
    for (unsigned j0 = J0; j0 < J1; j0 += KT, buf = (buf == 2 ? 0 : buf + 1)) {
        if (j0 + KT < J1) {
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile j0 is in; every warp is done with the tile before it
        if (j0 + 2 * KT < J1) {
            const int nb = buf == 0 ? 2 : buf - 1;  // (buf + 2) % 3: the previous tile's slot
            load_k_tile(ks + nb * KT * DPAD, k, sd, j0 + 2 * KT, hk, num_kv_heads);
            cp_async_commit();
        }
        const elem_t* kt = ks + buf * KT * DPAD;
#pragma unroll 1
        for (int g = 0; g < ng; ++g) {
            const int i0 = g * ROWS + warp * 16;
            float acc[KT / 8][4];
            qk_tile_rows(acc, qs, kt, g, warp, lane, i0, nrow);
            pass1_reduce_tile(acc, sd, nrow, i0, j0, sl, lane, m0, l0, m1, l1, ng);
        }
        if (np && (int)j0 + warp * 8 <= pmax) {
            float pa[4];
            probe_tile(pa, qp, kt, warp, lane);
            pass1_probe_update(pa, plast, j0, warp, lane, sl, pm, pl);
        }
    }
    pass1_write_rows(sd, sp, h, num_heads, rp, rs, ng, sl, warp, lane, m0, l0, m1, l1, probes, pm, pl, pml,
                     row_ml);
}
#endif  // !STATS_WGMMA

// Merges the per-split (max, sum) of every row (representative and probe rows), splits in
// ascending order: lse2[(seq * H + h) * rs + i] = log2 Σ_j exp2(logit2_ij).
// Grid (num_heads, num_seqs), 256 threads.
extern "C" __global__ void stats_merge(const SeqDesc* __restrict__ seqs, const float2* __restrict__ row_ml,
                                       int num_heads, int rs, float* __restrict__ lse2) {
    // One warp per row; lanes stride the splits, then fixed xor trees (deterministic).
    const int h = blockIdx.x, s = blockIdx.y;
    const SeqDesc sd = seqs[s];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    for (int i = warp; i < rs; i += nw) {
        float m = (-F32_INF);
        for (unsigned sp = lane; sp < sd.nsplit; sp += 32)
            m = fmaxf(m, row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rs + i].x);
        m = warp_max(m);
        float l = 0.f;
        if (m != (-F32_INF))
            for (unsigned sp = lane; sp < sd.nsplit; sp += 32) {
                float2 ml = row_ml[((size_t)(sd.split_off + sp) * num_heads + h) * rs + i];
                if (ml.x != (-F32_INF)) l += ml.y * exp2f(ml.x - m);
            }
        l = warp_sum(l);
        if (lane == 0) lse2[((size_t)s * num_heads + h) * rs + i] = (m == (-F32_INF)) ? F32_INF : m + log2f(l);
    }
}

// Pass 2: probabilities tile by tile; vertical (exclusive per split), rep_block_mass (whole
// blocks per split: split_keys is a multiple of the block size), per-split slash partials
// slash_part[(split_global * H + h) * sl_stride + L], L = δ - δ_min(split), and (probes = 1)
// the probe rows' block masses.
//
// Per tile, each warp reduces its own 16 x 64 probabilities: column sums by a halving xor
// butterfly in registers, diagonal sums over 16 x 16 quarter strips in shared memory (16 loads
// per lane and quarter, carried between quarters by a shuffle); the 8 warps' partials are then
// summed in warp order by one thread per column / diagonal, one tile late: the partials are
// double-buffered, so the barrier that starts tile t also publishes tile t-1's partials and a
// tile costs one barrier. Every sum has a fixed order.
#if !STATS_WGMMA
extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
stats_pass2(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
            const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
            int num_heads, int num_kv_heads, int split_keys, int rp, int rs, int block_size,
            float scale, float scale_log2, const float* __restrict__ lse2, int sl_stride,
            float* __restrict__ vertical, float* __restrict__ rep_block_mass,
            float* __restrict__ slash_part, int probes, float* __restrict__ probe_block_mass) {
    extern __shared__ __align__(16) unsigned char smem[];
    const SplitCta cta = split_cta(seqs, work, num_heads, num_kv_heads, split_keys, probes, block_size);
    const int h = cta.h, hk = cta.hk, ng = cta.ng;
    const unsigned sp = cta.sp, nrow = cta.nrow, np = cta.np, J0 = cta.J0, J1 = cta.J1;
    const SeqDesc& sd = cta.sd;
    const int nbs = split_keys / block_size;  // blocks per split
    elem_t* qs = (elem_t*)smem;
    elem_t* qp = qs + ng * ROWS * DPAD;
    elem_t* ks = qp + (probes ? PQ * DPAD : 0);
    float* strips = (float*)(ks + 2 * KT * DPAD);  // [NWARPS][16 * PP]
    float* wcol = strips + NWARPS * 16 * PP;        // [2][ng][NWARPS][KT] per-warp column sums
    float* dpart = wcol + 2 * ng * NWARPS * KT;     // [2][ng][NWARPS][DPITCH] per-warp diagonal sums
    float* slash_acc = dpart + 2 * ng * NWARPS * DPITCH;  // sl_stride floats
    float* pw = slash_acc + sl_stride;              // [2][NWARPS][PQ] probe block partials
    float* pacc = pw + 2 * NWARPS * PQ;             // [PQ][nbs] probe block masses of the split
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float inv_r = 1.f / (float)sd.rep;

    pass2_clear(slash_acc, sl_stride, pacc, nbs);
    load_rows(qs, q, sd, h, num_heads, ng * ROWS, STATS_EMULATE, scale, 0, block_size);
    if (np) load_rows(qp, q, sd, h, num_heads, PQ, STATS_EMULATE, scale, 1, block_size);
    load_k_tile(ks, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();
    const float sl = scale_log2;

    const Pass2Rows pr = pass2_rows(cta, lse2, vertical, rep_block_mass, num_heads, rs, rp, warp, lane, block_size);
    // Running block mass of the two rows this thread reduces (blocks >= KT span several
    // tiles): group in flight (bm0) and the other group (bm1), swapped after each group.
    float bm0[2] = {0.f, 0.f}, bm1[2] = {0.f, 0.f};

    const int seg = block_size < KT ? block_size : KT;  // columns per block segment in a tile
    float* strip = strips + warp * 16 * PP;
    const int q4 = lane % 4, g4 = lane / 4;

    int buf = 0;
    for (unsigned j0 = J0; j0 < J1; j0 += KT, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads();  // tile j0 is in; every warp is done with tile j0 - KT (partials published)
        if (j0 + KT < J1) {
            load_k_tile(ks + (buf ^ 1) * KT * DPAD, k, sd, j0 + KT, hk, num_kv_heads);
            cp_async_commit();
        }
        if (j0 > J0)
            pass2_combine(sd, ng, j0 - KT, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                          wcol + (buf ^ 1) * ng * NWARPS * KT, dpart + (buf ^ 1) * ng * NWARPS * DPITCH,
                          pw + (buf ^ 1) * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
        const elem_t* kt = ks + buf * KT * DPAD;
        float* wc = wcol + buf * ng * NWARPS * KT;       // this tile's partials (set = buf)
        float* dpt = dpart + buf * ng * NWARPS * DPITCH;
        if (np) {
            // Probe rows: this warp's 8 keys (one block: block_size >= 16), summed per row.
            // (pass2_probe_rows_sw's steps, written out: as a shared call, this kernel's code
            // changes and spills at head_dim 64.)
            float s[2] = {0.f, 0.f};
            if ((int)j0 + warp * 8 <= pr.pmax) {
                float pa[4];
                probe_tile(pa, qp, kt, warp, lane);
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int lim = pr.plast[r] - ((int)j0 + warp * 8 + 2 * q4);
                    const float p0 = (0 <= lim) ? fast_exp2(fmaf(raw_logit(pa[2 * r]), sl, -pr.plse[r])) : 0.f;
                    const float p1 = (1 <= lim) ? fast_exp2(fmaf(raw_logit(pa[2 * r + 1]), sl, -pr.plse[r])) : 0.f;
                    s[r] = p0 + p1;
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float t = s[r];
                t += __shfl_xor_sync(0xffffffff, t, 1);
                t += __shfl_xor_sync(0xffffffff, t, 2);
                if (q4 == 0) pw[buf * NWARPS * PQ + warp * PQ + g4 + 8 * r] = t;
            }
        }
#pragma unroll 1
        for (int g = 0; g < ng; ++g) {
            const int i0 = g * ROWS + warp * 16;
            float* dp = dpt + (g * NWARPS + warp) * DPITCH;
            float acc[KT / 8][4];
            qk_tile_rows(acc, qs, kt, g, warp, lane, i0, nrow);
            // Probabilities in place of the logits: p = exp2(raw·s - lse).
            pass2_reduce_tile(acc, sd, nrow, i0, j0, pr.lse_rows, g, sl, lane, warp, strip, seg, block_size, pr.rbm_out,
                              bm0, bm1, dp, wc, ng);
        }
    }
    // The last tile's partials.
    __syncthreads();
    {
        const unsigned nt_tiles = (J1 - J0 + KT - 1) / KT;
        const unsigned jl = J0 + (nt_tiles - 1) * KT;
        const int lb = (nt_tiles - 1) & 1;  // its partial set
        pass2_combine(sd, ng, jl, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                      wcol + lb * ng * NWARPS * KT, dpart + lb * ng * NWARPS * DPITCH,
                      pw + lb * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
    }
    pass2_write_split(sd, sp, h, num_heads, sl_stride, inv_r, slash_acc, slash_part, np, nbs, J0, block_size, pacc,
                      probe_block_mass);
}
#endif  // !STATS_WGMMA

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
