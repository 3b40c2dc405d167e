"""weight_norm layers (wav2vec2 / HuBERT's positional conv, vocoders) prune exactly through g and v, keep
their weight norm, save to JSON and pkl, fold, refit and write back; what cannot be edited says so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import amc
from amc.compressors import plan_pruning
from amc.compressors.primitives import mask_units, unit_roots
from amc.errors import ExportError, PruningError
from amc.graph import reparam

KINDS = {"param": nn.utils.parametrizations.weight_norm, "hook": nn.utils.weight_norm}


def _wn(kind: str, module: nn.Module, dim) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook; models still use it
        return KINDS[kind](module, dim=dim)


def _model(kind: str) -> nn.Module:
    """Weight norm over each kind of dim: output rows (0), input columns (1), the whole tensor (None)."""
    torch.manual_seed(0)
    return nn.Sequential(_wn(kind, nn.Conv2d(3, 16, 3, padding=1), 0), nn.ReLU(),
                         _wn(kind, nn.Conv2d(16, 16, 3, padding=1), 1), nn.ReLU(),
                         _wn(kind, nn.Conv2d(16, 24, 3, padding=1), None), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), _wn(kind, nn.Linear(24, 10), 0)).eval()


def _plain(kind: str) -> nn.Module:
    """The same function with every weight norm removed (the long-tested path of plain layers). Built
    anew: removing a parametrization from a deepcopy deletes the property from the class both share."""
    plain = _model(kind)
    for m in plain.modules():
        for attr in reparam.weight_norms(m):
            if kind == "param":
                parametrize.remove_parametrizations(m, attr)
            else:
                nn.utils.remove_weight_norm(m, attr)
    return plain


def _normed(net: nn.Module) -> list:
    return sorted(name for name, m in net.network.items() if reparam.weight_norms(m))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prunes_exactly_and_keeps_the_weight_norm(kind: str) -> None:
    """They were frozen (the whole residual of wav2vec2 with them). Pruned now as the same layers without
    weight norm are (same channels, same outputs), soft equals hard, and g and v stay trainable."""
    model, x = _model(kind), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hard = amc.prune(model, example_inputs=(x,), ratio=0.5)
    soft = amc.prune(model, example_inputs=(x,), ratio=0.5, mode="soft")
    reference = amc.prune(_plain(kind), example_inputs=(x,), ratio=0.5)
    assert amc.count(hard, x)[0] == amc.count(reference, x)[0] < 0.3 * amc.count(model, x)[0]
    torch.testing.assert_close(hard(x), reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)
    for name, m in hard.network.items():  # the computed weight is the reference's sliced weight
        if hasattr(reference.network[name], "weight"):
            torch.testing.assert_close(m.weight, reference.network[name].weight, rtol=1e-5, atol=1e-7)
    assert _normed(hard) == _normed(soft) == ["0", "2", "4", "9"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    hard.train()
    opt = torch.optim.SGD(hard.parameters(), lr=0.1)
    hard(x).square().mean().backward()
    g = reparam.source_tensor(hard.network["2"], "weight")
    assert g.grad is not None and g.grad.abs().sum() > 0
    opt.step()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("fmt", ["json", "pkl"])
def test_saves_and_loads_with_its_weight_norm(kind: str, fmt: str, tmp_path) -> None:
    """JSON refused the generated ParametrizedConv2d class and pickle refused parametrized modules (a raw
    RuntimeError): a traced wav2vec2 could not be saved at all. Both formats keep g and v now."""
    model, x = _model(kind), torch.randn(2, 3, 8, 8)
    for net in (amc.trace(model, x), amc.prune(model, example_inputs=(x,), ratio=0.5)):
        path = str(tmp_path / f"net.{fmt}")
        net.save(path)
        back = amc.load(path)
        assert torch.equal(back(x), net(x))
        assert _normed(back) == _normed(net) == ["0", "2", "4", "9"]
        assert sorted(n for n, _ in back.named_parameters()) == sorted(n for n, _ in net.named_parameters())
        assert _normed(net) == ["0", "2", "4", "9"]  # saving put the weight norms back on `net`
        assert not any(t.requires_grad is False for t in back.parameters())


@pytest.mark.parametrize("fmt", ["json", "pkl"])
def test_other_parametrizations_refuse_to_save_by_name(fmt: str, tmp_path) -> None:
    net = amc.trace(nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3)), nn.ReLU()),
                    torch.randn(1, 3, 8, 8))
    with pytest.raises(ExportError, match="_SpectralNorm.*remove_parametrizations"):
        net.save(str(tmp_path / f"net.{fmt}"))
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("axis,dim", [(0, 0), (1, 0), (0, 1), (1, 1), (0, -1), (2, 2)])
def test_slicing_and_zeroing_g_and_v_is_exact(axis: int, dim: int) -> None:
    """Across the norm's dim the kept part of v has a smaller norm: g is rescaled so the computed weight is
    the original's slice. A slice left with only zeros gets g = 0 and no 0 / 0."""
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(6, 8, 3), dim=dim)
    w = conv.weight.detach().clone()
    idx = torch.tensor([0, 2])
    reparam.select(conv, "weight", axis, idx)
    torch.testing.assert_close(conv.weight, w.index_select(axis, idx))
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(6, 8, 3), dim=dim)
    w = conv.weight.detach().clone()
    reparam.zero(conv, "weight", axis, idx)
    torch.testing.assert_close(conv.weight, w.index_fill(axis, idx, 0))
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 2, 1), dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original1[0, 1] = 0
    reparam.select(conv, "weight", 1, torch.tensor([1]))
    assert torch.isfinite(conv.weight).all() and conv.weight[0].abs().sum() == 0


