// Block-sparse causal flash-attention forward for Hopper (sm_90a), warp-specialized: the same
// semantics, grid and parameters as attention.cu (read its header), compiled after
// attention_wgmma.cuh (layouts, wrappers, softmax, epilogue).
//
// Roles. A CTA of (1 + WG) warpgroups owns ATT_BQ = 64·WG query rows:
//   warpgroup 0, the producer: one thread issues every load, by TMA (cp.async.bulk.tensor with
//     the tensor maps the host built, 128B swizzle, so tiles land in the atom layout wgmma
//     reads): the Q tile once, then K and V tiles of the query tile's key walk (the CSR row, or
//     every causal block) into a STAGES-deep ring; the other three warps exit. It gives its
//     registers away (setmaxnreg.dec).
//   warpgroups 1..WG, the consumers: 64 query rows each, S = Q·Kᵀ and O += P·V on wgmma, the
//     online softmax in registers (setmaxnreg.inc).
// Barriers (mbarriers in shared memory, phase = use count & 1):
//   q_full          : TMA bytes of Q landed (expect_tx by the producer).
//   k_full[s], v_full[s]  : TMA bytes of the K / V tile in stage s landed.
//   k_empty[s], v_empty[s]: every consumer warp is done reading stage s (one arrival per warp
//                     after its wgmma wait); the producer waits on it before reusing the stage.
// Within a consumer warpgroup, S_{j+1} = Q·K_{j+1} and O += P_j·V_j are issued back to back
// and the softmax of S_{j+1} runs while P_j·V_j is still on the tensor cores (O is rescaled
// by the softmax's factor only before the next P·V, when it is no longer in flight). Between
// the two consumer warpgroups (ATT_PINGPONG) two named barriers hand the tensor cores back and
// forth: a warpgroup issues its GEMMs only after the other has issued its own, so one
// warpgroup's softmax overlaps the other's GEMMs.
#include "flexprefill_common.cuh"

#ifndef ATT_STAGES
#define ATT_STAGES 2
#endif
#ifndef ATT_PINGPONG
#define ATT_PINGPONG 1
#endif

namespace {

constexpr int WG = BQ / 64;  // consumer warpgroups
constexpr int NT = (WG + 1) * 128;
constexpr int STAGES = ATT_STAGES;
constexpr bool PINGPONG = ATT_PINGPONG != 0 && WG == 2;
constexpr uint32_t Q_BYTES = BQ * D * 2;
constexpr uint32_t KV_BYTES = BK * D * 2;
// Registers after the hand-over (two consumer warpgroups): the producer keeps 24, the
// consumers take the rest (the CTA's allocation at launch is the __launch_bounds__ cap,
// 65536 / 384 rounded down to 8 = 168 per thread: 24 + 2 · 240 = 3 · 168). With one consumer
// warpgroup the cap (255) already covers the consumer.
constexpr int PRODUCER_REGS = 24;
constexpr int CONSUMER_REGS = 240;

static_assert(STAGES >= 2 && STAGES <= 4, "ring depth");

// A tensor map made by cuTensorMapEncodeTiled on the host, passed by value (__grid_constant__).
struct __align__(64) TmaMap {
    uint64_t opaque[16];
};

FP_DEVICE void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
FP_DEVICE void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
FP_DEVICE void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
FP_DEVICE void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
// One [rows][64] box of a 3-d map (d, head, token) into shared memory, completing on `bar`.
FP_DEVICE void tma_load(uint32_t dst, const TmaMap& map, uint32_t bar, int d0, int h, int t) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(&map)), "r"(bar), "r"(d0), "r"(h), "r"(t)
        : "memory");
}
FP_DEVICE void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
FP_DEVICE void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace

