"""Soft Filter Pruning and RePr callbacks on a tiny digits CNN."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.optim as optim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import TinyCNN, digits_loaders, seed_everything  # noqa: E402

from amc.errors import PruningError  # noqa: E402
from amc.trainers import BaseTrainer, RePr, SoftFilterPruning, TrainerCallback, orthogonality_scores  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def _train(callbacks, epochs, seed=0, lr=0.05):
    seed_everything(seed)
    tr, va = digits_loaders(batch_size=32, n_train=256, n_val=128)
    net = TinyCNN(width=8)
    opt = optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    trainer = BaseTrainer(tr, va, None, net, nn.CrossEntropyLoss(), opt, None, epochs, "cpu", None, None, None,
                          callbacks=callbacks, progress=False)
    return trainer, trainer.run()


def _zero_filters(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().flatten(1).abs().sum(1) == 0


# ---------------------------------------------------------------------------- SFP
def test_sfp_prunes_lowest_l2_norm_filters():
    conv = nn.Conv2d(2, 6, 3)
    with torch.no_grad():
        base = torch.randn(2, 3, 3)
        for i, scale in enumerate([5.0, 0.1, 3.0, 0.2, 4.0, 0.3]):
            conv.weight[i] = base * scale
    sfp = SoftFilterPruning(ratio=0.5, scope="layer")
    masks = sfp.prune(nn.Sequential(conv))
    assert masks["0"].tolist() == [True, False, True, False, True, False]
    assert _zero_filters(conv).tolist() == [False, True, False, True, False, True]
    assert (conv.bias[~masks["0"]] == 0).all()
    assert sfp.pruned_filters() == {"0": [1, 3, 5]}


def test_sfp_end_to_end_zeroes_filters_each_epoch_and_lets_them_regrow():
    sfp = SoftFilterPruning(ratio=0.25)
    regrown = []

    class BeforeSFP(TrainerCallback):  # runs before SFP at each epoch end: did last epoch's zeros regrow?
        def on_epoch_end(self, trainer, epoch):
            if sfp.masks:
                regrown.append(all(not _zero_filters(dict(trainer.module.named_modules())[n])[~m].any()
                                   for n, m in sfp.masks.items()))

    trainer, history = _train([BeforeSFP(), sfp], epochs=3)
    convs = {"conv1": trainer.module.conv1, "conv2": trainer.module.conv2}
    assert set(sfp.masks) == set(convs)
    for name, conv in convs.items():
        keep = sfp.masks[name]
        assert int((~keep).sum()) == int(conv.out_channels * 0.25)
        assert _zero_filters(conv).tolist() == (~keep).tolist()  # exactly the masked filters are zero
    assert regrown == [True, True]
    assert history[-1]["val"]["accuracy"] > 0.5  # the soft-pruned network still works


def test_sfp_group_scope_silences_coupled_channels_and_hard_prune_is_exact():
    """A residual net: coupled convs share masks, silenced channels are exactly 0 after BN (so the
    eval network equals its hard-pruned self), and the silenced filters regrow in the next epoch."""
    from amc.models import create

    seed_everything(0)
    tr, va = digits_loaders(batch_size=32, n_train=256, n_val=128)
    net = create("digits_resnet", in_channels=1, image_size=8)
    sfp = SoftFilterPruning(ratio=0.3)
    regrown = []

    class BeforeSFP(TrainerCallback):
        def on_epoch_end(self, trainer, epoch):
            if sfp.masks:
                mods = dict(trainer.module.named_modules())
                regrown.append(all(not _zero_filters(mods[n])[~m].all() for n, m in sfp.masks.items() if (~m).any()))

    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = BaseTrainer(tr, va, None, net, nn.CrossEntropyLoss(), opt, None, 3, "cpu", None, None, None,
                          callbacks=[BeforeSFP(), sfp], progress=False)
    trainer.run()
    assert regrown == [True, True]
    masks = sfp.masks
    residual = [n for n in masks if n == "stem.0" or n.startswith("stages.0.") and n.endswith("conv2")]
    assert len(residual) >= 2 and all(torch.equal(masks[n], masks[residual[0]]) for n in residual)
    assert any((~m).any() for m in masks.values())
    net.eval()
    x = next(iter(va))[0]
    hard = sfp.hard_prune()
    with torch.no_grad():
        torch.testing.assert_close(hard(x), net(x), atol=1e-5, rtol=1e-4)
    import amc
    assert amc.count(hard, x[:1])[0] < amc.count(net, x[:1])[0]
    tuned = sfp.hard_prune(recalibrate=tr)  # same channels, fresh BatchNorm statistics
    assert amc.count(tuned, x[:1]) == amc.count(hard, x[:1]) and not tuned.training
    bn = next(n for n, m in tuned.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(dict(tuned.named_modules())[bn].running_mean, dict(hard.named_modules())[bn].running_mean)


def test_recalibrate_bn_re_estimates_statistics_on_a_copy():
    from amc.errors import DataError
    from amc.trainers import recalibrate_bn

    seed_everything(0)
    tr, _ = digits_loaders(batch_size=32, n_train=96, n_val=32)
    net = TinyCNN(width=4).eval()
    with torch.no_grad():
        net.bn1.running_mean.fill_(5.0)
        net.bn1.running_var.fill_(9.0)
    fresh = recalibrate_bn(net, tr)
    assert not fresh.training and net.bn1.running_mean.eq(5.0).all()  # the original is untouched
    with torch.no_grad():
        acts = torch.cat([net.conv1(x) for x, _ in tr])  # what bn1 sees, over the whole loader
    torch.testing.assert_close(fresh.bn1.running_mean, acts.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert fresh.bn1.momentum == net.bn1.momentum
    with pytest.raises(DataError, match="no batches"):
        recalibrate_bn(net, [])


# ---------------------------------------------------------------------------- RePr
def test_orthogonality_score_matches_paper_formula():
    w = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]).view(4, 3, 1, 1)
    c = 2 ** -0.5  # |cos| between e1 and e1+e2
    expected = torch.tensor([1 + 0 + c, 1 + 0 + c, 0 + 0 + c, c + c + c]) / 4
    assert torch.allclose(orthogonality_scores(w), expected, atol=1e-6)


def test_repr_global_ranking_never_empties_a_layer():
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(4, 1, 1, 1))          # identical filters: maximal redundancy
        model[1].weight.copy_(torch.eye(4).view(4, 4, 1, 1))   # orthogonal filters: score 0
    masks = RePr(s1=1, s2=1, ratio=0.5, scope="global").drop(model)
    assert int(masks["0"].sum()) == 1                      # 3 of 4 dropped, one always kept
    assert int((~masks["1"]).sum()) == 1                   # the remaining budget falls to the other layer


def test_repr_end_to_end_masks_for_s2_epochs_then_reinitialises_orthogonally():
    repr_cb = RePr(s1=1, s2=2, ratio=0.25, scope="layer", seed=0)
    checks = {"steps": 0, "nonzero_during_s2": 0, "epoch_end_zero": []}

    class AfterRePr(TrainerCallback):
        def on_after_step(self, trainer, step):
            for name, keep in repr_cb.masks.items():
                checks["steps"] += 1
                conv = dict(trainer.module.named_modules())[name]
                checks["nonzero_during_s2"] += int(conv.weight[~keep].abs().sum() > 0)

        def on_epoch_end(self, trainer, epoch):
            checks["epoch_end_zero"].append({n: bool(_zero_filters(dict(trainer.module.named_modules())[n])[~m].all())
                                             for n, m in repr_cb.masks.items()})

    trainer, history = _train([repr_cb, AfterRePr()], epochs=3)
    # dropped at the end of epoch 1, held at zero through epochs 2-3, re-initialised at the end of epoch 3
    assert checks["epoch_end_zero"][0] == {"conv1": True, "conv2": True}
    assert checks["epoch_end_zero"][1] == {"conv1": True, "conv2": True}
    assert checks["epoch_end_zero"][2] == {}  # masks cleared by the re-init
    assert checks["steps"] == 2 * 8 * 2 and checks["nonzero_during_s2"] == 0
    assert repr_cb.cycles == 1 and repr_cb.masks == {}
    for name, conv in (("conv1", trainer.module.conv1), ("conv2", trainer.module.conv2)):
        rec = repr_cb.last_reinit[name]
        assert len(rec["dropped"]) == int(conv.out_channels * 0.25)
        w = conv.weight.detach().flatten(1).double()
        new, kept = w[rec["dropped"]], w[rec["kept"]]
        assert (new.norm(dim=1) > 1e-3).all()  # no longer zero
        cos = (new / new.norm(dim=1, keepdim=True)) @ (kept / kept.norm(dim=1, keepdim=True)).t()
        assert cos.abs().max() < 1e-4
        gram = (new / new.norm(dim=1, keepdim=True)) @ (new / new.norm(dim=1, keepdim=True)).t()
        assert torch.allclose(gram, torch.eye(len(new), dtype=gram.dtype), atol=1e-4)
    assert history[-1]["val"]["accuracy"] > 0.3


def test_repr_drops_the_least_orthogonal_filters():
    conv = nn.Conv2d(1, 4, (1, 3), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]).view(4, 1, 1, 3))
    masks = RePr(s1=1, s2=1, ratio=0.5, scope="layer").drop(nn.Sequential(conv))
    assert masks["0"].tolist() == [False, False, True, True]  # the near-parallel pair goes


def test_plugin_bad_input():
    with pytest.raises(PruningError, match="must be in \\[0, 1\\)"):
        SoftFilterPruning(ratio=1.0)
    with pytest.raises(PruningError, match="'fc' is not an nn.Conv2d"):
        SoftFilterPruning(0.5, layers=["fc"], scope="layer").prune(TinyCNN())
    with pytest.raises(PruningError, match="use scope='layer'"):
        SoftFilterPruning(0.5, layers=["conv1"])
    with pytest.raises(PruningError, match="scope='conv'"):
        SoftFilterPruning(0.5, scope="conv")
    with pytest.raises(PruningError, match="needs example_inputs"):
        SoftFilterPruning(0.5).prune(TinyCNN())
    with pytest.raises(PruningError, match="at least one SoftFilterPruning step"):
        SoftFilterPruning(0.5).hard_prune()
    with pytest.raises(PruningError, match="s1 >= 1 and s2 >= 1"):
        RePr(s1=0, s2=1)
    with pytest.raises(PruningError, match="scope='net'"):
        RePr(s1=1, s2=1, scope="net")
    with pytest.raises(PruningError, match="has no nn.Conv2d layers"):
        SoftFilterPruning(0.5, scope="layer").prune(nn.Linear(3, 3))
