"""Calibration data for the data-driven compressors, drawn from the compressor's own seed.

Two guarantees the compressors build on:

- `seeded_rng(seed)`: the block runs with torch's CPU generator (and the compressor's CUDA device),
  numpy's and python's global RNGs seeded from `seed`, and the caller's states are restored after it.
  A DataLoader with ``shuffle=True`` and no generator of its own, random augmentations, or anything
  else that reads the global RNG therefore gives the same result for the same seed, whatever the
  caller's RNG state, and leaves that state as it was.
- `calibration_batches(loader, fraction, seed)`: the calibration images are a subset drawn with a
  `torch.Generator` seeded by `seed`. A map-style `DataLoader` is read through its dataset (so its
  own shuffle generator is never advanced, and the same arguments give the same images); any other
  iterable gives its first `ceil(fraction * len)` batches, read under `seeded_rng(seed)`.

Which positions of those images a layer's fit samples, and how many, is `amc.compressors.sampling`'s
job (`positions_per_image`, `warn_underdetermined` and their constants are re-exported here, their
earlier home).
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import DataError
from .sampling import MIN_POSITIONS_PER_IMAGE, ROWS_PER_DIM, positions_per_image, warn_underdetermined

__all__ = ["seeded_rng", "calibration_batches", "iter_calibration", "first_batch", "loader_len", "DEFAULT_SEED",
           "positions_per_image", "warn_underdetermined", "ROWS_PER_DIM", "MIN_POSITIONS_PER_IMAGE"]

#: the compressors' default `seed`
DEFAULT_SEED = 0


@contextlib.contextmanager
def seeded_rng(seed: int, device: Any = None) -> Iterator[None]:
    """Run the block with the global RNGs seeded from `seed`; restore the caller's states after."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" and torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(int(seed))
            for d in cuda:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(int(seed))
            random.seed(int(seed))
            np.random.seed(int(seed) % 2**32)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _map_style(loader: Any) -> bool:
    """A torch DataLoader over a sized, map-style dataset with a plain batch size (not a batch_sampler)."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return False
    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        return False
    try:
        return len(ds) > 0  # type: ignore[arg-type]
    except TypeError:
        return False


def check_loader(loader: Any, what: str) -> None:
    """`loader` is None or an iterable of batches (a DataLoader, a list); text and numbers are refused here,
    not as a TypeError wherever the loader is first iterated."""
    if loader is not None and (isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable)):
        raise DataError(f"{what} must be an iterable of batches (a DataLoader), got {type(loader).__name__}")


def loader_len(loader: Iterable) -> Optional[int]:
    """len(loader), or None for an iterable without one."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _subset_loader(loader: DataLoader, k: int, seed: int) -> DataLoader:
    """A loader over `k` images of `loader.dataset` drawn with `seed`."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    k = max(1, min(n, int(k)))
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:k].sort().values.tolist()
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=idx, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if loader.num_workers else None,
                      generator=torch.Generator().manual_seed(int(seed)))


def iter_calibration(loader: Iterable, fraction: float, seed: int, max_batches: Optional[int] = None
                     ) -> Iterator[Any]:
    """The raw calibration batches of `loader` (see the module docstring); call under `seeded_rng`.

    `fraction` of the images (of the batches, for a loader without a map-style dataset), or, with
    `max_batches`, that many batches' worth of images.
    """
    if _map_style(loader):
        n = len(loader.dataset)  # type: ignore[union-attr]
        k = math.ceil(fraction * n - 1e-9) if max_batches is None else max_batches * loader.batch_size  # type: ignore[union-attr]
        yield from _subset_loader(loader, k, seed)  # type: ignore[arg-type]
        return
    n = loader_len(loader)
    limit = max(1, math.ceil(fraction * n - 1e-9)) if n else None
    if max_batches is not None:
        limit = max(1, int(max_batches))
    for i, batch in enumerate(loader):
        yield batch
        if limit is not None and i + 1 >= limit:
            return


def calibration_batches(loader: Iterable, fraction: float, seed: int, inputs_of: Any, device: Any = None
                        ) -> List[Tuple[Any, ...]]:
    """Model inputs (`inputs_of(batch)`, moved to `device`) of the calibration subset of `loader`."""
    out: List[Tuple[Any, ...]] = []
    with seeded_rng(seed, device):
        for batch in iter_calibration(loader, fraction, seed):
            out.append(tuple(x.to(device) if isinstance(x, torch.Tensor) and device is not None else x
                             for x in inputs_of(batch)))
    if not out:
        raise DataError("trainloader yielded no batches for calibration")
    return out


def first_batch(loader: Iterable, seed: int, device: Any = None) -> Optional[Any]:
    """The first calibration batch (used to trace), read without touching the caller's RNG; None if empty."""
    with seeded_rng(seed, device):
        for batch in iter_calibration(loader, 1.0, seed):
            return batch
    return None
