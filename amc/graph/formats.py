"""File formats of a ReconstructedNetwork: its save/load methods find the writers and readers here.

Data flows one way, graph -> export (see the design's flow), so nothing under amc.graph imports
amc.export: amc.export registers its formats when it is imported. The first lookup imports the
packages the root package names in `amc.FORMAT_PROVIDERS`, so `net.save(...)` works after any
import of amc while `import amc` itself stays free of torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Callable, Dict, Optional

from .. import FORMAT_PROVIDERS
from ..errors import ExportError

if TYPE_CHECKING:
    from .network import ReconstructedNetwork

__all__ = ["FileFormat", "register_format", "file_format"]


@dataclass(frozen=True)
class FileFormat:
    """`save(net, path, ...) -> path` writes a network; `load(path, ...) -> network` reads one back."""

    save: Optional[Callable[..., str]] = None
    load: Optional[Callable[..., ReconstructedNetwork]] = None


_FORMATS: Dict[str, FileFormat] = {}


def register_format(name: str, save: Optional[Callable[..., str]] = None,
                    load: Optional[Callable[..., ReconstructedNetwork]] = None) -> None:
    """Make `name` a format of ReconstructedNetwork (the later registration of a name wins, with a warning)."""
    if name in _FORMATS:
        warnings.warn(f"amc: file format {name!r} overwritten", stacklevel=2)
    _FORMATS[name] = FileFormat(save=save, load=load)


def file_format(name: str) -> FileFormat:
    """The registered format `name`, importing the format providers first if it is not known yet."""
    if name not in _FORMATS:
        for provider in FORMAT_PROVIDERS:
            import_module(provider)
    if name not in _FORMATS:
        raise ExportError(f"no file format {name!r} is registered (known: {sorted(_FORMATS)}); register one "
                          "with amc.graph.formats.register_format")
    return _FORMATS[name]
