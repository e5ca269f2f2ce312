"""torch CUDA tensors on the CUDA backend: results against a float32 reference and the CPU
backend, varlen, chunks, GQA and the LSE; zero copy (the output is the tensor torch allocated,
no other allocation but the output, the LSE and the backend's own small index/workspace);
stream ordering (a call on a side stream after its producer, no device synchronisation); and
the Rust CLI's CUDA output bit for bit. Without torch or a GPU these skip with a message."""

import math

import numpy as np
import pytest

import cli_io
import flexprefill
from flexprefill import _native

torch = pytest.importorskip("torch", reason="torch not installed: CUDA tests skipped")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: CUDA tests skipped", allow_module_level=True)

needs_cuda_path = pytest.mark.skipif(not _native.CUDA, reason="this build has no CUDA path")

BF16_TOL = dict(rtol=2e-2, atol=2e-2)
# The CUDA backend runs dense below this many keys (pattern search cannot pay for itself
# there; flexprefill_cuda::call::MIN_SPARSE_KV_LEN): sparse tests need at least this much.
SPARSE_N = 16384


def _randn(*shape, dtype=torch.bfloat16, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)


def _qkv(n=2048, h=8, hk=2, d=128, b=1, nk=None, dtype=torch.bfloat16):
    nk = n if nk is None else nk
    return (_randn(b, n, h, d, dtype=dtype, seed=1), _randn(b, nk, hk, d, dtype=dtype, seed=2),
            _randn(b, nk, hk, d, dtype=dtype, seed=3))


def _reference(q, k, v, scale=None):
    """float32 dense causal attention of one sequence [s, h, d] (bottom-right aligned):
    out [sq, h, d], lse [sq, h] (natural log)."""
    q, k, v = (x.float() for x in (q, k, v))
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * (scale or 1 / math.sqrt(d))
    visible = torch.arange(sk, device=q.device)[None, :] <= (
        sk - sq + torch.arange(sq, device=q.device))[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), v)
    return out, lse.T


@needs_cuda_path
def test_cuda_dense_regime_matches_a_float32_reference_with_gqa_and_lse():
    q, k, v = _qkv(2048, h=8, hk=2)
    out, lse, rep = flexprefill.flex_prefill_attention(q, k, v, return_lse=True,
                                                       return_report=True)
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == q.shape
    assert lse.shape == (1, 8, 2048) and lse.dtype == torch.float32
    assert rep.backend == "cuda" and rep.dense_fallback is not None
    want, want_lse = _reference(q[0], k[0], v[0])
    torch.testing.assert_close(out[0].float(), want, **BF16_TOL)
    torch.testing.assert_close(lse[0].T, want_lse, rtol=1e-3, atol=1e-3)


@needs_cuda_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_with_chunks_matches_per_sequence_references(dtype):
    # Three sequences: a chunk (300 queries over 700 keys), a whole prompt, a short chunk over
    # a long prefix; cu_seqlens on the device, as flash-attn callers keep them.
    lens = [(300, 700), (1000, 1000), (64, 2000)]
    cu_q = torch.tensor([0, 300, 1300, 1364], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 700, 1700, 3700], dtype=torch.int32, device="cuda")
    q = _randn(1364, 8, 64, dtype=dtype, seed=4)
    k = _randn(3700, 4, 64, dtype=dtype, seed=5)
    v = _randn(3700, 4, 64, dtype=dtype, seed=6)
    out, lse = flexprefill.flex_prefill_varlen(q, k, v, cu_q, cu_k, 1000, 2000,
                                               return_lse=True, softmax_scale=0.1)
    assert out.shape == q.shape and lse.shape == (8, 1364)
    for i, (sq, sk) in enumerate(lens):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        assert (b - a, d - c) == (sq, sk)
        want, want_lse = _reference(q[a:b], k[c:d], v[c:d], scale=0.1)
        torch.testing.assert_close(out[a:b].float(), want, **BF16_TOL)
        torch.testing.assert_close(lse[:, a:b].T, want_lse, rtol=1e-3, atol=1e-3)


