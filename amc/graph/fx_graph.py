"""A ReconstructedNetwork as a `torch.fx.GraphModule`, for the tools built on torch.fx.

torch.ao's FX quantisation (`prepare_fx`), FX passes and FX-based profilers all start from
`torch.fx.symbolic_trace`, which cannot trace a ReconstructedNetwork itself: its forward binds inputs
by name and runs a plan at run time. Our graph already is a dataflow graph, so it is written out node
for node: every op stays the same submodule (`network.<name>`), an indexed output becomes an
`operator.getitem`, and each shape guard becomes a `torch._assert` on the same comparison, so the
GraphModule still refuses an input that would take another path (FX traces `torch._assert`).
"""
from __future__ import annotations

import operator
import types
from typing import Any, Dict, Tuple

import torch
import torch.fx as fx
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from ..errors import GraphError
from .ops import AutogradFunctionOp, Constant, FunctionOp, ParamHolder, ShapeGuard
from .template import MappingTemplate, Ref, map_template

# a guard expected False asserts the opposite comparison (no `not`: FX cannot trace bool() of a Proxy)
_ASSERTED = {("eq", True): operator.eq, ("ne", True): operator.ne, ("lt", True): operator.lt,
             ("le", True): operator.le, ("gt", True): operator.gt, ("ge", True): operator.ge,
             ("eq", False): operator.ne, ("ne", False): operator.eq, ("lt", False): operator.ge,
             ("le", False): operator.gt, ("gt", False): operator.le, ("ge", False): operator.lt}


def to_fx(net: Any) -> fx.GraphModule:
    """`net` as a torch.fx.GraphModule computing the same outputs from the tensor inputs, in
    `net.input_nodes` order (positional, then those captured as keywords). It shares the network's
    parameters; `torch.fx.symbolic_trace` and torch.ao's `prepare_fx` take it as any module.

    >>> gm = amc.export.to_fx(amc.prune(model, example_inputs=(x,), ratio=0.5))
    >>> prepared = torch.ao.quantization.quantize_fx.prepare_fx(gm, qconfig_mapping, (x,))
    """
    from .network import ReconstructedNetwork

    if not isinstance(net, ReconstructedNetwork):
        raise GraphError(f"to_fx expects a ReconstructedNetwork, got {type(net).__name__}; trace it first "
                         "(amc.trace(model, x)), or call torch.fx.symbolic_trace on a plain module")
    graph = fx.Graph()
    env: Dict[str, fx.Node] = {}
    for node in net.input_order():
        env[node.name] = graph.placeholder(_identifier(node.name))
    indexed: Dict[Tuple[str, Tuple[Any, ...]], fx.Node] = {}

    def leaf(value: Any) -> Any:
        if not isinstance(value, Ref):
            return value
        if value.node not in env:
            raise GraphError(f"to_fx: node {value.node!r} is used before it is computed; the graph is damaged")
        out = env[value.node]
        for i in range(len(value.path)):  # each prefix once, however many nodes read it
            key = (value.node, value.path[:i + 1])
            if key not in indexed:
                indexed[key] = graph.call_function(operator.getitem, (out, value.path[i]))
            out = indexed[key]
        return out

    for node in net.layer_nodes:
        module = net.network[node.module]
        args = tuple(map_template(tuple(node.args), leaf))
        kwargs = dict(map_template(dict(node.kwargs or {}), leaf))
        if isinstance(module, ShapeGuard):
            _assert_guard(graph, module, args)
            continue
        amp = node.meta.get("autocast")
        entered = [graph.call_function(_enter_autocast, (d, getattr(torch, t), on, True)) for d, on, t in amp or ()]
        grad = graph.call_function(torch.is_grad_enabled, ()) if node.meta.get("no_grad") else None
        if grad is not None:  # the forward's own `torch.no_grad()`, as torch.export's graphs hold it
            graph.call_function(torch._C._set_grad_enabled, (False,))
        env[node.name] = _call(graph, module, f"network.{node.module}", args, kwargs)
        if grad is not None:
            graph.call_function(torch._C._set_grad_enabled, (grad,))
        for ctx in reversed(entered):  # the captured torch.autocast state, as dynamo's graphs hold it
            graph.call_function(_exit_autocast, (ctx,))
    graph.output(map_template(_plain_outputs(net.outputs), leaf))
    graph.lint()
    gm = fx.GraphModule(net, graph, class_name="AmcGraphModule")
    gm.meta["amc_inputs"] = [n.name for n in net.input_order()]
    return gm


def _call(graph: fx.Graph, module: Any, target: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> fx.Node:
    """A replayed Tensor method as `call_method` and a replayed torch function as `call_function` (what
    symbolic_trace itself records, so FX passes and torch.ao's patterns see them); every module, and
    anything with hooks, as `call_module` of the same submodule."""
    if isinstance(module, (Constant, ParamHolder)):  # a get_attr, so a retrace holds a Proxy, not the tensor
        value = graph.get_attr(f"{target}.value")
        return graph.call_method("clone", (value,)) if getattr(module, "clone", False) else value
    if type(module).forward is FunctionOp.forward and not isinstance(module, AutogradFunctionOp) \
            and not (module._forward_hooks or module._forward_pre_hooks):
        fn = module.fn
        name = getattr(fn, "__name__", "")
        if name and getattr(torch.Tensor, name, None) is fn:
            return graph.call_method(name, args, kwargs)
        if name and name != "<lambda>" and (getattr(fn, "__module__", None) is not None
                                             or isinstance(fn, types.BuiltinFunctionType)):
            return graph.call_function(fn, args, kwargs)
    return graph.call_module(target, args, kwargs)


def _assert_guard(graph: fx.Graph, guard: ShapeGuard, args: Tuple[Any, ...]) -> None:
    what = "value" if guard.value else "shape"
    message = (f"amc {what} guard at {guard.source or 'an unknown line'}: capture took the path where "
               f"{guard.describe(guard.captured)} is {guard.expected}; this input takes another path, which the "
               "graph does not hold (trace again with such an input)")
    if guard.op == "truth":
        cond = args[0] if guard.expected else graph.call_function(operator.eq, (args[0], 0))
    else:
        cond = graph.call_function(_ASSERTED[(guard.op, guard.expected)], (args[0], args[1]))
    graph.call_function(torch._assert, (cond, message))


def _plain_outputs(outputs: Any) -> Any:
    """FX outputs are tuples, lists and dicts: a Hugging Face ModelOutput (or its stand-in) becomes a dict."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, MappingTemplate):
            return {k: plain(v) for k, v in obj.items}
        if isinstance(obj, dict) and type(obj) is not dict:
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(v) for v in obj]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(plain(v) for v in obj)
        return obj
    return plain(outputs)


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"
    return f"input_{out}" if out[0].isdigit() else out
