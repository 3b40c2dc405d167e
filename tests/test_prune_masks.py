"""Models pruned with torch.nn.utils.prune (weight = weight_orig * weight_mask, recomputed by a forward
pre-hook) get their channels pruned exactly: orig and mask are sliced together, the unstructured sparsity
survives, and the result saves, reloads and writes back with its masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

import amc
from amc.compressors import plan_pruning
from amc.compressors.primitives import mask_units, unit_roots
from amc.errors import PruningError
from amc.graph import reparam


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


def _masked() -> nn.Sequential:
    """Each way torch prunes: unstructured, structured along dim 1, two methods stacked (a container), a
    bias; run once with grad, as after a training step (the hook's weight is then a non-leaf tensor)."""
    m = _layers()
    torch_prune.l1_unstructured(m[0], "weight", amount=0.4)
    torch_prune.ln_structured(m[3], "weight", amount=0.25, n=2, dim=1)
    torch_prune.random_unstructured(m[5], "weight", amount=0.3)
    torch_prune.l1_unstructured(m[5], "weight", amount=0.2)
    torch_prune.l1_unstructured(m[10], "bias", amount=0.5)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    return m


def _baked(masked: nn.Module) -> nn.Sequential:
    """The same function as plain layers (weight = orig * mask stored as the parameter)."""
    plain = _layers()
    with torch.no_grad():
        for (_, src), (_, dst) in zip(masked.named_modules(), plain.named_modules()):
            for name, t in list(dst.named_parameters(recurse=False)) + list(dst.named_buffers(recurse=False)):
                value = reparam.computed(src, name) if name in reparam.masks(src) else getattr(src, name)
                t.copy_(value)
    return plain


def _masked_nodes(net: amc.ReconstructedNetwork) -> dict:
    return {name: sorted(reparam.masks(m)) for name, m in net.network.items() if reparam.masks(m)}


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_prunes_as_the_same_plain_layers_and_keeps_the_masks(mode: str, criterion: str) -> None:
    """Hard pruning failed ('running_mean should contain 16 elements not 8') and soft pruning zeroed the
    hook's temporary, so its channels came back at the next call. Now the result equals the plain layers'
    (same channels, same MACs, same outputs), and each kept mask is the slice of the user's mask."""
    model, x = _masked(), torch.randn(4, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = amc.prune(model, 0.5, criterion, example_inputs=(x,), mode=mode, dataloader=data)
    reference = amc.prune(_baked(model), 0.5, criterion, example_inputs=(x,), mode=mode, dataloader=data)
    assert amc.count(net, x)[0] == amc.count(reference, x)[0]
    if mode == "hard":
        assert amc.count(net, x)[0] < 0.4 * amc.count(model, x)[0]
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-6)
    assert _masked_nodes(net) == {"0": ["weight"], "3": ["weight"], "5": ["weight"], "10": ["bias"]}
    still_masked = 0
    for name, m in net.network.items():
        ref = reference.network[name]
        for attr in reparam.masks(m):
            torch.testing.assert_close(reparam.computed(m, attr), getattr(ref, attr), rtol=0, atol=0)
            masked_out, zero = reparam.masks(m)[attr] == 0, getattr(ref, attr) == 0
            assert torch.equal(masked_out, zero if mode == "hard" else masked_out & zero)
            still_masked += int(masked_out.sum())
    assert still_masked > 50
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_fine_tuning_keeps_the_sparsity() -> None:
    model, x = _masked(), torch.randn(4, 3, 8, 8)
    net = amc.prune(model, 0.5, example_inputs=(x,)).train()
    zeros = (reparam.masks(net.network["5"])["weight"] == 0).sum()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    net.eval()(x)
    assert zeros > 0 and (net.network["5"].weight == 0).sum() >= zeros


@pytest.mark.parametrize("fmt", ["json", "pkl"])
def test_saves_and_reloads_with_its_masks(fmt: str, tmp_path) -> None:
    """JSON refused the module ('rebuilt from config differs'); pkl saved torch's pruning hooks, which the
    safe loader then refused."""
    model, x = _masked(), torch.randn(2, 3, 8, 8)
    net = amc.prune(model, 0.5, example_inputs=(x,))
    path = str(tmp_path / f"net.{fmt}")
    net.save(path)
    back = amc.load(path)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert _masked_nodes(back) == _masked_nodes(net)
    for name, m in back.network.items():
        for attr, mask in reparam.masks(m).items():
            assert torch.equal(mask, reparam.masks(net.network[name])[attr])
            torch_prune.remove(m, attr)  # still torch's own pruning: the user can make it permanent
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert _masked_nodes(net)  # saving left the network as it was


def test_writes_back_into_the_model_with_its_masks() -> None:
    model, x = _masked(), torch.randn(2, 3, 8, 8)
    net = amc.prune(model, 0.5, example_inputs=(x,))
    eager = amc.export.to_module(net, model, x)
    torch.testing.assert_close(eager(x), net(x), rtol=1e-5, atol=1e-6)
    assert reparam.masks(eager[5])["weight"].shape == net.network["5"].weight.shape
    assert model[5].weight_orig.shape == (24, 16, 3, 3)  # written into a copy


def test_a_refit_that_needs_masked_weights_opens_the_mask_and_says_so() -> None:
    conv = nn.Conv2d(2, 3, 1)
    torch_prune.l1_unstructured(conv, "weight", amount=0.5)
    value = torch.ones(3, 2, 1, 1)
    with pytest.warns(UserWarning, match="mask had removed"):
        reparam.assign(conv, "weight", value)
    assert torch.equal(reparam.computed(conv, "weight"), value)
    folded = reparam.computed(conv, "weight") * 2 * reparam.masks(conv)["weight"]
    reparam.assign(conv, "weight", folded)  # zero where the mask is: no warning needed, exact
    assert torch.equal(reparam.computed(conv, "weight"), folded)


def test_in_place_primitives_name_the_mask() -> None:
    model, x = _masked(), torch.randn(1, 3, 8, 8)
    plan = plan_pruning(amc.trace(model, x), "l2", (x,))
    group = next(i for i, g in enumerate(plan.groups) if any(p.startswith("5") for p in g.producers))
    with pytest.raises(PruningError, match=r"'5' computes its weight by a torch.nn.utils.prune mask.*prune.remove"):
        mask_units(plan, unit_roots(plan, group, [0]))


def test_compressors_copy_a_model_whose_hooks_ran_under_grad() -> None:
    """After a training step the hook's weight is a non-leaf tensor and `copy.deepcopy` refuses the module:
    every compressor that copies the user's model failed with torch's RuntimeError."""
    from amc.compressors import ChannelPruning
    from amc.trainers import recalibrate_bn

    model, x = _masked(), torch.randn(2, 3, 8, 8)
    assert model[0].weight.grad_fn is not None
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(UserWarning, match="mask had removed"):  # a dense least-squares fit, said so
        net = ChannelPruning(model, data, compress_ratio=0.5, trainset_ratio=1.0, example_inputs=(x[:1],)).compress()
    assert torch.isfinite(net(x)).all() and _masked_nodes(net)
    assert recalibrate_bn(model, data) is not model


def test_torch_ao_sparsifier_layers_are_named_not_crashed() -> None:
    """A layer parametrized by torch.ao.pruning's FakeSparsity (any parametrization: a new tensor at each
    read, whose id the next temporary reuses) crashed the analysis with a bare KeyError."""
    sparsifier = pytest.importorskip("torch.ao.pruning").WeightNormSparsifier(sparsity_level=0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(2, 16)
    frozen = plan_pruning(amc.trace(model, x), "l2", (x,)).frozen_report()
    assert [f["node"] for f in frozen] == ["0", "2", "4"]
    assert "FakeSparsity; sparsifier.squash_mask()" in frozen[0]["causes"][0]
    sparsifier.squash_mask()
    assert amc.count(amc.prune(model, 0.5, example_inputs=(x,)), x)[0] < 0.5 * amc.count(model, x)[0]
