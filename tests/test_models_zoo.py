"""amc.models: every registered model builds, runs, traces and trains; the digits model learns."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn as nn

import amc.models as M
from amc.data import digits_loaders
from amc.errors import AmcError, DataError, TrainingError

ALL_MODELS = M.list_models()


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are tiny: with 2 cores shared by other jobs, intra-op threads cost 10x (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_lists_the_zoo():
    assert {"digits_resnet", "vgg_small", "resnet20"} <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shapes_at_intended_size(name):
    torch.manual_seed(0)
    c, h, w = M.model_info(name).input_size
    model = M.create(name).eval()
    for batch in (1, 3):
        out = model(torch.randn(batch, c, h, w))
        assert out.shape == (batch, 10) and torch.isfinite(out).all()
    model3 = M.create(name, num_classes=7, in_channels=3).eval()
    assert model3(torch.randn(2, 3, h, w)).shape == (2, 7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_plain_modules_trace_and_backprop(name):
    """Zoo models are plain modules: torch.fx traces them to the same outputs, and every param learns."""
    torch.manual_seed(0)
    c, h, w = M.model_info(name).input_size
    model = M.create(name).eval()
    x = torch.randn(4, c, h, w)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x), atol=1e-6)
    model.train()
    model(x).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_architectures_have_the_promised_structure():
    def count(model, cls):
        return sum(isinstance(m, cls) for m in model.modules())

    digits = M.create("digits_resnet")
    assert 50_000 <= sum(p.numel() for p in digits.parameters()) <= 150_000
    blocks = [m for m in digits.modules() if isinstance(m, M.BasicBlock)]
    assert len(blocks) == 2 and sum(b.downsample is not None for b in blocks) == 1
    assert blocks[1].downsample[0].kernel_size == (1, 1)

    r20 = M.create("resnet20")
    blocks = [m for m in r20.modules() if isinstance(m, M.BasicBlock)]
    assert len(blocks) == 9 and sum(b.downsample is not None for b in blocks) == 2  # option B at stage 2, 3
    assert [b.conv2.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert count(r20, nn.Conv2d) == 1 + 9 * 2 + 2 and count(r20, nn.Linear) == 1
    assert 260_000 < sum(p.numel() for p in r20.parameters()) < 280_000

    vgg = M.create("vgg_small")
    assert count(vgg, nn.MaxPool2d) == 3 and count(vgg, nn.BatchNorm2d) == count(vgg, nn.Conv2d) == 5
    assert vgg.classifier[0].in_features == 128 * 3 * 3  # flatten feeds the Linear directly

    for size in (16, 32):  # resized digits: the stem brings the map back to 8x8
        m = M.create("digits_resnet", image_size=size).eval()
        assert m.stem(torch.zeros(1, 1, size, size)).shape[-2:] == (8, 8)
    assert sum(p.numel() for p in M.create("digits_resnet", width=16).parameters()) < 30_000


def test_registry_errors_and_overwrite():
    with pytest.raises(M.UnknownModelError, match="registered models: .*digits_resnet") as info:
        M.create("no_such_model")
    assert isinstance(info.value, AmcError) and isinstance(info.value, KeyError)

    @M.register_model("_tmp_test_model", input_size=(1, 4, 4))
    def tmp(num_classes=10, in_channels=1):
        """Tiny."""
        return nn.Sequential(nn.Flatten(), nn.Linear(16 * in_channels, num_classes))

    try:
        assert "_tmp_test_model" in M.list_models() and M.model_info("_tmp_test_model").description == "Tiny."
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            M.register_model("_tmp_test_model")(tmp)
        assert any("already registered" in str(w.message) for w in caught)
    finally:
        M._registry._REGISTRY.pop("_tmp_test_model", None)
    assert "_tmp_test_model" not in M.list_models()


@pytest.mark.timeout(90)
def test_digits_resnet_learns_digits_and_is_reproducible():
    train, val = digits_loaders(batch_size=64, seed=0)
    results, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = M.create("digits_resnet")
        start = time.perf_counter()
        results.append(M.train_classifier(model, train, val, epochs=4, lr=0.1, seed=0))
        elapsed = time.perf_counter() - start
        states.append(model.state_dict())
    res = results[0]
    assert res["acc"] >= 0.9, res
    assert len(res["history"]) == 4 and res["history"][-1]["acc"] == res["acc"]
    assert res["history"][0]["train_loss"] > res["train_loss"]  # it actually descended
    assert elapsed < 60
    # same seed, same loaders: bit-identical weights
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # evaluate agrees with the trainer's final number and restores the module's mode
    model.train()
    ev = M.evaluate(model, val)
    assert model.training and ev["acc"] == pytest.approx(res["acc"]) and ev["n"] == 359


def test_training_errors():
    model = M.create("digits_resnet")
    x = torch.full((4, 1, 8, 8), float("nan"))
    nan_loader = [(x, torch.zeros(4, dtype=torch.int64))]
    with pytest.raises(TrainingError, match="lower lr"):
        M.train_classifier(model, nan_loader, nan_loader, epochs=1, lr=0.1)
    with pytest.raises(DataError):
        M.train_classifier(model, [], nan_loader, epochs=1)
    with pytest.raises(DataError):
        M.evaluate(model, [])
    with pytest.raises(TrainingError):
        M.train_classifier(model, nan_loader, nan_loader, epochs=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
def test_train_classifier_handles_tiny_budgets(steps: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from amc.models import create, train_classifier

    ds = TensorDataset(torch.randn(steps * 4, 1, 8, 8), torch.randint(0, 10, (steps * 4,)))
    loader = DataLoader(ds, batch_size=4)
    out = train_classifier(create("digits_resnet"), loader, loader, epochs=1, lr=0.01)
    assert 0.0 <= out["acc"] <= 1.0
