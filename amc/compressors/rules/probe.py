"""Verified pass-through for ops that have no channel rule (issue 19).

Freezing every channel an unknown op touches is safe but silent: one unregistered element-wise function
(`torch.special.erf`) froze a whole network. Before freezing, a parameter-free op with one tensor input
whose output has the same shape is *probed*: along each labelled dim, a few indices of a random input are
perturbed one at a time, and the op passes only if every output change stays at the perturbed index
(and two calls on the same input agree, so random ops fail). Passing ops carry their channels through for
this network, recorded in `Analysis.probed`; anything else, or any doubt, stays frozen. The pruned
network is then checked against the soft-pruned one as always.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..dependency import TL, RuleCall
from .common import _dims_of
from .registry import opaque

PROBES_PER_DIM = 4


def _only_tensor(c: RuleCall) -> Optional[int]:
    tensors = [i for i, a in enumerate(c.args) if isinstance(a, torch.Tensor)]
    if len(tensors) != 1 or any(isinstance(v, torch.Tensor) for v in c.kwargs.values()):
        return None
    return tensors[0]


def _independent(fn, x: torch.Tensor, dim: int, gen: torch.Generator) -> bool:
    """Perturbing index j of `dim` changes the output at index j of `dim` only."""
    base = fn(x.clone())
    if not torch.equal(base, fn(x.clone())):
        return False
    n = x.shape[dim]
    picks = sorted({0, n - 1, *torch.randint(n, (PROBES_PER_DIM,), generator=gen).tolist()})
    for j in picks:
        x2 = x.clone()
        x2.select(dim, j).add_(torch.randn(x2.select(dim, j).shape, generator=gen, dtype=x.dtype) + 0.5)
        out = fn(x2)
        if out.shape != base.shape:
            return False
        changed = (out != base) & ~(torch.isnan(out) & torch.isnan(base))
        others = changed.index_fill(dim, torch.tensor([j]), False)
        if others.any():
            return False
    return True


def probe_or_freeze(c: RuleCall) -> Any:
    """The rule of an op with no rule: a probed element-wise pass-through, or `opaque`."""
    i = _only_tensor(c)
    x, out = (c.args[i] if i is not None else None), c.out
    if x is None or not isinstance(out, torch.Tensor) or out.shape != x.shape or not x.is_floating_point() \
            or out.dtype != x.dtype or x.numel() == 0 or any(True for _ in c.module.parameters()) \
            or any(True for _ in c.module.buffers()):
        return opaque(c)
    dims = _dims_of(c, i, x)
    labelled = [d for d, v in enumerate(dims) if v is not None]
    if not labelled:
        return opaque(c)
    args = list(c.args)

    def fn(t: torch.Tensor) -> torch.Tensor:
        call = args[:i] + [t] + args[i + 1:]
        return c.module(*call, **c.kwargs)

    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe_x = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            ok = all(_independent(fn, probe_x, d, gen) for d in labelled)
    except Exception:  # noqa: BLE001 - an op that cannot be probed is not known to be element-wise
        ok = False
    if not ok:
        return opaque(c)
    c.a.probed.append(c.node.name)
    return TL(list(dims))


def probed(analysis: Any) -> List[str]:
    return list(getattr(analysis, "probed", []))
