"""amc.export.to_fx and torch.fx.symbolic_trace of a ReconstructedNetwork: the same outputs, the guards
kept as asserts, torch.ao's FX quantisation on a pruned network, and a network nested in a traced model."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc.errors import GraphError

ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10), (3, 32, 32)),
    # shifted windows build their mask with `x[...] = v` (a SetItem node), which a Proxy cannot do
    "swin": (lambda: torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                                        num_heads=[1, 2], window_size=[4, 4], num_classes=10),
             (3, 32, 32)),
}


def pruned(name: str) -> Tuple[amc.ReconstructedNetwork, torch.Tensor]:
    make, shape = ZOO[name]
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return amc.prune(make().eval(), example_inputs=(x,), ratio=0.5), x


@pytest.mark.parametrize("name", list(ZOO))
def test_graph_module_and_symbolic_trace_compute_the_network(name, one_thread):
    net, x = pruned(name)
    gm = amc.export.to_fx(net)
    assert isinstance(gm, torch.fx.GraphModule) and gm.meta["amc_inputs"] == [n.name for n in net.input_nodes]
    assert {id(p) for p in gm.parameters()} == {id(p) for p in net.parameters()}, "the same parameters, not copies"
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        ref = net(other)
        for traced in (gm, torch.fx.symbolic_trace(gm), torch.fx.symbolic_trace(net)):
            torch.testing.assert_close(traced(other), ref, rtol=1e-5, atol=1e-5)
    ops = {n.op for n in gm.graph.nodes}
    assert "call_module" in ops and ({"call_function", "call_method"} & ops)


def test_guards_become_asserts_that_survive_a_retrace(one_thread):
    net, x = pruned("vit")  # torchvision's ViT checks the image size in Python
    gm = amc.export.to_fx(net)
    wrong = torch.randn(1, 3, 40, 40)
    for traced in (gm, torch.fx.symbolic_trace(gm), torch.fx.symbolic_trace(net)):
        with pytest.raises(AssertionError, match="amc shape guard at .*vision_transformer.py.*32 == 32 is True"):
            traced(wrong)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torch_ao_fx_quantisation_of_a_pruned_network(one_thread):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    net, x = pruned("resnet18")
    prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))  # symbolic_trace of the network itself
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(8, *x.shape[1:]))
        quantized = convert_fx(prepared)
        rel = (quantized(x) - net(x)).norm() / net(x).norm()
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") or k.startswith("torch.ao.nn.intrinsic.quantized")
               for k in kinds), kinds
    assert rel < 0.15, f"int8 output off by {rel:.3f} (relative L2)"


class Parent(nn.Module):
    """A user's model that holds an amc network as a submodule, traced by torch.fx as a whole."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.body(x)).relu()


def test_a_network_inside_a_traced_model(one_thread):
    net, x = pruned("resnet18")
    parent = Parent(net).eval()
    gm = torch.fx.symbolic_trace(parent)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), parent(x))
    assert any(n.target == "body.network.conv1" for n in gm.graph.nodes), "FX records our layers by their paths"


def test_to_fx_refuses_what_is_not_a_graph():
    with pytest.raises(GraphError, match="expects a ReconstructedNetwork.*symbolic_trace"):
        amc.export.to_fx(nn.Linear(2, 2))


class Branchy(nn.Module):
    """Python control flow on a size: torch.fx cannot trace the model itself, but can trace amc's graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] > 8:
            x = self.pool(x)
        return x.flatten(1)


def test_fx_traces_the_graph_of_a_model_it_cannot_trace():
    model, x = Branchy().eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    gm = torch.fx.symbolic_trace(amc.trace(model, x))
    with torch.no_grad():
        torch.testing.assert_close(gm(torch.randn(3, 3, 12, 12) * 0 + 1), model(torch.ones(3, 3, 12, 12)))
    with pytest.raises(AssertionError, match="16 > 8 is True"):
        gm(torch.randn(1, 3, 4, 4))  # the model takes the other branch here


def test_torch_export_and_compile_of_a_pruned_network(one_thread):
    """torch.export (ExecuTorch / AOTInductor's entry) and torch.compile take a pruned network as it is; its
    forward takes `*args`, so a dynamic batch is given for the first element of `args`."""
    x = torch.randn(2, 3, 64, 64)
    net = amc.prune(torchvision.models.mobilenet_v3_small().eval(), ratio=0.5, example_inputs=(x,), round_to=8)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(net, (x,), dynamic_shapes=(({0: batch},),))
    x5 = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ref = net(x5)
        assert torch.allclose(exported.module()(x5), ref, atol=1e-5)
        assert torch.allclose(torch.compile(net, backend="eager")(x5), ref, atol=1e-5)
