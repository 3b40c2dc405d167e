"""Real CIFAR-10 / CIFAR-100 from the official python pickles, through torchvision's dataset classes.

torchvision's classes insist on the official md5s and on str-keyed pickles; we subclass them so
that the same files load whether their dicts are keyed by ``str`` (``encoding="latin1"``) or by
``bytes`` (how the CIFAR page's own snippet, ``encoding="bytes"``, sees them), checksums become an
option, and every failure is a DataError naming the expected directory. Indexing, PIL conversion
and transforms stay torchvision's.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from ..errors import DataError
from ._common import make_loader

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


# A CIFAR batch is a dict of bytes, ints, lists and numpy arrays (bytes come through _codecs.encode in
# protocol 2): nothing else may be named in the file.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array rebuild, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def _load_pickle(path: Path) -> Dict[str, Any]:
    """Unpickle a CIFAR batch (numpy arrays only, no code) and normalise its keys to ``str``."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DataError(f"CIFAR file {str(path)!r} is missing") from exc
    except Exception as exc:  # pickle raises many types on garbage: report them all the same way
        raise DataError(f"CIFAR file {str(path)!r} is not a readable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR file {str(path)!r} holds a {type(entry).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


class _CifarFromPickles:
    """Mixin replacing torchvision's ``__init__`` loading; see the module docstring for why."""

    base_folder: str
    train_list: List[List[str]]
    test_list: List[List[str]]
    meta: Dict[str, str]
    label_key: str

    def __init__(
        self,
        root: Union[str, os.PathLike],
        train: bool = True,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        verify_checksums: bool = False,
    ) -> None:
        torchvision.datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        folder = Path(self.root) / self.base_folder
        if not folder.is_dir():
            raise DataError(
                f"{type(self).__name__}: expected the extracted directory {str(folder)!r} "
                f"(the official python version holds {self.base_folder}/ with "
                f"{', '.join(n for n, _ in self.train_list + self.test_list)}, {self.meta['filename']}). "
                "amc never downloads: extract the archive under root= yourself."
            )
        wanted = self.train_list + self.test_list + [[self.meta["filename"], self.meta["md5"]]]
        missing = [n for n, _ in wanted if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{type(self).__name__}: {str(folder)!r} lacks {', '.join(missing)}")
        if verify_checksums:
            bad = [n for n, md5 in wanted if not check_integrity(str(folder / n), md5)]
            if bad:
                raise DataError(
                    f"{type(self).__name__}: {', '.join(bad)} in {str(folder)!r} fail the official md5 "
                    "(corrupted or not the official files); re-extract the archive"
                )
        chunks, targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = _load_pickle(folder / name)
            if "data" not in entry or self.label_key not in entry:
                raise DataError(
                    f"CIFAR file {str(folder / name)!r} lacks 'data' or {self.label_key!r} "
                    f"(has {sorted(map(str, entry))})"
                )
            data = np.asarray(entry["data"])
            labels = list(entry[self.label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(
                    f"CIFAR file {str(folder / name)!r}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072"
                )
            if len(labels) != data.shape[0]:
                raise DataError(
                    f"CIFAR file {str(folder / name)!r}: {data.shape[0]} images but {len(labels)} labels"
                )
            chunks.append(data)
            targets.extend(int(t) for t in labels)
        self.data = np.vstack(chunks).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = targets
        meta = _load_pickle(folder / self.meta["filename"])
        if self.meta["key"] not in meta:
            raise DataError(f"CIFAR meta file lacks {self.meta['key']!r} (has {sorted(map(str, meta))})")
        self.classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[self.meta["key"]]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if self.targets and not 0 <= min(self.targets) <= max(self.targets) < len(self.classes):
            raise DataError(
                f"{type(self).__name__}: labels span {min(self.targets)}..{max(self.targets)} but the meta "
                f"file names {len(self.classes)} classes"
            )


class CIFAR10(_CifarFromPickles, torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 that never downloads and reports problems as DataError."""

    label_key = "labels"


class CIFAR100(_CifarFromPickles, torchvision.datasets.CIFAR100):
    """torchvision's CIFAR100 (fine labels) that never downloads and reports problems as DataError."""

    label_key = "fine_labels"


def cifar_default_transforms(which: int = 10) -> Tuple[Callable, Callable]:
    """The standard recipe: pad-4 random crop + flip for training, plain normalise for validation."""
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if which == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), normalize])
    return train, normalize


def cifar_datasets(
    root: Union[str, os.PathLike],
    which: int = 10,
    train_transform: Optional[Callable] = None,
    val_transform: Optional[Callable] = None,
    verify_checksums: bool = False,
) -> Tuple[torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR10]:
    """Train (50k) / test (10k) CIFAR datasets from ``root`` (the directory *holding* the extracted folder)."""
    if which not in (10, 100):
        raise DataError(f"which must be 10 or 100, got {which!r}")
    default_train, default_val = cifar_default_transforms(which)
    cls = CIFAR10 if which == 10 else CIFAR100
    train = cls(root, train=True, transform=train_transform or default_train, verify_checksums=verify_checksums)
    val = cls(root, train=False, transform=val_transform or default_val, verify_checksums=verify_checksums)
    return train, val


def cifar_loaders(
    root: Union[str, os.PathLike],
    which: int = 10,
    batch_size: int = 128,
    train_transform: Optional[Callable] = None,
    val_transform: Optional[Callable] = None,
    num_workers: int = 0,
    seed: int = 0,
    verify_checksums: bool = False,
) -> Tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` for CIFAR-10/100 already on disk (``download`` is never used)."""
    train, val = cifar_datasets(root, which, train_transform, val_transform, verify_checksums)
    return (
        make_loader(train, batch_size, shuffle=True, seed=seed, num_workers=num_workers),
        make_loader(val, batch_size, shuffle=False, seed=seed, num_workers=num_workers),
    )