extern "C" __global__ void __launch_bounds__(NT, 1)
    attn_fwd(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,
             const __grid_constant__ TmaMap tv, const AttnParams p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // Atoms must sit on 1024-byte boundaries (the swizzle reads address bits 7..9).
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK = sQ + Q_BYTES;
    const uint32_t sV = sK + STAGES * KV_BYTES;
    const uint32_t bars = sV + STAGES * KV_BYTES;  // 8 bytes each
    const uint32_t q_full = bars;
    auto k_full = [&](int st) { return bars + 8 * (1 + st); };
    auto v_full = [&](int st) { return bars + 8 * (1 + STAGES + st); };
    auto k_empty = [&](int st) { return bars + 8 * (1 + 2 * STAGES + st); };
    auto v_empty = [&](int st) { return bars + 8 * (1 + 3 * STAGES + st); };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup (0: producer), warp inside it
    const QueryTile qt = query_tile(p);
    if (qt.empty()) return;
    const int head = qt.head, seq = qt.seq, q_lo = qt.q_lo, rows_here = qt.rows_here;
    const int pos_first = qt.pos_first, pos_last = qt.pos_last, kv_len = qt.kv_len;
    const SeqInfo s = qt.s;
    const KeyWalk walk = key_walk(p, seq, head, q_lo, pos_last);
    const int n_iter = walk.n_iter;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(k_full(st), 1);
            mbar_init(v_full(st), 1);
            mbar_init(k_empty(st), WG * 4);
            mbar_init(v_empty(st), WG * 4);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        if constexpr (WG == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        if (warp != 0 || lane != 0 || n_iter == 0) return;
        const int kvh = head / (int)p.group;
        const int q_tok = (int)(s.q_start + q_lo), k_tok = (int)s.k_start;
        mbar_expect_tx(q_full, Q_BYTES);
#pragma unroll
        for (int a = 0; a < D / 64; ++a) tma_load(sQ + a * BQ * 128, tq, q_full, a * 64, head, q_tok);
        // The next tile's first key is read one iteration ahead (a CSR load off the issue path).
        int k0 = walk.k0(0);
        for (int it = 0; it < n_iter; ++it) {
            const int st = it % STAGES;
            const uint32_t ph = ((it / STAGES) & 1) ^ 1;  // a fresh barrier passes parity 1
            const int k0_next = it + 1 < n_iter ? walk.k0(it + 1) : 0;
            mbar_wait(k_empty(st), ph);
            mbar_expect_tx(k_full(st), KV_BYTES);
#pragma unroll
            for (int a = 0; a < D / 64; ++a)
                tma_load(sK + st * KV_BYTES + a * BK * 128, tk, k_full(st), a * 64, kvh, k_tok + k0);
            mbar_wait(v_empty(st), ph);
            mbar_expect_tx(v_full(st), KV_BYTES);
#pragma unroll
            for (int a = 0; a < D / 64; ++a)
                tma_load(sV + st * KV_BYTES + a * BK * 128, tv, v_full(st), a * 64, kvh, k_tok + k0);
            k0 = k0_next;
        }
        return;
    }

    // ---- consumers ----
    if constexpr (WG == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
    const int cw = wg - 1;               // consumer warpgroup
    const int wrow = cw * 64 + wq * 16;  // first tile row of this warp
    const float sl2 = p.scale_log2;
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};

    // Ping-pong: barrier 1 + w is "warpgroup w may issue"; each issue point syncs on its own
    // and arrives on the other's. Warpgroup 1 opens with one arrival so warpgroup 0 goes
    // first, and skips its last arrival (there are n_iter + 1 issue points), so every barrier
    // generation is complete when the CTA exits.
    const int issue_points = n_iter + 1;
    int issued = 0;
    auto turn_begin = [&]() {
        if (PINGPONG) named_sync(1 + cw, 256);
    };
    auto turn_end = [&]() {
        ++issued;
        if (PINGPONG && !(cw == 1 && issued == issue_points)) named_arrive(2 - cw, 256);
    };
    auto release = [&](uint32_t bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    auto qk_at = [&](float (&sacc)[BK / 2], int it) {
        issue_qk(sacc, sQ + cw * 64 * 128, sK + (it % STAGES) * KV_BYTES);
    };
    auto pv_at = [&](const uint32_t (&pa)[BK / 16][4], int it) {
        issue_pv(o, pa, sV + (it % STAGES) * KV_BYTES);
    };
    auto phase = [](int it) { return (uint32_t)((it / STAGES) & 1); };

    if (n_iter > 0) {
        if (PINGPONG && cw == 1) named_arrive(1, 256);
        mbar_wait(q_full, 0);
        float sacc[BK / 2];
        uint32_t pa[BK / 16][4];
        mbar_wait(k_full(0), 0);
        turn_begin();
        qk_at(sacc, 0);
        turn_end();
        wgmma_wait<0>();
        fence_regs(sacc);
        release(k_empty(0));
        // First key of tile it + 1 (for its mask), read one iteration ahead like the producer.
        int k0_next = n_iter > 1 ? walk.k0(1) : 0;
        online_softmax(sacc, walk.k0(0), pos_first, kv_len, wrow, lane, sl2, m, l, alpha);
        pack_p(sacc, pa);
        for (int it = 1; it < n_iter; ++it) {
            const int st = it % STAGES, pst = (it - 1) % STAGES;
            const int k0 = k0_next;
            k0_next = it + 1 < n_iter ? walk.k0(it + 1) : 0;
            mbar_wait(k_full(st), phase(it));
            turn_begin();
            qk_at(sacc, it);
            rescale_o(o, alpha);
            mbar_wait(v_full(pst), phase(it - 1));
            pv_at(pa, it - 1);
            turn_end();
            wgmma_wait<1>();  // S_it landed; P_{it-1}·V_{it-1} may still run
            fence_regs(sacc);
            release(k_empty(st));
            online_softmax(sacc, k0, pos_first, kv_len, wrow, lane, sl2, m, l, alpha);
            wgmma_wait<0>();
            fence_regs(o);
            release(v_empty(pst));
            pack_p(sacc, pa);
        }
        const int lst = (n_iter - 1) % STAGES;
        rescale_o(o, alpha);
        mbar_wait(v_full(lst), phase(n_iter - 1));
        turn_begin();
        pv_at(pa, n_iter - 1);
        turn_end();
        wgmma_wait<0>();
        fence_regs(o);
        release(v_empty(lst));
    }
    // Each warp stages only its own rows of sQ: its warpgroup's Q rows, read by nothing else.
    store_rows(o, m, l, sQ, wrow, lane, rows_here, p, s, q_lo, head);
}
