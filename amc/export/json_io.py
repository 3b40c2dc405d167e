"""Save a ReconstructedNetwork as readable JSON plus a safetensors weights sidecar, and load it back.

This is the safe path: loading parses JSON, reads tensors with safetensors and rebuilds every op module
from its class name and constructor config, taking classes only from an allowlist (torch.nn,
torchvision.ops, amc.graph.ops, or classes registered with `register_json_op`) and functions only from
the torch namespaces `amc.graph.ops.resolve_callable` knows. Nothing is unpickled and no code named in
the file is imported beyond those packages.

Layout of `<name>.json` (format marker "amc.ReconstructedNetwork/json", version 1):

    {"format", "version", "amc_version", "torch_version",
     "inputs":  [{"name", "index", "meta"}],
     "nodes":   [{"name", "op", "module", "class", "config" | "children", "params",
                  "inputs": {"args", "kwargs"}, "out", "meta"}],
     "outputs": <template>, "meta": {...}, "training": bool,
     "weights": {"file", "bytes", "sha256", "aliases": {name: stored name}, "frozen": [...],
                 "training_differs": [...]}}

Templates (node inputs, outputs) are JSON with tagged objects for what JSON lacks:
`{"ref": node, "path": [...]}`, `{"tuple": [...]}`, `{"namedtuple": type, "fields": [...], "values": [...]}`,
`{"slice": [start, stop, step]}`, `{"dtype": "float32"}`, `{"device": "cpu"}`, `{"memory_format": ...}`,
`{"layout": ...}`, `{"ellipsis": true}`, `{"float": "inf"|"-inf"|"nan"}`, `{"complex": [re, im]}`,
`{"size": [...]}`, `{"odict": [[key, value], ...]}`, and `{"dict": [[key, value], ...]}` for dicts whose keys
are not plain strings (or look like a tag).
A node's `config` (constructor kwargs; tuples written as lists) is written once, on the first node using
the module; later nodes sharing it carry `shares_module_with` instead. An nn.Sequential leaf (e.g. a
factorised layer) has `children: [[name, {"class", "config"}], ...]` instead of a config. Before anything
is written, every description is rebuilt (on the meta device) and compared with the module, so a config
that would load as a different module is an ExportError at save time, never a silent change.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._modes import outside_inference_mode
from ..errors import ExportError, LoadError
from ..graph import ops, reparam
from ..version import __version__
from .atomic import atomic_paths, previous_path

FORMAT = "amc.ReconstructedNetwork/json"
VERSION = 1

# ==============================================================================================
# Values and templates.

# A JSON object is a tagged value exactly when its key set is one of these; any other object is a dict.
_SIGNATURES = {frozenset(k): k[0] for k in [
    ("ref", "path"), ("tuple",), ("namedtuple", "fields", "values"), ("slice",), ("dtype",), ("device",),
    ("memory_format",), ("layout",), ("ellipsis",), ("float",), ("complex",), ("size",), ("dict",), ("odict",),
    ("repr",), ("mapping", "items")]}
_DTYPES = {str(v).replace("torch.", ""): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_FORMATS = {str(v).replace("torch.", ""): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}
_LAYOUTS = {str(v).replace("torch.", ""): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_NAMEDTUPLES: Dict[Tuple[str, Tuple[str, ...]], type] = {}


class _Unencodable(Exception):
    pass


def encode_value(obj: Any, lenient: bool = False, tuples_as_lists: bool = False) -> Any:
    """JSON form of a template or meta value. Unknown objects raise, or become `{"repr": ...}` if lenient."""
    def enc(v: Any) -> Any:
        return encode_value(v, lenient, tuples_as_lists)

    from ..graph.template import MappingTemplate, Ref, portable_mappings

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, complex):
        return {"complex": [enc(obj.real), enc(obj.imag)]}
    if isinstance(obj, Ref):
        return {"ref": obj.node, "path": [enc(p) for p in obj.path]}
    if isinstance(obj, torch.Size):
        return {"size": [int(v) for v in obj]}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {"namedtuple": type(obj).__name__, "fields": list(obj._fields), "values": [enc(v) for v in obj]}
    if isinstance(obj, tuple):
        return [enc(v) for v in obj] if tuples_as_lists else {"tuple": [enc(v) for v in obj]}
    if isinstance(obj, list):
        return [enc(v) for v in obj]
    if isinstance(obj, MappingTemplate):  # a ModelOutput-like container, by class name
        return {"mapping": obj.cls, "items": [[enc(k), enc(v)] for k, v in obj.items]}
    if isinstance(obj, dict) and type(obj) not in (dict, collections.OrderedDict) and not lenient:
        return enc(portable_mappings(obj))
    if isinstance(obj, dict):
        if type(obj) is collections.OrderedDict:
            return {"odict": [[enc(k), enc(v)] for k, v in obj.items()]}
        if type(obj) is not dict and not lenient:
            raise _Unencodable(f"a {type(obj).__qualname__} (only dict and OrderedDict can be rebuilt)")
        if all(isinstance(k, str) for k in obj) and frozenset(obj) not in _SIGNATURES:
            return {k: enc(v) for k, v in obj.items()}
        return {"dict": [[enc(k), enc(v)] for k, v in obj.items()]}
    if isinstance(obj, slice):
        return {"slice": [enc(obj.start), enc(obj.stop), enc(obj.step)]}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    if isinstance(obj, torch.memory_format):
        return {"memory_format": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.layout):
        return {"layout": str(obj).replace("torch.", "")}
    if obj is Ellipsis:
        return {"ellipsis": True}
    if lenient:
        return {"repr": repr(obj)}
    raise _Unencodable(f"a {type(obj).__module__}.{type(obj).__qualname__} ({_short(repr(obj))})")


def decode_value(obj: Any) -> Any:
    """Inverse of `encode_value` (raises ValueError/KeyError/TypeError on malformed input)."""
    from ..graph.template import MappingTemplate, Ref, restore_mappings

    if isinstance(obj, list):
        return [decode_value(v) for v in obj]
    if not isinstance(obj, dict):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"unexpected JSON value {obj!r}")
    tag = _SIGNATURES.get(frozenset(obj))
    if tag is None:
        return {k: decode_value(v) for k, v in obj.items()}
    v = obj[tag]
    if tag == "ref":
        if not isinstance(v, str):
            raise TypeError(f"ref must name a node, got {v!r}")
        return Ref(v, tuple(_hashable(decode_value(p)) for p in _as_list(obj["path"], tag)))
    if tag == "tuple":
        return tuple(decode_value(x) for x in _as_list(v, tag))
    if tag == "namedtuple":
        fields = tuple(obj["fields"])
        key = (str(v), fields)
        if key not in _NAMEDTUPLES:  # recreated from names only: never imports the original type
            _NAMEDTUPLES[key] = collections.namedtuple(str(v), fields)
        return _NAMEDTUPLES[key](*(decode_value(x) for x in _as_list(obj["values"], tag)))
    if tag == "slice":
        return slice(*(decode_value(x) for x in _as_list(v, tag)))
    if tag == "dtype":
        return _lookup(_DTYPES, v, "dtype")
    if tag == "memory_format":
        return _lookup(_FORMATS, v, "memory_format")
    if tag == "layout":
        return _lookup(_LAYOUTS, v, "layout")
    if tag == "device":
        return torch.device(str(v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        if v not in ("inf", "-inf", "nan"):
            raise ValueError(f"bad float {v!r}")
        return float(v)
    if tag == "complex":
        return complex(*(decode_value(x) for x in _as_list(v, tag)))
    if tag == "size":
        return torch.Size(int(x) for x in _as_list(v, tag))
    if tag == "dict":
        return {_hashable(decode_value(k)): decode_value(x) for k, x in _as_list(v, tag)}
    if tag == "mapping":  # rebuilt as that class only if it is an allowed ModelOutput; else a plain dict
        if not isinstance(v, str):
            raise TypeError(f"mapping must name a class, got {v!r}")
        items = [(_hashable(decode_value(k)), decode_value(x)) for k, x in _as_list(obj["items"], tag)]
        return restore_mappings(MappingTemplate(v, items))
    if tag == "odict":
        return collections.OrderedDict((_hashable(decode_value(k)), decode_value(x)) for k, x in _as_list(v, tag))
    return str(v)  # "repr": a meta value JSON could not hold, kept as its text


def _as_list(v: Any, tag: str) -> list:
    if not isinstance(v, list):
        raise TypeError(f"{tag!r} expects a list, got {type(v).__name__}")
    return v


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def _lookup(table: Dict[str, Any], name: Any, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}")
    return table[name]


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _tuplify(v: Any) -> Any:
    """Configs store tuples as lists for readability; torch.nn constructors take tuples."""
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


# ==============================================================================================
# Module serialisers: the `json` facet of the class's op registry entry (torch.nn/torchvision.ops classes,
# and any class registered with amc.register_op, get a default derived from their constructor).

ToConfig = Callable[[nn.Module], Dict[str, Any]]
FromConfig = Callable[[type, Dict[str, Any], Dict[str, torch.Tensor]], nn.Module]


@dataclass
class JsonOp:
    """How one module class becomes a JSON config and back. `from_config(cls, config, tensors)`
    gets the module's own tensors (local names) for classes whose constructor needs them."""

    cls: type
    to_config: ToConfig
    from_config: FromConfig


