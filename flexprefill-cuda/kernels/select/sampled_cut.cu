// The sampled mode's cut (core's sampled_block_cut / sampled_selection): every query block
// cut on its own estimated block distribution (stats/sampled.cu's sampled_block_mass).
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.
//
// One CTA per (query block of the batch, head). The row's n = last_diag + 1 scores are staged
// in shared memory with their rank keys (score descending, block ascending: core's
// rank_order; the forced blocks and the padding keyed past every other), bitonic-sorted, and
// one thread replays core's arithmetic in its order: the total as an f64 sum of max(s, 0) in
// block order, the forced blocks' mass added first (f64, block ascending), then the ranked
// blocks one at a time (cumulative_mass_cut, CutRule::Reach) until the running sum reaches
// target · total with at least min(mb, n) blocks in all, never past the max_budget cap. The
// same scores give the same blocks bit for bit. A dense-fallback sequence gets every causal
// block. The row is written as mask words for the CSR build (index.cu).

// The mass core counts for a score (block_mass): NaN and negatives hold none.
FP_DEVICE double sampled_mass(float s) { return s != s ? 0.0 : (double)fmaxf(s, 0.f); }

// Grid (Σ nqb, H), blockDim a multiple of 32; dynamic smem 16·N + 4·words bytes, N the next
// power of two ≥ the batch's largest nkb. `target` = min(gamma + SAMPLED_MARGIN, 1) in f64, as
// core computes it. sampled: [qk_off·H + (h·nqb + r)·nkb + c].
extern "C" __global__ void __launch_bounds__(128)
sel_sampled_cut(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                const unsigned* __restrict__ qb_seq, SelParams p, double target,
                const float* __restrict__ sampled, unsigned* __restrict__ mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    const SelSeq ss = sel[s];
    const Geo g = geo(sd, p.block_size);
    const unsigned r = gb - sd.qb_off, n = g.last_diag(r) + 1;
    unsigned* row = mask + mask_row(ss, sd, p, h, r);
    if (ss.dense) {
        for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) {
            const unsigned c0 = w * 32;
            row[w] = c0 >= n ? 0u : (n - c0 >= 32 ? 0xffffffffu : (1u << (n - c0)) - 1u);
        }
        return;
    }
    const float* sc = sampled + (size_t)sd.qk_off * p.num_heads + ((size_t)h * sd.nqb + r) * sd.nkb;
    const int N = next_pow2(n);
    auto&& [key, val, scs, bits] = RowSmem(smem, N);
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const bool in = (unsigned)i < n;
        const float x = in ? sc[i] : 0.f;
        scs[i] = x;
        key[i] = in && !is_forced(g, p, r, i) ? rank_key(x, i) : KEY_ALL;
        val[i] = i;
    }
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) bits[w] = 0u;
    __syncthreads();
    bitonic_sort(key, val, N);
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (unsigned c = 0; c < n; ++c) total += sampled_mass(scs[c]);
        double held = 0.0;
        unsigned count = 0;
        for (unsigned c = 0; c < n; ++c) {
            if (!is_forced(g, p, r, c)) continue;
            held += sampled_mass(scs[c]);
            ++count;
            bits[c / 32] |= 1u << (c % 32);
        }
        const unsigned cap = max(p.cap > 0 ? (unsigned)p.cap : n, count);
        const unsigned mb = min((unsigned)p.mb, n);
        const unsigned min_blocks = mb > count ? mb - count : 0u;
        const unsigned max_blocks = cap - count;
        const double t = target * total;
        double acc = held;
        unsigned k = 0;
        for (unsigned e = 0; e < n - count; ++e) {
            if (k >= max_blocks) break;
            const double m = sampled_mass(scs[val[e]]);
            if (k >= min_blocks && acc >= t) break;
            acc += m;
            ++k;
        }
        for (unsigned e = 0; e < k; ++e) bits[val[e] / 32] |= 1u << (val[e] % 32);
    }
    __syncthreads();
    for (unsigned w = threadIdx.x; w < ss.words; w += blockDim.x) row[w] = bits[w];
}
