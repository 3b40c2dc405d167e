"""Rules of indexing, splitting, concatenation, expansion and padding, and the split-size edit."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...graph.ops import SetItem
from ...graph.template import Ref
from ..dependency import TL, Fixup, RuleCall, Vec
from ...graph.network import ReconstructedNetwork

from .common import _dims_of, _freeze, _norm_dims, _out_tl, _tl, arg_dims, check_sizes, size_source
from .registry import opaque, register_rule
from .layout import fix_sizes, size_templates

T = torch.Tensor
KeepFn = Callable[[np.ndarray], np.ndarray]

def _getitem_dims(c: RuleCall, x: torch.Tensor, dims: List[Vec], idx: Any, idx_t: Any) -> Optional[List[Vec]]:
    single = not isinstance(idx, tuple)
    if single:
        idx, idx_t = (idx,), (idx_t,)
    elif not isinstance(idx_t, tuple):
        idx_t = tuple(idx_t) if isinstance(idx_t, list) else (idx_t,) * len(idx)
    if any(isinstance(i, (torch.Tensor, list)) or isinstance(i, bool) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: List[Vec] = []
    d = 0
    for k, (i, t) in enumerate(zip(idx, idx_t)):
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
            r = range(x.shape[d])[i]
            n = x.shape[d]
            bounds = (t.start, t.stop) if isinstance(t, slice) else ()
            widths = {j: w for j, w in enumerate(_run_width_source(c, b, v) for b in bounds) if w is not None}
            if v is not None and r.step > 1 and n % r.step == 0 and r == range(r.start % r.step, n, r.step) \
                    and isinstance(t, slice) and t.stop is None and all(type(b) is int for b in (t.start or 0, t.step)):
                # every step-th channel (timm's interleaved rotary `rot`: `x[..., 1::2]`, `x[..., ::2]`): the
                # channels go a block of `step` at a time, so the kept ones stay in whole blocks and the
                # same slice picks the same member of each kept block; nothing to rewrite
                grid = v.reshape(-1, r.step)
                for j in range(1, r.step):
                    c.a.uf.union_vecs(grid[:, 0], grid[:, j])
                out.append(grid[:, r.start].copy())
                d += 1
                continue
            if v is not None and r == range(n):
                _couple_runs(c, v, widths.values())
            elif v is not None:
                # a contiguous run of channels with constant bounds (`g[:, -3:]`): the rest prune freely,
                # the run prunes with its readers, and the hard prune moves the bounds onto the kept
                # channels; so do bounds counted from channels alone, and bounds read from a dim as wide
                # as the run they end; bounds read at run time from a dim that is no channel (BERT's
                # `position_ids[:, :seq_len]`) stay frozen
                static = isinstance(t, slice) and (t.step is None or type(t.step) is int) and all(
                    b is None or type(b) is int or _counts_channels(c, b) or j in widths for j, b in enumerate(bounds))
                if r.step == 1 and static:
                    _couple_runs(c, v, widths.values())
                    if len(r):
                        c.a.nonempty.append(v[r.start:r.stop].copy())  # the run never empties
                    c.a.fixup(c.node.name, fix_channel_slice, pos=None if single else k,
                              before=v[:r.start].copy(), inside=v[r.start:r.stop].copy())
                    v = v[r.start:r.stop]
                else:
                    c.a.uf.freeze(v)
                    v = None
            out.append(v)
            d += 1
        else:
            return None
    out.extend(dims[d:])
    return out


def _counts_channels(c: RuleCall, bound: Any) -> bool:
    """A bound computed from channel counts alone (Swin v2's `qkv_bias[n // 3:2 * n // 3]`, n its `numel()`):
    no input changes it, so it is a constant of the network, and the hard prune writes the kept run's
    bounds there as for a constant. A count that also reads a batch or token dim is no constant."""
    kind, vecs = size_source(c, bound)
    return kind == "derived" and bool(vecs) and all(v is not None for v in vecs)


def _couple_runs(c: RuleCall, v: np.ndarray, sources: Any) -> None:
    """Each dim a bound is read from and the run of `v` that bound ends: the same channels."""
    for w in sources:
        c.a.uf.union_vecs(v[:len(w)], w)


def _run_width_source(c: RuleCall, bound: Any, v: Vec) -> Vec:
    """The channel dim a slice bound is read from (Phi-3's `q[..., :rotary_dim]` and `q[..., rotary_dim:]`,
    `rotary_dim = cos.shape[-1]`, cos multiplied into q's first channels next), if it is a channel dim no
    wider than the sliced one: the caller couples it channel by channel with the run before the bound, so
    both keep the same count and the bound stays where the run ends (the hard prune writes it as a
    constant). None otherwise (a dim that is no channel: the caller freezes a partial slice)."""
    if v is None or not isinstance(bound, Ref):
        return None
    kind, vecs = size_source(c, bound)
    if kind != "direct" or len(vecs) != 1 or vecs[0] is None or not 0 < len(vecs[0]) <= len(v):
        return None
    return vecs[0]


def fix_channel_slice(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Hard: `x[..., a:b]` over pruned channels becomes the slice of the kept ones (order is kept)."""
    if mode != "hard":
        return
    before = int(keep_of(fx.data["before"]).sum()) if len(fx.data["before"]) else 0
    new = slice(before, before + int(keep_of(fx.data["inside"]).sum()))
    node = net.node(fx.node)
    idx, pos = node.args[1], fx.data["pos"]
    idx = new if pos is None else tuple(idx[:pos]) + (new,) + tuple(idx[pos + 1:])
    node.args = (node.args[0], idx) + tuple(node.args[2:])


def _one_tensor_index(c: RuleCall, x: torch.Tensor, dims: List[Vec], idx: Any) -> Optional[List[Vec]]:
    """`x[i]`, `x[:, i]`, `x[..., i]` with one integer or boolean index tensor and full slices elsewhere (a
    graph network gathering nodes, `h[src]`): the dims it indexes are data positions (their channels stay),
    every other dim keeps its channels, where torch puts it."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    tensors = [k for k, i in enumerate(idx) if isinstance(i, torch.Tensor)]
    if len(tensors) != 1 or idx.count(Ellipsis) > 1 or not all(
            i == slice(None) or i is Ellipsis for k, i in enumerate(idx) if k != tensors[0]):
        return None
    c.a.freeze_all(c.larg(1))  # the index holds positions: its own dims (a buffer's, say) stay whole
    k, i = tensors[0], idx[tensors[0]]
    mask = i.dtype == torch.bool  # a mask covers as many dims as it has; an index tensor one
    spans = [(i.dim() if mask else 1) if j == k else 0 if e is Ellipsis else 1 for j, e in enumerate(idx)]
    if Ellipsis in idx:
        spans[idx.index(Ellipsis)] = x.dim() - sum(spans)
    start = sum(spans[:k])
    taken = dims[start:start + spans[k]]
    for v in taken:
        c.a.uf.freeze(v)
    made = 1 if mask else i.dim()
    return dims[:start] + [None] * made + dims[start + spans[k]:]


@register_rule(T.__getitem__)
def getitem(c: RuleCall) -> Any:
    x = c.args[0]
    if not isinstance(x, torch.Tensor) or not isinstance(c.out, torch.Tensor):
        return opaque(c)
    dims = _dims_of(c, 0, x)
    out = _one_tensor_index(c, x, dims, c.args[1]) or _getitem_dims(c, x, dims, c.args[1], c.node.args[1])
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


@register_rule(T.chunk, torch.chunk, T.split, torch.split, T.tensor_split, torch.tensor_split, T.unbind, torch.unbind,
               T.narrow, torch.narrow, T.select, torch.select)
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
        sections = fn in (T.split, torch.split) and isinstance(_split_arg(c.node), (list, tuple))
        if sections:  # split(x, [a, b, c]): each piece prunes on its own; the hard prune rewrites the list
            bounds = np.cumsum([0] + sizes)
            for a, b in zip(bounds, bounds[1:]):  # no piece vanishes (MobileViTv2's one-channel query)
                c.a.nonempty.append(v[a:b].copy())
            c.a.fixup(c.node.name, fix_split_sections, vecs=[v[a:b].copy() for a, b in zip(bounds, bounds[1:])])
        elif len(set(sizes)) == 1 and fn in (T.chunk, torch.chunk, T.split, torch.split):
            for k in range(1, len(pieces)):  # equal pieces: prune them alike, so they stay equal
                c.a.uf.union_vecs(v[:sizes[0]], v[k * sizes[0]:(k + 1) * sizes[0]])
            if fn in (T.split, torch.split):
                c.a.fixup(c.node.name, fix_split_size, dim=d, vec=v[:sizes[0]].copy())
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
    if not stack and nd > 1:  # torch.cat skips 1-D empty tensors (an empty KV cache: cat([empty, k], -2))
        kept = [i for i, t in enumerate(tensors) if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == 0)]
        tensors, ltensors = [tensors[i] for i in kept], [ltensors[i] for i in kept]
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
        templates = size_templates(c)
        for k, t in enumerate(templates[:len(out)]):  # a size-1 dim grown to a size read from a channel dim
            kind, vecs = size_source(c, t)            # holds one value along it: it carries those channels
            grows = k < lead or x.shape[k - lead] == 1
            if out[k] is None and grows and kind == "direct" and vecs and vecs[0] is not None \
                    and len(vecs[0]) == c.out.shape[k]:
                out[k] = vecs[0]
        pinned = check_sizes(c, templates, out, dims)
        if pinned or any(isinstance(t, int) and t != -1 for t, v in zip(templates, out) if v is not None):
            c.a.fixup(c.node.name, fix_sizes, out_dims=out, pinned=pinned)
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



def _split_arg(node: Any) -> Any:
    """The sizes argument of a split node (positional, or `split_size_or_sections` / `split_size`)."""
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))


def fix_split_sections(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Hard prune: `split(x, [a, b, c])` gets the kept count of each piece."""
    if mode != "hard":
        return
    node = net.node(fx.node)
    counts = [int(keep_of(v).sum()) for v in fx.data["vecs"]]
    if len(node.args) > 1:
        node.args = (node.args[0], type(node.args[1])(counts)) + tuple(node.args[2:])
    else:
        key = "split_size_or_sections" if "split_size_or_sections" in node.kwargs else "split_size"
        node.kwargs[key] = type(node.kwargs[key])(counts)


def fix_split_size(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    node = net.node(fx.node)
    if mode == "hard" and len(node.args) > 1 and isinstance(node.args[1], int):
        node.args = (node.args[0], int(keep_of(fx.data["vec"]).sum())) + tuple(node.args[2:])



@register_rule(T.index_add, T.index_add_, torch.index_add, T.scatter_add, T.scatter_add_, torch.scatter_add,
               T.scatter_reduce, T.scatter_reduce_, torch.scatter_reduce)
def scatter(c: RuleCall) -> Any:
    """`x.index_add_(dim, index, source)`, `x.scatter_add_(dim, index, src)`, `scatter_reduce`: rows of the
    source land at data positions along `dim` (a graph network's message sum); along every other dim the
    source lines up with `x` (and a scatter's index with both), so those dims are one set of channels."""
    (x, xd), (_, dim) = arg_dims(c, 0, "input"), (None, c.arg(1, "dim"))
    (index, idd), (src, sd) = arg_dims(c, 2, "index"), arg_dims(c, 3, "source" if "index_add" in
                                                                   c.module.fn.__name__ else "src")
    if not all(isinstance(t, torch.Tensor) for t in (x, index, src, c.out)) or not isinstance(dim, int) \
            or src.dim() != x.dim():
        return opaque(c)
    d = dim % x.dim()
    lined = [xd, sd] + ([idd] if index.dim() == x.dim() else [])
    for vecs in lined:
        _freeze(c, vecs[d])
    for k in range(x.dim()):
        if k == d:
            continue
        column = [v[k] for v in lined]
        if any(v is None for v in column):
            for v in column:
                _freeze(c, v)
        else:
            for v in column[1:]:
                c.a.uf.union_vecs(column[0], v)
    return TL([None if k == d else xd[k] for k in range(x.dim())])
