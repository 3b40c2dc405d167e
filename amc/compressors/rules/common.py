"""Helpers the channel rules share: reading labels, broadcasting, where a size came from."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...graph.template import Ref
from ..dependency import TL, RuleCall, Vec, unlabeled_like

from .registry import opaque

T = torch.Tensor
# ----------------------------------------------------------------------------------------------
# helpers

def _tl(x: Any) -> Optional[TL]:
    return x if isinstance(x, TL) else None


def _dims_of(c: RuleCall, i: int, value: torch.Tensor) -> List[Vec]:
    tl = _tl(c.larg(i))
    return list(tl.dims) if tl is not None and tl.ndim == value.dim() else [None] * value.dim()


def arg_dims(c: RuleCall, i: int, name: str) -> Tuple[Any, List[Vec]]:
    """An argument given by position `i` or keyword `name` (`F.linear(x, weight=w)`), with its labels."""
    value = c.arg(i, name)
    if not isinstance(value, torch.Tensor):
        return value, []
    tl = _tl(c.larg(i, name))
    return value, list(tl.dims) if tl is not None and tl.ndim == value.dim() else [None] * value.dim()


def _out_tl(out: Any, dims: List[Vec]) -> Any:
    if isinstance(out, torch.Tensor) and out.dim() == len(dims):
        return TL(dims)
    return unlabeled_like(out)


def _first_tensor(c: RuleCall) -> Tuple[int, Optional[torch.Tensor]]:
    for i, v in enumerate(c.args):
        if isinstance(v, torch.Tensor):
            return i, v
    return -1, None


def passthrough(c: RuleCall) -> Any:
    """Same shape in and out, channel by channel (activations, dropout, casts, copies)."""
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    if isinstance(c.out, torch.Tensor) and c.out.dim() == x.dim():
        for d in range(x.dim()):
            if c.out.shape[d] != x.shape[d]:
                dims[d] = _freeze(c, dims[d])  # a channel dim whose size changes is not ours to follow
        return TL(dims)
    return opaque(c)


def _freeze(c: RuleCall, v: Vec) -> None:
    c.a.uf.freeze(v)
    return None


def _broadcast(c: RuleCall, items: Sequence[Tuple[List[Vec], Sequence[int]]], out_shape: Sequence[int]) -> List[Vec]:
    nd = len(out_shape)
    dims: List[Vec] = [None] * nd
    for d in range(nd):
        vecs: List[Vec] = []
        for vd, shape in items:
            k = d - (nd - len(shape))
            if k < 0 or (shape[k] == 1 and out_shape[d] != 1):
                continue
            vecs.append(vd[k])
        if not vecs:
            continue
        first = next((v for v in vecs if v is not None), None)
        for v in vecs:
            if v is not first:
                c.a.uf.union_vecs(first, v) if first is not None else None
        if first is not None and any(v is None for v in vecs):
            c.a.uf.freeze(first)
        dims[d] = first
    return dims


def elementwise(c: RuleCall) -> Any:
    """Broadcasting ops couple the channels they line up (residual add, gating mul, where)."""
    if not isinstance(c.out, torch.Tensor):
        return opaque(c)
    size_values(c)
    items = []
    for i, v in enumerate(c.args):
        if isinstance(v, torch.Tensor):
            items.append((_dims_of(c, i, v), v.shape))
    for k, v in c.kwargs.items():
        if isinstance(v, torch.Tensor):
            tl = _tl(c.lkwargs.get(k))
            items.append((list(tl.dims) if tl and tl.ndim == v.dim() else [None] * v.dim(), v.shape))
    return TL(_broadcast(c, items, c.out.shape))


def _norm_dims(dims: Any, nd: int) -> List[int]:
    if dims is None:
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(int(d) % nd for d in dims) if nd else []


def along_dim(c: RuleCall) -> Any:
    """softmax / normalize / cumsum along one dim: that dim's channels are mixed, so frozen."""
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    d = c.arg(1, "dim")
    if d is None and c.node.meta.get("op") == "Functional":
        d = c.kwargs.get("dim", -1)
    d = 1 if d is None and c.module.fn is F.normalize else d
    if d is None:
        return opaque(c)
    dims[int(d) % x.dim()] = _freeze(c, dims[int(d) % x.dim()])
    return _out_tl(c.out, dims)


# ----------------------------------------------------------------------------------------------
# sizes: where a shape argument came from

def size_source(c: RuleCall, t: Any) -> Tuple[str, List[Vec]]:
    """('const'|'auto'|'direct'|'derived', source vectors) for one size argument template."""
    if isinstance(t, Ref):
        src = c.a.size_sources.get(t.node)
        if src is None:
            return "derived", []
        kind, vecs = src
        if kind == "shape":
            if t.path:
                i = t.path[0]
                if isinstance(i, int) and -len(vecs) <= i < len(vecs):
                    return "direct", [vecs[i]]
                return "derived", []  # a shape with no channel vectors recorded (e.g. an int mask's)
            return "derived", list(vecs)
        return kind, list(vecs)
    if isinstance(t, int) and t == -1:
        return "auto", []
    return "const", []


