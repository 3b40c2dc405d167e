"""Weights a module computes at each call: weight normalisation and torch's pruning masks, exactly
editable; anything else, named.

`weight_norm` (`torch.nn.utils.parametrizations.weight_norm`, or the older hook `torch.nn.utils.weight_norm`)
computes `weight = g * v / ||v||` from two tensors of its own (wav2vec2, HuBERT and WavLM's positional conv,
vocoders). Slicing or zeroing `module.weight` would edit a temporary, so the pruning and export code edits
`g` and `v` through these helpers: a slice along the norm's own dim slices both; a slice across it changes
`||v||`, so `g` is rescaled by the norm kept, and the weight the module computes is the sliced weight, exactly.
`torch.nn.utils.prune` (l1_unstructured, ln_structured, custom_from_mask...) computes `weight = weight_orig *
weight_mask` in a forward pre-hook: a slice slices both, a zero zeroes `weight_orig`, so the unstructured
sparsity survives the channel pruning. Other parametrizations (spectral_norm, your own) stay whole:
`computed_by` names them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.nn.utils.parametrizations import _WeightNorm

__all__ = ["weight_norms", "masks", "computed_weights", "computed_by", "layout_of", "source_tensor", "sources",
           "select", "zero", "assign", "base_class", "register", "stripped", "restore", "own_classes", "computed"]


def _hooks(module: nn.Module) -> Dict[str, object]:
    """`{attr: hook}` for the older hook-based weight_norm."""
    return {h.name: h for h in module._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm"
            and type(h).__module__ == "torch.nn.utils.weight_norm"}


def weight_norms(module: nn.Module) -> Dict[str, Tuple[str, int]]:
    """`{attr: (kind, dim)}` of the weight norms on `module` itself: kind "param" (a parametrization)
    or "hook" (the older forward pre-hook); dim -1 is one norm over the whole tensor."""
    out: Dict[str, Tuple[str, int]] = {}
    if parametrize.is_parametrized(module):
        for attr, plist in module.parametrizations.items():
            if len(plist) == 1 and type(plist[0]) is _WeightNorm:
                out[attr] = ("param", int(plist[0].dim))
    for attr, hook in _hooks(module).items():
        out[attr] = ("hook", int(hook.dim))
    return out


def _mask_hooks(module: nn.Module) -> Dict[str, torch_prune.BasePruningMethod]:
    return {h._tensor_name: h for h in module._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name}


def masks(module: nn.Module) -> Dict[str, torch.Tensor]:
    """`{attr: mask}` of the torch.nn.utils.prune masks on `module` itself (`attr` = `attr_orig * attr_mask`)."""
    return {attr: getattr(module, attr + "_mask") for attr in _mask_hooks(module)}


def computed_weights(module: nn.Module) -> Dict[str, Tuple[str, int]]:
    """`{attr: (kind, dim)}` of every weight `module` computes that the pruning code edits through its
    sources: the weight norms (`weight_norms`) and the pruning masks (kind "mask", dim -1)."""
    return {**weight_norms(module), **{attr: ("mask", -1) for attr in _mask_hooks(module)}}


def computed_by(module: nn.Module) -> str:
    """What computes this module's weights at each call that the pruning code cannot edit exactly (empty
    for plain modules, weight norms and pruning masks, which it edits through their sources)."""
    norms = weight_norms(module)
    other = []
    if parametrize.is_parametrized(module):
        other = [f"{attr}: {type(p).__name__}" for attr, plist in module.parametrizations.items()
                 if attr not in norms for p in plist]
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm"]
    if any(o.endswith(": FakeSparsity") for o in other):  # torch.ao.pruning's sparsifiers
        return "a parametrization (" + ", ".join(other) + "; sparsifier.squash_mask() makes its zeros permanent)"
    if other:
        return "a parametrization (" + ", ".join(other) + ")"
    return f"a forward pre-hook ({', '.join(hooks)})" if hooks else ""


def _g_v(module: nn.Module, attr: str) -> Tuple[str, int, torch.Tensor, nn.Parameter]:
    """(kind, dim, g, v): for a mask, g is the mask and v the original weight."""
    kind, dim = computed_weights(module)[attr]
    if kind == "mask":
        return kind, dim, getattr(module, attr + "_mask"), getattr(module, attr + "_orig")
    if kind == "param":
        plist = module.parametrizations[attr]
        return kind, dim, plist.original0, plist.original1
    return kind, dim, getattr(module, attr + "_g"), getattr(module, attr + "_v")


def source_tensor(module: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """The stored tensor behind a computed `attr` (`v`, `attr_orig`): a stable identity, where reading
    `module.weight` gives a new tensor after every call (any parametrization: its original; a
    temporary's id is reused by the next, so two layers read alike would look like one). None for a plain
    attribute."""
    if attr in computed_weights(module):
        return _g_v(module, attr)[3]
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        return plist.original if hasattr(plist, "original") else plist.original0
    return None


def sources(module: nn.Module, attr: str) -> List[torch.Tensor]:
    """The stored tensors a computed `attr` derives from (g and v; weight_orig), empty for a plain one."""
    if attr not in computed_weights(module):
        return []
    kind, _, g, v = _g_v(module, attr)
    return [v] if kind == "mask" else [g, v]


def computed(module: nn.Module, attr: str) -> torch.Tensor:
    """The weight `attr` computes from its sources now (a hook's attribute is only refreshed by a forward)."""
    kind, _ = computed_weights(module)[attr]
    if kind == "mask":
        return _mask_hooks(module)[attr].apply_mask(module)
    return getattr(module, attr) if kind == "param" else _hooks(module)[attr].compute_weight(module)


def _norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.norm_except_dim(v, 2, dim)


def _set(module: nn.Module, attr: str, g: torch.Tensor, v: torch.Tensor) -> None:
    kind, _, g_old, v_old = _g_v(module, attr)
    g_old.data = g.contiguous(memory_format=layout_of(g_old.data))
    v_old.data = v.contiguous(memory_format=layout_of(v_old.data))
    if kind != "param":  # the attribute holds the last computed weight: keep it current
        setattr(module, attr, computed(module, attr))


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format a model's tensor was stored in, which an edited copy keeps (`model.to(
    memory_format=torch.channels_last)` picks the faster convolution kernels)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _rescaled(g: torch.Tensor, v: torch.Tensor, old_norm: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`g` for the edited `v` so that g * v / ||v|| is unchanged on what was kept; a slice whose kept
    entries are all zero gets g = 0 and v = 1 (its weight is 0, as it was, and no 0 / 0)."""
    new = _norm(v, dim)
    empty = new == 0
    g = torch.where(empty, torch.zeros_like(g), g * new / torch.where(old_norm == 0, torch.ones_like(old_norm), old_norm))
    if bool(empty.any()):
        v = torch.where(empty.expand_as(v), torch.ones_like(v), v)
    return g, v


def _edit(module: nn.Module, attr: str, axis: int, cut: Any, zeroing: bool) -> None:
    """Apply `cut` (a slice or a zero fill along `axis`) to the weight `attr` computes, through its sources."""
    kind, dim, g, v = _g_v(module, attr)
    g, v = g.data, v.data
    if kind == "mask":  # orig * mask: slice both, or zero orig (the mask stays the user's)
        _set(module, attr, g if zeroing else cut(g), cut(v))
    elif dim != -1 and axis % v.dim() == dim % v.dim():  # along the norm's dim: a zeroed g alone zeroes the row
        _set(module, attr, cut(g), v if zeroing else cut(v))
    else:
        _set(module, attr, *_rescaled(g, cut(v), _norm(v, dim), dim))


def select(module: nn.Module, attr: str, axis: int, idx: torch.Tensor) -> None:
    """Keep `idx` along `axis` of the weight `attr` computes (hard pruning), exactly."""
    _edit(module, attr, axis, lambda t: t.index_select(axis, idx), zeroing=False)


def zero(module: nn.Module, attr: str, axis: int, idx: torch.Tensor) -> None:
    """Make the weight `attr` computes 0 at `idx` along `axis` (soft pruning), the rest unchanged."""
    _edit(module, attr, axis, lambda t: t.index_fill(axis, idx, 0), zeroing=True)


def assign(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Make `attr` compute `value` (a refit's least-squares weights): g = ||value||, v = value; orig = value,
    and a pruning mask opens (with a warning) where `value` needs a weight it had removed."""
    if attr not in computed_weights(module):
        getattr(module, attr).data.copy_(value)
        return
    kind, dim, g, v = _g_v(module, attr)
    value = value.to(v.dtype).reshape(v.shape)
    if kind == "mask":
        opened = (g == 0) & (value != 0)
        if bool(opened.any()):
            warnings.warn(f"the refit of {type(module).__name__}.{attr} uses {int(opened.sum())} weights its "
                          "torch.nn.utils.prune mask had removed; the mask now keeps them", stacklevel=3)
            g = torch.where(opened, torch.ones_like(g), g)
        _set(module, attr, g, value)
        return
    _set(module, attr, *_rescaled(_norm(value, dim), value, _norm(value, dim), dim))


def base_class(module: nn.Module) -> type:
    """The class a parametrized module was made from (parametrize swaps in a generated subclass)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def register(module: nn.Module, attr: str, kind: str, dim: int) -> None:
    """Put a weight norm of `kind` ("param" or "hook"), or a pruning mask ("mask", all ones until the
    state is loaded), on `module.attr`, as a loader rebuilds it."""
    if kind == "mask":
        torch_prune.identity(module, attr)
    elif kind == "param":
        torch.nn.utils.parametrizations.weight_norm(module, attr, dim=dim)
    elif kind == "hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated by torch, still what the model used
            torch.nn.utils.weight_norm(module, attr, dim=dim)
    else:
        raise ValueError(f"unknown weight norm kind {kind!r}")


def _plain(module: nn.Module) -> Tuple[nn.Module, Dict[str, Dict[str, Any]]]:
    """A copy of `module` (sharing its tensors) without its weight norms and masks: `attr` holds `v` (or
    `attr_orig`); and the spec (`{attr: {"kind", "dim", "g"}}`, g the mask for a mask) that `restore` puts
    back. Pickle cannot store a parametrized module, and amc's safe loader refuses modules with hooks."""
    base = base_class(module)
    plain = base.__new__(base)
    plain.__dict__.update(module.__dict__)
    params = type(module._parameters)(module._parameters)
    buffers = type(module._buffers)(module._buffers)
    hooks = type(module._forward_pre_hooks)(module._forward_pre_hooks)
    spec: Dict[str, Dict[str, Any]] = {}
    for attr, (kind, dim) in computed_weights(module).items():
        _, _, g, v = _g_v(module, attr)
        spec[attr] = {"kind": kind, "dim": dim, "g": g}
        if kind != "param":
            hook = {**_hooks(module), **_mask_hooks(module)}[attr]
            sources = (attr + "_orig",) if kind == "mask" else (attr + "_g", attr + "_v")
            for name in sources:
                params.pop(name)
            buffers.pop(attr + "_mask", None)
            hooks = type(hooks)((k, h) for k, h in hooks.items() if h is not hook)
            plain.__dict__.pop(attr, None)
        params[attr] = v
    plain._parameters, plain._buffers, plain._forward_pre_hooks = params, buffers, hooks
    plain._load_state_dict_pre_hooks = type(module._load_state_dict_pre_hooks)(  # weight_norm's own, put back by restore
        (k, h) for k, h in module._load_state_dict_pre_hooks.items()
        if getattr(getattr(h, "hook", h), "__name__", "") != "_weight_norm_compat_hook")
    plain._modules = type(module._modules)((k, m) for k, m in module._modules.items() if k != "parametrizations")
    return plain, spec


@contextlib.contextmanager
def stripped(root: nn.Module) -> Iterator[Dict[str, Dict[str, Dict[str, Any]]]]:
    """Within the block, every module with computed weights under `root` is swapped for its plain copy; yields
    `{module path: spec}` for `restore`. The originals are back in place afterwards, whatever happened."""
    swaps = []
    specs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    plain_of: Dict[int, nn.Module] = {}
    try:
        for path, module in list(root.named_modules(remove_duplicate=False)):
            if not path or not computed_weights(module):
                continue
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            if id(module) not in plain_of:
                plain_of[id(module)], specs[path] = _plain(module)
            swaps.append((parent, name, module))
            parent._modules[name] = plain_of[id(module)]
        yield specs
    finally:
        for parent, name, module in reversed(swaps):
            parent._modules[name] = module


def restore(root: nn.Module, specs: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
    """Put back the weight norms and masks `stripped` took off (in place: every parent sees the module change)."""
    for path, spec in specs.items():
        module = root.get_submodule(path)
        for attr, s in spec.items():
            v = getattr(module, attr)
            register(module, attr, s["kind"], int(s["dim"]))
            if s["kind"] == "mask":
                if not isinstance(s["g"], torch.Tensor) or s["g"].shape != v.shape:
                    raise ValueError(f"the mask of {path}.{attr} does not have the weight's shape")
                module._buffers[attr + "_mask"] = s["g"]
                setattr(module, attr, computed(module, attr))
            elif s["kind"] == "param":
                plist = module.parametrizations[attr]
                plist.original0, plist.original1 = s["g"], v
            else:
                setattr(module, attr + "_g", s["g"])
                setattr(module, attr + "_v", v)
                setattr(module, attr, _hooks(module)[attr].compute_weight(module))


def own_classes(root: nn.Module) -> None:
    """Give every parametrized module under `root` a class of its own. `copy.deepcopy` keeps the class
    parametrize generated, and `remove_parametrizations` deletes the weight property from that class: on
    a pruned copy it broke the user's model too ('object has no attribute weight')."""
    for module in root.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, body)
