"""Rules of the layout ops (reshape, permute, transpose, casts), and the hard-prune edit of
constant sizes they carry."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...graph.ops import FunctionOp, GetAttr
from ...graph.template import Ref
from ..dependency import TL, Fixup, RuleCall, Vec
from ...graph.network import ReconstructedNetwork

from .common import (freeze_sizes_of_unlabeled, _dims_of, _first_tensor, _out_tl, _tl, check_sizes, passthrough,
                     whole_shape_refs)
from .registry import opaque, register_rule

T = torch.Tensor
KeepFn = Callable[[np.ndarray], np.ndarray]


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
        if len(vecs) > 1:  # a frozen dim merges as an unlabeled one (a conv weight's kernel axes)
            vecs = [(k, v) for k, v in vecs if any(c.a.uf.find(int(e)) != 0 for e in v)] or vecs[-1:]
        if not vecs:
            continue
        if len(vecs) > 1 and len(big_out) == 1:
            # (heads, head_dim) -> C with a labeled head axis too (XCiT's temperature, CaiT's talking
            # heads, ConViT's gating give heads a parameter): the head count stays, the innermost
            # labeled dim merges as below
            for _, v in vecs[:-1]:
                c.a.uf.freeze(v)
            vecs = vecs[-1:]
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
            if c.a.heads and len(big_out) >= 2:
                # whole heads: every dim of a head (in every outer slot: q, k and v) is one unit
                grid = v.reshape(-1, sizes[-2], sizes[-1])
                for o in range(grid.shape[0]):
                    for j in range(grid.shape[2]):
                        if o or j:
                            c.a.uf.union_vecs(grid[0, :, 0], grid[o, :, j])
                out[big_out[-2]] = grid[0, :, 0].copy()
                continue
            grid = v.reshape(-1, sizes[-1])
            for row in grid[1:]:
                c.a.uf.union_vecs(grid[0], row)
            out[big_out[-1]] = grid[0].copy()
            for j in big_out[:-1]:  # the outer dims (heads, groups): split off channels, so static in size
                out[j] = np.zeros(b[j], dtype=np.int64)  # frozen labels: a size read there is no batch
            continue
        for _, v in vecs:  # anything else (two labeled dims regrouped): frozen
            c.a.uf.freeze(v)
    return out


def _whole_shape(c: RuleCall) -> Optional[List[Ref]]:
    """`x.view(shape)` with `shape` a whole `y.shape` read at run time (OPT: `.view(hidden_states_shape)`)."""
    t = c.node.args[1:]
    return whole_shape_refs(c, t[0], c.out.dim()) if len(t) == 1 and isinstance(c.out, torch.Tensor) else None


def size_templates(c: RuleCall) -> List[Any]:
    t = c.node.args[1:]
    whole = _whole_shape(c)
    if whole:  # one size per dim, each read from its dim of the shape
        return whole
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
    fn = getattr(c.module, "fn", None)
    if out is None:
        if fn in (T.view, T.reshape, torch.reshape):
            freeze_sizes_of_unlabeled(c, size_templates(c), [None] * c.out.dim())
        return TL.unlabeled(c.out.dim())
    if fn in (T.view, T.reshape, torch.reshape):
        templates = size_templates(c)
        consts = freeze_sizes_of_unlabeled(c, templates, out)
        pinned = check_sizes(c, templates, out, in_dims)
        if (pinned or consts) and _whole_shape(c):  # no per-dim slot to write a kept size into
            for v in out:
                c.a.uf.freeze(v)
            return TL.unlabeled(c.out.dim())
        if pinned or consts or any(isinstance(t, int) and t != -1 for t, v in zip(templates, out) if v is not None):
            c.a.fixup(c.node.name, fix_sizes, out_dims=out, pinned=pinned, consts=consts)
    elif fn in (T.view_as, T.reshape_as):
        other = _tl(c.larg(1))
        if other is not None:
            for v, w in zip(out, other.dims):
                c.a.uf.union_vecs(v, w) if (v is not None or w is not None) else None
    elif fn in (T.unflatten, torch.unflatten) or isinstance(c.module, nn.Unflatten):
        templates = _unflatten_templates(c, c.out.dim())
        if templates is None:  # sizes we cannot rewrite (a named shape): what they split stays whole
            for v in out:
                c.a.uf.freeze(v)
            return TL([None] * len(out))
        consts = freeze_sizes_of_unlabeled(c, templates, out)
        pinned = check_sizes(c, templates, out, in_dims)
        c.a.fixup(c.node.name, fix_unflatten, out_dims=out, pinned=pinned, consts=consts)
    return TL(out)


def _unflatten_call(node: Any, module: Any) -> Optional[Tuple[int, List[Any]]]:
    """(dim, sizes) of `x.unflatten(dim, sizes)` / `nn.Unflatten(dim, sizes)`; None for a named shape."""
    if isinstance(module, nn.Unflatten):
        dim, sizes = module.dim, module.unflattened_size
    else:
        args, kw = node.args, node.kwargs
        dim = args[1] if len(args) > 1 else kw.get("dim")
        sizes = args[2] if len(args) > 2 else kw.get("sizes")
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)) or \
            any(isinstance(s, (list, tuple)) for s in sizes):
        return None
    return dim, list(sizes)


def _unflatten_templates(c: RuleCall, ndim: int) -> Optional[List[Any]]:
    """The unflatten's sizes placed at the output dims they make (-1, "follows", everywhere else)."""
    call = _unflatten_call(c.node, c.module)
    if call is None:
        return None
    dim, sizes = call
    start = dim % (ndim - len(sizes) + 1)
    return [-1] * start + sizes + [-1] * (ndim - start - len(sizes))


