"""The graph edit: a NEW network where each chosen layer is two thinner layers (the input is never edited).

    C --[k x k conv, C->N]--> N      becomes      C --[k x k conv, C->r, no bias]--> r --[1x1 conv, r->N]--> N
    in --[Linear in->out]--> out     becomes      in --[Linear in->r, no bias]--> r --[Linear r->out]--> out

The first factor is inserted as node ``<name>.lr0`` reading the original node's inputs; the second
keeps the original node's NAME (and module key), so every consumer's ``Ref`` stays valid. A folded BN
node disappears and its users read the second factor instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn

from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ...graph.ops import plain_layer
from ...graph.template import Ref, rename_refs
from .eligible import LayerInfo
from .factorize import Factors

__all__ = ["decompose"]


def _factor_modules(info: LayerInfo, orig: nn.Module, factors: Factors) -> Tuple[nn.Module, nn.Module]:
    """The two layers replacing `orig`, on its device and dtype and in its train/eval mode."""
    A, P, bias = factors
    dev, dtype = orig.weight.device, orig.weight.dtype
    r = A.shape[0]
    if info.kind == "conv":  # the same convolution class (1d, 2d or 3d): its kernel, then a 1x..x1 mix
        conv = plain_layer(orig, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        first = conv(info.C, r, orig.kernel_size, stride=orig.stride, padding=orig.padding,
                     dilation=orig.dilation, bias=False, padding_mode=orig.padding_mode)
        first.weight.data = A.reshape(r, info.C, *orig.kernel_size).to(dev, dtype).contiguous()
        second = conv(r, info.N, 1, bias=bias is not None)
        second.weight.data = P.reshape(info.N, r, *[1] * len(orig.kernel_size)).to(dev, dtype).contiguous()
    else:
        first = nn.Linear(info.C, r, bias=False)
        first.weight.data = A.to(dev, dtype).contiguous()
        second = nn.Linear(r, info.N, bias=bias is not None)
        second.weight.data = P.to(dev, dtype).contiguous()
    if bias is not None:
        second.bias.data = bias.to(dev, dtype).contiguous()
    first.train(orig.training)
    second.train(orig.training)
    return first, second


def _factor_metas(src: ReconstructedNetwork, node: Node, info: LayerInfo, first: nn.Module, second: nn.Module,
                  extra: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Node metadata of the two factors: op, output description (rank r between them), and `lowrank`."""
    r = first.weight.shape[0]
    out_desc = node.meta.get("out")
    if info.bn:
        out_desc = src.node(info.bn).meta.get("out", out_desc)
    out0 = None
    if isinstance(out_desc, dict) and "shape" in out_desc:
        shape = list(out_desc["shape"])
        shape[1 if info.kind == "conv" else -1] = r
        out0 = {**out_desc, "shape": shape}
    lr = {"rank": int(r), "factor": 0, "of": node.name, **dict(extra)}
    if info.bn:
        lr["folded_bn"] = info.bn
    meta0 = {**node.meta, "op": type(first).__name__, "out": out0, "lowrank": lr}
    if "target" in meta0:
        meta0["target"] = f"{meta0['target']}.lr0"
    meta1 = {**node.meta, "op": type(second).__name__, "out": out_desc, "lowrank": {**lr, "factor": 1}}
    return meta0, meta1


def decompose(net: ReconstructedNetwork, factors: Mapping[str, Factors], infos: Mapping[str, LayerInfo],
              copy: bool = True, extra_meta: Optional[Mapping[str, dict]] = None) -> ReconstructedNetwork:
    """A new network where each layer in `factors` ({name: (A, P, bias)}) is split in two.

    `copy=False` shares the untouched modules with `net` (cheap; for throw-away evaluation only).
    """
    src = net.copy() if copy else net
    modules: Dict[str, nn.Module] = dict(src.network.items())
    rename: Dict[str, str] = {}
    drop = {infos[n].bn for n in factors if infos[n].bn}
    nodes: List[Node] = []
    for node in src.layer_nodes:
        if node.name in drop:
            modules.pop(node.module, None)
            continue
        args = rename_refs(node.args, rename) if rename else node.args
        kwargs = rename_refs(node.kwargs, rename) if rename else node.kwargs
        if node.name not in factors:
            nodes.append(dataclasses.replace(node, args=args, kwargs=dict(kwargs), meta=dict(node.meta)))
            continue
        info = infos[node.name]
        first, second = _factor_modules(info, src.network[node.module], factors[node.name])
        key0 = node.module + "_lr0"
        while key0 in modules:
            key0 += "_"
        modules[key0] = first
        modules[node.module] = second
        meta0, meta1 = _factor_metas(src, node, info, first, second, (extra_meta or {}).get(node.name, {}))
        nodes.append(Node(node.name + ".lr0", key0, args, dict(kwargs), meta0))
        nodes.append(Node(node.name, node.module, (Ref(node.name + ".lr0"),), {}, meta1))
        if info.bn:
            rename[info.bn] = node.name
    outputs = rename_refs(src.outputs, rename) if rename else src.outputs
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, outputs, dict(src.meta))
    new.train(src.training)
    new.lint()
    return new