_ALLOWED_PACKAGES = ("torch.nn.", "torchvision.ops.")


def _default_from_config(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    return cls(**config)


def register_json_op(*classes: type, to_config: ToConfig, from_config: Optional[FromConfig] = None) -> None:
    """Teach the JSON format a module class (this also puts the class on the load allowlist).

    The serialiser is the `json` facet of the class's op entry; a class new to the registry is added
    as traced-into (leaf=False), so teaching JSON a class never changes how capture sees it."""
    for cls in classes:
        leaf = None if ops.module_entry(cls) is not None else False
        ops.register_op(cls, leaf=leaf, json=JsonOp(cls, to_config, from_config or _default_from_config))


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_json_classes() -> List[type]:
    """Module classes in the op registry: vetted by whoever registered them, so JSON and the safe
    pkl loader allow them (torch.nn/torchvision.ops classes are allowed by package anyway)."""
    return [spec.key for spec in ops.registered_ops() if isinstance(spec.key, type)]


def _json_op(cls: type) -> Optional[JsonOp]:
    spec = ops.module_entry(cls)
    if spec is not None and spec.json is not None:
        return spec.json
    if spec is not None or class_path(cls).startswith(_ALLOWED_PACKAGES):
        return JsonOp(cls, _derive_config, _default_from_config)
    return None


def _init_params(cls: type) -> List[inspect.Parameter]:
    """Named constructor parameters, looking through `__init__(self, *args, **kwargs)` wrappers."""
    for c in cls.__mro__:
        if c in (nn.Module, object):
            break
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if named or not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return named
    return []


def _derive_config(module: nn.Module) -> Dict[str, Any]:
    """Constructor kwargs of a torch.nn-style module from its attributes (`bias` -> bias is not None)."""
    config: Dict[str, Any] = {}
    for p in _init_params(type(module)):
        if p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        if p.name in vars(module) or p.name in module._parameters or p.name in module._buffers \
                or p.name in module._modules:
            value = getattr(module, p.name)
            if value is None and p.name in module._parameters or isinstance(value, (torch.Tensor, nn.Module)):
                value = value is not None  # a flag stored as the tensor it creates (bias=True)
            config[p.name] = value
        elif p.default is inspect.Parameter.empty:
            raise _Unencodable(f"constructor argument {p.name!r} of {type(module).__qualname__} is not stored "
                               "as an attribute, so it cannot be recovered")
    return config


def _mha_config(m: nn.MultiheadAttention) -> Dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim, "batch_first": m.batch_first}


