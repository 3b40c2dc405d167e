"""Rules of the ops that compute sizes: a size read from a tensor records which channels it counts."""
from __future__ import annotations

import operator
from typing import Any, List

import torch

from ...graph.ops import TensorSize
from ...graph.template import Ref
from ..dependency import RuleCall, Vec

from .common import _tl, size_source, size_values
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



@register_rule(torch.tensor, torch.as_tensor, torch.scalar_tensor, T.new_tensor)
def tensor_of_values(c: RuleCall) -> Any:
    """`torch.tensor(C)` of a channel count is a value: pinned to its traced one (see `size_values`)."""
    size_values(c)
    return None
