"""flexprefill against a float64 NumPy dense reference: layouts, GQA, chunks, LSE, dtypes.

Sequences shorter than ``min_budget`` run dense (the report says so), which makes the output
the exact causal attention: that is what these tests compare. The sparse path is exercised
where its result has an independent check (batched == varlen == torch, report arithmetic).
Tolerances: float32 computes in f32 against an f64 reference over at most a few hundred keys,
so a relative L2 error of 1e-5 leaves ~10x margin; float16/bfloat16 outputs are rounded once
(2^-11 and 2^-8 relative), so 1e-3 and 8e-3.
"""

import json
import threading

import numpy as np
import pytest

import flexprefill
from reference import dense_attention, full_attention, qkv, rel_err

SPARSE = dict(block_size=16, min_budget=16, gamma=0.9)


def test_batched_dense_regime_matches_reference(rng):
    q, k, v = qkv(rng, 2, 97, 97, 4, 4, 32)
    out, lse, rep = flexprefill.flex_prefill_attention(q, k, v, return_lse=True,
                                                      return_report=True)
    want, want_lse = dense_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == np.float32
    assert rel_err(out, want) < 1e-5
    assert lse.shape == (2, 4, 97)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-5)
    assert rep.dense_fallback is not None and "min_budget" in rep.dense_fallback
    assert {h.pattern for h in rep.heads} == {"dense"}


def test_gqa_and_softmax_scale(rng):
    q, k, v = qkv(rng, 1, 70, 70, 8, 2, 24)
    out = flexprefill.flex_prefill_attention(q, k, v, softmax_scale=0.3)
    assert rel_err(out, dense_attention(q, k, v, scale=0.3)[0]) < 1e-5
    # The scale matters: the default one gives another answer.
    assert rel_err(out, dense_attention(q, k, v)[0]) > 1e-2


def test_chunk_is_bottom_right_causal_and_equals_the_tail_of_the_whole(rng):
    q, k, v = qkv(rng, 1, 130, 130, 4, 2, 16)
    whole = flexprefill.flex_prefill_attention(q, k, v)
    chunk, lse = flexprefill.flex_prefill_attention(q[:, 90:], k, v, return_lse=True)
    want, want_lse = dense_attention(q[:, 90:], k, v)
    assert rel_err(chunk, want) < 1e-5
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    np.testing.assert_allclose(chunk, whole[:, 90:], rtol=0, atol=1e-5)


def test_lse_merge_of_prefix_and_chunk_equals_unchunked(rng):
    # A chunk of m queries after a cached prefix of p keys: the prefix part (every key visible)
    # comes from m varlen sequences of one query each, the chunk part from a causal call over
    # the chunk's own keys; merged by their LSEs they must give the unchunked rows.
    p, m, h, hk, d = 48, 6, 4, 2, 16
    q, k, v = qkv(rng, 1, p + m, p + m, h, hk, d)
    qc = q[0, p:]                                            # [m, h, d]
    kp = np.ascontiguousarray(np.broadcast_to(k[0, :p], (m, p, hk, d)).reshape(m * p, hk, d))
    vp = np.ascontiguousarray(np.broadcast_to(v[0, :p], (m, p, hk, d)).reshape(m * p, hk, d))
    cu_q = np.arange(m + 1, dtype=np.int32)
    cu_k = (np.arange(m + 1) * p).astype(np.int64)
    out_a, lse_a = flexprefill.flex_prefill_varlen(qc, kp, vp, cu_q, cu_k, 1, p,
                                                   return_lse=True)
    out_b, lse_b = flexprefill.flex_prefill_attention(q[:, p:], k[:, p:], v[:, p:],
                                                      return_lse=True)
    # flash-attn layouts: varlen LSE [h, total], batched [b, h, s].
    lse_a, lse_b = lse_a.T, lse_b[0].T                       # both [m, h]
    lse = np.logaddexp(lse_a, lse_b)
    merged = (np.exp(lse_a - lse)[..., None] * out_a + np.exp(lse_b - lse)[..., None] * out_b[0])
    want, want_lse = dense_attention(q, k, v)
    assert rel_err(merged, want[0, p:]) < 1e-5
    np.testing.assert_allclose(lse, want_lse[0].T[p:], atol=1e-5)
    # And the prefix part alone is the unmasked attention over the prefix.
    fa, _ = full_attention(qc[None], k[:, :p], v[:, :p])
    assert rel_err(out_a, fa[0]) < 1e-5