@needs_cuda_path
def test_cuda_sparse_regime_agrees_with_the_cpu_backend():
    q, k, v = _qkv(SPARSE_N, h=8, hk=2)
    # gamma 0.7: random data at 0.9 selects ~0.83 of the blocks, where the GPU walks every
    # causal block instead (sparse would cost more), and this test is about the sparse path.
    kw = dict(gamma=0.7, return_report=True, return_lse=True)
    out, lse, rep = flexprefill.flex_prefill_attention(q, k, v, **kw)
    cpu_out, cpu_lse, cpu_rep = flexprefill.flex_prefill_attention(q.cpu(), k.cpu(), v.cpu(),
                                                                   **kw)
    assert rep.dense_fallback is None and cpu_rep.dense_fallback is None
    same = sum(a.pattern == b.pattern for a, b in zip(rep.heads, cpu_rep.heads))
    assert len(rep.heads) == len(cpu_rep.heads) == 8 and same >= 7
    print(f"density cuda {rep.density:.4f} cpu {cpu_rep.density:.4f}")
    assert abs(rep.density - cpu_rep.density) < 0.02
    # Both backends select from their own estimates (bf16 tensor cores vs f32 on the CPU): a
    # block at the gamma cut may differ, so compare the bulk, not every element.
    close = torch.isclose(out.cpu().float(), cpu_out.float(), **BF16_TOL)
    print(f"elements outside bf16 tolerance: {1 - close.float().mean().item():.2e}")
    assert close.float().mean().item() > 0.999
    assert torch.isclose(lse.cpu(), cpu_lse, rtol=1e-2, atol=1e-2).float().mean().item() > 0.999


@needs_cuda_path
def test_cuda_output_is_the_tensor_torch_allocated_and_nothing_else_is():
    q, k, v = _qkv(SPARSE_N, h=32, hk=8)      # q 128 MiB, k and v 32 MiB each
    flexprefill.flex_prefill_attention(q, k, v, return_lse=True)     # kernels, backend setup
    torch.cuda.synchronize()
    # torch's caching allocator hands a freed block of the same size back to the next
    # allocation: the output must land there, so it is a torch allocation, not ours.
    hole = torch.empty_like(q)
    hole_ptr = hole.data_ptr()
    del hole
    inputs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # FlexPrefill keeps its work buffers between calls; hand them back so that this call's
    # buffers show up in the driver's free memory below.
    flexprefill.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    reserved_before = torch.cuda.memory_reserved()
    out, lse = flexprefill.flex_prefill_attention(q, k, v, return_lse=True)
    # Before any synchronisation, while the call's work buffers are still reserved.
    free_after = torch.cuda.mem_get_info()[0]
    reserved_growth = torch.cuda.memory_reserved() - reserved_before
    torch.cuda.synchronize()
    assert out.data_ptr() == hole_ptr
    assert (q.data_ptr(), k.data_ptr(), v.data_ptr()) == inputs
    # torch allocated exactly the output and the LSE (its blocks round up to 512 bytes), and
    # nothing else at any time during the call: no copy of q, k or v through torch.
    def rounded(t):
        return -(-t.numel() * t.element_size() // 512) * 512
    expect = rounded(out) + rounded(lse)
    assert torch.cuda.memory_allocated() - before == expect
    assert torch.cuda.max_memory_allocated() - before == expect
    # Outside torch, the backend's own buffers (sequence table, statistics, selection and
    # block index: a few MiB at 16k with 32 heads) come from FlexPrefill's stream-ordered pool,
    # which reserves in 32 MiB steps. A copy of q (128 MiB) would not fit under the bound.
    workspace = (free_before - free_after) - reserved_growth
    print(f"device memory outside torch during the call: {workspace / 2**20:.1f} MiB")
    assert 0 < workspace < q.numel() * q.element_size()
    # The pool keeps them after the synchronisation (the next call maps nothing) until
    # empty_cache() hands them back.
    kept_free = torch.cuda.mem_get_info()[0]
    assert kept_free <= free_after
    flexprefill.empty_cache()
    assert torch.cuda.mem_get_info()[0] - kept_free >= workspace


@needs_cuda_path
def test_cuda_call_on_a_side_stream_is_ordered_after_its_producer_without_a_sync():
    q, k, v = _qkv(2048, h=8, hk=2)
    ref = flexprefill.flex_prefill_attention(q, k, v)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q2, k2, v2 = (torch.empty_like(x) for x in (q, k, v))
        torch.cuda._sleep(int(1e9))          # a slow producer: ~0.5 s of GPU clock cycles
        for dst, src in ((q2, q), (k2, k), (v2, v)):
            dst.copy_(src)
        out = flexprefill.flex_prefill_attention(q2, k2, v2)
        # The call only queued its work: the producer is still running.
        assert not side.query()
    # The default stream waits for the side stream as a user would, through an event.
    torch.cuda.current_stream().wait_stream(side)
    out_default = out.clone()
    torch.cuda.synchronize()
    assert torch.equal(out_default, ref)


@needs_cuda_path
def test_cuda_return_report_synchronises_only_the_calls_stream():
    # Sparse, so the report reads the decisions back from the device.
    # gamma 0.7: below the density at which the GPU walks every block (random data at 0.9
    # selects ~0.83), so the decisions are read back.
    q, k, v = _qkv(SPARSE_N, h=4, hk=2)
    flexprefill.flex_prefill_attention(q, k, v, gamma=0.7)
    torch.cuda.synchronize()
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        torch.cuda._sleep(int(1e9))
    _, rep = flexprefill.flex_prefill_attention(q, k, v, gamma=0.7, return_report=True)
    assert rep.backend == "cuda" and rep.dense_fallback is None and rep.timings.call > 0
    assert len(rep.heads) == 4 and all(0 < h.density <= 1 for h in rep.heads)
    assert not other.query()
    other.synchronize()


@needs_cuda_path
def test_cuda_float32_is_a_clear_error():
    q, k, v = _qkv(256, dtype=torch.float32)
    with pytest.raises(flexprefill.InvalidInputError, match="float32") as e:
        flexprefill.flex_prefill_attention(q, k, v)
    assert e.value.argument == "q"


@needs_cuda_path
def test_cuda_sampled_selection_runs_and_agrees_with_the_cpu_backend():
    q, k, v = _qkv(SPARSE_N, h=4, hk=2)
    # gamma 0.6: random data keeps about that share of every row, well below the density at
    # which the GPU walks every block, so the sampled blocks are what attention reads.
    kw = dict(selection="sampled", gamma=0.6, return_report=True)
    out, rep = flexprefill.flex_prefill_attention(q, k, v, **kw)
    cpu_out, cpu_rep = flexprefill.flex_prefill_attention(q.cpu(), k.cpu(), v.cpu(), **kw)
    assert rep.dense_fallback is None and cpu_rep.dense_fallback is None
    assert len(rep.heads) == len(cpu_rep.heads) == 4
    print(f"sampled density cuda {rep.density:.4f} cpu {cpu_rep.density:.4f}")
    # Each query block is cut on its own estimate, computed on each backend (bf16 tensor
    # cores vs f32): a block at a cut may differ, the density and the output agree in bulk.
    assert abs(rep.density - cpu_rep.density) < 0.02
    close = torch.isclose(out.cpu().float(), cpu_out.float(), **BF16_TOL)
    assert close.float().mean().item() > 0.999


@needs_cuda_path
def test_cuda_device_mix_layout_and_dtype_errors_name_the_argument():
    q, k, v = _qkv(256)
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k.cpu(), v)
    assert e.value.argument == "k"
    with pytest.raises(flexprefill.InvalidInputError, match="contiguous") as e:
        flexprefill.flex_prefill_attention(q.transpose(1, 2), k, v)
    assert e.value.argument == "q"
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k.half(), v.half())
    assert e.value.argument == "k"
    with pytest.raises(flexprefill.InvalidInputError) as e:
        flexprefill.flex_prefill_attention(q, k[:, :200], v[:, :200])   # 256 queries, 200 keys
    assert e.value.argument == "q"


