"""Consumer-side pruning (VTP's own form): a Linear that reads the residual stream keeps only the input
columns its gate keeps, and the stream itself stays whole.

Every reader of the stream (each block's qkv or q/k/v and fc1, through their norms) has its own gate, so
each one picks its own columns; a `SelectFeatures` node gathers them before the Linear, whose weight
keeps those columns times the gate values. The pruned network computes exactly what the gated network
computes with the other gates at zero.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from ...export.json_io import register_json_op
from ...graph.network import ReconstructedNetwork
from ...graph.ops import register_op
from .gates import FeatureGate


class SelectFeatures(nn.Module):
    """`x[..., index]`: the input features one reader of the residual stream still uses."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.register_buffer("index", torch.arange(self.n_out))

    def extra_repr(self) -> str:
        return f"{self.n_in} -> {self.n_out} features"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)


def _no_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    return 0  # a gather: memory traffic, no multiply-accumulates


register_op(SelectFeatures, leaf=True, macs=_no_macs, opaque=True)  # its index names positions: not re-pruned


def _build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    m = cls(**config)
    m.index = tensors["index"]
    return m


register_json_op(SelectFeatures, to_config=lambda m: {"n_in": m.n_in, "n_out": m.n_out}, from_config=_build)


TIE_BREAK = 1e-9


@torch.no_grad()
def column_scores(gate: FeatureGate, linear: nn.Linear) -> torch.Tensor:
    """|gate| per input column, equal gates ordered by the column's weight norm (at 1e-9 scale)."""
    norm = linear.weight.detach().double().norm(dim=0)
    return gate.gate.detach().double().abs() + TIE_BREAK * norm / norm.max().clamp_min(1e-30)


def reader_gates(net: ReconstructedNetwork, gate_nodes: Iterable[str]) -> Dict[str, Tuple[FeatureGate, nn.Linear]]:
    """{gate node: (gate, the one Linear it feeds)} for the named gates that feed exactly one Linear."""
    users = net.users()
    out = {}
    for name in gate_nodes:
        gate, readers = net.network[net.node(name).module], users.get(name, [])
        if isinstance(gate, FeatureGate) and len(readers) == 1 \
                and isinstance(net.network[readers[0].module], nn.Linear):
            out[name] = (gate, net.network[readers[0].module])
    return out


@torch.no_grad()
def select_reader_columns(net: ReconstructedNetwork, gate_nodes: Iterable[str],
                          zeta: float) -> Tuple[ReconstructedNetwork, List[str]]:
    """`net` (a copy) with each named gate replaced by the columns whose |gate| >= zeta (at least the
    largest one), the gate values folded into the Linear it feeds. Returns the network and the gates that
    would have lost every column."""
    net = net.copy()
    emptied: List[str] = []
    for name, (gate, lin) in reader_gates(net, gate_nodes).items():
        node = net.node(name)
        g = gate.gate.detach()
        score = column_scores(gate, lin)
        keep = torch.nonzero(score >= zeta).flatten()
        if keep.numel() == g.numel():
            continue  # every column stays: no gather, fold_gates folds the gate
        if keep.numel() == 0:
            emptied.append(name)
            keep = score.argmax().reshape(1)
        lin.weight = nn.Parameter(lin.weight.detach()[:, keep] * g[keep].to(lin.weight.dtype).unsqueeze(0),
                                  requires_grad=lin.weight.requires_grad)
        lin.in_features = int(keep.numel())
        sel = SelectFeatures(g.numel(), int(keep.numel()))
        sel.index = keep.clone()
        net.network[node.module] = sel.train(gate.training)
        node.meta["op"] = "SelectFeatures"
    net.recompile()  # the compiled plan holds the modules it runs
    return net, emptied


__all__ = ["SelectFeatures", "column_scores", "reader_gates", "select_reader_columns"]
