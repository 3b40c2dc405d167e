"""Fake quantisation on a ReconstructedNetwork: weight layers that see their weights on an integer grid and an
activation quantiser op, both built on torch's fake-quant primitives so the TorchScript ONNX exporter writes
QuantizeLinear/DequantizeLinear pairs that onnxruntime turns into INT8 kernels.

Weights: per output channel, symmetric, `scale = max|w| / (2^(b-1) - 1)` (or, with the "mse" weight observer,
the clipping of each channel with the least squared error), read from the weight itself at every call. No scale is stored, so a quantised layer can still be pruned or fine-tuned and stays consistent.
Gradients are straight-through (`w + (Q(w) - w).detach()`, seed 004's QAT).
Activations: per tensor, affine (`uint8`-style `[0, 2^b - 1]` with a zero point), ranges from calibration.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import QuantizationError
from ..._copying import copy_module
from ...graph.ops import plain_layer, register_op
from ..rules.common import passthrough

OBSERVERS = ("minmax", "percentile", "mse")
_ONNX_RANGES = {(0, 255), (-128, 127), (0, 127)}


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"{what}={bits!r}: integer quantisation here supports 2 to 8 bits "
                                "(8 for INT8 kernels, 4 or lower for size and QAT studies)")
    return bits


def check_optimizer(optimizer: Any) -> str:
    """An optimizer name train_classifier builds (QAT / iPQ fine-tuning), checked before any work."""
    from ...models.training import OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise QuantizationError(f"optimizer={optimizer!r}; choose one of {OPTIMIZERS}")
    return str(optimizer)


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export())


def weight_range(bits: int):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


WEIGHT_OBSERVERS = ("minmax", "mse")
_MSE_FRACTIONS = torch.linspace(0.3, 1.0, 29)


def check_weight_observer(observer: str) -> str:
    if observer not in WEIGHT_OBSERVERS:
        raise QuantizationError(f"weight_observer={observer!r}; choose one of {WEIGHT_OBSERVERS} (minmax: the grid "
                                "spans max|w|; mse: the clipping with the least squared error per channel)")
    return observer


def weight_scale(w: torch.Tensor, bits: int, observer: str = "minmax") -> torch.Tensor:
    """Per-output-channel symmetric scale (a channel of zeros gets scale 1: its codes are 0 either way).

    "mse" clips each channel at the fraction of max|w| (0.3 to 1) whose grid has the least squared error: at 4
    bits and below one outlier otherwise stretches the grid over the many small weights (seed 004 notes the
    QuantNoise paper fitted its grid to a histogram). Less weight error need not mean better accuracy."""
    flat = w.detach().flatten(1).float()
    amax = flat.abs().amax(dim=1)
    hi = weight_range(bits)[1]
    if observer == "mse":
        fracs = _MSE_FRACTIONS.to(flat.device)
        s = (amax[None, :] * fracs[:, None] / hi).clamp_min(1e-12)[..., None]  # [F, C, 1]
        err = ((torch.clamp(torch.round(flat / s), -hi - 1, hi) * s - flat) ** 2).sum(-1)  # [F, C]
        amax = amax * fracs[err.argmin(0)]
    return torch.where(amax > 0, amax / hi, torch.ones_like(amax))


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`(clamp(round(x / s) + z, lo, hi) - z) * s` in plain ops: what the exporter needs for grids that ONNX's
    QuantizeLinear cannot hold (fewer than 8 bits); the same values as torch's fake quantisation."""
    zp = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp) * scale


def quantize_weight(w: torch.Tensor, bits: int, observer: str = "minmax") -> torch.Tensor:
    """`Q(w)`: `w` rounded to its per-channel `bits`-bit grid (no gradient)."""
    lo, hi = weight_range(bits)
    scale = weight_scale(w, bits, observer)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    with torch.no_grad():
        return torch.fake_quantize_per_channel_affine(w.detach().float(), scale, zp, 0, lo, hi).to(w.dtype)


def _constant(t: torch.Tensor) -> torch.Tensor:
    """A copy the ONNX tracer records as a constant (no ops leading to it)."""
    return torch.from_numpy(t.detach().cpu().numpy().copy()).to(t.device)


