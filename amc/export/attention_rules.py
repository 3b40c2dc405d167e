"""Attribute rules for attention and the layers around it: head counts, head sizes and their product
(Hugging Face, timm, torchvision), GPT-2's Conv1D, peft's LoRA wrappers, mixture-of-experts widths, LeViT-style
value widths. The head size each attention now uses is read from the graph's own reshape of its query
projection."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ExportError
from ..graph.ops import ParamHolder, TensorReshape, TensorSlice
from ..graph.template import Ref
from .attribute_rules import _split_sizes, register_attribute_rule

#: attribute names that hold a head count, a per-head size, and their product, in the conventions we know
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size",
                   "key_value_proj_dim", "dim_head")  # T5; timm's MaxViT
ALL_HEADS_ATTRS = ("all_head_size", "inner_dim", "attn_dim")  # inner_dim: T5; attn_dim: timm
QUERY_NAMES = ("query", "q_proj", "q", "q_lin", "qkv", "c_attn", "query_key_value", "qkv_proj",  # BLOOM, NeoX, Phi-3
               "to_qkv")  # torchvision's MaxViT
FUSED_NAMES = ("qkv", "c_attn", "query_key_value", "qkv_proj", "to_qkv")  # one projection for q, k and v
VALUE_NAMES = ("value", "v_proj", "v", "v_lin")

def _sizes(node: Any) -> List[Any]:
    sizes = list(node.args[1:])
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes


def _head_splits(net: Any, producer: str, features: int, pieces: int = 1,
                 channels_first: bool = False) -> List[Tuple[int, int]]:
    """(heads, head size) of every view/reshape that splits `producer`'s output into heads: directly (a q
    Linear; a fused qkv holds `pieces` = 3 of them), or each piece of a split of it (GPT-2's fused
    `c_attn(x).split(split_size, dim=2)`), whose features are then the piece's size. `producer` may be a module
    traced into (its nodes share its prefix); a 1x1 conv's (`channels_first`) view ends with its pixels."""
    def reads(node: Any, name: str) -> bool:
        ref = node.args[0] if node.args else None
        return isinstance(ref, Ref) and (ref.node == name or ref.node.startswith(name + "."))

    found = []
    for node, module in net.iter_nodes():
        if isinstance(module, TensorReshape) and reads(node, producer) and not node.name.startswith(producer + "."):
            sizes = _sizes(node)
            if channels_first and sizes and sizes[-1] == -1:  # view(B, heads, head_dim, -1): the -1 is H x W
                sizes = sizes[:-1]
            split = _heads_from_reshape(sizes, features, pieces)
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
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):  # timm's Attention2d: a 1x1 conv qkv
        return module.out_channels
    weight = getattr(module, "weight", None)  # transformers' Conv1D (GPT-2): weight stored [in, out]
    return int(weight.shape[1]) if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) else None


def _heads_from_reshape(sizes: List[Any], features: int, pieces: int = 1) -> Optional[Tuple[int, int]]:
    """(head count, head size) of a projection with `features` outputs split by `sizes`: the last is the
    head size; the head count is the one size whose companions multiply to the projection's `pieces` (3
    for a fused qkv: BLOOM's `view(B, L, heads, 3, head_dim)`, timm's `reshape(B, N, 3, heads, head_dim)`,
    which read alike once 3 heads are pruned to 2), else the size before the last, else what a -1 there
    stands for."""
    tail = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool)]
    if len(tail) >= 2 and tail[-1] == -1 and all(s > 0 for s in tail[:-1]) and features % math.prod(tail[:-1]) == 0:
        # timm's Eva: reshape(B, N, 3, heads, -1); PVT-v2's q: reshape(B, N, heads, -1)
        tail[-1] = features // math.prod(tail[:-1])
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
            if isinstance(child, nn.Conv2d) and name not in FUSED_NAMES:  # HaloNet's q conv: viewed as blocks,
                continue                                                  # not heads
            qualified = f"{path}.{name}" if path else name
            if child is not None and _features(child) is not None:
                splits = list(dict.fromkeys(  # q .. v
                    _head_splits(net, qualified, _features(child), 3 if name in FUSED_NAMES else 1,
                                 isinstance(child, nn.Conv2d))))
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
    scale = getattr(module, "scale", None)
    before = next((getattr(module, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int)),
                  round(scale ** -2) if isinstance(scale, float) and scale > 0 else size)  # DaViT keeps no head size
    if before != size and getattr(module, "fused_attn", None) is True and isinstance(scale, float):
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


