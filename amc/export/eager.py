"""A pruned ReconstructedNetwork written back into a copy of the user's own eager module.

Pruning edits shapes: every Linear, LayerNorm or Embedding of the graph keeps the qualified name it had
in the model, so the pruned layers can replace the model's layers one for one. What the model computes
from *attributes* (a Hugging Face attention's `num_attention_heads`, `attention_head_size`,
`all_head_size`, ViT's `head_dim`) is set by attribute rules, one registry entry per convention; the
head size each attention now uses is read from the graph's own reshape of its query projection. The
result is checked against the network on example inputs: a module that still computes something else
raises instead of coming back.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._modes import outside_inference_mode
from ..errors import ExportError
from ..graph import reparam
from ..graph.capture import _amc_keywords, given_inputs
from ..graph.clone import clone_module
from ..graph.ops import Constant, ParamHolder, TensorReshape, TensorSlice, module_spec
from ..graph.template import Ref
from ..graph.untouched import training_mode
from .layer_sizes import follow_tensors
from .onnx_io import tensor_leaves

#: attribute names that hold a head count, a per-head size, and their product, in the conventions we know
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size", "key_value_proj_dim")  # last: T5
ALL_HEADS_ATTRS = ("all_head_size", "inner_dim", "attn_dim")  # inner_dim: T5; attn_dim: timm
QUERY_NAMES = ("query", "q_proj", "q", "q_lin", "qkv", "c_attn", "query_key_value", "qkv_proj")  # BLOOM, NeoX, Phi-3
FUSED_NAMES = ("qkv", "c_attn", "query_key_value", "qkv_proj")  # one projection for q, k and v
VALUE_NAMES = ("value", "v_proj", "v", "v_lin")

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


def _sizes(node: Any) -> List[Any]:
    sizes = list(node.args[1:])
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes


def _head_splits(net: Any, producer: str, features: int, pieces: int = 1) -> List[Tuple[int, int]]:
    """(heads, head size) of every view/reshape that splits `producer`'s output into heads: directly (a q
    Linear; a fused qkv holds `pieces` = 3 of them), or each piece of a split of it (GPT-2's fused
    `c_attn(x).split(split_size, dim=2)`), whose features are then the piece's size. `producer` may be a module
    traced into (its nodes share its prefix)."""
    def reads(node: Any, name: str) -> bool:
        ref = node.args[0] if node.args else None
        return isinstance(ref, Ref) and (ref.node == name or ref.node.startswith(name + "."))

    found = []
    for node, module in net.iter_nodes():
        if isinstance(module, TensorReshape) and reads(node, producer) and not node.name.startswith(producer + "."):
            split = _heads_from_reshape(_sizes(node), features, pieces)
            found += [split] if split else []
        elif isinstance(module, TensorSlice) and reads(node, producer) and len(node.args) > 1:
            piece = _piece_features(node.args[1], features)
            for reader, op in net.iter_nodes() if piece else ():
                if isinstance(op, TensorReshape) and reader.args and isinstance(reader.args[0], Ref) \
                        and reader.args[0].node == node.name:
                    split = _heads_from_reshape(_sizes(reader), piece)
                    found += [split] if split else []
    return found


def _piece_features(index: Any, features: int) -> Optional[int]:
    """The features of one piece of a fused projection: `split(size, dim=-1)`'s size, or the length of
    `qkv[..., start:stop]` (Phi-3's fused qkv_proj, sliced by head counts)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return index if index > 0 else None
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        start, stop, step = index[1].start, index[1].stop, index[1].step
        if step is None and all(v is None or (isinstance(v, int) and v >= 0) for v in (start, stop)):
            return min(features, features if stop is None else stop) - (start or 0)
    return None


def _wrapped(module: nn.Module) -> Optional[nn.Module]:
    """The layer an adapter wraps (peft's LoRA layers keep it as `base_layer`), else None."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and base is not module else None


def _features(module: nn.Module) -> Optional[int]:
    if _wrapped(module) is not None:  # a LoRA-wrapped q projection: the base layer's outputs
        return _features(_wrapped(module))
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)  # transformers' Conv1D (GPT-2): weight stored [in, out]
    return int(weight.shape[1]) if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) else None


def _heads_from_reshape(sizes: List[Any], features: int, pieces: int = 1) -> Optional[Tuple[int, int]]:
    """(head count, head size) of a projection with `features` outputs split by `sizes`: the last is the
    head size; the head count is the one size whose companions multiply to the projection's `pieces` (3
    for a fused qkv: BLOOM's `view(B, L, heads, 3, head_dim)`, timm's `reshape(B, N, 3, heads, head_dim)`,
    which read alike once 3 heads are pruned to 2), else the size before the last, else what a -1 there
    stands for."""
    tail = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool)]
    if len(tail) >= 3 and tail[-1] == -1 and all(s > 0 for s in tail[:-1]) and features % math.prod(tail[:-1]) == 0:
        tail[-1] = features // math.prod(tail[:-1])  # timm's Eva: reshape(B, N, 3, heads, -1)
    if len(tail) < 2 or tail[-1] <= 0:
        return None
    size, others = tail[-1], tail[:-1]
    if len(others) > 1 and all(s > 0 for s in others) and math.prod(others) * size == features:
        fits = {h for i, h in enumerate(others) if math.prod(others[:i] + others[i + 1:]) == pieces}
        if len(fits) == 1:
            return fits.pop(), size
    if others[-1] > 0:  # OPT's view(bsz, -1, heads, head_dim): the -1 is the sequence
        return others[-1], size
    return features // (size * math.prod(s for s in others if s > 0)), size


def _attention_rule(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    found: Dict[str, Tuple[int, int]] = {}
    grouped: Dict[str, int] = {}
    pieces = 0
    for role, names in (("query", QUERY_NAMES), ("value", VALUE_NAMES)):
        for name in names:
            child = getattr(module, name, None)
            qualified = f"{path}.{name}" if path else name
            if child is not None and _features(child) is not None:
                splits = list(dict.fromkeys(  # q .. v
                    _head_splits(net, qualified, _features(child), 3 if name in FUSED_NAMES else 1)))
                if len(splits) > 1:  # q, k, v pieces of one fused projection kept different head sizes
                    found["query"], found["value"] = splits[0], splits[-1]
                elif splits:
                    found[role] = splits[0]
                    pieces = _features(child) // (splits[0][0] * splits[0][1])
                    (h, d), kv = splits[0], getattr(module, "num_kv_heads", None)
                    if name in FUSED_NAMES and pieces == 1 and isinstance(kv, int) and h > 2 * kv:
                        # Falcon's multi-query view(B, L, heads + 2 * kv_heads, head_dim)
                        found[role], pieces = (h - 2 * kv, d), 3
                        if isinstance(getattr(module, "num_key_value_groups", None), int):
                            grouped = {"num_key_value_groups": (h - 2 * kv) // kv}
                    elif name in FUSED_NAMES and pieces == 1 and d % 3 == 0:
                        # GPT-NeoX: view(B, L, heads, 3 * head_size), chunked into q, k, v afterwards
                        found[role], pieces = (h, d // 3), 3
                break
    if not found:
        return {}
    new: Dict[str, Any] = dict(grouped)
    q, v, groups = found.get("query"), found.get("value"), getattr(module, "num_key_value_groups", None)
    if q and v and q != v and q[1] == v[1] and isinstance(groups, int) and q[0] % v[0] == 0:
        # grouped-query attention (Llama, Qwen2, Mistral, Gemma's one k/v head): each k/v head serves
        # q/v query heads (the check against the network below refuses a grouping this does not reproduce)
        new["num_key_value_groups"] = q[0] // v[0]
        for name in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(module, name, None), int):
                new[name] = v[0]
        del found["value"]
    if len(set(found.values())) > 1:
        raise ExportError(
            f"{path} ({type(module).__name__}) splits q/k and v into heads with one size attribute, but the "
            f"pruned network keeps (heads, size) {found['query']} for q/k and {found['value']} for v: a plain "
            f"{type(module).__name__} cannot run that. Prune q/k and v by the same ratio (amc.prune(ratio=r) "
            "or heads=True), or keep using the ReconstructedNetwork")
    heads, size = next(iter(found.values()))
    if isinstance(getattr(module, "split_size", None), int) and pieces > 1:  # GPT-2: c_attn(x).split(split_size)
        new["split_size"] = heads * size
    for names, value in ((HEAD_COUNT_ATTRS, heads), (HEAD_SIZE_ATTRS, size), (ALL_HEADS_ATTRS, heads * size)):
        for name in names:
            if isinstance(getattr(module, name, None), int):
                new[name] = value
    before = next((getattr(module, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int)), size)
    if before != size and getattr(module, "fused_attn", None) is True and isinstance(getattr(module, "scale", None),
                                                                                      float):
        new["fused_attn"] = False  # timm: fused SDPA would scale by the pruned head size; its own path keeps `scale`
    return new


register_attribute_rule(lambda m: type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int),
                        lambda m, path, net: {"nf": int(m.weight.shape[1]), "nx": int(m.weight.shape[0])})
register_attribute_rule(lambda m: any(isinstance(getattr(m, a, None), int) for a in HEAD_SIZE_ATTRS + HEAD_COUNT_ATTRS),
                        _attention_rule)


def _adapter_rule(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """peft's LoRA layer keeps the wrapped layer's sizes, which it reads when an adapter is added."""
    base = _wrapped(module)
    sizes = {"in_features": getattr(base, "in_features", getattr(base, "in_channels", None)),
             "out_features": getattr(base, "out_features", getattr(base, "out_channels", None))}
    return {k: v for k, v in sizes.items() if isinstance(v, int) and isinstance(getattr(module, k, None), int)}


register_attribute_rule(lambda m: _wrapped(m) is not None, _adapter_rule)


def _expert_sizes(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """Mixture-of-experts blocks keep their widths in attributes: the router reshapes its input to
    `hidden_dim`; the experts' 3-D weights are `[experts, 2 * intermediate, hidden]` and `[experts, hidden,
    intermediate]` (the other way round when `is_transposed`)."""
    weight, gate_up, down = (getattr(module, n, None) for n in ("weight", "gate_up_proj", "down_proj"))
    if isinstance(down, torch.Tensor) and down.dim() == 3 and isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        hidden, inter = (gate_up.shape[1], down.shape[1]) if getattr(module, "is_transposed", False) \
            else (gate_up.shape[2], down.shape[2])
        sizes = {"hidden_dim": hidden, "intermediate_dim": inter}
    elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
        sizes = {"hidden_dim": weight.shape[1]}
    else:
        return {}
    return {k: int(v) for k, v in sizes.items() if isinstance(getattr(module, k, None), int)}


register_attribute_rule(lambda m: all(isinstance(getattr(m, a, None), int) for a in ("hidden_dim", "num_experts")),
                        _expert_sizes)


def _patch_width(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """torchvision's VisionTransformer reshapes its patches to `hidden_dim` (Torch-Pruning's ViT example
    patches `model.hidden_dim` by hand): the patch projection's width."""
    return {"hidden_dim": int(module.conv_proj.out_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "hidden_dim", None), int)
                        and isinstance(getattr(m, "conv_proj", None), nn.Conv2d), _patch_width)


def _filter_channels(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """A depthwise fixed filter (timm's BlurPool2d: `F.conv2d(x, self.filt, groups=self.channels)`): one filter
    row per channel kept."""
    return {"channels": int(module.filt.shape[0])}


register_attribute_rule(lambda m: isinstance(getattr(m, "channels", None), int) and not isinstance(m.channels, bool)
                        and isinstance(getattr(m, "filt", None), torch.Tensor) and m.filt.dim() == 4
                        and m.filt.shape[1] == 1, _filter_channels)


def _scale_shape(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's MetaFormer `Scale` multiplies by `self.scale.view(self.shape)`, shape `(dim, 1, 1)`."""
    return {"shape": (int(module.scale.numel()),) + tuple(module.shape[1:])}


register_attribute_rule(lambda m: isinstance(getattr(m, "scale", None), torch.Tensor) and m.scale.dim() == 1
                        and isinstance(getattr(m, "shape", None), tuple) and len(m.shape) >= 1
                        and all(type(v) is int for v in m.shape) and all(v == 1 for v in m.shape[1:]), _scale_shape)


def _state_space_sizes(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """Mamba's mixer splits `x_proj`'s output by `time_step_rank` and `ssm_state_size` and sizes its cache by
    `intermediate_size`: read them back from `A_log [intermediate, state]` and `dt_proj [intermediate, rank]`."""
    a_log, dt, inp = getattr(module, "A_log", None), getattr(module, "dt_proj", None), getattr(module, "in_proj", None)
    if not (isinstance(a_log, torch.Tensor) and a_log.dim() == 2
            and isinstance(getattr(dt, "weight", None), torch.Tensor)):
        return {}
    sizes = {"intermediate_size": a_log.shape[0], "ssm_state_size": a_log.shape[1],
             "time_step_rank": dt.weight.shape[1], "hidden_size": getattr(getattr(inp, "weight", None), "shape",
                                                                          (None, None))[1]}
    return {k: int(v) for k, v in sizes.items() if isinstance(v, int) and isinstance(getattr(module, k, None), int)}


register_attribute_rule(lambda m: all(isinstance(getattr(m, a, None), int)
                                      for a in ("ssm_state_size", "time_step_rank")), _state_space_sizes)


def _csp_split(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's CSP stages split `conv_exp`'s output in halves, `x.split(self.expand_chs // 2)`: the pruned
    width (halves pruned to different sizes cannot be written this way: the output check refuses them)."""
    return {"expand_chs": int(module.conv_exp.conv.out_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "expand_chs", None), int)
                        and isinstance(getattr(getattr(m, "conv_exp", None), "conv", None), nn.Conv2d), _csp_split)


def _mixed_conv_splits(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's MixedConv2d (MixNet) splits its input by `self.splits`, one piece per kernel size: the
    pruned convs' input widths."""
    convs = list(module.values())
    return {"splits": [int(c.in_channels) for c in convs], "in_channels": sum(int(c.in_channels) for c in convs),
            "out_channels": sum(int(c.out_channels) for c in convs)}


register_attribute_rule(lambda m: isinstance(m, nn.ModuleDict) and isinstance(getattr(m, "splits", None), list)
                        and len(m) == len(m.splits) and all(isinstance(c, nn.Conv2d) for c in m.values()),
                        _mixed_conv_splits)


def _partial_shortcut(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's RexNet block adds its input to the first `in_channels` of its output (`x[:, 0:self.in_channels]
    + shortcut`): the pruned input width; kept channels keep their order, so the added ones stay first."""
    first = module.conv_exp if module.conv_exp is not None else module.conv_dw
    return {"in_channels": int(first.conv.in_channels), "out_channels": int(module.conv_pwl.conv.out_channels)}


register_attribute_rule(lambda m: all(isinstance(getattr(m, a, None), int) for a in ("in_channels", "out_channels"))
                        and isinstance(getattr(m, "use_shortcut", None), bool) and hasattr(m, "conv_exp")
                        and isinstance(getattr(getattr(m, "conv_pwl", None), "conv", None), nn.Conv2d)
                        and isinstance(getattr(getattr(m, "conv_dw", None), "conv", None), nn.Conv2d),
                        _partial_shortcut)


def _scale_width(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's Res2Net block splits `conv1`'s output in pieces of `self.width`, one per scale: the pruned
    convs' width (pieces pruned to different widths cannot be written this way: the output check refuses)."""
    return {"width": int(module.convs[0].in_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "width", None), int) and isinstance(getattr(m, "convs", None), nn.ModuleList)
                        and len(m.convs) > 0 and isinstance(m.convs[0], nn.Conv2d)
                        and isinstance(getattr(m, "conv1", None), nn.Conv2d), _scale_width)


def _path_widths(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's SelectiveKernel splits its input by `self.in_channels // self.num_paths` when `split_input`:
    the pruned paths' widths."""
    convs = [p.conv for p in module.paths]
    width = sum(int(c.in_channels) for c in convs) if module.split_input else int(convs[0].in_channels)
    return {"in_channels": width, "out_channels": int(convs[0].out_channels)}


register_attribute_rule(lambda m: isinstance(getattr(m, "split_input", None), bool)
                        and isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "paths", None), nn.ModuleList)
                        and all(isinstance(getattr(p, "conv", None), nn.Conv2d) for p in m.paths), _path_widths)


