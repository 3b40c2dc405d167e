"""A network amc builds inside the caller's `torch.inference_mode()` block still trains: its weights were
inference tensors ("Inference tensors cannot be saved for backward") and a compressor could not even trace."""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
import torch.nn as nn

import amc
from amc.compressors import ChannelPruning, LowRankDecomposition, ProductQuantization
from amc.tuners import RandomSearch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


X = torch.randn(2, 3, 8, 8)
DATA = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]

BUILDERS: dict = {
    "trace": lambda m, d: amc.trace(m, X),
    "copy": lambda m, d: amc.trace(m, X).copy(),
    "prune": lambda m, d: amc.prune(m, example_inputs=(X,), ratio=0.5),
    "load_pkl": lambda m, d: amc.load(amc.trace(m, X).save(os.path.join(d, "n.pkl"))),
    "load_json": lambda m, d: amc.load(amc.trace(m, X).save(os.path.join(d, "n.json"))),
    "to_module": lambda m, d: amc.export.to_module(amc.prune(m, example_inputs=(X,), ratio=0.5), m, X),
    "channel_pruning": lambda m, d: ChannelPruning(m, DATA, target_macs=0.6, trainset_ratio=1.0).compress(),
    "lowrank": lambda m, d: LowRankDecomposition(m, DATA, target_macs=0.8, trainset_ratio=1.0).compress(),
    "product_quantization": lambda m, d: ProductQuantization(m, DATA, n_centroids=4).compress(),
    "random_search": lambda m, d: RandomSearch(samples=2, seed=0).search(
        m, example_inputs=(X[:1],), target_macs=0.6, evaluate=lambda n: 1.0, progress=False).net,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_built_inside_inference_mode_still_trains(name: str, tmp_path) -> None:
    build: Callable = BUILDERS[name]
    model = _model()
    with torch.inference_mode():
        net = build(model, str(tmp_path))
    assert not any(p.is_inference() for p in net.parameters())
    net.train()
    net(X.clone()).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert not any(p.is_inference() for p in model.parameters())