@pytest.mark.parametrize("cu_kind", ["list", "int32", "int64"])
def test_varlen_ragged_matches_each_sequence(rng, cu_kind):
    lens = [(33, 50), (1, 17), (64, 64)]                     # (q_len, kv_len), chunks included
    h, hk, d = 6, 3, 8
    parts = [qkv(rng, 1, sq, sk, h, hk, d) for sq, sk in lens]
    q = np.concatenate([p[0][0] for p in parts])
    k = np.concatenate([p[1][0] for p in parts])
    v = np.concatenate([p[2][0] for p in parts])
    cu_q = [0, *np.cumsum([a for a, _ in lens])]
    cu_k = [0, *np.cumsum([b for _, b in lens])]
    if cu_kind != "list":
        cu_q, cu_k = np.array(cu_q, dtype=cu_kind), np.array(cu_k, dtype=cu_kind)
    out, lse = flexprefill.flex_prefill_varlen(q, k, v, cu_q, cu_k, 64, 64, return_lse=True)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0])
    for i, (pq, pk, pv) in enumerate(parts):
        want, want_lse = dense_attention(pq, pk, pv)
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        assert rel_err(out[rows], want[0]) < 1e-5, i
        np.testing.assert_allclose(lse[:, rows], want_lse[0], atol=1e-5)


def test_sparse_batched_equals_varlen_and_report_adds_up(rng):
    q, k, v = qkv(rng, 2, 256, 256, 4, 2, 16)
    out, rep = flexprefill.flex_prefill_attention(q, k, v, return_report=True, **SPARSE)
    cu = [0, 256, 512]
    out2, rep2 = flexprefill.flex_prefill_varlen(
        q.reshape(512, 4, 16), k.reshape(512, 2, 16), v.reshape(512, 2, 16), cu, cu,
        return_report=True, **SPARSE)
    assert np.array_equal(out.reshape(512, 4, 16), out2)
    assert rep.heads == rep2.heads
    assert rep.dense_fallback is None
    nb = 256 // 16
    assert len(rep.heads) == 2 * 4
    assert [(h.seq, h.head) for h in rep.heads] == [(s, h) for s in range(2) for h in range(4)]
    for h in rep.heads:
        assert h.pattern in ("query_aware", "vertical_slash")
        assert h.causal_blocks == nb * (nb + 1) // 2
        assert 0 < h.selected_blocks <= h.causal_blocks
        assert h.density == pytest.approx(h.selected_blocks / h.causal_blocks)
    assert rep.density < 1.0   # random data at gamma 0.9 leaves blocks out
    d = rep.to_dict()
    json.dumps(d)   # plain values only
    assert d["density"] == pytest.approx(rep.density)
    assert d["heads"][0]["pattern"] == rep.heads[0].pattern
    assert set(d["timings"]) == {"pattern_search", "index_build", "attention", "call"}
    t = rep.timings
    assert t.call >= t.pattern_search + t.index_build + t.attention > 0
    assert "SparsityReport(backend='cpu', heads=8" in repr(rep)
    assert sum(rep.patterns.values()) == 8


def test_selection_original_is_accepted_and_differs_in_name_only_when_it_must(rng):
    q, k, v = qkv(rng, 1, 256, 256, 2, 2, 16)
    a = flexprefill.flex_prefill_attention(q, k, v, selection="original", **SPARSE)
    b = flexprefill.flex_prefill_attention(q, k, v, selection="faithful", **SPARSE)
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()


