"""Copies of a user's module, for the compressors, trainers and tuners that must leave it untouched."""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn as nn


def copy_module(m: nn.Module) -> nn.Module:
    """`copy.deepcopy(m)`, also where a forward pre-hook computed a weight under grad
    (torch.nn.utils.prune, the older weight_norm): that weight is a non-leaf tensor, which deepcopy
    refuses, so it is copied detached (the module's next call recomputes it anyway)."""
    memo: Dict[int, Any] = {}
    for mod in m.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(m, memo)
