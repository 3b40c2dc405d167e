"""MACs and parameter counting over a ReconstructedNetwork, one rule per op in the op registry.

Module rules follow the ptflops / Torch-Pruning conventions (conv and linear with bias, norms 2x
numel when affine, activations and pools by numel) so that our counts compare like for like.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..errors import GraphError
from .capture import _amc_keywords, as_network, spread_tuple
from .network import ReconstructedNetwork
from .node import Node
from .ops import FunctionOp, name_of_callable, spec_of
from .template import map_template
from .._warnings import warn_user
from .untouched import untouched


def node_costs(net: ReconstructedNetwork, *example_inputs: Any, **example_kwargs: Any) -> List[Dict[str, Any]]:
    """Per node: name, op, output shapes and MACs, measured by running the graph once."""
    with torch.no_grad(), untouched(net):  # a train-mode net keeps its BN statistics, flags and RNG
        if not example_inputs and not example_kwargs:
            example_inputs = net.example_inputs(batch_size=1)  # MACs per sample unless inputs say otherwise
        return _observe_costs(net, tuple(example_inputs), example_kwargs)


def _observe_costs(net: ReconstructedNetwork, example_inputs: Tuple[Any, ...],
                   example_kwargs: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    weights = {p.untyped_storage().data_ptr() for p in net.parameters() if p.dim() >= 2 and p.numel()}

    def observe(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        spec = spec_of(module)
        macs = 0
        macs_fn = spec.get("macs") if spec is not None else None
        if macs_fn is not None:
            macs = int(macs_fn(module.fn if isinstance(module, FunctionOp) else module, args, kwargs, out))
        read: List[torch.Tensor] = []
        if spec is None and isinstance(module, FunctionOp):
            map_template((args, kwargs), lambda v: read.append(v) if isinstance(v, torch.Tensor) else None)
        uncounted = any(t.dim() >= 2 and t.numel() and t.untyped_storage().data_ptr() in weights for t in read)
        rows.append({"name": node.name, "op": node.op, "macs": macs, "out": _shapes(out),
                     "uncounted": name_of_callable(module.fn) or repr(module.fn) if uncounted else None,
                     "params": 0 if isinstance(module, FunctionOp) else sum(p.numel() for p in module.parameters()),
                     "bits": weight_bits(module) if isinstance(getattr(module, "weight", None), torch.Tensor)
                     else None})

    net.run_observed(example_inputs, example_kwargs, observe)
    return rows


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return [_shapes(o) for o in out]
    return type(out).__name__ if out is not None else None


def count_params(module: nn.Module) -> int:
    """Unique parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def count(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> Tuple[int, int]:
    """`(macs, params)` of any module on the example inputs (traced first when not a graph already).

    >>> macs, params = amc.count(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    """
    if isinstance(model, nn.Module):  # amc.count(model, example_inputs=(x,)), as amc.prune takes them
        example_inputs, example_kwargs = _amc_keywords(model, example_inputs, example_kwargs)
    net = as_network(model, example_inputs, example_kwargs, what="amc.count's model")
    try:
        try:
            costs = node_costs(net, *example_inputs, **example_kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
            spread = spread_tuple(example_inputs)  # amc.count(model, (x,)), traced as amc.trace takes it
            if spread is None:
                raise
            costs = node_costs(net, *spread, **example_kwargs)
        macs = sum(r["macs"] for r in costs)
        _warn_uncounted(costs)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:  # inputs unfit for the network
        raise GraphError(f"amc.count could not run the network on the example inputs ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); pass inputs shaped like the ones it was traced with") from exc
    return macs, count_params(net)


def _warn_uncounted(costs: List[Dict[str, Any]]) -> None:
    """A weight multiplied by an op that has no MACs rule (a fused attention or an MoE kernel amc does not
    know) would silently count as zero MACs: say which, so a ratio is not read as more than it is."""
    ops = sorted({r["uncounted"] for r in costs if r.get("uncounted")})
    if ops:
        warn_user(f"amc.count: {sum(1 for r in costs if r.get('uncounted'))} node(s) compute with the network's "
                  f"weights through ops that have no MACs rule ({', '.join(ops[:5])}): their MACs are not in the "
                  "count. Give one with amc.register_op(fn, name=..., macs=fn(op, args, kwargs, out) -> int)")


def weight_bits(module: nn.Module) -> int:
    """Bits per stored weight: a quantised layer's `weight_bits`, else the width of its weight's dtype."""
    bits = getattr(module, "weight_bits", None)
    if isinstance(bits, int):
        return bits
    w = getattr(module, "weight", None)
    return w.element_size() * 8 if isinstance(w, torch.Tensor) else 32


def count_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as deployed: a quantised layer's weight packed at its
    `weight_bits` plus one float32 scale per output channel, every other tensor at its dtype's width
    (product-quantised codes are uint8 buffers already). Shared tensors are counted once."""
    if not isinstance(model, nn.Module):
        raise GraphError(f"count_bytes needs an nn.Module, got {type(model).__name__}")
    seen, total = set(), 0
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if name == "weight" and isinstance(getattr(m, "weight_bits", None), int):
                total += -(-t.numel() * m.weight_bits // 8) + 4 * t.shape[0]
            else:
                total += t.numel() * t.element_size()
    return total


def summary_table(net: ReconstructedNetwork, *example_inputs: Any) -> str:
    rows = node_costs(net, *example_inputs)
    total = sum(r["macs"] for r in rows) or 1
    lines = [f"{'node':<48} {'op':<22} {'output':<24} {'MACs':>14} {'%':>6} {'params':>10} {'bits':>4}"]
    for r in rows:
        if r["op"] in ("TensorSize", "IntArith", "Parameter", "ShapeGuard", "TrainingFlag"):
            continue
        out = str(r["out"])
        lines.append(f"{r['name'][:48]:<48} {r['op'][:22]:<22} {out[:24]:<24} {r['macs']:>14,} "
                     f"{100 * r['macs'] / total:>5.1f}% {r['params']:>10,} {r['bits'] or '':>4}")
    lines.append(f"total: {sum(r['macs'] for r in rows):,} MACs, {count_params(net):,} params, "
                 f"{count_bytes(net):,} bytes as stored, {len(net.layer_nodes)} nodes")
    guards = net.guards
    if guards:
        lines.append(f"guards ({len(guards)}): runs whose sizes decide these differently raise GraphError")
        lines += [f"  {g['condition']} is {g['expected']}  at {g['source']}" for g in guards[:20]]
        if len(guards) > 20:
            lines.append(f"  ... and {len(guards) - 20} more (net.guards lists them all)")
    return "\n".join(lines)
