// attention_params.cuh: the parameter block every attention kernel family takes (attention.cu,
// attention_sm90.cu, attention_ws.cu), and the constants of their softmax. src/attention.rs
// compiles it in front of each family.
#include "flexprefill_common.cuh"

namespace {

#define NEG_INF (-__int_as_float(0x7f800000))
constexpr float LN2 = 0.6931471805599453f;

struct SeqInfo {
    uint32_t q_start, k_start, q_len, kv_len;
};

// Must match `AttnParams` in src/attention.rs field for field.
struct AttnParams {
    const uint16_t* q;
    const uint16_t* k;
    const uint16_t* v;
    uint16_t* out;
    float* lse;                      // null: not asked for
    const uint32_t* head_row_start;  // null: dense (every causal key block)
    const uint32_t* row_offsets;
    const uint32_t* col_indices;
    // null: every row of the index is walked as listed. Else [num_seqs · num_heads] bytes
    // (kernels/dense_walk.cu): a nonzero (sequence, head) walks every causal block instead,
    // where its selection is too dense for the sparse walk to be cheaper.
    const uint8_t* dense_walk;
    const SeqInfo* seqs;
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t group;      // q heads per kv head
    uint32_t num_tiles;  // gridDim.z: query tiles of the longest sequence
    float scale_log2;    // softmax_scale * log2(e)
};

// A query tile's rows in global memory: its first query row (head `head`) and the first key /
// value row of the sequence (KV head `kvh`), with the row strides of q and of k / v (elements;
// `d` is the head dimension).
struct TileRows {
    size_t q_stride, kv_stride;
    const uint16_t *qg, *kg, *vg;
};
FP_DEVICE void tile_rows(TileRows& t, const AttnParams& p, const SeqInfo& s, int q_lo, int head, int kvh, int d) {
    t.q_stride = (size_t)p.num_heads * d;
    t.kv_stride = (size_t)p.num_kv_heads * d;
    t.qg = p.q + (size_t)(s.q_start + q_lo) * t.q_stride + (size_t)head * d;
    t.kg = p.k + (size_t)s.k_start * t.kv_stride + (size_t)kvh * d;
    t.vg = p.v + (size_t)s.k_start * t.kv_stride + (size_t)kvh * d;
}

}  // namespace

