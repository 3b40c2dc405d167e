"""Rules of reductions (mean, sum, var, std, max, norm, logsumexp) and of softmax over channels.

A reduction over a channel dim lets those channels go, as a LayerNorm does: the hard-pruned network
reduces over the kept channels. A zeroed channel would still count in a mean, a variance or a max, so
soft pruning swaps in a `MaskedReduction` that reads only the kept ones, and soft == hard. timm's
SimpleNorm (RMS-style `x * rsqrt(var(x))`) and ConvNeXt-V2's GRN (`g / g.mean(channels)`) prune this way.
A softmax along channels (DaViT's channel attention) likewise normalises over the kept ones: soft
pruning masks the silenced ones out (`MaskedSoftmax`, zero there, as a pruned channel is).
Reductions that return positions (argmax, max/min with indices) freeze what they index: pruning
would renumber the positions.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...graph.network import ReconstructedNetwork
from ...graph.ops import FunctionOp
from ..dependency import TL, Fixup, RuleCall
from .common import _dims_of, _first_tensor, _freeze, _norm_dims, _out_tl
from .layers import KeepFn
from .registry import mark_opaque, opaque, register_rule

T = torch.Tensor

# where the `dim` argument sits, counting the reduced tensor as 0 (norm's second argument is `p`)
_DIM_POS = {torch.norm: 2, T.norm: 2}


def _reduced_dims(c: RuleCall, i: int, x: torch.Tensor) -> Optional[List[int]]:
    pos = _DIM_POS.get(getattr(c.module, "fn", None), 1)
    raw = c.arg(i + pos, "dim") if len(c.args) > i + pos or "dim" in c.kwargs else None
    if isinstance(raw, torch.Tensor):
        return None
    return _norm_dims(raw, x.dim())


def _reduce(c: RuleCall, prunable: bool) -> Any:
    """Output labels of a reduction; the reduced channels prune (`MaskedReduction` in soft mode) when
    `prunable`, else they freeze (the result numbers positions along them)."""
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    red = _reduced_dims(c, i, x)
    if red is None:
        return opaque(c)
    for d in red:
        if not prunable:
            _freeze(c, dims[d])
        elif dims[d] is not None:
            c.a.fixup(c.node.name, fix_reduction, vec=dims[d], dim=d, arg=i)
    out = c.out[0] if isinstance(c.out, tuple) else c.out
    keepdim = isinstance(out, torch.Tensor) and out.dim() == x.dim() and bool(red)
    out_dims = [None if d in red else v for d, v in enumerate(dims) if d not in red or keepdim]
    if isinstance(c.out, tuple):
        return [_out_tl(o, list(out_dims)) for o in c.out]
    return _out_tl(c.out, out_dims)


def reduction(c: RuleCall) -> Any:
    """mean/sum/var/max...: reduced channels prune; `max(dim=...)`'s (values, indices) freeze them."""
    return _reduce(c, prunable=not isinstance(c.out, tuple))


def positions(c: RuleCall) -> Any:
    """argmax/argmin: the result numbers positions along the reduced dims, so their channels stay."""
    return _reduce(c, prunable=False)


register_rule(T.mean, torch.mean, T.sum, torch.sum, T.amax, T.amin, T.max, T.min, torch.max, torch.min, T.norm,
              torch.norm, T.var, torch.var, T.std, torch.std, torch.amax, torch.amin, torch.logsumexp,
              T.logsumexp, T.nansum, torch.nansum, T.nanmean, torch.nanmean)(reduction)
register_rule(T.argmax, torch.argmax, T.argmin, torch.argmin)(positions)


class MaskedReduction(FunctionOp):
    """A reduction that reads only the kept channels of its input (soft pruning), so a pruned channel,
    zero in soft mode and absent in hard mode, counts in neither."""

    def __init__(self, fn: Any, fn_name: Optional[str], arg: int, keep: Dict[int, torch.Tensor]):
        super().__init__(fn, fn_name)
        self.arg = arg
        self.dims = sorted(keep)
        for d in self.dims:
            self.register_buffer(f"keep_{d}", torch.as_tensor(keep[d]).flatten().long())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        x = args[self.arg]
        for d in self.dims:
            x = x.index_select(d, getattr(self, f"keep_{d}"))
        args[self.arg] = x
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.fn_name}, kept channels only along dims {self.dims}"


