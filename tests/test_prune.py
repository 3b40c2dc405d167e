"""Structural pruning engine: soft == hard for every criterion, coupling rules on tiny modules, bad input."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import amc
from amc.compressors import CRITERIA, plan_pruning, prune_groups
from amc.errors import PruningError



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only in this file (without touching the global autograd state of other tests)."""
    with torch.no_grad():
        yield


def _loader(x: torch.Tensor, n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(x.shape, generator=g), torch.zeros(x.shape[0], dtype=torch.long)) for _ in range(n)]


def _nonzero_heads(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises some classifier heads (ViT): give them weights so outputs are informative."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.any():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model


ZOO = {  # model -> input size (small where the model allows, to keep the suite fast)
    "resnet50": 64,
    "mobilenet_v2": 64,
    "densenet121": 64,
    "convnext_tiny": 64,
    "shufflenet_v2_x1_0": 64,
    "vit_b_16": 224,
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(ZOO))
def test_soft_equals_hard_for_every_criterion(name: str) -> None:
    torch.manual_seed(0)
    model = _nonzero_heads(torchvision.models.get_model(name, weights=None).eval())
    x = torch.randn(2 if ZOO[name] < 224 else 1, 3, ZOO[name], ZOO[name])
    net = amc.trace(model, x)
    plan = plan_pruning(net, "l2", (x,))
    base_macs, _ = amc.count(net, x[:1])
    ref = net(x)
    for criterion in sorted(k for k, c in CRITERIA.items() if c.name == k and k != "oracle"):  # no aliases;
        plan.rescore(criterion, _loader(x, n=1))  # the oracle copies the network per unit: tested on a small one
        hard = plan.apply(0.5, "hard")
        soft = plan.apply(0.5, "soft")
        hard.lint()
        out_h, out_s = hard(x), soft(x)
        assert out_h.shape == ref.shape
        assert torch.allclose(out_h, out_s, atol=1e-5, rtol=1e-4), (criterion, (out_h - out_s).abs().max())
        macs, _ = amc.count(hard, x[:1])
        assert macs < 0.8 * base_macs, (criterion, macs / base_macs)
    assert torch.equal(net(x), ref), "pruning must leave its input network untouched"


def test_vit_hidden_and_head_dims_are_pruned() -> None:
    torch.manual_seed(0)
    model = _nonzero_heads(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128).eval())
    x = torch.randn(2, 3, 32, 32)
    pruned = amc.prune(model, ratio=0.5, example_inputs=(x,))
    attn = pruned.module_of("encoder.layers.encoder_layer_0.self_attention")
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (32, 4, 8)
    assert pruned.module_of("encoder.layers.encoder_layer_0.mlp.0").out_features == 64
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert torch.allclose(pruned(x), soft(x), atol=1e-5)


def test_input_untouched_and_ratio_zero_identical() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    state = copy.deepcopy(model.state_dict())
    same = amc.prune(model, ratio=0.0, example_inputs=(x,))
    assert torch.equal(same(x), model(x))
    assert amc.count(same, x) == amc.count(model, x)
    amc.prune(model, ratio=0.5, example_inputs=(x,))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ratio_099_leaves_a_channel_in_every_group() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = amc.prune(model, ratio=0.99, example_inputs=(x,))
    assert pruned(x).shape == (1, 1000)
    for _, module in pruned.iter_nodes():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels >= 1 and module.in_channels >= 1


def test_per_layer_ratio_and_ignore() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = amc.prune(model, ratio={"layer1.0.conv1": 0.5}, example_inputs=(x,))
    assert pruned.module_of("layer1.0.conv1").out_channels == 32
    assert pruned.module_of("layer1.1.conv1").out_channels == 64
    kept = amc.prune(model, ratio=0.5, example_inputs=(x,), ignore=["layer2.0.conv1"])
    assert kept.module_of("layer2.0.conv1").out_channels == 128
    assert kept.module_of("layer2.1.conv1").out_channels == 64


