"""Attribute rules for convolutional blocks that compute sizes from attributes: timm's BlurPool, MetaFormer
scale, CSP, MixNet, RexNet, Res2Net, SelectiveKernel, and Mamba's mixer."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from .attribute_rules import register_attribute_rule

def _filter_channels(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """A depthwise fixed filter (timm's BlurPool2d: `F.conv2d(x, self.filt, groups=self.channels)`): one filter
    row per channel kept."""
    return {"channels": int(module.filt.shape[0])}


register_attribute_rule(lambda m: isinstance(getattr(m, "channels", None), int) and not isinstance(m.channels, bool)
                        and isinstance(getattr(m, "filt", None), torch.Tensor) and m.filt.dim() == 4
                        and m.filt.shape[1] == 1, _filter_channels)


def _scale_shape(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's MetaFormer `Scale` multiplies by `self.scale.view(self.shape)`, shape `(dim, 1, 1)`."""
    return {"shape": (int(module.scale.numel()),) + tuple(module.shape[1:])}


register_attribute_rule(lambda m: isinstance(getattr(m, "scale", None), torch.Tensor) and m.scale.dim() == 1
                        and isinstance(getattr(m, "shape", None), tuple) and len(m.shape) >= 1
                        and all(type(v) is int for v in m.shape) and all(v == 1 for v in m.shape[1:]), _scale_shape)


def _state_space_sizes(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """Mamba's mixer splits `x_proj`'s output by `time_step_rank` and `ssm_state_size` and sizes its cache by
    `intermediate_size`: read them back from `A_log [intermediate, state]` and `dt_proj [intermediate, rank]`."""
    a_log, dt, inp = getattr(module, "A_log", None), getattr(module, "dt_proj", None), getattr(module, "in_proj", None)
    if not (isinstance(a_log, torch.Tensor) and a_log.dim() == 2
            and isinstance(getattr(dt, "weight", None), torch.Tensor)):
        return {}
    sizes = {"intermediate_size": a_log.shape[0], "ssm_state_size": a_log.shape[1],
             "time_step_rank": dt.weight.shape[1], "hidden_size": getattr(getattr(inp, "weight", None), "shape",
                                                                          (None, None))[1]}
    return {k: int(v) for k, v in sizes.items() if isinstance(v, int) and isinstance(getattr(module, k, None), int)}


register_attribute_rule(lambda m: all(isinstance(getattr(m, a, None), int)
                                      for a in ("ssm_state_size", "time_step_rank")), _state_space_sizes)


def _csp_split(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's CSP stages split `conv_exp`'s output in halves, `x.split(self.expand_chs // 2)`: the pruned
    width (halves pruned to different sizes cannot be written this way: the output check refuses them)."""
    return {"expand_chs": int(module.conv_exp.conv.out_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "expand_chs", None), int)
                        and isinstance(getattr(getattr(m, "conv_exp", None), "conv", None), nn.Conv2d), _csp_split)


def _mixed_conv_splits(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's MixedConv2d (MixNet) splits its input by `self.splits`, one piece per kernel size: the
    pruned convs' input widths."""
    convs = list(module.values())
    return {"splits": [int(c.in_channels) for c in convs], "in_channels": sum(int(c.in_channels) for c in convs),
            "out_channels": sum(int(c.out_channels) for c in convs)}


register_attribute_rule(lambda m: isinstance(m, nn.ModuleDict) and isinstance(getattr(m, "splits", None), list)
                        and len(m) == len(m.splits) and all(isinstance(c, nn.Conv2d) for c in m.values()),
                        _mixed_conv_splits)


def _partial_shortcut(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's RexNet block adds its input to the first `in_channels` of its output (`x[:, 0:self.in_channels]
    + shortcut`): the pruned input width; kept channels keep their order, so the added ones stay first."""
    first = module.conv_exp if module.conv_exp is not None else module.conv_dw
    return {"in_channels": int(first.conv.in_channels), "out_channels": int(module.conv_pwl.conv.out_channels)}


register_attribute_rule(lambda m: all(isinstance(getattr(m, a, None), int) for a in ("in_channels", "out_channels"))
                        and isinstance(getattr(m, "use_shortcut", None), bool) and hasattr(m, "conv_exp")
                        and isinstance(getattr(getattr(m, "conv_pwl", None), "conv", None), nn.Conv2d)
                        and isinstance(getattr(getattr(m, "conv_dw", None), "conv", None), nn.Conv2d),
                        _partial_shortcut)


def _scale_width(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's Res2Net block splits `conv1`'s output in pieces of `self.width`, one per scale: the pruned
    convs' width (pieces pruned to different widths cannot be written this way: the output check refuses)."""
    return {"width": int(module.convs[0].in_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "width", None), int)
                        and isinstance(getattr(m, "convs", None), nn.ModuleList)
                        and len(m.convs) > 0 and isinstance(m.convs[0], nn.Conv2d)
                        and isinstance(getattr(m, "conv1", None), nn.Conv2d), _scale_width)


def _path_widths(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's SelectiveKernel splits its input by `self.in_channels // self.num_paths` when `split_input`:
    the pruned paths' widths."""
    convs = [p.conv for p in module.paths]
    width = sum(int(c.in_channels) for c in convs) if module.split_input else int(convs[0].in_channels)
    return {"in_channels": width, "out_channels": int(convs[0].out_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "split_input", None), bool)
                        and isinstance(getattr(m, "in_channels", None), int)
                        and isinstance(getattr(m, "paths", None), nn.ModuleList)
                        and all(isinstance(getattr(p, "conv", None), nn.Conv2d) for p in m.paths), _path_widths)
