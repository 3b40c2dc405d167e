"""The benchmarks' shipped Fashion-MNIST originals load safely and are the networks their JSON describes."""
import json
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SHIPPED = sorted((SCRIPTS / "originals").glob("*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem.split("_fmnist")[0] for p in SHIPPED])
def test_shipped_original_matches_its_record(path: Path) -> None:
    from safetensors.torch import load_file

    from amc.data import fashion_mnist_loaders
    from amc.models import create, evaluate

    info = json.loads(path.with_suffix(".json").read_text())
    model = create(info["model"])
    model.load_state_dict(load_file(str(path)))  # strict: every tensor of the architecture, nothing else
    _, test = fashion_mnist_loaders(batch_size=500, val_limit=2000)
    acc = evaluate(model.eval(), test)["acc"]
    floor = 0.85 if info["model"].startswith("vit") else 0.9  # the small ViT trains to 88%, the CNNs to 93%
    assert info["test_acc"] > floor and abs(acc - info["test_acc"]) < 0.03  # 2,000 of the 10,000 test images


def test_benchmarks_read_the_shipped_copy_first(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import fashion_originals as fo

    monkeypatch.setattr(fo, "CACHE", tmp_path / "empty_cache")  # nothing cached: training would start
    monkeypatch.setattr(fo, "train_classifier", lambda *a, **k: pytest.fail("trained instead of loading"))
    model, info = fo.original("resnet20")
    ref = json.loads((SCRIPTS / "originals" / "resnet20_fmnist_nall_e8_lr0.05_b128_s0.json").read_text())
    assert info["test_acc"] == ref["test_acc"] and not model.training
    assert len(SHIPPED) >= 3
