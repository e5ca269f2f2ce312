// Representative-attention statistics passes on Hopper (sm_90a): the same outputs, row states
// and fixed-order reductions as stats_pass1 / stats_pass2 (stats/passes.cu; the module's overview is stats/common.cuh's header), with
// every Q̂·Kᵀ tile on wgmma instead of mma.sync. This file is the last part of the `stats` module
// (src/stats.rs; the merge, slash finalize, pooling and estimate kernels are shared) and compiled
// only with STATS_WGMMA=1 (sm_90a, head_dim 64 or 128).
//
// What changes against stats/passes.cu:
//  - Q̂ (the representative rows) and the key tiles live in shared memory in the canonical
//    128-byte-swizzled K-major layout wgmma reads through descriptors (attention_sm90.cu's
//    layout: a [rows][D] tile is D/64 atoms of [rows][64], 16-byte chunk c of row r at chunk
//    c ^ (r & 7), atoms 1024-byte aligned). A warpgroup (4 warps, 64 rows) computes its
//    64 x 64 logit tile with D/16 m64n64k16 steps; warp w of the CTA still owns rows
//    16w..16w+15 of the row group, and the wgmma accumulator layout per warp is the mma.sync
//    m16n8 C layout (acc[nt][e]: row lane/4 + 8(e/2), column 8nt + 2(lane%4) + e%2), so the
//    masking, softmax and reductions below are stats/common.cuh's, unchanged, in the same order.
//  - Key tiles by cp.async: pass 1 a 3-stage ring loaded two tiles ahead, pass 2 (whose
//    shared memory is the larger) double-buffered, one tile ahead, so both fit two CTAs per SM.
//  - Work unit = (key tile, row group of 128 rows). Default: per unit issue, wait, reduce;
//    two CTAs (four warpgroups) per SM overlap one warpgroup's wgmma with another's
//    reductions. STATS_OVERLAP=1 (host: FLEXPREFILL_STATS_OVERLAP=1): iteration u issues unit
//    u, reduces unit u-1 (its logits copied out of the accumulators) while the tensor cores
//    run, then waits, so no wgmma is in flight across a loop edge or a branch (ptxas would
//    serialize it otherwise); past the last unit the last unit is issued again and discarded.
//    The probe rows of a tile are then done when the tile starts, and pass 2 combines a tile's
//    cross-warp partials two tiles later (three partial sets). Both variants fit 128
//    registers without spills (two CTAs per SM).
//  - Every warpgroup issues every unit, rows past R included (Q̂'s padding rows are zero and
//    their logits masked below): no wgmma under a thread-dependent branch.
//  - The probe rows (16, one m16 tile) stay on mma.sync; their key fragments are read with
//    ldmatrix from the swizzled key tile.
// cp.async writes are generic-proxy writes: a fence.proxy.async after the wait and before the
// barrier orders them before the async-proxy wgmma reads (as in attention_sm90.cu).
#if STATS_WGMMA

#pragma nv_diag_suppress 177

#ifndef STATS_OVERLAP
#define STATS_OVERLAP 0
#endif
// CTAs per SM the register allocation must allow (two: 128 registers, no spill in either
// variant at head_dim 64/128).
#ifndef STATS_MINB
#define STATS_MINB 2
#endif
#define KSTAGES 3  // pass 1's key ring
#define KTB (KT * HEAD_DIM * 2)  // bytes of one swizzled key tile

static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "the wgmma statistics take head_dim 64 or 128");
static_assert(KT == 64 && ROWS == 128 && NWARPS == 8, "two warpgroups of 64 rows, 64-key tiles");

#if defined(KEY_DTYPE_F16)
#define SWG_T "f16"
#else
#define SWG_T "bf16"
#endif

// D (+)= A·Bᵀ, m64n64k16, A and B K-major in shared memory (descriptors); scale_d 0 overwrites
// D. d[nt][e] is the mma.sync m16n8 C fragment of n-tile nt.
FP_DEVICE void swg_m64n64(float (&d)[KT / 8][4], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." SWG_T "." SWG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(da), "l"(db), "r"(scale_d));
}

