// Query-aware heads: the flattened gamma cut (radix select over the map) and the per-row cut.
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

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

// The map chunk of a multi-CTA flattened-cut kernel's CTA: entries [i0, i1) of head h of
// sequence s (grid (chunks, H, nseq)), with the head's cut state. flat_chunk returns false when
// the CTA has nothing to do: the head's cut is settled or the chunk lies past the head's map.
struct FlatChunk {
    int h, s, slot;
    FlatCut st;
    SeqDesc sd;
    unsigned total, i0, i1;
};
FP_DEVICE bool flat_chunk(FlatChunk& c, const SeqDesc* __restrict__ seqs, const SelParams& p,
                          const FlatCut* __restrict__ cut) {
    c.h = blockIdx.y;
    c.s = blockIdx.z;
    c.slot = c.s * p.num_heads + c.h;
    c.st = cut[c.slot];
    if (c.st.state != 0) return false;
    c.sd = seqs[c.s];
    c.total = c.sd.nqb * c.sd.nkb;
    c.i0 = blockIdx.x * FLAT_CHUNK;
    if (c.i0 >= c.total) return false;
    c.i1 = min(c.i0 + FLAT_CHUNK, c.total);
    return true;
}

// Digit `depth` of every refining head's cut: histogram of FLAT_CHUNK map entries per CTA
// (only keys under the prefix fixed so far). Grid (chunks, H, nseq), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
sel_flat_hist(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel, SelParams p,
              const float* __restrict__ map, const FlatCut* __restrict__ cut, int depth,
              unsigned* __restrict__ hist_cnt, unsigned long long* __restrict__ hist_sum) {
    __shared__ unsigned cnt[256], sum_lo[256], sum_hi[256];
    FlatChunk c;
    if (!flat_chunk(c, seqs, p, cut)) return;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) { cnt[b] = 0; sum_lo[b] = 0; sum_hi[b] = 0; }
    __syncthreads();
    const Geo g = geo(c.sd, p.block_size);
    const MapItems items{map + (size_t)sel[c.s].map_off * p.num_heads + (size_t)c.h * c.total, g, c.sd.nkb,
                         1.f / (float)c.sd.nkb};
    const int shift = 56 - 8 * depth;
    const double scale = ldexp(1.0, c.st.sc);
    // Run-length aggregation before the shared atomics (neighbouring entries share digits).
    int cur = -1;
    unsigned cur_n = 0;
    unsigned long long cur_s = 0;
    for (unsigned i = c.i0 + threadIdx.x; i < c.i1; i += blockDim.x) {
        uint64_t key; double m;
        if (!items(i, key, m)) continue;
        if (depth > 0 && (key >> (shift + 8)) != c.st.prefix) continue;
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
            atomicAdd(&hist_cnt[(size_t)c.slot * 256 + b], cnt[b]);
            atomicAdd(&hist_sum[(size_t)c.slot * 256 + b], join_u64(sum_lo[b], sum_hi[b]));
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
    FlatChunk c;
    if (!flat_chunk(c, seqs, p, cut)) return;
    const size_t hb = (size_t)sel[c.s].map_off * p.num_heads + (size_t)c.h * c.total;
    const MapItems items{map + hb, geo(c.sd, p.block_size), c.sd.nkb, 1.f / (float)c.sd.nkb};
    const int shift = 64 - 8 * FLAT_FULL_DIGITS;
    const unsigned lane = threadIdx.x % 32;
    // Every thread runs the same number of rounds (the bound is on the round's base), so the
    // ballots see whole warps.
    for (unsigned i = c.i0 + threadIdx.x; i - threadIdx.x < c.i1; i += blockDim.x) {
        uint64_t key; double m;
        const bool keep = i < c.i1 && items(i, key, m) && (key >> shift) == c.st.prefix;
        const unsigned ballot = __ballot_sync(0xffffffffu, keep);
        if (ballot == 0) continue;
        unsigned base = 0;
        if (lane == 0) base = atomicAdd(&list_len[c.slot], (unsigned)__popc(ballot));
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
    auto&& [key, val, scs, bits] = RowSmem(smem, N);
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
