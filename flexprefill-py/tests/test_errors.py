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


def _libcuda_loads():
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


class _FakeCudaTensor:
    """A DLPack producer that says its memory is on cuda:0 (never dereferenced here)."""

    def __init__(self, shape):
        import ctypes

        class DLDevice(ctypes.Structure):
            _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

        class DLDataType(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                        ("lanes", ctypes.c_uint16)]

        class DLTensor(ctypes.Structure):
            _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                        ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                        ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]

        class DLManagedTensor(ctypes.Structure):
            _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                        ("deleter", ctypes.c_void_p)]

        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._m = DLManagedTensor(DLTensor(0x100000, DLDevice(2, 0), len(shape),
                                           DLDataType(4, 16, 1), self._shape, None, 0), None,
                                  None)
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self._new = lambda: new(ctypes.addressof(self._m), b"dltensor", None)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        return self._new()


def test_cuda_tensors_without_a_usable_gpu_raise_a_device_error_naming_the_reason():
    q = _FakeCudaTensor((1, 256, 4, 64))
    k = v = _FakeCudaTensor((1, 256, 2, 64))
    if _libcuda_loads():
        # A driver is present: the fake gets past the device and is refused as a non-torch
        # CUDA tensor instead.
        with pytest.raises(flexprefill.InvalidInputError, match="torch tensors"):
            flexprefill.flex_prefill_attention(q, k, v)
        return
    with pytest.raises(flexprefill.DeviceError, match="no usable GPU for cuda:0: no CUDA "
                       "driver") as e:
        flexprefill.flex_prefill_attention(q, k, v)
    assert e.value.argument == "q"