def test_target_macs_reaches_the_budget() -> None:
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 64, 64)
    base, _ = amc.count(model, x)
    pruned = amc.prune(model, target_macs=0.5, example_inputs=(x,))
    macs, _ = amc.count(pruned, x)
    assert 0.4 * base <= macs <= 0.5 * base


def test_prune_groups_lists_coupled_layers() -> None:
    model = torchvision.models.resnet18().eval()
    groups = prune_groups(model, example_inputs=(torch.randn(1, 3, 64, 64),))
    residual = [g for g in groups if "layer1.0.conv2" in g.producers]
    assert len(residual) == 1
    g = residual[0]
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(g.producers)  # stem + residual adds
    assert g.size == 64 and "fc" not in g.producers


@pytest.mark.parametrize("bad, match", [
    (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
    (dict(ratio="half"), "ratio must be a float"),
    (dict(criterion="magic"), "unknown criterion 'magic'"),
    (dict(ignore=["no_such_layer"]), "ignore names unknown layers"),
    (dict(ignore=[nn.Conv2d(3, 3, 1)]), "Conv2d that is not a module of this model"),
    (dict(ignore=[3]), "node names or modules, got int"),
    (dict(example_kwargs=[1]), "example_kwargs must be a dict"),
    (dict(ratio={"nope": 0.5}), "ratio names unknown layers"),
    (dict(target_macs=2e12), "above the network's current"),
    (dict(mode="medium"), "mode must be 'hard' or 'soft'"),
    (dict(criterion="apoz"), "data-driven"),
])
def test_bad_input_is_rejected_clearly(bad: dict, match: str) -> None:
    model = torchvision.models.resnet18().eval()
    with pytest.raises(PruningError, match=match):
        amc.prune(model, example_inputs=(torch.randn(1, 3, 32, 32),), **bad)


def test_plain_module_needs_example_inputs() -> None:
    with pytest.raises(PruningError, match="example_inputs"):
        amc.prune(nn.Linear(3, 3))


# --- one tiny module per coupling rule: hard == soft, and the expected sizes -------------------

def _check(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> amc.ReconstructedNetwork:
    model.eval()
    net = amc.trace(model, x)
    plan = plan_pruning(net, "l2", (x,))
    hard, soft = plan.apply(ratio, "hard"), plan.apply(ratio, "soft")
    hard.lint()
    for b in (x, torch.cat([x, x.flip(0)], 0)):
        assert torch.allclose(hard(b), soft(b), atol=1e-5, rtol=1e-4)
    return hard


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_offsets() -> None:
    hard = _check(Concat(), torch.randn(2, 3, 8, 8))
    assert (hard.module_of("a").out_channels, hard.module_of("b").out_channels) == (4, 2)
    assert hard.module_of("head").in_channels == 6 and hard.module_of("bn").num_features == 6


class SplitFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        y = self.dw(a) * torch.sigmoid(b)
        return self.fc(y.view(y.size(0), -1))


def test_chunk_depthwise_and_flatten_into_linear() -> None:
    hard = _check(SplitFlatten(), torch.randn(2, 3, 4, 4))
    assert hard.module_of("conv").out_channels == 4  # both halves pruned alike
    assert hard.module_of("dw").groups == 2
    assert hard.module_of("fc").in_features == 2 * 16  # a channel is a block of 16 features


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.grouped(self.conv(x)))


def test_grouped_conv_keeps_equal_groups() -> None:
    hard = _check(Grouped(), torch.randn(2, 3, 6, 6))
    g = hard.module_of("grouped")
    assert (hard.module_of("conv").out_channels, g.in_channels, g.out_channels, g.groups) == (4, 4, 4, 2)
    assert hard.module_of("out").in_channels == 4


class GroupedMultiplier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # in != out (SENet-154's widening 3x3)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.grouped(self.conv(x)))


def test_grouped_conv_with_channel_multiplier_keeps_equal_groups() -> None:
    """Input and output offsets are each kept alike in every group (it was frozen before)."""
    hard = _check(GroupedMultiplier(), torch.randn(2, 3, 6, 6))
    g = hard.module_of("grouped")
    assert (hard.module_of("conv").out_channels, g.in_channels, g.out_channels, g.groups) == (2, 2, 4, 2)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(F.pixel_shuffle(self.conv(x), 2))


def test_pixel_shuffle_blocks() -> None:
    hard = _check(Shuffle(), torch.randn(2, 3, 4, 4))
    assert hard.module_of("conv").out_channels == 8 and hard.module_of("out").in_channels == 2


class Fallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.cumprod(self.conv(x), dim=1))  # mixes channels: not ours to guess


