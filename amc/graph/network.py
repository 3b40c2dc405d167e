"""ReconstructedNetwork: the captured graph as an nn.Module (an nn.ModuleDict plus node records).

Running it is one loop over `layer_nodes` in topological order; every size comes from the tensors
of the current run, so it works at any batch size and after passes change channel counts.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx import Proxy
from torch.nn.modules import module as _torch_module

from .._batches import TARGET_KEYS
from .._modes import outside_inference_mode
from ..errors import ExportError, GraphError
from .formats import file_format
from .node import InputNode, Node
from .template import compile_args, compile_getter, iter_refs, portable_mappings, restore_mappings

Observer = Callable[[Node, nn.Module, tuple, dict, Any], None]
_TORCH_CALL = nn.Module.__call__  # capture and torch.fx swap it while they trace


def _direct_calls_allowed() -> bool:
    """Whether this run may call op modules' `forward` directly: `nn.Module.__call__` adds a few
    microseconds per op (hooks, tracing state), a quarter of a small ViT's batch-1 time over 130 ops, and
    is only needed when some hook or tracer would see the call."""
    m = _torch_module
    return (nn.Module.__call__ is _TORCH_CALL and not torch._C._get_tracing_state()
            and not (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                     or m._global_backward_pre_hooks))


_CALL, _FORWARD, _REPLAY = 0, 1, 2  # how a node may be called: __call__ only; its forward; its replayed fn


def _call_kind(module: nn.Module) -> int:
    from .ops import FunctionOp

    if type(module).__call__ is not nn.Module.__call__:
        return _CALL
    if isinstance(module, FunctionOp) and type(module).forward is FunctionOp.forward:
        return _REPLAY  # FunctionOp.forward only calls self.fn: one Python frame less per op
    return _FORWARD


_NO_GRAD = ("grad", False, "")  # a node of the forward's own `with torch.no_grad():` (meta "no_grad")


def replay_context(node: Node) -> Optional[List[Any]]:
    """The autocast states a node was captured in, plus `_NO_GRAD` inside the forward's no_grad blocks."""
    ctx = node.meta.get("autocast")
    return [*(ctx or ()), _NO_GRAD] if node.meta.get("no_grad") else ctx


