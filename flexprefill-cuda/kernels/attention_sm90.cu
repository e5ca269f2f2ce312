// Block-sparse causal flash-attention forward for Hopper (sm_90a): the same semantics, grid
// and parameters as attention.cu (read its header), with the two matrix products on wgmma.
// Compiled after attention_wgmma.cuh (layouts, wrappers, softmax, epilogue; src/attention.rs
// puts the two together).
//
// A CTA holds ATT_BQ = 64·W query rows, one warpgroup (4 warps) per 64 rows, every thread
// both loads and computes. K/V tiles arrive by cp.async (all threads) into a 2-stage ring; a
// proxy fence orders those generic-proxy writes before the async-proxy wgmma reads.
#include "flexprefill_common.cuh"

// 1: three-stage K/V ring and S_{j+1} = Q·K_{j+1} issued before the softmax of S_j, so the
// tensor cores work while the warpgroup computes exponentials (FA3's intra-warpgroup overlap).
#ifndef ATT_OVERLAP
#define ATT_OVERLAP 0
#endif

namespace {
constexpr int WG = BQ / 64;  // warpgroups
constexpr int NT = WG * 128;
constexpr bool OVERLAP = ATT_OVERLAP != 0;
constexpr int STAGES = OVERLAP ? 3 : 2;
}  // namespace

extern "C" __global__ void __launch_bounds__(NT, ATT_MINB) attn_fwd(const AttnParams p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // Atoms must sit on 1024-byte boundaries (the swizzle reads address bits 7..9).
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK = sQ + BQ * D * 2;
    const uint32_t sV = sK + STAGES * BK * D * 2;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it
    const QueryTile qt = query_tile(p);
    if (qt.empty()) return;
    const int head = qt.head, seq = qt.seq, q_lo = qt.q_lo, rows_here = qt.rows_here;
    const int pos_first = qt.pos_first, pos_last = qt.pos_last, kv_len = qt.kv_len;
    const SeqInfo s = qt.s;
    const int kvh = head / (int)p.group;

    const KeyWalk walk = key_walk(p, seq, head, q_lo, pos_last);
    const int n_iter = walk.n_iter;

    TileRows gm;
    tile_rows(gm, p, s, q_lo, head, kvh, D);

#pragma unroll
    for (int i = 0; i < BQ * CH / NT; ++i) {
        const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
        const bool ok = r < rows_here;
        cp_async_16(sQ + atom_off(r, c * 8, BQ), ok ? (const void*)(gm.qg + r * gm.q_stride + c * 8) : (const void*)p.q, ok);
    }
    auto load_kv = [&](int it) {
        const int k0 = walk.k0(it);
        const int st = it % STAGES;
        const uint32_t dk = sK + st * BK * D * 2, dv = sV + st * BK * D * 2;
#pragma unroll
        for (int i = 0; i < BK * CH / NT; ++i) {
            const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
            const bool ok = k0 + r < kv_len;
            const size_t off = (size_t)(k0 + r) * gm.kv_stride + c * 8;
            const uint32_t o = atom_off(r, c * 8, BK);
            cp_async_16(dk + o, ok ? (const void*)(gm.kg + off) : (const void*)p.k, ok);
            cp_async_16(dv + o, ok ? (const void*)(gm.vg + off) : (const void*)p.v, ok);
        }
    };
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int wrow = wg * 64 + wq * 16;  // first tile row of this warp
    const float sl2 = p.scale_log2;

    // S = Q·K_it for this warpgroup's 64 rows (issued, not waited).
    auto qk_at = [&](float (&sacc)[BK / 2], int it) {
        issue_qk(sacc, sQ + wg * 64 * 128, sK + (it % STAGES) * BK * D * 2);
    };
    // Mask, online softmax (rescales o), P as A fragments.
    auto softmax = [&](float (&sacc)[BK / 2], int it, uint32_t (&pa)[BK / 16][4]) {
        float alpha[2];
        online_softmax(sacc, walk.k0(it), pos_first, kv_len, wrow, lane, sl2, m, l, alpha);
        rescale_o(o, alpha);
        pack_p(sacc, pa);
    };
    // O += P·V_it, P from registers (issued, not waited).
    auto pv_at = [&](const uint32_t (&pa)[BK / 16][4], int it) {
        issue_pv(o, pa, sV + (it % STAGES) * BK * D * 2);
    };

    if (!OVERLAP) {
        if (n_iter > 0) load_kv(0);
        cp_async_commit();
        for (int it = 0; it < n_iter; ++it) {
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();
            if (it + 1 < n_iter) load_kv(it + 1);
            cp_async_commit();
            float sacc[BK / 2];
            qk_at(sacc, it);
            wgmma_wait<0>();
            fence_regs(sacc);
            uint32_t pa[BK / 16][4];
            softmax(sacc, it, pa);
            pv_at(pa, it);
            wgmma_wait<0>();
            fence_regs(o);
        }
    } else {
        // Tiles it+1 (K for the early S) and it+2 (in flight) ahead of the one being finished.
        if (n_iter > 0) load_kv(0);
        cp_async_commit();
        if (n_iter > 1) load_kv(1);
        cp_async_commit();
        float sa[BK / 2], sb[BK / 2];
        if (n_iter > 0) {
            cp_async_wait<1>();
            fence_proxy_async();
            __syncthreads();
            qk_at(sa, 0);
            wgmma_wait<0>();
            fence_regs(sa);
        }
        // Two copies of the body so S alternates between sa and sb without register moves.
        auto step = [&](float (&cur)[BK / 2], float (&nxt)[BK / 2], int it) {
            cp_async_wait<0>();  // tile it+1 landed (issued one iteration ago)
            fence_proxy_async();
            __syncthreads();  // ...for every thread; and stage (it+2)%3 is free
            if (it + 2 < n_iter) load_kv(it + 2);
            cp_async_commit();
            if (it + 1 < n_iter) qk_at(nxt, it + 1);
            uint32_t pa[BK / 16][4];
            softmax(cur, it, pa);
            pv_at(pa, it);
            wgmma_wait<0>();
            fence_regs(nxt);
            fence_regs(o);
        };
        int it = 0;
        for (; it + 1 < n_iter; it += 2) {
            step(sa, sb, it);
            step(sb, sa, it + 1);
        }
        if (it < n_iter) step(sa, sb, it);
    }

    // Epilogue: stage in sQ (every warpgroup is past its last wgmma at the barrier).
    cp_async_wait<0>();
    __syncthreads();
    store_rows(o, m, l, sQ, wrow, lane, rows_here, p, s, q_lo, head);
}
