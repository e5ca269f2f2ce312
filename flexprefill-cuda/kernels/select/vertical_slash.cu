// Vertical-slash selection (faithful and original) and the extension of every head into the block mask.
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

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
    const float* pm = probe_block_mass + (size_t)sd.probe_off * p.num_heads + (size_t)h * P * nkb;
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
    const float* pm = probe_block_mass + (size_t)sd.probe_off * p.num_heads + (size_t)h * P * nkb;
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
    // LINE_ITEMS consecutive distances per thread, then a block scan of the thread counts.
    constexpr unsigned LINE_ITEMS = 16;
    for (unsigned base = 0; base < n; base += blockDim.x * LINE_ITEMS) {
        const unsigned d0 = base + threadIdx.x * LINE_ITEMS;
        unsigned bits = 0;
#pragma unroll
        for (unsigned u = 0; u < LINE_ITEMS; ++u)
            if (d0 + u < n && skey_of(sl[d0 + u], d0 + u) <= K) bits |= 1u << u;
        const unsigned off = block_scan_offset(__popc(bits), warp_tot, carry);
#pragma unroll
        for (unsigned u = 0; u < LINE_ITEMS; ++u)
            if (d0 + u < n) pre[d0 + u + 1] = off + __popc(bits & ((2u << u) - 1u));
        block_scan_carry(warp_tot, carry);
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
    const WarpRow wr = warp_row(seqs, sel, qb_seq, total_qb);
    if (!wr.ok) return;
    const int h = wr.h;
    const unsigned s = wr.s, r = wr.r;
    const SeqDesc& sd = wr.sd;
    const SelSeq& ss = wr.ss;
    const Geo g = geo(sd, p.block_size);
    const int pat = pattern[s * p.num_heads + h];
    const unsigned d = g.last_diag(r);
    const unsigned first = g.first_pos(r), last = g.last_pos(r), bs = g.bs;
    const size_t bo = (size_t)sd.kb_off * p.num_heads + (size_t)h * sd.nkb;
    const unsigned* pre = dist_prefix + (size_t)ss.dist_off * p.num_heads + (size_t)h * (sd.kv_len + 1);
    unsigned* row = mask + wr.mask_at(p);
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
