"""Where token agents go in a traced ViT, inserting them, and how many tokens each keeps for a MACs budget.

A transformer encoder is recognised in the graph, not by class: attention ops (an `nn.MultiheadAttention`
node, a softmax, or `F.scaled_dot_product_attention`), each followed by residual adds of `[B, N, D]`
tokens; a block's output is the last such add before the next attention. The CLS token must be read as
`x[:, 0]` downstream (torchvision's `VisionTransformer`, timm-style ViTs, hand-written ones all do).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import PruningError
from ...graph.counting import count
from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ...graph.template import Ref, rename_refs
from .agent import TokenAgent
from .merge import TokenMerge

ATTENTION_FNS = ("softmax", "scaled_dot_product_attention")


@dataclass
class Block:
    """One encoder block: its output node, its attention node, and the softmax giving attention probs."""

    output: str
    attention: str
    probs: Optional[str]
    tokens: int  # N, CLS included
    dim: int


def _shape(node: Node) -> Optional[Tuple[int, ...]]:
    out = node.meta.get("out")
    return tuple(out["shape"]) if isinstance(out, dict) and "shape" in out else None


def is_attention(module: nn.Module) -> bool:
    """An attention op: nn.MultiheadAttention, a softmax, or F.scaled_dot_product_attention."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return getattr(getattr(module, "fn", None), "__name__", "") in ATTENTION_FNS


def _is_residual(net: ReconstructedNetwork, node: Node) -> bool:
    shape = _shape(node)
    if node.op != "ElemAdd" or shape is None or len(shape) != 3:
        return False
    refs = [a for a in node.args if isinstance(a, Ref)]
    return len(refs) == 2


def _reads_cls(net: ReconstructedNetwork) -> bool:
    """Some node takes `x[:, 0]` of a `[B, N, D]` tensor (the classifier reading CLS)."""
    shapes = {n.name: _shape(n) for n in net.layer_nodes}
    for node in net.layer_nodes:
        if node.op != "TensorSlice" or len(node.args) != 2 or not isinstance(node.args[0], Ref):
            continue
        src, index = shapes.get(node.args[0].node), node.args[1]
        if src is not None and len(src) == 3 and isinstance(index, tuple) and len(index) >= 2 \
                and index[0] == slice(None) and index[1] == 0 \
                and all(i == slice(None) or i is Ellipsis for i in index[2:]):  # Hugging Face: x[:, 0, :]
            return True
    return False


def find_blocks(net: ReconstructedNetwork) -> List[Block]:
    """The encoder blocks of a traced ViT, in order; PruningError naming what was looked for otherwise."""
    nodes = net.layer_nodes
    attn = [i for i, n in enumerate(nodes) if is_attention(net.network[n.module])]
    looked_for = ("attention ops (nn.MultiheadAttention, softmax or F.scaled_dot_product_attention) each "
                  "followed by residual adds of [B, N, D] tokens, and a classifier reading the CLS token x[:, 0]")
    if not attn:
        raise PruningError(f"token pruning found no transformer encoder in this network: looked for {looked_for}")
    blocks: List[Block] = []
    for j, a in enumerate(attn):
        end = attn[j + 1] if j + 1 < len(attn) else len(nodes)
        adds = [i for i in range(a + 1, end) if _is_residual(net, nodes[i])]
        if not adds:
            continue
        out = nodes[adds[-1]]
        b, n, d = _shape(out)  # type: ignore[misc]
        module = net.network[nodes[a].module]
        probs = nodes[a].name if getattr(getattr(module, "fn", None), "__name__", "") == "softmax" else None
        blocks.append(Block(out.name, nodes[a].name, probs, n, d))
    if not blocks:
        raise PruningError(f"token pruning found attention but no [B, N, D] residual block outputs after it: "
                           f"looked for {looked_for}")
    if not _reads_cls(net):
        raise PruningError(f"token pruning needs a CLS token at index 0 (read as x[:, 0] by the head); none found. "
                           f"Looked for {looked_for}. Mean-pooled models are not supported yet")
    return blocks


def default_layers(blocks: Sequence[Block]) -> List[str]:
    """The seed's placement, scaled: after blocks 2, 5 and 8 of 12 (never after the last block)."""
    depth = len(blocks)
    idx = sorted({min(max(round(depth * k / 12), 0), depth - 2) for k in (2, 5, 8)}) if depth > 1 else []
    if not idx:
        raise PruningError(f"token pruning needs at least 2 encoder blocks to prune between; found {depth}")
    return [blocks[i].output for i in idx]


def choose_layers(blocks: Sequence[Block], layers: Optional[Sequence[str]]) -> List[Block]:
    by_name = {b.output: b for b in blocks}
    names = default_layers(blocks) if layers is None else list(layers)
    if not names:
        raise PruningError("layers= is empty: name at least one block output (or pass None for the default)")
    bad = [n for n in names if n not in by_name]
    if bad:
        raise PruningError(f"layers= names {bad}, which are not encoder block outputs; valid block outputs: "
                           f"{list(by_name)}")
    last = blocks[-1].output
    if last in names:
        raise PruningError(f"layers= includes the last block's output {last!r}: nothing after it uses the tokens")
    order = [b.output for b in blocks]
    return [by_name[n] for n in sorted(dict.fromkeys(names), key=order.index)]


