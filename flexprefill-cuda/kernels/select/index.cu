// Index build: block mask to CSR (counts, scan, write).
// Part of the `select` module: compiled after kernels/seq_desc.cuh and select/common.cuh
// (src/select.rs concatenates the family), one NVRTC program for every selection kernel.

// ---- compaction: mask → CSR -----------------------------------------------------------------

// Blocks per CSR row (popcount of its mask words). Grid (Σ nqb, H), 32 threads.
extern "C" __global__ void sel_count(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                     const unsigned* __restrict__ qb_seq, unsigned total_qb, SelParams p,
                                     const unsigned* __restrict__ mask, unsigned* __restrict__ counts) {
    const WarpRow wr = warp_row(seqs, sel, qb_seq, total_qb);
    if (!wr.ok) return;
    const SelSeq& ss = wr.ss;
    const unsigned* row = mask + wr.mask_at(p);
    unsigned n = 0;
    const unsigned lane = threadIdx.x % 32;
    for (unsigned w = lane; w < ss.words; w += 32) n += __popc(row[w]);
    for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
    if (lane == 0) counts[wr.csr_at(p)] = n;
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
        const unsigned off = block_scan_offset(mine, warp_tot, carry);
#pragma unroll
        for (unsigned u = 0; u < IT; ++u)
            if (i0 + u < rows) offsets[i0 + u + 1] = off + v[u];
        block_scan_carry(warp_tot, carry);
    }
}

// Writes each row's key blocks, ascending, at its offset. A warp per row (rows per CTA =
// warps per CTA) walks the words in order and scans the running position.
extern "C" __global__ void sel_write(const SeqDesc* __restrict__ seqs, const SelSeq* __restrict__ sel,
                                     const unsigned* __restrict__ qb_seq, unsigned total_qb, SelParams p,
                                     const unsigned* __restrict__ mask, const unsigned* __restrict__ offsets,
                                     unsigned* __restrict__ cols) {
    const WarpRow wr = warp_row(seqs, sel, qb_seq, total_qb);
    if (!wr.ok) return;
    const SelSeq& ss = wr.ss;
    const unsigned* row = mask + wr.mask_at(p);
    unsigned pos = offsets[wr.csr_at(p)];
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