def under_autocast(amp: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call` inside the torch.autocast states a node was captured in (`[[device_type, enabled, dtype]]`):
    a forward that enters autocast replays with the same casts; under no_grad where the forward was."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in amp:
            if device == "grad":
                stack.enter_context(torch.no_grad())
            else:
                stack.enter_context(torch.autocast(device, dtype=getattr(torch, dtype), enabled=enabled))
        return call(*args, **kwargs)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _format_of(path: Any, verb: str) -> str:
    """Which format `save` / `load` use for `path`, by its suffix: json, onnx (save only), else pkl."""
    name = str(path).lower()
    if name.endswith(".json"):
        return "json"
    if name.endswith(".onnx"):
        if verb == "load":
            raise ExportError(f"{path!r} is ONNX, which amc writes but does not read back as a network: load the "
                              ".json or .pkl saved beside it, or run the .onnx with onnxruntime")
        return "onnx"
    if name.endswith(".safetensors"):
        raise ExportError(f"{path!r}: a .safetensors file holds weights only and cannot rebuild the network; "
                          f"{verb} a .json (it writes/reads its .safetensors sidecar) or a .pkl")
    return "pkl"


class ReconstructedNetwork(nn.Module):
    """A traced network that runs without the original model's class.

    Attributes (seed names): `network` is the nn.ModuleDict of op modules, `input_nodes` and
    `layer_nodes` the ordered node records, `outputs` the output template.
    """

    def __init__(self, modules: Dict[str, nn.Module], input_nodes: List[InputNode], layer_nodes: List[Node],
                 outputs: Any, meta: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.network = nn.ModuleDict(modules)
        self.input_nodes = list(input_nodes)
        self.layer_nodes = list(layer_nodes)
        self.outputs = outputs
        self.meta = dict(meta or {})
        self.recompile()

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this first: its own error ('variable number of arguments') named no way on."""
        raise ExportError("torch.jit.script cannot compile a ReconstructedNetwork (its forward replays the graph "
                          "with *args); for TorchScript use torch.jit.trace(net, (x,)), or export with "
                          "torch.export.export(net, (x,)) or net.save_to_onnx(path, x)")

    # -- running -------------------------------------------------------------------------------
    def recompile(self) -> None:
        """Rebuild the run plan from the node records (call after editing nodes in place)."""
        last_use: Dict[str, int] = {}
        for i, node in enumerate(self.layer_nodes):
            for r in iter_refs((node.args, node.kwargs)):
                last_use[r.node] = i
        keep = {r.node for r in iter_refs(self.outputs)}
        frees: List[List[str]] = [[] for _ in self.layer_nodes]
        for i, node in enumerate(self.layer_nodes):
            if node.name not in last_use and node.name not in keep:
                frees[i].append(node.name)
        for name, i in last_use.items():
            if name not in keep:
                frees[i].append(name)
        plan = []
        for i, node in enumerate(self.layer_nodes):
            if node.module not in self.network:
                raise GraphError(f"node {node.name!r} uses module {node.module!r}, which is not in the ModuleDict")
            get_kwargs = compile_getter(node.kwargs) if node.kwargs else None
            module = self.network[node.module]
            plan.append((node.name, module, compile_args(node.args), get_kwargs, tuple(frees[i]), _call_kind(module),
                         replay_context(node)))
        self._plan = plan
        self._get_output = compile_getter(self.outputs)

    def _positional_slots(self) -> int:
        """How many positional arguments the capture saw (tensor inputs and constants)."""
        constants = self.meta.get("input_constants", {})
        ints = [n.index for n in self.input_nodes if isinstance(n.index, int)] + [k for k in constants if isinstance(k, int)]
        return max(ints) + 1 if ints else 0

    def input_order(self) -> List[InputNode]:
        """The tensor input nodes in call order: positional by index, then those captured as keywords."""
        positional = sorted((n for n in self.input_nodes if isinstance(n.index, int)), key=lambda n: n.index)
        return positional + [n for n in self.input_nodes if not isinstance(n.index, int)]

    def input_names(self) -> List[Optional[str]]:
        """The inputs' names in call order, as `net(**inputs)` takes them: the positional slots (None where
        the capture saw a non-tensor that a positional call cannot skip), then the inputs captured as keywords."""
        by_index = {n.index: n.name for n in self.input_nodes if isinstance(n.index, int)}
        names = [by_index.get(i) for i in range(self._positional_slots())] + \
            [str(n.index) for n in self.input_nodes if not isinstance(n.index, int)]
        while names and names[-1] is None:  # trailing non-tensor arguments keep their captured values
            names.pop()
        return names

    def _bind_inputs(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        env: Dict[str, Any] = {}
        kwargs = dict(kwargs)
        slots = self._positional_slots()
        if len(args) > slots:  # inputs captured as keywords may also be given positionally, in capture order
            keyword_nodes = [n for n in self.input_nodes if not isinstance(n.index, int)]
            extra, args = args[slots:], args[:slots]
            if len(extra) > len(keyword_nodes):
                raise TypeError(f"ReconstructedNetwork.forward() got {slots + len(extra)} positional arguments; "
                                f"the capture saw {slots} positional and {len(keyword_nodes)} keyword input(s) "
                                f"{[n.name for n in keyword_nodes]}: trace again with the extra ones")
            for node, value in zip(keyword_nodes, extra):
                if node.name in kwargs or node.index in kwargs:
                    raise TypeError(f"ReconstructedNetwork.forward() got input {node.name!r} twice")
                kwargs[node.name] = value
        for node in self.input_nodes:
            if isinstance(node.index, int) and node.index < len(args):
                env[node.name] = args[node.index]
                _check_structure(node.name, env[node.name], node.meta.get("out"))
            elif node.name in kwargs or (not isinstance(node.index, int) and node.index in kwargs):
                env[node.name] = kwargs.pop(node.name if node.name in kwargs else node.index)
                _check_structure(node.name, env[node.name], node.meta.get("out"))
            else:
                hint = (f"; it was traced with {node.name!r} (a collator batch's targets), so the graph computes "
                        "the loss and needs them: trace on the batch without them for inference"
                        if node.name in TARGET_KEYS else "")
                raise TypeError(f"ReconstructedNetwork.forward() missing input {node.name!r} "
                                f"(captured with {len(self.input_nodes)} tensor input(s): "
                                f"{[n.name for n in self.input_nodes]}){hint}")
        constants = self.meta.get("input_constants", {})
        known = {n.index for n in self.input_nodes if isinstance(n.index, int)} | {
            k for k in constants if isinstance(k, int)}
        extra = [i for i in range(len(args)) if i not in known]
        if extra:
            raise TypeError(f"ReconstructedNetwork.forward() got positional argument(s) {extra} that were not "
                            "given at capture, so the graph never saw them: trace again with them")
        unknown = [k for k in kwargs if k not in constants]
        if unknown:
            raise TypeError(f"ReconstructedNetwork.forward() got keyword argument(s) {unknown} that were not "
                            "given at capture: trace again with them")
        for i, a in enumerate(args):
            if i in constants and not _same(a, constants[i]):
                raise ValueError(f"argument {i} was captured as the constant {constants[i]!r}; the graph took "
                                 f"the path for that value, so it cannot run with {a!r}: trace again instead")
        for k, v in kwargs.items():
            if k in constants and not _same(v, constants[k]):
                raise ValueError(f"keyword argument {k!r} was captured as the constant {constants[k]!r}; "
                                 f"trace again to run with {v!r}")
        return env

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if type(args) is not tuple or args and isinstance(args[0], Proxy):  # torch.fx is tracing
            return self._traced_by_fx(args, kwargs)
        env = self._bind_inputs(args, kwargs)
        direct = _direct_calls_allowed()
        name = ""
        try:
            for name, module, get_args, get_kwargs, frees, kind, amp in self._plan:
                if direct and kind and not _has_hooks(module):
                    call = module.fn if kind == _REPLAY else module.forward
                else:
                    call = module
                if amp:
                    call = functools.partial(under_autocast, amp, call)
                if get_kwargs is None:
                    env[name] = call(*get_args(env))
                else:
                    env[name] = call(*get_args(env), **get_kwargs(env))
                for f in frees:
                    del env[f]
        except Exception as exc:
            if hasattr(exc, "add_note") and name:  # Python >= 3.11: the same exception, with where and why
                exc.add_note(self._failure_note(name, args, kwargs))
            raise
        return self._get_output(env)

    def _failure_note(self, name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """Which node failed, and the inputs' shapes beside the captured ones: a size the model's Python code
        turned into a constant (a loop over a length, a list of that many) holds for the captured shapes only."""
        given = [tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        traced = [tuple(n.meta["out"]["shape"]) for n in self.input_order()
                  if isinstance(n.meta.get("out"), dict) and "shape" in n.meta["out"]]
        note = f"amc: raised by node {name!r} ({self.node(name).meta.get('op', '?')}) of the ReconstructedNetwork"
        if given and traced and given != traced:
            note += (f"; inputs of shapes {given}, captured with {traced}: if the model's code loops over or "
                     "lists a size, the graph holds the captured one only; trace with inputs of the shape you run")
        return note

    def _traced_by_fx(self, args: Any, kwargs: Any) -> Any:
        """torch.fx is tracing: run the GraphModule of this graph (`amc.export.to_fx`) on the Proxies."""
        from .fx_graph import to_fx

        if isinstance(args, Proxy):  # symbolic_trace(net) itself: `*args` is one Proxy of the tuple
            args = tuple(args[i] for i in range(len(self.input_order())))
        return to_fx(self).forward(*args)  # its submodules are ours: FX records them by our paths

    def run_observed(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], observer: Observer) -> Any:
        """Run like forward, calling `observer(node, module, args, kwargs, out)` after each node."""
        env = self._bind_inputs(args, kwargs)
        nodes = {n.name: n for n in self.layer_nodes}
        for name, module, get_args, get_kwargs, frees, _, amp in self._plan:
            a = tuple(get_args(env))
            kw = get_kwargs(env) if get_kwargs is not None else {}
            out = under_autocast(amp, module, *a, **kw) if amp else module(*a, **kw)
            observer(nodes[name], module, a, kw, out)
            env[name] = out
            for f in frees:
                del env[f]
        return self._get_output(env)

    # -- guards --------------------------------------------------------------------------------
    @property
    def guards(self) -> List[Dict[str, Any]]:
        """The Python decisions capture took on traced sizes, checked on every run (see ShapeGuard)."""
        from .ops import ShapeGuard

        out = _input_structure_guards(self)
        for node in self.layer_nodes:
            m = self.network[node.module]
            if isinstance(m, ShapeGuard):
                out.append({"node": node.name, "source": m.source, "condition": m.describe(m.captured),
                            "expected": m.expected, "kind": "value" if m.value else "shape"})
        return out

    def rebaseline_guards(self, *example_inputs: Any) -> Any:
        """Re-record every guard's outcome on this network (after a pass changed sizes on purpose: the
        pruned graph still takes the captured path, so its own sizes define what the guards expect).
        Returns the output of that eval-mode run (None when there is no guard and so no run), for callers
        that check it instead of running the network again."""
        from .ops import ShapeGuard

        guards = [m for m in self.network.values() if isinstance(m, ShapeGuard)]
        if not guards:
            return None
        from .untouched import untouched

        for g in guards:
            g.rebaseline = True
        try:
            with torch.no_grad(), untouched(self):
                self.eval()
                return self(*(example_inputs or self.example_inputs(batch_size=1)))
        finally:
            for g in guards:
                g.rebaseline = False

    # -- structure -----------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.layer_nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}; see [n.name for n in net.layer_nodes]")

    def module_of(self, name: str) -> nn.Module:
        return self.network[self.node(name).module]

    def get_submodule(self, target: str) -> nn.Module:
        """nn.Module's lookup, also by a layer's name in the traced model (`"layer1.0.conv1"`), so code that
        names layers the way the model did (forward hooks, distillation feature pairs) finds them here."""
        try:
            return super().get_submodule(target)
        except AttributeError:
            if any(n.name == target for n in self.layer_nodes):
                return self.module_of(target)
            raise

    def users(self) -> Dict[str, List[Node]]:
        """Node name -> the nodes that read its output."""
        out: Dict[str, List[Node]] = {n.name: [] for n in self.input_nodes}
        out.update({n.name: [] for n in self.layer_nodes})
        for node in self.layer_nodes:
            for name in dict.fromkeys(r.node for r in iter_refs((node.args, node.kwargs))):
                out[name].append(node)
        return out

    def lint(self) -> None:
        """Check the invariants every pass must keep (topological order, known modules, unique names)."""
        seen = set()
        for node in self.input_nodes:
            if node.name in seen:
                raise GraphError(f"duplicate input node name {node.name!r}")
            seen.add(node.name)
        for node in self.layer_nodes:
            if node.name in seen:
                raise GraphError(f"duplicate node name {node.name!r}")
            for r in iter_refs((node.args, node.kwargs)):
                if r.node not in seen:
                    raise GraphError(f"node {node.name!r} reads {r!r} before it is computed (not topological)")
            if node.module not in self.network:
                raise GraphError(f"node {node.name!r} uses missing module {node.module!r}")
            seen.add(node.name)
        for r in iter_refs(self.outputs):
            if r.node not in seen:
                raise GraphError(f"output reads unknown node {r.node!r}")
        used = {n.module for n in self.layer_nodes}
        extra = set(self.network.keys()) - used
        if extra:
            raise GraphError(f"modules not used by any node: {sorted(extra)[:5]}")

    @outside_inference_mode
    def copy(self) -> "ReconstructedNetwork":
        """A deep copy (passes copy, then edit the copy)."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "ReconstructedNetwork":
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        from .clone import clone_children

        for k, v in self.__dict__.items():
            if k == "_modules":
                new.__dict__[k] = clone_children(v, memo)
            elif k not in ("_plan", "_get_output"):
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.recompile()
        return new

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_plan", None)
        state.pop("_get_output", None)
        state["outputs"] = portable_mappings(self.outputs)  # ModelOutput classes stored by name
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.outputs = restore_mappings(self.outputs)
        self.recompile()

    def iter_nodes(self) -> Iterator[Tuple[Node, nn.Module]]:
        for node in self.layer_nodes:
            yield node, self.network[node.module]

    @property
    def fallback_ops(self) -> Dict[str, int]:
        """Ops captured by the generic replay node (exact; pruning probes them and freezes the ones that are not element-wise)."""
        return dict(self.meta.get("fallback_ops", {}))

    def example_inputs(self, batch_size: Optional[int] = None) -> Tuple[Any, ...]:
        """Random inputs shaped like the captured ones (for counting, export and quick checks), positional
        first, then the inputs captured as keywords in capture order: `net(*net.example_inputs())` runs."""
        ordered = self.input_order()
        positional = [n for n in ordered if isinstance(n.index, int)]
        keyword = ordered[len(positional):]
        if not keyword:
            return tuple(_make_like(n.meta.get("out"), batch_size) for n in positional)
        # keyword inputs follow every positional slot (constants included), as forward() binds them
        constants = self.meta.get("input_constants", {})
        by_index = {n.index: n for n in positional}
        out = [_make_like(by_index[i].meta.get("out"), batch_size) if i in by_index else constants.get(i)
               for i in range(self._positional_slots())]
        return tuple(out + [_make_like(n.meta.get("out"), batch_size) for n in keyword])

    # -- convenience delegates (seed names); the file formats are registered by amc.export --------
    def summary(self, *example_inputs: Any, file: Any = None) -> str:
        from .counting import summary_table

        text = summary_table(self, *example_inputs)
        print(text, file=file)
        return text

    def draw(self, path: str, format: str = "png") -> str:
        from .drawing import draw

        return draw(self, path, format=format)

    def save(self, pkl: str) -> str:
        """Seed name: writes a pickle. A path ending in .json or .onnx writes that format instead (a pickle
        under such a name would fail in every tool that opens it); .safetensors is refused (weights alone
        do not rebuild the network: save_to_json writes them beside the graph)."""
        kind = _format_of(pkl, "save")
        if kind == "json":
            return self.save_to_json(pkl)
        if kind == "onnx":
            return self.save_to_onnx(pkl)
        return file_format("pkl").save(self, pkl)

    @staticmethod
    def load(pkl: str, map_location: Any = "cpu", trusted: bool = False) -> "ReconstructedNetwork":
        """Safe by default (allowlisted classes only); `trusted=True` runs code from the file. A .json path
        is read by load_from_json (what `save` wrote there)."""
        if _format_of(pkl, "load") == "json":
            return ReconstructedNetwork.load_from_json(pkl)
        return file_format("pkl").load(pkl, map_location=map_location, trusted=trusted)

    def save_to_json(self, file: str) -> str:
        return file_format("json").save(self, file)

    @staticmethod
    def load_from_json(file: str) -> "ReconstructedNetwork":
        return file_format("json").load(file)

    def save_to_onnx(self, file: str, *example_inputs: Any, opset: int = 17, check: bool = True,
                     dynamic_axes: Any = None, **named_inputs: Any) -> str:
        return file_format("onnx").save(self, file, *example_inputs, opset=opset, check=check,
                                        dynamic_axes=dynamic_axes, **named_inputs)

    def save_to_vnmodel(self, pkl: str, model_base_size_hw: Tuple[int, int], model_id: int = 0) -> str:
        """Seed name: an ONNX Runtime ORT-format file (not Venus's private format), see amc.export.vnmodel."""
        return file_format("vnmodel").save(self, pkl, model_base_size_hw, model_id=model_id)

    def extra_repr(self) -> str:
        return f"inputs={[n.name for n in self.input_nodes]}, nodes={len(self.layer_nodes)}"


def _is_tensor_desc(desc: Any) -> bool:
    return isinstance(desc, dict) and set(desc) == {"shape", "dtype"}


def _structure_problem(value: Any, desc: Any, where: str) -> Optional[str]:
    """Where a list/tuple/dict input differs in length or keys from the captured one (None if it does not).
    Capture recorded the model's Python loops over these containers for the captured length only."""
    if desc is None or _is_tensor_desc(desc):
        return None
    if isinstance(desc, list) and isinstance(value, (list, tuple)):
        if len(value) != len(desc):
            return f"{where} has {len(value)} item(s); it was captured with {len(desc)}"
        for i, (v, d) in enumerate(zip(value, desc)):
            problem = _structure_problem(v, d, f"{where}[{i}]")
            if problem:
                return problem
    elif isinstance(desc, dict) and isinstance(value, dict):
        keys, captured = sorted(map(str, value)), sorted(desc)
        if keys != captured:
            return f"{where} has keys {keys}; it was captured with keys {captured}"
        for k, v in value.items():
            problem = _structure_problem(v, desc[str(k)], f"{where}[{k!r}]")
            if problem:
                return problem
    return None


def _check_structure(name: str, value: Any, desc: Any) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(desc, (list, dict)):
        return
    problem = _structure_problem(value, desc, f"input {name!r}")
    if problem:
        raise GraphError(f"input structure guard failed: {problem}. The graph holds what the model did for the "
                         "captured structure (its Python loops over this container ran that many times): trace "
                         "again with this structure, or call the network once per item")


def _input_structure_guards(net: "ReconstructedNetwork") -> List[Dict[str, Any]]:
    out = []
    for node in net.input_nodes:
        desc = node.meta.get("out")
        if isinstance(desc, list):
            out.append({"node": node.name, "source": "input structure", "condition": f"len({node.name}) == {len(desc)}",
                        "expected": True})
        elif isinstance(desc, dict) and not _is_tensor_desc(desc):
            out.append({"node": node.name, "source": "input structure",
                        "condition": f"keys({node.name}) == {sorted(desc)}", "expected": True})
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return a is b


def _make_like(desc: Any, batch_size: Optional[int]) -> Any:
    if isinstance(desc, dict) and "shape" in desc and "dtype" in desc:
        shape = list(desc["shape"])
        if batch_size is not None and shape:
            shape[0] = batch_size
        dtype = getattr(torch, desc["dtype"])
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype)
        return torch.zeros(shape, dtype=dtype)
    if isinstance(desc, list):
        return [_make_like(d, batch_size) for d in desc]
    if isinstance(desc, dict):
        return {k: _make_like(v, batch_size) for k, v in desc.items()}
    return desc


load = ReconstructedNetwork.load  # `amc.load(path)`: the network `net.save(path)` wrote (.json or pickle)
