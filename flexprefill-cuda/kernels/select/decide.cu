// Pattern decision (FlexPrefill Algorithm 1): pooled lines and the per-head choice.
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

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
