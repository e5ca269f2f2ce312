// Block-sparse causal flash-attention forward for Hopper (sm_90a): the same semantics, grid
// and parameters as attention.cu (read its header), with the two matrix products on wgmma.
//
// A CTA holds ATT_BQ = 64·W query rows, one warpgroup (4 warps) per 64 rows. Q, K and V tiles
// live in shared memory in the canonical 128-byte-swizzled layouts wgmma reads through
// descriptors: a [rows][D] tile is stored as D/64 "atoms" of [rows][64] elements, each row
// 128 bytes, 16-byte chunk c of row r at chunk c ^ (r & 7), atoms 1024-byte aligned.
//   S = Q·Kᵀ : A = Q (K-major), B = K (K-major), m64n{BK}k16, D/16 steps;
//   O += P·V : A = P from registers (the S accumulators, rounded to 16 bits), B = V
//              (N-major: V rows are keys, d contiguous), m64n{D}k16, BK/16 steps.
// K/V tiles arrive by cp.async (all threads) into a 2-stage ring; a proxy fence orders those
// generic-proxy writes before the async-proxy wgmma reads. Online softmax as in attention.cu:
// the wgmma accumulator layout per warp is the mma.sync one (row g / g+8, columns 8i+2t).
#include "flexprefill_common.cuh"

// The m64n64 / m64n128 wrappers not used by one instantiation are fine.
#pragma nv_diag_suppress 177

#ifndef ATT_BQ
#define ATT_BQ 128
#endif
#ifndef ATT_BK
#define ATT_BK 128
#endif
#ifndef ATT_MINB
#define ATT_MINB 1
#endif
// 1: three-stage K/V ring and S_{j+1} = Q·K_{j+1} issued before the softmax of S_j, so the
// tensor cores work while the warpgroup computes exponentials (FA3's intra-warpgroup overlap).
#ifndef ATT_OVERLAP
#define ATT_OVERLAP 0
#endif

#if defined(KEY_DTYPE_F16)
#define WG_T "f16"
#else
#define WG_T "bf16"
#endif

// ---- wgmma wrappers (written out by a script: 32/64 accumulator operands each) ----
// D (+)= A·Bᵀ, A and B K-major in shared memory (descriptors); scale_d 0 overwrites D.
FP_DEVICE void wgmma_ss_m64n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_T "." WG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}

// D += A·B, A in registers (mma.sync A-fragment layout per warp), B N-major in shared memory.
FP_DEVICE void wgmma_rs_m64n64_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_T "." WG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// D (+)= A·Bᵀ, A and B K-major in shared memory (descriptors); scale_d 0 overwrites D.
FP_DEVICE void wgmma_ss_m64n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_T "." WG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}

// D += A·B, A in registers (mma.sync A-fragment layout per warp), B N-major in shared memory.
FP_DEVICE void wgmma_rs_m64n128_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_T "." WG_T " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}


namespace {

constexpr int D = KEY_HEAD_DIM;
constexpr int BS = KEY_BLOCK_SIZE;
constexpr int BQ = ATT_BQ;
constexpr int BK = ATT_BK;
constexpr int WG = BQ / 64;  // warpgroups
constexpr int NT = WG * 128;
constexpr bool OVERLAP = ATT_OVERLAP != 0;
constexpr int STAGES = OVERLAP ? 3 : 2;
constexpr int CH = D / 8;
constexpr int KPB = BS / BK;

static_assert(D == 64 || D == 128, "the wgmma kernel takes head_dim 64 or 128");
static_assert(BQ == 64 || BQ == 128, "one or two warpgroups");
static_assert(BK == 64 || BK == 128, "wgmma n of the score tile");
static_assert(BS % BQ == 0 && BS % BK == 0, "tiles must not straddle index rows");

#define NEG_INF (-__int_as_float(0x7f800000))
constexpr float LN2 = 0.6931471805599453f;

struct SeqInfo {
    uint32_t q_start, k_start, q_len, kv_len;
};

// Must match `AttnParams` in src/attention.rs field for field.
struct AttnParams {
    const uint16_t* q;
    const uint16_t* k;
    const uint16_t* v;
    uint16_t* out;
    float* lse;
    const uint32_t* head_row_start;
    const uint32_t* row_offsets;
    const uint32_t* col_indices;
    const SeqInfo* seqs;
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t group;
    uint32_t num_tiles;
    float scale_log2;
};

// Byte offset of element column `col` (a multiple of 8) of row `r` in a [rows][D] tile stored
// as 128B-swizzled atoms.
FP_DEVICE uint32_t atom_off(int r, int col, int rows) {
    return (uint32_t)((col >> 6) * rows * 128 + r * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4));
}