def test_float16_and_ml_dtypes_bfloat16_come_back_in_their_dtype(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed")
    q, k, v = qkv(rng, 1, 80, 80, 4, 2, 32)
    for dt, tol in ((np.float16, 1e-3), (ml_dtypes.bfloat16, 8e-3)):
        qq, kk, vv = q.astype(dt), k.astype(dt), v.astype(dt)
        out = flexprefill.flex_prefill_attention(qq, kk, vv)
        assert out.dtype == dt and out.shape == q.shape
        want, _ = dense_attention(qq.astype(np.float64), kk.astype(np.float64),
                                  vv.astype(np.float64))
        assert rel_err(out.astype(np.float64), want) < tol, dt


def test_output_is_adopted_without_a_copy_and_views_with_offsets_are_read(rng):
    q, k, v = qkv(rng, 3, 40, 40, 2, 2, 8)
    out = flexprefill.flex_prefill_attention(q[1:], k[1:], v[1:])   # non-zero data offset
    assert type(out.base).__name__ == "HostBuffer"
    assert out.flags.writeable
    want, _ = dense_attention(q[1:], k[1:], v[1:])
    assert rel_err(out, want) < 1e-5


def test_read_only_inputs_are_read_where_numpy_can_export_them(rng):
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("NumPy < 2 cannot export read-only arrays by DLPack")
    q, k, v = qkv(rng, 1, 20, 20, 2, 2, 8)
    for t in (q, k, v):
        t.flags.writeable = False
    out = flexprefill.flex_prefill_attention(q, k, v)
    assert rel_err(out, dense_attention(q, k, v)[0]) < 1e-5


def test_threads_share_the_module(rng):
    q, k, v = qkv(rng, 1, 128, 128, 2, 2, 16)
    want = flexprefill.flex_prefill_attention(q, k, v, **SPARSE)
    got = [None] * 4

    def work(i):
        got[i] = flexprefill.flex_prefill_attention(q, k, v, **SPARSE)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        assert np.array_equal(g, want)


def test_sampled_selection_runs_on_the_cpu(rng):
    q, k, v = qkv(rng, 1, 512, 512, 4, 2, 32)
    out, rep = flexprefill.flex_prefill_attention(q, k, v, block_size=32, min_budget=64,
                                                  selection="sampled", return_report=True)
    assert out.shape == q.shape and np.isfinite(out).all()
    assert rep.dense_fallback is None and 0 < rep.density <= 1
    with pytest.raises(flexprefill.InvalidInputError, match="sampled") as e:
        flexprefill.flex_prefill_attention(q, k, v, selection="sampeld")
    assert e.value.argument == "selection"


def test_min_sparse_kv_len_runs_short_calls_dense_and_says_why(rng):
    q, k, v = qkv(rng, 1, 256, 256, 4, 2, 16)
    sparse, rep = flexprefill.flex_prefill_attention(q, k, v, return_report=True, **SPARSE)
    assert rep.dense_fallback is None and rep.density < 1.0
    out, rep = flexprefill.flex_prefill_attention(q, k, v, return_report=True,
                                                  min_sparse_kv_len=257, **SPARSE)
    assert "256" in rep.dense_fallback and "257" in rep.dense_fallback
    assert all(h.pattern == "dense" for h in rep.heads) and rep.density == 1.0
    want, _ = dense_attention(q, k, v)
    assert rel_err(out, want) < 1e-5
    assert not np.array_equal(out, sparse)
    same, rep = flexprefill.flex_prefill_attention(q, k, v, return_report=True,
                                                   min_sparse_kv_len=256, **SPARSE)
    assert rep.dense_fallback is None and np.array_equal(same, sparse)
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k, v, min_sparse_kv_len=-1)
    assert e.value.argument == "min_sparse_kv_len"


def test_empty_cache_is_a_no_op_without_cuda_calls():
    # Nothing is cached before a CUDA call (and a build or machine without CUDA has no pool).
    assert flexprefill.empty_cache() is None
    assert "empty_cache" in flexprefill.__all__
