"""`untouched(model)`: whatever amc runs inside leaves the user's model exactly as it was.

Capture, counting and the compressors run real forward passes. On a model in train mode that updates
BatchNorm statistics and `num_batches_tracked`, and a train-mode dropout draws from the global RNG, so
without this a user who counts MACs in the middle of training would get silently different statistics
and a shifted random stream. Buffers are snapshotted and written back, `training` flags and every RNG
(torch CPU and CUDA, Python, NumPy) restored. Parameters are not copied (a forward under no_grad does
not change them); their version counters are checked so that an in-place change is reported, not hidden.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from .._warnings import warn_user
from .._modes import training_mode  # re-exported; it lives outside amc.graph so the trainers can use it

__all__ = ["untouched", "training_mode", "rng_state", "set_rng_state"]


def rng_state() -> Dict[str, Any]:
    """Every global random stream a forward pass or a data loader may draw from."""
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _unique_modules(models: Tuple[Any, ...]) -> List[nn.Module]:
    seen: Dict[int, nn.Module] = {}
    for model in models:
        if isinstance(model, nn.Module):
            for m in model.modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def untouched(*models: Any) -> Iterator[None]:
    """Restore buffers, `training` flags and RNG state of `models` on exit, whatever happened inside."""
    modules = _unique_modules(models)
    flags = [(m, m.training) for m in modules]
    buffers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    params: Dict[int, Tuple[str, torch.Tensor, int]] = {}
    for m in modules:
        for name, b in m.named_buffers(recurse=False):
            if b is not None and id(b) not in buffers:
                buffers[id(b)] = (b, b.detach().clone())
        for name, p in m.named_parameters(recurse=False):
            params.setdefault(id(p), (f"{type(m).__name__}.{name}", p, p._version))
    rng = rng_state()
    try:
        yield
    finally:
        set_rng_state(rng)
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers.values():
                if b.shape == saved.shape and b.dtype == saved.dtype:
                    b.copy_(saved)
        changed = [name for name, p, version in params.values() if p._version != version]
        if changed:
            warn_user(f"amc: the model's forward changed parameters in place ({changed[:5]}); amc cannot "
                      "undo that, so the model now differs from before the call")

