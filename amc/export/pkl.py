"""Save a ReconstructedNetwork as a `.pkl` (torch.save of the whole object) and load it back.

This is the exact, complete path: every module and op survives. Loading is safe by default: the file
is read by torch's `weights_only` unpickler, which only builds objects of allowlisted classes and only
calls allowlisted functions, and the allowlist is what an amc network is made of (amc's graph classes,
`torch.nn` / `torchvision.ops` module classes, the torch functions the op registry knows). A file that
names anything else is refused with a `LoadError` naming that global, before anything from it runs.
`trusted=True` restores plain unpickling (it runs code from the file) for networks holding custom
classes or autograd Functions of your own.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .._modes import outside_inference_mode
from ..errors import ExportError, LoadError
from ..graph import node, ops, reparam, template
from ..graph.network import ReconstructedNetwork
from ..graph.ops import STRICT_CALLABLE_NAMES, FunctionOp, GetAttr, name_of_callable
from ..version import __version__
from .atomic import atomic_write
from .json_io import callable_problem, check_runs, class_path, registered_json_classes

FORMAT = "amc.ReconstructedNetwork/pkl"
VERSION = 1


def save_pkl(net: ReconstructedNetwork, path: str) -> str:
    """Write `net` to `path` (atomically) with a small header marking the file as ours; returns `path`."""
    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"save_pkl expects a ReconstructedNetwork, got {type(net).__name__}; "
                          "trace the model first: net = amc.trace(model, example_input)")
    path = os.fspath(path)
    for name, module in net.named_modules():
        how = reparam.computed_by(module)
        if how:
            raise ExportError(f"module {name!r} computes its weights by {how}, which pickle cannot store; remove it "
                              "first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')) or "
                              "save a state_dict")
    try:
        with reparam.stripped(net) as weight_norms, atomic_write(path, "wb") as f:
            payload = {"format": FORMAT, "version": VERSION, "amc_version": __version__,
                       "torch_version": torch.__version__, "network": net, "weight_norms": weight_norms}
            torch.save(payload, f)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ExportError(f"cannot pickle the network to {path!r}: {type(exc).__name__}: {exc}. A module or "
                          "node template holds an object pickle cannot store (a lambda or local class?)") from exc
    return path


@outside_inference_mode
def load_pkl(path: str, map_location: Any = "cpu", trusted: bool = False) -> ReconstructedNetwork:
    """Load a network written by `save_pkl`; refuses files naming code outside the allowlist.

    `trusted=True` unpickles anything, which **runs code from the file**: only for your own files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"cannot load {path!r}: no such file")
    obj = _torch_load(path, map_location, trusted)
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
    if not trusted:
        _check_inert(net, path)
    if isinstance(obj, dict) and obj.get("weight_norms"):
        try:
            reparam.restore(net, obj["weight_norms"])
        except Exception as exc:  # noqa: BLE001 - a malformed spec is a malformed file
            raise LoadError(f"cannot load {path!r}: its weight norms do not fit the network "
                            f"({type(exc).__name__}: {exc})") from exc
    try:
        net.lint()
    except Exception as exc:  # noqa: BLE001 - reported as a load problem with the file named
        raise LoadError(f"cannot load {path!r}: the stored network is inconsistent: {exc}") from exc
    check_runs(path, net)  # a corrupted pickle can still unpickle into a network that does not run
    return net


# ----------------------------------------------------------------------------------------------
# The safe path: torch's weights_only unpickler with the globals an amc network is made of.

_CORRUPT = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ImportError, IndexError, KeyError, TypeError, UnicodeDecodeError, MemoryError,
            struct.error)
_SAFE_BUILTINS = {"int", "float", "complex", "bool", "str", "bytes", "bytearray", "slice", "Ellipsis",
                  "set", "frozenset", "range", "tuple", "list", "dict", "NotImplemented"}
_SAFE_CLASS_PACKAGES = ("torch.nn.", "torchvision.ops.")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|unrecognized function ([^\s]+)|got <class '([\w.]+)'>")


