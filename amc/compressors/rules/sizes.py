"""Rules of the ops that compute sizes: a size read from a tensor records which channels it counts."""
from __future__ import annotations

import operator
from typing import Any, List

import torch

from ...graph.ops import TensorSize
from ...graph.template import Ref
from ..dependency import TL, RuleCall, Vec

from .common import _tl, size_source, size_values, whole_shape_refs
from .registry import register_rule

T = torch.Tensor

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



_FILLED = (T.new_full, torch.full)  # (size, fill_value): the others take the sizes alone


@register_rule(T.new_zeros, T.new_ones, T.new_empty, T.new_full, torch.zeros, torch.ones, torch.empty, torch.full)
def created(c: RuleCall) -> Any:
    """A tensor made from sizes holds one value everywhere, so a dim whose size is read from a channel dim
    carries those channels (it is resized with them); `x.new_zeros(...)` reads `x` for its dtype and
    device only, so `x` keeps its channels (Swin's shifted-window mask froze the whole network). A size
    computed from channel counts, or a fill value that is one, keeps the channels it counts."""
    if not isinstance(c.out, torch.Tensor):
        return None
    fn, args = c.module.fn, list(c.node.args)
    if fn in (T.new_zeros, T.new_ones, T.new_empty, T.new_full):
        args = args[1:]
    fill = None
    if fn in _FILLED:
        fill = args[1] if len(args) > 1 else c.node.kwargs.get("fill_value")
        args = args[:1]
    if "size" in c.node.kwargs:
        args = [c.node.kwargs["size"]]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    elif len(args) == 1 and whole_shape_refs(c, args[0], c.out.dim()):
        args = whole_shape_refs(c, args[0], c.out.dim())  # x.new_zeros(y.shape)
    dims: List[Vec] = []
    for t in args + ([fill] if fill is not None else []):
        kind, vecs = size_source(c, t)
        if kind == "direct" and vecs and vecs[0] is not None and t is not fill:
            dims.append(vecs[0])
            continue
        for v in vecs:
            c.a.uf.freeze(v)
        dims.append(None)
    dims = dims[:len(args)]
    return TL(dims) if len(dims) == c.out.dim() else TL.unlabeled(c.out.dim())


@register_rule(torch.tensor, torch.as_tensor, torch.scalar_tensor, T.new_tensor)
def tensor_of_values(c: RuleCall) -> Any:
    """`torch.tensor(C)` of a channel count is a value: pinned to its traced one (see `size_values`)."""
    size_values(c)
    return None
