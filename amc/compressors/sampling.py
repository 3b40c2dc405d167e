"""Sampling layer responses on the calibration images: what every data-driven fit shares.

A fit (ChannelPruning's least squares, LowRankDecomposition's response PCA, a tuner's or a ViT pass's
statistics) needs rows: a layer's output channels, and for least squares the input behind each output,
at a few random positions per image. Positions index a conv's flattened H x W output map (channels
first), or the tokens of a Linear's [B, ..., F] output (channels last; a [B, F] output has one).

    sampler = PositionSampler(sampled_pixels_per_img, count_images(batches), seed)
    pos = sampler.draw(out, fit_dim, channels_first)   # [B, k] per image, or None: every row
    Y = output_rows(out, pos, channels_first)          # [B * k, C_out]
    X = input_rows(module, x, pos)                     # [B * k, C_in * kh * kw]: row i of X gives row i of Y

`observe` and `hooked_pass` run the network for such a collection (eval mode, no gradients) and end the
pass as soon as the last layer of interest has run (`StopPass`); `stack_batches` joins the calibration
batches into the one batch a sequential pass needs. `positions_per_image` sizes the count so that the
fit is well posed; `warn_underdetermined` says where it was not.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._batches import TARGET_KEYS, dict_inputs
from .._warnings import warn_user
from ..errors import DataError
from ..graph.network import ReconstructedNetwork
from ..graph.untouched import training_mode

__all__ = ["StopPass", "PositionSampler", "positions_per_image", "available_positions", "output_rows", "input_rows",
           "conv_patches", "stack_batches", "count_images", "observe", "hooked_pass", "warn_underdetermined",
           "ROWS_PER_DIM", "MIN_POSITIONS_PER_IMAGE"]

#: sampled rows per dimension of a layer's fit (least squares: input dim; response covariance: output dim)
ROWS_PER_DIM = 16
#: automatic sampling never takes fewer positions per image than this (when the map has them)
MIN_POSITIONS_PER_IMAGE = 10

Inputs = Union[Sequence[Any], Mapping[str, Any]]
Observer = Callable[[Any, nn.Module, tuple, dict, Any], None]


class StopPass(Exception):
    """Raised from an observer or hook to end a forward pass: the layers after it are not needed."""


# ------------------------------------------------------------------------------------------------
# How many positions, and which


def positions_per_image(requested: Optional[int], fit_dim: int, n_images: int, available: int) -> int:
    """Output positions to sample per image for one layer.

    `requested` (the user's `sampled_pixels_per_img`) is honoured as given (capped at `available`, the
    positions the map has). None: enough for `ROWS_PER_DIM * fit_dim` rows over `n_images` images,
    at least `MIN_POSITIONS_PER_IMAGE`, at most `available`.
    """
    available = max(1, int(available))
    if requested is not None:
        return min(int(requested), available)
    need = math.ceil(ROWS_PER_DIM * max(1, int(fit_dim)) / max(1, int(n_images)))
    return max(1, min(available, max(MIN_POSITIONS_PER_IMAGE, need)))


def available_positions(out: torch.Tensor, channels_first: bool) -> int:
    """Positions per image a layer's output offers: H*W of a conv map, T of a [B, T, F] Linear output."""
    if channels_first:
        return int(np.prod(out.shape[2:], dtype=np.int64))
    return int(np.prod(out.shape[1:-1], dtype=np.int64)) if out.dim() > 2 else 1


class PositionSampler:
    """Draws the positions each layer's fit samples, from one generator seeded by the compressor, so the
    same seed samples the same rows whatever the global RNG."""

    def __init__(self, requested: Optional[int], n_images: int, seed: int):
        self.requested = requested
        self.n_images = int(n_images)
        self.gen = torch.Generator().manual_seed(int(seed))

    def draw(self, out: torch.Tensor, fit_dim: int, channels_first: bool) -> Optional[torch.Tensor]:
        """Random positions of `out` per image, [B, k] (`positions_per_image` for a fit of `fit_dim`);
        None when a token output has no more than k tokens: every row is kept, in order."""
        per = available_positions(out, channels_first)
        k = positions_per_image(self.requested, fit_dim, self.n_images, per)
        if not channels_first and per <= k:
            return None
        return torch.argsort(torch.rand(out.shape[0], per, generator=self.gen), dim=1)[:, :k]


# ------------------------------------------------------------------------------------------------
# The rows at those positions


def output_rows(out: torch.Tensor, pos: Optional[torch.Tensor], channels_first: bool) -> torch.Tensor:
    """The output channels at `pos`, one row per (image, position), image-major: [B * k, C]."""
    if channels_first:
        flat = out.flatten(2)
        picked = flat.gather(2, pos.to(out.device).unsqueeze(1).expand(-1, out.shape[1], -1))
        return picked.permute(0, 2, 1).reshape(-1, out.shape[1])
    out3 = out.reshape(out.shape[0], -1, out.shape[-1])
    if pos is not None:
        out3 = out3.gather(1, pos.to(out.device).unsqueeze(-1).expand(-1, -1, out3.shape[-1]))
    return out3.reshape(-1, out3.shape[-1])


