"""ImageNet-style ``class/image.ext`` directory trees through torchvision's ImageFolder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ..errors import DataError
from ._common import make_loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_default_transforms(image_size: int = 224) -> Tuple[Callable, Callable]:
    """Random-resized-crop + flip for training; resize to size/0.875 + centre crop for validation."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    val = T.Compose([T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), *normalize])
    return train, val


def _image_folder(path: Union[str, os.PathLike], transform: Callable, role: str) -> torchvision.datasets.ImageFolder:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"ImageFolder {role} directory {str(p)!r} does not exist")
    try:
        return torchvision.datasets.ImageFolder(str(p), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images with known extensions
        raise DataError(
            f"ImageFolder {role} directory {str(p)!r} is not a class-per-folder image tree: {exc}"
        ) from exc


def imagefolder_datasets(
    train_dir: Union[str, os.PathLike],
    val_dir: Union[str, os.PathLike],
    image_size: int = 224,
    train_transform: Optional[Callable] = None,
    val_transform: Optional[Callable] = None,
) -> Tuple[torchvision.datasets.ImageFolder, torchvision.datasets.ImageFolder]:
    """Train/val ImageFolders; refuses trees whose class lists differ (labels would silently shift)."""
    default_train, default_val = imagenet_default_transforms(image_size)
    train = _image_folder(train_dir, train_transform or default_train, "train")
    val = _image_folder(val_dir, val_transform or default_val, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"train and val ImageFolders have different classes (only in train: {only_train}, "
            f"only in val: {only_val}); label indices would not agree"
        )
    return train, val


def imagefolder_loaders(
    train_dir: Union[str, os.PathLike],
    val_dir: Union[str, os.PathLike],
    image_size: int = 224,
    batch_size: int = 64,
    train_transform: Optional[Callable] = None,
    val_transform: Optional[Callable] = None,
    num_workers: int = 0,
    seed: int = 0,
) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` over :func:`imagefolder_datasets`."""
    train, val = imagefolder_datasets(train_dir, val_dir, image_size, train_transform, val_transform)
    return (
        make_loader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
        make_loader(val, batch_size, shuffle=False, seed=seed, num_workers=num_workers),
    )
