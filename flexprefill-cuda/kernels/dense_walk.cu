// dense_walk.cu: after the index build, decides per (sequence, head) whether the attention
// kernels walk the head's CSR rows or every causal block, with no host synchronisation.
//
// A sparse walk costs more per computed block than the dense one (scattered K/V tiles, the
// CSR reads on the producer's path), so once a head's selected share of its causal blocks
// reaches max_density, walking every causal block is faster. A dense walk computes a superset
// of the selected blocks, so the head's output is at least as exact. src/attention.rs
// (`choose_dense_walk`) sets max_density and says where its value comes from.
//
// Grid (num_heads, num_seqs), one warp each: the lanes count the sequence's causal blocks
// (core's `Sequence::total_causal_blocks`), the head's selected blocks are its CSR rows'
// span. `seqs` is DeviceSeqs' array: [q_start, k_start, q_len, kv_len] per sequence.
#include "flexprefill_common.cuh"

extern "C" __global__ void dense_walk_choose(const uint32_t* head_row_start, const uint32_t* row_offsets,
                                             const uint32_t* seqs, uint32_t num_heads, uint32_t block_size,
                                             double max_density, uint8_t* flags) {
    const uint32_t head = blockIdx.x, seq = blockIdx.y, lane = threadIdx.x;
    const uint32_t q_len = seqs[4 * seq + 2], kv_len = seqs[4 * seq + 3];
    const uint32_t off = kv_len - q_len;  // position of the chunk's first query
    const uint32_t nqb = (q_len + block_size - 1) / block_size;
    // Counts stay exact in f64 (below 2^53).
    double causal = 0.0;
    for (uint32_t r = lane; r < nqb; r += 32) {
        const uint32_t last = min(off + (r + 1) * block_size, kv_len) - 1;
        causal += (double)(last / block_size + 1);
    }
    for (int o = 16; o > 0; o >>= 1) causal += __shfl_xor_sync(0xffffffffu, causal, o);
    if (lane == 0) {
        const uint32_t sh = seq * num_heads + head;
        const uint32_t selected = row_offsets[head_row_start[sh + 1]] - row_offsets[head_row_start[sh]];
        flags[sh] = causal > 0.0 && (double)selected >= max_density * causal;
    }
}