def test_module_called_twice_is_one_group() -> None:
    """Coupling reads one identity per stored tensor: a weight-normed conv called twice is one group
    (its computed weight is a new tensor at each read, whose id could be reused by another layer's)."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(torch.relu(self.body(torch.relu(self.stem(x)))))))

    model, x = Twice().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, example_inputs=(x,), ratio=0.5)
    soft = amc.prune(model, example_inputs=(x,), ratio=0.5, mode="soft")
    assert hard.module_of("body").weight.shape == (4, 4, 3, 3)
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)


def test_folding_batchnorm_into_a_weight_normed_conv_is_exact() -> None:
    """fold_batchnorm multiplied `conv.weight` in place: on a weight-normed conv that edited a temporary and
    only the bias changed (a silently different quantised network)."""
    from amc.compressors.quant.prepare import fold_batchnorm

    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 16, 3, padding=1)), nn.BatchNorm2d(16),
                      nn.ReLU()).eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    m[1].weight.data.normal_()
    x = torch.randn(2, 3, 8, 8)
    net = amc.trace(m, x)
    folded, names = fold_batchnorm(net)
    assert names == ["1"]
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_least_squares_refit_writes_through_g_and_v() -> None:
    """ChannelPruning's refit copied into `weight.data`: on a weight-normed layer the fit was lost."""
    from amc.compressors import ChannelPruning

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                      nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 16, 3, padding=1)), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    cp = ChannelPruning(m, data, compress_ratio=0.5, trainset_ratio=1.0, example_inputs=(data[0][0][:1],))
    net = cp.compress()
    err = cp.layer_errors["2"]
    assert err["after"] < err["before"]
    assert _normed(net) == ["2"]
    xs = data[0][0]
    assert torch.isfinite(net(xs)).all()


def test_in_place_primitives_name_the_layer() -> None:
    model, x = _model("param"), torch.randn(1, 3, 8, 8)
    plan = plan_pruning(amc.trace(model, x), "l2", (x,))
    group = next(i for i, g in enumerate(plan.groups) if any(p.startswith("0") for p in g.producers))
    with pytest.raises(PruningError, match="'0' computes its weight by weight_norm"):
        mask_units(plan, unit_roots(plan, group, [0]))


def _wav2vec2(cls_name: str):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, cls_name.replace("ForCTC", "Config"))(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        vocab_size=12)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("cls_name", ["Wav2Vec2ForCTC", "HubertForCTC", "Data2VecAudioForCTC"])
def test_speech_transformers_prune_their_residual_and_round_trip(cls_name: str, tmp_path) -> None:
    """Their positional conv is weight-normed: the residual stream (every attention and MLP output) was
    frozen, 0.56x MACs at ratio 0.5; the pruned network saves, loads, writes back into the model and
    reloads from a transformers checkpoint through amc's loader."""
    model, x = _wav2vec2(cls_name), torch.randn(2, 800)
    net = amc.trace(model, x)
    small = amc.prune(net, ratio=0.5)
    assert amc.count(small, x)[0] < 0.4 * amc.count(net, x)[0]
    soft = amc.prune(net, ratio=0.5, mode="soft")
    torch.testing.assert_close(soft(x).logits, small(x).logits, rtol=1e-4, atol=1e-5)
    for fmt in ("json", "pkl"):
        small.save(str(tmp_path / f"n.{fmt}"))
        torch.testing.assert_close(amc.load(str(tmp_path / f"n.{fmt}"))(x).logits, small(x).logits, rtol=0, atol=0)
    eager = amc.export.to_module(small, model)
    x2 = torch.randn(3, 1200)
    torch.testing.assert_close(eager(x2).logits, small(x2).logits, rtol=1e-5, atol=1e-5)
    # a transformers checkpoint: amc's loader rebuilt neither the weight-normed conv nor a GroupNorm it resized
    amc.export.save_pretrained(eager, str(tmp_path / "hf"))
    back = amc.export.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(back(x2).logits, small(x2).logits, rtol=1e-5, atol=1e-5)


def test_removing_the_weight_norm_from_the_pruned_copy_leaves_the_model_alone() -> None:
    """deepcopy keeps the class parametrize generated, and remove_parametrizations deletes the weight
    property from it: removing it from the pruned network (before an export, say) broke the user's model
    ('object has no attribute weight'). The pruned network's layers have classes of their own now."""
    model, x = _model("param"), torch.randn(2, 3, 8, 8)
    expected = model(x)
    small = amc.prune(model, example_inputs=(x,), ratio=0.5)
    for copy_of in (small, small.copy(), amc.export.to_module(small, model)):
        for m in copy_of.modules():
            if parametrize.is_parametrized(m):
                parametrize.remove_parametrizations(m, "weight")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert _normed(amc.trace(model, x)) == ["0", "2", "4", "9"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_taylor_scores_the_computed_weight(kind: str) -> None:
    """Taylor differentiated parameters only, so a weight-normed weight scored 0 (its group ranked by the
    BatchNorm alone), and the older hook's weight, left with a grad_fn, made the copy fail."""
    model, x = _model(kind), torch.randn(4, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    net = amc.prune(model, 0.5, "taylor", example_inputs=(x,), dataloader=data)
    reference = amc.prune(_plain(kind), 0.5, "taylor", example_inputs=(x,), dataloader=data)
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-6)
