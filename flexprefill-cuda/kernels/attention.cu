// Block-sparse causal flash-attention forward (FlexPrefill's attention, and dense attention
// when every causal block is listed).
//
// One CTA computes one query tile (ATT_BQ rows) of one (sequence, q-head) over the key blocks
// of its CSR row (BlockIndex: rows ordered (sequence, head, query block)), or over every causal
// key block when no index is given (dense). K/V are read through the head's kv head
// (GQA by head mapping, no copies). Tensor cores: mma.sync m16n8k16 with f32 accumulators,
// operands from swizzled shared memory via ldmatrix, K/V tiles streamed by cp.async in an
// ATT_STAGES-deep ring. Online softmax in base 2: S is scaled by softmax_scale·log2(e) once,
// exp2 runs on the SFU.
//
// Semantics (checked against the f64 oracle in tests/gpu_attention.rs):
// - chunked prefill: a sequence's queries are its last q_len positions; query i (0-based in the
//   chunk) is at position kv_len - q_len + i and sees keys 0..=position (bottom-right causal);
//   query blocks start at the chunk's first query, key blocks at key 0;
// - inside a listed block the causal mask is token-level; keys >= kv_len do not exist;
// - a row that sees no key (an index without its diagonal) gets output 0 and lse -inf;
// - lse (optional, natural log) is ln Σ_j exp(scale · q·k_j) over the keys the row attended.
//
// Compile-time parameters (see src/attention.rs, `AttnTile`):
//   KEY_HEAD_DIM (D), KEY_BLOCK_SIZE (BS, the index's block), ATT_BQ (query rows per CTA,
//   divides BS), ATT_BK (keys per tile, divides BS), ATT_WARPS, ATT_STAGES, ATT_Q_IN_REGS,
//   ATT_MINB (min CTAs per SM for __launch_bounds__).
// Compiled after attention_params.cuh (the parameter block; src/attention.rs joins them).
#include "flexprefill_common.cuh"

#ifndef ATT_BQ
#define ATT_BQ 128
#endif
#ifndef ATT_BK
#define ATT_BK 64
#endif
#ifndef ATT_WARPS
#define ATT_WARPS 4
#endif
#ifndef ATT_STAGES
#define ATT_STAGES 2
#endif
#ifndef ATT_Q_IN_REGS
#define ATT_Q_IN_REGS 0
#endif
#ifndef ATT_MINB
#define ATT_MINB 1
#endif

namespace {

constexpr int D = KEY_HEAD_DIM;
constexpr int BS = KEY_BLOCK_SIZE;
constexpr int BQ = ATT_BQ;
constexpr int BK = ATT_BK;
constexpr int NW = ATT_WARPS;
constexpr int NT = NW * 32;
constexpr int STAGES = ATT_STAGES;
constexpr int MT = BQ / (16 * NW);  // 16-row m-tiles per warp
constexpr int CH = D / 8;           // 16-byte chunks per row
constexpr int KPB = BS / BK;        // key tiles per index block
constexpr bool Q_IN_REGS = ATT_Q_IN_REGS != 0;

static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head_dim must be a multiple of 16 in [16, 256]");
// Rows of a multiple of 8 chunks are XOR-swizzled in place; others get one spare chunk per row
// (stride CH+1 chunks, odd since CH is even), which spreads 8 consecutive rows over 8 bank
// groups just as well.
constexpr bool SWIZZLE = CH % 8 == 0;
constexpr int RS = SWIZZLE ? D : D + 8;  // row stride in elements
static_assert(BQ % (16 * NW) == 0 && MT >= 1, "BQ must be a multiple of 16 * warps");
static_assert(BS % BQ == 0, "a query tile must not straddle two index rows");
static_assert(BS % BK == 0 && BK % 16 == 0, "key tiles must split the block in 16-key steps");
static_assert(STAGES >= 2, "the ring needs two stages");
static_assert(!Q_IN_REGS || MT == 1, "Q fragments in registers only with one m-tile per warp");

// Element offset of 16-byte chunk `c` of row `r` in a [rows][D] tile, XOR-swizzled so that the
// 8 rows an ldmatrix phase reads (same logical chunk) land in 8 different bank groups.
FP_DEVICE int swz(int r, int c) { return SWIZZLE ? r * D + ((c ^ (r & 7)) << 3) : r * RS + (c << 3); }

}  // namespace

