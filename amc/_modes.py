"""`training_mode(model)`: switch train/eval for a block and give every submodule its own flag back;
`outside_inference_mode(fn)`: what amc builds stays trainable when made inside `torch.inference_mode()`.

It lives outside amc.graph because the trainers use it and know nothing of the graph; amc.graph.untouched
re-exports it for everyone else.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.nn as nn

__all__ = ["training_mode", "outside_inference_mode"]

F = TypeVar("F", bound=Callable[..., Any])


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


def _normal(value: Any) -> Any:
    """Inference tensors (made under `torch.inference_mode()`) as normal ones; containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_normal(v) for v in value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def outside_inference_mode(fn: F) -> F:
    """Run `fn` with inference mode off and its tensor arguments made normal. A network amc builds (traced,
    pruned, copied, loaded) must train afterwards, and weights made inside the caller's
    `torch.inference_mode()` block could not ("Inference tensors cannot be saved for backward")."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*_normal(args), **{k: _normal(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]
