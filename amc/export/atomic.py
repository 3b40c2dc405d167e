"""Atomic file writes: every amc writer goes through here, so a crash never leaves half a file.

The data goes to a temporary file in the destination's directory (same filesystem, so the final
`os.replace` is atomic); the temporary file is removed when anything fails, and the previous file at the
destination stays untouched until the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would have given; mkstemp makes 0600 files


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def previous_path(dest: PathLike) -> str:
    """Where `atomic_paths` keeps the previous version of a file of a group while the group is renamed."""
    dest = os.path.abspath(os.fspath(dest))
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.prev")


def _keep_previous(dest: str) -> None:
    if not os.path.isfile(dest):
        return
    backup = previous_path(dest)
    _remove(backup)
    try:
        os.link(dest, backup)  # free and instant; the rename below then leaves the old data here
    except OSError:
        import shutil

        shutil.copy2(dest, backup)


@contextlib.contextmanager
def atomic_paths(*paths: PathLike) -> Iterator[List[str]]:
    """Yield one temporary path per destination; on success move them all into place.

    Use it for writers that take a path (safetensors, onnx) and for files that belong together
    (a JSON description and its weights sidecar): all temporaries are complete before the first
    rename, and on failure none of the destinations is touched. A group's renames are not one atomic
    step, so for a group the previous version of every file but the last is kept at `previous_path`
    until the last rename is done: a process killed between two renames leaves the old description with
    its old weights still readable (the JSON loader looks there when the sidecar's checksum differs).
    """
    dests = [os.path.abspath(os.fspath(p)) for p in paths]
    temps: List[str] = []
    try:
        for dest in dests:
            directory = os.path.dirname(dest)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temps.append(tmp)
        yield list(temps)
        for tmp in temps:
            _fsync(tmp)
            with contextlib.suppress(OSError):
                os.chmod(tmp, _FILE_MODE)
        group = len(dests) > 1
        if group:
            for dest in dests[:-1]:
                _keep_previous(dest)
        for tmp, dest in zip(temps, dests):
            os.replace(tmp, dest)
        if group:
            for dest in dests[:-1]:
                _remove(previous_path(dest))
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """One temporary path that replaces `path` when the block finishes without an exception."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: Union[str, None] = None) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` once the block has finished writing."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write only writes (mode 'w' or 'wb'), got mode {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