def _rnn_config(m: nn.RNNBase) -> Dict[str, Any]:
    config = {k: getattr(m, k) for k in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                                         "dropout", "bidirectional")}
    if isinstance(m, nn.LSTM):
        config["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        config["nonlinearity"] = m.nonlinearity
    return config


def _frozen_bn_config(m: nn.Module) -> Dict[str, Any]:
    return {"num_features": int(m.weight.shape[0]), "eps": m.eps}


def _function_op_config(m: nn.Module) -> Dict[str, Any]:
    return {"fn": m.fn_name}


def _function_op_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    from ..graph.ops import resolve_callable

    name = config["fn"]
    fn = resolve_callable(name)
    problem = callable_problem(name, fn)
    if problem:
        raise LoadError(f"op callable {name!r} is refused: {problem}")
    return cls(fn, name)


def _getattr_config(m: nn.Module) -> Dict[str, Any]:
    return {"attr": m.attr}


def _getattr_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    attr = config["attr"]
    if not isinstance(attr, str) or not attr.isidentifier() or attr.startswith("_"):
        raise LoadError(f"GetAttr of {attr!r} is refused: only public tensor attributes (x.T, x.real, ...)")
    return cls(attr)


def _param_config(m: nn.Module) -> Dict[str, Any]:
    return {"is_buffer": "value" in m._buffers, "requires_grad": bool(m.value.requires_grad)}


def _param_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    value = tensors["value"]
    if not config["is_buffer"]:
        value = nn.Parameter(value, requires_grad=bool(config.get("requires_grad", True)))
    return cls(value, is_buffer=bool(config["is_buffer"]))


def _constant_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    return cls(tensors["value"], clone=bool(config["clone"]))


def _register_defaults() -> None:
    import torchvision.ops

    register_json_op(nn.MultiheadAttention, to_config=_mha_config)
    register_json_op(nn.RNN, nn.LSTM, nn.GRU, to_config=_rnn_config)
    register_json_op(torchvision.ops.FrozenBatchNorm2d, to_config=_frozen_bn_config)
    function_ops = [c for c in vars(ops).values()
                    if isinstance(c, type) and issubclass(c, ops.FunctionOp) and c is not ops.AutogradFunctionOp]
    register_json_op(*function_ops, to_config=_function_op_config, from_config=_function_op_build)
    register_json_op(ops.SetItem, to_config=lambda m: {})
    register_json_op(ops.TensorSize, to_config=lambda m: {"dim": m.dim, "numel": m.numel})
    register_json_op(ops.GetAttr, to_config=_getattr_config, from_config=_getattr_build)
    register_json_op(ops.ParamHolder, to_config=_param_config, from_config=_param_build)
    register_json_op(ops.Constant, to_config=lambda m: {"clone": bool(m.clone)}, from_config=_constant_build)
    register_json_op(ops.ShapeGuard, to_config=lambda m: {"op": m.op, "expected": m.expected, "source": m.source,
                                                          "captured": m.captured, "value": m.value})


_register_defaults()

# Callables a JSON file may name. Registered ops are vetted; anything else must be a plain public torch
# function without side effects outside the tensors it is given.
_DENIED_CALLABLES = {
    "torch.load", "torch.save", "torch.from_file", "torch.compile", "torch.vmap", "torch.cond",
    "torch.while_loop", "torch.Tensor.apply_", "torch.Tensor.map_", "torch.Tensor.map2_",
    "torch.Tensor.register_hook", "torch.Tensor.register_post_accumulate_grad_hook", "torch.Tensor.backward",
    "torch.Tensor.share_memory_", "torch.Tensor.storage", "torch.Tensor.untyped_storage", "torch.Tensor.set_",
}
_DENIED_PREFIX = re.compile(r"^(set_|use_|manual_seed|seed|initial_seed|get_rng|set_rng|fork_rng|load|save)")


def callable_problem(name: str, fn: Any) -> Optional[str]:
    """Why a JSON file may not name this callable, or None when it may."""
    from ..graph.ops import function_spec

    if function_spec(fn) is not None:
        return None
    namespace, _, attr = name.rpartition(".")
    if inspect.ismodule(fn) or (isinstance(fn, type) and namespace != "torch.Tensor") or not callable(fn):
        return "it is not a function"
    if namespace in ("operator", "amc.graph.ops"):
        return f"only the registered {namespace} functions are allowed"
    if attr.startswith("_"):
        return "private and dunder callables must be registered ops"
    if name in _DENIED_CALLABLES or _DENIED_PREFIX.match(attr):
        return "it has effects outside the graph"
    return None


# ==============================================================================================
# Tensors: one sidecar entry per unique tensor; aliases recorded in the JSON.

def _sidecar_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return (root if ext.lower() == ".json" else path) + ".safetensors"


def _collect_tensors(network: nn.ModuleDict) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """`{stored name: contiguous tensor}` and `{alias name: stored name}` for every param and buffer."""
    stored: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    by_view: Dict[Tuple[Any, ...], str] = {}
    storages: set = set()
    for key, module in network.items():
        items = list(module.named_parameters(remove_duplicate=False))
        items += list(module.named_buffers(remove_duplicate=False))
        for local, t in items:
            name = f"{key}.{local}"
            if t.is_meta:
                raise ExportError(f"tensor {name!r} is on the meta device: it has no values to save")
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            view = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
            if ptr is not None and view in by_view:
                aliases[name] = by_view[view]
                continue
            data = t.detach()
            whole = data.is_contiguous() and data.untyped_storage().nbytes() == data.numel() * data.element_size()
            if ptr is None or ptr in storages or not whole:
                data = data.contiguous().clone()  # safetensors stores each storage once, whole
            if ptr is not None:
                by_view[view] = name
                storages.add(ptr)
            stored[name] = data.cpu()
    return stored, aliases


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _local_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _public_state(module: nn.Module) -> Dict[str, Dict[str, str]]:
    """Plain public attributes of every submodule (what repr may not show, e.g. RNN nonlinearity)."""
    out = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        out[name] = {k: repr(v) for k, v in vars(sub).items()
                     if not k.startswith("_") and k != "training"
                     and isinstance(v, (bool, int, float, str, type(None), tuple, list))}
    return out


def _structure(module: nn.Module) -> Tuple[Any, ...]:
    return (class_path(type(module)), repr(module),
            sorted((n, tuple(t.shape)) for n, t in _local_tensors(module).items()),
            sorted(module.state_dict(keep_vars=True)), _public_state(module))


# ==============================================================================================
# Saving.

def _encode_strict(value: Any, where: str, tuples_as_lists: bool = False) -> Any:
    try:
        return encode_value(value, tuples_as_lists=tuples_as_lists)
    except _Unencodable as exc:
        raise ExportError(f"{where} holds {exc}, which JSON cannot describe; save with net.save('net.pkl') "
                          "(pickle) instead") from None


def _encode_meta(meta: Dict[str, Any], where: str) -> Dict[str, Any]:
    encoded = {str(k): encode_value(v, lenient=True) for k, v in meta.items()}
    lost = [k for k, v in encoded.items() if _contains_repr(v)]
    if lost:
        warnings.warn(f"amc JSON export: {where} meta entries {lost} are kept as text only", stacklevel=4)
    return encoded


def _contains_repr(v: Any) -> bool:
    if isinstance(v, dict):
        return set(v) == {"repr"} or any(_contains_repr(x) for x in v.values())
    if isinstance(v, list):
        return any(_contains_repr(x) for x in v)
    return False


def _describe_module(node_name: str, module: nn.Module) -> Dict[str, Any]:
    """`{"class", "config"}` of a module, or `{"class", "children"}` for an nn.Sequential (e.g. a
    decomposed layer), with every class and callable checked against what `load_json` accepts."""
    from ..graph.ops import AutogradFunctionOp, FunctionOp, resolve_callable

    how = reparam.computed_by(module)
    if how:
        raise ExportError(f"node {node_name!r} computes its weights by {how}, which JSON cannot describe; remove it "
                          "first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))")
    cls = reparam.base_class(module)
    if isinstance(module, AutogradFunctionOp):
        raise ExportError(f"node {node_name!r} is a custom torch.autograd.Function ({module.fn_name}); JSON only "
                          "names torch functions, so save this network with net.save('net.pkl') instead")
    if isinstance(module, FunctionOp):
        fn_name = module.fn_name
        try:
            ok = fn_name is not None and resolve_callable(fn_name) is module.fn
        except LoadError:
            ok = False
        if not ok:
            raise ExportError(f"node {node_name!r} replays {module.fn!r}, which has no torch name amc can load "
                              "from JSON; save this network with net.save('net.pkl') instead")
        problem = callable_problem(fn_name, module.fn)
        if problem:
            raise ExportError(f"node {node_name!r} calls {fn_name}, which JSON files may not name ({problem}); "
                              "save with net.save('net.pkl') instead")
    if cls is nn.Sequential:
        return {"class": class_path(cls),
                "children": [[name, _describe_module(node_name, child)] for name, child in module.named_children()]}
    entry = _json_op(cls)
    if entry is None:
        raise ExportError(f"node {node_name!r} holds a {class_path(cls)}, which is not on the JSON allowlist "
                          "(torch.nn, torchvision.ops, amc.graph.ops); register it with "
                          "amc.export.json_io.register_json_op or save with net.save('net.pkl')")
    try:
        config = entry.to_config(module)
    except _Unencodable as exc:
        raise ExportError(f"node {node_name!r} ({class_path(cls)}): {exc}; save with net.save('net.pkl')") from None
    described = {"class": class_path(cls),
                 "config": {str(k): _encode_strict(v, f"the config of node {node_name!r}", tuples_as_lists=True)
                            for k, v in config.items()}}
    norms = reparam.weight_norms(module)
    if norms:  # rebuilt by registering the same weight norm; its g and v are tensors like any other
        described["weight_norms"] = {attr: {"kind": kind, "dim": dim} for attr, (kind, dim) in norms.items()}
    if reparam.masks(module):  # torch.nn.utils.prune: orig and mask are tensors like any other
        described["prune_masks"] = sorted(reparam.masks(module))
    return described


def _build_entry(entry: Dict[str, Any], tensors: Dict[str, torch.Tensor], node_name: str) -> nn.Module:
    """Inverse of `_describe_module`; `tensors` are the module's own (local names, meta or real)."""
    cls = _resolve_class(str(entry["class"]), node_name)
    if "children" in entry:
        if cls is not nn.Sequential:
            raise LoadError(f"node {node_name!r}: only nn.Sequential may list children, not {entry['class']!r}")
        children = collections.OrderedDict()
        for name, child in entry["children"]:
            prefix = f"{name}."
            local = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            children[str(name)] = _build_entry(child, local, node_name)
        return nn.Sequential(children)
    config = {k: _tuplify(decode_value(v)) for k, v in entry["config"].items()}
    module = _json_op(cls).from_config(cls, config, tensors)
    for attr, norm in entry.get("weight_norms", {}).items():
        if not isinstance(norm, dict) or norm.get("kind") not in ("param", "hook") or type(norm.get("dim")) is not int:
            raise LoadError(f"node {node_name!r}: weight norm of {attr!r} must be {{'kind': 'param' or 'hook', "
                            f"'dim': int}}, got {_short(repr(norm))}")
        reparam.register(module, str(attr), norm["kind"], norm["dim"])
    masked = entry.get("prune_masks", [])
    if not isinstance(masked, list) or not all(isinstance(a, str) and isinstance(getattr(module, a, None), nn.Parameter)
                                              for a in masked):
        raise LoadError(f"node {node_name!r}: prune_masks must list the module's parameter names, got "
                        f"{_short(repr(masked))}")
    for attr in masked:
        reparam.register(module, attr, "mask", -1)
    return module


def _module_entry(node_name: str, module: nn.Module) -> Dict[str, Any]:
    """The module's description, proven complete: rebuilt from exactly the JSON that will be written
    (on the meta device, so no memory or init cost), it must match the module's structure."""
    entry = _describe_module(node_name, module)
    meta_tensors = {k: v.detach().to("meta") for k, v in _local_tensors(module).items()}
    try:
        with torch.device("meta"):
            rebuilt = _build_entry(json.loads(json.dumps(entry)), meta_tensors, node_name)
        same = _structure(rebuilt) == _structure(module)
    except Exception as exc:  # noqa: BLE001 - any failure means the config is not faithful
        raise ExportError(f"node {node_name!r}: cannot rebuild {entry['class']} from its config "
                          f"{entry.get('config', entry.get('children'))}: {type(exc).__name__}: {exc}; "
                          "save with net.save('net.pkl')") from exc
    if not same:
        raise ExportError(f"node {node_name!r}: {entry['class']} rebuilt from config {entry.get('config')} differs "
                          f"from the module ({_short(repr(rebuilt), 200)} vs {_short(repr(module), 200)}); it has "
                          "state its constructor arguments do not describe. Save with net.save('net.pkl') or "
                          "register a serialiser with amc.export.json_io.register_json_op")
    return entry


def _dumps(doc: Dict[str, Any]) -> str:
    """One top-level key per line and one input/node per line: readable, greppable, diff-friendly."""
    def compact(v: Any) -> str:
        return json.dumps(v, allow_nan=False, ensure_ascii=False)

    lines = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            body = ",\n".join(f"  {compact(v)}" for v in value)
            lines.append(f" {compact(key)}: [\n{body}\n ]")
        else:
            lines.append(f" {compact(key)}: {compact(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_json(net: "ReconstructedNetwork", path: str) -> str:  # noqa: F821
    """Write `path` (JSON description) and `<stem>.safetensors` (weights), atomically; returns `path`."""
    from ..graph.network import ReconstructedNetwork

    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"save_json expects a ReconstructedNetwork, got {type(net).__name__}")
    path = os.fspath(path)
    sidecar = _sidecar_path(path)
    nodes: List[Dict[str, Any]] = []
    described: Dict[str, str] = {}
    for node in net.layer_nodes:
        module = net.network[node.module]
        entry: Dict[str, Any] = {"name": node.name, "op": node.op, "module": node.module}
        if node.module in described:
            entry["class"] = class_path(reparam.base_class(module))
            entry["shares_module_with"] = described[node.module]
        else:
            entry.update(_module_entry(node.name, module))
            params = {k: list(v.shape) for k, v in _local_tensors(module).items()}
            if params:
                entry["params"] = params
            described[node.module] = node.name
        where = f"an input of node {node.name!r}"
        entry["inputs"] = {"args": [_encode_strict(a, where) for a in node.args],
                           "kwargs": {str(k): _encode_strict(v, where) for k, v in node.kwargs.items()}}
        entry["out"] = encode_value(node.meta.get("out"), lenient=True)
        rest = {k: v for k, v in node.meta.items() if k not in ("op", "out")}
        if rest:
            entry["meta"] = _encode_meta(rest, f"node {node.name!r}")
        nodes.append(entry)
    tensors, aliases = _collect_tensors(net.network)
    frozen = [n for n, p in net.network.named_parameters(remove_duplicate=False) if not p.requires_grad]
    differs = [n for n, m in net.named_modules() if n and m.training != net.training]
    doc: Dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "amc_version": __version__, "torch_version": torch.__version__,
        "meta": _encode_meta(net.meta, "network"),
        "training": bool(net.training),
        "outputs": _encode_strict(net.outputs, "the network outputs"),
        "inputs": [{"name": n.name, "index": encode_value(n.index, lenient=False),
                    "meta": _encode_meta(n.meta, f"input {n.name!r}")} for n in net.input_nodes],
        "nodes": nodes,
        "weights": {"file": os.path.basename(sidecar), "aliases": aliases, "frozen": frozen,
                    "training_differs": differs},
    }
    from safetensors.torch import save_file

    with atomic_paths(sidecar, path) as (tmp_weights, tmp_json):
        try:
            save_file(tensors, tmp_weights, metadata={"format": FORMAT})
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"writing weights {sidecar!r} failed: {type(exc).__name__}: {exc}") from exc
        doc["weights"]["bytes"] = os.path.getsize(tmp_weights)
        doc["weights"]["sha256"] = _sha256(tmp_weights)
        with open(tmp_json, "w", encoding="utf-8") as f:
            f.write(_dumps(doc))
    return path