// wgmma shared-memory descriptor: start address, leading/stride byte offsets, 128B swizzle.
FP_DEVICE uint64_t desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

FP_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FP_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
FP_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
FP_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving register reads/writes across the async MMA window.
template <int N>
FP_DEVICE void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
FP_DEVICE void mma_qk(float (&s)[N / 2], uint64_t da, uint64_t db, int scale_d);
template <>
FP_DEVICE void mma_qk<64>(float (&s)[32], uint64_t da, uint64_t db, int scale_d) { wgmma_ss_m64n64(s, da, db, scale_d); }
template <>
FP_DEVICE void mma_qk<128>(float (&s)[64], uint64_t da, uint64_t db, int scale_d) { wgmma_ss_m64n128(s, da, db, scale_d); }
template <int N>
FP_DEVICE void mma_pv(float (&o)[N / 2], const uint32_t (&a)[4], uint64_t db);
template <>
FP_DEVICE void mma_pv<64>(float (&o)[32], const uint32_t (&a)[4], uint64_t db) { wgmma_rs_m64n64_tb(o, a, db); }
template <>
FP_DEVICE void mma_pv<128>(float (&o)[64], const uint32_t (&a)[4], uint64_t db) { wgmma_rs_m64n128_tb(o, a, db); }

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
    const int head = blockIdx.x, seq = blockIdx.y;
    const int tile = (int)p.num_tiles - 1 - (int)blockIdx.z;  // heavy rows first
    const SeqInfo s = p.seqs[seq];
    const int q_len = (int)s.q_len, kv_len = (int)s.kv_len;
    const int q_lo = tile * BQ;
    if (q_lo >= q_len) return;
    const int rows_here = min(BQ, q_len - q_lo);
    const int pos_first = kv_len - q_len + q_lo;
    const int pos_last = pos_first + rows_here - 1;
    const int kvh = head / (int)p.group;

    const uint32_t* cols = nullptr;
    int ncols;
    if (p.head_row_start != nullptr) {
        const uint32_t row = p.head_row_start[seq * p.num_heads + head] + (uint32_t)(q_lo / BS);
        const uint32_t a = p.row_offsets[row], b = p.row_offsets[row + 1];
        cols = p.col_indices + a;
        ncols = (int)(b - a);
    } else {
        ncols = pos_last / BS + 1;
    }
    auto tile_k0 = [&](int jj) -> int {
        const int ci = jj / KPB, sub = jj - ci * KPB;
        const int c = cols ? (int)__ldg(cols + ci) : ci;
        return c * BS + sub * BK;
    };
    int top = ncols * KPB - 1;
    while (top >= 0 && tile_k0(top) > pos_last) --top;
    const int n_iter = top + 1;

    const size_t q_stride = (size_t)p.num_heads * D;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const uint16_t* qg = p.q + (size_t)(s.q_start + q_lo) * q_stride + (size_t)head * D;
    const uint16_t* kg = p.k + (size_t)s.k_start * kv_stride + (size_t)kvh * D;
    const uint16_t* vg = p.v + (size_t)s.k_start * kv_stride + (size_t)kvh * D;

