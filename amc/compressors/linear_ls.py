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

import contextlib
import functools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PruningError
from ..graph import reparam
from ..graph.network import ReconstructedNetwork
from ..graph.template import Ref
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


def residual_partner(net: ReconstructedNetwork, name: str) -> Optional[str]:
    """The node whose output is added to `name`'s in a residual sum (`x + dropout(dense(h))`, BERT's and
    timm's blocks), or None: followed through Dropout/Identity to a single ElemAdd of two tensors."""
    users: Dict[str, List[Any]] = {}
    for n in net.layer_nodes:
        for a in n.args:
            if isinstance(a, Ref):
                users.setdefault(a.node, []).append(n)
    cur = name
    for _ in range(4):
        us = users.get(cur, [])
        if len(us) != 1:
            return None
        if us[0].op == "ElemAdd":
            other = [a for a in us[0].args if isinstance(a, Ref) and a.node != cur]
            tensors = [a for a in us[0].args if isinstance(a, Ref)]
            return other[0].node if len(other) == 1 and len(tensors) == 2 and not other[0].path else None
        if us[0].op not in ("Dropout", "Identity"):
            return None
        cur = us[0].name
    return None


def refit_linears(plan: PruningPlan, pruned_roots: np.ndarray, pruned: ReconstructedNetwork, inputs: Inputs,
                  row_mask: Optional[torch.Tensor] = None, ridge: float = 1e-3,
                  layers: Optional[Iterable[str]] = None, residual: bool = False) -> Dict[str, Dict[str, float]]:
    """Refit `pruned`'s Linears in place so they reproduce `plan.net`'s outputs on `inputs`.

    layers: which Linear nodes (default: those whose input features were pruned, `shrunk_linears`).
    residual: for a Linear whose output is added to a residual stream, fit what the ORIGINAL sum needs
      given the residual the PRUNED network carries there (target = y + r_original - r_pruned), so each
      refit also absorbs the error upstream layers left in the stream (MiniLM at 0.5x MACs: embedding
      cosine 0.857 -> 0.870).
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

    partners = {n: residual_partner(original, n) for n in order} if residual else {}
    layer_names = {n.name for n in original.layer_nodes}
    # a stream that is the network's own input is the same in both networks: nothing to correct
    partners = {n: p for n, p in partners.items() if p in layer_names}
    streams: Dict[str, Dict[str, torch.Tensor]] = {"original": {}, "pruned": {}}

    def keep_stream(which: str, node: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            streams[which][node] = _rows(out.detach(), row_mask).cpu()
        return hook

    with _stream_hooks(original, set(partners.values()), keep_stream, "original"):
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
        y = targets[name]
        if name in partners:  # what the original sum needs, given the stream the pruned net carries
            y = y + streams["original"][partners[name]]
        y = y if keep is None else y[:, torch.from_numpy(keep)]
        if name in partners:
            y = y - streams["pruned"][partners[name]].to(y.dtype)
        y = y.to(xs.device)
        if y.shape[1] != module.out_features or y.shape[0] != xs.shape[0]:
            raise PruningError(f"refit_linears: layer {name!r} has {module.out_features} outputs and "
                               f"{xs.shape[0]} rows but the original gives {list(y.shape)}; pass the "
                               "pruned_roots the network was pruned with")
        w0 = module.weight.detach()
        b0 = module.bias.detach() if module.bias is not None else None
        before = xs @ w0.T + (b0 if b0 is not None else 0)
        w, b = fit_layer(xs, y, w0, b0, ridge)
        reparam.assign(module, "weight", w.to(module.weight.dtype))  # a weight-normed one through g and v
        if b is not None:
            module.bias.data.copy_(b.to(module.bias.dtype))
        after = xs @ module.weight.detach().T + (module.bias.detach() if module.bias is not None else 0)
        errors[name] = {"before": relative_error(before, y), "after": relative_error(after, y)}

    with _stream_hooks(pruned, set(partners.values()), keep_stream, "pruned"):
        _observe(pruned, inputs, order, fit)
    return errors


@contextlib.contextmanager
def _stream_hooks(net: ReconstructedNetwork, nodes: Iterable[str], make: Callable[..., Any], which: str) -> Iterator[None]:
    """Forward hooks that keep the residual streams' values while `_observe` runs."""
    handles = [net.module_of(n).register_forward_hook(make(which, n)) for n in nodes]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
