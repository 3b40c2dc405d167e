"""A layer's sampled responses and their PCA: what the data-driven factorisations are fitted on.

The response of a layer is its output after the folded BN (`LayerInfo.observed`), at
`sampled_pixels_per_img` positions per calibration image, or, with None, as many as 16 rows per
output channel N need (the fit is an N x N covariance / regression), at least 10 per image
(`amc.compressors.sampling`). Images and positions come from the compressor's seed alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import DataError
from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ..sampling import PositionSampler, count_images, observe, output_rows
from .eligible import LayerInfo

__all__ = ["Responses", "pca", "response_rows", "collect_responses"]


@dataclass
class Responses:
    """Sampled responses y = W x + b (BN folded) of one layer, [n, N] float64, with their PCA."""

    Y: torch.Tensor
    mean: torch.Tensor
    evals: torch.Tensor  # descending
    evecs: torch.Tensor  # columns, same order


def pca(Y: torch.Tensor) -> Responses:
    mean = Y.mean(0)
    Yc = Y - mean
    cov = Yc.T @ Yc / max(1, Y.shape[0])
    evals, evecs = torch.linalg.eigh(cov)
    return Responses(Y, mean, evals.flip(0).clamp_min(0), evecs.flip(1))


def response_rows(info: LayerInfo, out: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's responses at `pos` as float64 CPU rows [n, N] (channels last)."""
    return output_rows(out.detach(), pos, channels_first=info.kind == "conv").double().cpu()


def collect_responses(net: ReconstructedNetwork, infos: Sequence[LayerInfo], batches: Sequence[Tuple[Any, ...]],
                      samples_per_img: Optional[int], seed: int = 0) -> Dict[str, Responses]:
    """Sample the responses of every layer in `infos` on the calibration `batches`: `samples_per_img`
    positions per image, or (None) as many as the layer's N x N fit needs."""
    watch = {i.observed: i for i in infos}
    store: Dict[str, List[torch.Tensor]] = {i.name: [] for i in infos}
    sampler = PositionSampler(samples_per_img, count_images(batches), seed)

    def record(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        info = watch.get(node.name)
        if info is None or not isinstance(out, torch.Tensor):
            return
        pos = sampler.draw(out, info.N, channels_first=info.kind == "conv")
        store[info.name].append(response_rows(info, out, pos))

    observe(net, batches, record)
    out = {}
    for name, rows in store.items():
        if not rows:
            raise DataError(f"layer {name!r} produced no responses on the calibration batches")
        out[name] = pca(torch.cat(rows))
    return out
