// One sequence of the packed batch, as the statistics and selection kernels see it. The host
// twin is stats.rs `SeqDesc` (#[repr(C)], its size asserted to the same 64 bytes); both kernel
// families are compiled with this file in front of their sources.
#ifndef FLEXPREFILL_SEQ_DESC_CUH
#define FLEXPREFILL_SEQ_DESC_CUH
struct SeqDesc {
    unsigned q_start, k_start, q_len, kv_len;
    unsigned rep;        // R = min(block_size, q_len)
    unsigned nkb, nqb;   // key / query blocks
    unsigned tok_off;    // Σ kv_len of earlier sequences (per-token outputs: × H)
    unsigned kb_off;     // Σ nkb of earlier sequences
    unsigned qb_off;     // Σ nqb of earlier sequences
    unsigned rep_off;    // Σ rep · nkb of earlier sequences (× H)
    unsigned split_off;  // Σ key splits of earlier sequences
    unsigned nsplit;     // key splits of this sequence
    unsigned probe_off;  // Σ probes · nkb of earlier sequences (× H)
    unsigned qk_off;     // Σ nqb · nkb of earlier sequences (× H): the sampled block masses
    unsigned pad2;
};
static_assert(sizeof(SeqDesc) == 64, "SeqDesc: 16 u32, as stats.rs SeqDesc");
#endif