// D = A·Bᵀ (the first k-step: the accumulators are written, never read). Write-only operands, so
// the compiler does not materialise the previous values into the accumulator registers (a
// non-wgmma definition inside the async window, which ptxas answers by serializing).
FP_DEVICE void swg_m64n64_first(float (&d)[KT / 8][4], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." SWG_T "." SWG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "=f"(d[0][0]), "=f"(d[0][1]), "=f"(d[0][2]), "=f"(d[0][3]), "=f"(d[1][0]), "=f"(d[1][1]), "=f"(d[1][2]), "=f"(d[1][3]), "=f"(d[2][0]), "=f"(d[2][1]), "=f"(d[2][2]), "=f"(d[2][3]), "=f"(d[3][0]), "=f"(d[3][1]), "=f"(d[3][2]), "=f"(d[3][3]), "=f"(d[4][0]), "=f"(d[4][1]), "=f"(d[4][2]), "=f"(d[4][3]), "=f"(d[5][0]), "=f"(d[5][1]), "=f"(d[5][2]), "=f"(d[5][3]), "=f"(d[6][0]), "=f"(d[6][1]), "=f"(d[6][2]), "=f"(d[6][3]), "=f"(d[7][0]), "=f"(d[7][1]), "=f"(d[7][2]), "=f"(d[7][3])
        : "l"(da), "l"(db), "n"(0));
}

// Byte offset of element column `col` (a multiple of 8) of row `r` in a [rows][D] tile stored
// as 128B-swizzled atoms.
FP_DEVICE uint32_t swz_off(int r, int col, int rows) {
    return (uint32_t)((col >> 6) * rows * 128 + r * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4));
}

// wgmma shared-memory descriptor: start address, leading/stride byte offsets, 128B swizzle.
FP_DEVICE uint64_t swg_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

FP_DEVICE void swg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FP_DEVICE void swg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
FP_DEVICE void swg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
FP_DEVICE void swg_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving reads/writes of the accumulators across the async window
// (the wait names no register).
FP_DEVICE void swg_fence_regs(float (&r)[KT / 8][4]) {
#pragma unroll
    for (int i = 0; i < KT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[i][e])::"memory");
}
FP_DEVICE void swg_zero(float (&r)[KT / 8][4]) {
#pragma unroll
    for (int i = 0; i < KT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) r[i][e] = 0.f;
}

// Issues (does not wait for) S = Q̂[row0..row0+63] · K_tileᵀ for this warpgroup: Q̂ is the
// swizzled [rq][D] tile at sq, the key tile the swizzled [KT][D] tile at kst.
FP_DEVICE void swg_issue_qk(float (&acc)[KT / 8][4], uint32_t sq, int rq, int row0, uint32_t kst) {
    swg_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const uint32_t koff = (kk & 3) * 32;  // 16 elements = 32 bytes into the 128-byte row
        const uint64_t da = swg_desc(sq + (kk >> 2) * rq * 128 + row0 * 128 + koff, 16, 1024);
        const uint64_t db = swg_desc(kst + (kk >> 2) * KT * 128 + koff, 16, 1024);
        if (kk == 0)
            swg_m64n64_first(acc, da, db);
        else
            swg_m64n64(acc, da, db, 1);
    }
    swg_commit();
}

// Loads a KT x HEAD_DIM key tile into the swizzled tile at dst, zero-filling keys >= kv_len.
FP_DEVICE void load_k_tile_sw(uint32_t dst, const elem_t* __restrict__ k, const SeqDesc& sd, unsigned j0,
                              int hk, int num_kv_heads) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    for (int c = threadIdx.x; c < KT * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const unsigned j = j0 + r;
        const bool valid = j < sd.kv_len;
        const elem_t* src = k + ((size_t)(sd.k_start + (valid ? j : 0)) * num_kv_heads + hk) * HEAD_DIM + col;
        cp_async_16(dst + swz_off(r, col, KT), src, valid);
    }
}

// Loads the `rq` representative rows (head h) into the swizzled tile at sq (generic pointer
// gq), rows past the row count zeroed; with round_q pre-scaled and rounded (load_rows).
FP_DEVICE void load_rows_sw(uint32_t sq, unsigned char* gq, const elem_t* __restrict__ q, const SeqDesc& sd,
                            int h, int num_heads, int rq, int round_q, float scale, int bs) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    const unsigned nrow = row_count(sd, 0, bs);
    for (int c = threadIdx.x; c < rq * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool valid = (unsigned)r < nrow;
        const unsigned tok = sd.q_start + row_query(sd, 0, bs, valid ? r : 0);
        const elem_t* src = q + ((size_t)tok * num_heads + h) * HEAD_DIM + col;
        const uint32_t off = swz_off(r, col, rq);
        if (round_q) {
            elem_t* dst = (elem_t*)(gq + off);
#pragma unroll
            for (int e = 0; e < 8; ++e) dst[e] = valid ? from_f32(to_f32(src[e]) * scale) : from_f32(0.f);
        } else {
            cp_async_16(sq + off, src, valid);
        }
    }
}

