"""Apply a pruning decision: soft (0/1 masks, shapes kept) or hard (channels physically removed).

Both work on a copy. Parameters are sliced (hard) or zeroed (soft) axis by axis; then every edit the
channel rules asked for runs (each defined beside its rule in `amc.compressors.rules`) and every touched
module is resized by its op entry. Soft pruning is exact, not approximate: layers that mix channels
non-linearly (LayerNorm) are swapped for mask-aware versions and attention keeps its original scale, so
soft and hard pruning compute the same function. That equality is what the tests check.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Set, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import PruningError
from ..graph.network import ReconstructedNetwork
from ..graph.reparam import layout_of
from ..export.json_io import register_json_op
from ..graph.ops import spec_of
from ..graph import reparam
from .dependency import Analysis, owner_of, tensor_identity
from .rules.layers import (MaskedFunctionalLayerNorm, MaskedFunctionalRMSNorm,  # noqa: F401 - soft-pruned nets
                           MaskedGroupNorm, MaskedLayerNorm)
from .rules.reductions import MaskedReduction, MaskedSoftmax, MaskedStatistics  # noqa: F401 - soft-pruned nets

# the modules soft pruning swaps in: the safe loaders accept them
SOFT_MODULES = (MaskedLayerNorm, MaskedFunctionalLayerNorm, MaskedFunctionalRMSNorm, MaskedGroupNorm, MaskedReduction,
                MaskedSoftmax, MaskedStatistics)



def _from_keep_idx(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.register_buffer("keep_idx", tensors["keep_idx"])
    return m


# JSON for the masked norms that hold only their kept indices (MaskedLayerNorm/MaskedGroupNorm wrap a
# module: a soft network holding them is saved with pkl)
register_json_op(MaskedFunctionalLayerNorm, MaskedFunctionalRMSNorm, to_config=lambda m: {}, from_config=_from_keep_idx)

__all__ = ["apply", "SOFT_MODULES", "MaskedLayerNorm", "MaskedFunctionalLayerNorm", "MaskedFunctionalRMSNorm",
           "MaskedGroupNorm", "MaskedReduction", "MaskedSoftmax",
           "MaskedStatistics"]

KeepFn = Callable[[np.ndarray], np.ndarray]


def _keep_fn(roots: np.ndarray, pruned_roots: np.ndarray) -> KeepFn:
    mask = np.zeros(len(roots), dtype=bool)
    mask[pruned_roots] = True
    return lambda vec: ~mask[roots[vec]]


def apply(net: ReconstructedNetwork, a: Analysis, roots: np.ndarray, pruned_roots: np.ndarray,
          mode: str = "hard") -> ReconstructedNetwork:
    """A pruned copy of `net`: `mode="hard"` removes channels, `mode="soft"` zeroes them."""
    if mode not in ("hard", "soft"):
        raise PruningError(f"mode must be 'hard' or 'soft', got {mode!r}")
    keep_of = _keep_fn(roots, _never_empty(a, roots, np.asarray(pruned_roots, dtype=np.int64)))
    new = _copy_sharing_tensors(net) if mode == "hard" else net.copy()
    done: Set[Tuple[int, int]] = set()
    touched: Set[str] = set()
    divisors = _divisors(net) if mode == "soft" else set()
    for ax in a.axes:
        keep = keep_of(ax.vec)
        if keep.all():
            continue
        key_name = new.node(ax.node).module
        key = (tensor_identity(new, key_name, ax.attr), ax.dim)
        touched.add(key_name)  # a tensor shared with another layer (a tied lm_head) is sliced once, both resized
        if key in done:
            continue
        done.add(key)
        owner, attr = owner_of(new, key_name, ax.attr)
        if attr in reparam.computed_weights(owner):  # computed from g and v (orig and mask): edit those
            edit = reparam.select if mode == "hard" else reparam.zero
            edit(owner, attr, ax.dim, torch.from_numpy(np.flatnonzero(keep if mode == "hard" else ~keep)))
            continue
        p = getattr(owner, attr)
        if mode == "hard":
            p.data = p.data.index_select(ax.dim, torch.from_numpy(np.flatnonzero(keep))).contiguous(
                memory_format=layout_of(p.data))
        elif not ax.attr.endswith(("running_mean", "running_var")) and ax.node not in divisors:
            p.data.index_fill_(ax.dim, torch.from_numpy(np.flatnonzero(~keep)), 0)
    for fx in a.fixups:
        fx.edit(new, fx, keep_of, mode)
    if mode == "hard":
        for key_name in touched:
            _resize(new.network[key_name])
        _unshare(new, net)
    new.recompile()
    return new


T = torch.Tensor
# callable -> the argument it divides by (or takes the reciprocal of): a zero there is a 0 / 0
_DIVIDE_BY = {T.__truediv__: 1, T.__itruediv__: 1, T.div: 1, T.div_: 1, torch.div: 1, torch.true_divide: 1,
              T.__rtruediv__: 0, torch.reciprocal: 0, T.reciprocal: 0, torch.rsqrt: 0, T.rsqrt: 0}
_LAYOUT = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "permute", "transpose", "flatten",
           "contiguous", "to", "float", "double", "half", "getitem", "__getitem__"}


def _divisors(net: ReconstructedNetwork) -> Set[str]:
    """Tensor nodes (a parameter or buffer read in forward) that, through layout ops only, are divided by
    (`(h - self.mean) / self.std`): soft pruning leaves their pruned entries as they are, as it does a
    BatchNorm's running_var, since a zeroed channel there would be 0 / 0 = NaN in every later layer."""
    users = net.users()
    found: Set[str] = set()
    for node in net.layer_nodes:
        if node.op not in ("Parameter", "Constant"):
            continue
        frontier = [node.name]
        while frontier:
            name = frontier.pop()
            for user in users.get(name, ()):
                fn = getattr(net.network[user.module], "fn", None)
                slot = _DIVIDE_BY.get(fn) if fn is not None else None
                arg = user.args[slot] if slot is not None and slot < len(user.args) else None
                if getattr(arg, "node", None) == name:
                    found.add(node.name)
                elif getattr(fn, "__name__", "") in _LAYOUT and user.args and getattr(user.args[0], "node", None) == name:
                    frontier.append(user.name)
    return found


