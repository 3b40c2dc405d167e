"""Group-aware training-time primitives: mask / regrow / orthogonal re-initialisation."""
from __future__ import annotations

import numpy as np
import torch
import torchvision

import amc
from amc.compressors import plan_pruning
from amc.compressors.primitives import mask_units, regrow_units, reinit_orthogonal, unit_roots


def _plan():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    net = amc.trace(model, x)
    return plan_pruning(net, "l2", (x,)), x


def test_mask_zeroes_every_coupled_slice_and_regrow_restores() -> None:
    plan, x = _plan()
    gi = next(i for i, g in enumerate(plan.groups) if "layer1.0.conv2" in g.producers)
    roots = unit_roots(plan, gi, [0, 5])
    ref = plan.net(x).clone()
    saved = mask_units(plan, roots)
    net = plan.net
    for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
        w = net.module_of(name).weight
        assert torch.count_nonzero(w[[0, 5]]) == 0, name  # producer rows zero everywhere in the stage
    assert torch.count_nonzero(net.module_of("layer2.0.conv1").weight[:, [0, 5]]) == 0  # consumer columns
    soft = plan.apply_units(roots, "soft")
    assert torch.allclose(net(x), soft(x), atol=1e-5)  # masking in place == soft pruning
    regrow_units(plan, saved)
    assert torch.equal(net(x), ref)


def test_reinit_is_orthogonal_to_kept_filters() -> None:
    plan, _ = _plan()
    gi = next(i for i, g in enumerate(plan.groups) if g.producers == ["layer1.0.conv1"])
    roots = unit_roots(plan, gi, [1, 2, 3])
    layers = reinit_orthogonal(plan, roots, seed=0)
    assert layers == ["layer1_0_conv1"]
    w = plan.net.module_of("layer1.0.conv1").weight.detach().reshape(64, -1)
    keep = np.setdiff1d(np.arange(64), [1, 2, 3])
    cos = torch.nn.functional.normalize(w[[1, 2, 3]], dim=1) @ torch.nn.functional.normalize(w[keep], dim=1).T
    assert cos.abs().max() < 1e-4
    assert torch.all(w[[1, 2, 3]].norm(dim=1) > 0)