def input_rows(module: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    """What a Conv2d (its input patches) or a Linear (its input rows) multiplies to give the output rows
    at `pos`, in the order of `output_rows`."""
    if isinstance(module, nn.Conv2d):
        _, wo = conv_out_size(module, x.shape[-2], x.shape[-1])
        return conv_patches(module, x, pos.to(x.device), wo)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    if pos is not None:
        x3 = x3.gather(1, pos.to(x.device).unsqueeze(-1).expand(-1, -1, x3.shape[-1]))
    return x3.reshape(-1, x3.shape[-1])


def _pad_amounts(m: nn.Conv2d) -> Tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, string paddings included."""
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return 0, 0, 0, 0
        th, tw = dh * (kh - 1), dw * (kw - 1)  # "same"
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = m.padding
    return pw, pw, ph, ph


def conv_out_size(m: nn.Conv2d, h: int, w: int) -> Tuple[int, int]:
    left, right, top, bottom = _pad_amounts(m)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


def conv_patches(m: nn.Conv2d, x: torch.Tensor, pos: torch.Tensor, out_w: int) -> torch.Tensor:
    """Input patches of conv `m` at flat output positions `pos` [N, P] -> [N * P, C * kh * kw]."""
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    left, right, top, bottom = _pad_amounts(m)
    if left or right or top or bottom:
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    n, p = pos.shape
    oh, ow = pos // out_w, pos % out_w
    rows = (oh * sh).unsqueeze(-1) + torch.arange(kh, device=x.device) * dh  # [N, P, kh]
    cols = (ow * sw).unsqueeze(-1) + torch.arange(kw, device=x.device) * dw  # [N, P, kw]
    bi = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    patches = x[bi, :, rows.unsqueeze(-1), cols.unsqueeze(-2)]  # [N, P, kh, kw, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(n * p, -1)


# ------------------------------------------------------------------------------------------------
# The passes


def stack_batches(batches: Sequence[Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """The calibration batches as one batch (tensors joined along dim 0, other inputs from the first),
    for a pass that must see every image at once (a sequential fit, one hooked forward)."""
    first = batches[0]
    for i, x in enumerate(first):
        shapes = sorted({tuple(b[i].shape[1:]) for b in batches if isinstance(b[i], torch.Tensor)})
        if isinstance(x, torch.Tensor) and len(shapes) > 1:
            raise DataError(
                f"the calibration batches differ beyond the batch dimension (input {i}: shapes {shapes[:4]} after "
                "it), and this compressor fits on all of them at once: give batches of one size (text: pad to one "
                "length, e.g. tokenizer(..., padding='max_length', max_length=N, truncation=True))")
    return tuple(torch.cat([b[i] for b in batches]) if isinstance(first[i], torch.Tensor) else first[i]
                 for i in range(len(first)))


def count_images(batches: Iterable[Tuple[Any, ...]]) -> int:
    """Images in the calibration batches (the first input's batch dimension; 1 for a non-tensor input)."""
    return sum(int(b[0].shape[0]) if isinstance(b[0], torch.Tensor) and b[0].dim() else 1 for b in batches)


def observe(net: ReconstructedNetwork, batches: Iterable[Tuple[Any, ...]], observer: Observer,
            stop_after: Optional[str] = None) -> None:
    """Run `net` on each input tuple (or dict of keyword inputs) of `batches` in eval mode without
    gradients, calling `observer(node, module, args, kwargs, out)` after every node; each pass ends once
    node `stop_after` has been observed, or when the observer raises StopPass."""
    def watch(node: Any, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        observer(node, module, args, kwargs, out)
        if node.name == stop_after:
            raise StopPass

    with training_mode(net), torch.no_grad():
        for inputs in batches:
            args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
            try:
                net.run_observed(args, kwargs, watch)
            except StopPass:
                pass


#: keys under which a dict batch of a one-input (image) model holds that input
IMAGE_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")


def batch_inputs(batch: Any, net: Optional[ReconstructedNetwork] = None) -> Tuple[Any, ...]:
    """The model inputs of one loader batch, positional: `(x, labels)` -> `(x,)`, a tensor -> `(tensor,)`, a
    dict (a tokenizer's output, a Hugging Face collator's batch) -> `net`'s inputs by name, in its call order,
    so a text model sees its attention mask and not only its first input (keys in `TARGET_KEYS` are labels);
    without `net`, a dict gives the value of its image key."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],)
    if isinstance(batch, Mapping):
        names = net.input_names() if net else []
        if names and (len(names) > 1 or names[0] in batch):
            return _named_inputs(batch, names)
        for key in IMAGE_KEYS:
            if key in batch:
                return (batch[key],)
        if names:  # one input, under a name the batch does not use
            return _named_inputs(batch, names)
        raise DataError(f"cannot find the model input in a dict batch with keys {sorted(map(str, batch))}: put it "
                        f"under one of {list(IMAGE_KEYS)}, or yield (inputs, labels) tuples")
    raise DataError(f"cannot find the model input in a batch of type {type(batch).__name__}; "
                    "yield (inputs, labels) tuples, plain tensors or dicts of named inputs")


def example_from_batch(batch: Any, net: Any) -> Tuple[Tuple[Any, ...], Optional[dict]]:
    """What to trace `net` on from one loader batch, as `(args, kwargs)`: a plain module fed dicts of named
    inputs (a tokenizer's output) is traced by keyword, with the labels left out; anything else by position."""
    if isinstance(net, ReconstructedNetwork):
        return batch_inputs(batch, net), None
    params = _forward_parameters(net)
    if isinstance(batch, Mapping):
        named = dict_inputs(batch)
        if not any(k in batch for k in IMAGE_KEYS) or (len(named) > 1 and set(named) <= set(params)):
            return (), named  # a tokenizer's output, or every input of a multi-input forward by its name
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(batch, (list, tuple)) and len(required) > 1:
        raise DataError(f"{type(net).__name__}.forward takes {len(required)} inputs ({', '.join(required)}), but a "
                        "tuple batch is read as (inputs, labels, ...): yield dict batches with those names as keys "
                        f"({{{', '.join(repr(n) + ': ...' for n in required)}}}, labels under 'labels'), or pass "
                        "example_inputs=")
    return batch_inputs(batch), None


def _forward_parameters(net: Any) -> Mapping[str, inspect.Parameter]:
    """The named parameters of `net.forward` (empty where it has no readable signature)."""
    try:
        return inspect.signature(net.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return {}


def _named_inputs(batch: Mapping[str, Any], names: Sequence[Optional[str]]) -> Tuple[Any, ...]:
    missing = [n for n in names if n is not None and n not in batch]
    extra = sorted(str(k) for k in batch if k not in names and k not in TARGET_KEYS)
    if missing or extra or None in names:
        raise DataError(
            f"a dict batch feeds the network its inputs by name: it takes {[n for n in names if n]}, the batch "
            f"has {sorted(map(str, batch))}" + (f"; missing {missing}" if missing else "") +
            (f"; not inputs of the network {extra}" if extra else "") +
            ("; a positional argument was captured as a non-tensor, so yield (inputs, labels) tuples"
             if None in names else "") +
            ". Trace on a batch with the same keys (amc.trace(model, **batch)) or give batches with exactly "
            f"those keys (keys {sorted(TARGET_KEYS)} are read as labels and skipped)")
    return tuple(batch[n] for n in names)


def hooked_pass(net: ReconstructedNetwork, inputs: Inputs, hooks: Mapping[str, Callable[..., Any]],
                pre: bool = False) -> None:
    """One forward of `net` (eval mode, no gradients) on `inputs` (positional inputs, or a dict of keyword
    inputs) with `hooks[name]` as a forward hook (pre=True: forward pre-hook) of that layer's module; a
    forward hook's return value replaces the layer's output. The pass ends after the last hooked layer
    in graph order."""
    order = [n.name for n in net.layer_nodes if n.name in hooks]
    if not order:
        return

    def stopping(name: str) -> Callable[..., Any]:
        def hook(*args: Any) -> Any:
            result = hooks[name](*args)
            if name == order[-1]:
                raise StopPass
            return result
        return hook

    handles = []
    for name in order:
        module = net.module_of(name)
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(stopping(name)))
    try:
        with training_mode(net), torch.no_grad():
            net(**inputs) if isinstance(inputs, Mapping) else net(*inputs)
    except StopPass:
        pass
    finally:
        for h in handles:
            h.remove()


def warn_underdetermined(who: str, rows: Sequence[Tuple[str, int, int]], requested: Optional[int]) -> None:
    """One warning naming the layers whose fit got fewer sampled rows than its dimension.

    rows: (layer, sampled rows, fit dimension) for every layer that was fitted.
    """
    bad = [(n, r, d) for n, r, d in rows if r < d]
    if not bad:
        return
    shown = ", ".join(f"{n} ({r} rows for {d} unknowns per output)" for n, r, d in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    fix = (f"raise sampled_pixels_per_img (now {requested}) or pass None to size it per layer, or raise "
           "trainset_ratio" if requested is not None else "raise trainset_ratio (more calibration images)")
    warn_user(f"{who}: the fit of {len(bad)} layer(s) is under-determined: {shown}{more}; the ridge term "
              f"keeps it solvable but the result leans on it: {fix}")