def fix_unflatten(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Hard prune: the split sizes of a pruned dim become the kept counts (as `fix_sizes` does for view)."""
    if mode != "hard":
        return
    node = net.node(fx.node)
    module = net.module_of(fx.node) if not node.args[1:] and not node.kwargs else None
    module = module if isinstance(module, nn.Unflatten) else None
    dim, sizes = _unflatten_call(node, module)
    out_dims = fx.data["out_dims"]
    start = dim % (len(out_dims) - len(sizes) + 1)
    full = [-1] * start + sizes + [-1] * (len(out_dims) - start - len(sizes))
    new = _replace_const_sizes(full, out_dims, keep_of, fx.data["pinned"], fx.data["consts"])[start:start + len(sizes)]
    if module is not None:
        module.unflattened_size = tuple(new)
    elif len(node.args) > 2:
        node.args = node.args[:2] + (type(node.args[2])(new),) + node.args[3:]
    else:
        node.kwargs["sizes"] = type(node.kwargs["sizes"])(new)


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



def _replace_const_sizes(templates: List[Any], out_dims: List[Any], keep_of: KeepFn,
                         pinned: Sequence[int] = (), consts: Optional[dict] = None) -> List[Any]:
    new = list(templates)
    for d, (t, vec) in enumerate(zip(templates, out_dims)):
        if vec is not None and (d in pinned or (isinstance(t, int) and not isinstance(t, bool) and t != -1)):
            new[d] = int(keep_of(vec).sum())
        elif consts and d in consts:
            new[d] = int(consts[d])
    return new


def fix_sizes(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    if mode != "hard":
        return
    node = net.node(fx.node)
    out_dims, pinned, consts = fx.data["out_dims"], fx.data.get("pinned", ()), fx.data.get("consts")
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args[1] = type(args[1])(_replace_const_sizes(list(args[1]), out_dims, keep_of, pinned, consts))
    elif len(args) > 1:
        args[1:] = _replace_const_sizes(args[1:], out_dims, keep_of, pinned, consts)
    else:
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs[key] = tuple(_replace_const_sizes(list(node.kwargs[key]), out_dims, keep_of, pinned, consts))
    node.args = tuple(args)

