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

#include "flexprefill_common.cuh"

#define F32_INF __int_as_float(0x7f800000)
#define KEY_NONE 0ull                  // "before every key": nothing taken
#define KEY_ALL 0xffffffffffffffffull  // "after every key": everything taken

// Must match stats.rs SeqDesc.
struct SeqDesc {
    unsigned q_start, k_start, q_len, kv_len;
    unsigned rep, nkb, nqb;
    unsigned tok_off, kb_off, qb_off, rep_off, split_off, nsplit;
    unsigned pad0, pad1, pad2;
};

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

// ---- kernel 2: pattern decision ----------------------------------------------------------

// Pools the lines to blocks (core's pool_vertical / pool_slash: f64 per block, summed
// sequentially and rounded once). A thread per block reading its own line segment straight
// from global memory made every warp load 32 scattered sectors; here a CTA stages 32 blocks'
// segments through shared memory with coalesced loads (stride bs + 1, odd: the per-block
// sequential reads hit 32 distinct banks), then warp 0 sums the vertical segments and warp 1
// the slash ones, in the same order as core. Grid (ceil(max nkb / 32), H, nseq), 256 threads,
// dynamic smem 2·32·(bs + 1) floats. vpool/spool: [kb_off·H + h·nkb + c].
extern "C" __global__ void __launch_bounds__(256)
sel_pool_lines(const SeqDesc* __restrict__ seqs, SelParams p, const float* __restrict__ vertical,
               const float* __restrict__ slash, float* __restrict__ vpool, float* __restrict__ spool) {
    extern __shared__ float lines[];  // [2][32][bs + 1]: vertical, then slash
    const int h = blockIdx.y, s = blockIdx.z;
    const SeqDesc sd = seqs[s];
    const unsigned bs = p.block_size, nkb = sd.nkb, n = sd.kv_len, c0 = blockIdx.x * 32;
    if (c0 >= nkb) return;
    const float* v = vertical + (size_t)sd.tok_off * p.num_heads + (size_t)h * n;
    const float* sl = slash + (size_t)sd.tok_off * p.num_heads + (size_t)h * n;
    // Block c's slash segment is distances [c·bs - pad, (c + 1)·bs - pad) clipped to [0, n).
    const long long pad = (long long)nkb * bs - n;
    const unsigned stride = bs + 1;
    float* vs = lines;
    float* ss = lines + 32 * stride;
    for (unsigned i = threadIdx.x; i < 32 * bs; i += blockDim.x) {
        const unsigned c = i / bs, j = i % bs;
        const long long tok = (long long)(c0 + c) * bs + j;
        vs[c * stride + j] = tok < n ? v[tok] : 0.f;
        const long long dist = tok - pad;
        ss[c * stride + j] = dist >= 0 && dist < n ? sl[dist] : 0.f;
    }
    __syncthreads();
    const unsigned warp = threadIdx.x / 32, c = c0 + threadIdx.x % 32;
    if (warp > 1 || c >= nkb) return;
    const long long base = (long long)c * bs;
    long long lo, hi;
    if (warp == 0) {
        lo = base;
        hi = min(base + bs, (long long)n);
    } else {
        lo = max(base - pad, 0ll);
        hi = min(base + bs - pad, (long long)n);
    }
    const float* seg = (warp == 0 ? vs : ss) + (c - c0) * stride;
    const long long off = warp == 0 ? base : base - pad;  // token of the segment's slot 0
    double a = 0.0;
    for (long long t = lo; t < hi; ++t) a += (double)seg[t - off];
    float* out = (warp == 0 ? vpool : spool) + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    out[c] = (float)a;
}

// sqrt-JS(estimate, pooled vertical) against tau, per head. Grid (H, nseq), 1024 threads.
// pattern/js: [s·H + h].
extern "C" __global__ void __launch_bounds__(1024)
sel_decide(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
           const float* __restrict__ estimate, const float* __restrict__ vpool, int* __restrict__ pattern,
           float* __restrict__ js) {
    __shared__ double red[32];
    __shared__ float redf[32];
    const int h = blockIdx.x, s = blockIdx.y;
    const SeqDesc sd = seqs[s];
    const unsigned nkb = sd.nkb;
    const float* est = estimate + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    const float* vp = vpool + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    double kl = 0.0;   // faithful: f64, xlogy
    float klf = 0.f;   // original: f32, NaN on 0·ln 0
    for (unsigned c = threadIdx.x; c < nkb; c += blockDim.x) {
        const float x = est[c], y = vp[c];
        const double xd = x, yd = y, m = 0.5 * (xd + yd);
        if (xd > 0.0) kl += 0.5 * xd * log(xd / m);
        if (yd > 0.0) kl += 0.5 * yd * log(yd / m);
        const float mf = 0.5f * (x + y);
        klf += 0.5f * (x * logf(x / mf)) + 0.5f * (y * logf(y / mf));
    }
    // Fixed-order block reductions.
    for (int o = 16; o > 0; o >>= 1) {
        kl += __shfl_xor_sync(0xffffffffu, kl, o);
        klf += __shfl_xor_sync(0xffffffffu, klf, o);
    }
    if (threadIdx.x % 32 == 0) { red[threadIdx.x / 32] = kl; redf[threadIdx.x / 32] = klf; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        float tf = 0.f;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) { t += red[w]; tf += redf[w]; }
        const float d = p.original ? sqrtf(tf) : (float)sqrt(t > 0.0 ? t : 0.0);
        int pat = d < p.tau ? PAT_QA : PAT_VS;
        if (sel[s].dense) pat = PAT_DENSE;
        pattern[s * p.num_heads + h] = pat;
        js[s * p.num_heads + h] = sel[s].dense ? __int_as_float(0x7fc00000) : d;
    }
}

// ---- kernel 3a: faithful vertical-slash -----------------------------------------------------

FP_DEVICE uint64_t vkey_of(float v, unsigned j) { return rank_key(v, j); }
FP_DEVICE uint64_t skey_of(float s, unsigned d) { return rank_key(s, 0x80000000u | d); }

FP_DEVICE uint64_t warp_min_u64(uint64_t x) {
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t y = __shfl_xor_sync(0xffffffffu, x, o);
        x = y < x ? y : x;
    }
    return x;
}
// The first line (best key) covering key block c of query block r: its column's best
// vertical key `vk_c`, or a distance from one of the block's queries into the block. One warp,
// lanes striding the distances (coalesced); every lane gets the result.
FP_DEVICE uint64_t first_cover_key(const Geo& g, unsigned r, unsigned c, uint64_t vk_c, const float* sl) {
    const unsigned bs = g.bs, first = g.first_pos(r), last = g.last_pos(r);
    const long long lo = (long long)first - (long long)(c * bs + bs - 1);
    const unsigned dlo = lo > 0 ? (unsigned)lo : 0;
    uint64_t best = vk_c;
    for (unsigned dd = dlo + threadIdx.x % 32; dd <= last - c * bs; dd += 32) {
        const uint64_t k = skey_of(sl[dd], dd);
        best = k < best ? k : best;
    }
    return warp_min_u64(best);
}

// Per head, before the walk: the best vertical key of every column (vkey_out, a warp per
// column) and, with probes, each probe's total mass (probe_tot[slot·PROBE_QUERIES + u], core's
// sequential f64 sum replayed through shuffles). Grid (H, nseq), 512 threads. Faithful
// vertical-slash heads; the probe totals for faithful query-aware heads too.
extern "C" __global__ void __launch_bounds__(512)
sel_fvs_prep(const SeqDesc* __restrict__ seqs, SelParams p, const int* __restrict__ pattern,
             const float* __restrict__ vertical, const float* __restrict__ probe_block_mass, int probes,
             unsigned long long* __restrict__ vkey_out, double* __restrict__ probe_tot) {
    const int h = blockIdx.x, s = blockIdx.y, slot = s * p.num_heads + h;
    const int pat = pattern[slot];
    if (p.original || pat == PAT_DENSE) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned bs = g.bs, nkb = g.nkb;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (pat == PAT_VS) {
        const float* v = vertical + (size_t)sd.tok_off * p.num_heads + (size_t)h * g.kv_len;
        unsigned long long* vk = vkey_out + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
        for (unsigned c = warp; c < nkb; c += nwarps) {
            uint64_t best = KEY_ALL;
            for (unsigned j = c * bs + lane; j < min((c + 1) * bs, g.kv_len); j += 32) {
                const uint64_t k = vkey_of(v[j], j);
                best = k < best ? k : best;
            }
            best = warp_min_u64(best);
            if (lane == 0) vk[c] = best;
        }
    }
    const unsigned P = probes ? num_probes(g) : 0;
    const float* pm = probe_block_mass + (size_t)sd.pad0 * p.num_heads + (size_t)h * P * nkb;
    for (unsigned u = warp; u < P; u += nwarps) {
        double acc = 0.0;  // every lane replays the same sequential sum
        for (unsigned base = 0; base < nkb; base += 32) {
            const double x = base + lane < nkb ? (double)pm[(size_t)u * nkb + base + lane] : 0.0;
            const unsigned cnt = min(32u, nkb - base);
            for (unsigned j = 0; j < cnt; ++j) acc += __shfl_sync(0xffffffffu, x, j);
        }
        if (lane == 0) probe_tot[(size_t)slot * PROBE_QUERIES + u] = acc;
    }
}

