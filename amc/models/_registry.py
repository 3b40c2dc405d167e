"""Name -> constructor registry for the model zoo (timm's ``_registry.py`` shape, much smaller).

Adding a model is one decorated function; tests and benchmarks walk :func:`list_models`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, TypeVar

import torch.nn as nn

from ..errors import AmcError

F = TypeVar("F", bound=Callable[..., nn.Module])


class ModelArgumentError(AmcError, TypeError):
    """A registered model given an argument its constructor does not take, or a size below 1."""


class UnknownModelError(AmcError, KeyError):
    """``create`` was asked for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelEntry:
    """A registered constructor and the input it was designed for (C is overridable via in_channels)."""

    name: str
    fn: Callable[..., nn.Module]
    input_size: Tuple[int, int, int]
    description: str


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: str, input_size: Tuple[int, int, int] = (1, 28, 28)) -> Callable[[F], F]:
    """Decorator registering ``fn(num_classes, in_channels, **kw) -> nn.Module`` under ``name``.

    Re-registering a name replaces it with a warning, so notebooks can redefine a model.
    """

    def deco(fn: F) -> F:
        if name in _REGISTRY:
            warnings.warn(f"model {name!r} is already registered; overwriting it with {fn.__qualname__}", stacklevel=2)
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(name, fn, tuple(input_size), doc[0] if doc else "")
        return fn

    return deco


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        ) from None


def create(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build the registered model ``name``; extra keyword arguments go to its constructor."""
    import inspect

    entry = _entry(name)
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelArgumentError(f"{what} must be an int >= 1, got {value!r}")
    params = inspect.signature(entry.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            extra = sorted(set(params) - {"num_classes", "in_channels"})
            raise ModelArgumentError(f"model {name!r} takes no argument(s) {unknown}; besides num_classes and "
                                     f"in_channels it takes {extra if extra else 'nothing'}")
    return entry.fn(num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_models() -> List[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelEntry:
    """The registry entry of ``name``: its intended ``input_size`` (C, H, W) and a one-line description."""
    return _entry(name)
