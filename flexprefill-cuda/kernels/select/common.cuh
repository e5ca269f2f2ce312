// Pattern decision, block selection and CSR index build on the device (FlexPrefill
// Algorithms 2-4), with no host synchronisation.
//
// Every rule is core's (`flexprefill_core::selection`), replayed so that the GPU selects the
// same blocks as the CPU on the same statistics:
// - ties: one total order, score descending then index ascending (core's `rank_order`), encoded
//   as a 64-bit key: (descending bits of the f32 score) << 32 | tie-break bits; smaller key
//   ranks first. NaN ranks last.
// - the gamma cuts over large sets (token lines, the flattened query-aware map) are found
//   without sorting: a radix select over the 64-bit keys, 8 bits a pass, each bin carrying its
//   count and its mass in 2^-SC fixed point (exact, order independent). Appendix B: the smallest
//   set reaching a mass is exactly the set ranked above one key.
// - cuts that core sums sequentially in rank order over at most one key-block row (faithful
//   vertical-slash walk, per-query-block cuts) sort that row in shared memory (bitonic) and
//   replay the f64 sum in the same order, so they match bit for bit.
// - the index is built as a bitmask [rows, ceil(nkb/32)] per (sequence, head) (fixed capacity:
//   no host sync), then compacted into CSR (core's row order: sequence, head, query block).

// This header holds the device code the selection stages share (keys, geometry, block sums,
// bitonic sort, radix cut, block-wide scan); each stage file under select/ follows it in the
// one `select` program (src/select.rs).

#include "flexprefill_common.cuh"

#define F32_INF __int_as_float(0x7f800000)
#define KEY_NONE 0ull                  // "before every key": nothing taken
#define KEY_ALL 0xffffffffffffffffull  // "after every key": everything taken

// SeqDesc: kernels/seq_desc.cuh, compiled in front of this header.

// Per-sequence offsets of the selection buffers. Must match select.rs SelSeq.
struct SelSeq {
    unsigned words;     // mask words per row: ceil(nkb / 32)
    unsigned mask_off;  // Σ nqb·words of earlier sequences (× H)
    unsigned map_off;   // Σ nqb·nkb of earlier sequences (× H)
    unsigned row_off;   // Σ nqb of earlier sequences (× H): first CSR row = row_off·H + h·nqb
    unsigned dist_off;  // Σ (kv_len + 1) of earlier sequences (× H)
    unsigned dense;     // 1: the sequence is a dense fallback
    unsigned pad0, pad1;
};
static_assert(sizeof(SelSeq) == 32, "SelSeq: 8 u32, as select.rs SelSeq");

// Configuration, by value. Must match select.rs SelParams.
struct SelParams {
    int num_heads;
    int num_kv_heads;
    int head_dim;
    int block_size;
    float gamma;
    float tau;
    int original;       // SelectionMode::Original
    int per_row;        // QueryAwareCut::PerQueryBlock
    int sink;           // forced sink
    int diagonal;       // forced diagonal
    int mb;             // min budget, blocks
    int cap;            // max budget, blocks (0: none)
    int bf16_logits;    // round pooled-map logits to bf16 (compat)
    int pad;
    double gamma_py;    // the original's Python-float gamma (compat flattened target)
};
static_assert(sizeof(SelParams) == 64, "SelParams: 14 x 4 bytes and one f64 at offset 56, as select.rs SelParams");

enum { PAT_VS = 0, PAT_QA = 1, PAT_DENSE = 2 };

// ---- keys ----------------------------------------------------------------------------------

// Descending order bits of an f32: smaller for larger values; NaN after everything; -0 == +0.
FP_DEVICE uint32_t desc32(float x) {
    if (x != x) return 0xffffffffu;
    if (x == 0.f) x = 0.f;
    uint32_t u = __float_as_uint(x);
    uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~asc;
}
FP_DEVICE uint64_t rank_key(float x, uint32_t idx) { return ((uint64_t)desc32(x) << 32) | idx; }

// ---- grid geometry (core's Grid) ----------------------------------------------------------

