"""Rewrite hand-written attention (`softmax(q @ k^T * s [+ mask]) @ v`) into one fused
`F.scaled_dot_product_attention` node: the same function, without materialising the `[B, H, N, N]`
scores and probabilities, and with whatever fused kernel the device has (on this 2-core CPU the fused
graph ran 0.66-0.95x the plain graph's time at batch 8-64 and 0.90-1.01x at batch 1:
scripts/results/fuse_attention.md).

A graph pass like every other: the input network is never edited, the result passed `lint()`. A site is
fused only when the rewrite is exact in every mode: each intermediate (k's transpose, the scores, the
scaled and masked scores, the probabilities) has no other reader, the softmax is over the last dim in
the input dtype, and nothing but a scalar scale and an additive mask sits between the products. A
dropout on the probabilities (active in training) keeps the site unfused; the reason is listed in
`net.meta["fused_attention"]["skipped"]`.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GraphError
from .capture import as_network
from .edit import _fresh_key
from .network import ReconstructedNetwork
from .node import Node
from .ops import FunctionOp, GetAttr, MatMul, function_spec
from .template import Ref, iter_refs

log = logging.getLogger(__name__)
T = torch.Tensor

_MATMUL = {torch.matmul, T.matmul, T.__matmul__}
_MUL = {torch.mul, T.mul, T.__mul__, T.__rmul__, operator.mul}
_DIV = {torch.div, T.div, T.__truediv__, torch.true_divide, operator.truediv}
_ADD = {torch.add, T.add, T.__add__, T.__radd__, operator.add}
_SOFTMAX = {torch.softmax, T.softmax, F.softmax}
_FLOATS = {"float32", "float16", "bfloat16", "float64"}


def _fn(net: ReconstructedNetwork, node: Node) -> Any:
    module = net.network[node.module]
    return module.fn if isinstance(module, FunctionOp) else None


def _ndim(node: Node) -> Optional[int]:
    out = node.meta.get("out")
    return len(out["shape"]) if isinstance(out, dict) and "shape" in out else None


def _plain_ref(value: Any) -> Optional[str]:
    return value.node if isinstance(value, Ref) and not value.path else None


def _transposed_key(net: ReconstructedNetwork, node: Node) -> Optional[Any]:
    """The template of `k` when `node` is `k.transpose(-2, -1)` (any spelling of the last two dims) or `k.mT`."""
    module, nd = net.network[node.module], _ndim(node)
    if isinstance(module, GetAttr):
        return node.args[0] if module.attr == "mT" and len(node.args) == 1 and not node.kwargs else None
    if _fn(net, node) not in (torch.transpose, T.transpose) or nd is None or node.kwargs or len(node.args) != 3:
        return None
    dims = node.args[1:]
    if not all(isinstance(d, int) for d in dims) or {d % nd for d in dims} != {nd - 2, nd - 1}:
        return None
    return node.args[0]


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0


def _softmax_dim(net: ReconstructedNetwork, node: Node) -> Optional[int]:
    kwargs = dict(node.kwargs)
    kwargs.pop("_stacklevel", None)
    if kwargs.pop("dtype", None) is not None:
        return None
    args = list(node.args[1:])
    dim = kwargs.pop("dim", args.pop(0) if args else None)
    if kwargs or args or not isinstance(dim, int):
        return None
    return dim


@dataclasses.dataclass
class _Site:
    """One matched attention: the fused call's arguments and the nodes it replaces."""

    q: Any
    k: Any
    v: Any
    mask: Any
    scale: float
    removed: List[str]


def _shape(node: Optional[Node]) -> Any:
    out = node.meta.get("out") if node is not None else None
    return out.get("shape") if isinstance(out, dict) else None


def _dtype(metas: Dict[str, Dict[str, Any]], name: str) -> Any:
    out = metas.get(name, {}).get("out")
    return out.get("dtype") if isinstance(out, dict) else None