def test_unknown_op_freezes_what_it_touches() -> None:
    with pytest.warns(UserWarning, match="generic replay"):
        hard = _check(Fallback(), torch.randn(2, 3, 4, 4))
    assert hard.module_of("conv").out_channels == 6


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_timm_style_attention_reshape_follows_the_residual() -> None:
    torch.manual_seed(0)
    hard = _check(Attention(), torch.randn(2, 5, 16))
    # the residual (input) dim is frozen by the graph output; the qkv split is read from x.shape, so
    # its head dim cannot shrink independently: nothing is silently mis-reshaped
    assert hard.module_of("proj").out_features == 16


def test_groups_expose_importance_inputs() -> None:
    model = Concat().eval()
    plan = plan_pruning(model, "l1", (torch.randn(1, 3, 8, 8),))
    g = plan.groups[0]
    imp = plan.importance[0]
    assert imp.shape == (g.size,) and torch.all(imp >= 0)
    assert np.all(np.diff(np.sort(g.units)) > 0)


def test_example_inputs_the_network_cannot_run_are_named_as_the_problem() -> None:
    net = amc.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(amc.errors.PruningError, match="does not run on example_inputs"):
        amc.prune(net, 0.5, example_inputs=(torch.randn(1, 5, 8, 8),))


class _TiedToEmbedding(nn.Module):
    """The output projection reuses the embedding table (tied weights, as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.back = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.back(torch.relu(self.mid(self.emb(t)))))


class _TiedLinears(nn.Module):
    """Two layers with one weight: both of its dims are channels of two places in the network."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.head = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


@pytest.mark.parametrize("model, x", [(_TiedToEmbedding, torch.randint(0, 50, (2, 7))),
                                      (_TiedLinears, torch.randn(3, 8))], ids=["embedding", "linears"])
def test_tied_weights_are_sliced_alike_and_stay_tied(model: type, x: torch.Tensor) -> None:
    """A weight held by two layers was sliced by one layer's channels and read by the other with its own:
    'the pruned network no longer runs'. Now the channels on either side are one group (or stay whole
    where the other holder has no channel rule), the weight stays one tensor, and soft == hard."""
    torch.manual_seed(0)
    m = model().eval()
    hard = amc.prune(m, example_inputs=(x,), ratio=0.5)
    soft = amc.prune(m, example_inputs=(x,), ratio=0.5, mode="soft")
    assert amc.count(hard, x)[0] < amc.count(m, x)[0]
    assert torch.allclose(hard(x), soft(x), atol=1e-5)
    first, second = ("emb", "out") if model is _TiedToEmbedding else ("a", "b")
    assert hard.module_of(first).weight is hard.module_of(second).weight


