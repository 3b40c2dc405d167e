"""VTP (seed 001): gates insert as identity nodes, training moves them, pruning meets the budget and folds
the gates exactly, bad input fails loudly."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors import VTP, VisionTransformerPruning
from amc.compressors.vtp import FeatureGate, fold_gates, gates_of, insert_gates
from amc.errors import PruningError
from amc.models import create


def _vit():
    torch.manual_seed(0)
    return create("vit_digits", image_size=8, dim=24, depth=2, heads=2).eval()


def _tv_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=24, mlp_dim=48, num_classes=10).eval()


def _loader(shape, n=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=8)


@pytest.mark.parametrize("build,shape", [(_vit, (1, 8, 8)), (_tv_vit, (3, 16, 16))])
def test_gates_are_identity_and_fold_exactly(build, shape):
    model = build()
    x = torch.randn(3, *shape)
    gated, pairs = insert_gates(amc.trace(model, x[:1]))
    assert len(pairs) >= 2 and all(isinstance(g, FeatureGate) for g in gates_of(gated).values())
    torch.testing.assert_close(gated(x), model(x))
    for g in gates_of(gated).values():
        g.gate.data.uniform_(0.2, 1.5)
    folded = fold_gates(gated)
    assert not gates_of(folded)
    torch.testing.assert_close(folded(x), gated(x), rtol=1e-5, atol=1e-5)


def test_zeroed_mlp_gates_equal_the_pruned_network():
    """The MLP's hidden dims: the gated network with the pruned dims' gates at 0 computes what the pruned
    network computes (the residual stream and the head dims are pruned as whole coupled groups instead)."""
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    c = VTP(model, _loader((1, 8, 8)), compress_ratio=0.3, epochs=0, finetune_epochs=0, example_inputs=(x[:1],))
    gated = c.gated
    torch.manual_seed(1)
    for name, g in gates_of(gated).items():
        g.gate.data.uniform_(0.5, 1.5)
        if name.endswith("fc2.gate"):
            g.gate.data[:10] = 0.0  # these hidden dims carry nothing
    from amc.compressors.prune import plan_pruning
    from amc.compressors.vtp.compressor import gate_scores, units_below

    plan = plan_pruning(gated, "l2", (x[:1],))
    scores = gate_scores(plan)
    only_mlp = [s if any(m.axis.node.endswith("fc2.gate") for m in g.members) else None
                for g, s in zip(plan.groups, scores)]
    units, emptied = units_below(plan, only_mlp, 0.25)
    pruned = fold_gates(plan.apply_units(units, "hard"))
    assert not emptied
    assert pruned.network["blocks_0_fc2"].in_features == model.blocks[0].fc2.in_features - 10
    torch.testing.assert_close(pruned(x), gated(x), rtol=1e-5, atol=1e-5)


def test_vtp_meets_the_budget_and_trains_gates():
    model = _vit()
    loader = _loader((1, 8, 8))
    x1 = torch.randn(1, 1, 8, 8)
    c = VisionTransformerPruning(model, loader, target_macs=0.6, sparsity=1e-2, epochs=1, finetune_epochs=1,
                                 lr=1e-3, example_inputs=(x1,))
    net = c.compress()
    assert amc.count(net, x1)[0] <= 0.6 * amc.count(model, x1)[0]
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert len(c.train_history) == 1 and c.zeta is not None
    trained = gates_of(c.trained_gated).values()
    assert all(not torch.equal(g.gate, torch.ones_like(g.gate)) for g in trained)  # L1 + task moved every gate
    assert all(torch.equal(g.gate, torch.ones_like(g.gate)) for g in gates_of(c.gated).values())  # copy trained
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), _vit().state_dict().values()))


def test_torchvision_vit_prunes_to_half_and_round_trips(tmp_path):
    model = _tv_vit()
    x = torch.randn(3, 3, 16, 16)
    net = VTP(model, _loader((3, 16, 16)), compress_ratio=0.5, epochs=0, finetune_epochs=0,
              example_inputs=(x[:1],)).compress()
    assert amc.count(net, x[:1])[0] <= 0.5 * amc.count(model, x[:1])[0]
    path = net.save_to_json(str(tmp_path / "vtp.json"))
    back = amc.ReconstructedNetwork.load_from_json(path)
    assert torch.equal(back(x), net(x)) and net(x[:1]).shape == (1, 10)


def test_bad_input_is_refused():
    loader = _loader((1, 8, 8))
    with pytest.raises(PruningError, match="no Linear layer reading|no attention"):
        VTP(create("digits_resnet"), loader, epochs=0)
    for bad in (1.0, -0.2, 2):
        with pytest.raises(PruningError, match="compress_ratio"):
            VTP(_vit(), loader, compress_ratio=bad, epochs=0)
    with pytest.raises(PruningError, match="heads=True"):
        VTP(_vit(), loader, heads=True, epochs=0)
    c = VTP(_vit(), loader, threshold=10.0, epochs=0, finetune_epochs=0)  # above every gate (all are 1)
    net = c.compress()
    assert c.warnings and "at least one is kept" in c.warnings[0]
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