def fake_quant_weight(w: torch.Tensor, bits: int, observer: str = "minmax") -> torch.Tensor:
    """The weight a quantised layer computes with: `w + (Q(w) - w).detach()` (straight-through).

    Under ONNX export it is one per-channel QuantizeLinear/DequantizeLinear pair with int8 storage: the scale
    maps max|w| (or the mse clipping, applied to the weight first) to 2^(b-1) - 1, so int8's wider range never
    clips and the codes are the b-bit ones, exactly."""
    if _exporting():  # the scale as a constant, so the file stores int8 codes (see amc.export.save_onnx)
        scale = weight_scale(w, bits, observer)
        if observer != "minmax":
            lo, hi = weight_range(bits)
            edge = scale.reshape((-1,) + (1,) * (w.dim() - 1)).to(w.dtype)
            w = torch.maximum(torch.minimum(w, _constant(edge * hi)), _constant(edge * lo))  # from the parameter:
            # a weight that is a constant would let the exporter fold the whole QDQ pair back to float
        scale = _constant(scale)
        return torch.fake_quantize_per_channel_affine(w, scale, _constant(torch.zeros_like(scale, dtype=torch.int32)),
                                                      0, -128, 127)
    return w + (quantize_weight(w, bits, observer) - w).detach()


class _QuantWeight:
    """Mixin: the layer's forward uses `fake_quant_weight(self.weight, self.weight_bits, self.weight_observer)`."""

    weight_bits: int
    weight_observer: str = "minmax"  # class default: layers saved before the option existed load as they were

    @classmethod
    def from_float(cls, layer: nn.Module, weight_bits: int = 8, weight_observer: str = "minmax") -> nn.Module:
        """A quantised copy of `layer` (same parameters, same class otherwise)."""
        q = copy_module(layer)
        q.__class__ = cls
        q.weight_bits = check_bits(int(weight_bits), "weight_bits")
        q.weight_observer = check_weight_observer(weight_observer)
        return q

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.weight_bits, self.weight_observer)

    def extra_repr(self) -> str:
        extra = "" if self.weight_observer == "minmax" else f", weight_observer={self.weight_observer!r}"
        return super().extra_repr() + f", weight_bits={self.weight_bits}" + extra


class _QuantConv(_QuantWeight):
    """The convolutions' shared constructor (the conv's arguments plus `weight_bits` and `weight_observer`)
    and forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", weight_bits: int = 8,
                 device=None, dtype=None, weight_observer: str = "minmax"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.weight_bits = check_bits(int(weight_bits), "weight_bits")
        self.weight_observer = check_weight_observer(weight_observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """`nn.Conv2d` computing with its `weight_bits`-bit weights."""


class QuantConv1d(_QuantConv, nn.Conv1d):
    """`nn.Conv1d` computing with its `weight_bits`-bit weights."""


class QuantConv3d(_QuantConv, nn.Conv3d):
    """`nn.Conv3d` computing with its `weight_bits`-bit weights (video networks)."""


class QuantLinear(_QuantWeight, nn.Linear):
    """`nn.Linear` computing with its `weight_bits`-bit weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 device=None, dtype=None, weight_observer: str = "minmax"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_bits = check_bits(int(weight_bits), "weight_bits")
        self.weight_observer = check_weight_observer(weight_observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}
for _float, _quant in FLOAT_TO_QUANT.items():
    register_op(_quant, like=_float, leaf=True)


def quant_class(layer: nn.Module) -> Optional[type]:
    """The quantised class for `layer` (a subclass that keeps its parent's forward too: `plain_layer`)."""
    base = plain_layer(layer, *FLOAT_TO_QUANT)
    return FLOAT_TO_QUANT[base] if base is not None else None