# ==============================================================================================
# Loading.

def _resolve_class(path: str, node: str) -> type:
    from ..graph.known_leaves import register_known

    register_known(path)  # a known leaf class (timm's DropPath) registers, as in the process that saved
    module_name, _, qualname = path.rpartition(".")
    cls = None
    for known in registered_json_classes():
        if class_path(known) == path:
            cls = known
            break
    if cls is None and path.startswith(_ALLOWED_PACKAGES):
        # Find the class in an already-imported module of an allowed package; walk up for nested names.
        while module_name:
            try:
                mod = importlib.import_module(module_name)
            except ImportError:
                module_name, _, head = module_name.rpartition(".")
                qualname = f"{head}.{qualname}"
                continue
            obj: Any = mod
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and class_path(obj) == path:
                cls = obj
            break
    if cls is None:
        raise LoadError(f"node {node!r}: class {path!r} is not on the JSON allowlist (torch.nn, torchvision.ops, "
                        "amc.graph.ops, or registered with register_json_op)")
    return cls


def _fail(path: str, problem: str) -> LoadError:
    return LoadError(f"cannot load {path!r}: {problem}")


def _read_doc(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except RecursionError:
        raise _fail(path, "JSON nested too deeply to be an amc network") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON, truncated or garbled ({exc.msg} at line {exc.lineno} "
                          f"column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not a UTF-8 text file, truncated or garbled ({exc.reason})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(path, f"not an amc network JSON (no {FORMAT!r} format marker); write one with "
                          "net.save_to_json(path)")
    if doc.get("version") != VERSION:
        raise _fail(path, f"amc JSON format version {doc.get('version')!r}; this amc ({__version__}) reads "
                          f"version {VERSION}")
    return doc


def _load_tensors(path: str, doc: Dict[str, Any], device: Any) -> Tuple[Dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = doc["weights"]
    name = weights["file"]
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise _fail(path, f"weights file name {name!r} must be a plain file name next to the JSON")
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(sidecar):
        raise _fail(path, f"its weights file {sidecar!r} is missing; copy it next to the JSON")
    sidecar = _sidecar_matching(sidecar, weights.get("sha256"))
    try:
        tensors = load_file(sidecar, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(path, f"weights file {sidecar!r} is truncated or not a safetensors file ({exc})") from None
    return tensors, sidecar


def _sidecar_matching(sidecar: str, expected: Any) -> str:
    """The sidecar, or the previous version `atomic_paths` kept when a save was killed between renames."""
    backup = previous_path(sidecar)
    if isinstance(expected, str) and os.path.isfile(backup) and _sha256(sidecar) != expected \
            and _sha256(backup) == expected:
        return backup
    return sidecar


def _assign(root: nn.ModuleDict, name: str, value: torch.Tensor, frozen: set) -> torch.Tensor:
    mod_path, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_path)
    if attr in mod._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=name not in frozen and value.is_floating_point())
        setattr(mod, attr, value)  # through __setattr__, so modules caching params (RNNs) see it
    else:
        setattr(mod, attr, value.data if isinstance(value, nn.Parameter) else value)
    return value


def _has_meta_state(module: nn.Module) -> bool:
    for sub in module.modules():
        for v in vars(sub).values():
            items = v if isinstance(v, (list, tuple)) else [v]
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in items):
                return True
        if any(t is not None and t.is_meta for t in list(sub._parameters.values()) + list(sub._buffers.values())):
            return True
    return False


