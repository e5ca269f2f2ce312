// Pooled keys and queries and the block estimate (the pattern decision's input).
// Part of the `stats` module: compiled after kernels/seq_desc.cuh and stats/common.cuh
// (src/stats.rs concatenates the family), one NVRTC program for every statistics kernel.

// Adds 4 consecutive elements (one 8-byte load) to acc, column by column.
FP_DEVICE void add4(float acc[4], uint2 u) {
    elem_t e[4];
    memcpy(e, &u, sizeof(u));
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] += to_f32(e[j]);
}
// Column sums of `rows` rows of 4 consecutive columns (p: the first row's first column, row
// stride `stride` elements), each column summed in row order in f32. The pooling kernels
// are bandwidth-bound: 8-byte loads, 16 rows in flight per thread, instead of a 2-byte load
// per thread and row.
FP_DEVICE void sum_rows4(const elem_t* __restrict__ p, size_t stride, unsigned rows, float acc[4]) {
    unsigned i = 0;
    for (; i + 16 <= rows; i += 16) {
        uint2 u[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) u[j] = __ldg(reinterpret_cast<const uint2*>(p + (size_t)(i + j) * stride));
#pragma unroll
        for (int j = 0; j < 16; ++j) add4(acc, u[j]);
    }
    for (; i < rows; ++i) add4(acc, __ldg(reinterpret_cast<const uint2*>(p + (size_t)i * stride)));
}

// Mean of K over each key block, per kv head: k_pooled[((kb_off · Hkv) + hk · nkb + c) · D + d].
// Rows summed in order in f32, divided by the real row count. Grid (Σ nkb, num_kv_heads),
// D/4 threads (4 columns each).
extern "C" __global__ void stats_pool_k(const elem_t* __restrict__ k, const SeqDesc* __restrict__ seqs,
                                        const unsigned* __restrict__ kb_seq, int num_kv_heads, int block_size,
                                        int emulate, float* __restrict__ k_pooled) {
    const unsigned gb = blockIdx.x;
    const int hk = blockIdx.y;
    const SeqDesc sd = seqs[kb_seq[gb]];
    const unsigned c = gb - sd.kb_off;
    const unsigned first = c * block_size;
    const unsigned last = min(first + block_size, sd.kv_len);
    for (int d = 4 * threadIdx.x; d < HEAD_DIM; d += 4 * blockDim.x) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        sum_rows4(k + ((size_t)(sd.k_start + first) * num_kv_heads + hk) * HEAD_DIM + d,
                  (size_t)num_kv_heads * HEAD_DIM, last - first, acc);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float m = acc[j] / (float)(last - first);
            k_pooled[(((size_t)sd.kb_off * num_kv_heads) + (size_t)hk * sd.nkb + c) * HEAD_DIM + d + j] =
                emulate ? round_bf16(m) : m;
        }
    }
}

// Mean of q over each query block (blocks start at the chunk's first query), times `scale`:
// q_pooled[((qb_off · H) + h · nqb + r) · D + d]. Heads whose flag is 0 (not query-aware) are
// skipped when `qa_flag` is given. Grid (Σ nqb, num_heads), D/4 threads (4 columns each).
extern "C" __global__ void stats_pool_q(const elem_t* __restrict__ q, const SeqDesc* __restrict__ seqs,
                                        const unsigned* __restrict__ qb_seq, int num_heads, int block_size,
                                        float scale, int emulate, const int* __restrict__ qa_flag,
                                        float* __restrict__ q_pooled) {
    const unsigned gb = blockIdx.x;
    const int h = blockIdx.y;
    const unsigned s = qb_seq[gb];
    const SeqDesc sd = seqs[s];
    if (qa_flag != nullptr && qa_flag[s * num_heads + h] == 0) return;
    const unsigned r = gb - sd.qb_off;
    const unsigned first = r * block_size;
    const unsigned last = min(first + block_size, sd.q_len);
    const unsigned count = last - first;
    for (int d = 4 * threadIdx.x; d < HEAD_DIM; d += 4 * blockDim.x) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        sum_rows4(q + ((size_t)(sd.q_start + first) * num_heads + h) * HEAD_DIM + d,
                  (size_t)num_heads * HEAD_DIM, count, acc);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float m;
            if (emulate) {
                // The original: bf16 mean over the zero-padded block, a partial block rescaled by
                // bs/count in bf16, then times 1/√D (`scale`) in bf16.
                m = round_bf16(acc[j] * (1.f / (float)block_size));
                if (count < (unsigned)block_size) m = round_bf16(m * (float)block_size * (1.f / (float)count));
                m = round_bf16(m * scale);
            } else {
                m = acc[j] / (float)count * scale;
            }
            q_pooled[(((size_t)sd.qb_off * num_heads) + (size_t)h * sd.nqb + r) * HEAD_DIM + d + j] = m;
        }
    }
}

