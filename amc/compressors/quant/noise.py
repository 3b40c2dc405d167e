"""QuantNoise (Fan et al. 2020, seed 004) as a trainer plug-in: each training step, a random `rate` share of
every Conv/Linear weight is replaced by its quantised value (straight-through), the rest stays float:

    noise = Q(w) - w;  mask = rand_like(w) < rate;  w' = w + noise.detach() * mask

`rate=1` is plain QAT (`w + (Q(w) - w).detach()`, bit for bit what `Quantization`'s layers compute), `rate=0`
trains exactly as without the plug-in. The mask comes from the plug-in's own generator (`seed`), so the
caller's RNG stream (shuffling, dropout) is the same with and without it. In eval mode the weights are fully
quantised (`eval_quantized=True`: validation sees the network as it will be deployed). `bn_batches=N`
re-estimates BatchNorm statistics on N training batches at the end with every weight quantised (training
saw only a `rate` share quantised, so its statistics describe a network that is never deployed).
`weight_observer` picks the grid ("minmax" or "mse", as `Quantization`'s): train on the one you will deploy.
Works on any `nn.Module` (a ReconstructedNetwork or not), through `torch.nn.utils.parametrize`; the float
weights are put back at the end of training, ready for `Quantization` (post-training) to quantise for good.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ...errors import QuantizationError
from ...trainers.plugins import TrainerCallback
from ..base import check_seed
from .quantizers import check_bits, check_weight_observer, quant_class, quantize_weight


class _NoisyWeight(nn.Module):
    def __init__(self, owner: "QuantNoise"):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: the plug-in is not part of the model

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = quantize_weight(w, self.owner.bits, self.owner.weight_observer)
        if not self.training:
            return w + (q - w).detach() if self.owner.eval_quantized else w
        if self.owner.full:
            return w + (q - w).detach()
        mask = torch.rand(w.shape, generator=self.owner.generator(w.device), device=w.device) < self.owner.rate
        return w + (q - w).detach() * mask.to(w.dtype)


class QuantNoise(TrainerCallback):
    """`callbacks=[QuantNoise(rate=0.5, bits=4)]`: quantisation noise on a `rate` share of the weights per step."""

    def __init__(self, rate: float = 0.5, bits: int = 8, seed: int = 0, eval_quantized: bool = True,
                 bn_batches: int = 0, weight_observer: str = "minmax"):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise QuantizationError(f"QuantNoise rate={rate!r}: use a share in [0, 1] (1 is plain QAT)")
        self.rate = float(rate)
        self.bits = check_bits(bits, "bits")
        self.seed = check_seed(seed, error=QuantizationError)
        self.eval_quantized = bool(eval_quantized)
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
            raise QuantizationError(f"bn_batches={bn_batches!r}: use an int >= 0 (0: keep the trained statistics)")
        self.bn_batches = bn_batches
        self.weight_observer = check_weight_observer(weight_observer)  # the grid `Quantization` will deploy
        self.full = False  # every weight quantised, in train mode too (BatchNorm re-estimation)
        self._generators: Dict[str, torch.Generator] = {}
        self._layers: List[Tuple[nn.Module, str]] = []

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def attach(self, model: nn.Module) -> int:
        """Parametrize every Conv1d/2d/3d and Linear weight of `model`; returns how many."""
        for m in model.modules():
            if quant_class(m) is not None and not parametrize.is_parametrized(m, "weight"):
                parametrize.register_parametrization(m, "weight", _NoisyWeight(self))
                self._layers.append((m, "weight"))
        if not self._layers:
            raise QuantizationError(f"QuantNoise found no Conv1d, Conv2d, Conv3d or Linear in {type(model).__name__}")
        return len(self._layers)

    def detach(self) -> None:
        """Put the float weights back (the parametrization removed, the trained values kept)."""
        for m, name in self._layers:
            if parametrize.is_parametrized(m, name):
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)
        self._layers = []

    def on_train_start(self, trainer: Any) -> None:
        self.attach(trainer.module)

    def on_train_end(self, trainer: Any) -> None:
        if self.bn_batches:
            self.recalibrate_bn(trainer.module, trainer._train_loader)
        self.detach()

    def recalibrate_bn(self, model: nn.Module, loader: Any) -> None:
        """Re-estimate BatchNorm statistics with every weight quantised: training saw a `rate` share of them
        quantised, so its running statistics describe a network that is never deployed."""
        from ...trainers.batchnorm import recalibrate_bn

        was = model.training
        self.full = True
        try:
            with torch.no_grad():
                recalibrate_bn(model, loader, max_batches=self.bn_batches, copy=False)
        finally:
            self.full = False
            model.train(was)
