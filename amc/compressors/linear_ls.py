"""Least-squares reconstruction of pruned Linear layers (the ChannelPruning idea, for transformers).

After channels are chosen and removed (`plan.apply_units`), every Linear that lost INPUT features
(an attention output projection after head dims went, an MLP down-projection after hidden units
went) is refitted so that, on calibration inputs, its output from the PRUNED network's activations
matches the ORIGINAL network's output at the same layer:

    plan = plan_pruning(net, "l2")
    roots = plan.pruned_roots(ratio_for_macs(plan, 0.5))
    small = plan.apply_units(roots)
    errors = refit_linears(plan, roots, small, calib_inputs, row_mask=attention_mask.bool())

Layers are refitted in execution order in one pass of the pruned network (a forward pre-hook fits
each layer on the inputs it is about to receive, so later layers see corrected inputs and errors do
not accumulate), with the same ridge least squares as `ChannelPruning` (`fit_layer`). `row_mask`
([N, T] bool, e.g. the attention mask) keeps padding tokens out of the fit.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PruningError
from ..graph.network import ReconstructedNetwork
from .refit import fit_layer, relative_error
from .prune import PruningPlan
from .sampling import hooked_pass

Inputs = Union[Sequence[Any], Mapping[str, Any]]

__all__ = ["output_energy_scores", "refit_linears", "shrunk_linears"]


def _rows(x: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[R, F] rows of a Linear's input or output; `row_mask` selects tokens when it matches x[..., 0]."""
    if row_mask is not None and tuple(x.shape[:-1]) == tuple(row_mask.shape):
        return x[row_mask]
    return x.reshape(-1, x.shape[-1])


def shrunk_linears(original: ReconstructedNetwork, pruned: ReconstructedNetwork) -> Tuple[str, ...]:
    """Names of the Linear layers of `pruned` that have fewer input features than in `original`."""
    names = []
    for node in pruned.layer_nodes:
        m = pruned.module_of(node.name) if node.op == "Linear" else None
        if isinstance(m, nn.Linear):
            m0 = original.module_of(node.name)
            if m.in_features < m0.in_features:
                names.append(node.name)
    return tuple(names)


def _kept(plan: PruningPlan, node: str, pruned_roots: np.ndarray, dim: int) -> Optional[np.ndarray]:
    """Kept positions along `dim` of `node`'s weight (None: all), from the plan's weight axes."""
    mask = np.zeros(len(plan.roots), dtype=bool)
    mask[pruned_roots] = True
    for ax in plan.analysis.axes:
        if ax.node == node and ax.attr == "weight" and ax.dim == dim:
            keep = ~mask[plan.roots[ax.vec]]
            return None if keep.all() else np.flatnonzero(keep)
    return None


def _observe(net: ReconstructedNetwork, inputs: Inputs, names: Sequence[str], fn: Any) -> None:
    """Run `net` on `inputs` up to the last named layer, calling fn(name, module, args) before each."""
    hooked_pass(net, inputs, {n: functools.partial(fn, n) for n in names}, pre=True)