def _module_of_entry(path: str, entry: Dict[str, Any], name: str, key: str, tensors: Dict[str, torch.Tensor],
                     aliases: Dict[str, str]) -> nn.Module:
    """Build one node's module on the meta device (its parameters come from the sidecar)."""
    if "config" not in entry and "children" not in entry:
        raise _fail(path, f"node {name!r} has no config for its module {key!r}")
    local = {n[len(key) + 1:]: t for n, t in tensors.items() if n.startswith(key + ".")}
    local.update({n[len(key) + 1:]: tensors[s] for n, s in aliases.items() if n.startswith(key + ".") and s in tensors})
    try:
        with torch.device("meta"):  # skip allocation and init
            return _build_entry(entry, local, name)
    except LoadError as exc:
        raise _fail(path, f"node {name!r}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"node {name!r}: cannot build {entry['class']} from config "
                          f"{entry.get('config')}: {type(exc).__name__}: {exc}") from None


def _read_graph(path: str, doc: Dict[str, Any], tensors: Dict[str, torch.Tensor], aliases: Dict[str, str]) -> Tuple:
    """(input nodes, modules by key, their JSON entries, layer nodes) as the document describes them."""
    from ..graph.node import InputNode, Node

    input_nodes = [InputNode(str(n["name"]), decode_value(n["index"]), decode_value(n.get("meta", {})))
                   for n in doc["inputs"]]
    modules: Dict[str, nn.Module] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    layer_nodes: List[Node] = []
    for entry in doc["nodes"]:
        name, key = str(entry["name"]), str(entry["module"])
        cls = _resolve_class(str(entry["class"]), name)
        if key in modules:
            if reparam.base_class(modules[key]) is not cls:
                raise _fail(path, f"node {name!r} shares module {key!r} but names class {entry['class']!r}")
        else:
            modules[key] = _module_of_entry(path, entry, name, key, tensors, aliases)
            entries[key] = entry
        meta = {"op": entry.get("op", "?"), "out": decode_value(entry.get("out"))}
        meta.update(decode_value(entry.get("meta", {})))
        inputs = entry.get("inputs", {})
        layer_nodes.append(Node(name, key, tuple(decode_value(a) for a in inputs.get("args", [])),
                                {str(k): decode_value(v) for k, v in inputs.get("kwargs", {}).items()}, meta))
    return input_nodes, modules, entries, layer_nodes


