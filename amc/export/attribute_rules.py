"""Attribute rules: how `to_module` sets what a module computes sizes from after its layers were pruned.

One registry entry per convention (`register_attribute_rule`), plus the generic rules every module gets
first: a layer that splits (or slices the last dim) by sizes it keeps in attributes takes the sizes the
pruned network runs.
Rules read the attributes as the model built them; the last to set one wins, so a user's rule overrides
amc's. The conventions themselves live in `attention_rules` and `layer_rules`.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Dict, List, Tuple

from torch import nn

from ..errors import ExportError
from ..graph.ops import TensorSlice

#: (predicate, rule): a rule returns the attributes of one module to set, given the pruned graph
AttributeRule = Callable[[nn.Module, str, "ReconstructedNetwork"], Dict[str, Any]]  # noqa: F821
_RULES: List[Tuple[Callable[[nn.Module], bool], AttributeRule]] = []


def register_attribute_rule(applies: Callable[[nn.Module], bool], rule: AttributeRule) -> None:
    """Teach `to_module` another convention: `rule(module, path, net)` -> {attribute: new value}. Rules read
    the attributes as the model built them; where two set the same one, the last registered wins (so a rule
    of yours overrides amc's)."""
    if not callable(applies) or not callable(rule):
        raise ExportError("register_attribute_rule(applies, rule) takes two callables: applies(module) -> bool "
                          f"and rule(module, path, net) -> dict; got {type(applies).__name__}, {type(rule).__name__}")
    _RULES.append((applies, rule))


@functools.lru_cache(maxsize=1)  # one to_module call's network; cleared when the call ends
def _split_sizes(net: Any) -> Dict[str, List[Tuple[List[int], List[int]]]]:
    """{layer path: (sizes at capture, sizes now) of each `split` the pruned network runs directly inside it}."""
    pairs: Dict[str, List[Tuple[List[int], List[int]]]] = {}
    for node, op in net.iter_nodes():
        if not isinstance(op, TensorSlice) or len(node.args) < 2:
            continue
        now, out = node.args[1], node.meta.get("out")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if not (isinstance(now, (list, tuple)) and all(type(v) is int for v in now) and isinstance(out, list)
                and len(out) == len(now) and isinstance(dim, int)):
            continue
        try:
            was = [int(o["shape"][dim]) for o in out]
        except (KeyError, IndexError, TypeError):
            continue
        if was != list(now):
            pairs.setdefault(node.name.rpartition(".")[0], []).append((was, list(now)))
    return pairs


def _sources(cls: type) -> List[str]:
    """The source of `cls` and of its bases outside torch (where Python can find it)."""
    out = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        try:
            out.append(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
    return out


@functools.lru_cache(maxsize=None)
def _split_calls(cls: type) -> Tuple[Tuple[str, ...], ...]:
    """For each `split(...)` call in the source of `cls` and its bases (outside torch), the `self.<name>`s
    written in it, in order: `torch.split(x, [self.dim_conv3, self.dim_untouched])` -> (dim_conv3, dim_untouched)."""
    calls = []
    for source in _sources(cls):
        for match in re.finditer(r"\bsplit\(", source):
            depth, end = 1, match.end()
            while depth and end < len(source):
                depth += {"(": 1, ")": -1}.get(source[end], 0)
                end += 1
            calls.append(tuple(re.findall(r"self\.(\w+)", source[match.end():end])))
    return tuple(calls)


def _split_attributes(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """A layer that splits by sizes it keeps in attributes (timm's InceptionDWConv2d `split_indexes`,
    FasterNet's `[self.dim_conv3, self.dim_untouched]`, LeViT's `[self.key_dim, self.key_dim, self.val_dim]`):
    an attribute its source passes to `split(...)` takes the pruned network's sizes of that split. A list
    attribute holding the captured sizes takes the pruned ones; ints written one per piece take their
    piece's, in order; else an int equal to one piece's captured size takes that piece's (when every piece
    of that size was pruned alike). The output check refuses a coincidence that changed the function."""
    pairs = _split_sizes(net).get(path)
    if not pairs:
        return {}
    own = vars(module)
    calls = _split_calls(type(module))
    named = {n for call in calls for n in call if type(own.get(n)) in (int, list, tuple)}
    new: Dict[str, Any] = {}
    for was, now in pairs:
        for name in named:
            value = own[name]
            if type(value) is not int and list(value) == was:
                new[name] = type(value)(now)
        for call in calls:  # positional: [self.key_dim, self.key_dim, self.val_dim]
            ints = [n for n in call if type(own.get(n)) is int]
            if len(ints) == len(was) and [own[n] for n in ints] == was:
                pieces = {n: {p for m, p in zip(ints, now) if m == n} for n in ints}
                if all(len(p) == 1 for p in pieces.values()):
                    new.update({n: p.pop() for n, p in pieces.items()})
                    break
        else:
            for name in named:
                value = own[name]
                if type(value) is int and value in was and len({p for w, p in zip(was, now) if w == value}) == 1:
                    new.setdefault(name, now[was.index(value)])
    heads = own.get("num_heads")
    if type(heads) is int and heads > 0:  # per-head and all-heads sizes of what was split (BoTNet's
        follow: Dict[str, set] = {}      # dim_out_qk -> dim_head_qk; LeViT's val_dim -> val_attn_dim)
        for name, value in new.items():
            old = own[name]
            for other, size in own.items():
                if other in new or type(size) is not int or type(value) is not int or other == "num_heads":
                    continue
                if size == old * heads:
                    follow.setdefault(other, set()).add(value * heads)
                elif size * heads == old and value % heads == 0:
                    follow.setdefault(other, set()).add(value // heads)
        new.update({other: sizes.pop() for other, sizes in follow.items() if len(sizes) == 1})  # unambiguous only
    return new


@functools.lru_cache(maxsize=None)
def _slice_bounds(cls: type) -> Tuple[str, ...]:
    """The `self.<name>`s the source of `cls` (and its bases outside torch) slices the last dim at:
    `q[..., : self.rotary_ndims]` (Phi's partial rotary) -> (rotary_ndims,)."""
    names = [n for source in _sources(cls) for n in re.findall(r"\[\s*\.\.\.\s*,\s*:\s*self\.(\w+)\s*\]", source)]
    return tuple(dict.fromkeys(names))


def _slice_attributes(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """A layer that slices the last dim at an attribute (`x[..., :self.rotary_ndims]`): the attribute takes
    the bound the pruned network slices at, where the slice it ran at capture was that wide."""
    names = [n for n in _slice_bounds(type(module)) if type(vars(module).get(n)) is int]
    if not names:
        return {}
    bounds: Dict[int, set] = {}  # captured width -> widths the pruned network slices
    for node, op in net.iter_nodes():
        index = node.args[1] if isinstance(op, TensorSlice) and len(node.args) > 1 else None
        if node.name.rpartition(".")[0] != path or not (isinstance(index, tuple) and len(index) == 2
                                                         and index[0] is Ellipsis and isinstance(index[1], slice)):
            continue
        cut, out = index[1], node.meta.get("out")
        if cut.start in (None, 0) and cut.step is None and type(cut.stop) is int and isinstance(out, dict):
            bounds.setdefault(int(out["shape"][-1]), set()).add(cut.stop)
    new = {}
    for name in names:
        now = bounds.get(vars(module)[name], set())
        if len(now) == 1 and vars(module)[name] not in now:
            new[name] = now.pop()
    return new


def _not_torch_nn(module: nn.Module) -> bool:
    return not type(module).__module__.startswith("torch.nn")


def apply_rules(out: nn.Module, net: Any) -> None:
    """Set every module's attributes from the registered rules (the generic split rule first)."""
    try:
        for path, module in list(out.named_modules()):
            updates: Dict[str, Any] = {}  # every rule reads the attributes as built; the last to set one wins
            for applies, rule in [(_not_torch_nn, _split_attributes), (_not_torch_nn, _slice_attributes)] + _RULES:
                if applies(module):
                    updates.update(rule(module, path, net))
            for name, value in updates.items():
                setattr(module, name, value)
    finally:
        _split_sizes.cache_clear()
