"""Every bad input is a Python exception naming its argument, never a crash."""

import re

import numpy as np
import pytest

import flexprefill
from flexprefill import InvalidInputError
from reference import qkv


@pytest.fixture
def t(rng):
    return qkv(rng, 1, 16, 16, 4, 2, 8)


def raises(argument, fn, *args, match=None, **kw):
    with pytest.raises(InvalidInputError, match=match) as e:
        fn(*args, **kw)
    assert isinstance(e.value, ValueError) and isinstance(e.value, flexprefill.FlexPrefillError)
    assert e.value.argument == argument, (e.value.argument, str(e.value))
    assert re.search(rf"\b{argument}\b", str(e.value)), str(e.value)
    return e.value


attn = flexprefill.flex_prefill_attention
varlen = flexprefill.flex_prefill_varlen


def test_dtype_errors(t):
    q, k, v = t
    raises("q", attn, q.astype(np.float64), k, v, match="float64")
    raises("q", attn, q.astype(np.int32), k, v, match="int32")
    raises("k", attn, q, k.astype(np.float16), v, match="float16")
    raises("v", attn, q, k, v.astype(np.float16))


def test_layout_and_type_errors(t):
    q, k, v = t
    raises("q", attn, np.asfortranarray(q), k, v, match="not contiguous")
    raises("k", attn, q, k[:, ::2], v[:, ::2], match="not contiguous")
    raises("q", attn, q.tolist(), k, v, match="NumPy array or a torch tensor")
    raises("v", attn, q, k, "v")
    raw = np.zeros(q.size * 4 + 1, dtype=np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(q.shape)
    raises("q", attn, misaligned, k, v, match="aligned")


def test_shape_errors(t, rng):
    q, k, v = t
    raises("q", attn, q[0], k, v, match="4-D")
    raises("v", attn, q, k, v[:, :8], match="shape")
    raises("k", attn, q, np.concatenate([k, k]), np.concatenate([v, v]), match="batch")
    raises("k", attn, q, k[..., :4].copy(), v[..., :4].copy(), match="head_dim")
    q3 = rng.standard_normal((1, 16, 3, 8)).astype(np.float32)
    raises("k", attn, q3, k, v, match="multiple")
    big = rng.standard_normal((1, 4, 2, 300)).astype(np.float32)
    raises("q", attn, big, big, big, match="head_dim")
    raises("q", attn, np.concatenate([q, q], axis=1), k, v, match="q_len")
    raises("q", attn, q[:, :0], k, v)
    bad = q.copy()
    bad[0, 3, 1, 2] = np.nan
    raises("q", attn, bad, k, v, match="non-finite")
    badv = v.copy()
    badv[0, 0, 0, 0] = np.inf
    raises("v", attn, q, k, badv, match="non-finite")


def test_knob_errors(t):
    q, k, v = t
    for name, value in [("gamma", 0.0), ("gamma", 1.5), ("gamma", float("nan")),
                        ("tau", -0.1), ("tau", float("inf")), ("block_size", 96),
                        ("block_size", 8), ("block_size", -1), ("min_budget", -1),
                        ("max_budget", 0), ("max_budget", -5), ("softmax_scale", 0.0),
                        ("softmax_scale", float("nan")), ("selection", "fast"),
                        ("causal", False), ("dropout_p", 0.1)]:
        raises(name, attn, q, k, v, **{name: value})


def test_cu_seqlens_errors(t):
    q, k, v = (x[0] for x in t)                     # [16, h, d]
    ok = [0, 6, 16]
    raises("q", varlen, q[None], k, v, ok, ok, match="3-D")
    raises("cu_seqlens_q", varlen, q, k, v, [1, 6, 16], ok, match="start at 0")
    raises("cu_seqlens_k", varlen, q, k, v, ok, [0, 10, 6, 16], match="decreases")
    raises("cu_seqlens_q", varlen, q, k, v, [0, 6, 15], ok, match="ends at 15")
    raises("cu_seqlens_k", varlen, q, k, v, ok, [0, 16], match="entries")
    raises("cu_seqlens_q", varlen, q, k, v, [0], [0], match="at least 2")
    raises("cu_seqlens_q", varlen, q, k, v, np.array(ok, dtype=np.float32), ok, match="int32")
    raises("cu_seqlens_q", varlen, q, k, v, np.array([ok]), ok, match="1-D")
    raises("cu_seqlens_q", varlen, q, k, v, [0, -6, 16], ok, match="negative")
    raises("cu_seqlens_q", varlen, q, k, v, "0,6,16", ok)
    raises("cu_seqlens_q", varlen, q, k, v, [0, 10, 16], [0, 6, 16], match="larger than")
    raises("cu_seqlens_q", varlen, q, k, v, [0, 0, 16], [0, 0, 16], match="empty")
    raises("cu_seqlens_q", varlen, q, k, v, None, ok, match="required")
    raises("max_seqlen_q", varlen, q, k, v, ok, ok, 5, 10, match="longest")
    raises("max_seqlen_k", varlen, q, k, v, ok, ok, 10, 9, match="longest")


def test_numpy_readonly_error_or_success(t):
    q, k, v = t
    q = q.copy()
    q.flags.writeable = False
    if int(np.__version__.split(".")[0]) >= 2:
        attn(q, k, v)                               # NumPy 2 exports read-only arrays
    else:
        raises("q", attn, q, k, v, match="read-only")
