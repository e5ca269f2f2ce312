// Query-aware heads: the pooled block map and its row softmax.
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

// ---- kernel 4: query-aware heads ----------------------------------------------------------

// The pooled block map of a query-aware head (core's pooled_block_attention: f64 dot products
// summed in order, rounded once to f32 (optional bf16), f64 softmax summed in order, each
// entry rounded once to f32), in two kernels.
//
// sel_qa_map: the logits, as a register-tiled f64 product. A CTA (128 threads, 4 warps) takes
// one tile of QM_ROWS (64) query-block rows × QM_COLS (128) key blocks of one head; each warp
// a 32 × 64 quarter, each lane 8 rows × 8 key blocks with 64 f64 accumulators. The head
// dimension is walked in chunks of QM_TK (16; every head_dim is a multiple) staged in shared
// memory as f64 (a product of two widened f32s is exact, so fma gives core's mul + add), double
// buffered, the next chunk loaded from global memory into registers while this one is used.
// Every dot product is still one chain over t = 0..D in order: core's sums, bit for bit.
// Shared-memory traffic per fma is what bounded the old 4 × 1 layout (each f64 operand costs
// the warp two shared-memory cycles whatever the broadcast, an fma half a cycle): 8 × 8 loads
// 16 operands per 64 fmas. Lane bits: key group from bits 0, 2, 3, row group from bits 1, 4,
// so lane pairs n, n^1 share a row and n, n^2 a key block (Volta's rule for doubled
// bandwidth on uniform pairs, where the hardware applies it).
// tiles[i] = (sequence, first row, first key block, 0), only tiles touching the causal region,
// full ones first so that the lighter diagonal tiles fill the tail. Grid (tiles · H): CTA b
// takes tile b / H of head b % H. Dynamic smem 2 · (QM_ROWS + QM_COLS) · (QM_TK + 1) · 8.
#define QM_THREADS 128
#define QM_ROWS 64  // select.rs QM_ROWS
#ifndef QM_COLS
#define QM_COLS 128  // the host passes select.rs QM_COLS
#endif
#define QM_TK 16     // select.rs QM_TK
#define QM_LD (QM_TK + 1)  // odd row stride (doubles): consecutive rows in different banks
#define QM_STAGE ((QM_ROWS + QM_COLS) * QM_TK / 4 / QM_THREADS)  // float4 per thread per chunk
static_assert(QM_COLS == 128, "sel_qa_map's warp layout covers 2 x 64 key blocks");
static_assert((QM_ROWS + QM_COLS) * QM_TK % (4 * QM_THREADS) == 0, "whole float4s per thread");
static_assert(QM_ROWS * QM_TK % (4 * QM_THREADS) == 0, "a thread's float4s are all q or all k");
extern "C" __global__ void __launch_bounds__(QM_THREADS, 2)
sel_qa_map(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, const uint4* __restrict__ tiles,
           SelParams p, const int* __restrict__ pattern,
           const float* __restrict__ q_pooled, const float* __restrict__ k_pooled, float* __restrict__ map) {
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned H = p.num_heads;
    const int h = blockIdx.x % H;
    const uint4 tile = tiles[blockIdx.x / H];
    const unsigned s = tile.x;
    if (pattern[s * H + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned D = p.head_dim, nkb = sd.nkb, r0 = tile.y, c0 = tile.z;
    const unsigned rows = min((unsigned)QM_ROWS, sd.nqb - r0);
    const unsigned cols = min((unsigned)QM_COLS, nkb - c0);
    if (c0 > g.last_diag(r0 + rows - 1)) return;  // the host lists no such tile; kept as a guard
    const int hk = h / (p.num_heads / p.num_kv_heads);
    const float* qv = q_pooled + ((size_t)sd.qb_off * H + (size_t)h * sd.nqb + r0) * D;
    const float* kv = k_pooled + ((size_t)sd.kb_off * p.num_kv_heads + (size_t)hk * nkb + c0) * D;
    float* out = map + (size_t)sel[s].map_off * H + ((size_t)h * sd.nqb + r0) * nkb + c0;
    double* buf = (double*)smem;  // 2 × [QM_ROWS + QM_COLS][QM_LD]: q rows, then key blocks
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Staging: float4 number f = tid + QM_THREADS·u of a chunk; 4 consecutive lanes read one
    // row's 16 values (64 contiguous bytes), rows past the tile read as zeros.
    float4 pre[QM_STAGE];
    auto load = [&](unsigned t0) {
#pragma unroll
        for (int u = 0; u < QM_STAGE; ++u) {
            const unsigned f = tid + QM_THREADS * u, t = t0 + 4 * (f % 4);
            if (u < QM_ROWS * QM_TK / 4 / QM_THREADS) {
                const unsigned r = f / 4;
                pre[u] = r < rows ? *(const float4*)(qv + (size_t)r * D + t) : make_float4(0.f, 0.f, 0.f, 0.f);
            } else {
                const unsigned c = f / 4 - QM_ROWS;
                pre[u] = c < cols ? *(const float4*)(kv + (size_t)c * D + t) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    };
    auto store = [&](double* b) {
#pragma unroll
        for (int u = 0; u < QM_STAGE; ++u) {
            const unsigned f = tid + QM_THREADS * u;
            double* d = b + (f / 4) * QM_LD + 4 * (f % 4);
            d[0] = (double)pre[u].x;
            d[1] = (double)pre[u].y;
            d[2] = (double)pre[u].z;
            d[3] = (double)pre[u].w;
        }
    };

    const unsigned cg = (lane & 1u) | ((lane >> 1) & 6u);         // key group: lane bits 0, 2, 3
    const unsigned rg = ((lane >> 1) & 1u) | ((lane >> 3) & 2u);  // row group: lane bits 1, 4
    const unsigned wr = (warp / 2) * 32, wc = (warp % 2) * 64;    // the warp's quarter
    // A lane's rows wr + rg + 4i, key blocks wc + cg + 8j (i, j < 8). Warps wholly past the
    // rows or above the diagonal only stage.
    const bool active = wr < rows && wc < cols && c0 + wc <= g.last_diag(r0 + min(wr + 32, rows) - 1);
    double acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0;

    load(0);
    store(buf);
    __syncthreads();
    unsigned b = 0;
    for (unsigned t0 = 0; t0 < D; t0 += QM_TK, b ^= 1u) {
        const bool more = t0 + QM_TK < D;
        if (more) load(t0 + QM_TK);
        if (active) {
            const double* qa = buf + b * ((QM_ROWS + QM_COLS) * QM_LD) + (wr + rg) * QM_LD;
            const double* kb = buf + b * ((QM_ROWS + QM_COLS) * QM_LD) + (QM_ROWS + wc + cg) * QM_LD;
#pragma unroll
            for (int t = 0; t < QM_TK; ++t) {
                double a[8], k[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] = qa[4 * i * QM_LD + t];
#pragma unroll
                for (int j = 0; j < 8; ++j) k[j] = kb[8 * j * QM_LD + t];
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fma(a[i], k[j], acc[i][j]);
            }
        }
        if (more) store(buf + (b ^ 1u) * ((QM_ROWS + QM_COLS) * QM_LD));
        __syncthreads();
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const unsigned row = wr + rg + 4 * i;
        if (row >= rows) continue;
        const unsigned last = g.last_diag(r0 + row);  // key blocks c0 + c ≤ last are causal
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const unsigned c = wc + cg + 8 * j;
            if (c < cols && c0 + c <= last) {
                float x = (float)acc[i][j];
                if (p.bf16_logits) x = bf16_to_float(float_to_bf16(x));
                out[(size_t)row * nkb + c] = x;
            }
        }
    }
}

// sel_qa_softmax: each causal row of the map from logits to probabilities in place (core's
// pooled_block_attention: max of the f32 logits, f64 sum of exp(l - m) in column order,
// (float)(exp(l - m) / sum)); entries past the diagonal 0. A warp takes QS_ROWS consecutive
// rows of one head (global query-block index, so possibly of several sequences; rows of other
// patterns or past the end are empty). Pass 1: the row maxima. Pass 2: the sums, 32 columns a
// step: every lane computes one exp per row into shared memory, then lane i adds row i % QS_ROWS's
// 32 values in column order (all lanes run the same instructions, no divergence): the sequential
// f64 sums of QS_ROWS rows advance together, one add per column per row, where the old warp per row
// replayed each add through a shuffle. Entries past a row's diagonal enter as +0.0, which
// leaves a sum of non-negative terms unchanged. Pass 3: the probabilities and the zeros.
// Grid (ceil(Σ nqb / (QS_ROWS · QS_WARPS)), H), QS_WARPS · 32 threads.
#define QS_ROWS 4   // select.rs QS_ROWS
#define QS_WARPS 4  // select.rs QS_WARPS
#define QS_LD 34    // row stride (doubles) of a warp's exp tile: 16-byte rows, QS_ROWS rows in distinct banks
extern "C" __global__ void __launch_bounds__(QS_WARPS * 32)
sel_qa_softmax(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, const unsigned* __restrict__ qb_seq,
               unsigned total_qb, SelParams p, const int* __restrict__ pattern, float* __restrict__ map) {
    __shared__ __align__(16) double es[QS_WARPS][QS_ROWS * QS_LD];
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y;
    const unsigned gb0 = (blockIdx.x * QS_WARPS + warp) * QS_ROWS;
    if (gb0 >= total_qb) return;
    float* l[QS_ROWS];
    unsigned len[QS_ROWS], nk[QS_ROWS];  // causal entries (0: no row), entries of the row
    unsigned maxlen = 0, maxnk = 0;
#pragma unroll
    for (int i = 0; i < QS_ROWS; ++i) {
        const unsigned gb = gb0 + i;
        l[i] = map;
        len[i] = nk[i] = 0;
        if (gb < total_qb) {
            const unsigned s = qb_seq[gb];
            if (pattern[s * p.num_heads + h] == PAT_QA) {
                const SeqDesc sd = seqs[s];
                const Geo g = geo(sd, p.block_size);
                const unsigned r = gb - sd.qb_off;
                len[i] = g.last_diag(r) + 1;
                nk[i] = sd.nkb;
                l[i] = map + (size_t)sel[s].map_off * p.num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
            }
        }
        maxlen = max(maxlen, len[i]);
        maxnk = max(maxnk, nk[i]);
    }
    if (maxlen == 0) return;

    // Loads, exps and divisions of the QS_ROWS rows are issued together, and each pass loads
    // its next 32 columns while it computes on these (one warp's rows are a chain of load and
    // f64 latencies; a lane past a row's end computes a throw-away value, never stored nor added).
    auto fetch = [&](unsigned c, float (&x)[QS_ROWS]) {
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) x[i] = c < len[i] ? l[i][c] : 0.f;
    };
    float mf[QS_ROWS];
#pragma unroll
    for (int i = 0; i < QS_ROWS; ++i) mf[i] = -F32_INF;
#pragma unroll 4
    for (unsigned c = lane; c < maxlen; c += 32) {
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) mf[i] = fmaxf(mf[i], c < len[i] ? l[i][c] : -F32_INF);
    }
    double m[QS_ROWS];
#pragma unroll
    for (int i = 0; i < QS_ROWS; ++i) m[i] = (double)warp_max(mf[i]);

    double* e = es[warp];
    const double2* mine = (const double2*)(e + (lane % QS_ROWS) * QS_LD);
    double total = 0.0;  // row lane % QS_ROWS's running sum
    float x[QS_ROWS], xn[QS_ROWS];
    // x: the columns at c (fetched one step ahead), xn: the next 32.
    auto advance = [&](unsigned c) {
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) x[i] = xn[i];
        fetch(c + 32, xn);
    };
    fetch(lane, xn);
    for (unsigned c0 = 0; c0 < maxlen; c0 += 32) {
        const unsigned c = c0 + lane;
        advance(c);
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) {
            const double v = exp((double)x[i] - m[i]);
            e[i * QS_LD + lane] = c < len[i] ? v : 0.0;
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const double2 v = mine[j];
            total += v.x;
            total += v.y;
        }
        __syncwarp();
    }

    double sum[QS_ROWS];
