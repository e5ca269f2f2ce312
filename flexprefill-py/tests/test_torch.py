"""torch CPU tensors: in by DLPack, out as torch tensors, bit-for-bit the NumPy results."""

import numpy as np
import pytest

import flexprefill
from reference import dense_attention, qkv, rel_err

torch = pytest.importorskip("torch", reason="torch not installed: torch tests skipped")


def test_torch_in_torch_out_matches_numpy_bit_for_bit(rng):
    q, k, v = qkv(rng, 2, 96, 96, 4, 2, 16)
    kw = dict(block_size=16, min_budget=16, return_lse=True)
    out_n, lse_n = flexprefill.flex_prefill_attention(q, k, v, **kw)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    out_t, lse_t = flexprefill.flex_prefill_attention(tq, tk, tv, **kw)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    assert out_t.shape == (2, 96, 4, 16) and lse_t.shape == (2, 4, 96)
    assert np.array_equal(out_t.numpy(), out_n)
    assert np.array_equal(lse_t.numpy(), lse_n)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 8e-3), ("float16", 1e-3)])
def test_torch_half_dtypes(rng, dtype, tol):
    dt = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x).to(dt) for x in qkv(rng, 1, 64, 64, 4, 4, 32))
    out = flexprefill.flex_prefill_attention(q, k, v)
    assert out.dtype == dt
    want, _ = dense_attention(*(x.double().numpy() for x in (q, k, v)))
    assert rel_err(out.double().numpy(), want) < tol


def test_torch_varlen_with_int32_tensor_cu_seqlens(rng):
    q, k, v = qkv(rng, 1, 50, 50, 2, 1, 8)
    t = [torch.from_numpy(x[0]) for x in (q, k, v)]
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    out = flexprefill.flex_prefill_varlen(*t, cu, cu, 30, 30)
    assert isinstance(out, torch.Tensor)
    want, _ = dense_attention(q[:, 20:], k[:, 20:], v[:, 20:])
    assert rel_err(out[20:].numpy(), want[0]) < 1e-5


def test_torch_errors_name_the_argument(rng):
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, 1, 16, 16, 2, 2, 8))
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k.transpose(1, 2), v)
    assert e.value.argument == "k"
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k, v.double())
    assert e.value.argument == "v" and "float64" in str(e.value)
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q.requires_grad_(), k, v)
    assert e.value.argument == "q" and "DLPack" in str(e.value)
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q.detach().to("meta"), k, v)
    assert e.value.argument == "q"


class _PythonDLPackOnly:
    """Wraps a tensor and speaks only Python-level DLPack (`__dlpack__`), as producers without
    DLPack's C exchange API do; `api` stands in for a type's `__dlpack_c_exchange_api__`."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, **kw):
        return self._t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


class _BogusExchangeApi(_PythonDLPackOnly):
    # Not a "dlpack_exchange_api" capsule: ignored, the tensor goes through __dlpack__.
    __dlpack_c_exchange_api__ = "not a capsule"


def test_torch_tensors_cross_by_the_c_exchange_api_as_by_dlpack(rng):
    q, k, v = (torch.from_numpy(x) for x in qkv(rng, 1, 64, 64, 4, 2, 16))
    from flexprefill import _native

    # torch >= 2.10 publishes DLPack's C exchange API (a capsule); the binding exports through
    # it.
    has_api = any(type(getattr(torch.Tensor, n, None)).__name__ == "PyCapsule"
                  for n in ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"))
    assert _native.stream_from_producer(q) is has_api
    assert not _native.stream_from_producer(_PythonDLPackOnly(q))
    assert not _native.stream_from_producer(_BogusExchangeApi(q))
    kw = dict(block_size=16, min_budget=16, return_lse=True)
    out_c, lse_c = flexprefill.flex_prefill_attention(q, k, v, **kw)
    for wrap in (_PythonDLPackOnly, _BogusExchangeApi):
        out_p, lse_p = flexprefill.flex_prefill_attention(*(wrap(x) for x in (q, k, v)), **kw)
        assert np.array_equal(out_c.numpy(), out_p) and np.array_equal(lse_c.numpy(), lse_p)
    # Errors name the argument on either path (layout checked on the exported strides).
    for wrap in (lambda x: x, _PythonDLPackOnly):
        with pytest.raises(flexprefill.InvalidInputError, match="not contiguous") as e:
            flexprefill.flex_prefill_attention(q, wrap(k.transpose(1, 2)), v)
        assert e.value.argument == "k"