def refit_linears(plan: PruningPlan, pruned_roots: np.ndarray, pruned: ReconstructedNetwork, inputs: Inputs,
                  row_mask: Optional[torch.Tensor] = None, ridge: float = 1e-3,
                  layers: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, float]]:
    """Refit `pruned`'s Linears in place so they reproduce `plan.net`'s outputs on `inputs`.

    layers: which Linear nodes (default: those whose input features were pruned, `shrunk_linears`).
    Returns {layer: {"before": e, "after": e}}, the relative squared output error on the
    calibration rows before and after the fit.
    """
    original = plan.net
    names = tuple(layers) if layers is not None else shrunk_linears(original, pruned)
    for n in names:
        if not isinstance(pruned.module_of(n), nn.Linear):
            raise PruningError(f"refit_linears: {n!r} is not a Linear layer of the pruned network; pass Linear "
                               f"node names such as {list(shrunk_linears(original, pruned))[:3]}")
    if not names:
        return {}
    order = [node.name for node in pruned.layer_nodes if node.name in set(names)]
    targets: Dict[str, torch.Tensor] = {}

    def grab(name: str, module: nn.Module, args: tuple) -> None:
        targets[name] = _rows(F.linear(args[0], module.weight, module.bias), row_mask).cpu()

    _observe(original, inputs, order, grab)
    roots = np.asarray(pruned_roots, dtype=np.int64)
    errors: Dict[str, Dict[str, float]] = {}

    def fit(name: str, module: nn.Module, args: tuple) -> None:
        xs = _rows(args[0], row_mask)
        keep, keep_in = _kept(plan, name, roots, 0), _kept(plan, name, roots, 1)
        n_in = module.in_features if keep_in is None else len(keep_in)
        if keep_in is not None and n_in != module.in_features or keep_in is None and \
                module.in_features != plan.net.module_of(name).in_features:
            raise PruningError(f"refit_linears: layer {name!r} has {module.in_features} inputs but pruned_roots "
                               f"keep {n_in}; pass the pruned_roots the network was pruned with")
        y = targets[name] if keep is None else targets[name][:, torch.from_numpy(keep)]
        y = y.to(xs.device)
        if y.shape[1] != module.out_features or y.shape[0] != xs.shape[0]:
            raise PruningError(f"refit_linears: layer {name!r} has {module.out_features} outputs and "
                               f"{xs.shape[0]} rows but the original gives {list(y.shape)}; pass the "
                               "pruned_roots the network was pruned with")
        w0 = module.weight.detach()
        b0 = module.bias.detach() if module.bias is not None else None
        before = xs @ w0.T + (b0 if b0 is not None else 0)
        w, b = fit_layer(xs, y, w0, b0, ridge)
        module.weight.data.copy_(w.to(module.weight.dtype))
        if b is not None:
            module.bias.data.copy_(b.to(module.bias.dtype))
        after = xs @ module.weight.detach().T + (module.bias.detach() if module.bias is not None else 0)
        errors[name] = {"before": relative_error(before, y), "after": relative_error(after, y)}

    _observe(pruned, inputs, order, fit)
    return errors


def output_energy_scores(plan: PruningPlan, inputs: Inputs,
                         row_mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Data-driven unit scores for `plan.rescore`: how much each unit contributes to its consumers.

    A unit read by Linear layers scores sum_layer ||X_u||^2 ||W[:, u]||^2 / ||Y||^2 on the calibration
    rows (the diagonal of ChannelPruning's unit Gram matrix, i.e. its "max_response"); a unit no Linear
    reads (attention query/key dims, consumed by q @ k^T) scores the product of its producers'
    output norms, ||q_u|| ||k_u||. `row_mask` keeps padding tokens out, as in `refit_linears`.
    """
    net = plan.net
    linears = [n.name for n in net.layer_nodes if n.op == "Linear" and isinstance(net.module_of(n.name), nn.Linear)]
    x_sq: Dict[str, torch.Tensor] = {}
    y_sq: Dict[str, torch.Tensor] = {}

    def grab(name: str, module: nn.Module, args: tuple) -> None:
        x = _rows(args[0].detach(), row_mask).double()
        y = F.linear(x, module.weight.double(), None if module.bias is None else module.bias.double())
        x_sq[name] = x_sq.get(name, 0) + x.pow(2).sum(0)
        y_sq[name] = y_sq.get(name, 0) + y.pow(2).sum(0)

    _observe(net, inputs, linears, grab)
    scores = []
    for g in plan.groups:
        consumed = torch.zeros(g.size, dtype=torch.float64)
        produced = torch.ones(g.size, dtype=torch.float64)
        n_consumers = 0
        for m in g.members:
            ax = m.axis
            if ax.node not in x_sq or ax.attr != "weight":
                continue
            idx = torch.from_numpy(m.unit_index)
            ok = idx >= 0
            w = net.module_of(ax.node).weight.detach().double()
            if ax.dim == 1:
                per_col = x_sq[ax.node] * w.pow(2).sum(0) / y_sq[ax.node].sum().clamp_min(1e-30)
                consumed.index_add_(0, idx[ok], per_col[ok])
                n_consumers += 1
            elif ax.dim == 0:
                per_row = torch.zeros(g.size, dtype=torch.float64).index_add_(0, idx[ok], y_sq[ax.node][ok])
                produced *= per_row.sqrt() / per_row.sqrt().mean().clamp_min(1e-30)
        scores.append(consumed if n_consumers else produced)
    return scores
