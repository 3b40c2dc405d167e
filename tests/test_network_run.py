"""Running a ReconstructedNetwork calls op modules' forward directly (no nn.Module.__call__ cost per op)
only while nothing could observe the call: module hooks, global hooks and capture still see every op."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import amc


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return model, amc.trace(model, torch.randn(2, 6))


def test_module_hooks_still_fire_and_can_change_the_output():
    model, net = _net()
    x = torch.randn(4, 6)
    seen = []
    first = net.network[net.layer_nodes[0].module]
    handle = first.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out * 0)
    try:
        out = net(x)
    finally:
        handle.remove()
    assert seen == [torch.Size([4, 8])]
    assert torch.allclose(out, model[2](torch.zeros(4, 8)))  # the hook's zeroed output was used
    assert torch.allclose(net(x), model(x), atol=1e-6)  # and without it, the plain path again


def test_global_hooks_see_every_op():
    _, net = _net()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    try:
        net(torch.randn(1, 6))
    finally:
        handle.remove()
    assert seen.count("Linear") == 2 and "ReconstructedNetwork" in seen


def test_tracing_a_model_that_holds_a_network_records_its_layers():
    _, net = _net()
    wrapper = nn.Sequential(net, nn.Softmax(dim=-1)).eval()
    again = amc.trace(wrapper, torch.randn(2, 6))
    kinds = [type(m).__name__ for _, m in again.iter_nodes()]
    assert kinds.count("Linear") == 2 and "Softmax" in kinds
    x = torch.randn(5, 6)
    assert torch.allclose(again(x), wrapper(x), atol=1e-6)



def test_get_submodule_finds_layers_by_their_traced_names():
    """`net.get_submodule("layer1.0.conv1")` (the model's own name) works as on the model, so hooks and
    distillation feature pairs can name layers as the user knows them; unknown names still raise."""
    import torchvision

    model = torchvision.models.resnet18().eval()
    net = amc.trace(model, torch.randn(1, 3, 32, 32))
    conv = net.get_submodule("layer1.0.conv1")
    assert isinstance(conv, torch.nn.Conv2d) and torch.equal(conv.weight, model.layer1[0].conv1.weight)
    assert net.get_submodule("network") is net.network  # the module tree itself still answers first
    with pytest.raises(AttributeError):
        net.get_submodule("layer1.0.conv9")
