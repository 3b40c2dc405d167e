"""Keep-masks of a pruning plan's channels, per layer, for code that must not read the plan's graph.

Training-time pruning (amc.trainers' SoftFilterPruning) reports which filters it silenced in each conv.
Which channel of which layer belongs to which unit is the plan's analysis (axes, unit roots, graph
nodes): compressor internals, so the question is answered here and the trainers stay graph-agnostic.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn as nn

from .prune import PruningPlan

__all__ = ["chosen_units", "channel_masks"]


def chosen_units(plan: PruningPlan, roots: np.ndarray) -> np.ndarray:
    """One bool per unit of `plan` (indexed like `plan.roots`), True for the units in `roots`."""
    chosen = np.zeros(len(plan.roots), dtype=bool)
    chosen[np.asarray(roots, dtype=np.int64)] = True
    return chosen


def channel_masks(plan: PruningPlan, roots: np.ndarray) -> Dict[str, torch.Tensor]:
    """`{conv node name: keep BoolTensor over its output channels}`, False where a channel is one of `roots`.

    Every nn.Conv2d whose output channels the plan can prune gets a mask, in graph order; the node
    names are the module paths of the traced model (`"layer1.0.conv1"`)."""
    chosen = chosen_units(plan, roots)
    masks: Dict[str, torch.Tensor] = {}
    for ax in plan.analysis.axes:
        if ax.attr == "weight" and ax.dim == 0 and isinstance(plan.net.module_of(ax.node), nn.Conv2d):
            masks[ax.node] = torch.from_numpy(~chosen[plan.roots[ax.vec]])
    return masks