// The probes' events of a faithful vertical-slash head (core's Coverage with probe rows): for
// each probe block's causal key block, its first covering line's key and the probes' share it
// adds (Σ_t mass_t[c] / total_t over the block's probes, carried by the block's first slot);
// forced blocks count from the start (key KEY_NONE, which no line has). A warp per event.
// Grid (ceil(PROBE_QUERIES·max nkb / 64), H, nseq), 256 threads; ev_key / ev_w
// [(kb_off·H + h·nkb)·PROBE_QUERIES + t·nkb + c].
#ifndef EV_PER_CTA
#define EV_PER_CTA 64  // the host passes select.rs EV_PER_CTA
#endif
extern "C" __global__ void __launch_bounds__(256)
sel_fvs_probe_events(const SeqDesc* __restrict__ seqs, SelParams p, const int* __restrict__ pattern,
                     const float* __restrict__ slash, const float* __restrict__ probe_block_mass,
                     const unsigned long long* __restrict__ vkey, const double* __restrict__ probe_tot,
                     unsigned long long* __restrict__ ev_key, double* __restrict__ ev_w) {
    const int h = blockIdx.y, s = blockIdx.z, slot = s * p.num_heads + h;
    if (p.original || pattern[slot] != PAT_VS) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned nkb = g.nkb, P = num_probes(g);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float* sl = slash + (size_t)sd.tok_off * p.num_heads + (size_t)h * g.kv_len;
    const float* pm = probe_block_mass + (size_t)sd.pad0 * p.num_heads + (size_t)h * P * nkb;
    const unsigned long long* vk = vkey + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    const double* tot = probe_tot + (size_t)slot * PROBE_QUERIES;
    const size_t eb = ((size_t)sd.kb_off * p.num_heads + (size_t)h * nkb) * PROBE_QUERIES;
    const unsigned i0 = blockIdx.x * EV_PER_CTA, i1 = min(i0 + EV_PER_CTA, P * nkb);
    for (unsigned i = i0 + warp; i < i1; i += blockDim.x / 32) {
        const unsigned t = i / nkb, c = i % nkb;
        const unsigned r = probe_block(g, t);
        uint64_t key = KEY_ALL;
        double w = 0.0;
        if ((t == 0 || probe_block(g, t - 1) != r) && c <= g.last_diag(r)) {
            for (unsigned u = t; u < P && probe_block(g, u) == r; ++u)
                if (tot[u] > 0.0) w += (double)pm[(size_t)u * nkb + c] / tot[u];
            key = is_forced(g, p, r, c) ? KEY_NONE : first_cover_key(g, r, c, vk[c], sl);
        }
        if (lane == 0) {
            ev_key[eb + i] = key;
            ev_w[eb + i] = w;
        }
    }
}

// Faithful vertical-slash stop key (core's faithful::vertical_slash walk, replayed without
// walking the 2·kv_len token lines): for each key block of each representative query block,
// the first candidate line that covers it; those events sorted (at most nkb per block) and
// walked by every representative query in f64, exactly as core adds them; the stop key is the
// latest of the keys at which each query reaches gamma, each block reaches its minimum budget
// and (with probes) the probes' events reach gamma·P. Output kstar[s·H + h]. Grid (H, nseq),
// 512 threads, dynamic smem 12·next_pow2(nkb) bytes.
extern "C" __global__ void __launch_bounds__(512)
sel_fvs_stop(const SeqDesc* __restrict__ seqs, SelParams p, const int* __restrict__ pattern,
             const float* __restrict__ slash, const float* __restrict__ rep_block_mass, int probes,
             const unsigned long long* __restrict__ ev_key, const double* __restrict__ ev_w,
             const unsigned long long* __restrict__ vkey, unsigned long long* __restrict__ kstar) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ RadixShared rs;
    __shared__ unsigned long long kmax;
    __shared__ unsigned long long kcap;
    const int h = blockIdx.x, s = blockIdx.y;
    if (p.original || pattern[s * p.num_heads + h] != PAT_VS) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned nkb = g.nkb;
    const float* sl = slash + (size_t)sd.tok_off * p.num_heads + (size_t)h * g.kv_len;
    const float* mass = rep_block_mass + (size_t)sd.rep_off * p.num_heads + (size_t)h * g.rep * nkb;
    const unsigned long long* vk = vkey + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    const int N = next_pow2(nkb);
    uint64_t* ekey = (uint64_t*)smem;
    uint32_t* ec = (uint32_t*)(ekey + N);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (threadIdx.x == 0) { kmax = KEY_NONE; kcap = KEY_ALL; }
    __syncthreads();

    const unsigned r0 = g.rep_block(0), r1 = g.rep_block(g.rep - 1);
    for (unsigned r = r0; r <= r1; ++r) {
        const unsigned d = g.last_diag(r);
        // Events: (first covering key, c) for every non-forced causal key block.
        for (unsigned c = warp; c < (unsigned)N; c += nwarps) {
            const bool ev = c <= d && !is_forced(g, p, r, c);
            const uint64_t best = ev ? first_cover_key(g, r, c, vk[c], sl) : KEY_ALL;
            if (lane == 0) {
                ekey[c] = best;
                ec[c] = c;
            }
        }
        __syncthreads();
        bitonic_sort(ekey, ec, N);
        const unsigned nforced = (p.sink ? 1u : 0u) +
                                 (p.diagonal ? d + 1 - g.first_diag(r) - (p.sink && g.first_diag(r) == 0 ? 1u : 0u) : 0u);
        const unsigned nev = d + 1 - nforced;
        // Rows of this representative block: the walk of core's RepCoverage, in f64. Loads in
        // batches of 8 (the sums stay sequential) so that each thread keeps several in flight.
        for (unsigned i = threadIdx.x; i < g.rep; i += blockDim.x) {
            if (g.rep_block(i) != r) continue;
            const float* mi = mass + (size_t)i * nkb;
            double total = 0.0;
#pragma unroll 8
            for (unsigned c = 0; c < nkb; ++c) total += (double)mi[c];
            const double target = (double)p.gamma * total;
            uint64_t ki = KEY_NONE;
            if (target > 0.0) {
                double cap = 0.0;
                // forced first, in core's order: sink, then the diagonal blocks
                if (p.sink) cap += (double)mi[0];
                if (p.diagonal)
                    for (unsigned c = g.first_diag(r); c <= d; ++c)
                        if (!(p.sink && c == 0)) cap += (double)mi[c];
                if (!(cap >= target)) {
                    ki = KEY_ALL;
                    bool hit = false;
                    for (unsigned e0 = 0; e0 < nev && !hit; e0 += 8) {
                        double x[8];
#pragma unroll
                        for (unsigned u = 0; u < 8; ++u) x[u] = e0 + u < nev ? (double)mi[ec[e0 + u]] : 0.0;
#pragma unroll
                        for (unsigned u = 0; u < 8; ++u)
                            if (!hit && e0 + u < nev) {
                                cap += x[u];
                                if (cap >= target) { ki = ekey[e0 + u]; hit = true; }
                            }
                    }
                }
            }
            atomicMax(&kmax, (unsigned long long)ki);
        }
        if (threadIdx.x == 0) {
            const unsigned want = min((unsigned)p.mb, d + 1);
            if (want > nforced) {
                const unsigned need = want - nforced;
                atomicMax(&kmax, (unsigned long long)(need <= nev ? ekey[need - 1] : KEY_ALL));
            }
            // An explicit max_budget stops the walk once some representative block holds cap
            // blocks (core's Coverage::reached), gamma or not.
            if (p.cap > 0) {
                const unsigned cap = (unsigned)p.cap;
                const uint64_t kc = cap <= nforced ? KEY_NONE : (cap - nforced <= nev ? ekey[cap - nforced - 1] : KEY_ALL);
                if (kc < kcap) kcap = kc;
            }
        }
        __syncthreads();
    }
    // Probes: the walk also needs the probes' mean captured fraction ≥ gamma (1e-12 slack):
    // the first event key at which the weights (forced blocks first, key KEY_NONE) reach
    // gamma·P (events sharing a line key count together: radix_cut's last digit bins them as
    // one). Weights in 2^CAL_SC fixed point (the slack absorbs the rounding).
    const unsigned P = probes ? num_probes(g) : 0;
    if (P > 0) {
        const size_t eb = ((size_t)sd.kb_off * p.num_heads + (size_t)h * nkb) * PROBE_QUERIES;
        const double target = (double)p.gamma * (double)P - 1e-12;
        const uint64_t kp = radix_cut(rs, CandItems{ev_key + eb, ev_w + eb}, P * nkb, 1,
                                      fixed(target, ldexp(1.0, CAL_SC)), 0, CAL_SC, nullptr);
        if (threadIdx.x == 0) atomicMax(&kmax, (unsigned long long)kp);
        __syncthreads();
    }
    if (threadIdx.x == 0) kstar[s * p.num_heads + h] = kmax < kcap ? kmax : kcap;
}

