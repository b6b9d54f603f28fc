"""What each LLM role reports to the metrics after a round (:class:`~recloop.contracts.StageReport`s,
snapshotted by the loop into the cycle record; :mod:`.collectors` and :mod:`.profile_metrics` read them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recloop.contracts import StageReport

__all__ = ["AugmenterReport", "ProfilerReport", "RankerReport"]


@dataclass(frozen=True)
class AugmenterReport(StageReport):
    """R1: the last generation round (``seq``, ``step``, generation ``stats``) and the phantom flags."""

    last: Mapping[str, Any]
    phantom: np.ndarray  # phantom[i]: item i is a phantom (hallucinated) item


@dataclass(frozen=True)
class RankerReport(StageReport):
    """R3: this cycle's re-ranking record (users served, positions, ranks, base and LLM top-k) and totals."""

    cycle: Mapping[str, Any]
    served_total: int
    fallbacks_total: int


@dataclass(frozen=True)
class ProfilerReport(StageReport):
    """R2: the last refreshes, the demographic-probe settings and a read-only rank-shift probe."""

    reports: tuple[Mapping[str, Any], ...]
    demographic_probe: Any
    rank_shift: Callable[[np.ndarray, int, int], float]