@functools.lru_cache(maxsize=1)  # one to_module call's network; cleared when the call ends
def _split_sizes(net: Any) -> Dict[str, List[Tuple[List[int], List[int]]]]:
    """{layer path: (sizes at capture, sizes now) of each `split` the pruned network runs directly inside it}."""
    pairs: Dict[str, List[Tuple[List[int], List[int]]]] = {}
    for node, op in net.iter_nodes():
        if not isinstance(op, TensorSlice) or len(node.args) < 2:
            continue
        now, out, dim = node.args[1], node.meta.get("out"), node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
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


@functools.lru_cache(maxsize=None)
def _split_calls(cls: type) -> Tuple[Tuple[str, ...], ...]:
    """For each `split(...)` call in the source of `cls` and its bases (outside torch), the `self.<name>`s
    written in it, in order: `torch.split(x, [self.dim_conv3, self.dim_untouched])` -> (dim_conv3, dim_untouched)."""
    calls = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
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


def _value_width(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's LeViT / TinyViT / EfficientFormer attention splits each head into `[key_dim, key_dim, val_dim]`
    and reshapes its output to `num_heads * val_dim`, kept in an attribute of its own (`val_attn_dim`,
    `out_dim`): that one follows the value size (the generic rule cannot tell it from the key size when both
    were equal). Where the key size changed, timm's own path keeps `scale` (SDPA would use the new size)."""
    pieces = [now for was, now in _split_sizes(net).get(path, []) if was[-1] == module.val_dim]
    if not pieces:
        return {}
    width = module.num_heads * module.val_dim
    new: Dict[str, Any] = {name: module.num_heads * pieces[0][-1] for name, value in vars(module).items()
                           if type(value) is int and value == width and name not in ("val_dim", "num_heads", "key_dim")}
    if pieces[0][0] != getattr(module, "key_dim", pieces[0][0]) and getattr(module, "fused_attn", None) is True \
            and isinstance(getattr(module, "scale", None), float):
        new["fused_attn"] = False
    return new


register_attribute_rule(lambda m: all(type(getattr(m, a, None)) is int for a in ("val_dim", "num_heads")),
                        _value_width)


def _not_torch_nn(module: nn.Module) -> bool:
    return not type(module).__module__.startswith("torch.nn")


def _set_path(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(value, nn.Module) or isinstance(getattr(parent, leaf, None), nn.Module):
        setattr(parent, leaf, value)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        parent._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)


def _has_tensor(root: nn.Module, path: str) -> bool:
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError:
        return False
    return leaf in parent._parameters or leaf in parent._buffers


def _same_kind(target: nn.Module, op: nn.Module) -> bool:
    """`op` can stand where `target` is: the same class, or an amc layer registered as a drop-in for
    it (`register_op(..., drop_in_for=nn.Conv1d)`: called the same way, it computes the pruned layer);
    the write-back is checked against the network's output either way."""
    if reparam.base_class(target) is reparam.base_class(op):
        return True
    spec = module_spec(op)
    return spec is not None and spec.meta.get("drop_in_for") is reparam.base_class(target)


def _functional_groups(net: Any, path: str) -> Dict[str, list]:
    """The `groups` the pruned network's `F.conv*d` inside layer `path` runs with (timm's ScaledStdConv2d
    calls `F.conv2d(x, w, ..., self.groups)` itself), or {}."""
    inside = path + "."
    for node, op in net.iter_nodes():
        if node.name.startswith(inside) and node.meta.get("op") == "FunctionalConv":
            groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
            return {"groups": [groups]} if isinstance(groups, int) else {}
    return {}


def _tie_again(out: nn.Module, groups: List[List[str]]) -> None:
    """Each layer was written back as its own copy, so a Parameter the model shared between layers became
    two (fine-tuning would train them apart): the pruned copies, equal as the network's one tensor, are one
    Parameter again."""
    params = dict(out.named_parameters(remove_duplicate=False))
    for names in groups:
        first = params.get(names[0])
        for name in names[1:]:
            other = params.get(name)
            if first is not None and other is not None and other is not first and other.shape == first.shape \
                    and torch.equal(other, first):
                _set_path(out, name, first)


def _write_layers(net: Any, out: nn.Module) -> None:
    modules = dict(out.named_modules(remove_duplicate=False))  # a layer the model holds under two names too
    aliases: Dict[int, List[str]] = {}
    for path, module in modules.items():
        aliases.setdefault(id(module), []).append(path)
    tied: Dict[int, List[str]] = {}  # one Parameter in two layers (an output projection reusing the embedding)
    for name, param in out.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    foreign, written, owners = [], set(), set()
    for node, op in net.iter_nodes():
        if isinstance(op, Constant) or node.module in written:  # a shared layer (ALBERT) called again
            continue
        written.add(node.module)
        if isinstance(op, ParamHolder):
            if _has_tensor(out, node.name):
                _set_path(out, node.name, copy.deepcopy(op.value))
                owners.add(node.name.rpartition(".")[0])  # a layer whose weight the model reads directly
                continue
            foreign.append(f"{node.name} (a tensor)")
            continue
        own = list(op.parameters(recurse=True)) + list(op.buffers(recurse=True))
        target = modules.get(node.name)
        if not own:  # a parameterless layer that pruning resized (LayerNorm without affine) goes back too
            if target is not None and reparam.base_class(target) is reparam.base_class(op) and repr(target) != repr(op):
                new = clone_module(op, {})
                for path in aliases[id(target)]:
                    _set_path(out, path, new)
            continue
        if target is None or not _same_kind(target, op):
            foreign.append(f"{node.name} ({type(op).__name__})")
            continue
        new = clone_module(op, {})
        for path in aliases[id(target)]:  # `self.shared = self.c2`: every name of the layer gets the one copy
            _set_path(out, path, new)
    _tie_again(out, [names for names in tied.values() if len(names) > 1])
    for path in owners:  # Mamba's `F.conv1d(x, self.conv1d.weight, groups=self.conv1d.groups)`
        if path in modules:
            follow_tensors(modules[path], _functional_groups(net, path))
    if foreign:
        raise ExportError(
            f"to_module writes pruned layers back by name, but {len(foreign)} layer(s) of the network have no "
            f"layer of the same name and class in the model: {foreign[:5]}. They come from a compressor that "
            "adds or replaces layers (low-rank, quantization, VTP's column gather, token pruning), which the "
            "original module has no place for: keep the ReconstructedNetwork, or export it with "
            "save_to_json/save_to_onnx")


def _split_inputs(net: Any, inputs: Tuple[Any, ...]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """`net.example_inputs()` as the eager model takes them: keyword inputs by their names."""
    slots = net._positional_slots()
    keyword = [n.name for n in net.input_nodes if not isinstance(n.index, int)]
    return tuple(inputs[:slots]), dict(zip(keyword, inputs[slots:]))


def _outputs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], problem: str) -> List[torch.Tensor]:
    try:
        return tensor_leaves(module(*args, **kwargs))
    except Exception as e:
        raise ExportError(problem.format(error=f"{type(e).__name__}: {str(e)[:300]}")) from e