// Selected columns and token distances of a faithful vertical-slash head from its stop key,
// and the prefix count of selected distances (for the O(1) extension test). Grid (H, nseq),
// 1024 threads. colsel[kb_off·H + h·nkb + c]; dist_prefix[dist_off·H + h·(kv_len+1) + δ].
extern "C" __global__ void __launch_bounds__(1024)
sel_fvs_lines(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
              const int* __restrict__ pattern, const float* __restrict__ slash,
              const unsigned long long* __restrict__ vkey, const unsigned long long* __restrict__ kstar,
              unsigned char* __restrict__ colsel, unsigned* __restrict__ dist_prefix,
              unsigned char* __restrict__ diag_hit) {
    __shared__ unsigned warp_tot[32];
    __shared__ unsigned carry;
    const int h = blockIdx.x, s = blockIdx.y;
    if (p.original || pattern[s * p.num_heads + h] != PAT_VS) return;
    const SeqDesc sd = seqs[s];
    const unsigned n = sd.kv_len, nkb = sd.nkb;
    const uint64_t K = kstar[s * p.num_heads + h];
    const float* sl = slash + (size_t)sd.tok_off * p.num_heads + (size_t)h * n;
    const unsigned long long* vk = vkey + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    unsigned char* cs = colsel + (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    unsigned* pre = dist_prefix + (size_t)sel[s].dist_off * p.num_heads + (size_t)h * (n + 1);
    for (unsigned c = threadIdx.x; c < nkb; c += blockDim.x) cs[c] = (vk[c] <= K) || (p.sink && c == 0);
    if (threadIdx.x == 0) { carry = 0; pre[0] = 0; }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    // LINE_ITEMS consecutive distances per thread, then a block scan of the thread counts.
    constexpr unsigned LINE_ITEMS = 16;
    for (unsigned base = 0; base < n; base += blockDim.x * LINE_ITEMS) {
        const unsigned d0 = base + threadIdx.x * LINE_ITEMS;
        unsigned bits = 0;
#pragma unroll
        for (unsigned u = 0; u < LINE_ITEMS; ++u)
            if (d0 + u < n && skey_of(sl[d0 + u], d0 + u) <= K) bits |= 1u << u;
        const unsigned mine = __popc(bits);
        unsigned x = mine;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_tot[warp] = x;
        __syncthreads();
        unsigned off = carry;
        for (int w = 0; w < warp; ++w) off += warp_tot[w];
        off += x - mine;
#pragma unroll
        for (unsigned u = 0; u < LINE_ITEMS; ++u)
            if (d0 + u < n) pre[d0 + u + 1] = off + __popc(bits & ((2u << u) - 1u));
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned t = 0;
            for (int w = 0; w < nw; ++w) t += warp_tot[w];
            carry += t;
        }
        __syncthreads();
    }
    // The distance test of a full query block r against key block c depends on r - c only:
    // with u = first_pos(r) - c·bs the block's distances are [max(u - bs + 1, 0), u + bs - 1].
    // Tabulated per m = r - c + K0 (K0 = ceil((kv_len - q_len) / bs) makes the diagonal
    // block's m ≥ 0), sel_extend reads it with coalesced loads instead of two scattered
    // prefix loads per block. Only the last query block can be partial: sel_extend tests it
    // directly. The prefix writes above are visible after the loop's last barrier.
    const Geo g = geo(sd, p.block_size);
    const long long bs = g.bs, f0 = (long long)(n - sd.q_len);
    const long long k0 = (f0 + bs - 1) / bs;
    unsigned char* dh = diag_hit + ((size_t)sd.kb_off + s) * p.num_heads + (size_t)h * (nkb + 1);
    for (unsigned m = threadIdx.x; m <= nkb; m += blockDim.x) {
        const long long u = f0 + ((long long)m - k0) * bs;
        const long long lo = u - bs + 1 > 0 ? u - bs + 1 : 0;
        const long long hi = min(u + bs - 1, (long long)n - 1);
        dh[m] = u >= 1 - bs && hi >= lo && pre[hi + 1] > pre[lo];
    }
}

// ---- kernel 3b: original vertical-slash (also the mb lines of original query-aware heads) ---

// The original's line budgets (K = #{prefix sums of the sorted line ≤ gamma} + 1 tokens,
// n = K // 128 + 1, raised to mb then capped) and the top-n pooled columns / offsets with the
// sink / diagonal forced first. Query-aware heads take n_v = n_s = mb. Grid (H, nseq), 1024
// threads. colsel / offsel [kb_off·H + h·nkb + c].
struct LineItems {
    const float* x;
    FP_DEVICE bool operator()(unsigned i, uint64_t& key, double& m) const {
        float v = x[i];
        if (v != v) v = 0.f;  // core maps NaN to 0 before sorting
        key = rank_key(v, i);
        m = v;
        return true;
    }
};
struct PooledItems {
    const float* x;
    int force_first;
    FP_DEVICE bool operator()(unsigned i, uint64_t& key, double& m) const {
        float v = (force_first && i == 0) ? F32_INF : x[i];
        key = rank_key(v, i);
        m = 0.0;
        return true;
    }
};

extern "C" __global__ void __launch_bounds__(1024)
sel_ovs(const SeqDesc* __restrict__ seqs, SelParams p, const int* __restrict__ pattern,
        const float* __restrict__ vertical, const float* __restrict__ slash,
        const float* __restrict__ vpool, const float* __restrict__ spool,
        unsigned char* __restrict__ colsel, unsigned char* __restrict__ offsel) {
    __shared__ RadixShared rs;
    const int h = blockIdx.x, s = blockIdx.y;
    const int pat = pattern[s * p.num_heads + h];
    if (!p.original || pat == PAT_DENSE) return;
    const SeqDesc sd = seqs[s];
    const unsigned n = sd.kv_len, nkb = sd.nkb;
    const size_t lo = (size_t)sd.tok_off * p.num_heads + (size_t)h * n;
    const size_t bo = (size_t)sd.kb_off * p.num_heads + (size_t)h * nkb;
    unsigned nv = p.mb, ns = p.mb;
    if (pat == PAT_VS) {
        const int sc = 60;  // lines sum to 1: 2^60 fixed point cannot overflow
        const uint64_t T = (uint64_t)__dmul_rn((double)p.gamma, ldexp(1.0, sc));
        unsigned kv = 0, ks = 0;
        radix_cut(rs, LineItems{vertical + lo}, n, 0, T, 0, sc, &kv);
        radix_cut(rs, LineItems{slash + lo}, n, 0, T, 0, sc, &ks);
        const unsigned cap = p.cap > 0 ? min((unsigned)p.cap, nkb) : nkb;
        nv = min(max((kv + 1) / 128 + 1, (unsigned)p.mb), cap);
        ns = min(max((ks + 1) / 128 + 1, (unsigned)p.mb), cap);
    }
    const uint64_t kcol = radix_cut(rs, PooledItems{vpool + bo, p.sink}, nkb, 2, 0, nv, 0, nullptr);
    const uint64_t koff = radix_cut(rs, PooledItems{spool + bo, p.diagonal}, nkb, 2, 0, ns, 0, nullptr);
    for (unsigned c = threadIdx.x; c < nkb; c += blockDim.x) {
        float fv = (p.sink && c == 0) ? F32_INF : vpool[bo + c];
        float fs = (p.diagonal && c == 0) ? F32_INF : spool[bo + c];
        colsel[bo + c] = rank_key(fv, c) < kcol;
        offsel[bo + c] = rank_key(fs, c) < koff;
    }
}

// ---- extension: every head's rows into the block mask -------------------------------------

// Writes one mask row (query block r of (s, h)): dense heads every causal block; faithful
// vertical-slash heads selected columns and distances; original heads (vertical-slash, and the
// mb lines of query-aware heads) selected columns and offsets; forced blocks everywhere except
// faithful query-aware heads (their kernels add them after the per-row raise). Grid
// (ceil(Σ nqb / 8), H), 256 threads: a warp per row (8 rows per CTA amortise the dependent
// descriptor loads at the start), a lane per key block (each mask word is the warp's ballot).
extern "C" __global__ void sel_extend(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                      const unsigned* __restrict__ qb_seq, unsigned total_qb, SelParams p,
                                      const int* __restrict__ pattern, const unsigned char* __restrict__ colsel,
                                      const unsigned char* __restrict__ offsel, const unsigned* __restrict__ dist_prefix,
                                      const unsigned char* __restrict__ diag_hit, unsigned* __restrict__ mask) {
    const unsigned gb = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (gb >= total_qb) return;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned r = gb - sd.qb_off;
    const int pat = pattern[s * p.num_heads + h];
    const unsigned d = g.last_diag(r);
    const unsigned first = g.first_pos(r), last = g.last_pos(r), bs = g.bs;
    const size_t bo = (size_t)sd.kb_off * p.num_heads + (size_t)h * sd.nkb;
    const unsigned* pre = dist_prefix + (size_t)ss.dist_off * p.num_heads + (size_t)h * (sd.kv_len + 1);
    unsigned* row = mask + mask_row(ss, sd, p, h, r);
    // sel_fvs_lines' table of the distance test for full query blocks (index r - c + K0).
    const bool full = last - first == bs - 1;
    const unsigned k0 = (sd.kv_len - sd.q_len + bs - 1) / bs;
    const unsigned char* dh = diag_hit + ((size_t)sd.kb_off + s) * p.num_heads + (size_t)h * (sd.nkb + 1);
    const unsigned lane = threadIdx.x % 32;
#pragma unroll 4
    for (unsigned w = 0; w < ss.words; ++w) {
        const unsigned c = w * 32 + lane;
        bool on = false;
        if (c <= d) {
            if (pat == PAT_DENSE) {
                on = true;
            } else if (!p.original && pat == PAT_QA) {
                on = false;
            } else if (!p.original) {
                bool hit;
                if (full) {
                    hit = dh[r + k0 - c];
                } else {
                    const long long lo = (long long)first - (long long)(c * bs + bs - 1);
                    const unsigned dlo = lo > 0 ? (unsigned)lo : 0;
                    const unsigned dhi = last - c * bs;
                    hit = pre[dhi + 1] > pre[dlo];
                }
                on = colsel[bo + c] || hit || is_forced(g, p, r, c);
            } else {
                on = colsel[bo + c] || offsel[bo + d - c] || is_forced(g, p, r, c);
            }
        }
        const unsigned bits = __ballot_sync(0xffffffffu, on);
        if (lane == 0) row[w] = bits;
    }
}

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
    fetch(lane, xn);
    for (unsigned c0 = 0; c0 < maxlen; c0 += 32) {
        const unsigned c = c0 + lane;
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) x[i] = xn[i];
        fetch(c + 32, xn);
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
#pragma unroll
        for (int i = 0; i < QS_ROWS; ++i) x[i] = xn[i];
        fetch(c + 32, xn);
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
struct MapItems {
    const float* map;
    Geo g;
    unsigned nkb;
    float inv_nkb;
    FP_DEVICE bool operator()(unsigned i, uint64_t& key, double& m) const {
        // r = i / nkb without the integer division (exact after one correction step).
        unsigned r = __float2uint_rz((float)i * inv_nkb);
        if (r * nkb > i) --r;
        else if ((r + 1) * nkb <= i) ++r;
        const unsigned c = i - r * nkb;
        if (c > g.last_diag(r)) return false;
        m = map[i];
        key = rank_key(map[i], i);
        return true;
    }
};

