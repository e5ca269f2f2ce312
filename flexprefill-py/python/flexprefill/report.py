"""What FlexPrefill decided in one call: per (sequence, head) pattern, density and mass."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class HeadReport:
    """One (sequence, head)'s decision."""

    seq: int
    head: int
    #: ``"query_aware"``, ``"vertical_slash"`` or ``"dense"``.
    pattern: str
    #: sqrt-JS distance between the pooled estimate and the true block distribution (NaN for
    #: dense heads).
    js_distance: float
    selected_blocks: int
    causal_blocks: int
    #: selected_blocks / causal_blocks.
    density: float
    #: Share of the representative queries' attention inside the chosen blocks (1 for dense).
    estimated_mass: float


@dataclass(frozen=True)
class Timings:
    """Host wall-clock split of the call, in seconds."""

    pattern_search: float
    index_build: float
    attention: float
    #: The whole native call: input checks, pattern search, index build and attention (what a
    #: Rust caller of the backend would measure; the rest of a Python call is binding overhead).
    call: float


@dataclass(frozen=True)
class SparsityReport:
    """Everything FlexPrefill decided in one call (``return_report=True``)."""

    #: ``"cpu"`` or ``"cuda"``.
    backend: str
    #: One entry per (sequence, head), sequence-major.
    heads: Tuple[HeadReport, ...]
    #: Why the call ran dense (e.g. a sequence shorter than ``min_budget``), or None.
    dense_fallback: Optional[str]
    timings: Timings

    @property
    def density(self) -> float:
        """Selected over causal blocks, over all heads."""
        causal = sum(h.causal_blocks for h in self.heads)
        return 1.0 if causal == 0 else sum(h.selected_blocks for h in self.heads) / causal

    @property
    def patterns(self) -> Dict[str, int]:
        """Heads per pattern."""
        return dict(Counter(h.pattern for h in self.heads))

    def to_dict(self) -> Dict[str, Any]:
        """Plain dicts and lists (JSON-ready), with the overall density added."""
        d = dataclasses.asdict(self)
        d["heads"] = list(d["heads"])
        d["density"] = self.density
        return d

    def __repr__(self) -> str:
        return (
            f"SparsityReport(backend={self.backend!r}, heads={len(self.heads)}, "
            f"density={self.density:.3f}, patterns={self.patterns}, "
            f"dense_fallback={self.dense_fallback!r})"
        )

    @classmethod
    def _from_native(cls, d: Dict[str, Any]) -> "SparsityReport":
        return cls(
            backend=d["backend"],
            heads=tuple(HeadReport(*h) for h in d["heads"]),
            dense_fallback=d["dense_fallback"],
            timings=Timings(**d["timings"]),
        )
