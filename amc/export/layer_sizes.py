"""How a torch.nn layer's size attributes follow tensors that were resized under it.

A pruned tensor written into a layer from outside its forward (a conv or linear whose weight the model reads
as `self.conv1d.weight`, a checkpoint's smaller tensors) leaves `in_features`, `out_channels`, `groups`...
describing the old layer; code that reads them (`F.conv1d(x, conv.weight, groups=conv.groups)`, a cache
sized from `conv.out_channels`) would then compute with the old sizes.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.nn as nn

from ..graph import reparam

Shapes = Dict[str, list]


def _resize_conv(m: nn.Module, s: Shapes) -> None:
    """Channels per group stay as built: a depthwise conv that lost channels lost groups; a grouped conv
    whose groups each lost input channels keeps its group count. The weight alone cannot tell a grouped
    conv that lost only outputs from one that lost groups: a `groups` the pruned network ran with wins."""
    out, per_group_in = s["weight"][0], s["weight"][1]
    multiplier = m.out_channels // m.groups
    if "groups" in s:
        m.groups = s["groups"][0]
    elif per_group_in == m.in_channels // m.groups and out % multiplier == 0 and m.groups > 1:
        m.groups = out // multiplier
    m.out_channels, m.in_channels = out, per_group_in * m.groups


def _resize_bn(m: nn.Module, s: Shapes) -> None:
    m.num_features = s["running_mean"][0]


def _resize_gn(m: nn.Module, s: Shapes) -> None:
    """Pruning removes whole groups: as many channels per group as the layer was built with; one group
    (timm's GroupNorm1, a LayerNorm over channels and space) stays one."""
    per_group = m.num_channels // m.num_groups
    m.num_channels = s["weight"][0]
    m.num_groups = 1 if m.num_groups == 1 else m.num_channels // per_group


#: {layer class: fn(layer, {tensor name: shape})}
RESIZE: Dict[type, Callable[[nn.Module, Shapes], None]] = {
    nn.Linear: lambda m, s: (setattr(m, "out_features", s["weight"][0]), setattr(m, "in_features", s["weight"][1])),
    nn.LayerNorm: lambda m, s: setattr(m, "normalized_shape", tuple(s.get("weight") or s.get("bias"))),
    nn.Embedding: lambda m, s: (setattr(m, "num_embeddings", s["weight"][0]),
                                setattr(m, "embedding_dim", s["weight"][1])),
    nn.Conv1d: _resize_conv, nn.Conv2d: _resize_conv, nn.Conv3d: _resize_conv,
    nn.BatchNorm1d: _resize_bn, nn.BatchNorm2d: _resize_bn, nn.GroupNorm: _resize_gn,
}


def resizer(cls: type) -> Optional[Callable[[nn.Module, Shapes], None]]:
    """The entry of `cls` or of the torch.nn class it derives from (transformers' ConvNextLayerNorm is an
    nn.LayerNorm that F.layer_norm's its input with `self.normalized_shape`)."""
    return next((RESIZE[k] for k in cls.__mro__ if k in RESIZE), None)


def follow_tensors(module: nn.Module, known: Optional[Shapes] = None) -> bool:
    """Set a torch.nn layer's size attributes from the tensors it holds now (a weight-normed or masked
    weight: the one it computes) and `known` sizes (`{"groups": [2]}` read from the pruned network); False
    for a class with no entry (left as it is)."""
    resize = resizer(reparam.base_class(module))
    if resize is None:
        return False
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    shapes = {**(known or {}), **{k: list(v.shape) for k, v in own}}
    resize(module, {**shapes, **{a: list(reparam.computed(module, a).shape) for a in reparam.computed_weights(module)}})
    return True