def _torch_load(path: str, map_location: Any, trusted: bool) -> Any:
    if trusted:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except _CORRUPT as exc:
            raise _corrupt(path, exc) from exc
    allowed = _allowed_globals_of(path)
    with _strict_names(), torch.serialization.safe_globals(allowed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except LoadError as exc:  # an op callable named in the file that amc will not resolve
            raise LoadError(f"refusing to load {path!r}: {exc}. If you wrote this file yourself, load it with "
                            "trusted=True (that runs code from the file)") from exc
        except pickle.UnpicklingError as exc:
            found = _REFUSED_GLOBAL.search(str(exc))
            if found and "Unsupported global" in str(exc) or "unrecognized function" in str(exc) \
                    or "Can only" in str(exc):
                name = next((g for g in found.groups() if g), "?") if found else "?"
                raise _refused(path, name) from exc
            raise _corrupt(path, exc) from exc
        except _CORRUPT as exc:
            raise _corrupt(path, exc) from exc


def _allowed_globals_of(path: str) -> List[Tuple[Any, str]]:
    """Every global the file names, resolved through amc's allowlist; the first other one is refused."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except _CORRUPT as exc:  # e.g. BadZipFile for a "multi-disk" header
        raise _corrupt(path, exc) from exc
    if not is_zip:
        return []  # legacy/plain pickles: the weights_only unpickler refuses any global not allowed by default
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except _CORRUPT as exc:
        raise _corrupt(path, exc) from exc
    allowed = []
    for full in sorted(names):
        obj = allowed_global(full)
        if obj is None:
            raise _refused(path, full)
        allowed.append((obj, full))
    return allowed


def allowed_global(full: str) -> Optional[Any]:
    """The object `module.qualname` names if an amc network may hold it, else None. Never imports."""
    module, _, name = full.partition(".") if full.startswith("builtins.") else (None, None, None)
    if module == "builtins":
        return getattr(builtins, name) if name in _SAFE_BUILTINS else None
    from ..graph.known_leaves import register_known

    register_known(full)  # a known leaf class (timm's DropPath) registers, as in the process that saved
    amc = _amc_classes()
    if full in amc:
        return amc[full]
    if full == "torch.torch_version.TorchVersion":
        return torch.torch_version.TorchVersion
    if full == "collections.OrderedDict":
        import collections

        return collections.OrderedDict
    obj = _already_imported(full)
    if obj is None:
        return None
    if isinstance(obj, type):
        return obj if issubclass(obj, nn.Module) and full.startswith(_SAFE_CLASS_PACKAGES) else None
    return obj if _callable_allowed(obj) else None


def _callable_allowed(fn: Any) -> bool:
    name = name_of_callable(fn)
    return name is not None and not name.endswith(".apply") and callable_problem(name, fn) is None


def _already_imported(full: str) -> Optional[Any]:
    """Resolve a dotted path from modules torch/torchvision already imported (so no import side effects)."""
    if not full.startswith(("torch.", "torchvision.", "operator.", "math.")):
        return None
    parts = full.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = sys.modules.get(".".join(parts[:i]))
        if mod is None:
            continue
        obj: Any = mod
        for p in parts[i:]:
            if p.startswith("__") and p.endswith("__"):
                return None
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return obj
    return None


def _amc_classes() -> Dict[str, type]:
    from ..compressors import apply

    classes = [ReconstructedNetwork, node.Node, node.InputNode, template.Ref, template.MappingTemplate,
               *apply.SOFT_MODULES, *registered_json_classes()]
    classes += [c for c in vars(ops).values()
                if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == ops.__name__]
    return {class_path(c): c for c in classes}


@contextlib.contextmanager
def _strict_names() -> Iterator[None]:
    token = STRICT_CALLABLE_NAMES.set(True)
    try:
        yield
    finally:
        STRICT_CALLABLE_NAMES.reset(token)


def _check_inert(net: nn.Module, path: str) -> None:
    """What allowlisted classes could still carry: hooks, replaced forwards, non-torch op callables."""
    for name, module in net.named_modules():
        where = f"module {name or '<root>'!r} ({type(module).__name__})"
        if any(getattr(module, h, None) for h in _HOOK_DICTS):
            raise LoadError(f"refusing to load {path!r}: {where} carries hooks; amc files never do. Load "
                            "files you wrote yourself with trusted=True")
        if "forward" in vars(module):
            raise LoadError(f"refusing to load {path!r}: {where} replaces its forward method")
        if isinstance(module, FunctionOp) and not _callable_allowed(module.fn):
            raise LoadError(f"refusing to load {path!r}: {where} calls {module.fn_name or module.fn!r}, which is "
                            "not an allowlisted torch function; load with trusted=True if you wrote this file")
        if isinstance(module, GetAttr) and (not isinstance(module.attr, str) or module.attr.startswith("_")):
            raise LoadError(f"refusing to load {path!r}: {where} reads attribute {module.attr!r}")


def _refused(path: str, name: str) -> LoadError:
    return LoadError(f"refusing to load {path!r}: it names the global {name!r}, which is not part of an amc "
                     "network (amc graph classes, torch.nn / torchvision.ops modules, registered torch "
                     "functions); nothing from the file was run. If you wrote the file yourself and it holds "
                     "custom classes, load it with trusted=True (that runs code from the file)")


def _corrupt(path: str, exc: BaseException) -> LoadError:
    return LoadError(f"cannot load {path!r}: the file is truncated, corrupt or not a torch file "
                     f"({type(exc).__name__}: {str(exc)[:200]})")
