"""Checkpoint files for the trainers: atomic writes, and the RNG state that makes a resume exact.

A crash must never leave a half-written ``last.pth``, so every write goes to a temp file in the same
directory and is moved into place with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Optional, Union

import numpy as np
import torch

from amc.errors import LoadError

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
FORMAT = "amc.trainer/1"

PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file beside ``path`` then ``os.replace``: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: PathLike, map_location: Any = "cpu", trusted: bool = False) -> dict:
    """Read a trainer checkpoint, turning a missing, corrupt or code-carrying file into a LoadError.

    `trusted=True` unpickles anything (runs code from the file): only for files you wrote.
    """
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint {str(path)!r} does not exist; pass resume=True to use "
                        f"'<checkpoints_folder>/{LAST_NAME}' or give the path of an existing checkpoint")
    try:
        # weights_only: a checkpoint is tensors, numbers and containers (RNG states are stored as such),
        # so a file that names any other global is refused before anything in it runs.
        state = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower() or "unrecognized function" in str(exc):
            raise LoadError(f"checkpoint {str(path)!r} refused: it names code to run on load ({str(exc)[:160]}). "
                            "amc checkpoints never do; pass trusted=True only for a file you wrote") from exc
        raise LoadError(f"checkpoint {str(path)!r} is unreadable ({exc}); it may be truncated or "
                        f"foreign - delete it or resume from '{BEST_NAME}' instead") from exc
    except Exception as exc:  # torch raises many types for truncated files
        raise LoadError(f"checkpoint {str(path)!r} is unreadable ({exc}); it may be truncated or "
                        f"foreign - delete it or resume from '{BEST_NAME}' instead") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LoadError(f"checkpoint {str(path)!r} was not written by an amc trainer "
                        f"(expected format {FORMAT!r}); load weights with torch.load instead")
    return state


def loader_generators(*loaders: Any) -> List[torch.Generator]:
    """The explicit ``torch.Generator``s a DataLoader's shuffling uses (global RNG covers the rest)."""
    found: List[torch.Generator] = []
    for loader in loaders:
        if loader is None:
            continue
        candidates = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
        batch_sampler = getattr(loader, "batch_sampler", None)
        candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
        for gen in candidates:
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
    return found


def capture_rng_state(generators: Iterable[torch.Generator] = ()) -> dict:
    """Every RNG that decides shuffling, dropout and augmentation, so a resumed epoch replays exactly."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: Iterable[torch.Generator] = ()) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    generators = list(generators)
    saved = state.get("generators", [])
    for gen, gen_state in zip(generators, saved):
        gen.set_state(gen_state.cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _numpy_state_as_tensors(state: tuple) -> tuple:
    """numpy's MT19937 state with its key array as a tensor, so weights_only loading can read it."""
    name, keys, pos, has_gauss, gauss = state
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))


def _numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (name, keys.astype(np.uint32), pos, has_gauss, gauss)


def resolve_resume_path(resume: Any, folder: Optional[PathLike]) -> Optional[Path]:
    """``True`` means ``<folder>/last.pth`` (None when absent: a fresh start); a path must exist."""
    if resume is None or resume is False:
        return None
    if resume is True:
        if folder is None:
            raise LoadError("resume=True needs checkpoints_folder to find 'last.pth'; pass "
                            "checkpoints_folder=... or resume='<path to checkpoint>'")
        path = Path(folder) / LAST_NAME
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise LoadError(f"resume={str(resume)!r}: no such checkpoint file; pass resume=True to use "
                        f"'<checkpoints_folder>/{LAST_NAME}' or an existing file")
    return path
