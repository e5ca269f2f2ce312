// Faithful query-aware heads: calibration on the probe rows, the build and the exact top-up.
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

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
    const float* pm = probe_block_mass + (size_t)sd.probe_off * p.num_heads + (size_t)h * P * nkb;
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
