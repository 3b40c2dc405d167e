"""Capture, counting, pruning and the data-driven compressors leave the user's model exactly as it was:
every parameter and buffer bit-identical, every `training` flag, and the global RNG state."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc.compressors import ChannelPruning, LowRankDecomposition


def _dropout_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 10))


MODELS = {
    "dropout_bn": (_dropout_bn, 16),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 32),
    # torchvision's ViT class at a size the data-driven compressors finish in seconds (vit_b_16 took over 20
    # minutes for one LASSO row here); the code paths are the same
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                         hidden_dim=64, mlp_dim=128, num_classes=10), 32),
}


def _snapshot(model: nn.Module):
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return tensors, flags, torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _assert_same(model: nn.Module, before, what: str) -> None:
    tensors, flags, rng, np_rng, py_rng = before
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys(), what
    changed = [k for k, v in tensors.items() if not torch.equal(now[k].detach(), v)]
    assert not changed, f"{what} changed {changed[:5]}"
    assert {n: m.training for n, m in model.named_modules()} == flags, f"{what} changed training flags"
    assert torch.equal(torch.get_rng_state(), rng), f"{what} moved the global torch RNG"
    assert np.array_equal(np.random.get_state()[1], np_rng) and random.getstate() == py_rng, what


def _loader(size: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


OPS = {
    "trace": lambda m, x, data: amc.trace(m, x),
    "count": lambda m, x, data: amc.count(m, x),
    "prune": lambda m, x, data: amc.prune(m, ratio=0.3, example_inputs=(x,)),
    "prune_graph": lambda m, x, data: amc.prune(amc.trace(m, x), ratio=0.3, example_inputs=(x,)),
    "channel": lambda m, x, data: ChannelPruning(m, data, data, trainset_ratio=1.0, sampled_pixels_per_img=4,
                                                 compress_ratio=0.3).compress(),
    "lowrank": lambda m, x, data: LowRankDecomposition(m, data, data, trainset_ratio=1.0, sampled_pixels_per_img=4,
                                                       compress_ratio=0.3).compress(),
}
FAST_OPS = ("trace", "count", "prune", "prune_graph")


def _cases():
    for name in MODELS:
        for op in OPS:
            for train in (True, False):
                slow = op not in FAST_OPS and name not in ("dropout_bn", "resnet18", "vit")
                marks = [pytest.mark.slow] if slow else []
                yield pytest.param(name, op, train, id=f"{name}-{op}-{'train' if train else 'eval'}", marks=marks)


@pytest.mark.parametrize("name,op,train", list(_cases()))
def test_model_left_untouched(name, op, train, one_thread):
    make, size = MODELS[name]
    torch.manual_seed(0)
    model = make().train(train)
    if train:  # BN statistics away from their init, so that a reset would show too
        with torch.no_grad():
            model(torch.randn(2, 3, size, size))
    x = torch.randn(2, 3, size, size)
    data = _loader(size)
    before = _snapshot(model)
    OPS[op](model, x, data)
    _assert_same(model, before, f"{op} on {name} ({'train' if train else 'eval'} mode)")


def test_graph_left_untouched_by_count_in_train_mode():
    net = amc.trace(_dropout_bn().train(), torch.randn(2, 3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    before = _snapshot(net)
    amc.count(net, x)
    amc.count(net)  # random example inputs made by the graph itself: drawn, then the RNG put back
    net.summary(x, file=open(os.devnull, "w"))
    _assert_same(net, before, "count on a train-mode graph")


def test_traced_dropout_still_draws_fresh_noise():
    """Restoring the RNG around capture must not freeze the traced network's own dropout."""
    net = amc.trace(nn.Sequential(nn.Dropout(0.5)).train(), torch.ones(1, 64))
    a, b = net(torch.ones(1, 64)), net(torch.ones(1, 64))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_pruned_network_shares_no_tensor_with_its_source(mode):
    """The hard prune copies without duplicating the weights first; whatever it did not slice (here the
    ignored stem) is cloned at the end, so training the pruned network in place never reaches the source."""
    torch.manual_seed(0)
    net = amc.trace(_dropout_bn().eval(), torch.randn(1, 3, 16, 16))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pruned = amc.prune(net, 0.5, example_inputs=(torch.randn(1, 3, 16, 16),), ignore=["0"], mode=mode)
    with torch.no_grad():
        for t in [*pruned.parameters(), *pruned.buffers()]:
            if t.is_floating_point():
                t.add_(1.0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pruned.network["0"].weight.shape == net.network["0"].weight.shape  # the stem kept its channels
