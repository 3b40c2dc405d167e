"""In-place, group-aware primitives for training-time pruning (Soft Filter Pruning, RePr).

They act on every parameter slice a channel owns across its coupled group (producer rows, norm
parameters, consumer columns), so masking a channel of a residual stage masks it everywhere.

    plan = plan_pruning(net, "l2", (x,))
    saved = mask_units(plan, roots)            # zero every slice of the channels
    silence_units(plan, roots)                 # SFP: output exactly 0, yet free to regrow
    regrow_units(plan, saved)                  # put the old values back
    reinit_orthogonal(plan, roots)             # RePr: fresh filters orthogonal to the kept ones
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import PruningError
from ..graph import reparam
from ..graph.ops import spec_of
from .dependency import Axis, owner_of
from .groups import param_of
from .masks import chosen_units
from .prune import PruningPlan

Saved = Dict[Tuple[str, str, int], Tuple[torch.Tensor, torch.Tensor]]


def _editable(plan: PruningPlan, ax: Axis) -> None:
    """These primitives edit parameter slices in place: a weight computed from g and v (or orig and mask)
    has none to edit."""
    owner, attr = owner_of(plan.net, plan.net.node(ax.node).module, ax.attr)
    kind = reparam.computed_weights(owner).get(attr, ("",))[0]
    if kind:
        how, undo = (("a torch.nn.utils.prune mask", f"torch.nn.utils.prune.remove(module, {attr!r})") if kind == "mask"
                     else ("weight_norm", f"torch.nn.utils.parametrize.remove_parametrizations(module, {attr!r})"))
        raise PruningError(f"layer {ax.node!r} computes its {attr} by {how}, which the in-place SFP/RePr "
                           f"primitives cannot edit; remove it first ({undo}) or pass it in ignore=")


def _slices(plan: PruningPlan, roots: np.ndarray) -> Iterator[Tuple[Tuple[str, str, int], torch.Tensor, torch.Tensor]]:
    """(key, parameter, positions along its axis) for every axis touching the given units, each once."""
    chosen = chosen_units(plan, roots)
    seen = set()
    for ax in plan.analysis.axes:
        pos = np.flatnonzero(chosen[plan.roots[ax.vec]])
        if not len(pos):
            continue
        _editable(plan, ax)
        module_key = plan.net.node(ax.node).module
        p = param_of(plan.net, module_key, ax.attr)
        key = (module_key, ax.attr, ax.dim)
        if (id(p), ax.dim) in seen or ax.attr.endswith(("running_mean", "running_var")):
            continue
        seen.add((id(p), ax.dim))
        yield key, p, torch.from_numpy(pos)


def mask_units(plan: PruningPlan, roots: np.ndarray) -> Saved:
    """Zero the units' slices in `plan.net` (in place); returns what was there, for `regrow_units`."""
    saved: Saved = {}
    with torch.no_grad():
        for key, p, pos in _slices(plan, roots):
            saved[key] = (pos, p.data.index_select(key[2], pos).clone())
            p.data.index_fill_(key[2], pos, 0)
    return saved


def _role(module: nn.Module) -> Optional[str]:
    spec = spec_of(module)
    return spec.get("role") if spec is not None else None


def silence_units(plan: PruningPlan, roots: np.ndarray) -> List[str]:
    """Make the units output exactly 0 while leaving them trainable (Soft Filter Pruning).

    Zeroes what *produces* each channel: output rows and biases of ops whose registry role is
    "producer" (conv, linear), the columns of "embedding" ops, and the bias and running mean of "norm" ops, so a conv-BN channel
    evaluates to exactly 0 and a later hard prune of the same units computes the same function. Norm scales and consumer columns are kept: zeroing them
    would cut the gradient a silenced filter needs to regrow. Returns the layers touched.
    """
    chosen = chosen_units(plan, roots)
    touched: List[str] = []
    with torch.no_grad():
        for ax in plan.analysis.axes:
            pos = np.flatnonzero(chosen[plan.roots[ax.vec]])
            if not len(pos):
                continue
            _editable(plan, ax)
            key = plan.net.node(ax.node).module
            module = plan.net.network[key]
            idx = torch.from_numpy(pos)
            role = _role(module)
            if role == "norm":
                if ax.attr in ("bias", "running_mean"):
                    param_of(plan.net, key, ax.attr).data.index_fill_(ax.dim, idx, 0)
                elif ax.attr == "weight" and getattr(module, "running_mean", None) is not None:
                    module.running_mean.index_fill_(0, idx, 0)
            elif role == "embedding":
                if ax.attr == "weight" and ax.dim == 1:
                    param_of(plan.net, key, ax.attr).data.index_fill_(1, idx, 0)
                    touched.append(ax.node) if ax.node not in touched else None
            elif role == "producer":
                if (ax.attr == "weight" and ax.dim == 0) or ax.attr == "bias":
                    param_of(plan.net, key, ax.attr).data.index_fill_(ax.dim, idx, 0)
                    if ax.attr == "weight" and ax.node not in touched:
                        touched.append(ax.node)
    return touched


def regrow_units(plan: PruningPlan, saved: Saved) -> None:
    """Restore slices saved by `mask_units`."""
    with torch.no_grad():
        for (module_key, attr, dim), (pos, values) in saved.items():
            param_of(plan.net, module_key, attr).data.index_copy_(dim, pos, values)


def _orthogonal_rows(kept: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random rows orthogonal to the rows of `kept` (and to each other), scaled like them."""
    dim = kept.shape[1]
    if kept.shape[0] + count > dim:
        raise PruningError(f"cannot make {count} filters orthogonal to {kept.shape[0]} kept ones in {dim} dims")
    rand = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    if kept.shape[0]:
        q, _ = torch.linalg.qr(kept.double().T)  # basis of the kept filters' span
        rand = rand - (rand @ q) @ q.T
    q2, _ = torch.linalg.qr(rand.T)
    scale = kept.norm(dim=1).mean() if kept.shape[0] else torch.tensor(1.0)
    return (q2.T[:count] * scale).to(kept.dtype)


def reinit_orthogonal(plan: PruningPlan, roots: np.ndarray, seed: int = 0) -> List[str]:
    """RePr: re-initialise the units' producer filters orthogonally to the kept filters of the same layer;
    other slices of the units (norm params, consumer columns) are zeroed so the fresh filters start silent
    downstream. Returns the layers whose filters were re-initialised."""
    gen = torch.Generator().manual_seed(seed)
    done: List[str] = []
    with torch.no_grad():
        for key, p, pos in _slices(plan, roots):
            module_key, attr, dim = key
            if attr == "weight" and dim == 0 and p.dim() > 1:
                flat = p.data.reshape(p.shape[0], -1)
                keep = torch.ones(p.shape[0], dtype=torch.bool)
                keep[pos] = False
                flat[pos] = _orthogonal_rows(flat[keep], len(pos), gen)
                done.append(module_key)
            elif attr == "bias":
                p.data.index_fill_(0, pos, 0)
    return done


def unit_roots(plan: PruningPlan, group_index: int, units: Optional[List[int]] = None) -> np.ndarray:
    """Roots of some units of one group (all of them by default), for the functions above."""
    g = plan.groups[group_index]
    return g.units if units is None else g.units[np.asarray(units, dtype=np.int64)]