def _swin_query_scale(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """torchvision's Swin (v1) scales queries by `(C // num_heads) ** -0.5`, C read from its input at run
    time, while the pruned network keeps the scale of the width it was captured at (soft == hard): the
    ratio of the two is folded into the query rows of `qkv`, so the module computes the network's function."""
    try:
        meta = net.node(f"{path}.qkv.weight").meta.get("out", {})
    except KeyError:  # the layer was captured as a leaf: it computes its own scale
        return {}
    qkv, heads = module.qkv, module.num_heads
    if len(meta.get("shape", ())) != 2 or not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
        return {}
    was, now = int(meta["shape"][1]) // heads, qkv.in_features // heads
    if was == now or not was or not now:
        return {}
    folded = copy.deepcopy(qkv)
    with torch.no_grad():
        for p in (folded.weight, folded.bias):
            if p is not None:
                p[:qkv.in_features] *= (now / was) ** 0.5
    return {"qkv": folded}


register_attribute_rule(lambda m: type(m).__name__ == "ShiftedWindowAttention"
                        and type(m).__module__ == "torchvision.models.swin_transformer", _swin_query_scale)


def _rotary_periods_width(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """timm's DINOv3 rotary table (`RotaryEmbeddingDinoV3`) builds its sin/cos from one period per 4 head dims
    (two axes, sin and cos) and asserts `periods.numel() == dim // 4`: the head dims q/k lost took their
    periods with them, so `dim` is 4 per period kept."""
    return {"dim": 4 * int(module.periods.numel())}


register_attribute_rule(lambda m: type(m).__name__ == "RotaryEmbeddingDinoV3" and type(getattr(m, "dim", None)) is int
                        and isinstance(getattr(m, "periods", None), torch.Tensor) and m.periods.dim() == 1,
                        _rotary_periods_width)


def _registers_removed(net: Any) -> Dict[str, int]:
    """{owner path: register tokens pruned away} from the graph's `reg_token` tensors (traced vs now)."""
    out = {}
    for node, op in net.iter_nodes():
        shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
        if isinstance(op, ParamHolder) and node.name.rpartition(".")[2] == "reg_token" and shape and len(shape) == 3:
            out[node.name.rpartition(".")[0]] = int(shape[1]) - int(op.value.shape[1])
    return out


def _prefix_tokens(module: nn.Module, path: str, net: Any) -> Dict[str, Any]:
    """Register tokens are token rows of one parameter (`reg_token`, [1, R, D]), which pruning may thin like
    channels: the prefix-token counts timm's ViTs slice at (`x[:, npt:]`) and the register count follow."""
    new: Dict[str, Any] = {}
    for owner, removed in _registers_removed(net).items():
        if removed and (not owner or path == owner or path.startswith(owner + ".")):  # the owner and inside it
            if type(vars(module).get("num_prefix_tokens")) is int:
                new["num_prefix_tokens"] = module.num_prefix_tokens - removed
            if type(vars(module).get("num_reg_tokens")) is int:
                new["num_reg_tokens"] = module.num_reg_tokens - removed
    return new


register_attribute_rule(lambda m: any(type(vars(m).get(a)) is int for a in ("num_prefix_tokens", "num_reg_tokens")),
                        _prefix_tokens)
