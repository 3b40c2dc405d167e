"""Rules of the layers with parameters (conv, linear, norms, PReLU, parameters used directly), their
hard-prune resize, their silencing role, and the layer-norm edits (soft pruning swaps in mask-aware norms)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...export.json_io import register_json_op
from ...graph.macs import conv_macs
from ...graph.ops import Constant, ParamHolder, register_op
from ..dependency import TL, Fixup, RuleCall, Vec, unlabeled_like
from ...graph.network import ReconstructedNetwork

from .common import arg_dims, _dims_of, _freeze, _tl
from .registry import opaque, register_rule

T = torch.Tensor
KeepFn = Callable[[np.ndarray], np.ndarray]


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
    laid = [d for d in range(ch + 1, x.dim()) if dims[d] is not None]
    if laid == [x.dim() - 1] and _keeps_positions(m, x, c.out):
        # channels laid out along a Conv1d's length (ECA's conv over the pooled channels, CoaT's
        # [B, 3, C]): each output position is its input position, so the label passes; a kernel wider
        # than 1 reads neighbours, which hard pruning restores (`ConvOverKeptChannels`)
        out_dims[-1] = dims[-1]
        if m.kernel_size[0] > 1:
            c.a.fixup(name, fix_conv_over_channels, vec=dims[-1])
    else:
        for d in laid:              # along any other spatial axis they are mixed by the kernel and
            c.a.uf.freeze(dims[d])  # stay whole
    if m.groups == 1:
        c.a.axis(name, "weight", win, cin)
        new = c.a.new_space(name, m.out_channels)
        c.a.axis(name, "weight", wout, new)
        if m.bias is not None:
            c.a.axis(name, "bias", 0, new)
        out_dims[ch] = new
    elif not transposed and m.groups == m.in_channels == m.out_channels:
        if cin is None:
            # the input's channels are not tracked, so it cannot lose the channel a removed output
            # reads: the depthwise output is kept whole
            cin = c.a.new_space(name, m.out_channels)
            c.a.uf.freeze(cin)
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
    elif not transposed:
        # grouped with in != out (SENet-154's widening 3x3, ResNeSt's radix conv), or an untracked input:
        # input and output offsets are each coupled across groups, so every group keeps the same count
        if cin is not None:
            gin = cin.reshape(m.groups, -1)
            for row in gin[1:]:
                c.a.uf.union_vecs(gin[0], row)
            c.a.axis(name, "weight", win, gin[0].copy())
        new = c.a.new_space(name, m.out_channels)
        gout = new.reshape(m.groups, -1)
        for row in gout[1:]:
            c.a.uf.union_vecs(gout[0], row)
        c.a.axis(name, "weight", wout, new)
        if m.bias is not None:
            c.a.axis(name, "bias", 0, new)
        out_dims[ch] = new
    else:
        c.a.uf.freeze(cin)
    return TL(out_dims)


def _keeps_positions(m: nn.Module, x: torch.Tensor, out: Any) -> bool:
    return (type(m) in (nn.Conv1d, ConvOverKeptChannels) and m.stride == (1,) and isinstance(out, torch.Tensor)
            and out.shape[-1] == x.shape[-1] and (m.kernel_size[0] > 1 or m.padding in ((0,), "valid")))


class ConvOverKeptChannels(nn.Conv1d):
    """A Conv1d whose length axis holds channels, some pruned (ECA): the kept channels go back to their
    original positions with zeros between, as soft pruning leaves them, so the kernel reads the same
    neighbours; then the kept positions are read out. Exact, and the conv is tiny."""

    def __init__(self, *args: Any, length: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.length = length
        self.register_buffer("keep_idx", torch.arange(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(*x.shape[:-1], self.length).index_copy(-1, self.keep_idx, x)
        return super().forward(full).index_select(-1, self.keep_idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, length={self.length}"


def _conv1d_config(m: nn.Conv1d) -> Dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def fix_conv_over_channels(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if mode != "hard" or keep.all():
        return  # soft: the silenced channels are zeros along the length already
    key = net.node(fx.node).module
    conv = net.network[key]
    if isinstance(conv, ConvOverKeptChannels):
        length, kept = conv.length, conv.keep_idx[torch.from_numpy(keep)]
    else:
        length, kept = len(keep), torch.from_numpy(keep).nonzero().flatten()
    new = ConvOverKeptChannels(**_conv1d_config(conv), length=length)
    new.weight, new.bias, new.keep_idx = conv.weight, conv.bias, kept
    net.network[key] = new.train(conv.training)


def _macs_over_kept(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    return conv_macs(m, args, kwargs, out) * m.length // max(out.shape[-1], 1)  # it runs at full length


register_op(ConvOverKeptChannels, like=nn.Conv1d, leaf=True, macs=_macs_over_kept,
            drop_in_for=nn.Conv1d)  # to_module puts it where the model's Conv1d was (ECA calls self.conv(y))


def _conv_over_kept_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    m = cls(**config)
    m.keep_idx = tensors["keep_idx"]
    return m


register_json_op(ConvOverKeptChannels, to_config=lambda m: {**_conv1d_config(m), "length": m.length},
                 from_config=_conv_over_kept_build)


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


@register_rule(nn.Embedding)
def embedding(c: RuleCall) -> Any:
    """An embedding's columns are its output channels (a text transformer's residual width); the indices
    carry none and the vocabulary rows stay whole. max_norm renormalises whole rows, so it keeps them all."""
    m, idx = c.module, c.arg(0, "input")
    if not isinstance(idx, torch.Tensor):
        return opaque(c)
    c.a.freeze_all(c.largs)
    c.a.freeze_all(c.lkwargs)
    new = c.a.new_space(c.node.name, m.embedding_dim)
    c.a.axis(c.node.name, "weight", 1, new)
    if m.max_norm is not None:
        c.a.uf.freeze(new)
    return TL([None] * idx.dim() + [new])


@register_rule(F.embedding)
def f_embedding(c: RuleCall) -> Any:
    """`F.embedding(indices, weight)`: the weight's columns are the output channels, as for nn.Embedding."""
    (idx, didx), (w, dw) = arg_dims(c, 0, "input"), arg_dims(c, 1, "weight")
    if not isinstance(idx, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return opaque(c)
    for v in didx:
        c.a.uf.freeze(v)
    c.a.uf.freeze(dw[0])  # rows are looked up by value
    if c.arg(3, "max_norm") is not None:
        c.a.uf.freeze(dw[1])
    return TL([None] * idx.dim() + [dw[1]])


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
               nn.InstanceNorm3d)