@needs_cuda_path
@pytest.mark.parametrize("n", [2048, SPARSE_N])
def test_cuda_output_is_the_cli_cuda_output_bit_for_bit(tmp_path, n):
    cli = cli_io.find_cli()
    if cli is None:
        pytest.skip("no flexprefill CLI binary ($FLEXPREFILL_CLI): CLI comparison skipped")
    q, k, v = _qkv(n, h=8, hk=2)
    bits = {name: ("BF16", t.cpu().view(torch.int16).numpy().view(np.uint16))
            for name, t in (("q", q), ("k", k), ("v", v))}
    code, o_cli = cli_io.run(cli, tmp_path, bits, "cuda", ["--gamma", "0.9"])
    out = flexprefill.flex_prefill_attention(q, k, v, gamma=0.9)
    assert code == "BF16"
    assert np.array_equal(o_cli, out.cpu().view(torch.int16).numpy().view(np.uint16))


@needs_cuda_path
def test_transformers_model_on_the_gpu_prefills_through_the_cuda_backend():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    import flexprefill.transformers as fpt

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    name = fpt.register("flexprefill-cuda-test", collect_reports=True)
    ids = torch.randint(0, 97, (1, 600), device="cuda")
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(ids).logits.float()
        fpt.reports.clear()
        model.set_attn_implementation(name)
        got = model(ids).logits.float()
        model.set_attn_implementation("sdpa")
    assert len(fpt.reports) == 2 and all(r.backend == "cuda" for r in fpt.reports)
    # Dense at 600 tokens on CUDA: the same attention as SDPA up to bf16 rounding.
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