def test_layers_can_be_named_by_module_or_container() -> None:
    """Torch-Pruning users write `ignored_layers=[model.fc]`: the model's modules (and containers such as
    `model.layer4`, or "layer4") name the same nodes as their node names do."""
    m, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    layer4 = [n.name for n in amc.trace(m, x).layer_nodes if n.name.startswith("layer4.")]
    by_name = amc.prune(m, example_inputs=(x,), ratio=0.5, ignore=["fc", *layer4])
    for ignore in ([m.fc, m.layer4], ["fc", "layer4"]):
        again = amc.prune(m, example_inputs=(x,), ratio=0.5, ignore=ignore)
        assert amc.count(again, x) == amc.count(by_name, x)
    assert by_name.module_of("layer4.1.conv2").out_channels == 512
    one = amc.prune(m, example_inputs=(x,), ratio={"layer1.0.conv1": 0.5})
    assert amc.count(amc.prune(m, example_inputs=(x,), ratio={m.layer1[0].conv1: 0.5}), x) == amc.count(one, x)
    net = amc.trace(m, x)  # a graph's own modules work too
    assert amc.count(amc.prune(net, ratio={net.module_of("layer1.0.conv1"): 0.5}), x) == amc.count(one, x)
    whole = amc.prune(m, example_inputs=(x,), ratio={m.layer2: 0.5})
    assert whole.module_of("layer2.0.conv1").out_channels == 64 and whole.module_of("layer3.0.conv1").out_channels == 256


class _FixedBatch(nn.Module):
    """Reads the batch size into a Python int: the graph holds that number, so another batch cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        return self.fc(self.conv(x).reshape(n, -1))


def test_a_model_that_fixes_its_batch_size_is_named_as_the_problem() -> None:
    """It said 'pass the tensors it was traced with', which the user had done. Pruning analyses one sample;
    where only the whole example runs, it analyses that, and says why and what it means."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="runs on its 2 example inputs but not on the first one alone.*fixes its "
                                         "batch size.*runs at batch 2 only"):
        whole = amc.prune(_FixedBatch().eval(), example_inputs=(x,), ratio=0.5)
    assert whole(x).shape == (2, 2) and whole.module_of("conv").out_channels == 4
    small = amc.prune(_FixedBatch().eval(), example_inputs=(x[:1],), ratio=0.5)  # the way out it names
    assert small(x[:1]).shape == (1, 2)


