"""Apply a pruning decision: soft (0/1 masks, shapes kept) or hard (channels physically removed).

Both work on a copy. Soft pruning is exact, not approximate: layers that mix channels non-linearly
(LayerNorm) are swapped for mask-aware versions and attention keeps its original scale, so soft and
hard pruning compute the same function. That equality is what the tests check.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PruningError
from ..graph.network import ReconstructedNetwork
from .dependency import Analysis, Fixup
from .groups import param_of

KeepFn = Callable[[np.ndarray], np.ndarray]
FIXUPS: Dict[str, Callable[[ReconstructedNetwork, Fixup, KeepFn, str], None]] = {}


def register_fixup(kind: str):
    def deco(fn):
        FIXUPS[kind] = fn
        return fn
    return deco


class MaskedLayerNorm(nn.Module):
    """LayerNorm over the kept channels only; pruned channels output 0 (soft pruning)."""

    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor):
        super().__init__()
        self.ln = ln
        self.register_buffer("keep_idx", torch.nonzero(keep).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.keep_idx
        w = self.ln.weight[idx] if self.ln.weight is not None else None
        b = self.ln.bias[idx] if self.ln.bias is not None else None
        y = torch.zeros_like(x)
        y[..., idx] = F.layer_norm(x[..., idx], (len(idx),), w, b, self.ln.eps)
        return y


class MaskedFunctionalLayerNorm(nn.Module):
    """`F.layer_norm` over the kept channels only (soft pruning of a traced-into LayerNorm)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep_idx", torch.nonzero(keep).flatten())

    def forward(self, x: torch.Tensor, normalized_shape: Any = None, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
        idx = self.keep_idx
        y = torch.zeros_like(x)
        y[..., idx] = F.layer_norm(x[..., idx], (len(idx),), None if weight is None else weight[idx],
                                   None if bias is None else bias[idx], eps)
        return y


def _keep_fn(roots: np.ndarray, pruned_roots: np.ndarray) -> KeepFn:
    mask = np.zeros(len(roots), dtype=bool)
    mask[pruned_roots] = True
    return lambda vec: ~mask[roots[vec]]


def apply(net: ReconstructedNetwork, a: Analysis, roots: np.ndarray, pruned_roots: np.ndarray,
          mode: str = "hard") -> ReconstructedNetwork:
    """A pruned copy of `net`: `mode="hard"` removes channels, `mode="soft"` zeroes them."""
    if mode not in ("hard", "soft"):
        raise PruningError(f"mode must be 'hard' or 'soft', got {mode!r}")
    keep_of = _keep_fn(roots, pruned_roots)
    new = net.copy()
    done: Set[Tuple[int, int]] = set()
    touched: Set[str] = set()
    for ax in a.axes:
        keep = keep_of(ax.vec)
        if keep.all():
            continue
        key_name = new.node(ax.node).module
        p = param_of(new, key_name, ax.attr)
        key = (id(p), ax.dim)
        if key in done:
            continue
        done.add(key)
        if mode == "hard":
            p.data = p.data.index_select(ax.dim, torch.from_numpy(np.flatnonzero(keep))).contiguous()
        elif not ax.attr.endswith(("running_mean", "running_var")):
            p.data.index_fill_(ax.dim, torch.from_numpy(np.flatnonzero(~keep)), 0)
        touched.add(key_name)
    for fx in a.fixups:
        FIXUPS[fx.kind](new, fx, keep_of, mode)
    if mode == "hard":
        for key_name in touched:
            _fix_module_attrs(new.network[key_name])
    new.recompile()
    return new


def _fix_module_attrs(m: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) parameters."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        elif m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            m.groups = m.in_channels = m.out_channels = w.shape[0]
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = (m.weight.shape[0],)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()


def _replace_const_sizes(templates: List[Any], out_dims: List[Any], keep_of: KeepFn) -> List[Any]:
    new = list(templates)
    for d, (t, vec) in enumerate(zip(templates, out_dims)):
        if vec is not None and isinstance(t, int) and not isinstance(t, bool) and t != -1:
            new[d] = int(keep_of(vec).sum())
    return new


@register_fixup("sizes")
def _fix_sizes(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    if mode != "hard":
        return
    node = net.node(fx.node)
    out_dims = fx.data["out_dims"]
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args[1] = type(args[1])(_replace_const_sizes(list(args[1]), out_dims, keep_of))
    elif len(args) > 1:
        args[1:] = _replace_const_sizes(args[1:], out_dims, keep_of)
    else:
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs[key] = tuple(_replace_const_sizes(list(node.kwargs[key]), out_dims, keep_of))
    node.args = tuple(args)


@register_fixup("split_size")
def _fix_split(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    node = net.node(fx.node)
    if mode == "hard" and len(node.args) > 1 and isinstance(node.args[1], int):
        node.args = (node.args[0], int(keep_of(fx.data["vec"]).sum())) + tuple(node.args[2:])


@register_fixup("layernorm")
def _fix_layernorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    key = net.node(fx.node).module
    ln = net.network[key]
    if mode == "hard":
        ln.normalized_shape = (int(keep.sum()),)
    elif not isinstance(ln, MaskedLayerNorm):
        net.network[key] = MaskedLayerNorm(ln, torch.from_numpy(keep))


@register_fixup("f_layernorm")
def _fix_f_layernorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    node = net.node(fx.node)
    if mode == "hard":
        args = list(node.args)
        if len(args) > 1:
            args[1] = (int(keep.sum()),)
        else:
            node.kwargs["normalized_shape"] = (int(keep.sum()),)
        node.args = tuple(args)
    else:
        net.network[node.module] = MaskedFunctionalLayerNorm(torch.from_numpy(keep))


@register_fixup("sdpa_scale")
def _fix_sdpa(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    if mode == "hard":
        net.node(fx.node).kwargs["scale"] = fx.data["scale"]  # head dims shrank: keep the original scale


def mha_inner_selection(m: nn.MultiheadAttention, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per head, the q/k dims and the v dims to keep (same count in every head, as MHA requires)."""
    E, H = m.in_proj_weight.shape[0] // 3, m.num_heads
    D = E // H
    if n_keep % H:
        raise PruningError(f"attention embed dim must stay a multiple of num_heads={H}, got {n_keep}")
    d_keep = n_keep // H
    w = m.in_proj_weight.detach().float()
    q, k, v = w[:E].view(H, D, -1), w[E:2 * E].view(H, D, -1), w[2 * E:].view(H, D, -1)
    qk = q.pow(2).sum(-1) + k.pow(2).sum(-1)
    vo = v.pow(2).sum(-1) + m.out_proj.weight.detach().float().view(-1, H, D).pow(2).sum(0)
    base = (torch.arange(H) * D).unsqueeze(1)
    qk_sel = (torch.sort(torch.argsort(qk, dim=1, descending=True, stable=True)[:, :d_keep], dim=1).values
              + base).flatten()
    v_sel = (torch.sort(torch.argsort(vo, dim=1, descending=True, stable=True)[:, :d_keep], dim=1).values
             + base).flatten()
    return qk_sel, v_sel, d_keep


@register_fixup("mha")
def _fix_mha(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    m: nn.MultiheadAttention = net.module_of(fx.node)
    E, H = m.in_proj_weight.shape[0] // 3, m.num_heads
    D = E // H
    qk_sel, v_sel, d_keep = mha_inner_selection(m, int(keep.sum()))
    rows = torch.cat([qk_sel, qk_sel + E, v_sel + 2 * E])
    if mode == "hard":
        scale = math.sqrt(d_keep / D)  # keep softmax(q.k / sqrt(D)) with the smaller head dim
        w = m.in_proj_weight.data[rows].clone()
        w[: len(qk_sel)] *= scale
        m.in_proj_weight.data = w
        if m.in_proj_bias is not None:
            b = m.in_proj_bias.data[rows].clone()
            b[: len(qk_sel)] *= scale
            m.in_proj_bias.data = b
        m.out_proj.weight.data = m.out_proj.weight.data[:, v_sel].contiguous()
        n = len(qk_sel)
        m.embed_dim = m.kdim = m.vdim = n
        m.head_dim = d_keep
        m.out_proj.in_features = n
        m.out_proj.out_features = m.out_proj.weight.shape[0]
    else:
        drop = torch.ones(3 * E, dtype=torch.bool)
        drop[rows] = False
        m.in_proj_weight.data[drop] = 0
        if m.in_proj_bias is not None:
            m.in_proj_bias.data[drop] = 0
        vdrop = torch.ones(E, dtype=torch.bool)
        vdrop[v_sel] = False
        m.out_proj.weight.data[:, vdrop] = 0
