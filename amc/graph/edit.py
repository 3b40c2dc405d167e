"""Small graph edits shared by the passes that add or drop single-tensor nodes (gates, quantisers, folds).

Each returns a new ReconstructedNetwork (the input is never edited) that passed `lint()`. Only plain
references (`Ref(name)` without an index path) are rewired: a node that reads one element of a tuple
output keeps reading the original, which is what every caller here wants (they wrap tensors only).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping

import torch
import torch.nn as nn

from .network import ReconstructedNetwork
from .node import Node
from .ops import ParamHolder
from .template import Ref, iter_refs, map_template


def _fresh_key(taken: Mapping[str, object], base: str) -> str:
    key = base.replace(".", "_")
    while key in taken:
        key += "_"
    return key


def _reroute(obj, mapping: Dict[str, str]):
    """Replace plain `Ref(old)` by `Ref(new)`; indexed references stay."""
    return map_template(obj, lambda v: Ref(mapping[v.node]) if isinstance(v, Ref) and not v.path
                        and v.node in mapping else v)


def insert_after(net: ReconstructedNetwork, new_modules: Mapping[str, nn.Module], suffix: str, op: str,
                 rewire_outputs: bool = False) -> ReconstructedNetwork:
    """A copy of `net` with `new_modules[p]` applied to the output of node (or input) `p`; every plain reader
    of `p` reads the new node instead (the network's outputs too when `rewire_outputs`)."""
    src = net.copy()
    known = {n.name for n in src.input_nodes} | {n.name for n in src.layer_nodes}
    missing = sorted(set(new_modules) - known)
    if missing:
        raise KeyError(f"insert_after: no node named {missing}")
    modules: Dict[str, nn.Module] = dict(src.network.items())
    names = set(known)
    created: Dict[str, Node] = {}
    for producer, module in new_modules.items():
        key = _fresh_key(modules, f"{producer}_{suffix}")
        modules[key] = module
        name = f"{producer}.{suffix}"
        while name in names:
            name += "_"
        names.add(name)
        created[producer] = Node(name, key, (Ref(producer),), {}, {"op": op})
    mapping = {p: n.name for p, n in created.items()}
    nodes: List[Node] = []
    metas = {n.name: n.meta for n in src.input_nodes}

    def emit(producer: str) -> None:
        if producer in created:
            new = created[producer]
            out = metas.get(producer, {}).get("out")
            if out is not None:
                new.meta["out"] = out
            nodes.append(new)

    for inp in src.input_nodes:
        emit(inp.name)
    for node in src.layer_nodes:
        nodes.append(dataclasses.replace(node, args=_reroute(node.args, mapping),
                                         kwargs=dict(_reroute(node.kwargs, mapping))))
        metas[node.name] = node.meta
        emit(node.name)
    outputs = _reroute(src.outputs, mapping) if rewire_outputs else src.outputs
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, outputs, dict(src.meta))
    new.train(src.training)
    new.lint()
    return new


def remove_nodes(net: ReconstructedNetwork, names: Iterable[str]) -> ReconstructedNetwork:
    """A copy of `net` without the single-input nodes `names`; their readers read their input instead.

    For nodes that became the identity (a folded BatchNorm or gate). The modules go when nothing else uses them."""
    src = net.copy()
    drop = set(names)
    by_name = {n.name: n for n in src.layer_nodes}
    mapping: Dict[str, str] = {}
    for name in drop:
        node = by_name.get(name)
        if node is None:
            raise KeyError(f"remove_nodes: no node named {name!r}")
        refs = [a for a in node.args if isinstance(a, Ref)]
        if len(refs) != 1 or refs[0].path:
            raise ValueError(f"remove_nodes: {name!r} does not read exactly one plain tensor")
        mapping[name] = refs[0].node
    for name in list(mapping):  # chains of removed nodes resolve to the first kept one
        seen = set()
        while mapping[name] in mapping and mapping[name] not in seen:
            seen.add(mapping[name])
            mapping[name] = mapping[mapping[name]]
    kept = [dataclasses.replace(n, args=_reroute(n.args, mapping), kwargs=dict(_reroute(n.kwargs, mapping)))
            for n in src.layer_nodes if n.name not in drop]
    used = {n.module for n in kept}
    modules = {k: m for k, m in src.network.items() if k in used}
    new = ReconstructedNetwork(modules, src.input_nodes, kept, _reroute(src.outputs, mapping), dict(src.meta))
    new.train(src.training)
    new.lint()
    return new


