"""Bisect a pruning ratio to a MACs budget (for peers that take a ratio, not a budget)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple


def smallest_ratio_under(build: Callable[[float], Any], macs: Callable[[Any], float], budget: float,
                         steps: int = 10, close: float = 0.0) -> Tuple[Optional[Any], float, Optional[float]]:
    """(network, ratio, its MACs) for the smallest ratio in [0, 0.95] whose network keeps <= `budget`
    MACs, bisected `steps` times or until within `close` under it; (None, 0.95, None) if none does."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = build(mid)
        c = macs(m)
        if c <= budget:
            hi, best = mid, (m, c)
            if budget - c <= close:
                break
        else:
            lo = mid
    if best is None:
        m = build(hi)
        c = macs(m)
        best = (m, c) if c <= budget else None
    return (best[0], hi, best[1]) if best else (None, hi, None)
