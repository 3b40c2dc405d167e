"""Small graph edits shared by the passes that add or drop single-tensor nodes (gates, quantisers, folds).

Each returns a new ReconstructedNetwork (the input is never edited) that passed `lint()`. Only plain
references (`Ref(name)` without an index path) are rewired: a node that reads one element of a tuple
output keeps reading the original, which is what every caller here wants (they wrap tensors only).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional

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
    """A copy of `net` where every linear layer written by hand on parameters read nowhere else is an
    `nn.Linear` node, so the compressors that work on Linears (low-rank, quantisation) see these layers too:
    `torch.addmm(bias, x, weight)` (Hugging Face's GPT-2 `Conv1D`, weight stored [in, out]) and
    `x @ weight.T`, plus a bias when one is added right after (Falcon's `FalconLinear`). Same function up to
    float rounding; the Linear node takes its layer's name (the node's name without the `.addmm` /
    `.matmul` suffix) when that name is free; `net` itself comes back when it has no such node."""
    found = _hand_written_linears(net)
    if not found:
        return net
    src = net.copy()
    names = {n.name for n in src.layer_nodes} | {n.name for n in src.input_nodes}
    modules: Dict[str, nn.Module] = dict(src.network.items())
    converted: Dict[str, Node] = {}
    dropped: set = set()
    for out_name, (x_ref, bias, weight, gone) in found.items():  # names and values: the copy's are the same
        node = src.node(out_name)
        base = next((node.name[:-len(s)] for s in (".addmm", ".matmul", ".add") if node.name.endswith(s)), node.name)
        name = base if base not in names else node.name
        names.add(name)
        key = _fresh_key(modules, name)
        modules[key] = _linear(bias, weight)
        dropped.update(gone)
        converted[node.name] = Node(name, key, (x_ref,), {}, {**node.meta, "op": "Linear"})
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


_TRANSPOSES = (torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose)


def _hand_written_linears(net: ReconstructedNetwork) -> Dict[str, tuple]:
    """{name of the node whose output the Linear gives: (x, bias or None, weight [in, out], nodes it replaces)}
    for `addmm(bias, x, weight)` and `x @ weight.T` (+ bias) on 2-D weight and 1-D bias parameter nodes that
    only they read, with default beta/alpha."""
    users, outputs = net.users(), {r.node for r in iter_refs(net.outputs)}
    by_name = {n.name: n for n in net.layer_nodes}

    def sole(ref, into: str):
        """The node behind `ref` when it is a plain reference read only by node `into`."""
        if not isinstance(ref, Ref) or ref.path or ref.node not in by_name or ref.node in outputs:
            return None
        return by_name[ref.node] if [u.name for u in users[ref.node]] == [into] else None

    def param(ref, into: str, dim: int):
        node = sole(ref, into)
        held = net.network[node.module] if node is not None else None
        return (node, held.value) if type(held) is ParamHolder and held.value.dim() == dim else (None, None)

    found: Dict[str, tuple] = {}
    for node in net.layer_nodes:
        op = net.network[node.module]
        fn = getattr(op, "fn", None)
        if fn in (torch.addmm, torch.Tensor.addmm) and not node.kwargs and len(node.args) == 3:
            (b_node, bias), (w_node, weight) = param(node.args[0], node.name, 1), param(node.args[2], node.name, 2)
            if b_node is not None and w_node is not None and isinstance(node.args[1], Ref) \
                    and bias.shape == (weight.shape[1],):
                found[node.name] = (node.args[1], bias, weight, {b_node.name, w_node.name})
        elif fn in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not node.kwargs \
                and len(node.args) == 2 and isinstance(node.args[0], Ref):
            t = sole(node.args[1], node.name)
            t_op = net.network[t.module] if t is not None else None
            if t is None or not (getattr(t_op, "attr", None) in ("T", "mT") and not t.kwargs or
                                 getattr(t_op, "fn", None) in _TRANSPOSES):
                continue
            if getattr(t_op, "fn", None) in (torch.Tensor.transpose, torch.transpose) and \
                    sorted(int(d) % 2 for d in t.args[1:]) != [0, 1]:
                continue
            w_node, weight = param(t.args[0] if t.args else None, t.name, 2)
            if w_node is None:
                continue
            out_name, gone = node.name, {w_node.name, t.name}
            after = users[node.name]
            add = after[0] if len(after) == 1 and node.name not in outputs else None
            if add is not None and getattr(net.network[add.module], "fn", None) in (
                    torch.add, torch.Tensor.add, torch.Tensor.__add__) and not add.kwargs and len(add.args) == 2:
                other = [a for a in add.args if not (isinstance(a, Ref) and a.node == node.name)]
                b_node, bias = param(other[0], add.name, 1) if len(other) == 1 else (None, None)
                if b_node is not None and bias.shape == (weight.shape[0],):
                    out_name, gone = add.name, gone | {b_node.name, node.name}
                    found[out_name] = (node.args[0], bias, weight.t(), gone)
                    continue
            found[out_name] = (node.args[0], None, weight.t(), gone)
    return found


def _linear(bias: Optional[torch.Tensor], weight: torch.Tensor) -> nn.Linear:
    """The nn.Linear of `bias + x @ weight` (`weight` stored [in, out], as addmm takes it)."""
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
            linear.bias.requires_grad_(bias.requires_grad)
    linear.weight.requires_grad_(weight.requires_grad)
    return linear
