"""Save a ReconstructedNetwork as a `.pkl` (torch.save of the whole object) and load it back.

This is the exact, complete path: every module, custom autograd Function and fallback op survives,
because the file is a pickle. That also means **loading a .pkl runs code named in the file**: only
load files you trust. For files from elsewhere use `amc.export.json_io` (JSON + safetensors), which
rebuilds the network from an allowlist and never unpickles anything.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from ..errors import ExportError, LoadError
from ..version import __version__
from .atomic import atomic_write

FORMAT = "amc.ReconstructedNetwork/pkl"
VERSION = 1


def save_pkl(net: "ReconstructedNetwork", path: str) -> str:  # noqa: F821
    """Write `net` to `path` (atomically) with a small header marking the file as ours; returns `path`."""
    from ..graph.network import ReconstructedNetwork

    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"save_pkl expects a ReconstructedNetwork, got {type(net).__name__}; "
                          "trace the model first: net = amc.trace(model, example_input)")
    payload = {"format": FORMAT, "version": VERSION, "amc_version": __version__,
               "torch_version": torch.__version__, "network": net}
    path = os.fspath(path)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot pickle the network to {path!r}: {type(exc).__name__}: {exc}. A module or "
                          "node template holds an object pickle cannot store (a lambda or local class?)") from exc
    return path


def load_pkl(path: str, map_location: Any = "cpu") -> "ReconstructedNetwork":  # noqa: F821
    """Load a network written by `save_pkl`. Unpickles code: only for files you trust (see module doc)."""
    from ..graph.network import ReconstructedNetwork

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"cannot load {path!r}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ImportError, ModuleNotFoundError, IndexError, KeyError) as exc:
        raise LoadError(f"cannot load {path!r}: the file is truncated, corrupt or not a torch file "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if isinstance(obj, ReconstructedNetwork):  # a bare torch.save(net): unambiguous, accept it
        net = obj
    elif isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise LoadError(f"cannot load {path!r}: amc pkl format version {obj.get('version')!r}, this amc "
                            f"({__version__}) reads version {VERSION}")
        net = obj.get("network")
        if not isinstance(net, ReconstructedNetwork):
            raise LoadError(f"cannot load {path!r}: the amc header is there but the payload is "
                            f"{type(net).__name__}, not a ReconstructedNetwork")
    else:
        what = type(obj).__name__
        if isinstance(obj, dict):
            what += f" with keys {sorted(map(str, obj))[:5]}"
        raise LoadError(f"cannot load {path!r}: not an amc network file (found a {what}); save one with "
                        "net.save(path) / amc.export.pkl.save_pkl")
    try:
        net.lint()
    except Exception as exc:  # noqa: BLE001 - reported as a load problem with the file named
        raise LoadError(f"cannot load {path!r}: the stored network is inconsistent: {exc}") from exc
    return net