class MessagePassing(nn.Module):
    """A graph network: dim 0 holds nodes, and the edge indices point into them (no batch to slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.lin2, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).relu()
        h = self.lin2(torch.zeros_like(h).index_add_(0, dst, h[src])).relu()
        index = dst[:, None].expand(-1, h.shape[1])  # scatter's index: one value along the features
        return self.out(torch.zeros_like(h).scatter_add_(0, index, h[src])).mean(0)


def test_inputs_whose_dim_0_is_no_batch_are_analysed_whole() -> None:
    """One node of a graph is no sample (its edges point at others): pruning failed with 'trace and prune with
    a batch of 1', impossible here. It analyses the whole graph now, with a warning; gathering nodes (`h[src]`)
    and summing messages (`index_add_`, `scatter_add_` on an index expanded along the features) keep the
    features prunable (they froze them)."""
    torch.manual_seed(0)
    x, src, dst = torch.randn(10, 8), torch.randint(0, 10, (30,)), torch.randint(0, 10, (30,))
    model = MessagePassing().eval()
    with pytest.warns(UserWarning, match="dim 0 is no batch"):
        hard = amc.prune(model, example_inputs=(x, src, dst), ratio=0.5)
        soft = amc.prune(model, example_inputs=(x, src, dst), ratio=0.5, mode="soft")
    assert hard.module_of("lin").out_features == hard.module_of("lin2").out_features == 16
    torch.testing.assert_close(soft(x, src, dst), hard(x, src, dst), rtol=1e-4, atol=1e-6)
    x2, e2 = torch.randn(7, 8), torch.randint(0, 7, (2, 12))
    assert hard(x2, e2[0], e2[1]).shape == (3,)


class _Scaled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


@pytest.mark.parametrize("parametrize", [nn.utils.parametrizations.spectral_norm, nn.utils.spectral_norm,
                                         lambda m: nn.utils.parametrize.register_parametrization(m, "weight", _Scaled())],
                         ids=["spectral_norm", "hook_spectral_norm", "own_parametrization"])
def test_layers_with_computed_weights_keep_their_channels(parametrize) -> None:
    """spectral_norm or a parametrization of one's own computes `weight` from other tensors at each call:
    slicing it resized nothing underneath ('the pruned network no longer runs'). Such a layer's channels
    stay, the warning names it and the way out, and the rest of the network is pruned (weight_norm is
    pruned exactly: tests/test_weight_norm.py)."""
    torch.manual_seed(0)
    m = nn.Sequential(parametrize(nn.Conv2d(3, 32, 3, padding=1)), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1),
                      nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()  # mostly frozen: amc.prune warns
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="computed by .*remove_parametrizations") as record:
        small = amc.prune(m, example_inputs=(x,), ratio=0.5)
    assert any(w.filename == __file__ for w in record)  # attributed to this call, not to amc's internals
    assert amc.count(small, x)[0] < amc.count(m, x)[0]
    assert torch.allclose(small(x), amc.prune(m, example_inputs=(x,), ratio=0.5, mode="soft")(x), atol=1e-5)


def test_compressors_take_modules_in_ignore_too() -> None:
    """One vocabulary: ChannelPruning / LowRankDecomposition / Quantization / ProductQuantization take
    `ignore=[model.fc]` as amc.prune does (they refused anything but node names)."""
    from amc.compressors import ChannelPruning, ProductQuantization, Quantization
    from amc.errors import QuantizationError

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    data = _loader(torch.randn(8, 3, 8, 8), 2)
    q = Quantization(m, data, trainset_ratio=1.0, ignore=[m[6]])
    q.compress()
    assert q.ignore == ["6"] and "6" not in q.quantized_layers
    assert ProductQuantization(m, data, n_centroids=4, ignore=[m[0]]).ignore == ["0"]
    cp = ChannelPruning(m, data, target_macs=0.6, trainset_ratio=1.0, ignore=[m[0]])
    assert cp.ignore == ["0"] and cp.compress().module_of("0").out_channels == 16
    with pytest.raises(QuantizationError, match="Linear that is not a module of this model"):
        Quantization(m, data, ignore=[nn.Linear(2, 2)])


@pytest.fixture(scope="module")
def digits_trained():
    from amc.data import digits_loaders
    from amc.models import create, train_classifier

    torch.manual_seed(0)
    train, val = digits_loaders(batch_size=64)
    model = create("digits_resnet")
    train_classifier(model, train, val, epochs=2, lr=0.05)
    return model.eval(), [b for _, b in zip(range(3), train)]


def test_taylor_ranks_units_as_the_oracle_measures_them(digits_trained):
    """Taylor (the seed's "Approximate Oracle") estimates the loss change of removing each unit: its ranking
    agrees with the oracle's measured change (every unit soft-pruned alone) far better than weight norms do."""
    from scipy.stats import spearmanr

    model, batches = digits_trained
    x = batches[0][0][:1]
    plans = {c: plan_pruning(model, c, (x,), dataloader=batches) for c in ("oracle", "taylor", "l2")}
    for i in range(3):
        oracle = plans["oracle"].importance[i].numpy()
        rho = {c: spearmanr(plans[c].importance[i].numpy(), oracle)[0] for c in ("taylor", "l2")}
        assert rho["taylor"] > 0.6 and rho["taylor"] > rho["l2"], (i, rho)


def test_taylor_and_oracle_leave_the_network_as_it_was(digits_trained):
    model, batches = digits_trained
    net = amc.trace(model, batches[0][0][:2])
    net.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad for p in net.parameters()]  # training left its last gradients there
    for name in ("taylor", "approximate_oracel", "oracel"):
        plan = plan_pruning(net, name, dataloader=batches)
        assert type(plan.importance) is list and len(plan.importance) == len(plan.groups)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # BN statistics included
    assert all(p.grad is g and not p.requires_grad for p, g in zip(net.parameters(), grads))
    assert not net.training
    with pytest.raises(PruningError, match="labelled batches"):
        plan_pruning(net, "taylor", dataloader=[b[0] for b in batches])
    with pytest.raises(PruningError, match="data-driven"):
        plan_pruning(net, "oracle")