def _place_weights(path: str, modules: Dict[str, nn.Module], entries: Dict[str, Dict[str, Any]],
                   tensors: Dict[str, torch.Tensor], aliases: Dict[str, str], frozen: set, sidecar: str,
                   expected: Any) -> None:
    """Put the sidecar's tensors (and their aliases) into the meta-built modules, checked against the JSON."""
    try:
        root = nn.ModuleDict(modules)
    except (KeyError, TypeError) as exc:  # "", or a name with a dot
        raise _fail(path, f"a node names a module key nn.ModuleDict cannot hold ({exc})") from None
    _check_weights(path, root, tensors, aliases, sidecar)
    placed: Dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        placed[name] = _assign(root, name, t, frozen)
    for name, target in aliases.items():
        _assign(root, name, placed[target], frozen)
    for key, module in modules.items():
        if _has_meta_state(module):  # constructor made tensors that are not params/buffers: build for real
            real = _build_entry(entries[key], _local_tensors(module), key)
            local_frozen = {n[len(key) + 1:] for n in frozen if n.startswith(key + ".")}
            for local, t in _local_tensors(module).items():
                _assign(real, local, t, local_frozen)
            modules[key] = root[key] = real
    if expected is not None and _sha256(sidecar) != expected:
        raise _fail(path, f"weights file {sidecar!r} does not match the JSON (sha256 differs): it was replaced "
                          "or modified after saving")


