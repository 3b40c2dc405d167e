"""TensorBoard scalars and tqdm bars for the trainers, silenced on every rank but 0.

Accepts the seed's ``tbx_writer`` (a ``tensorboardX.SummaryWriter``) or a log-dir path; a path is
opened lazily and only on rank 0, so workers of a torchrun job never create event files.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Union

from tqdm.auto import tqdm

log = logging.getLogger("amc.trainers")


class ScalarLogger:
    """Writes ``<prefix>/<name>`` scalars to TensorBoard; a no-op when disabled or without a writer."""

    def __init__(self, writer: Union[None, str, "os.PathLike[str]", Any], enabled: bool = True) -> None:
        self._enabled = enabled and writer is not None
        self._path = os.fspath(writer) if isinstance(writer, (str, os.PathLike)) else None
        self._writer = None if self._path is not None else writer
        self._owns = self._path is not None

    @property
    def writer(self) -> Optional[Any]:
        """The SummaryWriter (created on first use when a path was given), or None when not logging."""
        if not self._enabled:
            return None
        if self._writer is None and self._path is not None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(log_dir=self._path)
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        writer = self.writer
        if writer is not None and value is not None and math.isfinite(float(value)):
            writer.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        if self._enabled and self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close only writers we opened; a writer the caller passed in stays theirs."""
        if self._writer is not None:
            self._writer.flush()
            if self._owns:
                self._writer.close()
                self._writer = None


def progress(iterable: Iterable, desc: str, enabled: bool, total: Optional[int] = None) -> tqdm:
    """A tqdm bar; ``disable=None`` lets tqdm hide itself when stderr is not a terminal (CI logs)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False, dynamic_ncols=True)