def test_channels_last_weights_stay_channels_last() -> None:
    """The hard prune's slices came back in the default layout: a channels_last model (picked for its
    faster convolution kernels) lost it on a third of resnet50's convs, silently."""
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    model = torchvision.models.resnet50(num_classes=10).eval().to(memory_format=torch.channels_last)
    net = amc.prune(model, 0.5, example_inputs=(x,))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    torch.testing.assert_close(net(x), amc.prune(model.to(memory_format=torch.contiguous_format), 0.5,
                                                  example_inputs=(x.contiguous(),))(x), rtol=1e-4, atol=1e-5)


class _BatchedExperts(nn.Module):
    """Each expert on its own slots: `a [experts, M, K] @ w [experts, K, N]` through F.grouped_mm."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 3)
        self.w1, self.w2 = nn.Parameter(torch.randn(4, 16, 32) * 0.1), nn.Parameter(torch.randn(4, 32, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.grouped_mm(F.grouped_mm(self.inp(x), self.w1).relu(), self.w2)
        return self.out(h.mean(1))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_grouped_gemm_prunes_its_widths_and_keeps_its_experts() -> None:
    torch.manual_seed(0)
    model, x = _BatchedExperts().eval(), torch.randn(4, 5, 8)
    with pytest.warns(UserWarning, match="not on the first one alone"):  # dim 0 is the experts, not a batch
        hard = amc.prune(model, 0.5, example_inputs=(x,))
    soft = amc.prune(model, 0.5, example_inputs=(x,), mode="soft")
    assert sorted(tuple(p.shape) for p in hard.parameters() if p.dim() == 3) == [(4, 8, 16), (4, 16, 8)]
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-5, atol=1e-5)
    assert amc.count(hard, x)[0] < 0.3 * amc.count(model, x)[0]


def test_modules_keep_their_own_training_mode():
    """A model training with its backbone's BatchNorm frozen (`model.train(); model.backbone.eval()`, as detection
    fine-tuning does), or an eval model wrapped in nn.DataParallel (which is in train mode): the pruned network
    put every layer in the root's mode, so it normalised with batch statistics (outputs 0.7 apart from the same
    model pruned unwrapped) and overwrote the frozen running statistics at every call."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = torchvision.models.resnet18(num_classes=10).eval()
    plain = amc.prune(model, 0.5, example_inputs=(x,))
    wrapped = amc.prune(nn.DataParallel(model), 0.5, example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(wrapped(x), plain(x), atol=1e-5)

    model = nn.Sequential(torchvision.models.resnet18(num_classes=16), nn.BatchNorm1d(16), nn.Linear(16, 10)).train()
    model[0].eval()  # frozen backbone statistics
    small = amc.prune(model, 0.5, example_inputs=(x,))
    assert small.training
    norms = {n.name: small.network[n.module] for n in small.layer_nodes if isinstance(small.network[n.module],
                                                                                      nn.BatchNorm2d)}
    assert norms and not any(m.training for m in norms.values())
    before = {k: m.running_mean.clone() for k, m in norms.items()}
    small(x)
    assert all(torch.equal(m.running_mean, before[k]) for k, m in norms.items())
    assert small.network[small.node("1").module].training  # the head's BatchNorm1d still trains


def test_ignore_reaches_a_layer_held_under_two_names():
    """`self.shared = self.c2`: capture named the layer by its last name while named_modules() and its
    parameters use the first, so ignore=[model.c2] and ignore=["c2"] were refused as unknown layers."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)
            self.shared = self.c2

        def forward(self, x):
            y = torch.relu(self.c1(x))
            return self.fc((torch.relu(self.shared(torch.relu(self.c2(y)))) + y).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Aliased().eval(), torch.randn(2, 3, 8, 8)
    for ignore in ([model.c2], ["c2"], ["shared"], [model.shared]):
        small = amc.prune(model, 0.5, example_inputs=(x,), ignore=ignore)
        assert small.network[small.node("c2").module].out_channels == 16, ignore