def _soft_kept(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> Optional[Tuple[str, T]]:
    """(module key, kept indices) when soft pruning silenced some of the fixup's channels; hard pruning
    removed them, so the op then has nothing to skip."""
    keep = keep_of(fx.data["vec"])
    if mode == "hard" or keep.all():
        return None
    return net.node(fx.node).module, torch.from_numpy(keep).nonzero().flatten()


def fix_reduction(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    """Soft: the reduction skips the silenced channels. Hard: they are gone, nothing to do."""
    target = _soft_kept(net, fx, keep_of, mode)
    if target is None:
        return
    key, idx = target
    op = net.network[key]
    kept = {fx.data["dim"]: idx}
    if isinstance(op, MaskedReduction):
        kept.update({d: getattr(op, f"keep_{d}") for d in op.dims})
    net.network[key] = MaskedReduction(op.fn, op.fn_name, fx.data["arg"], kept)


def softmax(c: RuleCall) -> Any:
    """Softmax along a dim: over channels, the hard network normalises over the kept ones, the soft one
    masks the others out (`MaskedSoftmax`); other dims pass."""
    i, x = _first_tensor(c)
    if x is None:
        return opaque(c)
    dims = _dims_of(c, i, x)
    d = c.module.dim if isinstance(c.module, nn.Softmax) else c.arg(i + 1, "dim")
    if d is None or not isinstance(c.out, torch.Tensor) or c.out.shape != x.shape:
        return opaque(c)
    d = int(d) % x.dim()
    if dims[d] is not None:
        c.a.fixup(c.node.name, fix_softmax, vec=dims[d], dim=d)
    return TL(dims)


register_rule(F.softmax, torch.softmax, T.softmax, nn.Softmax)(softmax)


class MaskedSoftmax(nn.Module):
    """Softmax over the kept channels of `dim` only; the silenced ones get 0 (soft pruning)."""

    def __init__(self, dim: int, keep_idx: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.register_buffer("keep_idx", keep_idx)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask = torch.zeros(x.shape[self.dim], dtype=torch.bool, device=x.device)
        mask[self.keep_idx] = True
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return torch.softmax(x.masked_fill(~mask.view(shape), float("-inf")), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kept channels only"


def fix_softmax(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    target = _soft_kept(net, fx, keep_of, mode)
    if target is not None:
        net.network[target[0]] = MaskedSoftmax(fx.data["dim"], target[1])


class MaskedStatistics(FunctionOp):
    """A norm whose statistics come from its input (`F.batch_norm(..., training=True)`, instance norm)
    run over the kept positions of `dim` only; the silenced ones get 0 (soft pruning)."""

    def __init__(self, fn: Any, fn_name: Optional[str], dim: int, keep_idx: torch.Tensor):
        super().__init__(fn, fn_name)
        self.dim = dim
        self.register_buffer("keep_idx", keep_idx)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.fn(x.index_select(self.dim, self.keep_idx), *args, **kwargs)
        return torch.zeros_like(x).index_copy(self.dim, self.keep_idx, y)


def fix_statistics(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    target = _soft_kept(net, fx, keep_of, mode)
    if target is not None:
        op = net.network[target[0]]
        net.network[target[0]] = MaskedStatistics(op.fn, op.fn_name, fx.data["dim"], target[1])


# a soft-pruned network is pruned again from its hard form, not through its masks
mark_opaque(MaskedReduction, MaskedSoftmax, MaskedStatistics)


def _masked_reduction_config(m: MaskedReduction) -> Dict[str, Any]:
    return {"fn": m.fn_name, "arg": m.arg, "dims": list(m.dims)}


def _masked_reduction_build(cls: type, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    from ...export.json_io import _function_op_build

    op = _function_op_build(FunctionOp, {"fn": config["fn"]}, {})
    return cls(op.fn, op.fn_name, int(config["arg"]), {int(d): tensors[f"keep_{int(d)}"] for d in config["dims"]})


def _resolve_fn(name: str) -> Tuple[Any, str]:
    from ...export.json_io import _function_op_build

    op = _function_op_build(FunctionOp, {"fn": name}, {})
    return op.fn, op.fn_name


def _register_json() -> None:
    from ...export.json_io import register_json_op

    register_json_op(MaskedReduction, to_config=_masked_reduction_config, from_config=_masked_reduction_build)
    register_json_op(MaskedStatistics, to_config=lambda m: {"fn": m.fn_name, "dim": m.dim},
                     from_config=lambda cls, config, tensors: cls(
                         *_resolve_fn(config["fn"]), int(config["dim"]), tensors["keep_idx"]))
    register_json_op(MaskedSoftmax, to_config=lambda m: {"dim": m.dim},
                     from_config=lambda cls, config, tensors: cls(int(config["dim"]), tensors["keep_idx"]))


_register_json()
