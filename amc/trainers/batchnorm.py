"""Re-estimate BatchNorm statistics after channels were silenced or removed.

Pruning (soft or hard) changes what every later BatchNorm sees, while its running mean and variance
still describe the network before the edit; one pass over training images fixes them without
touching a weight (seed 004's pitfall for SFP, and a cheap step before any fine-tuning).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .._copying import copy_module
from .._batches import call_with, dict_inputs, to_device
from ..errors import DataError


@torch.no_grad()
def recalibrate_bn(net: nn.Module, loader: Iterable[Any], max_batches: Optional[int] = None,
                   copy: bool = True) -> nn.Module:
    """``net`` (a copy unless ``copy=False``) with fresh, cumulative BatchNorm running statistics.

    The batches' first element is the input; labels are ignored and no weight changes. Returns the
    network in eval mode. Raises DataError on an empty loader.
    """
    if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):  # trainers stay off compressors
        raise DataError(f"recalibrate_bn needs an iterable of batches (a DataLoader), got {type(loader).__name__}")
    net = copy_module(net) if copy else net
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    net.train()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            inputs = dict_inputs(batch) if isinstance(batch, Mapping) else \
                batch[0] if isinstance(batch, (tuple, list)) else batch  # named inputs (a collator's dict) or x
            call_with(net, to_device(inputs, device))
            seen += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        net.eval()
    if seen == 0:
        raise DataError("recalibrate_bn: the loader yielded no batches; pass a DataLoader over training images")
    return net