// Fixed-point scale of a map's masses: nqb unit-mass rows cannot overflow 64 bits.
FP_DEVICE int map_scale_bits(unsigned nqb) {
    int lg = 0;
    while ((1u << lg) < nqb + 1) ++lg;
    return 62 - lg;
}
// The flattened target t·nqb in that fixed point.
FP_DEVICE uint64_t flat_target(double t, unsigned nqb, int sc) {
    return (uint64_t)__dmul_rn(t * (double)nqb, ldexp(1.0, sc));
}

// One head's flattened cut in progress (global memory, slot s·H + h). 48 bytes: the host
// allocates 6 u64 per slot.
struct FlatCut {
    unsigned long long target;     // fixed-point target mass
    unsigned long long prefix;     // digits fixed so far
    unsigned long long sum_above;  // fixed-point mass of the keys ranked before the prefix
    unsigned cnt_above;
    int state;                     // 0 refining, 1 done, 2 not a flattened query-aware head
    int mode;                      // radix_cut's mode 0 (original) / 1 (faithful)
    int sc;                        // fixed-point scale bits
};
#ifndef FLAT_CHUNK
#define FLAT_CHUNK 8192  // map entries per sel_flat_hist CTA (the host passes select.rs FLAT_CHUNK)
#endif

FP_DEVICE bool flat_qa_head(const SelParams& p, const int* pattern, int slot) {
    return !p.per_row && pattern[slot] == PAT_QA;
}

// Starts every head's flattened cut: the original's target (f32 of gamma_py·nqb, mode 0) or
// the faithful one at t = gamma (mode 1; sel_qa_calib moves it when probes calibrate t).
// Grid (H, nseq), 32 threads.
extern "C" __global__ void sel_flat_init(const SeqDesc* __restrict__ seqs, SelParams p,
                                         const int* __restrict__ pattern, FlatCut* __restrict__ cut) {
    const int h = blockIdx.x, s = blockIdx.y, slot = s * p.num_heads + h;
    if (threadIdx.x != 0) return;
    FlatCut st{};
    st.state = flat_qa_head(p, pattern, slot) ? 0 : 2;
    const unsigned nqb = seqs[s].nqb;
    st.sc = map_scale_bits(nqb);
    st.mode = p.original ? 0 : 1;
    st.target = p.original ? (uint64_t)__dmul_rn((double)(float)(p.gamma_py * (double)nqb), ldexp(1.0, st.sc))
                           : flat_target((double)p.gamma, nqb, st.sc);
    cut[slot] = st;
}

// Digit `depth` of every refining head's cut: histogram of FLAT_CHUNK map entries per CTA
// (only keys under the prefix fixed so far). Grid (chunks, H, nseq), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
sel_flat_hist(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
              const float* __restrict__ map, const FlatCut* __restrict__ cut, int depth,
              unsigned* __restrict__ hist_cnt, unsigned long long* __restrict__ hist_sum) {
    __shared__ unsigned cnt[256], sum_lo[256], sum_hi[256];
    const int h = blockIdx.y, s = blockIdx.z, slot = s * p.num_heads + h;
    const FlatCut st = cut[slot];
    if (st.state != 0) return;
    const SeqDesc sd = seqs[s];
    const unsigned total = sd.nqb * sd.nkb, i0 = blockIdx.x * FLAT_CHUNK;
    if (i0 >= total) return;
    const unsigned i1 = min(i0 + FLAT_CHUNK, total);
    for (int b = threadIdx.x; b < 256; b += blockDim.x) { cnt[b] = 0; sum_lo[b] = 0; sum_hi[b] = 0; }
    __syncthreads();
    const Geo g = geo(sd, p.block_size);
    const MapItems items{map + (size_t)sel[s].map_off * p.num_heads + (size_t)h * total, g, sd.nkb,
                         1.f / (float)sd.nkb};
    const int shift = 56 - 8 * depth;
    const double scale = ldexp(1.0, st.sc);
    // Run-length aggregation before the shared atomics (neighbouring entries share digits).
    int cur = -1;
    unsigned cur_n = 0;
    unsigned long long cur_s = 0;
    for (unsigned i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        uint64_t key; double m;
        if (!items(i, key, m)) continue;
        if (depth > 0 && (key >> (shift + 8)) != st.prefix) continue;
        const int b = (int)((key >> shift) & 255);
        if (b != cur) {
            if (cur_n) { atomicAdd(&cnt[cur], cur_n); shared_add_u64(&sum_lo[cur], &sum_hi[cur], cur_s); }
            cur = b; cur_n = 0; cur_s = 0;
        }
        ++cur_n;
        cur_s += (unsigned long long)fixed(m, scale);
    }
    if (cur_n) { atomicAdd(&cnt[cur], cur_n); shared_add_u64(&sum_lo[cur], &sum_hi[cur], cur_s); }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
        if (cnt[b]) {
            atomicAdd(&hist_cnt[(size_t)slot * 256 + b], cnt[b]);
            atomicAdd(&hist_sum[(size_t)slot * 256 + b], join_u64(sum_lo[b], sum_hi[b]));
        }
}

// Fixes digit `depth` of every refining head (radix_cut's bin walk) and clears the head's
// bins for the next digit; a finished head writes its cut key (KEY_ALL: every key taken).
// Grid (H·nseq), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
sel_flat_pick(int depth, FlatCut* __restrict__ cut, unsigned* __restrict__ hist_cnt,
              unsigned long long* __restrict__ hist_sum, unsigned long long* __restrict__ kcut_out) {
    __shared__ unsigned cnt[256];
    __shared__ unsigned long long sum[256];
    const int slot = blockIdx.x;
    if (cut[slot].state != 0) return;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        const size_t gi = (size_t)slot * 256 + b;
        cnt[b] = hist_cnt[gi];
        sum[b] = hist_sum[gi];
        hist_cnt[gi] = 0;
        hist_sum[gi] = 0;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    FlatCut st = cut[slot];
    int res = 2;  // every key taken
    for (int b = 0; b < 256; ++b) {
        if (cnt[b] == 0) continue;
        const bool take = st.mode == 0 ? st.sum_above + sum[b] <= st.target : st.sum_above + sum[b] < st.target;
        if (take) {
            st.sum_above += sum[b];
            st.cnt_above += cnt[b];
        } else {
            st.prefix = (st.prefix << 8) | (unsigned long long)b;
            res = depth == 7 ? 1 : 0;
            break;
        }
    }
    if (res == 2) {
        st.state = 1;
        kcut_out[slot] = KEY_ALL;
    } else {
        st.state = res;
        if (res == 1) kcut_out[slot] = st.prefix;
    }
    cut[slot] = st;
}

// The cut's last digits on a short list: after FLAT_FULL_DIGITS digits over the whole map,
// only the keys under the fixed prefix can still cross, usually a few thousand of 524k.
// sel_flat_compact appends their map indices to the head's list (warp-aggregated atomics; the
// order does not matter, every sum below is an integer), sel_flat_finish runs radix_cut over
// them with the mass already taken subtracted from the target.
#ifndef FLAT_FULL_DIGITS
#define FLAT_FULL_DIGITS 2  // the host passes select.rs FLAT_FULL_DIGITS
#endif
// Grid (chunks, H, nseq), 256 threads; list [map_off·H + h·nqb·nkb + j], list_len [slot].
extern "C" __global__ void __launch_bounds__(256)
sel_flat_compact(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
                 const float* __restrict__ map, const FlatCut* __restrict__ cut,
                 unsigned* __restrict__ list, unsigned* __restrict__ list_len) {
    const int h = blockIdx.y, s = blockIdx.z, slot = s * p.num_heads + h;
    const FlatCut st = cut[slot];
    if (st.state != 0) return;
    const SeqDesc sd = seqs[s];
    const unsigned total = sd.nqb * sd.nkb, i0 = blockIdx.x * FLAT_CHUNK;
    if (i0 >= total) return;
    const unsigned i1 = min(i0 + FLAT_CHUNK, total);
    const size_t hb = (size_t)sel[s].map_off * p.num_heads + (size_t)h * total;
    const MapItems items{map + hb, geo(sd, p.block_size), sd.nkb, 1.f / (float)sd.nkb};
    const int shift = 64 - 8 * FLAT_FULL_DIGITS;
    const unsigned lane = threadIdx.x % 32;
    // Every thread runs the same number of rounds (the bound is on the round's base), so the
    // ballots see whole warps.
    for (unsigned i = i0 + threadIdx.x; i - threadIdx.x < i1; i += blockDim.x) {
        uint64_t key; double m;
        const bool keep = i < i1 && items(i, key, m) && (key >> shift) == st.prefix;
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        if (ballot == 0) continue;
        unsigned base = 0;
        if (lane == 0) base = atomicAdd(&list_len[slot], (unsigned)__popc(ballot));
        base = __shfl_sync(0xffffffffu, base, 0);
        if (keep) list[hb + base + __popc(ballot & ((1u << lane) - 1u))] = i;
    }
}

