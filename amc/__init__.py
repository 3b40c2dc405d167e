"""amc: Auto Model Compressor.

Public API (see README): ``amc.trace``, ``amc.count``, ``amc.count_bytes``, ``amc.prune``, ``amc.prune_groups``,
``amc.ReconstructedNetwork``, ``amc.load``; compressors, tuners and trainers live in their subpackages.
Attributes and subpackages (``amc.compressors``, ``amc.trainers``, ...) are imported lazily on first
access, so ``import amc`` stays cheap and ``amc.compressors.ChannelPruning`` works without importing
the subpackage first.
"""
from importlib import import_module
from typing import Any, List

from .version import __version__

_LAZY = {
    "trace": "amc.graph.capture",
    "ReconstructedNetwork": "amc.graph.network",
    "load": "amc.graph.network",
    "count": "amc.graph.counting",
    "count_bytes": "amc.graph.counting",
    "fuse_attention": "amc.graph.fuse",
    "prune": "amc.compressors.prune",
    "prune_groups": "amc.compressors.prune",
    "latency_table": "amc.compressors.latency",
    "register_op": "amc.graph.ops",
}

#: Packages that register ReconstructedNetwork's file formats (``amc.graph.formats``) when imported.
#: The registry imports them on its first lookup: amc.graph never imports amc.export, and ``import amc``
#: stays cheap, yet ``net.save(...)`` works whatever was imported before.
FORMAT_PROVIDERS = ("amc.export",)

#: Subpackages and modules reachable as attributes of ``amc`` without an explicit import.
_SUBMODULES = ("compressors", "data", "errors", "export", "graph", "jobs", "models", "trainers", "tuners", "cli")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"amc.{name}")  # the import also binds it on this module
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amc' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = ["__version__", *_LAZY, "errors"]
