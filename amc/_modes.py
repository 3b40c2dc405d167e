"""`training_mode(model)`: switch train/eval for a block and give every submodule its own flag back.

It lives outside amc.graph because the trainers use it and know nothing of the graph; amc.graph.untouched
re-exports it for everyone else.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["training_mode"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """`model.train(training)` inside; on exit every submodule gets back its own flag.

    The one place for the save-switch-restore of `training` flags: restoring with `model.train(was)`
    would overwrite submodules the user deliberately kept in the other mode (a frozen BatchNorm)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