def _copy_sharing_tensors(net: ReconstructedNetwork) -> ReconstructedNetwork:
    """A deep copy whose parameters and buffers are new tensor objects over the original storage (no copy
    of the weights: the hard prune replaces what it slices, `_unshare` clones the rest)."""
    memo: Dict[int, Any] = {}
    for mod in net.network.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
        for b in mod._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.detach()
    return copy.deepcopy(net, memo)


def _unshare(new: ReconstructedNetwork, old: ReconstructedNetwork) -> None:
    """Clone every tensor of `new` still on `old`'s storage, so editing one never changes the other."""
    storages = {t.untyped_storage().data_ptr() for t in [*old.network.parameters(), *old.network.buffers()]
                if t.numel()}
    for mod in new.network.modules():
        for k, p in mod._parameters.items():
            if p is not None and p.numel() and p.data.untyped_storage().data_ptr() in storages:
                p.data = p.data.clone()
        for k, b in mod._buffers.items():
            if b is not None and b.numel() and b.untyped_storage().data_ptr() in storages:
                mod._buffers[k] = b.clone()


def _never_empty(a: Analysis, roots: np.ndarray, pruned_roots: np.ndarray) -> np.ndarray:
    """Spare one unit of every run of channels that must not vanish (a split piece, a sliced run such as
    FocalNet's `gates[:, L:]`) when all of its units were chosen: its first one stays."""
    for vec in a.nonempty:
        rv = roots[vec]
        if len(rv) and (rv != 0).all() and np.isin(rv, pruned_roots).all():
            pruned_roots = pruned_roots[pruned_roots != rv[0]]
    return pruned_roots


def _resize(m: nn.Module) -> None:
    """Make a module's size attributes agree with its sliced parameters (its op entry's `resize`)."""
    spec = spec_of(m)
    resize = spec.get("resize") if spec is not None else None
    if resize is not None:
        resize(m)
