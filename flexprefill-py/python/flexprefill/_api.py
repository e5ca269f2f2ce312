"""The two public calls. Thin on purpose: argument plumbing here, every check in the native
module, which names the argument at fault."""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from . import _native
from ._errors import InvalidInputError
from .report import SparsityReport


def flex_prefill_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: Optional[int] = None,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    selection: Optional[str] = None,
    return_lse: bool = False,
    return_report: bool = False,
    causal: bool = True,
    dropout_p: float = 0.0,
    min_sparse_kv_len: Optional[int] = None,
):
    """Causal FlexPrefill attention on ``[batch, seq, heads, head_dim]`` tensors.

    q is ``[batch, q_len, num_heads, head_dim]``, k and v ``[batch, kv_len, num_kv_heads,
    head_dim]`` (GQA: num_heads a multiple of num_kv_heads). ``q_len < kv_len`` is a chunk whose
    queries are the last q_len positions (bottom-right causal, as flash-attn). NumPy arrays and
    torch CPU tensors, float32 / float16 / bfloat16, contiguous; read without a copy. torch CUDA
    tensors (float16 / bfloat16) run on the GPU, queued on the current torch stream without a
    synchronisation (``return_report`` synchronises that stream). Returns the
    output in the input's framework and dtype, ``[batch, q_len, num_heads, head_dim]``; with
    ``return_lse`` also the natural-log log-sum-exp as flash-attn lays it out,
    ``[batch, num_heads, q_len]`` float32; with ``return_report`` also a
    :class:`SparsityReport`. Knobs after v are keyword-only; ``causal`` and ``dropout_p`` exist
    so a flash-attn call switches by its name alone (only ``True`` and ``0.0`` are accepted).
    ``min_sparse_kv_len``: keys of the longest sequence below which the call runs dense and the
    report says why (None: the backend's own threshold, 0 on the CPU and 16384 on CUDA, where
    pattern search and index build would cost more than sparsity saves below it); 0 always
    runs the sparse path, e.g. to measure FlexPrefill's accuracy on short prompts.
    """
    return _call(q, k, v, None, None, None, None, gamma, tau, min_budget, max_budget,
                 block_size, softmax_scale, selection, return_lse, return_report, causal,
                 dropout_p, min_sparse_kv_len)


def flex_prefill_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: Optional[int] = None,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    selection: Optional[str] = None,
    return_lse: bool = False,
    return_report: bool = False,
    causal: bool = True,
    dropout_p: float = 0.0,
    min_sparse_kv_len: Optional[int] = None,
):
    """Causal FlexPrefill attention on a ragged batch packed along tokens (flash_attn_varlen_func).

    q is ``[total_q, num_heads, head_dim]``, k and v ``[total_k, num_kv_heads, head_dim]``;
    sequence i owns queries ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and keys
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` (int32/int64 arrays or tensors, or lists). The
    ``max_seqlen_*`` are checked against the cu_seqlens when given. Returns as
    :func:`flex_prefill_attention`; the LSE is ``[num_heads, total_q]``. ``min_sparse_kv_len``
    as in :func:`flex_prefill_attention`.
    """
    if cu_seqlens_q is None or cu_seqlens_k is None:
        which = "cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k"
        raise InvalidInputError(f"{which} is required (use flex_prefill_attention for "
                                "uniform batches)", which)
    return _call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gamma, tau,
                 min_budget, max_budget, block_size, softmax_scale, selection, return_lse,
                 return_report, causal, dropout_p, min_sparse_kv_len)