struct Geo {
    unsigned q_len, kv_len, bs, nqb, nkb, rep;
    FP_DEVICE unsigned first_pos(unsigned r) const { return kv_len - q_len + r * bs; }
    FP_DEVICE unsigned last_pos(unsigned r) const { return min(kv_len - q_len + (r + 1) * bs, kv_len) - 1; }
    FP_DEVICE unsigned last_diag(unsigned r) const { return last_pos(r) / bs; }
    FP_DEVICE unsigned first_diag(unsigned r) const { return first_pos(r) / bs; }
    FP_DEVICE unsigned rep_block(unsigned i) const { return (q_len - rep + i) / bs; }
};
FP_DEVICE Geo geo(const SeqDesc& sd, int bs) {
    Geo g;
    g.q_len = sd.q_len; g.kv_len = sd.kv_len; g.bs = bs; g.nqb = sd.nqb; g.nkb = sd.nkb; g.rep = sd.rep;
    return g;
}
// Where query block r of head h of a sequence lives in the selection buffers: its mask row
// (ss.words words) and its CSR row (counts, row_offsets).
FP_DEVICE size_t mask_row(const SelSeq& ss, const SeqDesc& sd, const SelParams& p, int h, unsigned r) {
    return (size_t)ss.mask_off * p.num_heads + ((size_t)h * sd.nqb + r) * ss.words;
}
FP_DEVICE size_t csr_row(const SelSeq& ss, const SeqDesc& sd, const SelParams& p, int h, unsigned r) {
    return (size_t)ss.row_off * p.num_heads + (size_t)h * sd.nqb + r;
}
// The row of a warp-per-row kernel: grid x covers the query blocks of the batch, one warp
// each (blockDim / 32 per CTA), grid y the heads. `ok` is false for the warps past the last row.
struct WarpRow {
    bool ok;
    int h;
    unsigned s, r;
    SeqDesc sd;
    SelSeq ss;
    FP_DEVICE size_t mask_at(const SelParams& p) const { return mask_row(ss, sd, p, h, r); }
    FP_DEVICE size_t csr_at(const SelParams& p) const { return csr_row(ss, sd, p, h, r); }
};
FP_DEVICE WarpRow warp_row(const SeqDesc* seqs, const SelSeq* sel, const unsigned* qb_seq, unsigned total_qb) {
    WarpRow w;
    const unsigned gb = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    w.ok = gb < total_qb;
    if (w.ok) {
        w.h = blockIdx.y;
        w.s = qb_seq[gb];
        w.sd = seqs[w.s];
        w.ss = sel[w.s];
        w.r = gb - w.sd.qb_off;
    }
    return w;
}

FP_DEVICE bool is_forced(const Geo& g, const SelParams& p, unsigned r, unsigned c) {
    return (p.sink && c == 0) || (p.diagonal && c >= g.first_diag(r) && c <= g.last_diag(r));
}

// Core's probe_queries: at most 32 single queries spread over the chunk before the
// representative block; k-th at chunk-relative index (2k+1)·m/(2p), m = q_len - rep,
// p = min(32, ceil(m / bs)). Their block masses come in probe_block_mass [probes, nkb].
#ifndef PROBE_QUERIES
#define PROBE_QUERIES 16  // the host passes core's selection::PROBE_QUERIES
#endif
FP_DEVICE unsigned num_probes(const Geo& g) {
    const unsigned m = g.q_len - g.rep;
    return min((unsigned)PROBE_QUERIES, (m + g.bs - 1) / g.bs);
}
FP_DEVICE unsigned probe_block(const Geo& g, unsigned t) {
    const unsigned long long m = g.q_len - g.rep, p = num_probes(g);
    return (unsigned)((2ull * t + 1ull) * m / (2ull * p)) / g.bs;
}

// Deterministic f64 block sum (fixed tree), every thread gets the result. `red` ≥ 32 doubles.
FP_DEVICE double block_sum_f64(double v, double* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) t += red[w];
    __syncthreads();
    return t;
}

// ---- CTA helpers ---------------------------------------------------------------------------

