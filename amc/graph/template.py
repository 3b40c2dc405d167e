"""Argument templates: nested Python structures whose leaves are constants or `Ref`s to node outputs.

A node records its call as a template so that running the graph is "fill the template from the
environment, call the op". Templates are plain data: they pickle, and `amc.export.json_io` turns them
into JSON.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple


@dataclass(frozen=True)
class Ref:
    """The output of node `node`, indexed by `path` when that output is a tuple/list/dict."""

    node: str
    path: Tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"%{self.node}" + "".join(f"[{p!r}]" for p in self.path)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def map_template(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild `obj` with every leaf replaced by `fn(leaf)`; containers keep their type."""
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, list):
        return [map_template(v, fn) for v in obj]
    if _is_namedtuple(obj):
        return type(obj)(*(map_template(v, fn) for v in obj))
    if isinstance(obj, tuple):
        return tuple(map_template(v, fn) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_template(v, fn)) for k, v in obj.items())
    if isinstance(obj, slice):
        return slice(map_template(obj.start, fn), map_template(obj.stop, fn), map_template(obj.step, fn))
    return fn(obj)


def iter_refs(obj: Any) -> Iterator[Ref]:
    """Every `Ref` inside a template, in order."""
    if isinstance(obj, Ref):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_refs(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_refs(v)
    elif isinstance(obj, slice):
        for v in (obj.start, obj.stop, obj.step):
            yield from iter_refs(v)


def rename_refs(obj: Any, mapping: Dict[str, str]) -> Any:
    """A copy of the template with node names replaced according to `mapping`."""
    return map_template(obj, lambda v: Ref(mapping.get(v.node, v.node), v.path) if isinstance(v, Ref) else v)


def _index(value: Any, path: Tuple[Any, ...]) -> Any:
    for p in path:
        value = value[p]
    return value


def compile_getter(obj: Any) -> Callable[[Dict[str, Any]], Any]:
    """A fast closure `env -> value` for a template (the hot path of running a graph)."""
    if isinstance(obj, Ref):
        name, path = obj.node, obj.path
        if not path:
            return lambda env: env[name]
        if len(path) == 1:
            p0 = path[0]
            return lambda env: env[name][p0]
        return lambda env: _index(env[name], path)
    if not any(True for _ in iter_refs(obj)):
        return lambda env: obj
    if isinstance(obj, list):
        getters = [compile_getter(v) for v in obj]
        return lambda env: [g(env) for g in getters]
    if _is_namedtuple(obj):
        getters = [compile_getter(v) for v in obj]
        cls = type(obj)
        return lambda env: cls(*(g(env) for g in getters))
    if isinstance(obj, tuple):
        getters = [compile_getter(v) for v in obj]
        return lambda env: tuple(g(env) for g in getters)
    if isinstance(obj, dict):
        items = [(k, compile_getter(v)) for k, v in obj.items()]
        cls = type(obj)
        return lambda env: cls((k, g(env)) for k, g in items)
    if isinstance(obj, slice):
        a, b, c = (compile_getter(v) for v in (obj.start, obj.stop, obj.step))
        return lambda env: slice(a(env), b(env), c(env))
    raise TypeError(f"cannot compile template leaf {obj!r}")


def compile_args(args: Tuple[Any, ...]) -> Callable[[Dict[str, Any]], List[Any]]:
    """Getter for a positional-argument tuple, specialised for the common all-flat case."""
    if all(isinstance(a, Ref) and not a.path for a in args):
        names = [a.node for a in args]
        if len(names) == 1:
            n0 = names[0]
            return lambda env: (env[n0],)
        return lambda env: [env[n] for n in names]
    getters = [compile_getter(a) for a in args]
    return lambda env: [g(env) for g in getters]


# ----------------------------------------------------------------------------------------------
# Mapping subclasses (Hugging Face `ModelOutput`) in templates, stored by class name.

@dataclass
class MappingTemplate:
    """A stand-in for a dict subclass inside a template, so files name the class as data, not as code:
    pkl and JSON store `cls` (a dotted path) and the items, and loading rebuilds the class only when
    `mapping_class` allows it (else a plain dict with the same keys)."""

    cls: str
    items: List[Tuple[Any, Any]]


def _plain_mapping(obj: Any) -> bool:
    return type(obj) is dict or type(obj).__name__ == "OrderedDict" and type(obj).__module__ == "collections"


def portable_mappings(obj: Any) -> Any:
    """`obj` with every dict subclass other than dict/OrderedDict replaced by a MappingTemplate."""
    if isinstance(obj, dict) and not _plain_mapping(obj):
        return MappingTemplate(f"{type(obj).__module__}.{type(obj).__qualname__}",
                               [(k, portable_mappings(v)) for k, v in obj.items()])
    if isinstance(obj, dict):
        return type(obj)((k, portable_mappings(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [portable_mappings(v) for v in obj]
    if isinstance(obj, tuple) and not _is_namedtuple(obj):
        return tuple(portable_mappings(v) for v in obj)
    return obj


def restore_mappings(obj: Any) -> Any:
    """Inverse of `portable_mappings` for the classes `mapping_class` allows; others become dicts."""
    if isinstance(obj, MappingTemplate):
        cls = mapping_class(obj.cls) or dict
        items = [(k, restore_mappings(v)) for k, v in obj.items]
        return cls(**{str(k): v for k, v in items}) if cls is not dict else dict(items)
    if isinstance(obj, dict):
        return type(obj)((k, restore_mappings(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [restore_mappings(v) for v in obj]
    if isinstance(obj, tuple) and not _is_namedtuple(obj):
        return tuple(restore_mappings(v) for v in obj)
    return obj


def mapping_class(path: str) -> Optional[type]:
    """A Hugging Face `ModelOutput` class named by `path`, or None. Imports nothing the path names: only
    `transformers.modeling_outputs` (a fixed module), when transformers is installed."""
    if not isinstance(path, str) or not path.startswith("transformers."):
        return None
    try:
        import transformers.modeling_outputs  # noqa: F401
        from transformers.utils import ModelOutput
    except ImportError:
        return None
    module, _, name = path.rpartition(".")
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, ModelOutput) else None
