// attention_wgmma.cuh: what the two Hopper attention kernels share (attention_sm90.cu, the
// single-role wgmma kernel, and attention_ws.cu, the warp-specialized TMA kernel): the wgmma
// wrappers and descriptors, the key-tile walk of one query tile, the
// masked online softmax on a warpgroup's score accumulators, and the epilogue (normalise,
// LSE, staged 16-byte stores). src/attention.rs compiles it in front of either kernel (after
// attention_params.cuh).
//
// Tiles live in shared memory in the canonical 128-byte-swizzled layouts wgmma reads through
// descriptors (and TMA writes with CU_TENSOR_MAP_SWIZZLE_128B): a [rows][D] tile is stored as
// D/64 "atoms" of [rows][64] elements, each row 128 bytes, 16-byte chunk c of row r at chunk
// c ^ (r & 7), atoms 1024-byte aligned.
//   S = Q·Kᵀ : A = Q (K-major), B = K (K-major), m64n{BK}k16, D/16 steps;
//   O += P·V : A = P from registers (the S accumulators, rounded to 16 bits), B = V
//              (N-major: V rows are keys, d contiguous), m64n{D}k16, BK/16 steps.
// The wgmma accumulator layout per warp is the mma.sync one (row g / g+8, columns 8i+2t).
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
constexpr int CH = D / 8;
constexpr int KPB = BS / BK;

static_assert(D == 64 || D == 128, "the wgmma kernels take head_dim 64 or 128");
static_assert(BQ == 64 || BQ == 128, "one or two warpgroups of 64 query rows");
static_assert(BK == 64 || BK == 128, "wgmma n of the score tile");
static_assert(BS % BQ == 0 && BS % BK == 0, "tiles must not straddle index rows");

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

// S = Q·K for one warpgroup's 64 query rows, issued and committed, not waited: `q_rows` is the
// warpgroup's first row in the [BQ][D] Q tile, `k_tile` a [BK][D] K tile (both atom layout).
FP_DEVICE void issue_qk(float (&sacc)[BK / 2], uint32_t q_rows, uint32_t k_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t koff = (kk & 3) * 32;  // 16 elements = 32 bytes into the 128-byte row
        const uint64_t da = desc(q_rows + (kk >> 2) * BQ * 128 + koff, 16, 1024);
        const uint64_t db = desc(k_tile + (kk >> 2) * BK * 128 + koff, 16, 1024);
        mma_qk<BK>(sacc, da, db, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
}

// O += P·V with P from registers, issued and committed, not waited; `v_tile` a [BK][D] V tile.
FP_DEVICE void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[BK / 16][4], uint32_t v_tile) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        // 16 keys = two 8-row core groups (SBO 1024); the D/64 atoms along d at LBO.
        const uint64_t db = desc(v_tile + kk * 16 * 128, BK * 128, 1024);
        mma_pv<D>(o, pa[kk], db);
    }
    wgmma_commit();
}

// The query tile of this CTA: grid (heads, sequences, query tiles), tiles walked last-first so
// the longest causal rows start first. `rows_here` rows exist (a sequence's last tile is short);
// query row r sits at position pos_first + r. Empty when the sequence has fewer tiles.
struct QueryTile {
    int head, seq, q_lo, rows_here, pos_first, pos_last, kv_len;
    SeqInfo s;
    FP_DEVICE bool empty() const { return q_lo >= (int)s.q_len; }
};

#ifndef ATT_CHUNK
#define ATT_CHUNK 1
#endif

// The CTA's (head, query tile). The grid is (heads, sequences, tiles) and CTAs start in linear
// order, tiles longest first. With ATT_CHUNK > 1 the order inside a sequence's plane is
// regrouped into chunks of ATT_CHUNK tiles, each chunk listing every head (kv groups adjacent)
// with its ATT_CHUNK tiles: the CTAs resident at once are then a few kv groups over
// neighbouring query tiles, which read the same K/V blocks (shared columns and diagonals of
// sparse rows, the same causal prefix of dense ones) while they are still in L2.
FP_DEVICE QueryTile query_tile(const AttnParams& p) {
    QueryTile t;
    int head = blockIdx.x, z = blockIdx.z;
    if (ATT_CHUNK > 1) {
        const int h = (int)gridDim.x, tiles = (int)gridDim.z;
        const int lin = z * h + head;
        const int chunk = lin / (h * ATT_CHUNK);
        const int here = min(ATT_CHUNK, tiles - chunk * ATT_CHUNK);
        const int r = lin - chunk * h * ATT_CHUNK;
        head = r / here;
        z = chunk * ATT_CHUNK + r % here;
    }
    t.head = head;
    t.seq = blockIdx.y;
    const int tile = (int)p.num_tiles - 1 - z;
    t.s = p.seqs[t.seq];
    const int q_len = (int)t.s.q_len;
    t.kv_len = (int)t.s.kv_len;
    t.q_lo = tile * BQ;
    t.rows_here = min(BQ, q_len - t.q_lo);
    t.pos_first = t.kv_len - q_len + t.q_lo;
    t.pos_last = t.pos_first + t.rows_here - 1;
    return t;
}

