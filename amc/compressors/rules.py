"""Channel rules: one entry per op type, saying how channel labels flow through it.

`@register_rule(key, ...)` keys on a module class or a callable (the same keys as the graph's op
registry). An op without a rule is opaque: its inputs' channels are frozen, its outputs carry none.
That blocks pruning where we do not know better; it never guesses.
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph.node import Node
from ..graph.ops import AutogradFunctionOp, Constant, FunctionOp, GetAttr, ParamHolder, SetItem, TensorSize
from ..graph.template import Ref
from .dependency import TL, Rule, RuleCall, Vec, unlabeled_like

RULES: Dict[Any, Rule] = {}
T = torch.Tensor


def register_rule(*keys: Any):
    """Decorator: the rule for these module classes / callables."""
    def deco(fn: Rule) -> Rule:
        for k in dict.fromkeys(keys):
            if k in RULES:
                warnings.warn(f"amc: channel rule for {k!r} overwritten", stacklevel=2)
            RULES[k] = fn
        return fn
    return deco


def opaque(c: RuleCall) -> Any:
    """Unknown op: freeze whatever channels reach it; its outputs carry none."""
    c.a.freeze_all(c.largs)
    c.a.freeze_all(c.lkwargs)
    return None


def rule_for(module: nn.Module, node: Node) -> Rule:
    if isinstance(module, FunctionOp) and not isinstance(module, AutogradFunctionOp):
        try:
            return RULES.get(module.fn, opaque)
        except TypeError:
            return opaque
    cls = type(module)
    if cls in RULES:
        return RULES[cls]
    for base in cls.__mro__[1:]:
        if base in RULES:
            return RULES[base] if cls.forward is base.forward else opaque
    return opaque


# ----------------------------------------------------------------------------------------------
# helpers

def _tl(x: Any) -> Optional[TL]:
    return x if isinstance(x, TL) else None


def _dims_of(c: RuleCall, i: int, value: torch.Tensor) -> List[Vec]:
    tl = _tl(c.larg(i))
    return list(tl.dims) if tl is not None and tl.ndim == value.dim() else [None] * value.dim()


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


def reduction(c: RuleCall) -> Any:
    """mean/sum/max over dims: reducing over channels freezes them; other dims pass."""
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    raw = c.arg(1, "dim") if len(c.args) > 1 or "dim" in c.kwargs else None
    if isinstance(raw, torch.Tensor):
        return opaque(c)
    keep = bool(c.arg(2, "keepdim", False)) if not isinstance(c.arg(2, "keepdim", False), torch.Tensor) else False
    red = _norm_dims(raw, x.dim())
    for d in red:
        dims[d] = _freeze(c, dims[d])
    out_dims = [v for d, v in enumerate(dims) if d not in red or keep]
    if isinstance(c.out, tuple):  # (values, indices)
        return [_out_tl(o, list(out_dims)) for o in c.out]
    return _out_tl(c.out, out_dims)


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


@register_rule(TensorSize)
def tensor_size(c: RuleCall) -> Any:
    tl = _tl(c.larg(0))
    dims = list(tl.dims) if tl else []
    m = c.module
    if m.numel:
        c.a.size_sources[c.node.name] = ("derived", dims)
    elif m.dim is None:
        c.a.size_sources[c.node.name] = ("shape", dims)
    else:
        c.a.size_sources[c.node.name] = ("direct", [dims[m.dim] if dims else None])
    return None


def int_arith(c: RuleCall) -> Any:
    vecs: List[Vec] = []
    for t in c.node.args:
        if isinstance(t, Ref):
            vecs.extend(size_source(c, t)[1])
    c.a.size_sources[c.node.name] = ("derived", vecs)
    return None


register_rule(operator.mul, operator.floordiv, operator.truediv, operator.sub, operator.mod, operator.neg,
              operator.add)(int_arith)


def _same_classes(c: RuleCall, a: Vec, b: Vec) -> bool:
    if a is None or b is None or len(a) != len(b):
        return a is None and b is None
    find = c.a.uf.find
    return all(find(int(x)) == find(int(y)) for x, y in zip(a, b))


def check_sizes(c: RuleCall, size_templates: Sequence[Any], out_dims: List[Vec], in_vecs: List[Vec]) -> None:
    """Shape arguments of a labeled dim must follow pruning: constants are rewritten later; sizes read
    from a tensor couple that tensor's dim; sizes computed from other dims must come from this input."""
    for d, t in enumerate(size_templates):
        if d >= len(out_dims) or out_dims[d] is None:
            continue
        kind, srcs = size_source(c, t)
        if kind == "direct" and srcs and srcs[0] is not None and len(srcs[0]) == len(out_dims[d]):
            c.a.uf.union_vecs(srcs[0], out_dims[d])
        elif kind in ("direct", "derived"):
            # a size computed from other dims follows pruning only if it is read from this very dim
            ok = bool(srcs) and all(s is not None and any(_same_classes(c, s, v) for v in in_vecs) for s in srcs)
            if not ok:
                c.a.uf.freeze(out_dims[d])
                for s in srcs:
                    c.a.uf.freeze(s)


