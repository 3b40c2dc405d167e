"""The one MACs-budget search: the smallest setting whose cost fits a budget.

Every budget in amc is met the same way: one knob (a uniform pruning ratio, a channel fraction, a
low-rank compress ratio, a Lagrange multiplier) makes the network cheaper as it grows, and the search
wants the mildest setting that is cheap enough. Cost is a step function of the knob (channel counts and
ranks are integers), so bisection on "fits or not" is exact where a numeric solve would not be.

    ratio = smallest_within_budget(lambda r: macs_of(prune_at(r)), target, hi=0.99, tol=0.002)

Budgets count MACs per sample: `per_sample(inputs)` is what they are counted on.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch

__all__ = ["smallest_within_budget", "per_sample"]


class WholeInputs(tuple):
    """Example inputs whose dim 0 is no batch (a graph's nodes, with edge indices into them): their one
    sample is all of them."""


def per_sample(inputs: Sequence[Any]) -> Tuple[Any, ...]:
    """The first example of every batched input: budgets count MACs per sample (and one example is the
    cheapest run that checks a network still works); `WholeInputs` as they are."""
    if isinstance(inputs, WholeInputs):
        return tuple(inputs)
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 1 else x for x in inputs)


def smallest_within_budget(cost: Callable[[float], float], budget: float, hi: float, tol: float = 0.0,
                           max_steps: int = 200) -> float:
    """The smallest x in [0, hi] with `cost(x) <= budget`, for a cost that never grows with x; to within
    `tol` (0: to float precision), in at most `max_steps` halvings.

    The caller has checked that `cost(hi)` fits (and words the error when it does not): `hi` is returned
    as it is when nothing smaller fits."""
    lo = 0.0
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        if hi - lo <= tol or not lo < mid < hi:
            break
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi
