"""Capture-boundary tracing: record what one real forward pass did, then rebuild it as modules.

Three interception points, all active only between the boundaries:
- `nn.Module.__call__`: registered module types become leaf nodes holding the original module;
  every other module (containers, custom blocks, even custom leaves) is traced into.
- a `TorchFunctionMode`: torch functions, Tensor methods and operators become op-module nodes.
- `torch.autograd.Function.apply`: a custom autograd Function is kept whole (its backward too).

Sizes read from tensors (`x.shape`, `x.size(1)`, `x.numel()`) come back as `TracedInt`s that remember
where they came from, so `x.view(x.size(0), -1)` replays with the batch (and channel) sizes of the
run, never the captured ones. Because capture runs the real forward, Python control flow, loops and
containers need no support at all: the path taken is what is recorded.
"""
from __future__ import annotations

import builtins
import contextlib
import enum
import functools
import inspect
import itertools
import linecache
import os
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

from .._warnings import warn_user
from .._modes import outside_inference_mode
from ..errors import CaptureError
from .node import InputNode, Node
from .ops import (_GUARD_OPS, AutogradFunctionOp, Constant, FunctionOp, GetAttr, ParamHolder, SetItem, ShapeGuard,
                  TensorSize, TrainingFlag, function_spec, leaf_functions, module_spec, name_of_callable)
from .template import Ref, iter_refs
from .untouched import untouched

_ACTIVE: Optional["Tracer"] = None
_ORIG_CALL = nn.Module.__call__
_ORIG_APPLY = torch.autograd.Function.__dict__["apply"]
_ORIG_LEN = builtins.len
_PASS_THROUGH = {
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.__len__, torch.Tensor.item, torch.Tensor.tolist,
    torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.__repr__, torch.Tensor.is_contiguous,
    torch.Tensor.stride, torch.Tensor.data_ptr, torch.Tensor.storage_offset, torch.Tensor.is_floating_point,
    torch.Tensor.element_size, torch.Tensor.get_device, torch.Tensor.__hash__, torch.Tensor.__array__,
    torch.Tensor.untyped_storage, torch.Tensor.nelement if hasattr(torch.Tensor, "nelement") else torch.Tensor.dim,
    torch.Tensor.register_hook, torch.Tensor.retain_grad, torch.Tensor.requires_grad_,
}
#: reads that turn a traced value into a Python one: each becomes a value guard (`_record_value_read`)
_VALUE_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                torch.Tensor.__index__}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}


def _is_getter(func: Any) -> bool:
    return getattr(func, "__name__", None) == "__get__" and type(func).__name__ == "method-wrapper"


def is_inplace(func: Any) -> bool:
    """True for `add_`-style methods and augmented assignments: they mutate their first argument."""
    name = getattr(func, "__name__", "") or ""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


# ----------------------------------------------------------------------------------------------
# Sizes that remember their origin.

class TracedInt(int):
    """An int read from a tensor's shape during capture; arithmetic on it is recorded."""

    def __new__(cls, value: int, ref: Ref) -> "TracedInt":
        obj = int.__new__(cls, value)
        obj._amc_ref = ref
        obj._amc_owner = _ACTIVE  # the capture whose graph `ref` names
        return obj

    def __reduce__(self):  # pickles (and deep-copies) as the plain int it stands for
        return (int, (int(self),))

    def _arith(self, other: Any, op: Any, reverse: bool = False) -> Any:
        a, b = (other, self) if reverse else (self, other)
        result = op(int(a) if isinstance(a, int) else a, int(b) if isinstance(b, int) else b)
        tracer = _ACTIVE
        if tracer is None or tracer.state != "recording" or type(result) is not int:
            return result
        if not isinstance(other, (int, TracedInt)) or isinstance(other, bool):
            return result
        return tracer.record_int_arith(op, (a, b), result)


def _make_arith(op: Any, reverse: bool = False):
    def method(self: TracedInt, other: Any) -> Any:
        return self._arith(other, op, reverse)
    return method


import operator as _op  # noqa: E402  (kept next to its only use)

for _name, _fn in [("add", _op.add), ("sub", _op.sub), ("mul", _op.mul), ("floordiv", _op.floordiv),
                   ("mod", _op.mod)]:
    setattr(TracedInt, f"__{_name}__", _make_arith(_fn))
    setattr(TracedInt, f"__r{_name}__", _make_arith(_fn, reverse=True))
TracedInt.__neg__ = lambda self: self._arith(0, lambda a, b: -a)  # type: ignore[assignment]


def _make_compare(op_name: str):
    fn = _GUARD_OPS[op_name]

    def method(self: TracedInt, other: Any = None) -> Any:
        plain_other = int(other) if isinstance(other, int) else other
        result = fn(int(self)) if op_name == "truth" else fn(int(self), plain_other)
        tracer = _ACTIVE
        if (tracer is not None and tracer.state == "recording" and not tracer._leaf_depth
                and (op_name == "truth" or isinstance(other, (int, float)))):
            tracer.record_guard(op_name, (self,) if op_name == "truth" else (self, other), bool(result))
        return result
    return method


# A comparison of a traced size decides a Python branch or an assert: each one becomes a ShapeGuard.
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(TracedInt, f"__{_name}__", _make_compare(_name))
TracedInt.__bool__ = _make_compare("truth")  # type: ignore[assignment]


def _int_read(self: TracedInt) -> int:
    """`int(n)` of a traced size in the model's code: the plain int leaves the graph (into a reshape's
    constants, a range, a list), so the graph holds it for this size only; a guard checks it at run time."""
    value = int.__int__(self)
    tracer = _ACTIVE
    if tracer is not None and tracer.state == "recording" and not tracer._leaf_depth \
            and not _in_amc_graph(sys._getframe(1)):
        tracer.record_guard("eq", (self, value), True)
    return value


TracedInt.__int__ = _int_read  # type: ignore[assignment]
TracedInt.__hash__ = int.__hash__  # type: ignore[assignment]  (defining __eq__ would drop it)


class TracedTuple(tuple):
    """A tuple output (unbind/split/chunk) during capture: `t[-1]` is recorded as -1, not its position,
    so a different number of pieces at run time still picks the last one."""

    def __getitem__(self, index: Any) -> Any:
        item = tuple.__getitem__(self, index)
        tracer = _ACTIVE
        if (tracer is not None and tracer.state == "recording" and isinstance(index, int) and index < 0
                and isinstance(item, torch.Tensor) and getattr(self, "_amc_node", None)):
            tracer._values[id(item)] = Ref(self._amc_node, (index,))
        return item


