"""Rules of element-wise ops, log-softmax and pooling, and the ops declared opaque (reductions and softmax:
reductions.py)."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...graph.ops import ELEMENTWISE_MATH, ShapeGuard, TrainingFlag
from ..dependency import TL, RuleCall
from .common import _dims_of, _freeze, along_dim, arg_dims, elementwise
from .registry import mark_opaque, opaque, register_rule

T = torch.Tensor

register_rule(torch.add, T.add, T.add_, T.__add__, T.__iadd__, T.__radd__, torch.sub, T.sub, T.sub_, T.__sub__,
              T.__isub__, T.__rsub__, torch.rsub, torch.mul, T.mul, T.mul_, T.__mul__, T.__imul__, T.__rmul__,
              torch.div, T.div, T.div_, T.__truediv__, T.__itruediv__, T.__rtruediv__, T.__floordiv__,
              T.__rfloordiv__, T.__pow__, T.__rpow__, torch.pow, T.pow, T.__neg__, T.__mod__, T.sqrt, torch.sqrt,
              T.rsqrt, torch.rsqrt, torch.neg, T.exp, torch.exp, T.log, torch.log, T.abs, torch.abs, T.abs_, T.clamp,
              torch.clamp, T.clamp_, T.clamp_min, T.clamp_max, torch.maximum, torch.minimum, torch.where,
              T.masked_fill, T.masked_fill_, T.sign, T.round, T.sigmoid, T.sigmoid_, T.tanh, T.tanh_, T.relu,
              T.relu_, torch.relu, torch.relu_, F.relu, F.relu6, F.relu_, F.gelu, F.silu, F.hardswish,
              F.hardsigmoid, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish,
              F.softplus, F.hardtanh, T.__eq__, T.__ne__, T.__lt__, T.__le__, T.__gt__, T.__ge__, T.__and__,
              T.__or__, T.__invert__, T.eq, T.ne, T.lt, T.le, T.gt, T.ge, torch.eq, torch.ne, torch.lt, torch.le,
              torch.gt, torch.ge, T.bool, T.long, T.int, T.zero_, T.fill_, T.copy_, torch.zeros_like,
              torch.ones_like, torch.full_like, torch.empty_like, torch.addcmul, T.addcmul, torch.addcdiv, T.addcdiv,
              torch.lerp, T.lerp,
              nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
              nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Hardtanh, nn.SELU, nn.CELU)(elementwise)

register_rule(*ELEMENTWISE_MATH)(elementwise)
register_rule(F.log_softmax, torch.log_softmax, T.log_softmax, T.cumsum, torch.cumsum)(along_dim)


@register_rule(F.normalize)
def normalize(c: RuleCall) -> Any:
    """`x / ||x||_p` along a dim: a pruned channel is 0 there (soft) or absent (hard), and adds nothing
    to the norm either way, so channels pass through one by one (SSD's L2Norm on conv4_3)."""
    p = c.arg(1, "p", 2.0)
    if not isinstance(p, (int, float)) or p <= 0:
        return along_dim(c)
    return elementwise(c)


@register_rule(nn.LogSoftmax)
def softmax_module(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    d = c.module.dim if c.module.dim is not None else -1
    dims[d % x.dim()] = _freeze(c, dims[d % x.dim()])
    return TL(dims)


def _spatial_dims(op: nn.Module, x: torch.Tensor) -> int:
    """How many trailing dims an op pools or resizes: its 1d/2d/3d suffix says it (AdaptiveAvgPool1d over a
    [B, C, L] token sequence pools L only: Swin's pooler), else every dim after batch and channels."""
    name = getattr(getattr(op, "fn", None), "__name__", None) or type(op).__name__
    for n in (1, 2, 3):
        if name.lower().endswith(f"{n}d"):
            return min(n, x.dim())
    return max(x.dim() - 2, 1)


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
    keep = x.dim() - _spatial_dims(c.module, x)
    for k in range(keep, x.dim()):
        dims[k] = _freeze(c, dims[k])
    out = dims[:keep] + [None] * (c.out.dim() - keep) if isinstance(c.out, torch.Tensor) else None
    if isinstance(c.out, tuple):  # return_indices
        return [TL(list(out or dims)) for _ in c.out]
    return TL(out)


@register_rule(F.grid_sample)
def grid_sample(c: RuleCall) -> Any:
    """Each channel is sampled on its own at the grid's points (RAFT's correlation lookup): the input's
    channels pass; the grid holds coordinates, so any channels it carries stay."""
    for v in arg_dims(c, 1, "grid")[1]:
        _freeze(c, v)
    return spatial(c)


@register_rule(F.glu, nn.GLU)
def glu(c: RuleCall) -> Any:
    """`glu(x, dim)` = first half * sigmoid(second half): channel i of each half make output i together, so
    the halves prune alike (the conformer's and gated CNNs' pointwise conv stays prunable)."""
    x = c.args[0] if c.args else None
    if not isinstance(x, torch.Tensor) or not isinstance(c.out, torch.Tensor):
        return opaque(c)
    d = int(c.module.dim if isinstance(c.module, nn.GLU) else c.arg(1, "dim", -1)) % x.dim()
    dims = _dims_of(c, 0, x)
    v = dims[d]
    if v is not None:
        half = x.shape[d] // 2
        c.a.uf.union_vecs(v[:half], v[half:])
        dims[d] = v[:half].copy()
    return TL(dims)


# ----------------------------------------------------------------------------------------------
# products


# Declared opaque: channels stop here, on purpose. Recurrent cells and bilinear layers mix or
# create features in ways no rule models yet; arange / linspace / meshgrid make positions; gathers
# and unfold/fold move or mix channels. (Creation from sizes, new_zeros & co: sizes.py.)
mark_opaque(nn.Bilinear, nn.EmbeddingBag, nn.RNNCell, nn.LSTMCell, nn.GRUCell,
            F.one_hot, F.unfold, F.fold,
            torch.arange, torch.linspace, torch.meshgrid,
            T.index_select, torch.index_select, T.gather, torch.gather, T.unfold, T.__rmatmul__,
            torch.mv, T.mv, torch.dot, T.dot, torch.inner, T.inner, torch.tensordot, torch.outer, T.outer,
            torch.ger, T.ger, torch.addmv, T.addmv, torch.addbmm, T.addbmm, torch.linalg.multi_dot,
            torch.chain_matmul, F.bilinear,
            operator.getitem, ShapeGuard, TrainingFlag)
# The functional attention WavLM calls with its own weights: counted (amc.graph.macs), channels not modelled
mark_opaque(F.multi_head_attention_forward)
