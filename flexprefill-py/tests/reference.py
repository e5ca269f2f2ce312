"""Dense causal attention in float64 NumPy: the independent oracle of the Python tests."""

import numpy as np


def dense_attention(q, k, v, scale=None):
    """q [b, sq, h, d], k/v [b, sk, hk, d] -> out [b, sq, h, d], lse [b, h, sq] (flash-attn's
    layout). Bottom-right causal: query i (of the last sq positions) sees keys 0..sk-sq+i."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k = np.repeat(k, h // hk, axis=2)
    v = np.repeat(v, h // hk, axis=2)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    visible = np.arange(sk)[None, :] <= (sk - sq + np.arange(sq))[:, None]
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(axis=-1)) + m[..., 0]
    p = np.exp(s - lse[..., None])
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def full_attention(q, k, v, scale=None):
    """No mask at all (every query sees every key): a cached prefix as a chunk sees it."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    h, hk, d = q.shape[2], k.shape[2], q.shape[3]
    k = np.repeat(k, h // hk, axis=2)
    v = np.repeat(v, h // hk, axis=2)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    m = s.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(axis=-1)) + m[..., 0]
    return np.einsum("bhqk,bkhd->bqhd", np.exp(s - lse[..., None]), v), lse


def rel_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def qkv(rng, b, sq, sk, h, hk, d, dtype=np.float32):
    return (rng.standard_normal((b, sq, h, d)).astype(dtype),
            rng.standard_normal((b, sk, hk, d)).astype(dtype),
            rng.standard_normal((b, sk, hk, d)).astype(dtype))
