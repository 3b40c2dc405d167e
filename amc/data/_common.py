"""Helpers shared by the tensor-backed datasets (digits, Fashion-MNIST): resize, channels, loaders."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import DataError


def prepare_images(
    images: torch.Tensor,
    mean: float,
    std: float,
    image_size: Optional[int],
    channels: int,
) -> torch.Tensor:
    """Turn ``[N, H, W]`` floats in [0, 1] into normalised ``[N, channels, S, S]`` float32.

    Resizing happens before normalising so bilinear interpolation works on the [0, 1] pixels; the
    channel repeat lets 3-channel models (ImageNet-style stems) run on grey-scale data unchanged.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    x = images.to(torch.float32).unsqueeze(1)
    if image_size is not None:
        if int(image_size) < 1:
            raise DataError(f"image_size must be a positive int or None, got {image_size!r}")
        size = int(image_size)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - mean) / std
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling comes from its own seeded generator (global RNG untouched)."""
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("dataset is empty: nothing to load (check the split sizes / limits)")
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        generator=generator,
        num_workers=int(num_workers),
        drop_last=False,
    )


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """``TensorDataset`` with int64 labels, the dtype ``cross_entropy`` wants."""
    return TensorDataset(x, y.to(torch.int64))


def check_limit(name: str, limit: Optional[int], available: int) -> int:
    """Validate a ``*_limit`` argument and return how many samples to keep."""
    if limit is None:
        return available
    if int(limit) < 1:
        raise DataError(f"{name} must be a positive int or None, got {limit!r}")
    return min(int(limit), available)


def split_sizes(n: int, val_fraction: float) -> Tuple[int, int]:
    """Train/val sizes for a fraction, refusing splits that leave either side empty."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = int(round(n * float(val_fraction)))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_fraction={val_fraction} leaves an empty split of {n} samples")
    return n - n_val, n_val