class ActQuant(nn.Module):
    """Per-tensor affine fake quantisation of an activation, `[0, 2^bits - 1]` with a zero point.

    While `calibrating` it passes `x` through and records its range (and a sample of its values, drawn
    with `generator`, for the percentile and MSE observers); `calibrate_done()` sets scale and zero point."""

    def __init__(self, bits: int = 8, observer: str = "minmax", percentile: float = 99.99,
                 samples_per_batch: int = 4096):
        super().__init__()
        if observer not in OBSERVERS:
            raise QuantizationError(f"observer={observer!r}; choose one of {OBSERVERS}")
        if not 50.0 < float(percentile) <= 100.0:
            raise QuantizationError(f"percentile={percentile}: use a value in (50, 100], e.g. 99.99")
        self.bits = check_bits(int(bits), "act_bits")
        self.observer = observer
        self.percentile = float(percentile)
        self.samples_per_batch = int(samples_per_batch)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))
        self.calibrating = False
        self.generator: Optional[torch.Generator] = None
        self._lo = float("inf")
        self._hi = float("-inf")
        self._samples: List[torch.Tensor] = []

    def extra_repr(self) -> str:
        return f"bits={self.bits}, observer={self.observer!r}"

    @property
    def onnx_atol(self) -> float:
        """How far onnxruntime's integer kernels may land from this fake-quant output: a value on a rounding
        tie goes to the next step, and a few such steps reach the logits (used by `save_onnx`'s check)."""
        return 4.0 * float(self.scale)

    #: relative L2 error of the network output allowed between onnxruntime and torch (see `onnx_atol`):
    #: a one-step flip at a rounding tie grows with depth (0.2% of the logits on resnet20, 17% on
    #: MobileNetV2's 64 quantisers, the QDQ graph run as written); a wrong export is off by far more
    onnx_rel_l2 = 0.25

    @property
    def qrange(self):
        return 0, 2 ** self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x)
            return x
        if not bool(self.calibrated):
            raise QuantizationError("ActQuant used before calibration: run Quantization.compress() (or "
                                    "calibrate the network) before evaluating it")
        lo, hi = self.qrange
        if _exporting() and (lo, hi) not in _ONNX_RANGES:  # a coarser grid inside uint8: exact
            x = round_to_grid(x, self.scale.float(), self.zero_point, lo, hi)
            lo, hi = 0, 255
        return torch.fake_quantize_per_tensor_affine(x, self.scale.float(), self.zero_point, lo, hi)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if flat.numel() == 0:
            return
        self._lo = min(self._lo, float(flat.min()))
        self._hi = max(self._hi, float(flat.max()))
        if self.observer != "minmax":
            k = min(self.samples_per_batch, flat.numel())
            idx = torch.randint(flat.numel(), (k,), generator=self.generator, device="cpu")
            self._samples.append(flat.cpu()[idx])

    def _set_range(self, lo: float, hi: float) -> None:
        qlo, qhi = self.qrange
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU zeros)
        scale = (hi - lo) / (qhi - qlo) if hi > lo else 1.0
        zp = int(min(qhi, max(qlo, round(qlo - lo / scale))))
        self.scale.fill_(max(scale, 1e-12))
        self.zero_point.fill_(zp)

    @torch.no_grad()
    def calibrate_done(self) -> None:
        """Turn the recorded statistics into scale and zero point; stop calibrating."""
        if self._lo > self._hi:
            raise QuantizationError("an activation quantiser saw no data during calibration: the calibration "
                                    "loader is empty or this part of the network never ran")
        lo, hi = self._lo, self._hi
        if self.observer != "minmax" and self._samples:
            s = torch.cat(self._samples)
            if self.observer == "percentile":
                q = torch.quantile(s[: 2 ** 24], torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
                lo, hi = (float(q[0]) if lo < 0 else lo), float(q[1])
            else:
                lo, hi = self._mse_range(s, lo, hi)
        self._set_range(lo, hi)
        self.calibrated.fill_(True)
        self.calibrating = False
        self._samples = []
        self._lo, self._hi = float("inf"), float("-inf")

    def _mse_range(self, s: torch.Tensor, lo: float, hi: float):
        """The clipping range (a shrink of the observed one) with the least quantisation MSE on the sample."""
        best = (float("inf"), lo, hi)
        for frac in torch.linspace(0.3, 1.0, 36).tolist():
            self._set_range(lo * frac, hi * frac)
            qlo, qhi = self.qrange
            err = float(((torch.fake_quantize_per_tensor_affine(s, float(self.scale), int(self.zero_point),
                                                                qlo, qhi) - s) ** 2).mean())
            if err < best[0]:
                best = (err, lo * frac, hi * frac)
        return best[1], best[2]


@register_op(ActQuant, leaf=True, macs=lambda m, args, kwargs, out: 0)  # fused into the integer kernels
def act_quant_rule(c):
    """Element-wise: pruning passes straight through a quantiser."""
    return passthrough(c)
