"""VTP's learnable feature gates (seed 001): a per-feature score on the input of every token Linear of a ViT
(qkv or q/k/v, attention output, fc1, fc2), inserted as graph nodes, and folded back into the weights.

A gate is `x * g` with `g` initialised to 1, so inserting gates changes nothing; L1 on `g` during training
drives the gates of unneeded features toward 0. The gate's channel rule makes `g` one more member of the
coupled group of the features it scales, so the pruning engine removes gate entries with the channels and
`fold_gates` multiplies what is left into the Linear after it: the pruned network computes exactly what the
gated network computed with the removed gates set to zero.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ...errors import PruningError
from ...graph.macs import out_numel
from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ...graph.ops import register_op
from ...graph.edit import remove_nodes
from ...graph.template import Ref
from ..rules.common import passthrough
from ..tokens.placement import is_attention


class FeatureGate(nn.Module):
    """`x * gate` along the last dim; `gate` starts at 1."""

    def __init__(self, features: int):
        super().__init__()
        self.features = int(features)
        self.gate = nn.Parameter(torch.ones(self.features))

    def extra_repr(self) -> str:
        return f"features={self.features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate


def _resize_gate(m: FeatureGate) -> None:
    m.features = m.gate.numel()


@register_op(FeatureGate, leaf=True, macs=out_numel, resize=_resize_gate)
def gate_rule(c: Any) -> Any:
    """Channel by channel, like an activation; the gate is sliced with the features it scales."""
    out = passthrough(c)
    dims = getattr(out, "dims", None)
    if dims:
        c.axis("gate", 0, dims[-1])
    return out


def gated_linears(net: ReconstructedNetwork) -> List[Node]:
    """The Linear nodes that read `[B, N, D]` tokens (a ViT's qkv / q, k, v, attention output, fc1, fc2)."""
    out = []
    for node in net.layer_nodes:
        shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
        if isinstance(net.network[node.module], nn.Linear) and shape is not None and len(shape) == 3:
            out.append(node)
    return out


def insert_gates(net: ReconstructedNetwork) -> Tuple[ReconstructedNetwork, Dict[str, str]]:
    """A copy of `net` with a FeatureGate before every token Linear; returns it and {gate node: linear node}."""
    targets = {n.name for n in gated_linears(net)}
    if not targets:
        raise PruningError("VTP found no Linear layer reading [B, N, D] tokens: is this a Vision Transformer? "
                           "(looked for qkv / attention-output / MLP Linears on 3-d token tensors)")
    if not any(is_attention(net.network[n.module]) for n in net.layer_nodes):
        raise PruningError("VTP found no attention op (nn.MultiheadAttention, softmax, "
                           "F.scaled_dot_product_attention): it prunes Vision Transformers only")
    src = net.copy()
    modules: Dict[str, nn.Module] = dict(src.network.items())
    nodes: List[Node] = []
    pairs: Dict[str, str] = {}
    for node in src.layer_nodes:
        if node.name in targets and node.args and isinstance(node.args[0], Ref):
            lin = src.network[node.module]
            key = f"{node.module}_gate"
            while key in modules:
                key += "_"
            modules[key] = FeatureGate(lin.in_features)
            name = f"{node.name}.gate"
            in_meta = next((n.meta.get("out") for n in nodes if n.name == node.args[0].node), None)
            nodes.append(Node(name, key, (node.args[0],), {}, {"op": "FeatureGate", "out": in_meta}))
            node = dataclasses.replace(node, args=(Ref(name),) + tuple(node.args[1:]), meta=dict(node.meta))
            pairs[name] = node.name
        nodes.append(node)
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, src.outputs, dict(src.meta))
    new.train(src.training)
    new.lint()
    return new, pairs


def gates_of(net: ReconstructedNetwork) -> Dict[str, FeatureGate]:
    return {n.name: net.network[n.module] for n in net.layer_nodes if isinstance(net.network[n.module], FeatureGate)}


@torch.no_grad()
def fold_gates(net: ReconstructedNetwork) -> ReconstructedNetwork:
    """A copy of `net` with every gate multiplied into the Linear it feeds and the gate nodes gone (exact)."""
    net = net.copy()
    users = net.users()
    drop = []
    for node in net.layer_nodes:
        gate = net.network[node.module]
        if not isinstance(gate, FeatureGate):
            continue
        readers = users.get(node.name, [])
        if len(readers) != 1 or not isinstance(net.network[readers[0].module], nn.Linear):
            raise PruningError(f"gate {node.name!r} does not feed exactly one Linear; cannot fold it")
        if not (isinstance(node.args[0], Ref) and not node.args[0].path):
            raise PruningError(f"gate {node.name!r} reads an indexed output; cannot fold it")
        lin = net.network[readers[0].module]
        lin.weight.mul_(gate.gate.detach().to(lin.weight.dtype).unsqueeze(0))
        drop.append(node.name)
    return remove_nodes(net, drop)