#pragma unroll
    for (int i = 0; i < BQ * CH / NT; ++i) {
        const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
        const bool ok = r < rows_here;
        cp_async_16(sQ + atom_off(r, c * 8, BQ), ok ? (const void*)(qg + r * q_stride + c * 8) : (const void*)p.q, ok);
    }
    auto load_kv = [&](int it) {
        const int k0 = tile_k0(top - it);
        const int st = it % STAGES;
        const uint32_t dk = sK + st * BK * D * 2, dv = sV + st * BK * D * 2;
#pragma unroll
        for (int i = 0; i < BK * CH / NT; ++i) {
            const int idx = tid + i * NT, r = idx / CH, c = idx % CH;
            const bool ok = k0 + r < kv_len;
            const size_t off = (size_t)(k0 + r) * kv_stride + c * 8;
            const uint32_t o = atom_off(r, c * 8, BK);
            cp_async_16(dk + o, ok ? (const void*)(kg + off) : (const void*)p.k, ok);
            cp_async_16(dv + o, ok ? (const void*)(vg + off) : (const void*)p.v, ok);
        }
    };
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int wrow = wg * 64 + wq * 16;  // first tile row of this warp
    const float sl2 = p.scale_log2;

    // S = Q·K_it for this warpgroup's 64 rows (issued, not waited).
    auto issue_qk = [&](float (&sacc)[BK / 2], int it) {
        const uint32_t kst = sK + (it % STAGES) * BK * D * 2;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t koff = (kk & 3) * 32;  // 16 elements = 32 bytes into the 128-byte row
            const uint64_t da = desc(sQ + (kk >> 2) * BQ * 128 + wg * 64 * 128 + koff, 16, 1024);
            const uint64_t db = desc(kst + (kk >> 2) * BK * 128 + koff, 16, 1024);
            mma_qk<BK>(sacc, da, db, kk > 0 ? 1 : 0);
        }
        wgmma_commit();
    };
    // Mask, online softmax (rescales o), P as A fragments.
    auto softmax = [&](float (&sacc)[BK / 2], int it, uint32_t (&pa)[BK / 16][4]) {
        const int k0 = tile_k0(top - it);
        if (k0 + BK - 1 > pos_first || k0 + BK > kv_len) {
#pragma unroll
            for (int i = 0; i < BK / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = wrow + (lane >> 2) + ((e >> 1) << 3);
                    const int key = k0 + i * 8 + ((lane & 3) << 1) + (e & 1);
                    if (key > pos_first + row || key >= kv_len) sacc[i * 4 + e] = NEG_INF;
                }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = NEG_INF;
#pragma unroll
            for (int i = 0; i < BK / 8; ++i) mx = fmaxf(mx, fmaxf(sacc[i * 4 + 2 * h], sacc[i * 4 + 2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[h], mx * sl2);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;
            const float alpha = fast_exp2(m[h] - m_use);
            m[h] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int i = 0; i < BK / 8; ++i)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const float pv = fast_exp2(fmaf(sacc[i * 4 + e], sl2, -m_use));
                    sacc[i * 4 + e] = pv;
                    rs += pv;
                }
            l[h] = l[h] * alpha + rs;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[i * 4 + 2 * h] *= alpha;
                o[i * 4 + 2 * h + 1] *= alpha;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            pa[kk][0] = Elem::pack2(sacc[8 * kk + 0], sacc[8 * kk + 1]);
            pa[kk][1] = Elem::pack2(sacc[8 * kk + 2], sacc[8 * kk + 3]);
            pa[kk][2] = Elem::pack2(sacc[8 * kk + 4], sacc[8 * kk + 5]);
            pa[kk][3] = Elem::pack2(sacc[8 * kk + 6], sacc[8 * kk + 7]);
        }
    };
    // O += P·V_it, P from registers (issued, not waited).
    auto issue_pv = [&](const uint32_t (&pa)[BK / 16][4], int it) {
        const uint32_t vst = sV + (it % STAGES) * BK * D * 2;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            // 16 keys = two 8-row core groups (SBO 1024); the D/64 atoms along d at LBO.
            const uint64_t db = desc(vst + kk * 16 * 128, BK * 128, 1024);
            mma_pv<D>(o, pa[kk], db);
        }
        wgmma_commit();
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
            issue_qk(sacc, it);
            wgmma_wait<0>();
            fence_regs(sacc);
            uint32_t pa[BK / 16][4];
            softmax(sacc, it, pa);
            issue_pv(pa, it);
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
            issue_qk(sa, 0);
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
            if (it + 1 < n_iter) issue_qk(nxt, it + 1);
            uint32_t pa[BK / 16][4];
            softmax(cur, it, pa);
            issue_pv(pa, it);
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

    // Epilogue: normalise, stage in sQ (plain swizzled [row][D] rows; every warpgroup is past
    // its last wgmma at the barrier), 16-byte stores.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float lt = l[h];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int row = wrow + (lane >> 2) + h * 8;
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
            st_shared_u32(sQ + 2 * (row * D + ((i ^ (row & 7)) << 3) + ((lane & 3) << 1)),
                          Elem::pack2(o[i * 4 + 2 * h] * inv, o[i * 4 + 2 * h + 1] * inv));
        if (p.lse != nullptr && (lane & 3) == 0 && row < rows_here)
            p.lse[(size_t)(s.q_start + q_lo + row) * p.num_heads + head] =
                lt > 0.f ? (m[h] + __log2f(lt)) * LN2 : NEG_INF;
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * CH; i += 32) {
        const int r = wrow + i / CH, c = i % CH;
        if (r < rows_here) {
            const uint4 val = ld_shared_u128(sQ + 2 * (r * D + ((c ^ (r & 7)) << 3)));
            *reinterpret_cast<uint4*>(p.out + (size_t)(s.q_start + q_lo + r) * q_stride + (size_t)head * D + c * 8) = val;
        }
    }
}