extern "C" __global__ void __launch_bounds__(NT, ATT_MINB) attn_fwd(const AttnParams p) {
    extern __shared__ __align__(128) uint8_t smem_raw[];
    uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
    uint16_t* sK = sQ + BQ * RS;
    uint16_t* sV = sK + STAGES * BK * RS;
    const uint32_t sQ_a = smem_u32(sQ), sK_a = smem_u32(sK), sV_a = smem_u32(sV);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int head = blockIdx.x, seq = blockIdx.y;
    // Heavy rows first: the grid's slowest dimension walks query tiles from the last (the
    // longest causal rows) to the first, so short rows fill the tail of the wave.
    const int tile = (int)p.num_tiles - 1 - (int)blockIdx.z;
    const SeqInfo s = p.seqs[seq];
    const int q_len = (int)s.q_len, kv_len = (int)s.kv_len;
    const int q_lo = tile * BQ;
    if (q_lo >= q_len) return;
    const int rows_here = min(BQ, q_len - q_lo);
    const int pos_first = kv_len - q_len + q_lo;  // absolute position of tile row 0
    const int pos_last = pos_first + rows_here - 1;
    const int kvh = head / (int)p.group;

    // Key blocks of this tile's index row (ascending), or all causal blocks (dense, or a head
    // flagged in p.dense_walk).
    const uint32_t* cols = nullptr;
    int ncols;
    if (p.head_row_start != nullptr && !(p.dense_walk != nullptr && p.dense_walk[seq * p.num_heads + head] != 0)) {
        const uint32_t row = p.head_row_start[seq * p.num_heads + head] + (uint32_t)(q_lo / BS);
        const uint32_t a = p.row_offsets[row], b = p.row_offsets[row + 1];
        cols = p.col_indices + a;
        ncols = (int)(b - a);
    } else {
        ncols = pos_last / BS + 1;
    }
    // Key tiles in descending key order: virtual tile jj covers keys tile_k0(jj) + [0, BK).
    auto tile_k0 = [&](int jj) -> int {
        const int ci = jj / KPB, sub = jj - ci * KPB;
        const int c = cols ? (int)__ldg(cols + ci) : ci;
        return c * BS + sub * BK;
    };
    // Tiles wholly after the last query (the upper half of a diagonal block split into BK
    // tiles, or a block past kv_len) hold no visible key: skip them. Columns are sorted, so
    // they are exactly the top ones.
    int top = ncols * KPB - 1;
    while (top >= 0 && tile_k0(top) > pos_last) --top;
    const int n_iter = top + 1;

    TileRows gm;
    tile_rows(gm, p, s, q_lo, head, kvh, D);

    // ---- prologue: Q and the first STAGES-1 key tiles --------------------------------------
#pragma unroll
    for (int i = 0; i < (BQ * CH + NT - 1) / NT; ++i) {
        const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
        if ((BQ * CH) % NT != 0 && idx >= BQ * CH) break;
        const bool ok = r < rows_here;
        cp_async_16(sQ_a + 2 * swz(r, c), ok ? (const void*)(gm.qg + r * gm.q_stride + c * 8) : (const void*)p.q, ok);
    }
    auto load_kv = [&](int it) {
        const int k0 = tile_k0(top - it);
        const int st = it % STAGES;
        const uint32_t dk = sK_a + 2 * st * BK * RS, dv = sV_a + 2 * st * BK * RS;
#pragma unroll
        for (int i = 0; i < (BK * CH + NT - 1) / NT; ++i) {
            const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
            if ((BK * CH) % NT != 0 && idx >= BK * CH) break;
            const bool ok = k0 + r < kv_len;
            const size_t off = (size_t)(k0 + r) * gm.kv_stride + c * 8;
            cp_async_16(dk + 2 * swz(r, c), ok ? (const void*)(gm.kg + off) : (const void*)p.k, ok);
            cp_async_16(dv + 2 * swz(r, c), ok ? (const void*)(gm.vg + off) : (const void*)p.v, ok);
        }
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < n_iter) load_kv(st);
        cp_async_commit();
    }

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][dn][e] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const int wrow = warp * 16 * MT;  // first tile row of this warp
    const float sl2 = p.scale_log2;

    uint32_t qreg[Q_IN_REGS ? D / 16 : 1][4];

    for (int it = 0; it < n_iter; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        // Refill the stage everyone finished with in the previous iteration.
        if (it + STAGES - 1 < n_iter) load_kv(it + STAGES - 1);
        cp_async_commit();

        if (Q_IN_REGS && it == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(qreg[kk], sQ_a + 2 * swz(wrow + (lane & 15), kk * 2 + (lane >> 4)));
        }

        const int st = it % STAGES;
        const uint32_t kst = sK_a + 2 * st * BK * RS, vst = sV_a + 2 * st * BK * RS;
        const int k0 = tile_k0(top - it);

        // S = Q Kᵀ for this warp's rows.
        float sacc[MT][BK / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BK / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) sacc[mt][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[MT][4];
            if (Q_IN_REGS) {
#pragma unroll
                for (int e = 0; e < 4; ++e) qa[0][e] = qreg[Q_IN_REGS ? kk : 0][e];
            } else {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    ldmatrix_x4(qa[mt], sQ_a + 2 * swz(wrow + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int nn = 0; nn < BK / 16; ++nn) {
                uint32_t kb[4];
                ldmatrix_x4(kb, kst + 2 * swz(nn * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(sacc[mt][2 * nn], qa[mt], kb[0], kb[1]);
                    Elem::mma(sacc[mt][2 * nn + 1], qa[mt], kb[2], kb[3]);
                }
            }
        }

        // Token-level causal mask (and keys past kv_len), only where some key of the tile is
        // after some row's position. Descending order puts these tiles first.
        if (k0 + BK - 1 > pos_first || k0 + BK > kv_len) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < BK / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = wrow + mt * 16 + (lane >> 2) + ((e >> 1) << 3);
                        const int key = k0 + n * 8 + ((lane & 3) << 1) + (e & 1);
                        if (key > pos_first + row || key >= kv_len) sacc[mt][n][e] = NEG_INF;
                    }
        }

        // Online softmax, base 2. Each row lives in one quad of lanes (same lane >> 2).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = NEG_INF;
#pragma unroll
                for (int n = 0; n < BK / 8; ++n)
                    mx = fmaxf(mx, fmaxf(sacc[mt][n][2 * h], sacc[mt][n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[mt][h], mx * sl2);
                // A row with no visible key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
                const float m_use = m_new == NEG_INF ? 0.f : m_new;
                const float alpha = fast_exp2(m[mt][h] - m_use);
                m[mt][h] = m_new;
                float rs = 0.f;
#pragma unroll
                for (int n = 0; n < BK / 8; ++n)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        const float pv = fast_exp2(fmaf(sacc[mt][n][e], sl2, -m_use));
                        sacc[mt][n][e] = pv;
                        rs += pv;
                    }
                l[mt][h] = l[mt][h] * alpha + rs;
#pragma unroll
                for (int dn = 0; dn < D / 8; ++dn) {
                    o[mt][dn][2 * h] *= alpha;
                    o[mt][dn][2 * h + 1] *= alpha;
                }
            }

        // O += P V: P's accumulators become A fragments in registers (16 keys per k-step).
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = Elem::pack2(sacc[mt][2 * kk][0], sacc[mt][2 * kk][1]);
                pa[mt][1] = Elem::pack2(sacc[mt][2 * kk][2], sacc[mt][2 * kk][3]);
                pa[mt][2] = Elem::pack2(sacc[mt][2 * kk + 1][0], sacc[mt][2 * kk + 1][1]);
                pa[mt][3] = Elem::pack2(sacc[mt][2 * kk + 1][2], sacc[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, vst + 2 * swz(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dn * 2 + (lane >> 4)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Elem::mma(o[mt][2 * dn], pa[mt], vb[0], vb[1]);
                    Elem::mma(o[mt][2 * dn + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }

    // ---- epilogue: normalise, stage this warp's rows in sQ, write 16-byte chunks ------------
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float lt = l[mt][h];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            const int row = wrow + mt * 16 + (lane >> 2) + h * 8;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn)
                st_shared_u32(sQ_a + 2 * (swz(row, dn) + ((lane & 3) << 1)),
                              Elem::pack2(o[mt][dn][2 * h] * inv, o[mt][dn][2 * h + 1] * inv));
            if (p.lse != nullptr && (lane & 3) == 0 && row < rows_here)
                p.lse[(size_t)(s.q_start + q_lo + row) * p.num_heads + head] =
                    lt > 0.f ? (m[mt][h] + __log2f(lt)) * LN2 : NEG_INF;
        }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * MT * CH; i += 32) {
        const int r = wrow + i / CH, c = i % CH;
        if (r < rows_here) {
            const uint4 val = ld_shared_u128(sQ_a + 2 * swz(r, c));
            *reinterpret_cast<uint4*>(p.out + (size_t)(s.q_start + q_lo + r) * gm.q_stride + (size_t)head * D + c * 8) = val;
        }
    }
}
