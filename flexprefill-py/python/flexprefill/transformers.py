"""FlexPrefill inside Hugging Face transformers, through its attention interface.

>>> import flexprefill.transformers
>>> flexprefill.transformers.register(gamma=0.9)
>>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexprefill")

Prefill steps (more than one query, a plain causal mask: no padding, no sliding window, no
softcap or attention sinks) run FlexPrefill; everything else, decode steps included, runs
transformers' own SDPA path unchanged. Works for models whose attention calls
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (Llama, Mistral, Qwen2/3, Gemma,
Phi-3, SmolLM, ... most decoder-only models of transformers >= 4.48); see docs/PYTHON.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._api import flex_prefill_attention
from ._native import CUDA as _HAS_CUDA

#: Knobs per registered name.
_CONFIGS: Dict[str, Dict[str, Any]] = {}
#: Reports of the FlexPrefill calls, when a name was registered with ``collect_reports=True``.
reports: List[Any] = []


def register(name: str = "flexprefill", *, gamma: float = 0.9, tau: float = 0.1,
             min_budget: int = 1024, max_budget: Optional[int] = None, block_size: int = 128,
             selection: Optional[str] = None, collect_reports: bool = False,
             compute_device: Optional[str] = None,
             min_sparse_kv_len: Optional[int] = None) -> str:
    """Registers FlexPrefill as attention implementation ``name`` (again: replaces its knobs).

    A model on a GPU in float16/bfloat16 runs FlexPrefill on the GPU, on the current stream;
    ``compute_device="cpu"`` runs it on CPU copies instead (float32 GPU models, accuracy
    checks against the CPU backend; slow). ``min_sparse_kv_len`` as in
    :func:`flexprefill.flex_prefill_attention` (0: sparse at any prompt length). Returns ``name``.
    """
    import transformers
    from transformers.masking_utils import sdpa_mask

    _CONFIGS[name] = dict(gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget,
                          block_size=block_size, selection=selection,
                          collect_reports=collect_reports, compute_device=compute_device,
                          min_sparse_kv_len=min_sparse_kv_len)

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _forward(_CONFIGS[name], module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"flexprefill_attention_forward[{name}]"
    transformers.AttentionInterface.register(name, attention)
    # Masks as SDPA builds them: None for a plain causal prefill, so the test below is cheap.
    transformers.AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _forward(cfg, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
             **kwargs):
    """query [b, h, q, d], key/value [b, hk, kv, d] -> ([b, q, h, d], None), as SDPA's."""
    import torch

    q_len, kv_len = query.shape[2], key.shape[2]
    causal_kv = _causal_kv_len(attention_mask, q_len, kv_len)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    gpu_ok = _HAS_CUDA and query.dtype in (torch.float16, torch.bfloat16)
    plain = (
        q_len > 1
        and causal_kv is not None
        and dropout == 0.0
        and not module.training
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and kwargs.get("position_bias") is None
        and not (window and causal_kv > window)
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and query.shape[-1] == value.shape[-1] <= 256
        and (not query.is_cuda or cfg["compute_device"] == "cpu" or gpu_ok)
    )
    if q_len > 1 and query.is_cuda and not gpu_ok and cfg["compute_device"] != "cpu":
        _warn_once("FlexPrefill's CUDA kernels take float16/bfloat16 (and need a build with "
                   "the CUDA path): prefill of these CUDA tensors runs SDPA; load the model in "
                   "bfloat16, or register(..., compute_device='cpu') for CPU copies")
    if not plain:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling,
                     dropout=dropout, **kwargs)
    device = query.device
    # [b, h, s, d] -> [b, s, h, d]; a copy here only because RoPE left them head-major.
    q = query.detach().transpose(1, 2).contiguous()
    k = key[:, :, :causal_kv].detach().transpose(1, 2).contiguous()
    v = value[:, :, :causal_kv].detach().transpose(1, 2).contiguous()
    if cfg["compute_device"] == "cpu" and q.is_cuda:
        q, k, v = q.cpu(), k.cpu(), v.cpu()
    out = flex_prefill_attention(
        q, k, v, gamma=cfg["gamma"], tau=cfg["tau"], min_budget=cfg["min_budget"],
        max_budget=cfg["max_budget"], block_size=cfg["block_size"], selection=cfg["selection"],
        softmax_scale=scaling, return_report=cfg["collect_reports"],
        min_sparse_kv_len=cfg["min_sparse_kv_len"])
    if cfg["collect_reports"]:
        out, report = out
        reports.append(report)
    return out.to(device), None


_WARNED = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _causal_kv_len(mask, q_len: int, kv_len: int) -> Optional[int]:
    """How many keys a plain causal attention of these queries reads, or None when the mask is
    more than causal (padding, sliding window, packed sequences): then SDPA runs.

    A None mask is SDPA's "is_causal" case, top-left aligned, which transformers uses when the
    keys beyond the queries are unwritten cache slots (a static cache's first prefill): only the
    first q_len keys are real. A given mask must be exactly the bottom-right causal one.
    """
    import torch

    if mask is None:
        return q_len
    if mask.dim() != 4 or mask.shape[-2] != q_len or mask.shape[-1] != kv_len:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return kv_len if bool((allowed == want).all()) else None