def _restore_training(path: str, net: nn.Module, doc: Dict[str, Any], weights: Dict[str, Any]) -> None:
    differs = weights.get("training_differs", [])
    names = dict(net.named_modules())
    if not isinstance(differs, list) or not all(isinstance(n, str) and n in names for n in differs):
        raise _fail(path, f"weights.training_differs must list submodule names of the network, got {_short(repr(differs))}")
    net.train(bool(doc.get("training", False)))
    for name in differs:
        names[name].training = not net.training


@outside_inference_mode
def load_json(path: str, device: Any = "cpu") -> "ReconstructedNetwork":  # noqa: F821
    """Rebuild a network written by `save_json` (no pickle; classes and functions from allowlists only).

    The rebuilt graph is run once on inputs shaped like the recorded ones, so a file that is missing,
    truncated, edited into inconsistency or paired with the wrong weights raises `amc.errors.LoadError`
    (a ValueError) here, never another exception and never at the first call."""
    from ..graph.network import ReconstructedNetwork

    path = os.fspath(path)
    doc = _read_doc(path)
    try:
        tensors, sidecar = _load_tensors(path, doc, device)
        weights = doc["weights"]
        aliases: Dict[str, str] = dict(weights.get("aliases", {}))
        frozen = set(weights.get("frozen", []))
        expected = weights.get("sha256")
        input_nodes, modules, entries, layer_nodes = _read_graph(path, doc, tensors, aliases)
        outputs = decode_value(doc["outputs"])
        net_meta = decode_value(doc.get("meta", {}))
    except LoadError as exc:
        if str(exc).startswith("cannot load"):
            raise
        raise _fail(path, str(exc)) from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as exc:
        raise _fail(path, f"malformed amc JSON ({type(exc).__name__}: {exc})") from None
    _place_weights(path, modules, entries, tensors, aliases, frozen, sidecar, expected)
    try:
        net = ReconstructedNetwork(modules, input_nodes, layer_nodes, outputs, net_meta)
        net.lint()
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, f"the described graph is inconsistent: {exc}") from exc
    check_runs(path, net, device)
    _restore_training(path, net, doc, weights)
    return net


