"""The asymmetric (sequential) fit, Zhang et al. 2015 sec. 3.3: each layer, in network order, is fitted
to the ORIGINAL network's responses from the inputs the already-decomposed layers before it produce,
so errors do not pile up with depth.

Pass 1 samples the original responses Y at fixed positions; pass 2 runs a copy of the network in which
a forward hook on each layer's output (after its folded BN) fits y' = M x + c from the responses x to
the approximated inputs, then hands y' on, so later layers see the error so far. Both passes hold every
calibration image as one batch; `activation_bytes` estimates what that costs.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ..sampling import PositionSampler, hooked_pass, observe
from .eligible import LayerInfo
from .factorize import Factors, LowRankMap
from .responses import response_rows

__all__ = ["activation_bytes", "fit_in_order"]

#: fit(info, X, Y) -> the rank-r map (P, Q, c), y' = P Q x + c, for one layer
LayerFit = Callable[[LayerInfo, torch.Tensor, torch.Tensor], LowRankMap]


def activation_bytes(net: ReconstructedNetwork, n_images: int) -> float:
    """Rough peak activation memory of one forward over `n_images` at once: the three largest node
    outputs (per image, from the capture) times the number of images."""
    trace_batch = 1
    for node in net.input_nodes:
        shape = (node.meta.get("out") or {}).get("shape") if isinstance(node.meta.get("out"), dict) else None
        if shape:
            trace_batch = max(1, int(shape[0]))
            break
    sizes = []
    for node in net.layer_nodes:
        out = node.meta.get("out")
        if isinstance(out, dict) and out.get("shape"):
            sizes.append(float(np.prod(out["shape"], dtype=np.float64)) / trace_batch * 4)
    return sum(sorted(sizes)[-3:]) * n_images


def _original_responses(net: ReconstructedNetwork, infos: Sequence[LayerInfo], inputs: Tuple[Any, ...],
                        sampler: PositionSampler) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Pass 1: ({layer: sampled positions}, {layer: the original responses there})."""
    watch = {i.observed: i for i in infos}
    positions: Dict[str, Any] = {}
    targets: Dict[str, torch.Tensor] = {}

    def record(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        info = watch.get(node.name)
        if info is None or not isinstance(out, torch.Tensor):
            return
        positions[info.name] = sampler.draw(out, info.N, channels_first=info.kind == "conv")
        targets[info.name] = response_rows(info, out, positions[info.name])

    observe(net, [inputs], record)
    return positions, targets


def _apply_map(info: LayerInfo, out: torch.Tensor, PQ: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y' = PQ y + shift on the layer's whole output (channels at dim 1 of a conv map, last of a Linear's)."""
    o = out.double()
    if info.kind == "conv":
        new = torch.einsum("nm,bm...->bn...", PQ.to(o), o) + shift.to(o).reshape(1, -1, *([1] * (o.dim() - 2)))
    else:
        new = o @ PQ.to(o).T + shift.to(o)
    return new.to(out.dtype)


def fit_in_order(net: ReconstructedNetwork, infos: Sequence[LayerInfo], inputs: Tuple[Any, ...],
                 sampler: PositionSampler, fit: LayerFit, progress: Callable[..., Iterable]) -> Dict[str, Factors]:
    """{layer: (A, P, bias)} for every layer of `infos`, each fitted by `fit(info, X, Y)` on the responses X
    of a copy of `net` whose earlier layers are already approximated, against the original's Y."""
    positions, targets = _original_responses(net, infos, inputs, sampler)
    work = net.copy()
    factors: Dict[str, Factors] = {}
    bar = iter(progress(range(len(infos)), "decomposing (asymmetric)", total=len(infos)))

    def hook(info: LayerInfo) -> Callable[..., torch.Tensor]:
        def replace(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            P, Q, c = fit(info, response_rows(info, out, positions[info.name]), targets[info.name])
            # y' = P Q (W x + b0) + c, i.e. M = P Q applied to this layer's observed output
            factors[info.name] = (Q @ info.weight, P, P @ (Q @ info.bias) + c)
            next(bar, None)
            return _apply_map(info, out, P @ Q, c)
        return replace

    hooked_pass(work, inputs, {info.observed: hook(info) for info in infos})
    return factors
