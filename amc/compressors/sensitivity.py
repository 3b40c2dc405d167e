"""Per-group sensitivity: how far the network's output moves when one group alone is pruned (issue 22).

A latency budget spent only by milliseconds per MAC goes where channels are cheap to time, not where the
network can afford to lose them: a ViT's residual width touches every node (so it buys the most time)
and is the one dim it cannot spare. Here each group is pruned alone at a few ratios, BatchNorm is
re-estimated on the calibration batches (as the final network will be), and the output's squared error
relative to the unpruned output's energy is read on the same batches. `layer_latency.allocate` then
spends the budget where the predicted time saved per unit of added distortion is largest: Li et al.'s
per-layer sensitivity analysis (2017) and NetAdapt's empirical per-layer choice, without fine-tuning.
Labels are not needed, so a user's unlabelled calibration images are enough.

Measured against the capacity cost at equal latency (scripts/bench_latency_budget.py, its "sensitivity"
row): level on the Fashion-MNIST ViT at batch 32, behind on resnet50_fashion and MobileNetV2 at batch 1,
and minutes slower (one pruned network per group and ratio). The one-group-at-a-time numbers do not add
up when every group is cut at once, so `amc.prune` does not offer it; it stays here for that benchmark.
The whole-network distortion does serve `amc.prune(latency_allocation="auto")`: `least_distorted` keeps,
of allocations that already meet one budget, the one closest to the original.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch

from .._modes import training_mode
from ..errors import DataError
from ..export.onnx_io import tensor_leaves
from .groups import select_units

GRID = (0.25, 0.5, 0.75)


def _tensors(out: Any) -> List[torch.Tensor]:
    return [t.detach().float() for t in tensor_leaves(out)]


def _inputs(batches: Iterable[Any]) -> List[torch.Tensor]:
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not xs:
        raise DataError("calibration batches needed: the loader yielded none; pass a DataLoader "
                        "over a few hundred training images (labels are not read)")
    return xs


def _reference(net: torch.nn.Module, xs: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
    """`net`'s outputs on `xs` in eval mode; its (maybe the caller's) training flags come back after."""
    with training_mode(net), torch.no_grad():
        return [_tensors(net(x)) for x in xs]


def distortion(net: torch.nn.Module, xs: Sequence[torch.Tensor], ref: Sequence[List[torch.Tensor]]) -> float:
    """Squared error of `net`'s outputs against `ref`, relative to the reference outputs' energy."""
    err = energy = 0.0
    with torch.no_grad():
        for x, r in zip(xs, ref):
            for a, b in zip(_tensors(net(x)), r):
                err += float(((a - b) ** 2).sum())
                energy += float((b ** 2).sum())
    return err / max(energy, 1e-30)


def least_distorted(original: torch.nn.Module, candidates: Dict[str, torch.nn.Module], batches: Iterable[Any]
                    ) -> Tuple[str, Dict[str, float]]:
    """The candidate whose outputs stay closest to `original`'s on `batches` once BatchNorm is re-estimated
    on them (on copies: the candidates come back untouched), and every candidate's distortion. Picks between
    allocations that already meet the same budget (`latency_allocation="auto"`)."""
    from ..trainers import recalibrate_bn

    if not candidates:
        raise DataError("least_distorted needs at least one candidate network")
    xs = _inputs(batches)
    ref = _reference(original, xs)
    scores = {k: distortion(recalibrate_bn(net, [(x,) for x in xs]), xs, ref) for k, net in candidates.items()}
    return min(scores, key=scores.get), scores  # a tie keeps the first candidate


def group_sensitivity(plan: Any, batches: Iterable[Any], grid: Sequence[float] = GRID) -> Dict[int, List[float]]:
    """For each prunable group: the output distortion with that group alone pruned at each ratio of `grid`
    (the plan's scores pick the channels, BatchNorm re-estimated on `batches`)."""
    from ..trainers import recalibrate_bn

    xs = _inputs(batches)
    ref = _reference(plan.net, xs)
    out: Dict[int, List[float]] = {}
    for g in plan.groups:
        if not g.size or g.multiple_of == 0:
            continue
        values = []
        for r in grid:
            units = select_units(g, plan.importance[g.id], r)
            if not len(units):
                values.append(values[-1] if values else 0.0)
                continue
            net = recalibrate_bn(plan.apply_units(units, "hard"), [(x,) for x in xs], copy=False)
            values.append(distortion(net, xs, ref))
        out[g.id] = values
    return out


def curve(values: Sequence[float], grid: Sequence[float] = GRID) -> Callable[[float], float]:
    """Piecewise-linear, non-decreasing sensitivity through (0, 0) and the measured points, extended past
    the last ratio with the last segment's slope."""
    xs = np.array([0.0, *grid], dtype=float)
    ys = np.maximum.accumulate(np.array([0.0, *values], dtype=float))
    slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)

    def f(r: float) -> float:
        if r <= xs[-1]:
            return float(np.interp(r, xs, ys))
        return float(ys[-1] + slope * (r - xs[-1]))
    return f