def addmm_as_linear(net: ReconstructedNetwork) -> ReconstructedNetwork:
    """A copy of `net` where every `torch.addmm(bias, x, weight)` on two parameters read nowhere else (Hugging
    Face's GPT-2 `Conv1D`, weight stored [in, out]) is an `nn.Linear` node, so the compressors that work on
    Linears (low-rank, quantisation) see these layers too. Same function up to float rounding; the Linear
    node takes the Conv1D's name (its `.addmm` node's name without the suffix) when that name is free; `net`
    itself comes back when it has no such node."""
    if not _addmm_on_parameters(net):
        return net
    src = net.copy()
    names = {n.name for n in src.layer_nodes} | {n.name for n in src.input_nodes}
    modules: Dict[str, nn.Module] = dict(src.network.items())
    converted: Dict[str, Node] = {}
    dropped: set = set()
    for node, bias, weight in _addmm_on_parameters(src).values():
        base = node.name[:-len(".addmm")] if node.name.endswith(".addmm") else node.name
        name = base if base not in names else node.name
        names.add(name)
        key = _fresh_key(modules, name)
        modules[key] = _linear(bias, weight)
        dropped.update(r.node for r in (node.args[0], node.args[2]))
        converted[node.name] = Node(name, key, (node.args[1],), {}, {**node.meta, "op": "Linear"})
    mapping = {old: new.name for old, new in converted.items() if new.name != old}
    nodes = [converted.get(n.name) or dataclasses.replace(n, args=_reroute(n.args, mapping),
                                                          kwargs=dict(_reroute(n.kwargs, mapping)))
             for n in src.layer_nodes if n.name not in dropped]
    used = {n.module for n in nodes}
    new = ReconstructedNetwork({k: m for k, m in modules.items() if k in used}, src.input_nodes, nodes,
                               _reroute(src.outputs, mapping), dict(src.meta))
    new.train(src.training)
    new.lint()
    return new


def _addmm_on_parameters(net: ReconstructedNetwork) -> Dict[str, tuple]:
    """{name: (addmm node, bias, weight)} for the `addmm(bias, x, weight)` nodes whose bias and weight are parameter
    nodes only they read, with default beta/alpha and a 2-D weight."""
    users, outputs = net.users(), {r.node for r in iter_refs(net.outputs)}
    by_name = {n.name: n for n in net.layer_nodes}
    found: Dict[str, tuple] = {}
    for node in net.layer_nodes:
        fn = getattr(net.network[node.module], "fn", None)
        if fn not in (torch.addmm, torch.Tensor.addmm) or node.kwargs or len(node.args) != 3:
            continue
        bias_ref, x_ref, weight_ref = node.args
        if not all(isinstance(r, Ref) and not r.path for r in node.args):
            continue
        held = [net.network[by_name[r.node].module] if r.node in by_name else None for r in (bias_ref, weight_ref)]
        if not all(type(h) is ParamHolder and len(users[r.node]) == 1 and r.node not in outputs
                   for h, r in zip(held, (bias_ref, weight_ref))):
            continue
        bias, weight = held[0].value, held[1].value
        if weight.dim() == 2 and bias.shape == (weight.shape[1],):
            found[node.name] = (node, bias, weight)
    return found


def _linear(bias: torch.Tensor, weight: torch.Tensor) -> nn.Linear:
    """The nn.Linear of `addmm(bias, x, weight)`: its weight is `weight` transposed."""
    linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        linear.bias.copy_(bias)
    linear.weight.requires_grad_(weight.requires_grad)
    linear.bias.requires_grad_(bias.requires_grad)
    return linear