// probe_tile with the keys read from the swizzled key tile at kst.
FP_DEVICE void probe_tile_sw(float (&acc)[4], const elem_t* qp, uint32_t kst, int warp, int lane) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = 0.f;
    const elem_t* qrow = qp + (lane % 16) * DPAD + (lane / 16) * 8;
    const int krow = warp * 8 + (lane & 7), kcol = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        uint32_t a[4], b[2];
        ldmatrix_x4(a, smem_u32(qrow + kk * 16));
        ldmatrix_x2(b, kst + swz_off(krow, kk * 16 + kcol, KT));
        Elem::mma(acc, a, b[0], b[1]);
    }
}

// The next work unit after (tile t, group g): the next row group of the tile, else the next
// tile's first group. Returns false past the last tile.
FP_DEVICE bool next_unit(int t, int g, int ng, int ntiles, int& tn, int& gn) {
    if (g + 1 < ng) {
        tn = t;
        gn = g + 1;
    } else {
        tn = t + 1;
        gn = 0;
    }
    return tn < ntiles;
}


// S = Q̂[row0..row0+63] · K_tileᵀ for this warpgroup, waited for (swg_issue_qk's operands).
FP_DEVICE void swg_qk(float (&acc)[KT / 8][4], uint32_t sq, int rq, int row0, uint32_t kst) {
    swg_issue_qk(acc, sq, rq, row0, kst);
    swg_wait0();
    swg_fence_regs(acc);
}

#if STATS_OVERLAP
// The STATS_OVERLAP schedule of both passes: work unit u = (key tile, row group) =
// swg_unit(u, ng). Iteration u issues unit u's Q̂·Kᵀ, reduces unit u-1 (its logits in `prev`)
// while the tensor cores run, then waits (swg_wait_keep): no wgmma is in flight across the
// loop's back edge (ptxas would serialize). Past the last unit the last one is issued again
// (discarded), so that every iteration is issue, reduce, wait with no branch around the wgmma.
// (The reducing side spells unit u-1 out: through swg_unit, NVRTC's integer code for it
// varies with what the process compiled before.)
struct SwgUnit {
    int t, g;  // key tile, row group
};
FP_DEVICE SwgUnit swg_unit(int u, int ng) {
    const int t = ng == 1 ? u : u >> 1;
    return {t, u - t * ng};
}
// Waits for the unit in flight and keeps its logits (`cur`) for the next iteration's reduction.
FP_DEVICE void swg_wait_keep(float (&prev)[KT / 8][4], float (&cur)[KT / 8][4]) {
    swg_wait0();
    swg_fence_regs(cur);
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) prev[nt][e] = cur[nt][e];
}
#endif