class TracedSize(tuple):
    """`x.shape` during capture: a tuple of TracedInts that also knows the whole-shape node."""

    def __new__(cls, values: Tuple[int, ...], ref: Ref) -> "TracedSize":
        obj = tuple.__new__(cls, (TracedInt(v, Ref(ref.node, (i,))) for i, v in enumerate(values)))
        obj._amc_ref = ref
        obj._amc_owner = _ACTIVE
        return obj

    def numel(self) -> int:
        n = 1
        for v in self:
            n *= v
        return n

    def __reduce__(self):
        return (torch.Size, (tuple(int(v) for v in self),))


def _plain(obj: Any) -> Any:
    """The concrete value of a possibly traced argument (what torch itself should see)."""
    if isinstance(obj, TracedInt):
        return int(obj)
    if isinstance(obj, TracedSize):
        return torch.Size(int(v) for v in obj)
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (TracedInt, list, tuple, slice)) for v in obj):
        vals = [_plain(v) for v in obj]
        return vals if isinstance(obj, list) else (type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals))
    if isinstance(obj, dict) and obj:
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_plain(obj.start), _plain(obj.stop), _plain(obj.step))
    return obj


# ----------------------------------------------------------------------------------------------

class Tracer(TorchFunctionMode):
    """State of one capture. Use `trace()` or the seed's boundary functions, not this class."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root
        self.state = "waiting"  # -> "recording" during the root call -> "done"
        self.nodes: List[Node] = []
        self.modules: Dict[str, nn.Module] = {}
        self.input_nodes: List[InputNode] = []
        self.input_constants: Dict[Any, Any] = {}
        self.outputs: Any = None
        self.fallbacks: Counter = Counter()
        self._values: Dict[int, Ref] = {}
        # a recorded tensor's id is forgotten when it dies (a later tensor may reuse the id): intermediates
        # are freed as in eager (keeping them all alive held 9 GB for a 2 GB forward of a 768-px ViT)
        self._watched: Dict[int, Any] = {}
        self._constants: set = set()  # names of the Constant nodes
        self._leaf_depth = 0
        self._scope: List[str] = []
        self._modules_called: List[nn.Module] = [root]  # whose forward runs now (its `training` decides dropouts)
        self._flag_nodes: Dict[bool, str] = {}  # TrainingFlag node per mode it was made in
        self._grad_mode = [True]  # the grad mode the forward's own code set (`_grad_mode_seen`)
        self._names: set = set()
        self._module_names: Dict[int, str] = {}  # a layer held under two names is called by its first, as
        for n, m in root.named_modules(remove_duplicate=False):  # named_modules() and its parameters name it
            self._module_names.setdefault(id(m), n)
        self._module_keys: Dict[int, str] = {}
        self._params: Dict[int, Tuple[str, torch.Tensor, bool]] = {}
        for n, p in root.named_parameters(remove_duplicate=False):
            self._params.setdefault(id(p), (n, p, False))
        for n, b in root.named_buffers(remove_duplicate=False):
            self._params.setdefault(id(b), (n, b, True))
        self._param_nodes: Dict[int, str] = {}
        self._const_nodes: Dict[int, str] = {}
        self._anon = itertools.count()

    # -- naming ------------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        base = base or "node"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _key_for(self, name: str) -> str:
        key, i = name.replace(".", "_") or "op", 1
        base = key
        while key in self.modules or hasattr(nn.ModuleDict, key):  # e.g. "double", "to", "train"
            key, i = f"{base}_{i}", i + 1
        return key

    def _scoped(self, short: str) -> str:
        scope = self._scope[-1] if self._scope else ""
        return f"{scope}.{short}" if scope else short

    # -- values ------------------------------------------------------------------------------
    def _is_traced(self, obj: Any) -> bool:
        if isinstance(obj, torch.Tensor):
            return id(obj) in self._values or id(obj) in self._params
        if isinstance(obj, (TracedInt, TracedSize)):
            return True
        if isinstance(obj, (list, tuple)):
            return any(self._is_traced(v) for v in obj)
        if isinstance(obj, dict):
            return any(self._is_traced(v) for v in obj.values())
        if isinstance(obj, slice):
            return any(self._is_traced(v) for v in (obj.start, obj.stop, obj.step))
        return False

    def _leaf_template(self, obj: Any) -> Any:
        if isinstance(obj, (TracedSize, TracedInt)):
            if obj._amc_owner is not self:
                raise CaptureError(
                    f"a size read from a tensor's shape in an earlier capture reached this one ({_user_source_line()}):"
                    " a cache kept across calls (e.g. functools.lru_cache on a shape helper) returned it, and the "
                    "graph would read a node that does not exist. Run that helper uncached while tracing (add it "
                    "to amc.graph.known_leaves.UNCACHED_DURING_CAPTURE) or clear its cache before amc.trace")
            return obj._amc_ref
        if isinstance(obj, torch.Tensor):
            ref = self._values.get(id(obj))
            if ref is not None:
                return ref
            if id(obj) in self._params:
                return Ref(self._param_node(obj))
            return Ref(self._const_node(obj))
        if isinstance(obj, torch.Size):
            return tuple(int(v) for v in obj)
        return obj

    def to_template(self, obj: Any) -> Any:
        if isinstance(obj, (TracedSize, TracedInt, torch.Tensor)):
            return self._leaf_template(obj)
        if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
            vals = [self.to_template(v) for v in obj]
            if isinstance(obj, list):
                return vals
            return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
        if isinstance(obj, dict):
            return type(obj)((k, self.to_template(v)) for k, v in obj.items())
        if isinstance(obj, slice):
            return slice(self.to_template(obj.start), self.to_template(obj.stop), self.to_template(obj.step))
        return self._leaf_template(obj)

    def _param_node(self, t: torch.Tensor) -> str:
        if id(t) not in self._param_nodes:
            pname, tensor, is_buffer = self._params[id(t)]
            name = self._unique(pname)
            self._add(name, ParamHolder(tensor, is_buffer), (), {}, {"op": "Parameter", "target": pname}, t)
            self._param_nodes[id(t)] = name
        return self._param_nodes[id(t)]

    def _const_node(self, t: torch.Tensor) -> str:
        if id(t) not in self._const_nodes:
            name = self._unique(self._scoped("constant"))
            self._add(name, Constant(t), (), {}, {"op": "Constant"}, t)
            self._const_nodes[id(t)] = name
            self._constants.add(name)  # kept when t dies (its id leaves _const_nodes then)
        return self._const_nodes[id(t)]

    def _forget(self, key: int, _ref: Any) -> None:
        for ids in (self._values, self._watched, self._const_nodes):  # every map keyed by a tensor's id
            ids.pop(key, None)

    def _bind(self, node: str, out: Any, path: Tuple[Any, ...] = ()) -> None:
        if isinstance(out, torch.Tensor):
            key = id(out)
            self._values[key] = Ref(node, path)
            if key not in self._watched:
                self._watched[key] = weakref.ref(out, functools.partial(self._forget, key))
        elif isinstance(out, (list, tuple)):
            for i, v in enumerate(out):
                self._bind(node, v, path + (i,))
        elif isinstance(out, dict):
            for k, v in out.items():
                self._bind(node, v, path + (k,))

    def _add(self, name: str, module: nn.Module, args: Any, kwargs: Any, meta: Dict[str, Any], out: Any,
             key: Optional[str] = None) -> Node:
        if key is None:
            key = self._key_for(name)
            self.modules[key] = module
        meta.setdefault("out", describe(out))
        amp = autocast_state()
        if amp != self._autocast_at_start:  # forward entered torch.autocast: the replay enters it too
            meta["autocast"] = amp_difference(amp, self._autocast_at_start)
        if not self._grad_mode[0]:  # inside the forward's own `torch.no_grad()`
            meta["no_grad"] = True
        node = Node(name, key, tuple(args), dict(kwargs), meta)
        self.nodes.append(node)
        self._bind(name, out)
        return node

    # -- recording ---------------------------------------------------------------------------
    def record_int_arith(self, op: Any, operands: Tuple[Any, Any], result: int) -> TracedInt:
        name = self._unique(self._scoped(op.__name__))
        args = tuple(self.to_template(v) for v in operands)
        if op.__name__ == "<lambda>":  # unary minus: recorded as neg(self)
            op, args = _op.neg, args[:1]
        self._add(name, FunctionOp(op), args, {}, {"op": "IntArith"}, None)
        return TracedInt(result, Ref(name))

    def record_guard(self, op_name: str, operands: Tuple[Any, ...], result: bool) -> None:
        name = self._unique(self._scoped(f"guard_{op_name}"))
        args = tuple(self.to_template(v) for v in operands)
        source = _user_source_line()
        values = tuple(int(v) if isinstance(v, int) else v for v in operands) + ((None,) if len(operands) == 1 else ())
        self._add(name, ShapeGuard(op_name, result, source, values), args, {},
                  {"op": "ShapeGuard", "source": source}, None)

    def _record_value_read(self, func: Any, x: torch.Tensor, rest: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """`bool(t)`, `t.item()`, `int(t)`: a value computed from the inputs leaves the graph into Python.
        The graph keeps what follows for this value only, so a guard checks it at run time (raising
        instead of computing something else); a read of more than one element cannot be guarded and raises."""
        result = func(x.detach(), *_plain(rest), **_plain(kwargs))
        if x.numel() != 1:
            return result  # bool() of a multi-element tensor raises in torch itself
        name = self._unique(self._scoped("value_guard"))
        source = _user_source_line()
        if func is torch.Tensor.__bool__:
            guard = ShapeGuard("truth", bool(result), source, (bool(result), None), value=True)
            args: Tuple[Any, ...] = (self.to_template(x),)
        else:
            guard = ShapeGuard("eq", True, source, (result, result), value=True)
            args = (self.to_template(x), result)
        self._add(name, guard, args, {}, {"op": "ShapeGuard", "source": source, "value": True}, None)
        return result

    def _record_size(self, x: torch.Tensor, dim: Optional[int], numel: bool = False) -> Any:
        value = x.numel() if numel else (x.shape if dim is None else x.shape[dim])
        short = "numel" if numel else ("size" if dim is None else f"size{dim}")
        name = self._unique(self._scoped(short))
        self._add(name, TensorSize(dim, numel), (self.to_template(x),), {}, {"op": "TensorSize"}, None)
        if dim is None and not numel:
            return TracedSize(tuple(value), Ref(name))
        return TracedInt(value, Ref(name))

    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if (func in _VALUE_READS and self.state == "recording" and not self._leaf_depth
                and isinstance(args[0], torch.Tensor) and self._is_traced(args[0])):
            return self._record_value_read(func, args[0], args[1:], kwargs)
        if self.state != "recording" or self._leaf_depth or func in _PASS_THROUGH:
            if func is torch.Tensor.__len__ and self.state == "recording" and not self._leaf_depth \
                    and self._is_traced(args[0]):
                warn_user("amc capture: len(tensor) returns a plain int, so the graph keeps the captured "
                          f"size {len(args[0])}; use x.shape[0] / x.size(0) where the size must follow "
                          "the input")
            return func(*_plain(args), **_plain(kwargs))
        if _is_getter(func):
            return self._getter(func, args)
        if func is torch.Tensor.size and self._is_traced(args[0]):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return self._record_size(args[0], None if dim is None else int(dim))
        if func is torch.Tensor.numel and self._is_traced(args[0]):
            return self._record_size(args[0], None, numel=True)
        if not self._is_traced(args) and not self._is_traced(kwargs):
            return func(*_plain(args), **_plain(kwargs))
        return self._record_call(func, args, kwargs)

    def _getter(self, func: Any, args: Tuple[Any, ...]) -> Any:
        attr = getattr(func.__self__, "__name__", "")
        x = args[0]
        if attr == "shape" and self._is_traced(x):
            return self._record_size(x, None)
        out = func(*args)
        if isinstance(out, torch.Tensor) and self._is_traced(x) and attr not in ("grad",):
            name = self._unique(self._scoped(attr))
            self._add(name, GetAttr(attr), (self.to_template(x),), {}, {"op": "GetAttr"}, out)
        return out

    def _record_call(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        targs, tkwargs = self.to_template(args), self.to_template(kwargs)
        if func in _MODE_SWITCHES and (self._modules_called[-1].training if func is not F.batch_norm
                                       else _batch_stats_follow_mode(self._modules_called[-1])):
            targs, tkwargs = self._switch_follows_mode(func, targs, tkwargs)
        elif func is torch.Tensor.add_ and len(targs) == 2 and isinstance(targs[1], int) \
                and self._counts_batches(args[0]):
            targs = (targs[0], self._while_training(targs[1]))
        out = func(*_plain(args), **_plain(kwargs))
        short = (getattr(func, "__name__", None) or "call").strip("_") or "call"
        name = self._unique(self._scoped(short))
        spec = function_spec(func)
        if func is torch.Tensor.__setitem__:
            module: nn.Module = SetItem()
            meta = {"op": "SetItem", "mutates": True}
            out = args[0]
        else:
            module = (spec.wrapper if spec else FunctionOp)(func)
            meta = {"op": spec.name if spec else "Fallback"}
            if spec is None:
                self.fallbacks[name_of_callable(func) or repr(func)] += 1
                meta["fallback"] = True
            if is_inplace(func):
                meta["mutates"] = True
        if meta.get("mutates"):
            self._mark_mutated_constant(targs)
        self._add(name, module, targs, tkwargs, meta, out)
        if isinstance(out, torch.Size):
            return TracedSize(tuple(out), Ref(name))
        if type(out) is tuple and out and all(isinstance(v, torch.Tensor) for v in out):
            out = TracedTuple(out)
            out._amc_node = name
        return out

    def _switch_follows_mode(self, func: Any, targs: Any, tkwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
        """A mode switch (`training=` of a dropout or of a BatchNorm subclass's F.batch_norm, an attention's
        `dropout_p`) set from the calling module's mode reads the network's mode at run time instead: traced
        as a constant, `.eval()` kept dropping (HF BERT's SDPA attention) or kept batch statistics (timm's
        BatchNormAct2d), and an eval capture trained on running statistics."""
        index, keyword = _MODE_SWITCHES[func]
        targs = list(targs)
        value = targs[index] if index < len(targs) else tkwargs.get(keyword)
        if isinstance(value, bool) and value == self._modules_called[-1].training:
            flag: Any = Ref(self._training_flag())
        elif isinstance(value, float) and value > 0:  # dropout_p: p while training, 0 in eval
            flag = self._while_training(value)
        else:
            return tuple(targs), tkwargs
        if index < len(targs):
            targs[index] = flag
        else:
            tkwargs = {**tkwargs, keyword: flag}
        return tuple(targs), tkwargs

    def _counts_batches(self, tensor: Any) -> bool:
        """`tensor` is the batch counter of a training BatchNorm traced into (`num_batches_tracked.add_(1)`
        under `if self.training:`): captured as it is, every eval call counted a batch."""
        module = self._modules_called[-1]
        return module.training and _batch_stats_follow_mode(module) \
            and tensor is getattr(module, "num_batches_tracked", None)

    def _while_training(self, value: int) -> Ref:
        """`value` while the network trains, 0 in eval (the network's mode read at run time)."""
        step = Ref(self._unique(self._scoped("while_training")))
        self._add(step.node, FunctionOp(_op.mul), (Ref(self._training_flag()), value), {}, {"op": "IntArith"}, None)
        return step

    def _training_flag(self) -> str:
        """The node reading the network's mode, in the mode of the module calling for it now (an op module
        is made training; captured in eval, a BatchNorm must read eval until the graph is switched)."""
        mode = bool(self._modules_called[-1].training)
        if mode not in self._flag_nodes:
            name = self._unique("train_mode" if mode else "eval_mode")
            self._add(name, TrainingFlag().train(mode), (), {}, {"op": "TrainingFlag"}, None)
            self._flag_nodes[mode] = name
        return self._flag_nodes[mode]

    def _mark_mutated_constant(self, targs: Any) -> None:
        first = targs[0] if targs else None
        if isinstance(first, Ref) and isinstance(self.modules.get(self._node_key(first.node)), Constant):
            self.modules[self._node_key(first.node)].clone = True

    def _node_key(self, name: str) -> Optional[str]:
        for n in reversed(self.nodes):
            if n.name == name:
                return n.module
        return None

    def call_module(self, mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        spec = module_spec(mod)
        if spec is None or not spec.leaf:
            self._scope.append(self._module_names.get(id(mod), type(mod).__name__.lower()))
            self._modules_called.append(mod)
            try:
                return _ORIG_CALL(mod, *args, **kwargs)
            finally:
                self._scope.pop()
                self._modules_called.pop()
        if not self._is_traced(args) and not self._is_traced(kwargs):
            return _ORIG_CALL(mod, *args, **kwargs)
        targs, tkwargs = self.to_template(args), self.to_template(kwargs)
        self._leaf_depth += 1
        try:
            out = _ORIG_CALL(mod, *_plain(args), **_plain(kwargs))
        finally:
            self._leaf_depth -= 1
        mname = self._module_names.get(id(mod)) or f"{type(mod).__name__.lower()}{next(self._anon)}"
        key = self._module_keys.get(id(mod))
        name = self._unique(mname or type(mod).__name__.lower())
        node = self._add(name, mod, targs, tkwargs, {"op": spec.name, "target": mname}, out, key=key)
        self._module_keys.setdefault(id(mod), node.module)
        return out

    def call_leaf_function(self, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        targs, tkwargs = self.to_template(args), self.to_template(kwargs)
        self._leaf_depth += 1
        try:
            out = fn(*_plain(args), **_plain(kwargs))
        finally:
            self._leaf_depth -= 1
        name = self._unique(self._scoped(fn.__name__))
        self._add(name, FunctionOp(fn), targs, tkwargs, {"op": function_spec(fn).name}, out)
        return out

    def call_autograd_function(self, cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        targs, tkwargs = self.to_template(args), self.to_template(kwargs)
        self._leaf_depth += 1
        try:
            out = _ORIG_APPLY.__get__(None, cls)(*_plain(args), **_plain(kwargs))
        finally:
            self._leaf_depth -= 1
        name = self._unique(self._scoped(cls.__name__.lower()))
        self._add(name, AutogradFunctionOp(cls.apply), targs, tkwargs, {"op": "AutogradFunction"}, out)
        return out

    # -- the root call -------------------------------------------------------------------------
    def run_root(self, mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        self.state = "recording"
        with _grad_mode_seen(self._grad_mode):
            return self._run_root(mod, args, kwargs)

    def _run_root(self, mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            names = list(inspect.signature(mod.forward).parameters)
        except (TypeError, ValueError):
            names = []
        for i, a in enumerate(args):
            base = names[i] if i < len(names) and not names[i].startswith("*") else f"input_{i}"
            self._add_input(base, i, a)
        for k, v in kwargs.items():
            self._add_input(k, k, v)
        try:
            out = self.call_module(mod, args, kwargs) if module_spec(mod) else _ORIG_CALL(mod, *args, **kwargs)
        finally:
            self.state = "done"
        self.outputs = self.to_template(out)
        return out

    def _add_input(self, name: str, index: Any, value: Any) -> None:
        if not _contains_tensor(value):
            inside = _computed_inside(value, None, 6, set())
            if inside is not None:  # kept as a constant, its tensors would be the graph's forever
                cls = type(value)
                raise CaptureError(
                    f"input {name!r} is a {cls.__module__}.{cls.__qualname__} holding tensors "
                    f"({inside.lstrip('.') or 'itself'}): amc traces tensors and lists, tuples and dicts of them as "
                    "inputs and keeps any other object as a constant, so the graph would compute on these tensors "
                    "at every call. Pass the tensors, or a dict of them (dataclasses.asdict(batch), dict(batch)), "
                    "and wrap the model if its forward wants the object")
            self.input_constants[index] = value
            return
        name = self._unique(name)
        self.input_nodes.append(InputNode(name, index, {"out": describe(value)}))
        self._bind(name, value)

    # -- boundary ------------------------------------------------------------------------------
    def start(self) -> None:
        global _ACTIVE
        if _ACTIVE is not None:
            raise CaptureError("a capture is already in progress: call insertCaptureBoundaryEnd() first")
        _ACTIVE = self
        self._autocast_at_start = autocast_state()
        nn.Module.__call__ = _patched_call
        torch.autograd.Function.apply = classmethod(_patched_apply)
        builtins.len = _patched_len
        self._swapped = _swap_leaf_functions() + _swap_library_hooks() + _swap_python_random()
        self.__enter__()

    def end(self) -> None:
        global _ACTIVE
        try:
            self.__exit__(None, None, None)
        finally:
            nn.Module.__call__ = _ORIG_CALL
            torch.autograd.Function.apply = _ORIG_APPLY
            builtins.len = _ORIG_LEN
            for space, attr, fn in getattr(self, "_swapped", ()):
                space[attr] = fn
            _ACTIVE = None
            _plain_attributes(self.root)

    def build(self, name: str = "") -> "ReconstructedNetwork":
        from .network import ReconstructedNetwork

        if self.state == "waiting":
            raise CaptureError("the network was never called between the capture boundaries: call "
                               "network(example_input) after insertCaptureBoundaryStart(network)")
        if not any(True for r in iter_refs(self.outputs) if r.node not in self._const_names()):
            raise CaptureError(f"{type(self.root).__name__} returned no tensor computed from its inputs "
                               f"(got {describe(self.outputs)}); amc captures networks whose outputs are tensors")
        _refuse_stale_outputs(self.root, self.outputs, self._values)
        nodes = _dead_code_elimination(self.nodes, self.outputs, self.modules)
        used = {n.module for n in nodes}
        modules = {k: m for k, m in self.modules.items() if k in used}
        meta = {"source": f"{type(self.root).__module__}.{type(self.root).__qualname__}",
                "fallback_ops": dict(self.fallbacks), "input_constants": self.input_constants,
                "training": self.root.training}
        if self.fallbacks:
            warn_user("amc capture: ops without a dedicated wrapper were captured by the generic replay "
                      "node (exact; pruning passes channels through them only where a probe proves them "
                      f"element-wise): {dict(self.fallbacks)}")
        net = ReconstructedNetwork(modules, self.input_nodes, nodes, self.outputs, meta)
        net.training = self.root.training  # the flag only: submodules keep the modes they were captured in
        return net

    def _const_names(self) -> set:
        return self._constants


def _patched_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = _ACTIVE
    if tracer is None:
        return _ORIG_CALL(mod, *args, **kwargs)
    if tracer.state == "waiting" and mod is tracer.root:
        return tracer.run_root(mod, args, kwargs)
    if tracer.state != "recording" or tracer._leaf_depth:
        return _ORIG_CALL(mod, *args, **kwargs)
    return tracer.call_module(mod, args, kwargs)


def _patched_len(obj: Any) -> int:
    """`len(tensor)` as a size read at run time: Python's own `len` turns any int into a plain one, which
    froze torchvision's `num_rois = len(rois)` (a data-dependent box count) into the graph."""
    tracer = _ACTIVE
    if (tracer is not None and isinstance(obj, torch.Tensor) and obj.dim() > 0 and tracer.state == "recording"
            and not tracer._leaf_depth and tracer._is_traced(obj)):
        return tracer._record_size(obj, 0)
    return _ORIG_LEN(obj)


def _leaf_call(fn: Any) -> Any:
    """What a registered leaf function's name points to during capture."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        tracer = _ACTIVE
        if (tracer is None or tracer.state != "recording" or tracer._leaf_depth
                or not tracer._is_traced((args, kwargs))):
            return fn(*args, **kwargs)
        return tracer.call_leaf_function(fn, args, kwargs)
    return call


def _swap_leaf_functions() -> List[Tuple[Any, str, Any]]:
    """Point every call site of a registered leaf function at its recording wrapper; returns what to restore."""
    from .known_leaves import register_known

    register_known()
    swapped = []
    for spec in leaf_functions():
        fn = spec.key
        spaces = [fn.__globals__] + [vars(sys.modules[site]) for site in spec.call_sites if site in sys.modules]
        for space in {id(sp): sp for sp in spaces}.values():  # its own module (even exec'd code), then callers'
            for attr, value in list(space.items()):
                if value is fn:
                    swapped.append((space, attr, fn))
                    space[attr] = _leaf_call(fn)
    return swapped


def _swap_library_hooks() -> List[Tuple[Any, str, Any]]:
    """Tell libraries that check "am I being traced?" that they are (`known_leaves.TRACING_CHECKS`), so they
    keep their general path: transformers otherwise drops an all-ones attention mask from the graph. Known
    shape caches run uncached (`known_leaves.UNCACHED_DURING_CAPTURE`)."""
    from .known_leaves import TRACING_CHECKS, UNCACHED_DURING_CAPTURE

    swapped = []
    for package, cached, uncached in UNCACHED_DURING_CAPTURE:
        space = vars(sys.modules[package]) if sys.modules.get(package) is not None else {}
        if callable(space.get(cached)) and callable(space.get(uncached)):
            swapped.append((space, cached, space[cached]))
            space[cached] = space[uncached]
    for package, attr in TRACING_CHECKS:
        for name, module in list(sys.modules.items()):
            if module is None or not (name == package or name.startswith(package + ".")):
                continue
            space = vars(module)
            if callable(space.get(attr)) and not getattr(space[attr], "_amc_tracing", False):
                swapped.append((space, attr, space[attr]))
                space[attr] = _tracing_check
    return swapped


#: Python-level random draws: a graph replays torch ops only, so a draw during capture is a decision (a
#: hand-written drop path's `random.random() < p`, SpecAugment's numpy mask) it would keep at every call
PYTHON_RANDOM = (("random", ("random", "uniform", "randint", "randrange", "choice", "choices", "sample", "shuffle",
                             "gauss", "normalvariate", "betavariate", "expovariate", "triangular", "getrandbits")),
                 ("numpy.random", ("rand", "randn", "random", "random_sample", "uniform", "randint", "choice",
                                   "binomial", "normal", "beta", "permutation", "shuffle", "exponential", "poisson")))


def _swap_python_random() -> List[Tuple[Any, str, Any]]:
    """While the model runs under capture, Python's and numpy's random draws raise (`_refusing_draw`)."""
    swapped = []
    for package, names in PYTHON_RANDOM:
        space = vars(sys.modules[package]) if sys.modules.get(package) is not None else {}
        for name in names:
            if callable(space.get(name)):
                swapped.append((space, name, space[name]))
                space[name] = _refusing_draw(f"{package}.{name}", space[name])
    return swapped


def _refusing_draw(name: str, fn: Any) -> Any:
    """Raises in a model captured in training mode (where the draw decides something); in eval mode the
    draw may be unused, so it warns and runs."""
    def draw(*args: Any, **kwargs: Any) -> Any:
        text = (f"the model drew a Python random number during capture ({name} at {_user_source_line()}): a graph "
                "replays torch ops only, so it would keep this draw's outcome at every call (a hand-written drop "
                "path traced in training mode would skip the same blocks forever, in eval too)")
        if _ACTIVE is not None and _ACTIVE.root.training:
            raise CaptureError(f"{text}. Trace the model in eval mode (model.eval()), or draw with torch "
                               "(torch.rand) so the graph replays the draw")
        warn_user(f"{text}; if the outcome matters, draw with torch (torch.rand) so the graph replays it")
        return fn(*args, **kwargs)
    return draw


def _tracing_check(*args: Any, **kwargs: Any) -> bool:
    return True


_tracing_check._amc_tracing = True  # type: ignore[attr-defined]


def _patched_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    tracer = _ACTIVE
    if tracer is None or tracer.state != "recording" or tracer._leaf_depth or not tracer._is_traced((args, kwargs)):
        return _ORIG_APPLY.__get__(None, cls)(*args, **kwargs)
    if cls is _REENTRANT_CHECKPOINT:  # checkpoint(fn, *xs, use_reentrant=True) computes fn(*xs): trace into
        return args[0](*args[2:])    # fn (it was one opaque node: its layers unprunable, its MACs uncounted)
    return tracer.call_autograd_function(cls, args, kwargs)


_REENTRANT_CHECKPOINT = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


def _plain_attributes(root: nn.Module) -> None:
    """Sizes the forward stored on its modules (HF Swin keeps `self.window_size = min(input_resolution)`)
    become the plain ints they stand for: a later capture reading them sees the model's value, as eager does,
    not a size of this capture's graph."""
    for module in root.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, (TracedInt, TracedSize)) or (
                    isinstance(value, (list, tuple)) and any(isinstance(v, (TracedInt, TracedSize)) for v in value)):
                vars(module)[key] = _plain(value)


@contextlib.contextmanager
def _grad_mode_seen(mode: List[bool]) -> Iterator[None]:
    """While the root forward runs (under amc's no_grad), `mode[0]` is the grad mode its own code sets:
    True at the start, as in training; `torch.no_grad()` / `set_grad_enabled` inside it (they all call
    `torch._C._set_grad_enabled`) switch it, and `torch.is_grad_enabled()` reads it. Ops still run without
    autograd; nodes recorded with it False replay under no_grad."""
    set_real, is_real = torch._C._set_grad_enabled, torch.is_grad_enabled

    def set_seen(enabled: bool) -> None:
        mode[0] = bool(enabled)

    torch._C._set_grad_enabled, torch.is_grad_enabled = set_seen, lambda: mode[0]
    try:
        yield
    finally:
        torch._C._set_grad_enabled, torch.is_grad_enabled = set_real, is_real


def _batch_stats_follow_mode(module: nn.Module) -> bool:
    """A BatchNorm layer traced into (a subclass with its own forward) whose batch statistics are used
    exactly while it trains: `training=self.training` (nn.BatchNorm's own rule with running statistics)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats \
        and module.running_mean is not None


# callable -> (position, keyword) of its mode switch: a `training` flag, or the attention's dropout probability
_MODE_SWITCHES: Dict[Any, Tuple[int, str]] = {
    **{fn: (2, "training") for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                      F.feature_alpha_dropout)},
    torch.dropout: (2, "train"),
    F.scaled_dot_product_attention: (4, "dropout_p"),
    F.batch_norm: (5, "training"),  # only in a BatchNorm subclass with running statistics
}


_AMC_GRAPH_DIR = os.path.dirname(os.path.abspath(__file__))


def _in_amc_graph(frame: Any) -> bool:
    """True for a frame of amc's graph package (its own conversions, not the model's code)."""
    return os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _AMC_GRAPH_DIR


def _user_source_line() -> str:
    """`file:line: code` of the first frame outside amc's graph package (where the decision was made)."""
    frame = sys._getframe(1)
    while frame is not None and _in_amc_graph(frame):
        frame = frame.f_back
    if frame is None:
        return ""
    line = (linecache.getline(frame.f_code.co_filename, frame.f_lineno) or "").strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" + (f" `{line}`" if line else "")


_INERT = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, slice, type, enum.Enum)


def _computed_inside(obj: Any, values: Optional[Dict[int, Any]], depth: int, seen: set) -> Optional[str]:
    """Where (".attr[0].keys") a tensor this forward computed (any tensor: `values` None) sits inside
    `obj`, if one does."""
    if isinstance(obj, torch.Tensor):
        return "" if values is None or id(obj) in values else None
    if depth == 0 or id(obj) in seen or isinstance(obj, (_INERT, nn.Module)):
        return None
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        items = [(f"[{k!r}]", v) for k, v in obj.items()]
    else:
        items = [(f".{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
    for where, v in items:
        found = _computed_inside(v, values, depth - 1, seen)
        if found is not None:
            return where + found
    return None


def _refuse_stale_outputs(root: nn.Module, template: Any, values: Dict[int, Any], path: str = "") -> None:
    """An output object other than a tensor or a list/tuple/dict of them is kept as it was at capture:
    one holding tensors of this forward (a transformers generation cache) would come back, stale, from
    every call. Refuse it by name."""
    if isinstance(template, (Ref, torch.Tensor)) or isinstance(template, _INERT):
        return
    if isinstance(template, (list, tuple)):
        for i, v in enumerate(template):
            _refuse_stale_outputs(root, v, values, f"{path}[{i}]")
        return
    if isinstance(template, dict):
        for k, v in template.items():
            _refuse_stale_outputs(root, v, values, f"{path}[{k!r}]")
        return
    where = _computed_inside(template, values, 6, set())
    if where is None:
        return
    cls = type(template)
    hint = ("It is the generation cache (past_key_values): trace with use_cache=False, e.g. "
            "amc.trace(model, **batch, use_cache=False)" if cls.__module__.startswith("transformers")
            else "Return the tensors themselves, or a list, tuple or dict of them")
    raise CaptureError(f"{type(root).__name__} returns a {cls.__module__}.{cls.__qualname__} at output {path or '[]'}, "
                       f"which holds a tensor this forward computed ({where.lstrip('.')}): a graph returns tensors "
                       "and lists, tuples and dicts of them, and keeps any other object as it was at capture, so "
                       f"every call would return these traced values. {hint}")


def _contains_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_contains_tensor(v) for v in obj)
    if isinstance(obj, dict):
        return any(_contains_tensor(v) for v in obj.values())
    return False


def describe(obj: Any) -> Any:
    """JSON-friendly summary of a value: shapes and dtypes of tensors, structure kept."""
    if isinstance(obj, torch.Tensor):
        return {"shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, Ref):
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj if not isinstance(obj, TracedInt) else int(obj)
    return type(obj).__name__


_PURE_OPS = {"TensorSize", "IntArith", "GetAttr", "Parameter", "Constant"}


def _dead_code_elimination(nodes: List[Node], outputs: Any, modules: Dict[str, nn.Module]) -> List[Node]:
    """Drop size reads, int arithmetic and pure tensor ops whose results nobody used (asserts, prints)."""
    used = {r.node for r in iter_refs(outputs)}
    keep: List[Node] = []
    for node in reversed(nodes):
        pure = node.meta.get("op") in _PURE_OPS or (
            isinstance(modules[node.module], FunctionOp) and not isinstance(modules[node.module], AutogradFunctionOp)
            and not node.meta.get("mutates"))
        if node.name in used or not pure:
            keep.append(node)
            used.update(r.node for r in iter_refs((node.args, node.kwargs)))
    keep.reverse()
    return keep


# ----------------------------------------------------------------------------------------------
# Public entry points.

@outside_inference_mode
def trace(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> "ReconstructedNetwork":
    """Run `model` once on the example inputs and return the captured ReconstructedNetwork.

    >>> net = amc.trace(torchvision.models.resnet18().eval(), torch.randn(2, 3, 224, 224))

    A model that is not an nn.Module, missing inputs, or a forward that fails on them raise
    `amc.errors.CaptureError` (a RuntimeError) naming the problem.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"amc.trace expects an nn.Module, got {type(model).__name__}; "
                           "wrap plain functions in an nn.Module first")
    model = _eager(model)
    _warn_hooks(model)
    example_inputs, example_kwargs = _amc_keywords(model, example_inputs, example_kwargs)
    if not example_inputs and not example_kwargs:
        raise CaptureError("amc.trace needs example inputs: amc.trace(model, torch.randn(1, 3, 224, 224))")
    try:
        return _capture(model, example_inputs, example_kwargs)
    except _ForwardFailed as exc:
        pair = _export_pair(example_inputs) if not example_kwargs else None
        if pair is not None:  # amc.trace(model, args, kwargs), torch.export.export's spelling
            try:
                return _capture(model, *pair)
            except _ForwardFailed as again:
                raise CaptureError(f"{exc} Read as torch.export's (args, kwargs) it failed too: "
                                   f"{again.__cause__!r}") from exc.__cause__
        spread = spread_tuple(example_inputs)
        if spread is None:
            raise CaptureError(str(exc)) from exc.__cause__
        try:  # amc.trace(model, (x,)), torch.jit.trace's and torch.export's habit: the tuple holds the inputs
            return _capture(model, spread, example_kwargs)
        except _ForwardFailed as again:
            raise CaptureError(f"{exc} With the tuple's {len(spread)} tensor(s) as separate inputs "
                               f"(amc.trace(model, *inputs)) it failed too: {again.__cause__!r}") from exc.__cause__


def _replayed_hook(hook: Any) -> bool:
    """Hooks whose whole effect is the tensors they compute, which the graph records: masks, weight and
    spectral norm, amc's own."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    owner = getattr(hook, "__func__", hook)
    return isinstance(hook, (BasePruningMethod, WeightNorm, SpectralNorm)) or \
        str(getattr(owner, "__module__", "") or type(hook).__module__).split(".")[0] == "amc"


def _warn_hooks(model: nn.Module) -> None:
    """A forward hook's side effects (features appended to a list, Grad-CAM's activations, an observer's
    statistics) do not happen when the network runs, which replays recorded ops only: say so, where."""
    from torch.nn.modules import module as torch_module

    hooked = [name or "(the model itself)" for name, m in model.named_modules()
              if any(not _replayed_hook(h) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))]
    if any(not _replayed_hook(h) for h in (*torch_module._global_forward_hooks.values(),
                                           *torch_module._global_forward_pre_hooks.values())):
        hooked.insert(0, "every module (a global hook)")
    if hooked:
        warn_user(f"amc capture: forward hooks on {hooked[:5]}{' ...' if len(hooked) > 5 else ''} ran during "
                  "capture; the tensors they return are part of the network, but nothing else they do (append "
                  "features to a list, log, update an observer) happens when the network runs. Register such "
                  "hooks on the network's layers instead: net.module_of(name).register_forward_hook(...), names "
                  "in net.layer_nodes")


def _eager(model: nn.Module) -> nn.Module:
    """The eager module to capture: torch.compile's wrapper is looked through (dynamo would otherwise compile
    the capture itself, and every name would start with `_orig_mod.`); TorchScript cannot be captured."""
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(f"{type(model).__name__} is TorchScript (torch.jit.script / torch.jit.trace): it runs in "
                           "the TorchScript interpreter, where capture sees no module call and no op. Pass the "
                           "nn.Module it was made from")
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


_AMP_DEVICES = ("cpu", "cuda")


def autocast_state() -> Tuple[Tuple[bool, str], ...]:
    """(enabled, dtype) of torch.autocast per device type, as the ops being recorded see it."""
    return tuple((torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d)).split(".")[-1])
                 for d in _AMP_DEVICES)


def amp_difference(now: Tuple[Tuple[bool, str], ...], before: Tuple[Tuple[bool, str], ...]) -> List[list]:
    """[[device_type, enabled, dtype], ...] for the device types whose autocast state differs."""
    return [[d, a[0], a[1]] for d, a, b in zip(_AMP_DEVICES, now, before) if a != b]


def _export_pair(example_inputs: Tuple[Any, ...]) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
    """`(args, kwargs)` when the inputs are a tuple and a dict of keyword inputs, as torch.export takes them."""
    if len(example_inputs) != 2 or not isinstance(example_inputs[0], (tuple, list)) \
            or not isinstance(example_inputs[1], Mapping) or not all(isinstance(k, str) for k in example_inputs[1]):
        return None
    return tuple(example_inputs[0]), dict(example_inputs[1])


class _ForwardFailed(CaptureError):
    """The model's own forward raised on the example inputs (not a tracer limitation)."""


def spread_tuple(example_inputs: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
    """The inputs inside a lone tuple or list of tensors (`(x,)` passed where `x` was meant), else None."""
    if len(example_inputs) != 1 or not isinstance(example_inputs[0], (tuple, list)):
        return None
    inner = tuple(example_inputs[0])
    return inner if inner and all(isinstance(v, torch.Tensor) for v in inner) else None


def _capture(model: nn.Module, example_inputs: Tuple[Any, ...], example_kwargs: Dict[str, Any]
             ) -> "ReconstructedNetwork":
    tracer = Tracer(model)
    tracer.start()
    try:
        with torch.no_grad(), untouched(model):  # BN statistics, flags and RNG stay the user's
            model(*example_inputs, **example_kwargs)
    except CaptureError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise _ForwardFailed(f"running {type(model).__name__} on the example inputs failed: "
                             f"{type(exc).__name__}: {exc}. Check that the inputs run in eager mode "
                             f"(shapes {describe(list(example_inputs))}).") from exc
    finally:
        tracer.end()
    net = tracer.build()
    if model.training:
        _warn_if_eval_differs(model, example_inputs, example_kwargs, net)
    return net


def _path(net: "ReconstructedNetwork", norms: Tuple[str, ...]) -> Tuple[List[Tuple[str, str]], str]:  # noqa: F821
    """(op, node) in order and the outputs' structure: what a capture in another mode must match. Mode
    switches bound to the graph's training flag (and their arithmetic) are the same network in either mode,
    and so is the inside of a BatchNorm traced into (`norms`: its statistics follow the flag; counting its
    batches is its own business)."""
    flagged = set()
    ops = []
    for node in net.layer_nodes:
        refs = [r.node for r in iter_refs((node.args, node.kwargs))]
        if node.meta.get("op") == "TrainingFlag" or (refs and all(r in flagged for r in refs)):
            flagged.add(node.name)
            continue
        if not node.name.startswith(norms):
            ops.append((str(node.meta.get("op")), node.name))
    return ops, _structure(net.outputs)


def _structure(template: Any) -> str:
    """The outputs' containers with "T" for each tensor (GoogLeNetOutputs(T, T, T) vs T)."""
    if isinstance(template, Ref):
        return "T"
    if isinstance(template, dict):
        return f"{type(template).__name__}({', '.join(f'{k}={_structure(v)}' for k, v in template.items())})"
    if isinstance(template, (list, tuple)):
        return f"{type(template).__name__}({', '.join(_structure(v) for v in template)})"
    return type(template).__name__


def _warn_if_eval_differs(model: nn.Module, example_inputs: Tuple[Any, ...], example_kwargs: Dict[str, Any],
                          net: "ReconstructedNetwork") -> None:  # noqa: F821
    """A model captured in training mode is captured once more in eval mode: where its Python code takes
    another path there (`if self.training: x = x + noise`, GoogLeNet's aux logits, DeiT's two heads), the
    graph holds the training path and would run it after `.eval()` too; say so."""
    try:
        with untouched(model):
            model.eval()
            tracer = Tracer(model)
            tracer.start()
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model(*example_inputs, **example_kwargs)
            finally:
                tracer.end()
            other = tracer.build()
    except Exception:  # noqa: BLE001 - the model may not run in eval mode at all: nothing to compare
        return
    norms = tuple(f"{name}." for name, m in model.named_modules() if name and _batch_stats_follow_mode(m)
                  and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward)
    (train_ops, train_out), (eval_ops, eval_out) = _path(net, norms), _path(other, norms)
    if train_ops == eval_ops and train_out == eval_out:
        return
    first = next((i for i, (a, b) in enumerate(zip(train_ops, eval_ops)) if a[0] != b[0]),
                 min(len(train_ops), len(eval_ops)))
    where = (f"outputs {train_out[:80]} in training, {eval_out[:80]} in eval" if train_ops == eval_ops else
             f"{len(train_ops)} ops in training, {len(eval_ops)} in eval; first different: "
             f"{train_ops[first] if first < len(train_ops) else 'none'} vs {eval_ops[first] if first < len(eval_ops) else 'none'}")
    warn_user(f"amc capture: {type(model).__name__} was captured in training mode and its forward takes another path "
              f"in eval mode ({where}): the graph holds the training path and runs it after .eval() too. For a "
              "network to evaluate or deploy, trace the model in eval mode (model.eval())")


def example_tuple(example_inputs: Any, error: type = CaptureError) -> Tuple[Any, ...]:
    """`example_inputs` as the tuple of positional inputs: None -> (), one tensor -> (tensor,), a list or
    tuple as it is. A dict is refused: keyword inputs go to `example_kwargs` (or the model's keywords)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        raise error(f"example_inputs are the positional inputs, a tuple such as (x,); got a dict with keys "
                    f"{sorted(map(str, example_inputs))[:5]}: pass keyword inputs (a tokenizer's batch) as "
                    f"example_kwargs=batch, or trace first and pass the graph, e.g. "
                    f"amc.prune(amc.trace(model, **batch), ratio=0.3)")
    return (example_inputs,)


def given_inputs(net: Any, args: Tuple[Any, ...], example_inputs: Any = None,
                 error: type = CaptureError) -> Tuple[Any, ...]:
    """The inputs handed to an exporter as `*args`, or as `example_inputs=`: `f(net, path, (x,))` means
    `f(net, path, x)` when the network's first input was captured as a tensor (the tuple is amc's usual
    spelling of example inputs), and `example_inputs=(x,)` the same."""
    if example_inputs is not None:
        if args:
            raise error("got example inputs both positionally and as example_inputs=: give one of them")
        return example_tuple(example_inputs, error)
    first = next((n for n in getattr(net, "input_nodes", ()) if n.index == 0), None)
    tensor_first = first is not None and isinstance(first.meta.get("out"), dict) and "shape" in first.meta["out"]
    if len(args) == 1 and isinstance(args[0], (tuple, list)) and tensor_first:
        return tuple(args[0])
    return tuple(args)


def _amc_keywords(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], error: type = CaptureError
                  ) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """`amc.trace(model, example_inputs=(x,), example_kwargs={...})`, the keywords amc.prune and the
    compressors take, mean the inputs unless the model's forward itself names such a parameter (then they
    are the model's own keyword arguments, as before)."""
    try:
        own = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        own = set()
    own |= {n.name for n in getattr(model, "input_nodes", ())}  # a graph's own input names
    kwargs = dict(kwargs)
    if "example_inputs" in kwargs and "example_inputs" not in own:
        args = given_inputs(None, args, kwargs.pop("example_inputs"), error)
    if "example_kwargs" in kwargs and "example_kwargs" not in own:
        given = kwargs.pop("example_kwargs")
        if given is not None and not isinstance(given, Mapping):
            raise error(f"example_kwargs must be a dict of the model's keyword inputs, got {type(given).__name__}")
        clash = sorted(set(given or {}) & set(kwargs))
        if clash:
            raise error(f"got {clash} both in example_kwargs= and as keywords: give them once")
        kwargs.update(given or {})
    return args, kwargs


def as_network(model: Any, example_inputs: Tuple[Any, ...] = (), example_kwargs: Optional[Dict[str, Any]] = None,
               error: type = CaptureError, what: str = "model") -> "ReconstructedNetwork":
    """The one place that turns "a graph, or a module to trace" into a graph (count, prune, compressors,
    tuners). A ReconstructedNetwork is returned as it is; a module is traced, left untouched."""
    from .network import ReconstructedNetwork

    if isinstance(model, ReconstructedNetwork):
        return model
    if not isinstance(model, nn.Module):
        raise error(f"{what} must be an nn.Module or a ReconstructedNetwork, got {type(model).__name__}")
    example_inputs = example_tuple(example_inputs, error)
    if not example_inputs and not example_kwargs:
        raise error(f"a plain nn.Module needs example inputs to be traced: pass example_inputs=(tensor, ...) "
                    f"shaped like one real batch (got none for {type(model).__name__})")
    return trace(model, *example_inputs, **(example_kwargs or {}))