#pragma unroll
    for (int i = 0; i < QS_ROWS; ++i) sum[i] = __shfl_sync(0xffffffffu, total, i);
    fetch(lane, xn);
    unsigned c0 = 0;
    for (; c0 < maxlen; c0 += 32) {  // some row is causal here
        const unsigned c = c0 + lane;
        advance(c);
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) {
            const float y = (float)(exp((double)x[i] - m[i]) / sum[i]);
            if (c < nk[i]) l[i][c] = c < len[i] ? y : 0.f;
        }
    }
    for (; c0 < maxnk; c0 += 32) {
        const unsigned c = c0 + lane;
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i)
            if (c < nk[i]) l[i][c] = 0.f;
    }
}

// Flattened query-aware cut over every causal entry of the map (Algorithm 4): original keeps
// the entries whose running sum stays ≤ (f32 of gamma_py·nqb) (crossing excluded); faithful
// the smallest top set with mass ≥ t·nqb (crossing included; t = gamma or the calibrated
// target). Ties by flat index r·nkb + c. The map holds nb²/2 entries per head (524k at 128k),
// too many for one CTA: a radix select spread over many CTAs, one 8-bit digit per round of
// two launches (sel_flat_hist: per-CTA histograms of the digit, count and fixed-point mass,
// added into the head's global histogram with integer atomics, exact in any order; then
// sel_flat_pick: one CTA per head walks the 256 bins, fixes the digit and clears the bins).