def _match(net: ReconstructedNetwork, out: Node, by_name: Dict[str, Node], readers: Counter,
           metas: Dict[str, Dict[str, Any]]) -> Tuple[Optional[_Site], str]:
    """The site ending at `out` (the probabilities @ v product), or None and why not ("" = not attention)."""
    if _fn(net, out) not in _MATMUL or len(out.args) != 2 or out.kwargs:
        return None, ""
    p_name = _plain_ref(out.args[0])
    p = by_name.get(p_name) if p_name else None
    if p is None:
        return None, ""
    if type(net.network[p.module]) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d) or _fn(net, p) is F.dropout:
        return None, f"{out.name}: a dropout on the attention probabilities ({p.name}) changes training"
    if _fn(net, p) not in _SOFTMAX:
        return None, ""
    nd = _ndim(p)
    dim = _softmax_dim(net, p)
    if nd is None or nd < 3 or dim is None or dim % nd != nd - 1:
        return None, ""
    removed: List[str] = [p.name]
    scale, mask = 1.0, None
    cur = by_name.get(_plain_ref(p.args[0]) or "")
    if cur is not None and _fn(net, cur) in _ADD and not cur.kwargs and len(cur.args) == 2 \
            and _plain_ref(cur.args[0]) and isinstance(cur.args[1], Ref):  # scores + mask, added after the scale
        if _dtype(metas, cur.args[1].node) not in _FLOATS or _shape(cur) != _shape(by_name.get(cur.args[0].node)):
            return None, f"{out.name}: the mask added at {cur.name} is not a float tensor of the scores' shape"
        removed.append(cur.name)
        mask, cur = cur.args[1], by_name.get(cur.args[0].node)
    if cur is not None and _fn(net, cur) in _MUL | _DIV and not cur.kwargs and len(cur.args) == 2:
        a, s = cur.args
        if _fn(net, cur) in _MUL and _scalar(a) and isinstance(s, Ref):
            a, s = s, a
        if _plain_ref(a) and _scalar(s):
            scale = float(s) if _fn(net, cur) in _MUL else 1.0 / float(s)
            removed.append(cur.name)
            cur = by_name.get(a.node)
    if cur is None or _fn(net, cur) not in _MATMUL or len(cur.args) != 2 or cur.kwargs:
        return None, ""
    removed.append(cur.name)
    kt = by_name.get(_plain_ref(cur.args[1]) or "")
    k = _transposed_key(net, kt) if kt is not None else None
    if k is None:
        return None, ""
    for name in removed:
        if readers[name] != 1:
            return None, f"{out.name}: {name} is read elsewhere as well"
    for node in (out, by_name[removed[-1]], p):
        if _dtype(metas, node.name) not in _FLOATS:
            return None, f"{out.name}: not a floating-point attention"
    if readers[kt.name] == 1:
        removed.append(kt.name)
    return _Site(cur.args[0], k, out.args[1], mask, scale, removed), ""


def fuse_attention(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> ReconstructedNetwork:
    """A copy of `model` (a ReconstructedNetwork, or a module traced on the example inputs and left
    untouched) with every exactly-fusable hand-written attention replaced by one
    `F.scaled_dot_product_attention` node (explicit `scale=`, so pruning head dims later keeps it).

    `result.meta["fused_attention"]` = {"fused": [node names], "skipped": [reasons]}.
    >>> fast = amc.fuse_attention(vit, torch.randn(1, 1, 28, 28))
    """
    src = as_network(model, example_inputs, example_kwargs, error=GraphError, what="fuse_attention's model").copy()
    by_name = {n.name: n for n in src.layer_nodes}
    # every read counts (net.users() lists a reader once): `p @ p` reads the probabilities twice
    readers: Counter = Counter(r.node for n in src.layer_nodes for r in iter_refs((n.args, n.kwargs)))
    readers.update(r.node for r in iter_refs(src.outputs))
    metas = {n.name: n.meta for n in list(src.input_nodes) + list(src.layer_nodes)}
    sites: Dict[str, _Site] = {}
    skipped: List[str] = []
    for node in src.layer_nodes:
        site, why = _match(src, node, by_name, readers, metas)
        if site is not None:
            sites[node.name] = site
        elif why:
            skipped.append(why)
    drop = {name for s in sites.values() for name in s.removed}
    modules: Dict[str, nn.Module] = dict(src.network.items())
    nodes: List[Node] = []
    for node in src.layer_nodes:
        if node.name in drop:
            continue
        site = sites.get(node.name)
        if site is None:
            nodes.append(node)
            continue
        key = _fresh_key(modules, f"{node.module}_sdpa")
        modules[key] = MatMul(F.scaled_dot_product_attention)
        kwargs: Dict[str, Any] = {"scale": site.scale}
        if site.mask is not None:
            kwargs["attn_mask"] = site.mask
        meta = {**node.meta, "op": function_spec(F.scaled_dot_product_attention).name,
                "fused_from": list(reversed(site.removed)) + [node.name]}
        nodes.append(dataclasses.replace(node, module=key, args=(site.q, site.k, site.v), kwargs=kwargs, meta=meta))
    used = {n.module for n in nodes}
    modules = {k: m for k, m in modules.items() if k in used}
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, src.outputs, dict(src.meta))
    new.meta["fused_attention"] = {"fused": sorted(sites), "skipped": skipped}
    new.train(src.training)
    new.lint()
    log.info("fuse_attention: %d site(s) fused, %d left as they were", len(sites), len(skipped))
    return new
