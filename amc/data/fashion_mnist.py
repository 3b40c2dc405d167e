"""Full Fashion-MNIST (60k train / 10k test, 28x28 grey) from Debian's ``dataset-fashion-mnist``.

The Debian package puts the original gzipped IDX files in ``/usr/share/datasets/fashion-mnist``, so
a real, mid-sized benchmark is available with no download at run time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import DataError
from ._common import check_limit, make_loader, prepare_images, tensor_dataset
from .idx import read_idx

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Mean / std of the training pixels scaled to [0, 1] (the commonly used constants).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def _missing_message(root: Path, missing: list) -> str:
    return (
        f"Fashion-MNIST not found in {str(root)!r} (missing: {', '.join(missing)}). "
        "Install it offline-capable from Debian with `apt-get install dataset-fashion-mnist` "
        f"(it provides {FASHION_MNIST_ROOT}), or pass root= a directory holding the four "
        "gzipped IDX files."
    )


def read_fashion_mnist(
    root: Union[str, os.PathLike] = FASHION_MNIST_ROOT, split: str = "train"
) -> Tuple[np.ndarray, np.ndarray]:
    """Raw ``(images uint8 [N, 28, 28], labels uint8 [N])`` for ``split`` in {"train", "test"}."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(_missing_message(root, missing))
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    images = read_idx(root / img_name, expected_ndim=3)
    labels = read_idx(root / lbl_name, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(
            f"Fashion-MNIST {split} files in {str(root)!r} hold {images.dtype}/{labels.dtype}, expected uint8"
        )
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_name} holds images of shape {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_name} has {images.shape[0]} images but {lbl_name} has {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{img_name} holds no images")
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{lbl_name} has label {int(labels.max())}, expected 0..9")
    return images, labels


def fashion_mnist_datasets(
    root: Union[str, os.PathLike] = FASHION_MNIST_ROOT,
    train_limit: Optional[int] = None,
    val_limit: Optional[int] = None,
    image_size: Optional[int] = None,
    channels: int = 1,
) -> Tuple[TensorDataset, TensorDataset]:
    """Train (60k) / test (10k) ``TensorDataset`` pair, normalised; limits keep the first N samples.

    The official files are already shuffled, so the first N is a fair, deterministic subset.
    """
    out = []
    for split, limit_name, limit in (("train", "train_limit", train_limit), ("test", "val_limit", val_limit)):
        images, labels = read_fashion_mnist(root, split)
        n = check_limit(limit_name, limit, images.shape[0])
        x = torch.from_numpy(images[:n].astype(np.float32) / 255.0)
        x = prepare_images(x, FASHION_MNIST_MEAN, FASHION_MNIST_STD, image_size, channels)
        out.append(tensor_dataset(x, torch.from_numpy(labels[:n].astype(np.int64))))
    return out[0], out[1]


def fashion_mnist_loaders(
    batch_size: int = 128,
    root: Union[str, os.PathLike] = FASHION_MNIST_ROOT,
    train_limit: Optional[int] = None,
    val_limit: Optional[int] = None,
    image_size: Optional[int] = None,
    channels: int = 1,
    num_workers: int = 0,
    seed: int = 0,
) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` over :func:`fashion_mnist_datasets`; val is the official test set."""
    train, val = fashion_mnist_datasets(
        root=root, train_limit=train_limit, val_limit=val_limit, image_size=image_size, channels=channels
    )
    return (
        make_loader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
        make_loader(val, batch_size, shuffle=False, seed=seed, num_workers=num_workers),
    )
