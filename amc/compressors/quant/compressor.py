"""`Quantization`: post-training INT8 (or fewer weight bits) on a ReconstructedNetwork, with optional QAT.

BatchNorm is folded first; weights are quantised per output channel (symmetric), activations per tensor
(affine, ranges from `trainset_ratio` of the training loader with a min-max, percentile or MSE observer). The
result still runs in torch (fake quantisation, straight-through gradients, so it fine-tunes) and exports to
ONNX as QuantizeLinear/DequantizeLinear pairs that onnxruntime runs with INT8 kernels
(`amc.export.save_onnx`).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch.nn as nn

from ...errors import QuantizationError
from ...graph.network import ReconstructedNetwork
from ..base import BaseCompressor, check_count, check_names, check_number
from .prepare import calibrate, fold_batchnorm, insert_act_quants, quantize_weights
from .quantizers import OBSERVERS, check_bits, check_optimizer, check_weight_observer


class Quantization(BaseCompressor):
    """Fake-quantise `origin_net`: `Quantization(net, trainloader, weight_bits=8, act_bits=8).compress()`.

    - weight_bits: 2..8 (8: INT8 kernels in onnxruntime; 4 and lower: smaller codes, QAT/QuantNoise studies)
    - act_bits: 2..8, or None for weight-only quantisation (activations stay float)
    - observer: "minmax", "percentile" (`percentile`, default 99.99) or "mse" (least-squares clipping), for
      the activations
    - weight_observer: "minmax" (the grid spans each channel's max|w|) or "mse" (each channel clipped where the
      squared error is least: far less weight error at 4 bits and below, yet no accuracy gain on the Fashion
      nets of scripts/results/quant.md; try both)
    - qat_epochs: quantisation-aware fine-tuning epochs after calibration (0: post-training only), at `lr`
      with `optimizer` ("sgd" or "adamw"); the activation ranges stay as calibrated
    - layers / ignore: node names to quantise / to leave in float (default: every Conv1d/2d/3d and Linear)
    - fold_bn: fold each conv's sole BatchNorm into it first (default True: one rounding instead of two)
    """

    name = "quantization"
    error = QuantizationError
    linear_addmm = True

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 weight_bits: int = 8, act_bits: Optional[int] = 8, observer: str = "minmax",
                 percentile: float = 99.99, weight_observer: str = "minmax", trainset_ratio: float = 0.1,
                 fold_bn: bool = True,
                 qat_epochs: int = 0, lr: float = 1e-3, optimizer: str = "sgd",
                 layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = (),
                 checkpointfolder: Optional[str] = None, device: Any = "cpu", verbose: bool = False,
                 example_inputs: Optional[Sequence[Any]] = None, seed: int = 0, **kwargs: Any):
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.act_bits = None if act_bits is None else check_bits(act_bits, "act_bits")
        if observer not in OBSERVERS:
            raise QuantizationError(f"observer={observer!r}; choose one of {OBSERVERS}")
        self.observer = observer
        self.percentile = check_number(percentile, "percentile (e.g. 99.99)", low=50.0, high=100.0, low_open=True,
                                       error=QuantizationError)
        self.weight_observer = check_weight_observer(weight_observer)
        self.fold_bn = bool(fold_bn)
        self.qat_epochs = check_count(qat_epochs, "qat_epochs", minimum=0)
        self.lr = check_number(lr, "lr", low=0.0, low_open=True, error=QuantizationError)
        self.optimizer = check_optimizer(optimizer)
        self.layers = None if layers is None else check_names(layers, "layers", QuantizationError, origin_net)
        self.ignore = check_names(ignore, "ignore", QuantizationError, origin_net)
        super().__init__(origin_net, trainloader, valloader, trainset_ratio=trainset_ratio,
                         checkpointfolder=checkpointfolder, device=device, verbose=verbose,
                         example_inputs=example_inputs, seed=seed, **kwargs)
        self.quantized_layers: list = []
        self.act_quant_nodes: list = []
        self.folded_bn: list = []

    def _compress(self, ratio: Any) -> ReconstructedNetwork:
        net = self.origin_graph
        if self.fold_bn:
            net, self.folded_bn = fold_batchnorm(net)
        net, self.quantized_layers = quantize_weights(net, self.weight_bits, self.layers, self.ignore,
                                                       self.weight_observer)
        if not self.quantized_layers:
            raise QuantizationError("the network has no Conv1d, Conv2d, Conv3d or Linear layer to quantise")
        if self.act_bits is not None:
            net, self.act_quant_nodes = insert_act_quants(net, self.act_bits, self.observer, self.percentile)
            batches = self.calibration_batches()
            self.log("quantization: calibrating %d activation quantisers on %d batches",
                     len(self.act_quant_nodes), len(batches))
            calibrate(net, batches, self.seed)
        if self.qat_epochs:
            if self.valloader is None:
                raise QuantizationError("qat_epochs > 0 needs a valloader (the training loop validates each epoch)")
            from ...models.training import train_classifier

            train_classifier(net, self.trainloader, self.valloader, epochs=self.qat_epochs, lr=self.lr,
                             device=self.device, seed=self.seed, optimizer=self.optimizer)
        return net.eval()