// Bitonic sort of (key, val) pairs in shared memory, ascending by key then val; n a power of 2.
FP_DEVICE void bitonic_sort(uint64_t* key, uint32_t* val, int n) {
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            // One thread per compared pair (i, i ^ j), i with bit j clear: q with a 0 bit
            // inserted at j's position (the same network as visiting every i and skipping
            // i ^ j < i, without the idle half).
            for (int q = threadIdx.x; q < n / 2; q += blockDim.x) {
                const int i = ((q & ~(j - 1)) << 1) | (q & (j - 1)), ixj = i + j;
                bool up = (i & k) == 0;
                uint64_t a = key[i], b = key[ixj];
                bool gt = a > b || (a == b && val[i] > val[ixj]);
                if (gt == up) {
                    key[i] = b; key[ixj] = a;
                    uint32_t t = val[i]; val[i] = val[ixj]; val[ixj] = t;
                }
            }
            __syncthreads();
        }
    }
}

FP_DEVICE int next_pow2(int n) {
    int p = 1;
    while (p < n) p <<= 1;
    return p;
}

// A row cut's dynamic shared memory (16·N + 4·words bytes, N = next_pow2 of the row's n; the
// host's row_smem): the rank keys and block indices bitonic_sort orders, the row's scores, its
// mask words. Built in place (`auto&& [..] = RowSmem(smem, N)`): the same split returned by
// value from a function changed the cut kernels' machine code.
struct RowSmem {
    uint64_t* key;
    uint32_t* val;
    float* scs;
    unsigned* bits;
    FP_DEVICE RowSmem(unsigned char* smem, int N)
        : key((uint64_t*)smem), val((uint32_t*)(key + N)), scs((float*)(val + N)), bits((unsigned*)(scs + N)) {}
};

// Mass in fixed point: floor(x · 2^sc), exact and order independent; negatives and NaN are 0.
// (An f32 mass arrives widened to f64 exactly, so both kinds of items share one rounding.)
FP_DEVICE uint64_t fixed(double x, double scale) {
    if (!(x > 0.0)) return 0ull;
    return (uint64_t)__dmul_rn(x, scale);
}

// Radix select over 64-bit keys (unique), 8 bits a pass from the top: walks the keys in
// ascending order and returns the first key that is NOT taken, where keys are taken while
//   mode 0: the taken mass stays ≤ target   (the original's "prefix sums ≤ gamma")
//   mode 1: the taken mass stays <  target   (then the crossing key completes "≥ gamma")
//   mode 2: the taken count stays ≤ target_count (top-n)
// KEY_ALL when every key is taken. `items(i, key, mass)` enumerates candidates i < n (returns
// false for an invalid slot). `taken_count` receives how many keys precede the result.
// A 64-bit shared-memory sum as two 32-bit words: the 64-bit shared atomic add is a
// compare-and-swap loop (ncu: the histogram kernels stalled on shared memory), two 32-bit adds
// with the carry are native and, being integer, exact in any order.
FP_DEVICE void shared_add_u64(unsigned* lo, unsigned* hi, unsigned long long v) {
    const unsigned l = (unsigned)v, old = atomicAdd(lo, l);
    const unsigned h = (unsigned)(v >> 32) + (old + l < old ? 1u : 0u);
    if (h) atomicAdd(hi, h);
}
FP_DEVICE unsigned long long join_u64(unsigned lo, unsigned hi) {
    return ((unsigned long long)hi << 32) | lo;
}

struct RadixShared {
    unsigned cnt[256];
    unsigned sum_lo[256], sum_hi[256];
    unsigned long long prefix;
    unsigned long long sum_above;
    unsigned cnt_above;
    int state;  // 0 refine, 1 done (result in prefix), 2 all taken, 3 single candidate: find it
};