# ----------------------------------------------------------------------------------------------
# layout ops

def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair up runs of input and output dims whose sizes multiply to the same number."""
    groups: List[Tuple[List[int], List[int]]] = []
    i = j = 0
    na, nb = len(a), len(b)
    while i < na and j < nb:
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < na:
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < nb:
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    while i < na:  # trailing ones
        if a[i] != 1:
            return None
        groups[-1][0].append(i) if groups else groups.append(([i], []))
        i += 1
    while j < nb:
        if b[j] != 1:
            return None
        groups[-1][1].append(j) if groups else groups.append(([], [j]))
        j += 1
    return groups


def reshape_labels(c: RuleCall, in_dims: List[Vec], a: Sequence[int], b: Sequence[int]) -> Optional[List[Vec]]:
    groups = _reshape_groups(list(a), list(b))
    if groups is None:
        for v in in_dims:
            c.a.uf.freeze(v)
        return None
    out: List[Vec] = [None] * len(b)
    for gi, gj in groups:
        vecs = [(k, in_dims[k]) for k in gi if in_dims[k] is not None and a[k] > 1]
        big_out = [j for j in gj if b[j] > 1]
        if not vecs:
            continue
        if len(vecs) == 1 and len(big_out) == 1 and len(gi) >= 1:
            k, v = vecs[0]
            if len([x for x in gi if a[x] > 1]) == 1:
                out[big_out[0]] = v  # 1 -> 1 (ones around it don't matter)
                continue
            # merge: several input dims into one, one of them labeled
            grid = np.zeros([a[x] for x in gi], dtype=np.int64)
            shape = [1] * len(gi)
            shape[gi.index(k)] = a[k]
            grid[...] = v.reshape(shape)
            out[big_out[0]] = grid.reshape(-1)
            continue
        if len(vecs) == 1 and len([x for x in gi if a[x] > 1]) == 1 and len(big_out) > 1:
            # split one labeled dim into several: couple every outer slot with the innermost index,
            # so the kept set stays rectangular (same sub-channels kept in every head / group)
            k, v = vecs[0]
            sizes = [b[j] for j in big_out]
            grid = v.reshape(-1, sizes[-1])
            for row in grid[1:]:
                c.a.uf.union_vecs(grid[0], row)
            out[big_out[-1]] = grid[0].copy()
            continue
        for _, v in vecs:  # anything else (two labeled dims regrouped): frozen
            c.a.uf.freeze(v)
    return out


def _size_templates(c: RuleCall) -> List[Any]:
    t = c.node.args[1:]
    if len(t) == 1 and isinstance(t[0], (list, tuple)):
        return list(t[0])
    if not t and "shape" in c.node.kwargs:
        return list(c.node.kwargs["shape"])
    if not t and "size" in c.node.kwargs:
        return list(c.node.kwargs["size"])
    return list(t)


@register_rule(T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten,
               T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.squeeze_, T.unsqueeze_, nn.Flatten,
               nn.Unflatten, T.view_as, T.reshape_as)
def reshape(c: RuleCall) -> Any:
    i, x = _first_tensor(c)
    if x is None or not isinstance(c.out, torch.Tensor):
        return opaque(c)
    if isinstance(c.module, FunctionOp) and c.module.fn in (T.view, T.reshape, torch.reshape) and len(c.args) > 1 \
            and isinstance(c.args[1], torch.dtype):
        return opaque(c)
    in_dims = _dims_of(c, i, x)
    out = reshape_labels(c, in_dims, x.shape, c.out.shape)
    if out is None:
        return TL.unlabeled(c.out.dim())
    fn = getattr(c.module, "fn", None)
    if fn in (T.view, T.reshape, torch.reshape):
        templates = _size_templates(c)
        check_sizes(c, templates, out, in_dims)
        if any(isinstance(t, int) and t != -1 for t, v in zip(templates, out) if v is not None):
            c.a.fixup(c.node.name, "sizes", out_dims=out)
    elif fn in (T.view_as, T.reshape_as):
        other = _tl(c.larg(1))
        if other is not None:
            for v, w in zip(out, other.dims):
                c.a.uf.union_vecs(v, w) if (v is not None or w is not None) else None
    elif fn in (T.unflatten, torch.unflatten) or isinstance(c.module, nn.Unflatten):
        if any(v is not None for v in out):
            for v in out:
                c.a.uf.freeze(v)
            out = [None] * len(out)
    return TL(out)


@register_rule(T.permute, torch.permute, nn.Identity)
def permute(c: RuleCall) -> Any:
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    if isinstance(c.module, nn.Identity):
        return TL(dims)
    order = c.args[1:] if len(c.args) > 2 or not isinstance(c.arg(1, "dims"), (list, tuple)) else c.arg(1, "dims")
    if len(order) == 0:
        order = c.kwargs.get("dims", ())
    order = [int(o) % x.dim() for o in order]
    return _out_tl(c.out, [dims[o] for o in order])


@register_rule(T.transpose, torch.transpose, T.transpose_, T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims,
               T.t, torch.t)
def transpose(c: RuleCall) -> Any:
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    if x.dim() < 2:
        return TL(dims)
    d0 = int(c.arg(1, "dim0", 0)) % x.dim() if len(c.args) > 1 or "dim0" in c.kwargs else 0
    d1 = int(c.arg(2, "dim1", 1)) % x.dim() if len(c.args) > 2 or "dim1" in c.kwargs else 1
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _out_tl(c.out, dims)


@register_rule(T.movedim, torch.movedim)
def movedim(c: RuleCall) -> Any:
    i, x = _first_tensor(c)
    dims = _dims_of(c, i, x)
    probe = np.empty([2 + d for d in range(x.dim())], dtype=np.int8)  # distinct sizes name the dims
    moved = np.moveaxis(probe, c.arg(1, "source"), c.arg(2, "destination")).shape
    return _out_tl(c.out, [dims[n - 2] for n in moved])


@register_rule(GetAttr)
def get_attr(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    if c.module.attr in ("T", "mT") and x.dim() >= 2:
        if c.module.attr == "T":
            dims = dims[::-1]
        else:
            dims[-1], dims[-2] = dims[-2], dims[-1]
        return _out_tl(c.out, dims)
    if c.module.attr in ("data", "real"):
        return TL(dims)
    return opaque(c)


@register_rule(T.contiguous, T.clone, torch.clone, T.detach, T.to, T.float, T.type_as, T.type, T.half, T.double,
               T.bfloat16, F.dropout, F.dropout2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
def copy_like(c: RuleCall) -> Any:
    return passthrough(c)


def _getitem_dims(c: RuleCall, x: torch.Tensor, dims: List[Vec], idx: Any, idx_t: Any) -> Optional[List[Vec]]:
    if not isinstance(idx, tuple):
        idx, idx_t = (idx,), (idx_t,)
    elif not isinstance(idx_t, tuple):
        idx_t = tuple(idx_t) if isinstance(idx_t, list) else (idx_t,) * len(idx)
    if any(isinstance(i, (torch.Tensor, list)) or isinstance(i, bool) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: List[Vec] = []
    d = 0
    for i, t in zip(idx, idx_t):
        if i is Ellipsis:
            for _ in range(x.dim() - n_real):
                out.append(dims[d])
                d += 1
        elif i is None:
            out.append(None)
        elif isinstance(i, int):
            if dims[d] is not None:
                c.a.uf.freeze(dims[d])
            d += 1
        elif isinstance(i, slice):
            v = dims[d]
            full = range(x.shape[d])[i] == range(x.shape[d])
            if v is not None and not full:
                c.a.uf.freeze(v)
                v = None
            out.append(v)
            d += 1
        else:
            return None
    out.extend(dims[d:])
    return out


@register_rule(T.__getitem__)
def getitem(c: RuleCall) -> Any:
    x = c.args[0]
    if not isinstance(x, torch.Tensor) or not isinstance(c.out, torch.Tensor):
        return opaque(c)
    dims = _dims_of(c, 0, x)
    out = _getitem_dims(c, x, dims, c.args[1], c.node.args[1])
    if out is None or len(out) != c.out.dim():
        return opaque(c)
    return TL(out)


@register_rule(SetItem)
def setitem(c: RuleCall) -> Any:
    tl = _tl(c.larg(0))
    if tl is not None and any(v is not None for v in tl.dims) or _tl(c.larg(2)) is not None and any(
            v is not None for v in _tl(c.larg(2)).dims):
        opaque(c)
        return TL.unlabeled(c.out.dim())
    return TL(list(tl.dims)) if tl is not None else None


def _split_dim(c: RuleCall, x: torch.Tensor, d: int) -> int:
    return int(d) % x.dim()


@register_rule(T.chunk, torch.chunk, T.split, torch.split, T.tensor_split, T.unbind, torch.unbind, T.narrow,
               torch.narrow, T.select, torch.select)
def split(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    fn = c.module.fn
    if fn in (T.unbind, torch.unbind, T.select, torch.select, T.narrow, torch.narrow):
        d = _split_dim(c, x, c.arg(1, "dim", 0))
        if dims[d] is not None:
            dims[d] = _freeze(c, dims[d])
        if fn in (T.narrow, torch.narrow):
            return _out_tl(c.out, dims)
        rest = [v for k, v in enumerate(dims) if k != d]
        return [_out_tl(o, list(rest)) for o in c.out] if isinstance(c.out, (list, tuple)) else _out_tl(c.out, rest)
    d = _split_dim(c, x, c.arg(2, "dim", 0))
    pieces = list(c.out)
    v = dims[d]
    if v is not None:
        sizes = [p.shape[d] for p in pieces]
        if len(set(sizes)) == 1 and fn in (T.chunk, torch.chunk, T.split, torch.split):
            for k in range(1, len(pieces)):  # equal pieces: prune them alike, so they stay equal
                c.a.uf.union_vecs(v[:sizes[0]], v[k * sizes[0]:(k + 1) * sizes[0]])
            if fn in (T.split, torch.split):
                c.a.fixup(c.node.name, "split_size", dim=d, vec=v[:sizes[0]].copy())
        else:
            c.a.uf.freeze(v)
            v = None
    out = []
    start = 0
    for p in pieces:
        pd = list(dims)
        pd[d] = None if v is None else v[start:start + p.shape[d]]
        start += p.shape[d]
        out.append(_out_tl(p, pd))
    return out


@register_rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def cat(c: RuleCall) -> Any:
    tensors = c.arg(0, "tensors")
    ltensors = c.larg(0, "tensors") or [None] * len(tensors)
    if not isinstance(c.out, torch.Tensor) or not tensors:
        return opaque(c)
    stack = c.module.fn is torch.stack
    nd = c.out.dim()
    d = int(c.arg(1, "dim", 0)) % nd
    per = []
    for t, lt in zip(tensors, ltensors):
        per.append(list(lt.dims) if isinstance(lt, TL) and lt.ndim == t.dim() else [None] * t.dim())
    out: List[Vec] = []
    for k in range(nd):
        if stack and k == d:
            out.append(None)
            continue
        src = k if not stack or k < d else k - 1
        vecs = [p[src] for p in per]
        if k == d:  # concatenated: vectors joined (unlabeled pieces become frozen positions)
            if all(v is None for v in vecs):
                out.append(None)
            else:
                out.append(np.concatenate([v if v is not None else np.zeros(t.shape[src], np.int64)
                                           for v, t in zip(vecs, tensors)]))
            continue
        first = next((v for v in vecs if v is not None), None)
        for v in vecs:
            if v is not first:
                c.a.uf.union_vecs(first, v) if first is not None else None
        out.append(first)
    return TL(out)


@register_rule(T.expand, T.expand_as, torch.broadcast_to, T.repeat, T.tile, torch.tile, T.repeat_interleave,
               torch.repeat_interleave)
def expand(c: RuleCall) -> Any:
    x = c.args[0]
    if not isinstance(c.out, torch.Tensor):
        return opaque(c)
    dims = _dims_of(c, 0, x)
    lead = c.out.dim() - x.dim()
    if lead < 0:
        return opaque(c)
    out: List[Vec] = [None] * lead
    for k, v in enumerate(dims):
        if v is not None and c.out.shape[lead + k] != x.shape[k]:
            c.a.uf.freeze(v)
            v = None
        out.append(v)
    fn = c.module.fn
    if fn in (T.expand, torch.broadcast_to):
        templates = _size_templates(c)
        check_sizes(c, templates, out, dims)
        if any(isinstance(t, int) and t != -1 for t, v in zip(templates, out) if v is not None):
            c.a.fixup(c.node.name, "sizes", out_dims=out)
    elif fn is T.expand_as:
        other = _tl(c.larg(1))
        if other is not None:
            for v, w in zip(out, other.dims):
                c.a.uf.union_vecs(v, w) if (v is not None or w is not None) else None
    return TL(out)


@register_rule(F.pixel_shuffle, torch.pixel_shuffle, nn.PixelShuffle, F.pixel_unshuffle, torch.pixel_unshuffle,
               nn.PixelUnshuffle)
def pixel_shuffle(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    ch = x.dim() - 3
    v = dims[ch]
    out = [dims[k] if k < ch else None for k in range(c.out.dim())]
    if v is not None:
        r2 = x.shape[ch] // c.out.shape[ch] if c.out.shape[ch] < x.shape[ch] else None
        if r2:  # shuffle: every output channel is a block of r*r input channels
            grid = v.reshape(-1, r2)
            for col in grid.T[1:]:
                c.a.uf.union_vecs(grid[:, 0], col)
            out[ch] = grid[:, 0].copy()
        else:  # unshuffle: each input channel becomes r*r consecutive channels
            out[ch] = np.repeat(v, c.out.shape[ch] // x.shape[ch])
    return TL(out)


@register_rule(F.pad, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
def pad(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    for k in range(x.dim()):
        if c.out.shape[k] != x.shape[k]:
            dims[k] = _freeze(c, dims[k])
    return TL(dims)


@register_rule(T.roll, torch.roll, T.flip, torch.flip)
def roll(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    raw = c.arg(2, "dims") if c.module.fn in (T.roll, torch.roll) else c.arg(1, "dims")
    for d in _norm_dims(raw, x.dim()):
        dims[d] = _freeze(c, dims[d])  # a rolled/flipped channel order would not survive pruning
    return TL(dims)


# ----------------------------------------------------------------------------------------------
# element-wise, reductions

register_rule(torch.add, T.add, T.add_, T.__add__, T.__iadd__, T.__radd__, torch.sub, T.sub, T.sub_, T.__sub__,
              T.__isub__, T.__rsub__, torch.rsub, torch.mul, T.mul, T.mul_, T.__mul__, T.__imul__, T.__rmul__,
              torch.div, T.div, T.div_, T.__truediv__, T.__itruediv__, T.__rtruediv__, T.__floordiv__,
              T.__rfloordiv__, T.__pow__, T.__rpow__, torch.pow, T.pow, T.__neg__, T.__mod__, T.sqrt, torch.sqrt,
              T.rsqrt, torch.rsqrt, T.exp, torch.exp, T.log, torch.log, T.abs, torch.abs, T.abs_, T.clamp,
              torch.clamp, T.clamp_, T.clamp_min, T.clamp_max, torch.maximum, torch.minimum, torch.where,
              T.masked_fill, T.masked_fill_, T.sign, T.round, T.sigmoid, T.sigmoid_, T.tanh, T.tanh_, T.relu,
              T.relu_, torch.relu, torch.relu_, F.relu, F.relu6, F.relu_, F.gelu, F.silu, F.hardswish,
              F.hardsigmoid, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish,
              F.softplus, F.hardtanh, T.__eq__, T.__ne__, T.__lt__, T.__le__, T.__gt__, T.__ge__, T.__and__,
              T.__or__, T.__invert__, T.eq, T.ne, T.lt, T.le, T.gt, T.ge, torch.eq, torch.ne, torch.lt, torch.le,
              torch.gt, torch.ge, T.bool, T.long, T.int, T.zero_, T.fill_, T.copy_, torch.zeros_like,
              torch.ones_like, torch.full_like, torch.empty_like,
              nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
              nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU)(elementwise)

register_rule(T.mean, torch.mean, T.sum, torch.sum, T.amax, T.amin, T.max, T.min, torch.max, torch.min, T.norm,
              torch.norm, T.var, T.std, T.argmax, torch.argmax, torch.amax, torch.amin, torch.logsumexp)(reduction)
register_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, T.softmax, T.log_softmax, T.cumsum,
              torch.cumsum, F.normalize)(along_dim)


@register_rule(nn.Softmax, nn.LogSoftmax)
def softmax_module(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    d = c.module.dim if c.module.dim is not None else -1
    dims[d % x.dim()] = _freeze(c, dims[d % x.dim()])
    return TL(dims)


@register_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample, nn.UpsamplingNearest2d,
               nn.UpsamplingBilinear2d, F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest,
               F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d, F.adaptive_max_pool3d)
def spatial(c: RuleCall) -> Any:
    """Pooling / resizing: channels (and batch) pass, spatial dims carry no channels."""
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    spatial_dims = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3}.get(x.dim(), 0)
    keep = x.dim() - spatial_dims
    for k in range(keep, x.dim()):
        dims[k] = _freeze(c, dims[k])
    out = dims[:keep] + [None] * (c.out.dim() - keep) if isinstance(c.out, torch.Tensor) else None
    if isinstance(c.out, tuple):  # return_indices
        return [TL(list(out or dims)) for _ in c.out]
    return TL(out)


# ----------------------------------------------------------------------------------------------
# products

def _matmul_dims(c: RuleCall, da: List[Vec], db: List[Vec], sa: Sequence[int], sb: Sequence[int],
                 out_shape: Sequence[int]) -> List[Vec]:
    if len(sa) == 1:
        da, sa = [None] + da, [1] + list(sa)
        drop_a = True
    else:
        drop_a = False
    if len(sb) == 1:
        db, sb = db + [None], list(sb) + [1]
        drop_b = True
    else:
        drop_b = False
    c.a.uf.union_vecs(da[-1], db[-2]) if (da[-1] is not None or db[-2] is not None) else None
    batch = _broadcast(c, [(da[:-2], sa[:-2]), (db[:-2], sb[:-2])],
                       [max(x, y) for x, y in _pad_zip(sa[:-2], sb[:-2])])
    out = batch + ([] if drop_a else [da[-2]]) + ([] if drop_b else [db[-1]])
    return out if len(out) == len(out_shape) else [None] * len(out_shape)


def _pad_zip(a: Sequence[int], b: Sequence[int]):
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return zip(a, b)


@register_rule(torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm, torch.mm, T.mm)
def matmul(c: RuleCall) -> Any:
    a, b = c.args[0], c.args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(c.out, torch.Tensor)):
        return opaque(c)
    return TL(_matmul_dims(c, _dims_of(c, 0, a), _dims_of(c, 1, b), a.shape, b.shape, c.out.shape))


@register_rule(torch.einsum)
def einsum(c: RuleCall) -> Any:
    eq = c.args[0].replace(" ", "")
    ops = list(c.args[1:])
    lops = list(c.largs[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops, lops = list(ops[0]), list(lops[0] or [None] * len(ops[0]))
    if "..." in eq or "->" not in eq:
        return opaque(c)
    lhs, rhs = eq.split("->")
    letters: Dict[str, Vec] = {}
    for term, t, lt in zip(lhs.split(","), ops, lops):
        dims = list(lt.dims) if isinstance(lt, TL) and lt.ndim == t.dim() else [None] * t.dim()
        for ch, v, n in zip(term, dims, t.shape):
            if ch in letters:
                prev = letters[ch]
                if n > 1 and (prev is not None or v is not None):
                    c.a.uf.union_vecs(prev, v)
                letters[ch] = prev if prev is not None else v
            else:
                letters[ch] = v
    return _out_tl(c.out, [letters.get(ch) for ch in rhs])


@register_rule(F.scaled_dot_product_attention)
def sdpa(c: RuleCall) -> Any:
    q, k, v = c.args[0], c.args[1], c.args[2]
    dq, dk, dv = _dims_of(c, 0, q), _dims_of(c, 1, k), _dims_of(c, 2, v)
    c.a.uf.union_vecs(dq[-1], dk[-1]) if (dq[-1] is not None or dk[-1] is not None) else None
    c.a.uf.union_vecs(dk[-2], dv[-2]) if (dk[-2] is not None or dv[-2] is not None) else None
    mask = c.kwargs.get("attn_mask", c.args[3] if len(c.args) > 3 else None)
    if isinstance(mask, torch.Tensor):
        c.a.freeze_all(c.larg(3, "attn_mask"))
    batch = _broadcast(c, [(dq[:-2], q.shape[:-2]), (dk[:-2], k.shape[:-2]), (dv[:-2], v.shape[:-2])],
                       c.out.shape[:-2])
    if dq[-1] is not None and c.kwargs.get("scale") is None and len(c.args) < 7:
        c.a.fixup(c.node.name, "sdpa_scale", scale=1.0 / math.sqrt(q.shape[-1]))
    return TL(batch + [dq[-2], dv[-1]])


# ----------------------------------------------------------------------------------------------
# layers with parameters

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_rule(*_CONVS, *_TCONVS)
def conv(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    ch = x.dim() - len(m.kernel_size) - 1
    cin = dims[ch]
    transposed = isinstance(m, _TCONVS)
    win, wout = (0, 1) if transposed else (1, 0)
    out_dims: List[Vec] = [None] * c.out.dim()
    out_dims[:ch] = dims[:ch]
    if m.groups == 1:
        c.a.axis(name, "weight", win, cin)
        new = c.a.new_space(name, m.out_channels)
        c.a.axis(name, "weight", wout, new)
        if m.bias is not None:
            c.a.axis(name, "bias", 0, new)
        out_dims[ch] = new
    elif not transposed and m.groups == m.in_channels == m.out_channels:
        if cin is None:
            cin = c.a.new_space(name, m.out_channels)
        c.a.axis(name, "weight", 0, cin)
        if m.bias is not None:
            c.a.axis(name, "bias", 0, cin)
        out_dims[ch] = cin
    elif not transposed and m.in_channels == m.out_channels and cin is not None:
        # grouped (ResNeXt/RegNet): channel i in, channel i out; the same offsets are kept in every
        # group (offset j is coupled across groups), so groups stay equal and weight dim 1 is sliced
        # by the offsets
        grid = cin.reshape(m.groups, -1)
        for row in grid[1:]:
            c.a.uf.union_vecs(grid[0], row)
        c.a.axis(name, "weight", 0, cin)
        c.a.axis(name, "weight", 1, grid[0].copy())
        if m.bias is not None:
            c.a.axis(name, "bias", 0, cin)
        out_dims[ch] = cin
    else:
        c.a.uf.freeze(cin)
    return TL(out_dims)


@register_rule(nn.Linear)
def linear(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    c.a.axis(name, "weight", 1, dims[-1])
    new = c.a.new_space(name, m.out_features)
    c.a.axis(name, "weight", 0, new)
    if m.bias is not None:
        c.a.axis(name, "bias", 0, new)
    return TL(dims[:-1] + [new])


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
               nn.InstanceNorm3d)
def batchnorm(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    ch = 1 if x.dim() > 1 else 0
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and x.dim() == len(_spatial_of(m)) + 1:
        ch = 0
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, attr, None) is not None:
            c.a.axis(name, attr, 0, dims[ch])
    return TL(dims)


def _spatial_of(m: nn.Module) -> Tuple[int, ...]:
    return {nn.InstanceNorm1d: (1,), nn.InstanceNorm2d: (1, 1), nn.InstanceNorm3d: (1, 1, 1)}.get(type(m), (1, 1))


@register_rule(nn.LayerNorm)
def layernorm(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    if len(m.normalized_shape) != 1:
        for d in range(x.dim() - len(m.normalized_shape), x.dim()):
            dims[d] = _freeze(c, dims[d])
        return TL(dims)
    for attr in ("weight", "bias"):
        if getattr(m, attr, None) is not None:
            c.a.axis(name, attr, 0, dims[-1])
    if dims[-1] is not None:
        c.a.fixup(name, "layernorm", vec=dims[-1])
    return TL(dims)


@register_rule(nn.GroupNorm, nn.LocalResponseNorm, nn.ChannelShuffle)
def mixes_channels(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    dims[1] = _freeze(c, dims[1]) if x.dim() > 1 else dims[1]
    return TL(dims)


@register_rule(nn.PReLU)
def prelu(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    if c.module.num_parameters > 1:
        c.a.axis(c.node.name, "weight", 0, dims[1])
    return TL(dims)


@register_rule(nn.MultiheadAttention)
def multihead_attention(c: RuleCall) -> Any:
    """Self-attention: the embed dim follows the residual stream; head dims shrink with it."""
    m, name = c.module, c.node.name
    t = list(c.node.args[:3]) + [c.node.kwargs.get(k) for k in ("query", "key", "value")[len(c.node.args):]]
    self_attn = len(t) >= 3 and isinstance(t[0], Ref) and t[0] == t[1] == t[2]
    if not (self_attn and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn):
        opaque(c)
        return unlabeled_like(c.out)
    q = c.args[0] if c.args else c.kwargs["query"]
    dims = _dims_of(c, 0, q) if c.args else list(_tl(c.lkwargs["query"]).dims)
    emb = dims[-1]
    if emb is None:
        return [TL(dims), unlabeled_like(c.out[1])]
    c.a.axis(name, "in_proj_weight", 1, emb)
    c.a.axis(name, "out_proj.weight", 0, emb)
    if m.out_proj.bias is not None:
        c.a.axis(name, "out_proj.bias", 0, emb)
    c.a.multiples.append((emb, m.num_heads))
    c.a.fixup(name, "mha", vec=emb)
    return [TL(dims), unlabeled_like(c.out[1])]


# ----------------------------------------------------------------------------------------------
# parameters used directly, and their functional consumers

@register_rule(ParamHolder)
def param_holder(c: RuleCall) -> Any:
    value = c.out
    dims: List[Vec] = []
    for d, n in enumerate(value.shape):
        if n > 1:
            v = c.a.new_space(c.node.name, n, kind="param")
            c.a.axis(c.node.name, "value", d, v)
            dims.append(v)
        else:
            dims.append(None)
    return TL(dims)


@register_rule(Constant)
def constant(c: RuleCall) -> Any:
    return unlabeled_like(c.out)


@register_rule(F.linear)
def f_linear(c: RuleCall) -> Any:
    x, w = c.args[0], c.args[1]
    dx, dw = _dims_of(c, 0, x), _dims_of(c, 1, w)
    c.a.uf.union_vecs(dw[1], dx[-1]) if (dw[1] is not None or dx[-1] is not None) else None
    b = c.arg(2, "bias")
    if isinstance(b, torch.Tensor):
        db = _dims_of(c, 2, b) if len(c.args) > 2 else list(_tl(c.lkwargs.get("bias")).dims)
        c.a.uf.union_vecs(db[0], dw[0]) if (db[0] is not None or dw[0] is not None) else None
    return TL(dx[:-1] + [dw[0]])


@register_rule(F.conv1d, F.conv2d, F.conv3d)
def f_conv(c: RuleCall) -> Any:
    x, w = c.args[0], c.args[1]
    dx, dw = _dims_of(c, 0, x), _dims_of(c, 1, w)
    groups = c.arg(6, "groups", 1)
    ch = x.dim() - (w.dim() - 2) - 1
    if groups != 1:
        opaque(c)
        return TL.unlabeled(c.out.dim())
    c.a.uf.union_vecs(dw[1], dx[ch]) if (dw[1] is not None or dx[ch] is not None) else None
    b = c.arg(2, "bias")
    if isinstance(b, torch.Tensor):
        db = _dims_of(c, 2, b)
        c.a.uf.union_vecs(db[0], dw[0]) if (db[0] is not None or dw[0] is not None) else None
    out = [None] * c.out.dim()
    out[:ch] = dx[:ch]
    out[ch] = dw[0]
    return TL(out)


@register_rule(F.layer_norm)
def f_layer_norm(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    shape = c.arg(1, "normalized_shape")
    if len(shape) != 1:
        for d in range(x.dim() - len(shape), x.dim()):
            dims[d] = _freeze(c, dims[d])
        return TL(dims)
    for i, key in ((2, "weight"), (3, "bias")):
        p = c.arg(i, key)
        if isinstance(p, torch.Tensor):
            dp = _dims_of(c, i, p) if len(c.args) > i else list(_tl(c.lkwargs.get(key)).dims)
            c.a.uf.union_vecs(dp[0], dims[-1]) if (dp[0] is not None or dims[-1] is not None) else None
    if dims[-1] is not None:
        c.a.fixup(c.node.name, "f_layernorm", vec=dims[-1])
    return TL(dims)


@register_rule(F.batch_norm, F.instance_norm)
def f_batch_norm(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    names = ("running_mean", "running_var", "weight", "bias")
    for i, key in enumerate(names, start=1):
        p = c.arg(i, key)
        if isinstance(p, torch.Tensor):
            lp = c.larg(i, key)
            dp = list(lp.dims) if isinstance(lp, TL) else [None]
            c.a.uf.union_vecs(dp[0], dims[1]) if (dp[0] is not None or dims[1] is not None) else None
    return TL(dims)