def _check_same(net: Any, out: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], rtol: float) -> None:
    with torch.no_grad(), training_mode(net), training_mode(out):  # eval inside; every flag restored after
        want = _outputs(net, args, kwargs, "the pruned network itself does not run on the example inputs "
                        "({error}): pass inputs like the ones it was traced with, "
                        "to_module(net, model, *inputs, **keyword_inputs)")
        got = _outputs(out, args, kwargs, f"the pruned {type(out).__name__} fails to run after its layers were "
                       "written back ({error}): an attribute it computes shapes from has no rule; add one with "
                       "amc.export.register_attribute_rule")
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        raise ExportError(f"the pruned {type(out).__name__} returns tensors of shapes {[tuple(t.shape) for t in got]}, "
                          f"the network {[tuple(t.shape) for t in want]}")
    for i, (a, b) in enumerate(zip(want, got)):
        if a.is_floating_point():
            err = (a - b).abs().max().item() if a.numel() else 0.0
            if err > rtol * max(1.0, a.abs().max().item()):
                raise ExportError(
                    f"the pruned {type(out).__name__} computes something else than the pruned network (output "
                    f"{i}: max difference {err:.3g}): one of its modules derives a size or scale from an attribute "
                    "that no rule updated; add one with amc.export.register_attribute_rule")
        elif not torch.equal(a, b):
            raise ExportError(f"the pruned {type(out).__name__} returns a different output {i} than the network")