// Pass 1 (stats_pass1's outputs and order) with Q̂·Kᵀ on wgmma. Same arguments and grid.
extern "C" __global__ void __launch_bounds__(NTHREADS, STATS_MINB)
stats_pass1_sm90(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
                 const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
                 int num_heads, int num_kv_heads, int split_keys, int rp, int rs,
                 float scale, float scale_log2, int probes, int block_size, float2* __restrict__ row_ml) {
    extern __shared__ __align__(1024) unsigned char smem[];
    // Atoms must sit on 1024-byte boundaries (the swizzle reads address bits 7..9).
    const uint32_t sbase = smem_u32(smem);
    const uint32_t sq = (sbase + 1023u) & ~1023u;
    unsigned char* gq = smem + (sq - sbase);
    const SplitCta cta = split_cta(seqs, work, num_heads, num_kv_heads, split_keys, probes, block_size);
    const int h = cta.h, hk = cta.hk, ng = cta.ng;
    const unsigned sp = cta.sp, nrow = cta.nrow, np = cta.np, J0 = cta.J0, J1 = cta.J1;
    const SeqDesc& sd = cta.sd;
    const int rq = ng * ROWS;  // rows of the swizzled Q̂ tile
    const uint32_t sk = sq + rq * HEAD_DIM * 2;  // KSTAGES swizzled key tiles
    elem_t* qp = (elem_t*)(gq + rq * HEAD_DIM * 2 + KSTAGES * KTB);
    float2* pml = (float2*)(qp + (probes ? PQ * DPAD : 0));  // [NWARPS][PQ] probe (m, l) per warp
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wg = warp / 4;  // warpgroup: rows 64wg..64wg+63 of each row group
    const int ntiles = (int)((J1 - J0 + KT - 1) / KT);
    const float sl = scale_log2;

    load_rows_sw(sq, gq, q, sd, h, num_heads, rq, STATS_EMULATE, scale, block_size);
    if (np) load_rows(qp, q, sd, h, num_heads, PQ, STATS_EMULATE, scale, 1, block_size);
    load_k_tile_sw(sk, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();
    if (ntiles > 1) load_k_tile_sw(sk + KTB, k, sd, J0 + KT, hk, num_kv_heads);
    cp_async_commit();

    // Running (max of raw logits, sum of exp2) of this thread's two rows: group in flight
    // (m0, l0) and the other group (m1, l1).
    float m0[2] = {(-F32_INF), (-F32_INF)}, l0[2] = {0.f, 0.f};
    float m1[2] = {(-F32_INF), (-F32_INF)}, l1[2] = {0.f, 0.f};
    // Probe rows: this thread's two rows (lane/4, lane/4 + 8) over the warp's 8 keys per tile.
    float pm[2] = {(-F32_INF), (-F32_INF)}, pl[2] = {0.f, 0.f};
    int plast[2];
    const int pmax = probe_last_keys(plast, sd, np, block_size, lane);

#if STATS_OVERLAP
    // The overlap schedule (swg_unit). The probe rows of a tile are done when the tile starts
    // (their key slot is reloaded two tiles later).
    const int nunits = ntiles * ng;
    float prev[KT / 8][4];
    swg_zero(prev);
#pragma unroll 1
    for (int u = 0; u <= nunits; ++u) {
        float cur[KT / 8][4];
        const SwgUnit un = swg_unit(u < nunits ? u : nunits - 1, ng);
        const int ti = un.t, gi = un.g;
        {
            if (u < nunits && gi == 0) {
                const unsigned j0 = J0 + ti * KT;
                // One cp.async group per tile (empty past the end): tile ti is in after the
                // barrier, and every warp is done with tile ti-1, whose slot takes tile ti+2.
                cp_async_wait<1>();
                swg_fence_proxy_async();
                __syncthreads();
                if (ti + 2 < ntiles) load_k_tile_sw(sk + ((ti + 2) % KSTAGES) * KTB, k, sd, j0 + 2 * KT, hk, num_kv_heads);
                cp_async_commit();
                const uint32_t kst = sk + (ti % KSTAGES) * KTB;
                if (np && (int)j0 + warp * 8 <= pmax) {
                    float pa[4];
                    probe_tile_sw(pa, qp, kst, warp, lane);
                    pass1_probe_update(pa, plast, j0, warp, lane, sl, pm, pl);
                }
            }
            swg_issue_qk(cur, sq, rq, gi * ROWS + wg * 64, sk + (ti % KSTAGES) * KTB);
        }
        if (u > 0) {
            const int tp = ng == 1 ? u - 1 : (u - 1) >> 1, g = (u - 1) - tp * ng;  // unit u-1
            const unsigned j0 = J0 + tp * KT;
            const int i0 = g * ROWS + warp * 16;
            pass1_reduce_tile(prev, sd, nrow, i0, j0, sl, lane, m0, l0, m1, l1, ng);
        }
        swg_wait_keep(prev, cur);
    }
#else
    for (int ti = 0; ti < ntiles; ++ti) {
        const unsigned j0 = J0 + ti * KT;
        // One cp.async group per tile (empty past the end): tile ti is in after the barrier,
        // and every warp is done with tile ti-1, whose slot (ti+2) % 3 takes tile ti+2.
        cp_async_wait<1>();
        swg_fence_proxy_async();
        __syncthreads();
        if (ti + 2 < ntiles) load_k_tile_sw(sk + ((ti + 2) % KSTAGES) * KTB, k, sd, j0 + 2 * KT, hk, num_kv_heads);
        cp_async_commit();
        const uint32_t kst = sk + (ti % KSTAGES) * KTB;
#pragma unroll 1
        for (int g = 0; g < ng; ++g) {
            const int i0 = g * ROWS + warp * 16;
            float acc[KT / 8][4];
            swg_qk(acc, sq, rq, g * ROWS + wg * 64, kst);
            pass1_reduce_tile(acc, sd, nrow, i0, j0, sl, lane, m0, l0, m1, l1, ng);
        }
        if (np && (int)j0 + warp * 8 <= pmax) {
            float pa[4];
            probe_tile_sw(pa, qp, kst, warp, lane);
            pass1_probe_update(pa, plast, j0, warp, lane, sl, pm, pl);
        }
    }
#endif
    pass1_write_rows(sd, sp, h, num_heads, rp, rs, ng, sl, warp, lane, m0, l0, m1, l1, probes, pm, pl, pml,
                     row_ml);
}

// Pass 2's probe rows for one key tile (wgmma passes): this warp's 8 keys (one block, as
// block_size >= 16) of each probe row, exponentiated with the row's lse and summed per row
// over the quad; `pw` receives the warp's PQ partials.
FP_DEVICE void pass2_probe_rows_sw(const elem_t* qp, uint32_t kst, int warp, int lane, unsigned j0, int pmax,
                                   const int (&plast)[2], const float (&plse)[2], float sl, float* pw) {
    const int q4 = lane % 4, g4 = lane / 4;
    float s[2] = {0.f, 0.f};
    if ((int)j0 + warp * 8 <= pmax) {
        float pa[4];
        probe_tile_sw(pa, qp, kst, warp, lane);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int lim = plast[r] - ((int)j0 + warp * 8 + 2 * q4);
            const float p0 = (0 <= lim) ? fast_exp2(fmaf(raw_logit(pa[2 * r]), sl, -plse[r])) : 0.f;
            const float p1 = (1 <= lim) ? fast_exp2(fmaf(raw_logit(pa[2 * r + 1]), sl, -plse[r])) : 0.f;
            s[r] = p0 + p1;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float t = s[r];
        t += __shfl_xor_sync(0xffffffff, t, 1);
        t += __shfl_xor_sync(0xffffffff, t, 2);
        if (q4 == 0) pw[warp * PQ + g4 + 8 * r] = t;
    }
}

// Pass 2 (stats_pass2's outputs and order) with Q̂·Kᵀ on wgmma. Same arguments and grid. The
// per-tile partials are double-buffered by tile parity as in stats_pass2 (triple-buffered with
// STATS_OVERLAP: a tile's partials are combined two tiles later).
#define NSETS (STATS_OVERLAP ? 3 : 2)
// Key tiles of pass 2: double-buffered, loaded one tile ahead (its shared memory is the larger:
// two CTAs per SM need the third slot's 16 KiB).
#define K2STAGES 2
extern "C" __global__ void __launch_bounds__(NTHREADS, STATS_MINB)
stats_pass2_sm90(const elem_t* __restrict__ q, const elem_t* __restrict__ k,
                 const SeqDesc* __restrict__ seqs, const uint2* __restrict__ work,
                 int num_heads, int num_kv_heads, int split_keys, int rp, int rs, int block_size,
                 float scale, float scale_log2, const float* __restrict__ lse2, int sl_stride,
                 float* __restrict__ vertical, float* __restrict__ rep_block_mass,
                 float* __restrict__ slash_part, int probes, float* __restrict__ probe_block_mass) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const uint32_t sbase = smem_u32(smem);
    const uint32_t sq = (sbase + 1023u) & ~1023u;
    unsigned char* gq = smem + (sq - sbase);
    const SplitCta cta = split_cta(seqs, work, num_heads, num_kv_heads, split_keys, probes, block_size);
    const int h = cta.h, hk = cta.hk, ng = cta.ng;
    const unsigned sp = cta.sp, nrow = cta.nrow, np = cta.np, J0 = cta.J0, J1 = cta.J1;
    const SeqDesc& sd = cta.sd;
    const int rq = ng * ROWS;  // rows of the swizzled Q̂ tile
    const int nbs = split_keys / block_size;  // blocks per split
    const uint32_t sk = sq + rq * HEAD_DIM * 2;  // K2STAGES swizzled key tiles
    elem_t* qp = (elem_t*)(gq + rq * HEAD_DIM * 2 + K2STAGES * KTB);
    float* strips = (float*)(qp + (probes ? PQ * DPAD : 0));  // [NWARPS][16 * PP]
    float* wcol = strips + NWARPS * 16 * PP;          // [NSETS][ng][NWARPS][KT] per-warp column sums
    float* dpart = wcol + NSETS * ng * NWARPS * KT;   // [NSETS][ng][NWARPS][DPITCH] per-warp diagonal sums
    float* slash_acc = dpart + NSETS * ng * NWARPS * DPITCH;  // sl_stride floats
    float* pw = slash_acc + sl_stride;                // [NSETS][NWARPS][PQ] probe block partials
    float* pacc = pw + NSETS * NWARPS * PQ;           // [PQ][nbs] probe block masses of the split
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wg = warp / 4;  // warpgroup: rows 64wg..64wg+63 of each row group
    const int ntiles = (int)((J1 - J0 + KT - 1) / KT);
    const float inv_r = 1.f / (float)sd.rep;

    pass2_clear(slash_acc, sl_stride, pacc, nbs);
    load_rows_sw(sq, gq, q, sd, h, num_heads, rq, STATS_EMULATE, scale, block_size);
    if (np) load_rows(qp, q, sd, h, num_heads, PQ, STATS_EMULATE, scale, 1, block_size);
    load_k_tile_sw(sk, k, sd, J0, hk, num_kv_heads);
    cp_async_commit();
    const float sl = scale_log2;

    const Pass2Rows pr = pass2_rows(cta, lse2, vertical, rep_block_mass, num_heads, rs, rp, warp, lane, block_size);
    // Running block mass of the two rows this thread reduces (blocks >= KT span several
    // tiles): group in flight (bm0) and the other group (bm1), swapped after each group.
    float bm0[2] = {0.f, 0.f}, bm1[2] = {0.f, 0.f};

    const int seg = block_size < KT ? block_size : KT;  // columns per block segment in a tile
    float* strip = strips + warp * 16 * PP;

#if STATS_OVERLAP
    // The overlap schedule (swg_unit). Tile t's probe partials are written when it starts, its
    // last unit is reduced after the barrier of tile t+1, so its partials (set t % 3) are
    // combined after the barrier of tile t+2; the last two tiles' after the loop.
    const int nunits = ntiles * ng;
    float prev[KT / 8][4];
    swg_zero(prev);
#pragma unroll 1
    for (int u = 0; u <= nunits; ++u) {
        float cur[KT / 8][4];
        const SwgUnit un = swg_unit(u < nunits ? u : nunits - 1, ng);
        const int ti = un.t, gi = un.g;
        {
            if (u < nunits && gi == 0) {
                const unsigned j0 = J0 + ti * KT;
                const int buf = ti % NSETS;  // this tile's probe partial set
                // Tile ti is in after the barrier, and every warp is done with tile ti-1 (its
                // units were waited for, its probe rows done), whose slot takes tile ti+1.
                cp_async_wait<0>();
                swg_fence_proxy_async();
                __syncthreads();
                if (ti + 1 < ntiles) {
                    load_k_tile_sw(sk + ((ti + 1) % K2STAGES) * KTB, k, sd, j0 + KT, hk, num_kv_heads);
                    cp_async_commit();
                }
                if (ti >= 2) {
                    const int cb = (ti - 2) % NSETS;
                    pass2_combine(sd, ng, j0 - 2 * KT, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                                  wcol + cb * ng * NWARPS * KT, dpart + cb * ng * NWARPS * DPITCH,
                                  pw + cb * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
                }
                const uint32_t kst = sk + (ti % K2STAGES) * KTB;
                if (np) {
                    // Probe rows: this warp's 8 keys (one block: block_size >= 16), summed per row.
                    pass2_probe_rows_sw(qp, kst, warp, lane, j0, pr.pmax, pr.plast, pr.plse, sl, pw + buf * NWARPS * PQ);
                }
            }
            swg_issue_qk(cur, sq, rq, gi * ROWS + wg * 64, sk + (ti % K2STAGES) * KTB);
        }
        if (u > 0) {
            const int tp = ng == 1 ? u - 1 : (u - 1) >> 1, g = (u - 1) - tp * ng;  // unit u-1
            const unsigned j0 = J0 + tp * KT;
            float* wc = wcol + (tp % NSETS) * ng * NWARPS * KT;  // tile tp's partials
            float* dpt = dpart + (tp % NSETS) * ng * NWARPS * DPITCH;
            const int i0 = g * ROWS + warp * 16;
            float* dp = dpt + (g * NWARPS + warp) * DPITCH;
            // Probabilities in place of the logits: p = exp2(raw·s - lse).
            pass2_reduce_tile(prev, sd, nrow, i0, j0, pr.lse_rows, g, sl, lane, warp, strip, seg, block_size, pr.rbm_out,
                              bm0, bm1, dp, wc, ng);
        }
        swg_wait_keep(prev, cur);
    }
    // The last two tiles' partials, in tile order (a barrier before each: slash_acc and pacc
    // entries are shared between tiles).
    for (int t = ntiles >= 2 ? ntiles - 2 : 0; t < ntiles; ++t) {
        __syncthreads();
        const int cb = t % NSETS;
        pass2_combine(sd, ng, J0 + t * KT, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                      wcol + cb * ng * NWARPS * KT, dpart + cb * ng * NWARPS * DPITCH,
                      pw + cb * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
    }
#else
    for (int ti = 0; ti < ntiles; ++ti) {
        const unsigned j0 = J0 + ti * KT;
        const int buf = ti & 1;  // partial set of this tile
        // Tile ti is in after the barrier, and every warp is done with tile ti-1 (its partials
        // are published, its key slot takes tile ti+1).
        cp_async_wait<0>();
        swg_fence_proxy_async();
        __syncthreads();
        if (ti + 1 < ntiles) {
            load_k_tile_sw(sk + ((ti + 1) % K2STAGES) * KTB, k, sd, j0 + KT, hk, num_kv_heads);
            cp_async_commit();
        }
        if (ti > 0)
            pass2_combine(sd, ng, j0 - KT, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                          wcol + (buf ^ 1) * ng * NWARPS * KT, dpart + (buf ^ 1) * ng * NWARPS * DPITCH,
                          pw + (buf ^ 1) * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
        const uint32_t kst = sk + (ti % K2STAGES) * KTB;
        float* wc = wcol + buf * ng * NWARPS * KT;       // this tile's partials (set = buf)
        float* dpt = dpart + buf * ng * NWARPS * DPITCH;
        if (np) {
            // Probe rows: this warp's 8 keys (one block: block_size >= 16), summed per row.
            pass2_probe_rows_sw(qp, kst, warp, lane, j0, pr.pmax, pr.plast, pr.plse, sl, pw + buf * NWARPS * PQ);
        }
#pragma unroll 1
        for (int g = 0; g < ng; ++g) {
            const int i0 = g * ROWS + warp * 16;
            float* dp = dpt + (g * NWARPS + warp) * DPITCH;
            float acc[KT / 8][4];
            swg_qk(acc, sq, rq, g * ROWS + wg * 64, kst);
            // Probabilities in place of the logits: p = exp2(raw·s - lse).
            pass2_reduce_tile(acc, sd, nrow, i0, j0, pr.lse_rows, g, sl, lane, warp, strip, seg, block_size, pr.rbm_out,
                              bm0, bm1, dp, wc, ng);
        }
    }
    // The last tile's partials.
    __syncthreads();
    {
        const unsigned nt_tiles = (unsigned)ntiles;
        const unsigned jl = J0 + (nt_tiles - 1) * KT;
        const int lb = (nt_tiles - 1) & 1;  // its partial set
        pass2_combine(sd, ng, jl, J0, J1, block_size, nbs, sl_stride, np, inv_r,
                      wcol + lb * ng * NWARPS * KT, dpart + lb * ng * NWARPS * DPITCH,
                      pw + lb * NWARPS * PQ, slash_acc, pacc, pr.vert_out);
    }
#endif
    pass2_write_split(sd, sp, h, num_heads, sl_stride, inv_r, slash_acc, slash_part, np, nbs, J0, block_size, pacc,
                      probe_block_mass);
}

#endif  // STATS_WGMMA