def batchnorm(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    ch = 1 if x.dim() > 1 else 0
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and x.dim() == len(_spatial_of(m)) + 1:
        ch = 0
    held = [attr for attr in ("weight", "bias", "running_mean", "running_var") if getattr(m, attr, None) is not None]
    for attr in held:
        c.a.axis(name, attr, 0, dims[ch])
    if not held and dims[ch] is not None:  # InstanceNorm(affine=False): no tensor tells its new size
        c.a.fixup(name, fix_num_features, vec=dims[ch])
    return TL(dims)


def fix_num_features(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """A norm without tensors learns its kept width here (torch warns when num_features disagrees)."""
    if mode == "hard":
        net.module_of(fx.node).num_features = int(keep_of(fx.data["vec"]).sum())


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
        c.a.fixup(name, fix_layernorm, vec=dims[-1])
    return TL(dims)


def _group_units(c: RuleCall, cin: Vec, groups: int) -> None:
    """GroupNorm's channels go a whole group at a time: the kept groups normalise over exactly what
    they did, so the prune is exact for them and the group count shrinks. With one group (timm's
    GroupNorm1) channels go one by one, as through a LayerNorm: the statistics follow the kept ones."""
    if groups > 1:
        grid = cin.reshape(groups, -1)
        for col in grid.T[1:]:
            c.a.uf.union_vecs(grid[:, 0].copy(), col.copy())


@register_rule(nn.GroupNorm)
def groupnorm(c: RuleCall) -> Any:
    m, x, name = c.module, c.args[0], c.node.name
    dims = _dims_of(c, 0, x)
    cin = dims[1] if x.dim() > 1 else None
    if cin is None:
        return TL(dims)
    _group_units(c, cin, m.num_groups)
    for attr in ("weight", "bias"):
        if getattr(m, attr, None) is not None:
            c.a.axis(name, attr, 0, cin)
    c.a.fixup(name, fix_groupnorm, vec=cin, per_group=m.num_channels // m.num_groups, groups=m.num_groups)
    return TL(dims)


@register_rule(F.group_norm)
def f_group_norm(c: RuleCall) -> Any:
    x = c.args[0]
    dims = _dims_of(c, 0, x)
    groups = c.arg(1, "num_groups")
    cin = dims[1] if x.dim() > 1 else None
    if cin is None or not isinstance(groups, int):
        return opaque(c)
    _group_units(c, cin, int(groups))
    for i, key in ((2, "weight"), (3, "bias")):
        p, dp = arg_dims(c, i, key)
        if isinstance(p, torch.Tensor):
            c.a.uf.union_vecs(dp[0], cin)
    c.a.fixup(c.node.name, fix_functional_groupnorm, vec=cin, per_group=x.shape[1] // int(groups),
              groups=int(groups))
    return TL(dims)


def fix_groupnorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Hard: the group count follows the kept channels. Soft: a silenced group outputs 0 as it is;
    with one group the statistics must skip the silenced channels (MaskedGroupNorm)."""
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    key = net.node(fx.node).module
    gn = net.network[key]
    if mode == "hard":
        gn.num_channels = int(keep.sum())
        gn.num_groups = 1 if fx.data["groups"] == 1 else gn.num_channels // fx.data["per_group"]
    elif fx.data["groups"] == 1 and not isinstance(gn, MaskedGroupNorm):
        net.network[key] = MaskedGroupNorm(torch.from_numpy(keep), gn)


def fix_functional_depthwise(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Hard: `groups` of a depthwise `F.conv*` call is its kept channel count."""
    keep = keep_of(fx.data["vec"])
    if mode != "hard" or keep.all():
        return
    node = net.node(fx.node)
    if len(node.args) > 6:
        node.args = tuple(node.args[:6]) + (int(keep.sum()),) + tuple(node.args[7:])
    else:
        node.kwargs["groups"] = int(keep.sum())


def fix_functional_groupnorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    node = net.node(fx.node)
    if mode == "hard":
        groups = 1 if fx.data["groups"] == 1 else int(keep.sum()) // fx.data["per_group"]
        if len(node.args) > 1:
            node.args = (node.args[0], groups) + tuple(node.args[2:])
        else:
            node.kwargs["num_groups"] = groups
    elif fx.data["groups"] == 1:
        net.network[node.module] = MaskedGroupNorm(torch.from_numpy(keep))


class MaskedGroupNorm(nn.Module):
    """One-group GroupNorm over the kept channels only; pruned channels output 0 (soft pruning). Wraps
    the module, or stands in for `F.group_norm(x, 1, weight, bias, eps)` when `gn` is None."""

    def __init__(self, keep: torch.Tensor, gn: Optional[nn.GroupNorm] = None):
        super().__init__()
        self.gn = gn
        self.register_buffer("keep_idx", torch.nonzero(keep).flatten())

    def forward(self, x: torch.Tensor, num_groups: int = 1, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
        if self.gn is not None:
            weight, bias, eps = self.gn.weight, self.gn.bias, self.gn.eps
        idx = self.keep_idx
        y = torch.zeros_like(x)
        y[:, idx] = F.group_norm(x[:, idx], 1, None if weight is None else weight[idx],
                                 None if bias is None else bias[idx], eps)
        return y


@register_rule(nn.LocalResponseNorm, nn.ChannelShuffle)
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
    (x, dx), (w, dw), (b, db) = arg_dims(c, 0, "input"), arg_dims(c, 1, "weight"), arg_dims(c, 2, "bias")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return opaque(c)
    c.a.uf.union_vecs(dw[1], dx[-1]) if (dw[1] is not None or dx[-1] is not None) else None
    if isinstance(b, torch.Tensor):
        c.a.uf.union_vecs(db[0], dw[0]) if (db[0] is not None or dw[0] is not None) else None
    return TL(dx[:-1] + [dw[0]])


@register_rule(F.conv1d, F.conv2d, F.conv3d)
def f_conv(c: RuleCall) -> Any:
    (x, dx), (w, dw) = arg_dims(c, 0, "input"), arg_dims(c, 1, "weight")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return opaque(c)
    groups = c.arg(6, "groups", 1)
    ch = x.dim() - (w.dim() - 2) - 1
    for kernel in dw[2:]:  # a kernel's spatial extent is never a channel
        _freeze(c, kernel)
    if groups != 1 and groups == x.shape[ch] == w.shape[0]:  # depthwise (timm's Conv2dSame): i in, i out
        _freeze(c, dw[1])
        c.a.uf.union_vecs(dw[0], dx[ch]) if (dw[0] is not None or dx[ch] is not None) else None
        b, db = arg_dims(c, 2, "bias")
        if isinstance(b, torch.Tensor):
            c.a.uf.union_vecs(db[0], dw[0]) if (db[0] is not None or dw[0] is not None) else None
        out = [None] * c.out.dim()
        out[:ch + 1] = dx[:ch + 1]
        if out[ch] is not None:
            c.a.fixup(c.node.name, fix_functional_depthwise, vec=out[ch])
        return TL(out)
    if groups != 1:  # grouped (NFNet's ScaledStdConv2d): offsets coupled across groups, as the module rule
        for vec in (dx[ch], dw[0]):
            if vec is not None:
                grid = vec.reshape(groups, -1)
                for row in grid[1:]:
                    c.a.uf.union_vecs(grid[0], row)
        cin = dx[ch].reshape(groups, -1)[0].copy() if dx[ch] is not None else None
        c.a.uf.union_vecs(dw[1], cin) if (dw[1] is not None or cin is not None) else None
    else:
        c.a.uf.union_vecs(dw[1], dx[ch]) if (dw[1] is not None or dx[ch] is not None) else None
    b, db = arg_dims(c, 2, "bias")
    if isinstance(b, torch.Tensor):
        c.a.uf.union_vecs(db[0], dw[0]) if (db[0] is not None or dw[0] is not None) else None
    out = [None] * c.out.dim()
    out[:ch] = dx[:ch]
    out[ch] = dw[0]
    return TL(out)


@register_rule(F.layer_norm, F.rms_norm)
def f_layer_norm(c: RuleCall) -> Any:
    """`F.layer_norm` / `F.rms_norm` over the last dim: channels go, the statistics follow the kept ones."""
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
        rms = getattr(c.module, "fn", None) is F.rms_norm
        c.a.fixup(c.node.name, fix_functional_layernorm, vec=dims[-1], rms=rms)
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
    from_input = bool(c.arg(5, "use_input_stats" if getattr(c.module, "fn", None) is F.instance_norm
                            else "training", getattr(c.module, "fn", None) is F.instance_norm))
    if from_input:  # statistics over the other dims (NFNet's weight standardisation: a weight's inputs)
        stats = [d for d in range(2 if getattr(c.module, "fn", None) is F.instance_norm else 0, x.dim())
                 if d != 1 and dims[d] is not None]
        for d in stats[1:]:
            _freeze(c, dims[d])
        if stats:
            from .reductions import fix_statistics

            c.a.fixup(c.node.name, fix_statistics, vec=dims[stats[0]], dim=stats[0])
    return TL(dims)


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


class MaskedFunctionalRMSNorm(nn.Module):
    """`F.rms_norm` over the kept channels only (soft pruning of a traced-into RMSNorm)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep_idx", torch.nonzero(keep).flatten())

    def forward(self, x: torch.Tensor, normalized_shape: Any = None, weight: Optional[torch.Tensor] = None,
                eps: Optional[float] = None) -> torch.Tensor:
        idx = self.keep_idx
        y = torch.zeros_like(x)
        y[..., idx] = F.rms_norm(x[..., idx], (len(idx),), None if weight is None else weight[idx], eps)
        return y


# Hard pruning slices parameters; each entry's `resize` makes the module's size attributes agree again.

def _resize_conv(m: nn.Module) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    elif m.groups > 1 and m.groups == m.in_channels == m.out_channels:
        m.groups = m.in_channels = m.out_channels = w.shape[0]
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _resize_linear(m: nn.Module) -> None:
    m.out_features, m.in_features = m.weight.shape


def _resize_batchnorm(m: nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


def _resize_layernorm(m: nn.Module) -> None:
    if m.weight is not None:
        m.normalized_shape = (m.weight.shape[0],)


def _resize_prelu(m: nn.Module) -> None:
    m.num_parameters = m.weight.numel()


def _resize_embedding(m: nn.Module) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


register_op(*_CONVS, resize=_resize_conv)
register_op(*_TCONVS, resize=_resize_conv)
register_op(nn.Linear, resize=_resize_linear, role="producer")
register_op(*_CONVS, role="producer")
register_op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
            resize=_resize_batchnorm, role="norm")
register_op(nn.LayerNorm, resize=_resize_layernorm, role="norm")
register_op(nn.GroupNorm, role="norm")
register_op(nn.PReLU, resize=_resize_prelu)
register_op(nn.Embedding, resize=_resize_embedding, role="embedding")


def fix_layernorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    key = net.node(fx.node).module
    ln = net.network[key]
    if mode == "hard":
        ln.normalized_shape = (int(keep.sum()),)
    elif not isinstance(ln, MaskedLayerNorm):
        net.network[key] = MaskedLayerNorm(ln, torch.from_numpy(keep))


def fix_functional_layernorm(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
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
        masked = MaskedFunctionalRMSNorm if fx.data.get("rms") else MaskedFunctionalLayerNorm
        net.network[node.module] = masked(torch.from_numpy(keep))

