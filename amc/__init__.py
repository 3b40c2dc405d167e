"""amc: Auto Model Compressor.

Public API (see README): ``amc.trace``, ``amc.count``, ``amc.prune``, ``amc.prune_groups``,
``amc.ReconstructedNetwork``; compressors, tuners and trainers live in their subpackages.
Attributes are imported lazily so ``import amc`` stays cheap and subpackages stay independent.
"""
from importlib import import_module

from .version import __version__

_LAZY = {
    "trace": "amc.graph.capture",
    "ReconstructedNetwork": "amc.graph.network",
    "count": "amc.graph.counting",
    "prune": "amc.compressors.prune",
    "prune_groups": "amc.compressors.prune",
    "errors": "amc.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if name == "errors" else getattr(module, name)
    raise AttributeError(f"module 'amc' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