def whole_shape_refs(c: RuleCall, t: Any, ndim: int) -> Optional[List[Ref]]:
    """A whole `y.shape` passed as one size argument (`x.view(y.shape)`, `x.new_zeros(y.shape)`), as one
    reference per dim of it; None for anything else."""
    if not isinstance(t, Ref) or t.path:
        return None
    src = c.a.size_sources.get(t.node)
    if src is None or src[0] != "shape" or len(src[1]) != ndim:
        return None
    return [Ref(t.node, (d,)) for d in range(ndim)]


def size_values(c: RuleCall) -> None:
    """A size that counts channels, read as a value (RAFT's `corr / sqrt(tensor(C))`, `x.sum(1) / C`): the
    hard prune writes its traced value there, so the pruned network scales as the zeroed one does (soft ==
    hard), as it does for `C ** -0.5` already folded at capture. A size that also counts a dim that is no
    channel (`numel` over H and W, which may change per call) freezes the channels it counts instead."""
    slots = [(i, t) for i, t in enumerate(c.node.args)] + list(c.node.kwargs.items())
    pins = {}
    for slot, t in slots:
        if not isinstance(t, Ref) or t.node not in c.a.size_sources:
            continue
        vecs = size_source(c, t)[1]
        if not vecs or all(v is None for v in vecs):
            continue
        if any(v is None for v in vecs):
            cause = c.a.uf.cause
            c.a.uf.cause = f"{c.node.name} (reads their count, with a dim that is no channel, as a value)"
            for v in vecs:
                if v is not None:
                    c.a.uf.freeze(v)
            c.a.uf.cause = cause
            continue
        pins[slot] = c.arg(slot) if isinstance(slot, int) else c.kwargs.get(slot)
    if pins:
        c.a.fixup(c.node.name, fix_size_values, pins=pins)


def fix_size_values(net: Any, fx: Any, keep_of: Any, mode: str) -> None:
    """Hard prune: the sizes `size_values` read as values become their traced constants."""
    if mode != "hard":
        return
    node = net.node(fx.node)
    args = list(node.args)
    for slot, value in fx.data["pins"].items():
        if isinstance(slot, int):
            args[slot] = value
        else:
            node.kwargs[slot] = value
    node.args = tuple(args)


def _same_classes(c: RuleCall, a: Vec, b: Vec) -> bool:
    if a is None or b is None or len(a) != len(b):
        return a is None and b is None
    find = c.a.uf.find
    return all(find(int(x)) == find(int(y)) for x, y in zip(a, b))


def check_sizes(c: RuleCall, size_templates: Sequence[Any], out_dims: List[Vec], in_vecs: List[Vec]) -> List[int]:
    """Shape arguments of a labeled dim must follow pruning. Constants are rewritten by the hard prune; a
    size read from this very dim follows by itself; any other size read at run time (the residual width
    `C` in timm's `qkv.reshape(B, N, 3, H, C // H)`, read from another tensor) is pinned: returned, so the
    hard prune writes the kept count there as a constant. A channel dim's size is static once traced, so
    the constant is exact, and the dims it was read from stay free to prune on their own."""
    pinned: List[int] = []
    for d, t in enumerate(size_templates):
        if d >= len(out_dims) or out_dims[d] is None:
            continue
        kind, srcs = size_source(c, t)
        if kind == "direct" and srcs and srcs[0] is not None and _same_classes(c, srcs[0], out_dims[d]):
            continue
        if kind == "derived" and srcs and all(s is not None and any(_same_classes(c, s, v) for v in in_vecs)
                                              for s in srcs):
            continue  # computed from this input's own dims (C // groups): follows pruning
        if kind in ("direct", "derived") and srcs and any(s is None for s in srcs):
            # read at run time from a dim that is no channel (hiera's `B *= 4` folds the batch into a dim
            # that carries pos_embed's token labels): the dim follows the input, so its labels stay whole
            c.a.uf.freeze(out_dims[d])
            continue
        if kind in ("direct", "derived"):
            pinned.append(d)
    return pinned


def freeze_sizes_of_unlabeled(c: RuleCall, size_templates: Sequence[Any], out_dims: List[Vec]) -> Dict[int, int]:
    """A reshape size read from a prunable dim, for an output dim whose data does not follow pruning,
    would shrink while the data does not (XCA's `reshape(B, N, C)` with C read from the residual):
    the channels it is read from are frozen. With whole-head units (`Analysis.heads`) a head dim read
    from channel dims only (timm's `C // H`) is pinned to its traced size instead: returned as
    {dim: size}, for the hard prune to write as a constant, and the residual stays prunable."""
    consts: Dict[int, int] = {}
    for d, t in enumerate(size_templates):
        if d < len(out_dims) and out_dims[d] is None:
            kind, srcs = size_source(c, t)
            if kind not in ("direct", "derived") or not srcs:
                continue
            if c.a.heads and all(s is not None for s in srcs) and isinstance(c.out, torch.Tensor):
                consts[d] = int(c.out.shape[d])
                continue
            for s in srcs:
                c.a.uf.freeze(s)
    return consts


# ----------------------------------------------------------------------------------------------
