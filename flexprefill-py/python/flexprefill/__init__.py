"""FlexPrefill: context-aware sparse attention for the prefill of long prompts.

>>> import numpy as np, flexprefill
>>> q = np.random.randn(1, 4096, 8, 64).astype(np.float32)
>>> k = v = np.random.randn(1, 4096, 2, 64).astype(np.float32)
>>> out, report = flexprefill.flex_prefill_attention(q, k, v, gamma=0.9, return_report=True)

See ``docs/PYTHON.md`` for the full API; ``flexprefill.transformers.register()`` plugs it into
Hugging Face transformers models.
"""

from ._api import flex_prefill_attention, flex_prefill_varlen
from ._errors import DeviceError, FlexPrefillError, InvalidInputError
from ._native import __version__, empty_cache
from .report import HeadReport, SparsityReport, Timings

__all__ = [
    "flex_prefill_attention",
    "flex_prefill_varlen",
    "FlexPrefillError",
    "InvalidInputError",
    "DeviceError",
    "empty_cache",
    "SparsityReport",
    "HeadReport",
    "Timings",
    "__version__",
]
