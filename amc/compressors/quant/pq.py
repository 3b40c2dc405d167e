"""Product quantisation (seed 004; Stock et al.'s iPQ): each weight row is cut into sub-vectors of `block_size`
values, the sub-vectors of a layer are clustered with k-means (scikit-learn) into `n_centroids` codewords, and
the layer stores one small integer code per sub-vector plus the codebook. Smaller files, no speed-up: the
layer decodes its weight at every call. The codebook is a Parameter, so fine-tuning the network updates each
centroid with the summed gradient of the sub-vectors it stands for (iPQ's centroid fine-tuning).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._modes import outside_inference_mode
from ...errors import QuantizationError
from ..._copying import copy_module
from ...graph.macs import conv_macs, linear_macs
from ...graph.edit import addmm_as_linear
from ...graph.network import ReconstructedNetwork
from ...graph.ops import plain_layer, register_op
from ..base import check_count, check_names, check_number, check_seed
from .prepare import swap_layers
from .quantizers import check_optimizer


def _code_dtype(n_centroids: int) -> torch.dtype:
    return torch.uint8 if n_centroids <= 256 else torch.int16 if n_centroids <= 32768 else torch.int32


class _PQWeight(nn.Module):
    """Codebook `[n_centroids, block_size]` + codes `[weight.numel() / block_size]`; `weight` is decoded."""

    weight_shape: Tuple[int, ...]

    def _init_codes(self, weight_shape: Sequence[int], block_size: int, n_centroids: int) -> None:
        numel = math.prod(weight_shape)
        row = numel // weight_shape[0]
        if block_size < 1 or row % block_size:
            raise QuantizationError(f"block_size={block_size} does not divide the {row} weights of each output "
                                    f"row (weight shape {list(weight_shape)}); pick a divisor of {row}")
        if n_centroids < 2:
            raise QuantizationError(f"n_centroids={n_centroids}: use at least 2 (256 fits one byte per code)")
        self.block_size, self.n_centroids = int(block_size), int(n_centroids)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.codebook = nn.Parameter(torch.zeros(self.n_centroids, self.block_size))
        self.register_buffer("codes", torch.zeros(numel // block_size, dtype=_code_dtype(self.n_centroids)))

    @property
    def weight(self) -> torch.Tensor:
        return self.codebook[self.codes.long()].reshape(self.weight_shape)

    def storage_bytes(self) -> int:
        """Bytes of the stored layer: codes, codebook and bias (what the file holds)."""
        bias = self.bias.numel() * self.bias.element_size() if getattr(self, "bias", None) is not None else 0
        return self.codes.numel() * self.codes.element_size() + \
            self.codebook.numel() * self.codebook.element_size() + bias


class PQConv2d(_PQWeight):
    """A product-quantised `nn.Conv2d` (same arguments, plus `block_size` and `n_centroids`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, block_size: int = 9, n_centroids: int = 256):
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self._init_codes((self.out_channels, self.in_channels // self.groups, *self.kernel_size), block_size,
                         n_centroids)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PQLinear(_PQWeight):
    """A product-quantised `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 4,
                 n_centroids: int = 256):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_codes((self.out_features, self.in_features), block_size, n_centroids)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


register_op(PQConv2d, leaf=True, macs=conv_macs, opaque=True)  # pruning stops at a PQ layer: prune first
register_op(PQLinear, leaf=True, macs=linear_macs, opaque=True)


def _kmeans(vectors: np.ndarray, k: int, seed: int, n_init: int) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(vectors, axis=0)))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(vectors)
    return km.cluster_centers_.astype(np.float32), km.labels_


def pq_layer(layer: nn.Module, block_size: int, n_centroids: int, seed: int = 0, n_init: int = 1) -> nn.Module:
    """The product-quantised twin of a Conv2d or Linear (k-means over its weight's sub-vectors)."""
    base = plain_layer(layer, nn.Conv2d, nn.Linear)
    if base is nn.Conv2d:
        new: _PQWeight = PQConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                  block_size, n_centroids)
    elif base is nn.Linear:
        new = PQLinear(layer.in_features, layer.out_features, layer.bias is not None, block_size, n_centroids)
    else:
        raise QuantizationError(f"product quantisation supports nn.Conv2d and nn.Linear, not {type(layer).__name__}")
    if layer.padding_mode != "zeros" if isinstance(layer, nn.Conv2d) else False:
        raise QuantizationError(f"padding_mode={layer.padding_mode!r} is not supported by PQConv2d")
    w = layer.weight.detach().float().cpu().numpy().reshape(-1, block_size)
    centers, labels = _kmeans(w, n_centroids, seed, n_init)
    with torch.no_grad():
        new.codebook.zero_()
        new.codebook[: len(centers)] = torch.from_numpy(centers)
        new.codes.copy_(torch.from_numpy(labels).to(new.codes.dtype))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
    return new.to(layer.weight.device)


def product_quantize(net: ReconstructedNetwork, block_size: Any = None, n_centroids: int = 256, seed: int = 0,
                     layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = (), min_weights: int = 0,
                     n_init: int = 1) -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` with its Conv2d/Linear layers product-quantised; returns it and the layer names.

    `block_size`: an int, `{node: int}`, or None (a conv's kernel area k*k, as the seed does; 4 for a Linear).
    Layers with fewer than `min_weights` weights, or fewer sub-vectors than `n_centroids`, stay float
    (a codebook as large as the layer saves nothing)."""
    def make(node: Any, mod: nn.Module) -> Optional[nn.Module]:
        if plain_layer(mod, nn.Conv2d, nn.Linear) is None:
            return None
        if isinstance(block_size, dict):
            bs = block_size.get(node.name)
            if bs is None:
                return None
        elif block_size is None:
            bs = math.prod(mod.kernel_size) if isinstance(mod, nn.Conv2d) else 4
        else:
            bs = int(block_size)
        if mod.weight.numel() < min_weights or (layers is None and mod.weight.numel() // bs <= n_centroids):
            return None
        return pq_layer(mod, bs, n_centroids, seed, n_init)

    return swap_layers(net, make, layers, ignore)


class ProductQuantization:
    """Seed-shaped product quantisation: `ProductQuantization(net, trainloader, block_size=9, n_centroids=256)`.

    `compress()` clusters every eligible Conv2d/Linear (see `product_quantize`) and, with `finetune_epochs`,
    fine-tunes the codebooks and the remaining float parameters (iPQ) on `trainloader`."""

    name = "product_quantization"

    @outside_inference_mode
    def __init__(self, origin_net: nn.Module, trainloader: Any = None, valloader: Any = None,
                 block_size: Any = None, n_centroids: int = 256, finetune_epochs: int = 0, lr: float = 1e-3,
                 optimizer: str = "sgd", layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = (),
                 example_inputs: Optional[Sequence[Any]] = None, device: Any = "cpu", seed: int = 0,
                 n_init: int = 1, verbose: bool = False):
        from ...graph.capture import as_network, example_tuple
        from ..sampling import example_from_batch

        if isinstance(n_centroids, bool) or not isinstance(n_centroids, int) or n_centroids < 2:
            raise QuantizationError(f"n_centroids={n_centroids!r}: use an int >= 2 (256 fits one byte per code)")
        finetune_epochs = check_count(finetune_epochs, "finetune_epochs", minimum=0, error=QuantizationError)
        if finetune_epochs and (trainloader is None or valloader is None):
            raise QuantizationError("finetune_epochs > 0 needs a trainloader and a valloader")
        self.block_size, self.n_centroids = block_size, n_centroids
        self.finetune_epochs = finetune_epochs
        self.lr = check_number(lr, "lr", low=0.0, low_open=True, error=QuantizationError)
        self.optimizer = check_optimizer(optimizer)
        self.layers = None if layers is None else check_names(layers, "layers", QuantizationError, origin_net)
        self.ignore = check_names(ignore, "ignore", QuantizationError, origin_net)
        self.seed = check_seed(seed, error=QuantizationError)
        self.n_init = check_count(n_init, "n_init", error=QuantizationError)
        self.trainloader, self.valloader, self.device = trainloader, valloader, device
        if example_inputs is None:
            if trainloader is None:
                raise QuantizationError("give example_inputs or a trainloader to trace origin_net")
            example_inputs, example_kwargs = example_from_batch(next(iter(trainloader)), origin_net)
        else:
            example_kwargs = None
        if not isinstance(origin_net, ReconstructedNetwork):
            origin_net = copy_module(origin_net).eval()
        self.origin_graph = addmm_as_linear(as_network(origin_net, example_tuple(example_inputs, QuantizationError),
                                                       example_kwargs, error=QuantizationError, what="origin_net"))
        self.compressed_net: Optional[ReconstructedNetwork] = None
        self.quantized_layers: List[str] = []

    @outside_inference_mode
    def compress(self) -> ReconstructedNetwork:
        net, self.quantized_layers = product_quantize(self.origin_graph, self.block_size, self.n_centroids,
                                                      self.seed, self.layers, self.ignore, n_init=self.n_init)
        if not self.quantized_layers:
            raise QuantizationError("no layer was product-quantised: each needs more sub-vectors than "
                                    f"n_centroids={self.n_centroids} (lower it, or name layers=)")
        if self.finetune_epochs:
            from ...models.training import train_classifier

            train_classifier(net, self.trainloader, self.valloader, epochs=self.finetune_epochs, lr=self.lr,
                             device=self.device, seed=self.seed, optimizer=self.optimizer)
        self.compressed_net = net.eval()
        return self.compressed_net