@outside_inference_mode
def to_module(net: Any, model: nn.Module, *example_inputs: Any, rtol: float = 1e-4,
              **example_kwargs: Any) -> nn.Module:
    """A copy of `model` (the module `net` was traced from) running the pruned `net`'s layers.

    The pruned weights replace the model's layers of the same name, attention attributes are updated
    (registered rules), and the copy is checked to return what `net` returns on the example inputs (the
    ones given, else `net.example_inputs()`); `model` itself is not changed. Raises ExportError when a
    layer has no counterpart (compressors that add layers) or the outputs differ.
    """
    from ..graph.network import ReconstructedNetwork

    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"to_module takes the pruned ReconstructedNetwork first, got {type(net).__name__}")
    if not isinstance(model, nn.Module) or isinstance(model, ReconstructedNetwork):
        raise ExportError("to_module takes the original eager nn.Module (the one traced) second, got "
                          f"{type(model).__name__}")
    out = clone_module(model, {})
    _write_layers(net, out)
    try:
        for path, module in list(out.named_modules()):
            updates: Dict[str, Any] = {}  # every rule reads the attributes as built; the last to set one wins
            for applies, rule in [(_not_torch_nn, _split_attributes)] + _RULES:  # the generic one first
                if applies(module):
                    updates.update(rule(module, path, net))
            for name, value in updates.items():
                setattr(module, name, value)
    finally:
        _split_sizes.cache_clear()
    example_inputs, example_kwargs = _amc_keywords(net, example_inputs, example_kwargs, ExportError)
    example_inputs = given_inputs(net, example_inputs, None, ExportError)  # (x,) given as one argument
    if example_inputs or example_kwargs:
        args, kwargs = example_inputs, example_kwargs
    else:
        args, kwargs = _split_inputs(net, net.example_inputs())
    from .hf import describe_in_config, is_transformers_model

    if is_transformers_model(out):  # before the check: layers that read their sizes from the config (Phi-3)
        describe_in_config(out, model)
    _check_same(net, out, args, kwargs, rtol)
    return out