def _call(q, k, v, cu_q, cu_k, max_q, max_k, gamma, tau, min_budget, max_budget, block_size,
          softmax_scale, selection, return_lse, return_report, causal, dropout_p,
          min_sparse_kv_len=None):
    if causal is not True:
        raise InvalidInputError("causal must be True: FlexPrefill is causal prefill attention",
                                "causal")
    if dropout_p != 0.0:
        raise InvalidInputError(f"dropout_p ({dropout_p}) must be 0.0: FlexPrefill is an "
                                "inference kernel", "dropout_p")
    is_torch = _is_torch(q)
    bf16 = False
    stream = out = lse = None
    if not is_torch:
        q, k, v, bf16 = _ml_bf16_as_u16(q, k, v)
    elif q.is_cuda:
        stream, out, lse, cu_q, cu_k = _cuda_call(q, cu_q, cu_k, return_lse)
    out, lse, rep = _native.attention(
        q, k, v, cu_q, cu_k, _opt_int(max_q), _opt_int(max_k), float(gamma), float(tau),
        int(min_budget), _opt_int(max_budget), int(block_size),
        None if softmax_scale is None else float(softmax_scale), selection, bool(return_lse),
        bool(return_report), stream, bf16, out, lse, _opt_int(min_sparse_kv_len))
    out = _adopt(out, is_torch, bf16)
    if not (return_lse or return_report):
        return out
    result = (out,)
    if return_lse:
        lse = _adopt(lse, is_torch, False)
        # Token-major from the backends; flash-attn's layout is heads before tokens (a view).
        lse = lse.transpose(1, 2) if lse.ndim == 3 and is_torch else (
            lse.transpose(0, 2, 1) if lse.ndim == 3 else lse.T)
        result += (lse,)
    if return_report:
        result += (SparsityReport._from_native(rep),)
    return result


def _opt_int(x):
    return None if x is None else int(x)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _cuda_call(q, cu_q, cu_k, return_lse):
    """For a torch CUDA q: the caller's current stream on q's device (the call is queued on
    it), the output and LSE allocated by torch's caching allocator on that device and stream
    (the native call checks their shapes), and the cu_seqlens on the host (the sequence table
    is built on the host; device cu_seqlens are copied, which waits for their producer). Where
    torch offers DLPack's C exchange API the native side asks it for the stream and allocates
    the output and LSE through it (no Python per call): stream, out and lse are then None."""
    if not _NVRTC_TRIED:
        _preload_nvrtc()
    native_stream = _NATIVE_STREAM.get(type(q))
    if native_stream is None:
        native_stream = _NATIVE_STREAM[type(q)] = _native.stream_from_producer(q)
    if native_stream:
        stream = out = lse = None
    else:
        import torch

        stream = torch.cuda.current_stream(q.device).cuda_stream
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = (torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
               if return_lse else None)
    if cu_q is not None:
        tensor = sys.modules["torch"].Tensor  # q is a torch tensor, so torch is imported
        cu_q, cu_k = (c.cpu() if isinstance(c, tensor) and c.is_cuda else c
                      for c in (cu_q, cu_k))
    return stream, out, lse, cu_q, cu_k


# Per tensor type: whether the native call reads the current stream and allocates the output
# itself (DLPack's C exchange API), saving torch.cuda.current_stream's and torch.empty's
# Python on every call.
_NATIVE_STREAM = {}
_NVRTC_TRIED = False


def _preload_nvrtc():
    """The CUDA backend compiles its kernels with NVRTC, which it opens by name
    (``libnvrtc.so.13``, ...). torch's pip wheels ship NVRTC in the ``nvidia`` package rather
    than on the loader path: load that copy globally once, so the name resolves to it without
    a CUDA toolkit. A system NVRTC on the loader path works as well; failures are left to the
    backend's own error."""
    global _NVRTC_TRIED
    _NVRTC_TRIED = True
    import ctypes
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return
    for root in spec.submodule_search_locations:
        for lib in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _ml_bf16_as_u16(q, k, v):
    """NumPy cannot export bfloat16 (ml_dtypes) by DLPack: view such arrays as uint16."""
    if not any(isinstance(t, np.ndarray) and t.dtype.name == "bfloat16" for t in (q, k, v)):
        return q, k, v, False
    view = [t.view(np.uint16) if isinstance(t, np.ndarray) and t.dtype.name == "bfloat16"
            else t for t in (q, k, v)]
    return view[0], view[1], view[2], True


def _adopt(buf, is_torch: bool, ml_bf16: bool):
    """Hands a native buffer to the caller's framework without a copy (the CUDA path already
    returns the torch tensors it wrote)."""
    if is_torch:
        torch = sys.modules["torch"]  # a torch tensor came in, so torch is imported
        return buf if isinstance(buf, torch.Tensor) else torch.from_dlpack(buf)
    arr = np.asarray(buf)
    if buf.dtype == "bfloat16":
        ml_dtypes = sys.modules.get("ml_dtypes")
        if ml_dtypes is None:
            import ml_dtypes  # noqa: F811  (NumPy bfloat16 output needs it)
        arr = arr.view(ml_dtypes.bfloat16)
    return arr