struct ListItems {
    const float* map;
    const unsigned* list;
    FP_DEVICE bool operator()(unsigned j, uint64_t& key, double& m) const {
        const unsigned i = list[j];
        m = map[i];
        key = rank_key(map[i], i);
        return true;
    }
};

// Grid (H, nseq), 1024 threads. Writes kcut for every head still refining.
extern "C" __global__ void __launch_bounds__(1024)
sel_flat_finish(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
                const float* __restrict__ map, const FlatCut* __restrict__ cut,
                const unsigned* __restrict__ list, const unsigned* __restrict__ list_len,
                unsigned long long* __restrict__ kcut_out) {
    __shared__ RadixShared rs;
    const int h = blockIdx.x, s = blockIdx.y, slot = s * p.num_heads + h;
    const FlatCut st = cut[slot];
    if (st.state != 0) return;
    const SeqDesc sd = seqs[s];
    const size_t hb = (size_t)sel[s].map_off * p.num_heads + (size_t)h * sd.nqb * sd.nkb;
    // The keys ranked before the prefix are taken (sum_above ≤ target in mode 0, < in mode 1).
    const uint64_t k = radix_cut(rs, ListItems{map + hb, list + hb}, list_len[slot], st.mode,
                                 st.target - st.sum_above, 0, st.sc, nullptr);
    if (threadIdx.x == 0) kcut_out[slot] = k;
}

// Marks the entries the flattened cut keeps (original: key < kcut, crossing excluded;
// faithful: key ≤ kcut) into the mask, one thread per mask word (no atomics).
// Grid (Σ nqb, H), 64 threads.
extern "C" __global__ void sel_qa_flat_mark(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                            const unsigned* __restrict__ qb_seq, SelParams p,
                                            const int* __restrict__ pattern, const float* __restrict__ map,
                                            const unsigned long long* __restrict__ kcut, unsigned* __restrict__ mask) {
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    if (!p.original || p.per_row || pattern[s * p.num_heads + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned r = gb - sd.qb_off, d = g.last_diag(r), nkb = sd.nkb;
    const uint64_t K = kcut[s * p.num_heads + h];
    const float* mp = map + (size_t)ss.map_off * p.num_heads + ((size_t)h * sd.nqb + r) * nkb;
    unsigned* row = mask + mask_row(ss, sd, p, h, r);
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) {
        unsigned bits = 0;
        for (unsigned b = 0; b < 32; ++b) {
            const unsigned c = w * 32 + b;
            if (c > d) break;
            const uint64_t key = rank_key(mp[c], r * nkb + c);
            if (p.original ? key < K : key <= K) bits |= 1u << b;
        }
        if (bits) row[w] |= bits;
    }
}

// The original mode's per-query-block cut (Appendix F.4; the faithful mode's rows are built by
// sel_qa_build), one row per CTA: sorts the row's causal entries by rank (bitonic, shared
// memory) and keeps the smallest top set with row mass ≥ gamma (core's cumulative_mass_cut),
// replaying core's f64 sums in that order. Grid (Σ nqb, H), 256 threads, smem
// 16·next_pow2(nkb) + 4·ceil(nkb/32).
extern "C" __global__ void __launch_bounds__(256)
sel_qa_row(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, const unsigned* __restrict__ qb_seq,
           SelParams p, const int* __restrict__ pattern, const float* __restrict__ map, unsigned* __restrict__ mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    if (pattern[s * p.num_heads + h] != PAT_QA) return;
    if (!p.per_row || !p.original) return;  // only the original per-row cut lives here
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned r = gb - sd.qb_off, d = g.last_diag(r), n = d + 1;
    const float* sc = map + (size_t)ss.map_off * p.num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
    unsigned* row = mask + mask_row(ss, sd, p, h, r);
    const int N = next_pow2(n);
    uint64_t* key = (uint64_t*)smem;
    uint32_t* val = (uint32_t*)(key + N);
    float* scs = (float*)(val + N);          // the row's scores, [N]
    unsigned* bits = (unsigned*)(scs + N);   // the row's mask words
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float x = (unsigned)i < n ? sc[i] : 0.f;
        scs[i] = x;
        key[i] = (unsigned)i < n ? rank_key(x, i) : KEY_ALL;
        val[i] = i;
    }
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) bits[w] = row[w];
    __syncthreads();
    bitonic_sort(key, val, N);
    // cumulative_mass_cut, replayed from shared memory: total of max(s, 0) in index order,
    // the running sum in rank order, ≥.
    if (threadIdx.x == 0) {
        double tot = 0.0;
        for (unsigned c = 0; c < n; ++c) tot += (double)fmaxf(scs[c], 0.f);
        const double target = (double)p.gamma * tot;
        double acc = 0.0;
        unsigned k = n;
        for (unsigned e = 0; e < n; ++e) {
            acc += (double)fmaxf(scs[val[e]], 0.f);
            if (acc >= target) { k = e + 1; break; }
        }
        for (unsigned e = 0; e < k; ++e) bits[val[e] / 32] |= 1u << (val[e] % 32);
    }
    __syncthreads();
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) row[w] = bits[w];
}

// ---- faithful query-aware (core's QueryAwareCuts) -------------------------------------------

// Each causal row of a faithful query-aware head in rank order with its running mass (f64,
// summed in that order as core does), into order[map layout] (u32) and run[map layout] (f64).
// Per-query-block cuts need every row: grid (Σ nqb, H, 1). The flattened cut only the rows
// holding probes (the calibration reads their ranks): grid (PROBE_QUERIES, H, nseq), one CTA
// per probe slot (repeated blocks: the first slot). 256 threads, smem 12·next_pow2(nkb).
extern "C" __global__ void __launch_bounds__(256)
sel_qa_sort(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, const unsigned* __restrict__ qb_seq,
            SelParams p, const int* __restrict__ pattern, const float* __restrict__ map,
            unsigned* __restrict__ order, double* __restrict__ run) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int h = blockIdx.y;
    const unsigned s = p.per_row ? qb_seq[blockIdx.x] : blockIdx.z;
    if (p.original || pattern[s * p.num_heads + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    unsigned r;
    if (p.per_row) {
        r = blockIdx.x - sd.qb_off;
    } else {
        const unsigned u = blockIdx.x;
        if (u >= num_probes(g)) return;
        r = probe_block(g, u);
        if (u > 0 && probe_block(g, u - 1) == r) return;
    }
    const unsigned n = g.last_diag(r) + 1;
    const size_t base = (size_t)sel[s].map_off * p.num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
    const float* sc = map + base;
    const int N = next_pow2(n);
    uint64_t* key = (uint64_t*)smem;
    uint32_t* val = (uint32_t*)(key + N);
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        key[i] = (unsigned)i < n ? rank_key(sc[i], i) : KEY_ALL;
        val[i] = i;
    }
    __syncthreads();
    bitonic_sort(key, val, N);
    if (threadIdx.x < 32) {
        // running sums in order, replayed through shuffles (every lane holds the same sum)
        const unsigned lane = threadIdx.x;
        double acc = 0.0;
        for (unsigned b = 0; b < n; b += 32) {
            const unsigned e = b + lane;
            const double v = e < n ? (double)sc[val[e]] : 0.0;
            double mine = 0.0;
            for (int j = 0; j < 32; ++j) {
                acc += __shfl_sync(0xffffffffu, v, j);
                if ((int)lane == j) mine = acc;
            }
            if (e < n) {
                order[base + e] = val[e];
                run[base + e] = mine;
            }
        }
    }
}

// Row r's own cut at target t (core's QueryAwareCuts::row, before the flattened extras):
// the smallest rank prefix whose running mass reaches t·(row total), at least min(mb, len).
FP_DEVICE unsigned own_cut(const double* run, unsigned n, double t, int mb) {
    const double target = t * run[n - 1];
    unsigned lo = 0, hi = n;  // partition_point(m < target)
    while (lo < hi) {
        const unsigned mid = (lo + hi) / 2;
        if (run[mid] < target) lo = mid + 1;
        else hi = mid;
    }
    unsigned k = min(lo + 1, n);
    return max(k, min((unsigned)mb, n));
}

// Core's bisection for the query-aware target: the smallest t of 16 halvings of [0, 1] whose
// selection gives the probes gamma (`done` grows with t), 2 (every causal block) when even t = 1
// misses.
template <typename Done>
FP_DEVICE double bisect_target(const Done& done) {
    double lo = 0.0, hi = 1.0;
    if (!done(hi)) return 2.0;
    for (int it = 0; it < 16; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (done(mid)) hi = mid;
        else lo = mid;
    }
    return hi;
}