// Block reductions in a fixed tree order (deterministic). `red` holds NTHREADS/32 floats.
FP_DEVICE float block_max(float v, float* red) {
    v = warp_max(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
    return m;
}
FP_DEVICE float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += red[w];
    return s;
}

// Pooled keys per CTA of stats_estimate_logits (≤ 33 KiB of static shared memory).
#define EST_TILE (HEAD_DIM <= 128 ? 64 : 32)
// The logits q̄·K̄ᵀ of EST_TILE key blocks per CTA (the softmax follows in stats_estimate).
// Each CTA forms q̄ itself (16 rows' loads in flight per thread; the sum stays sequential) and
// stages its pooled keys with coalesced loads, row stride D + 1 so that the per-block dot
// products (sequential over d) hit distinct banks. Grid (ceil(max nkb / EST_TILE), H, nseq),
// 256 threads.
extern "C" __global__ void __launch_bounds__(256)
stats_estimate_logits(const elem_t* __restrict__ q, const SeqDesc* __restrict__ seqs,
                      const float* __restrict__ k_pooled, int num_heads, int num_kv_heads, float scale, int emulate,
                      float* __restrict__ estimate) {
    __shared__ float qbar[HEAD_DIM];
    __shared__ float ks[EST_TILE * (HEAD_DIM + 1)];
    const int h = blockIdx.y;
    const SeqDesc sd = seqs[blockIdx.z];
    const unsigned c0 = blockIdx.x * EST_TILE;
    if (c0 >= sd.nkb) return;
    const int hk = h / (num_heads / num_kv_heads);
    const unsigned first = sd.q_start + sd.q_len - sd.rep;
    const float inv_rep = 1.f / (float)sd.rep;
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        const elem_t* col = q + ((size_t)first * num_heads + h) * HEAD_DIM + d;
        const size_t stride = (size_t)num_heads * HEAD_DIM;
        float acc = 0.f;
        unsigned i = 0;
        for (; i + 16 <= sd.rep; i += 16) {
            elem_t x[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) x[j] = col[(size_t)(i + j) * stride];
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const float v = to_f32(x[j]) * scale;
                acc += emulate ? round_bf16(v) : v;
            }
        }
        for (; i < sd.rep; ++i) {
            const float v = to_f32(col[(size_t)i * stride]) * scale;
            acc += emulate ? round_bf16(v) : v;
        }
        acc *= inv_rep;
        qbar[d] = emulate ? round_bf16(acc) : acc;
    }
    const float* kb = k_pooled + ((size_t)sd.kb_off * num_kv_heads + (size_t)hk * sd.nkb) * HEAD_DIM;
    for (unsigned i = threadIdx.x; i < EST_TILE * HEAD_DIM; i += blockDim.x) {
        const unsigned c = c0 + i / HEAD_DIM;
        ks[(i / HEAD_DIM) * (HEAD_DIM + 1) + i % HEAD_DIM] = c < sd.nkb ? kb[(size_t)c0 * HEAD_DIM + i] : 0.f;
    }
    __syncthreads();
    const unsigned c = c0 + threadIdx.x;
    if (threadIdx.x < EST_TILE && c < sd.nkb) {
        const float* kr = ks + threadIdx.x * (HEAD_DIM + 1);
        float dot = 0.f;
        for (int d = 0; d < HEAD_DIM; ++d) dot += qbar[d] * kr[d];
        if (emulate) dot = round_bf16(dot);
        estimate[(size_t)sd.kb_off * num_heads + (size_t)h * sd.nkb + c] = dot;
    }
}

// The pooled estimate ā = softmax(q̄ · K̄ᵀ) over key blocks, no causal mask, with
// q̄ = mean of the representative rows of Q̂·e (logits from stats_estimate_logits). Emulate:
// the original's bf16 rounding of Q̂s, q̄ and the logits. Grid (num_heads, num_seqs), 256
// threads. estimate[(kb_off · H) + h · nkb + c].
extern "C" __global__ void __launch_bounds__(256)
stats_estimate(const SeqDesc* __restrict__ seqs, int num_heads, float* __restrict__ estimate) {
    __shared__ float red[32];
    const int h = blockIdx.x;
    const SeqDesc sd = seqs[blockIdx.y];
    float* out = estimate + (size_t)sd.kb_off * num_heads + (size_t)h * sd.nkb;
    float m = -F32_INF;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) m = fmaxf(m, out[c]);
    m = block_max(m, red);
    float s = 0.f;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) {
        float e = expf(out[c] - m);
        out[c] = e;
        s += e;
    }
    s = block_sum(s, red);
    const float inv = 1.f / s;
    for (unsigned c = threadIdx.x; c < sd.nkb; c += blockDim.x) out[c] = out[c] * inv;
}