template <typename Items>
FP_DEVICE uint64_t radix_cut(RadixShared& sh, const Items& items, unsigned n, int mode, uint64_t target_fx,
                             unsigned target_count, int sc, unsigned* taken_count) {
    if (threadIdx.x == 0) { sh.prefix = 0; sh.sum_above = 0; sh.cnt_above = 0; sh.state = 0; }
    const double scale = ldexp(1.0, sc);  // 2^sc, once (not per item)
    __syncthreads();
    for (int depth = 0; depth < 8; ++depth) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) { sh.cnt[b] = 0; sh.sum_lo[b] = 0; sh.sum_hi[b] = 0; }
        __syncthreads();
        const int shift = 56 - 8 * depth;
        const uint64_t pref = sh.prefix;
        // Run-length aggregation per thread before the shared atomics: scores cluster in a few
        // bins (the top bits of probabilities barely vary), and 1024 threads hitting one bin
        // serialise. Integer sums: exact in any order.
        int cur = -1;
        unsigned cur_n = 0;
        unsigned long long cur_s = 0;
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
            uint64_t key; double m;
            if (!items(i, key, m)) continue;
            if (depth > 0 && (key >> (shift + 8)) != pref) continue;
            int b = (int)((key >> shift) & 255);
            if (b != cur) {
                if (cur_n) {
                    atomicAdd(&sh.cnt[cur], cur_n);
                    if (mode != 2) shared_add_u64(&sh.sum_lo[cur], &sh.sum_hi[cur], cur_s);
                }
                cur = b; cur_n = 0; cur_s = 0;
            }
            ++cur_n;
            if (mode != 2) cur_s += (unsigned long long)fixed(m, scale);
        }
        if (cur_n) {
            atomicAdd(&sh.cnt[cur], cur_n);
            if (mode != 2) shared_add_u64(&sh.sum_lo[cur], &sh.sum_hi[cur], cur_s);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int st = 2;
            for (int b = 0; b < 256; ++b) {
                if (sh.cnt[b] == 0) continue;
                const unsigned long long sb = join_u64(sh.sum_lo[b], sh.sum_hi[b]);
                bool take;
                if (mode == 0) take = sh.sum_above + sb <= target_fx;
                else if (mode == 1) take = sh.sum_above + sb < target_fx;
                else take = sh.cnt_above + sh.cnt[b] <= target_count;
                if (take) {
                    sh.sum_above += sb;
                    sh.cnt_above += sh.cnt[b];
                } else {
                    sh.prefix = (sh.prefix << 8) | (unsigned long long)b;
                    st = (depth == 7) ? 1 : (sh.cnt[b] == 1 ? 3 : 0);
                    break;
                }
            }
            sh.state = st;
        }
        __syncthreads();
        if (sh.state == 3) {
            // One key left in the crossing bin: find it.
            const int sh2 = shift;
            const uint64_t p2 = sh.prefix;
            __syncthreads();  // every thread holds the prefix before its one writer replaces it
            for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
                uint64_t key; double m;
                if (!items(i, key, m)) continue;
                if ((key >> sh2) == p2) sh.prefix = key;  // exactly one writer
            }
            __syncthreads();
            if (threadIdx.x == 0) sh.state = 1;
            __syncthreads();
        }
        if (sh.state != 0) break;
    }
    uint64_t r = sh.state == 2 ? KEY_ALL : sh.prefix;
    if (taken_count) *taken_count = sh.cnt_above;
    __syncthreads();
    return r;
}

// Weighted events over the probe rows (the vertical-slash stop, the query-aware calibration):
// key (when the event enters the selection; KEY_ALL: never decided by it) and weight (the
// probes' captured fraction it adds; summed in 2^CAL_SC fixed point).
#define CAL_SC 58  // the weights sum to at most PROBE_QUERIES ≤ 16 < 2^4
struct CandItems {
    const unsigned long long* key;
    const double* w;
    FP_DEVICE bool operator()(unsigned i, uint64_t& k, double& m) const {
        k = key[i];
        if (k == KEY_ALL) return false;
        m = w[i];
        return true;
    }
};

// Block-wide exclusive scan of one count per thread, in rounds that carry a running total:
// returns `carry` + the counts of lower threads of this round. `warp_tot` ≥ 32 entries of
// shared memory. Unsigned sums: exact in any order. After every thread has used its offset,
// `block_scan_carry` adds the round's total to `carry`.
FP_DEVICE unsigned block_scan_offset(unsigned mine, unsigned* warp_tot, unsigned carry) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned x = mine;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_tot[warp] = x;
    __syncthreads();
    unsigned off = carry + x - mine;
    for (int w = 0; w < warp; ++w) off += warp_tot[w];
    return off;
}
FP_DEVICE void block_scan_carry(const unsigned* warp_tot, unsigned& carry) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned t = 0;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) t += warp_tot[w];
        carry += t;
    }
}
