"""scikit-learn's bundled 8x8 digits: the zero-set-up real dataset used by the main job and tests.

1,797 images ship inside scikit-learn, so this needs no files and no network, yet it is a real
classification task (10 classes) on which a small CNN reaches ~98% in seconds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import DataError
from ._common import make_loader, prepare_images, split_sizes, tensor_dataset

DIGITS_NUM_CLASSES = 10


def _load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # pixel values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise DataError(f"sklearn load_digits returned unexpected shapes {images.shape}, {labels.shape}")
    return images, labels


def digits_datasets(
    image_size: Optional[int] = None,
    channels: int = 1,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Tuple[TensorDataset, TensorDataset]:
    """Stratified, seeded train/val ``TensorDataset`` pair of the digits.

    Pixels are scaled to [0, 1], optionally resized (bilinear) and repeated to 3 channels, then
    normalised with the *training* split's mean/std so validation never leaks into preprocessing.
    """
    from sklearn.model_selection import train_test_split

    images, labels = _load_digits_arrays()
    _, n_val = split_sizes(len(labels), val_fraction)
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        idx, test_size=n_val, stratify=labels, random_state=int(seed), shuffle=True
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    out = []
    for part in (train_idx, val_idx):
        x = prepare_images(torch.from_numpy(images[part]), mean, std, image_size, channels)
        out.append(tensor_dataset(x, torch.from_numpy(labels[part])))
    return out[0], out[1]


def digits_loaders(
    batch_size: int = 64,
    image_size: Optional[int] = None,
    channels: int = 1,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_workers: int = 0,
) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` over :func:`digits_datasets`; train shuffles with ``seed``."""
    train, val = digits_datasets(image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed)
    return (
        make_loader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
        make_loader(val, batch_size, shuffle=False, seed=seed, num_workers=num_workers),
    )
