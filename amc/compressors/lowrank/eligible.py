"""The layers a low-rank pass can split, and what it needs to know about each (`LayerInfo`).

A layer is eligible when it is a Conv1d/2d/3d with groups=1 or a Linear, called once, on one input. Its
weight is read as a `[N, C*k2]` float64 matrix with its sole BatchNorm2d user folded in (`fold_bn`), so
the factorisation approximates the response the next layer sees; the activation after it (ReLU/ReLU6)
is what the nonlinear case reconstructs through.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ...graph.ops import FunctionOp, plain_layer
from ...graph.template import iter_refs

__all__ = ["LayerInfo", "lowrank_rank", "eligible_layers", "output_layers"]

_RELU_FNS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.relu_: "relu", torch.relu_: "relu"}


@dataclass
class LayerInfo:
    """One decomposable layer: a Conv1d/2d/3d (groups=1) or a Linear node, plus its folded BN and activation."""

    name: str  # the conv / linear node
    kind: str  # "conv" | "linear"
    C: int  # input channels (features)
    k2: int  # kernel area (1 for Linear)
    N: int  # output channels (features)
    positions: int  # output positions per sample (H*W for a conv)
    bn: Optional[str] = None  # BatchNorm2d node folded into this layer
    act: Optional[str] = None  # "relu" / "relu6" when the (folded) output feeds only that activation
    has_bias: bool = False
    bn_macs: int = 0  # MACs of the folded BN (removed with it)
    weight: Optional[torch.Tensor] = field(default=None, repr=False)  # [N, C*k2] float64, BN folded
    bias: Optional[torch.Tensor] = field(default=None, repr=False)  # [N] float64 (zeros if none)

    @property
    def fan_in(self) -> int:
        return self.C * self.k2

    @property
    def max_rank(self) -> int:
        """Largest rank that still saves weight MACs: floor(C k^2 N / (C k^2 + N))."""
        return max(1, (self.fan_in * self.N) // (self.fan_in + self.N))

    @property
    def full_rank(self) -> int:
        return min(self.N, self.fan_in)

    @property
    def observed(self) -> str:
        """The node whose output the factors approximate: the folded BN, else the layer itself."""
        return self.bn or self.name

    def keeps_bias(self, method: str) -> bool:
        """Whether the second factor has a bias: always for data-driven factors (they shift by the
        response mean), for SVD only where the layer had one (or a folded BN)."""
        return method == "data" or self.has_bias or self.bn is not None

    def macs_before(self) -> int:
        """MACs of the layer (and its folded BN) as `amc.count` measures them, per sample."""
        return self.positions * (self.fan_in * self.N + (self.N if self.has_bias else 0)) + self.bn_macs

    def macs_after(self, r: int, bias: bool = True) -> int:
        return self.positions * (r * self.fan_in + r * self.N + (self.N if bias else 0))

    def rank_for_ratio(self, ratio: float) -> int:
        return lowrank_rank(self.C, self.k2, self.N, ratio)


def lowrank_rank(C: int, k2: int, N: int, ratio: float) -> int:
    """Rank that removes at least `ratio` of a C->N layer's weight MACs (k2: kernel area; >= 1)."""
    return max(1, int(math.floor((1.0 - float(ratio)) * C * k2 * N / (C * k2 + N) + 1e-9)))


def _act_of(net: ReconstructedNetwork, node: Node) -> Optional[str]:
    mod = net.network[node.module]
    if isinstance(mod, nn.ReLU6):
        return "relu6"
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.Hardtanh) and float(mod.min_val) == 0.0 and float(mod.max_val) == 6.0:
        return "relu6"
    if isinstance(mod, FunctionOp):
        try:
            return _RELU_FNS.get(mod.fn)
        except TypeError:
            return None
    return None


def _single_input(node: Node) -> Optional[str]:
    refs = list(iter_refs((node.args, node.kwargs)))
    if len(node.args) != 1 or node.kwargs or len(refs) != 1 or refs[0].path:
        return None
    return refs[0].node