_CHECK_MAX_ELEMENTS = 1 << 26  # inputs bigger than this (256 MB of float32) are not built just to check


def _described_elements(desc: Any) -> Any:
    """Elements of the tensors a recorded description (`{"shape", "dtype"}`, nested) asks for."""
    if isinstance(desc, dict) and isinstance(desc.get("shape"), list):
        return math.prod(abs(v) if isinstance(v, (int, float)) else 1 for v in desc["shape"])
    if isinstance(desc, (list, dict)):
        return sum(_described_elements(v) for v in (desc.values() if isinstance(desc, dict) else desc))
    return 0


def check_runs(path: str, net: "ReconstructedNetwork", device: Any = None) -> None:  # noqa: F821
    """Run the loaded graph once, in eval mode, on inputs shaped like the recorded ones: a file whose
    nodes are wired or typed inconsistently fails here with a LoadError instead of at the user's first
    call. The network's training flags and the caller's RNG state are kept; BN statistics are not
    touched (it runs in eval mode, without grad). `device`:
    where the inputs go (default: where the network's first tensor is)."""
    try:
        if device is None:
            first = next(itertools.chain(net.parameters(), net.buffers()), None)
            device = first.device if first is not None else "cpu"
        bad = [n.name for n in net.input_nodes if not isinstance(n.meta, dict)]
        training = [(m, m.training) for m in net.modules()]
    except Exception as exc:  # noqa: BLE001 - a half-built module (corrupted pickle)
        raise _fail(path, f"the stored network is incomplete ({type(exc).__name__}: {_short(str(exc), 200)})") from None
    if bad:
        raise _fail(path, f"inputs {bad[:5]} have a meta that is not an object")
    if any(_described_elements(n.meta.get("out")) > _CHECK_MAX_ELEMENTS for n in net.input_nodes):
        return
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        args, kwargs = _recorded_inputs(path, net, device)
        try:
            for m, _ in training:
                m.training = False
            net(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported as a problem of the file
            # a network cast after tracing (net.double(), .half()) records inputs of the old dtype
            if not _runs_cast(net, args, kwargs):
                raise _fail(path, f"the described network does not run on inputs shaped like its recorded ones "
                                  f"({type(exc).__name__}: {_short(str(exc), 300)}); the file was edited or "
                                  "corrupted") from None
        finally:
            for m, flag in training:
                m.training = flag


def _runs_cast(net: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> bool:
    """Whether `net` runs with the floating inputs cast to its parameters' dtype."""
    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    try:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
        if dtype is None:
            return False
        net(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return True
    except Exception:  # noqa: BLE001 - the caller reports the first failure
        return False


def _recorded_inputs(path: str, net: "ReconstructedNetwork", device: Any) -> Tuple[tuple, Dict[str, Any]]:  # noqa: F821
    """Random inputs shaped like the recorded ones (positional and keyword), on `device`."""
    try:
        args = net.example_inputs()  # keyword inputs included, after the positional ones
        kwargs: Dict[str, Any] = {}
    except Exception as exc:  # noqa: BLE001 - the recorded input descriptions are malformed
        raise _fail(path, f"the recorded input descriptions cannot be built ({type(exc).__name__}: "
                          f"{_short(str(exc), 200)})") from None
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


def _check_weights(path: str, root: nn.ModuleDict, tensors: Dict[str, torch.Tensor], aliases: Dict[str, str],
                   sidecar: str) -> None:
    expected: Dict[str, torch.Size] = {}
    for key, module in root.items():
        for local, t in _local_tensors(module).items():
            expected[f"{key}.{local}"] = t.shape
    have = set(tensors) | set(aliases)
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    if missing:
        raise _fail(path, f"weights file {sidecar!r} lacks tensors {missing[:5]} that the modules need")
    if extra:
        raise _fail(path, f"weights file {sidecar!r} has tensors {extra[:5]} that no module uses")
    for name, target in aliases.items():
        if target not in tensors:
            raise _fail(path, f"alias {name!r} points at {target!r}, which is not in the weights file")
    for name, shape in expected.items():
        got = tensors[aliases.get(name, name)].shape
        if tuple(got) != tuple(shape):
            raise _fail(path, f"tensor {name!r} in {sidecar!r} has shape {list(got)}, but the module built from "
                              f"the JSON config needs {list(shape)}")