def insert_agents(net: ReconstructedNetwork, chosen: Sequence[Block], score: str = "agent",
                  hidden: Optional[int] = None, fuse: Any = "none") -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` with a TokenAgent node after each chosen block output; returns (net, agent node names)."""
    src = net.copy()
    modules: Dict[str, nn.Module] = dict(src.network.items())
    targets = {b.output: b for b in chosen}
    if score == "cls_attention":
        missing = [b.output for b in chosen if b.probs is None]
        if missing:
            raise PruningError(f"score='cls_attention' needs explicit softmax attention probabilities; the blocks "
                               f"ending at {missing} use a fused attention op")
    rename: Dict[str, str] = {}
    nodes: List[Node] = []
    names: List[str] = []
    for node in src.layer_nodes:
        args = rename_refs(node.args, rename) if rename else node.args
        kwargs = rename_refs(node.kwargs, rename) if rename else node.kwargs
        nodes.append(dataclasses.replace(node, args=args, kwargs=dict(kwargs), meta=dict(node.meta)))
        if node.name in targets:
            b = targets[node.name]
            key = f"token_agent_{len(names)}"
            while key in modules:
                key += "_"
            name = f"{node.name}.token_agent"
            modules[key] = TokenMerge(label=name) if score == "tome" else \
                TokenAgent(b.dim, hidden=hidden, score=score, label=name, fuse=fuse)
            agent_args: Tuple[Any, ...] = (Ref(node.name),)
            if score == "cls_attention":
                agent_args += (Ref(b.probs),)  # type: ignore[arg-type]
            nodes.append(Node(name, key, agent_args, {}, {"op": type(modules[key]).__name__,
                                                          "out": node.meta.get("out")}))
            rename[node.name] = name
            names.append(name)
    outputs = rename_refs(src.outputs, rename)
    new = ReconstructedNetwork(modules, src.input_nodes, nodes, outputs, dict(src.meta))
    new.train(src.training)
    new.lint()
    return new, names


def agents_of(net: ReconstructedNetwork) -> List[Any]:
    """The token-reducing modules (TokenAgent, TokenMerge) of a network, in graph order."""
    return [net.network[n.module] for n in net.layer_nodes
            if isinstance(net.network[n.module], (TokenAgent, TokenMerge))]


def set_mode(net: ReconstructedNetwork, mode: str) -> None:
    """Switch every agent of `net` between "batched", "dynamic" and "off"."""
    if mode not in ("batched", "dynamic", "off"):
        raise PruningError(f"token mode must be 'batched', 'dynamic' or 'off', got {mode!r}")
    for a in agents_of(net):
        if isinstance(a, TokenAgent):
            a.mode = mode


def keep_chain(tokens: int, count: int, rho: float, fuse: bool = False) -> List[int]:
    """Tokens (CLS excluded) kept by each of `count` agents when each keeps a `rho` share of what reaches it
    (with `fuse` (fuse="one"), an agent that drops any also passes on one fused token)."""
    n, out = tokens - 1, []
    for _ in range(count):
        k = max(1, int(round(n * rho)))
        out.append(k)
        n = k + int(fuse and k < n)
    return out


def arriving(tokens: int, keep: Sequence[int], fuse: bool = False) -> List[int]:
    """Non-CLS tokens reaching each agent when they keep `keep` (the first sees `tokens - 1`)."""
    n, out = tokens - 1, []
    for k in keep:
        out.append(n)
        n = min(k, n) + int(fuse and k < n)
    return out


def solve_keep(net: ReconstructedNetwork, tokens: int, target_macs: float, base_macs: int,
               example_inputs: Tuple[Any, ...], iters: int = 20) -> List[int]:
    """Per-agent keep counts (one keep share per agent, compounding, as DynamicViT and EViT schedule it) whose
    batched-mode MACs, agents included, are at most `target_macs` of `base_macs`; the largest such share."""
    agents = agents_of(net)
    fuse = any(getattr(a, "fuse", "none") == "one" for a in agents)

    def cost(rho: float) -> int:
        for a, k in zip(agents, keep_chain(tokens, len(agents), rho, fuse)):
            a.keep = k
            if isinstance(a, TokenAgent):
                a.mode = "batched"
        with torch.no_grad():
            return count(net, *example_inputs)[0]

    budget = target_macs * base_macs
    if cost(1.0) <= budget:
        return keep_chain(tokens, len(agents), 1.0, fuse)
    if cost(0.0) > budget:
        lowest = cost(0.0) / base_macs
        raise PruningError(f"target_macs={target_macs} is out of reach by token pruning at these layers: keeping one "
                           f"token per agent still costs {lowest:.3f} of the MACs; place agents earlier (layers=) "
                           f"or combine with dimension pruning")
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    counts = keep_chain(tokens, len(agents), lo, fuse)
    cost(lo)
    return counts