// The target t of a faithful query-aware head (core's query_aware): gamma, or with probes the
// smallest t of core's 16-step bisection on [0, 1] (2 when even t = 1 misses) whose selection
// gives the probes a mean captured share ≥ gamma. Instead of one cut of the whole map per
// bisection step, one pass: the selection grows with t, and a probe row's entry is in it once
// t passes a threshold of its own (flattened: once the cut reaches the entry's key, i.e. once
// t·nqb exceeds the map mass ranked before it; per query block: once t·(row total) exceeds the
// row's running mass before it). Every entry that the target decides is keyed by when it
// enters and weighted by the probes' share it adds; a radix select over those finds the entry
// whose arrival first gives the probes gamma, and each bisection step becomes a comparison
// with it. The target goes to t_out and, flattened, to the head's FlatCut; a flattened head
// whose answer depends on the map mass ranked before the crossing entry leaves that to
// sel_calib_before / sel_calib_finish (cal: [kc, mass before, count before, pending] per head,
// zeroed by the host). Grid (H, nseq), 1024 threads.
// cand_key / cand_w: PROBE_QUERIES·nkb per head at (kb_off·H + h·nkb)·PROBE_QUERIES.
extern "C" __global__ void __launch_bounds__(1024)
sel_qa_calib(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
             const int* __restrict__ pattern, const float* __restrict__ map,
             const unsigned* __restrict__ order, const double* __restrict__ run,
             const float* __restrict__ probe_block_mass, const double* __restrict__ probe_tot, int probes,
             unsigned long long* __restrict__ cand_key, double* __restrict__ cand_w,
             double* __restrict__ t_out, FlatCut* __restrict__ cut, unsigned long long* __restrict__ cal) {
    __shared__ RadixShared rs;
    __shared__ double red[32];
    __shared__ double tot_sh[PROBE_QUERIES];
    const int h = blockIdx.x, s = blockIdx.y, slot = s * p.num_heads + h;
    if (p.original || pattern[slot] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned nkb = sd.nkb;
    const size_t hb = (size_t)ss.map_off * p.num_heads + (size_t)h * sd.nqb * nkb;
    const float* mp = map + hb;
    const bool flat = !p.per_row;
    const unsigned P = probes ? num_probes(g) : 0;
    if (P == 0) {
        if (threadIdx.x == 0) t_out[slot] = (double)p.gamma;  // sel_flat_init set the flattened target
        return;
    }
    const float* pm = probe_block_mass + (size_t)sd.pad0 * p.num_heads + (size_t)h * P * nkb;
    const size_t cb = ((size_t)sd.kb_off * p.num_heads + (size_t)h * nkb) * PROBE_QUERIES;
    unsigned long long* ck = cand_key + cb;
    double* cw = cand_w + cb;
    if (threadIdx.x < P) tot_sh[threadIdx.x] = probe_tot[(size_t)slot * PROBE_QUERIES + threadIdx.x];
    __syncthreads();
    // Entries of each probe block's row (its first probe slot), by rank e in the row.
    const double wscale = ldexp(1.0, CAL_SC);
    double base = 0.0;  // the probes' share held whatever t is (first min(mb, n) ranks, forced)
    for (unsigned i = threadIdx.x; i < P * nkb; i += blockDim.x) {
        const unsigned u = i / nkb, e = i % nkb;
        uint64_t key = KEY_ALL;
        const unsigned r = probe_block(g, u);
        const unsigned n = g.last_diag(r) + 1;
        if ((u == 0 || probe_block(g, u - 1) != r) && e < n) {
            const size_t rb = hb + (size_t)r * nkb;
            const unsigned c = order[rb + e];
            double w = 0.0;
            for (unsigned v = u; v < P && probe_block(g, v) == r; ++v)
                if (tot_sh[v] > 0.0) w += (double)pm[(size_t)v * nkb + c] / tot_sh[v];
            const unsigned e0 = min((unsigned)p.mb, n);
            if (e < (flat ? e0 : max(e0, 1u)) || is_forced(g, p, r, c)) {
                base += w;
            } else if (flat) {
                key = rank_key(mp[(size_t)r * nkb + c], r * nkb + c);
            } else {
                // smallest j ≤ 2^16 with (j·2^-16)·total > run[e-1] (core: run < t·total)
                const double tot = run[rb + n - 1], before = run[rb + e - 1];
                unsigned lo = 0, hi = 65537;
                while (lo < hi) {
                    const unsigned mid = (lo + hi) / 2;
                    if (ldexp((double)mid, -16) * tot > before) hi = mid;
                    else lo = mid + 1;
                }
                if (lo <= 65536) key = ((uint64_t)lo << 32) | i;
            }
            cw[i] = w;
        }
        ck[i] = key;
    }
    const double f0 = block_sum_f64(base, red);  // syncs: the candidate arrays are visible
    const double target = (double)p.gamma * (double)P - 1e-12;
    // Which bisection targets succeed: always (the fixed share suffices), never (all of it
    // misses), or from the crossing entry's threshold on.
    int always = f0 >= target;
    uint64_t kc = KEY_ALL;
    if (!always) kc = radix_cut(rs, CandItems{ck, cw}, P * nkb, 1, fixed(target - f0, wscale), 0, CAL_SC, nullptr);
    if (threadIdx.x != 0) return;
    if (!always && kc != KEY_ALL && flat) {
        // Pending: sel_calib_before measures the map ranked before kc, sel_calib_finish ends.
        cal[(size_t)slot * 4] = kc;
        cal[(size_t)slot * 4 + 3] = 1;
        return;
    }
    // Per query block: entry thresholds are targets already.
    auto probes_done = [&](double t) -> bool {
        if (always) return true;
        if (kc == KEY_ALL) return false;
        return t >= ldexp((double)(kc >> 32), -16);
    };
    const double t = bisect_target(probes_done);
    t_out[slot] = t;
    if (flat) cut[slot].target = flat_target(t, sd.nqb, map_scale_bits(sd.nqb));
}

// Flattened calibration, pending heads: the count and fixed-point mass of the map's keys
// ranked before the crossing entry kc (cal[slot·4 + 1..2], integer atomics). Grid (chunks, H,
// nseq), 256 threads, FLAT_CHUNK entries per CTA.
extern "C" __global__ void __launch_bounds__(256)
sel_calib_before(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
                 const float* __restrict__ map, unsigned long long* __restrict__ cal) {
    const int h = blockIdx.y, s = blockIdx.z, slot = s * p.num_heads + h;
    if (cal[(size_t)slot * 4 + 3] == 0) return;
    const uint64_t kc = cal[(size_t)slot * 4];
    const SeqDesc sd = seqs[s];
    const unsigned total = sd.nqb * sd.nkb, i0 = blockIdx.x * FLAT_CHUNK;
    if (i0 >= total) return;
    const unsigned i1 = min(i0 + FLAT_CHUNK, total);
    const MapItems items{map + (size_t)sel[s].map_off * p.num_heads + (size_t)h * total, geo(sd, p.block_size),
                         sd.nkb, 1.f / (float)sd.nkb};
    const double scale = ldexp(1.0, map_scale_bits(sd.nqb));
    unsigned long long m_before = 0, c_before = 0;
    for (unsigned i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        uint64_t key; double m;
        if (items(i, key, m) && key < kc) {
            m_before += fixed(m, scale);
            ++c_before;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        m_before += __shfl_xor_sync(0xffffffffu, m_before, o);
        c_before += __shfl_xor_sync(0xffffffffu, c_before, o);
    }
    if (threadIdx.x % 32 == 0 && c_before) {
        atomicAdd(&cal[(size_t)slot * 4 + 1], m_before);
        atomicAdd(&cal[(size_t)slot * 4 + 2], c_before);
    }
}

// Flattened calibration, pending heads: the entry kc is in the cut at t once the cut reaches
// it, i.e. when nothing ranks before it or the mass before it is under the target t·nqb.
// Grid (H·nseq), 32 threads.
extern "C" __global__ void sel_calib_finish(const SeqDesc* __restrict__ seqs, SelParams p,
                                            const unsigned long long* __restrict__ cal,
                                            double* __restrict__ t_out, FlatCut* __restrict__ cut) {
    const int slot = blockIdx.x;
    if (threadIdx.x != 0 || cal[(size_t)slot * 4 + 3] == 0) return;
    const unsigned nqb = seqs[slot / p.num_heads].nqb;
    const int sc = map_scale_bits(nqb);
    const unsigned long long before = cal[(size_t)slot * 4 + 1], count = cal[(size_t)slot * 4 + 2];
    const double t = bisect_target([&](double tt) { return count == 0 || before < flat_target(tt, nqb, sc); });
    t_out[slot] = t;
    cut[slot].target = flat_target(t, nqb, sc);
}

// Faithful query-aware rows at the calibrated target. Flattened: the row's keys ≤ kcut (a
// prefix of its ranking), raised to its top min(mb, n) by a radix top-n over the row when the
// cut holds fewer; per query block: the row's own cut (order/run). Then the forced blocks.
// Grid (Σ nqb, H), 128 threads, smem 4·ceil(nkb/32).
struct RowItems {
    const float* row;
    unsigned flat0;
    FP_DEVICE bool operator()(unsigned i, uint64_t& key, double& m) const {
        key = rank_key(row[i], flat0 + i);
        m = 0.0;
        return true;
    }
};
extern "C" __global__ void __launch_bounds__(128)
sel_qa_build(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, const unsigned* __restrict__ qb_seq,
             SelParams p, const int* __restrict__ pattern, const float* __restrict__ map,
             const unsigned* __restrict__ order, const double* __restrict__ run,
             const double* __restrict__ t_in, const unsigned long long* __restrict__ kcut,
             unsigned* __restrict__ mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ RadixShared rs;
    __shared__ unsigned in_cut;
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    if (p.original || pattern[s * p.num_heads + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned r = gb - sd.qb_off, n = g.last_diag(r) + 1, nkb = sd.nkb;
    const size_t rb = (size_t)ss.map_off * p.num_heads + ((size_t)h * sd.nqb + r) * nkb;
    unsigned* bits = (unsigned*)smem;
    unsigned* row = mask + mask_row(ss, sd, p, h, r);
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) bits[w] = row[w];
    if (threadIdx.x == 0) in_cut = 0;
    __syncthreads();
    if (p.per_row) {
        const unsigned k = own_cut(run + rb, n, t_in[s * p.num_heads + h], p.mb);
        for (unsigned e = threadIdx.x; e < n; e += blockDim.x) {
            const unsigned c = order[rb + e];
            if (e < k || is_forced(g, p, r, c)) atomicOr(&bits[c / 32], 1u << (c % 32));
        }
    } else {
        const uint64_t K = kcut[s * p.num_heads + h];
        const float* mr = map + rb;
        unsigned mine = 0;
        for (unsigned c = threadIdx.x; c < n; c += blockDim.x) mine += rank_key(mr[c], r * nkb + c) <= K;
        atomicAdd(&in_cut, mine);
        __syncthreads();
        const unsigned e0 = min((unsigned)p.mb, n);
        // The row's (e0+1)-th key: keys below it are its top e0.
        const uint64_t K2 = in_cut < e0 ? radix_cut(rs, RowItems{mr, r * nkb}, n, 2, 0, e0, 0, nullptr) : KEY_NONE;
        for (unsigned c = threadIdx.x; c < n; c += blockDim.x) {
            const uint64_t key = rank_key(mr[c], r * nkb + c);
            if (key <= K || key < K2 || is_forced(g, p, r, c)) atomicOr(&bits[c / 32], 1u << (c % 32));
        }
    }
    __syncthreads();
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) row[w] = bits[w];
}

// ---- faithful query-aware exact top-up (core's RepCoverage::top_up) -------------------------
//
// Each representative query must hold gamma of its exact attention, else the heaviest missing
// causal key blocks of its query block (by mass summed over the block's representative
// queries) are added until every one does. Every sum is core's: f64, sequential, in the same
// order. The masses arrive row-major ([rep, nkb] per head), which a thread-per-row pass
// would read with a stride of nkb floats; the prep kernel transposes them per
// representative query block so that the top-up streams key-block columns, contiguous and
// coalesced, through shared memory, and it computes the column scores on the way.

#define TOPUP_COLS 32     // key blocks per sel_qa_topup_prep CTA: one warp reads a row's segment (select.rs TOPUP_COLS)
#define TOPUP_ROWS 64     // representative rows per staged prep tile
#define TOPUP_THREADS 256 // sel_qa_topup's block size (one thread per row: rep ≤ block_size ≤ 256)
#define TOPUP_PER 32      // staged floats per thread per tile: tile ≤ TOPUP_PER · TOPUP_THREADS

// The representative rows of query block r: [ri0, ri1) (rep_block is monotone in the row).
FP_DEVICE void rep_rows(const Geo& g, unsigned r, unsigned& ri0, unsigned& ri1) {
    const unsigned base = g.q_len - g.rep;
    ri0 = r * g.bs > base ? r * g.bs - base : 0u;
    ri1 = min(g.rep, (r + 1) * g.bs - base);
}

// Top-up prep, per representative query block r of a faithful query-aware head (rows
// [ri0, ri1), nr of them, at head offset base = rep_off·H + h·rep·nkb):
// - mass_t[base + ri0·nkb + c·nr + (i - ri0)] = rep_block_mass[base + i·nkb + c] (the
//   block's rows transposed in place of its own region);
// - col_sum[base + (r - r0)·nkb + c] = (f32) Σ_{i = ri0..ri1-1} (f64) mass[i][c], summed in
//   row order from 0.0 (core's score of an uncovered key block, before the -inf of covered ones).
// Grid (ceil(max nkb / TOPUP_COLS), H, nseq), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
sel_qa_topup_prep(const SeqDesc* __restrict__ seqs, SelParams p, const int* __restrict__ pattern,
                  const float* __restrict__ rep_block_mass, float* __restrict__ mass_t,
                  float* __restrict__ col_sum) {
    __shared__ float tile[TOPUP_ROWS][TOPUP_COLS + 1];  // padded: the transposed reads are conflict free
    const int h = blockIdx.y, s = blockIdx.z;
    if (p.original || pattern[s * p.num_heads + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned nkb = sd.nkb, c0 = blockIdx.x * TOPUP_COLS;
    if (c0 >= nkb) return;
    const unsigned nc = min((unsigned)TOPUP_COLS, nkb - c0);
    const size_t base = (size_t)sd.rep_off * p.num_heads + (size_t)h * g.rep * nkb;
    const float* mass = rep_block_mass + base;
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const unsigned r0 = g.rep_block(0), r1 = g.rep_block(g.rep - 1);
    for (unsigned r = r0; r <= r1; ++r) {
        unsigned ri0, ri1;
        rep_rows(g, r, ri0, ri1);
        const unsigned nr = ri1 - ri0;
        float* mt = mass_t + base + (size_t)ri0 * nkb;
        double a = 0.0;  // warp 0: key block c0 + lane, rows in order across the tiles
        for (unsigned k0 = 0; k0 < nr; k0 += TOPUP_ROWS) {
            const unsigned nk = min((unsigned)TOPUP_ROWS, nr - k0);
            for (unsigned k = warp; k < nk; k += warps)  // one warp reads one row's segment
                if (lane < nc) tile[k][lane] = mass[(size_t)(ri0 + k0 + k) * nkb + c0 + lane];
            __syncthreads();
            if (warp == 0 && lane < nc)
                for (unsigned k = 0; k < nk; ++k) a += (double)tile[k][lane];
            // consecutive threads write consecutive rows of one key block
            for (unsigned x = threadIdx.x; x < nk * nc; x += blockDim.x) {
                const unsigned u = x / nk, k = x - u * nk;
                mt[(size_t)(c0 + u) * nr + k0 + k] = tile[k][u];
            }
            __syncthreads();  // the tile is read before the next one overwrites it
        }
        if (warp == 0 && lane < nc) col_sum[base + (size_t)(r - r0) * nkb + c0 + lane] = (float)a;
    }
}

// Streams columns col(0), …, col(n-1) of a block's transposed masses (mt[col·nr + row])
// through two shared tiles of E columns each, with the next two tiles' loads in flight (two
// register sets, all threads) while the current one is consumed: a tile's loads have two
// consume steps to arrive (the data may come from HBM). consume(t, j0, m) reads t[j·nr + row]
// for the columns j0 + j, j < m, and says whether its thread wants more; the stream stops
// after a tile that no thread wants more than. Every thread calls it (barriers). A thread
// loads one row (tid % nr) of every jpt-th column (jpt = TOPUP_THREADS / nr columns side by
// side), so its addresses need no division: E = min(tile / nr, jpt · TOPUP_PER).
template <class Col, class Consume>
FP_DEVICE void stream_columns(const float* __restrict__ mt, unsigned nr, unsigned n, float* buf, unsigned tile,
                              Col col, Consume consume) {
    const unsigned jpt = TOPUP_THREADS / nr, E = min(tile / nr, jpt * TOPUP_PER), nt = (n + E - 1) / E;
    const unsigned jj = threadIdx.x / nr, ii = threadIdx.x - jj * nr;
    const bool loader = jj < jpt;  // the threads past jpt·nr load nothing
    float xa[TOPUP_PER], xb[TOPUP_PER];
    auto load = [&](float(&x)[TOPUP_PER], unsigned k) {
        const unsigned j0 = k * E, m = min(E, n - j0);
#pragma unroll
        for (unsigned u = 0; u < TOPUP_PER; ++u) {
            const unsigned j = jj + u * jpt;
            if (loader && j < m) x[u] = mt[(size_t)col(j0 + j) * nr + ii];
        }
    };
    auto store = [&](const float(&x)[TOPUP_PER], unsigned k) {
        float* t = buf + (size_t)(k & 1) * tile + jj * nr + ii;
        const unsigned m = min(E, n - k * E);
#pragma unroll
        for (unsigned u = 0; u < TOPUP_PER; ++u)
            if (loader && jj + u * jpt < m) t[u * jpt * nr] = x[u];
    };
    // Tile k is in shared memory (cur held it), tile k + 1 in flight in nxt: cur takes tile
    // k + 2, k is consumed, k + 1 stored. The other shared tile was last read before the
    // previous barrier.
    auto step = [&](float(&cur)[TOPUP_PER], const float(&nxt)[TOPUP_PER], unsigned k) -> bool {
        if (k + 2 < nt) load(cur, k + 2);
        const bool more = consume(buf + (size_t)(k & 1) * tile, k * E, min(E, n - k * E));
        if (k + 1 < nt) store(nxt, k + 1);
        return __syncthreads_or(more) && k + 1 < nt;
    };
    if (nt == 0) return;
    load(xa, 0);
    if (nt > 1) load(xb, 1);
    store(xa, 0);
    __syncthreads();
    for (unsigned k = 0;; k += 2)
        if (!step(xa, xb, k) || !step(xb, xa, k + 1)) break;
}

// The exact top-up of the representative query blocks, from the prep's transposed masses and
// column scores. One thread per representative row (row ri0 + threadIdx.x of block r).
// Grid (H, nseq), TOPUP_THREADS threads; `tile` floats per staged tile (nr ≤ tile ≤
// TOPUP_PER·TOPUP_THREADS); smem max(8·N, 8·tile) + 4·N + 4·ceil(nkb/32), N = next_pow2(nkb):
// the two tiles alias the sort keys (never live at once), then the ranking and the mask row.
extern "C" __global__ void __launch_bounds__(TOPUP_THREADS, 1)
sel_qa_topup(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
             const int* __restrict__ pattern, const float* __restrict__ mass_t,
             const float* __restrict__ col_sum, unsigned tile, unsigned* __restrict__ mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ unsigned walk_max[TOPUP_THREADS / 32];
    const int h = blockIdx.x, s = blockIdx.y;
    if (p.original || pattern[s * p.num_heads + h] != PAT_QA) return;
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned nkb = sd.nkb, words = ss.words;
    const size_t base = (size_t)sd.rep_off * p.num_heads + (size_t)h * g.rep * nkb;
    unsigned* mk = mask + (size_t)ss.mask_off * p.num_heads + (size_t)h * sd.nqb * words;
    const int N = next_pow2(nkb);
    uint64_t* key = (uint64_t*)smem;
    float* buf = (float*)smem;  // the staged tiles: dead while the keys live, and back
    uint32_t* val = (uint32_t*)(smem + max((size_t)8 * N, (size_t)8 * tile));
    unsigned* bits = val + N;  // the block's mask row
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned r0 = g.rep_block(0), r1 = g.rep_block(g.rep - 1);
    for (unsigned r = r0; r <= r1; ++r) {
        unsigned* row = mk + (size_t)r * words;
        const unsigned d = g.last_diag(r);
        unsigned ri0, ri1;
        rep_rows(g, r, ri0, ri1);
        const unsigned nr = ri1 - ri0;
        const bool mine = threadIdx.x < nr;
        const float* mt = mass_t + base + (size_t)ri0 * nkb;
        for (unsigned w = threadIdx.x; w < words; w += blockDim.x) bits[w] = row[w];
        __syncthreads();
        // Each row's total and captured mass, each summed sequentially in key-block order.
        double t = 0.0, c2 = 0.0;
        stream_columns(mt, nr, nkb, buf, tile, [](unsigned j) { return j; },
                       [&](const float* tl, unsigned j0, unsigned m) {
                           if (mine)
                               for (unsigned j = 0; j < m; ++j) {
                                   const unsigned c = j0 + j;
                                   const double x = (double)tl[j * nr + threadIdx.x];
                                   t += x;
                                   if (c <= d && (bits[c / 32] >> (c % 32) & 1u)) c2 += x;
                               }
                           return true;
                       });
        const double cap = c2, tgt = (double)p.gamma * t;
        // (a barrier: every tile and mask word is read before either is rewritten)
        if (!__syncthreads_or(mine && !(cap >= tgt))) continue;
        // Rank the uncovered causal blocks by their summed representative mass.
        const float* cs = col_sum + base + (size_t)(r - r0) * nkb;
        for (int c = threadIdx.x; c < N; c += blockDim.x) {
            uint64_t k = KEY_ALL;
            if ((unsigned)c <= d) k = rank_key(bits[c / 32] >> (c % 32) & 1u ? -F32_INF : cs[c], c);
            key[c] = k;
            val[c] = c;
        }
        __syncthreads();
        bitonic_sort(key, val, N);  // ends with a barrier
        unsigned uncovered = d + 1;
        for (unsigned w = 0; w <= d / 32; ++w) {
            const unsigned nb = w < d / 32 ? 32u : d % 32 + 1;
            uncovered -= __popc(nb == 32 ? bits[w] : bits[w] & ((1u << nb) - 1u));
        }
        // Core walks the ranking adding one block at a time until every representative query
        // holds gamma (or an already selected block comes up). Each query's captured mass is
        // a sequential f64 sum in that order, so each thread replays its own query's sum and
        // finds after how many blocks it holds; the walk stops at the largest of those.
        double m = cap;
        bool hit = !mine || m >= tgt;
        unsigned e = 0;
        stream_columns(mt, nr, uncovered, buf, tile, [&](unsigned j) { return val[j]; },
                       [&](const float* tl, unsigned, unsigned cnt) {
                           for (unsigned j = 0; j < cnt && !hit; ++j) {
                               m += (double)tl[j * nr + threadIdx.x];
                               ++e;
                               hit = m >= tgt;
                           }
                           return !hit;
                       });
        for (int o = 16; o > 0; o >>= 1) e = max(e, __shfl_xor_sync(0xffffffffu, e, o));
        if (lane == 0) walk_max[warp] = e;
        __syncthreads();
        unsigned take = 0;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) take = max(take, walk_max[w]);
        for (unsigned k = threadIdx.x; k < take; k += blockDim.x) atomicOr(&row[val[k] / 32], 1u << (val[k] % 32));
        __syncthreads();  // walk_max, the ranking and the mask row are read before the next block
    }
}

// ---- compaction: mask → CSR -----------------------------------------------------------------

// Blocks per CSR row (popcount of its mask words). Grid (Σ nqb, H), 32 threads.
extern "C" __global__ void sel_count(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                     const unsigned* __restrict__ qb_seq, unsigned total_qb, SelParams p,
                                     const unsigned* __restrict__ mask, unsigned* __restrict__ counts) {
    const unsigned gb = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (gb >= total_qb) return;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const unsigned r = gb - sd.qb_off;
    const unsigned* row = mask + mask_row(ss, sd, p, h, r);
    unsigned n = 0;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned w = lane; w < ss.words; w += 32) n += __popc(row[w]);
    for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
    if (lane == 0) counts[csr_row(ss, sd, p, h, r)] = n;
}

// Exclusive scan of the row counts into row_offsets [rows + 1]. One CTA of 1024 threads;
// rounds of 8192 counts staged through shared memory with coalesced loads (all in flight at
// once), 8 consecutive counts per thread.
extern "C" __global__ void __launch_bounds__(1024)
sel_scan(const unsigned* __restrict__ counts, unsigned rows, unsigned* __restrict__ offsets) {
    constexpr unsigned IT = 8;
    __shared__ unsigned stage[1024 * IT];
    __shared__ unsigned warp_tot[32];
    __shared__ unsigned carry;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    if (threadIdx.x == 0) { carry = 0; offsets[0] = 0; }
    for (unsigned base = 0; base < rows; base += blockDim.x * IT) {
        unsigned ld[IT];
#pragma unroll
        for (unsigned u = 0; u < IT; ++u) {
            const unsigned i = base + u * blockDim.x + threadIdx.x;
            ld[u] = i < rows ? counts[i] : 0u;
        }
#pragma unroll
        for (unsigned u = 0; u < IT; ++u) stage[u * blockDim.x + threadIdx.x] = ld[u];
        __syncthreads();
        const unsigned i0 = base + threadIdx.x * IT;
        unsigned v[IT], mine = 0;
#pragma unroll
        for (unsigned u = 0; u < IT; ++u) { mine += stage[threadIdx.x * IT + u]; v[u] = mine; }
        unsigned x = mine;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_tot[warp] = x;
        __syncthreads();
        unsigned off = carry + x - mine;
        for (int w = 0; w < warp; ++w) off += warp_tot[w];
#pragma unroll
        for (unsigned u = 0; u < IT; ++u)
            if (i0 + u < rows) offsets[i0 + u + 1] = off + v[u];
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned t = 0;
            for (int w = 0; w < nw; ++w) t += warp_tot[w];
            carry += t;
        }
    }
}

// Writes each row's key blocks, ascending, at its offset. A warp per row (rows per CTA =
// warps per CTA) walks the words in order and scans the running position.
extern "C" __global__ void sel_write(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                     const unsigned* __restrict__ qb_seq, unsigned total_qb, SelParams p,
                                     const unsigned* __restrict__ mask, const unsigned* __restrict__ offsets,
                                     unsigned* __restrict__ cols) {
    const unsigned gb = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (gb >= total_qb) return;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const unsigned r = gb - sd.qb_off;
    const unsigned* row = mask + mask_row(ss, sd, p, h, r);
    unsigned pos = offsets[csr_row(ss, sd, p, h, r)];
    const unsigned lane = threadIdx.x % 32;
    // 32 words per round, one per lane; then word by word, each selected block's lane writes
    // it at pos + (set bits below it): consecutive blocks to consecutive addresses.
    for (unsigned base = 0; base < ss.words; base += 32) {
        const unsigned mine = base + lane < ss.words ? row[base + lane] : 0u;
        const unsigned cnt = min(32u, ss.words - base);
        for (unsigned j = 0; j < cnt; ++j) {
            const unsigned bits = __shfl_sync(0xffffffffu, mine, j);
            if (bits >> lane & 1u) cols[pos + __popc(bits & ((1u << lane) - 1u))] = (base + j) * 32 + lane;
            pos += __popc(bits);
        }
    }
}
