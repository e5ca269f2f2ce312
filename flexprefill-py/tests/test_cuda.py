"""CUDA tensors. Without torch or a GPU these skip with a message; on a GPU with a build that
has no CUDA path they check the clear error; with the CUDA path they check zero copy and
stream ordering."""

import pytest

import flexprefill
from flexprefill import _native

torch = pytest.importorskip("torch", reason="torch not installed: CUDA tests skipped")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: CUDA tests skipped", allow_module_level=True)

needs_cuda_path = pytest.mark.skipif(not _native.CUDA,
                                     reason="this build has no CUDA path yet")


def _qkv(n=4096, h=8, hk=2, d=128, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(3)
    mk = lambda heads: torch.randn(1, n, heads, d, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(h), mk(hk), mk(hk)


@pytest.mark.skipif(_native.CUDA, reason="this build has the CUDA path")
def test_cuda_tensors_raise_a_device_error_in_a_cpu_only_build():
    q, k, v = _qkv(256)
    with pytest.raises(flexprefill.DeviceError, match="CUDA tensors are not supported") as e:
        flexprefill.flex_prefill_attention(q, k, v)
    assert e.value.argument == "q"


@needs_cuda_path
def test_cuda_output_matches_the_cpu_backend():
    q, k, v = _qkv(2048, dtype=torch.float32)
    kw = dict(block_size=128, min_budget=512)
    out = flexprefill.flex_prefill_attention(q, k, v, **kw)
    ref = flexprefill.flex_prefill_attention(q.cpu(), k.cpu(), v.cpu(), **kw)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-3, atol=2e-3)


@needs_cuda_path
def test_cuda_zero_copy_inputs_and_one_output_allocation():
    q, k, v = _qkv()
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = flexprefill.flex_prefill_attention(q, k, v)
    torch.cuda.synchronize()
    assert (q.data_ptr(), k.data_ptr(), v.data_ptr()) == ptrs
    # The output is the only tensor the caller's allocator keeps.
    assert torch.cuda.memory_allocated() - before == out.numel() * out.element_size()
    assert out.data_ptr() not in ptrs


@needs_cuda_path
def test_cuda_call_on_a_side_stream_is_ordered_after_the_producer():
    side = torch.cuda.Stream()
    q, k, v = _qkv()
    ref = flexprefill.flex_prefill_attention(q, k, v)
    with torch.cuda.stream(side):
        # The inputs are written on the side stream right before the call: a call that ran on
        # another stream would race with these writes.
        q2, k2, v2 = q * 1, k * 1, v * 1
        out = flexprefill.flex_prefill_attention(q2, k2, v2)
    side.synchronize()
    assert torch.equal(out, ref)
