"""Give back what `round_to` took: a uniform ratio plus rounding can land far under a MACs budget.

With `round_to=8` every group's kept count jumps in steps of 8 at once, so the mildest uniform ratio
that fits a budget can keep much less than asked (a 96-wide ViT at `target_macs=0.75`: 0.59x). Here the
groups win back one rounding step at a time, round-robin, while the network still fits the budget, so
the result lands near the budget with every kept count still a multiple of `round_to`.
"""
from __future__ import annotations

import functools
from typing import Callable, List

import numpy as np

from .groups import Group, keep_counts, select_units

__all__ = ["slack_ratios", "spend_rounding_slack", "units_at"]


def milder_ratio(group: Group, ratio: float) -> float:
    """The largest ratio below `ratio` at which `group` prunes fewer units (0 if none does)."""
    pruned = keep_counts(group, ratio)
    r = ratio
    while r > 0:
        r = max(0.0, r - 1.0 / max(group.size, 1))
        if keep_counts(group, r) < pruned:
            # the largest such r: step back up by the finest resolution that keeps the count lower
            hi = r + 1.0 / max(group.size, 1)
            for _ in range(30):
                mid = (r + hi) / 2
                r, hi = (mid, hi) if keep_counts(group, mid) < pruned else (r, mid)
            return r
    return 0.0


def units_at(plan, ratios: List[float]) -> np.ndarray:
    """The units `plan` prunes with one ratio per group (its importance picks them)."""
    chosen = [select_units(g, imp, r) for g, imp, r in zip(plan.groups, plan.importance or [], ratios) if r > 0]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def spend_rounding_slack(plan, ratio: float, cost: Callable[[np.ndarray], float], budget: float,
                         tol: float = 0.005) -> np.ndarray:
    """The pruned units of `plan` at the uniform `ratio`, then each group (round-robin, the group whose
    step adds the most cost first) pruned one rounding step less while `cost(units) <= budget`, until
    the cost is within `tol` of the budget; returns the units to prune."""
    return units_at(plan, slack_ratios(plan, ratio, cost, budget, tol))


def slack_ratios(plan, ratio: float, cost: Callable[[np.ndarray], float], budget: float,
                 tol: float = 0.005) -> List[float]:
    """Per-group ratios of `spend_rounding_slack` (a compressor that picks its own units, e.g. by LASSO,
    prunes by the counts these give: a group's cost depends on how many units go, not which).
    A group whose step no longer fits is done: the others only grow, so its step only gets dearer."""
    ratios: List[float] = [ratio] * len(plan.groups)
    units = functools.partial(units_at, plan)
    open_groups = [i for i, g in enumerate(plan.groups) if keep_counts(g, ratio) > 0]
    spent = cost(units(ratios))
    if spent < (1.0 - tol) * budget:  # the dearest steps first (compute-dense layers), the cheap ones fill up
        after_step = {i: cost(units([milder_ratio(plan.groups[i], r) if j == i else r for j, r in enumerate(ratios)]))
                      for i in open_groups}
        open_groups.sort(key=lambda i: -after_step[i])
    while open_groups and spent < (1.0 - tol) * budget:
        still = []
        for i in open_groups:
            trial = list(ratios)
            trial[i] = milder_ratio(plan.groups[i], ratios[i])
            c = cost(units(trial))
            if c <= budget:
                ratios, spent = trial, c
                if keep_counts(plan.groups[i], ratios[i]) > 0:
                    still.append(i)
            if spent >= (1.0 - tol) * budget:
                break
        open_groups = still
    return ratios