def output_layers(net: ReconstructedNetwork, infos: Mapping[str, LayerInfo]) -> List[str]:
    """The decomposable layers that write a network output, directly or through parameter-free
    single-input nodes (flatten, dropout, an activation, a folded BN): a classifier's last Linear."""
    by_name = {n.name: n for n in net.layer_nodes}
    found: List[str] = []
    for ref in iter_refs(net.outputs):
        name = ref.node
        for _ in range(len(by_name)):
            if name in infos:
                found.append(name)
                break
            node = by_name.get(name)
            src = _single_input(node) if node is not None else None
            if src is None:
                break
            mod = net.network[node.module]
            if type(mod) is not nn.BatchNorm2d and any(True for _ in mod.parameters()):
                break  # a layer with weights of its own sits between: that one writes the output
            name = src
    return list(dict.fromkeys(found))


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # audio, image and video convolutions
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _describe(node: Node, mod: nn.Module) -> Optional[LayerInfo]:
    """The LayerInfo of a Conv1d/2d/3d (groups=1) / Linear node with a recorded output shape, weights unfolded."""
    if isinstance(mod, _CONVS) and mod.groups != 1:
        return None
    shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
    if not shape:
        return None
    if isinstance(mod, _CONVS):
        info = LayerInfo(node.name, "conv", mod.in_channels, int(np.prod(mod.kernel_size)), mod.out_channels,
                         int(np.prod(shape[2:])), has_bias=mod.bias is not None)
    else:
        info = LayerInfo(node.name, "linear", mod.in_features, 1, mod.out_features,
                         int(np.prod(shape[1:-1])) if len(shape) > 1 else 1, has_bias=mod.bias is not None)
    info.weight = mod.weight.detach().double().reshape(info.N, -1).cpu()
    info.bias = mod.bias.detach().double().cpu() if mod.bias is not None else torch.zeros(info.N, dtype=torch.float64)
    return info


def _fold_bn(info: LayerInfo, bn_node: Node, bn: nn.BatchNorm2d) -> bool:
    """Fold eval-mode BatchNorm `bn` into `info`'s weight and bias; False (nothing done) without running stats."""
    if not (bn.track_running_stats and bn.running_mean is not None):
        return False
    scale = (bn.weight.detach().double().cpu() if bn.affine else torch.ones(info.N, dtype=torch.float64)) \
        / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    shift = bn.bias.detach().double().cpu() if bn.affine else torch.zeros(info.N, dtype=torch.float64)
    info.weight = info.weight * scale[:, None]
    info.bias = (info.bias - bn.running_mean.detach().double().cpu()) * scale + shift
    info.bn = bn_node.name
    info.bn_macs = info.positions * info.N * (2 if bn.affine else 1)
    return True


def eligible_layers(net: ReconstructedNetwork, fold_bn: bool = True) -> Dict[str, LayerInfo]:
    """Every Conv1d/2d/3d (groups=1) / Linear node the pass can split, in graph order."""
    users = net.users()
    module_uses: Dict[str, int] = {}
    for n in net.layer_nodes:
        module_uses[n.module] = module_uses.get(n.module, 0) + 1

    def sole_user(node: Node) -> Optional[Node]:
        u = users.get(node.name, [])
        return u[0] if len(u) == 1 and _single_input(u[0]) == node.name else None

    out: Dict[str, LayerInfo] = {}
    for node in net.layer_nodes:
        mod = net.network[node.module]
        if plain_layer(mod, *_CONVS, nn.Linear) is None or module_uses[node.module] != 1 \
                or _single_input(node) is None:
            continue
        info = _describe(node, mod)
        if info is None:
            continue
        last = node
        bn = sole_user(node)
        if fold_bn and info.kind == "conv" and bn is not None and type(net.network[bn.module]) in _NORMS \
                and module_uses[bn.module] == 1 and _fold_bn(info, bn, net.network[bn.module]):
            last = bn
        act = sole_user(last)
        if act is not None:
            info.act = _act_of(net, act)
        out[node.name] = info
    return out