// The key tiles one query tile visits, walked in descending key order (the first tiles are the
// only ones that need the causal / kv_len mask): the listed blocks of its CSR row, or every
// causal block (dense, or a head flagged in p.dense_walk), split in KPB tiles each, tiles
// wholly after the tile's last query dropped. Producer and consumers of the warp-specialized
// kernel each build the same walk.
struct KeyWalk {
    const uint32_t* cols;  // the CSR row; null: dense
    int top;               // index of the last tile in ascending order
    int n_iter;            // tiles to visit
    // First key of the it-th visited tile.
    FP_DEVICE int k0(int it) const {
        const int jj = top - it;
        const int ci = jj / KPB, sub = jj - ci * KPB;
        const int c = cols ? (int)__ldg(cols + ci) : ci;
        return c * BS + sub * BK;
    }
};

FP_DEVICE KeyWalk key_walk(const AttnParams& p, int seq, int head, int q_lo, int pos_last) {
    KeyWalk w;
    int ncols;
    if (p.head_row_start != nullptr && !(p.dense_walk != nullptr && p.dense_walk[seq * p.num_heads + head] != 0)) {
        const uint32_t row = p.head_row_start[seq * p.num_heads + head] + (uint32_t)(q_lo / BS);
        const uint32_t a = p.row_offsets[row], b = p.row_offsets[row + 1];
        w.cols = p.col_indices + a;
        ncols = (int)(b - a);
    } else {
        w.cols = nullptr;
        ncols = pos_last / BS + 1;
    }
    w.top = ncols * KPB - 1;
    while (w.top >= 0 && w.k0(0) > pos_last) --w.top;
    w.n_iter = w.top + 1;
    return w;
}

// Masks one warp's rows of a score tile starting at key k0 (tile rows wrow.., first query at
// position pos_first), then the online-softmax step in base 2: updates m and l, turns the
// scores into probabilities in place, and returns in alpha the factor the O rows must be
// multiplied by before this tile's P·V is added.
FP_DEVICE void online_softmax(float (&sacc)[BK / 2], int k0, int pos_first, int kv_len, int wrow,
                              int lane, float sl2, float (&m)[2], float (&l)[2], float (&alpha)[2]) {
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
        alpha[h] = fast_exp2(m[h] - m_use);
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
        l[h] = l[h] * alpha[h] + rs;
    }
}

FP_DEVICE void rescale_o(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            o[i * 4 + 2 * h] *= alpha[h];
            o[i * 4 + 2 * h + 1] *= alpha[h];
        }
}

// P (probabilities in the S accumulators) as the A fragments of the P·V wgmma.
FP_DEVICE void pack_p(const float (&sacc)[BK / 2], uint32_t (&pa)[BK / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        pa[kk][0] = Elem::pack2(sacc[8 * kk + 0], sacc[8 * kk + 1]);
        pa[kk][1] = Elem::pack2(sacc[8 * kk + 2], sacc[8 * kk + 3]);
        pa[kk][2] = Elem::pack2(sacc[8 * kk + 4], sacc[8 * kk + 5]);
        pa[kk][3] = Elem::pack2(sacc[8 * kk + 6], sacc[8 * kk + 7]);
    }
}

// Epilogue of one warp's 16 rows (tile rows wrow..wrow+15): normalise, write the LSE, stage the
// rows in `stage` (a [BQ][D] atom-layout tile; the warp touches only its own rows, so a
// warpgroup may run this while another still reads its Q rows of the same tile), 16-byte stores.
FP_DEVICE void store_rows(const float (&o)[D / 2], const float (&m)[2], const float (&l)[2],
                          uint32_t stage, int wrow, int lane, int rows_here, const AttnParams& p,
                          const SeqInfo& s, int q_lo, int head) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float lt = l[h];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int row = wrow + (lane >> 2) + h * 8;
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
            st_shared_u32(stage + atom_off(row, i * 8, BQ) + ((lane & 3) << 2),
                          Elem::pack2(o[i * 4 + 2 * h] * inv, o[i * 4 + 2 * h + 1] * inv));
        if (p.lse != nullptr && (lane & 3) == 0 && row < rows_here)
            p.lse[(size_t)(s.q_start + q_lo + row) * p.num_heads + head] =
                lt > 0.f ? (m[h] + __log2f(lt)) * LN2 : NEG_INF;
    }
    __syncwarp();
    const size_t q_stride = (size_t)p.num_heads * D;
#pragma unroll
    for (int i = lane; i < 16 * CH; i += 32) {
        const int r = wrow + i / CH, c = i % CH;
        if (r < rows_here) {
            const uint4 val = ld_shared_u128(stage + atom_off(r, c * 8, BQ));
            *reinterpret_cast<uint4*>(p.out + (size_t)(s.q_start + q_lo + r) * q_stride + (size_t)head * D + c * 8) = val;
        }
    }
}

}  // namespace
