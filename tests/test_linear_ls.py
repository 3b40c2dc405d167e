"""Least-squares refit of pruned Linears (`amc.compressors.linear_ls.refit_linears`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import amc
from amc.compressors.linear_ls import refit_linears, shrunk_linears
from amc.compressors.prune import plan_pruning
from amc.errors import PruningError


class Mlp(nn.Module):
    """x + fc2(relu(fc1(x))) on [N, T, 8] tokens; hidden units 8..15 are 2x units 0..7, so pruning
    units 0..7 loses nothing that a refit of fc2 cannot restore exactly."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        with torch.no_grad():
            w, b = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
            self.fc1.weight.copy_(torch.cat([w, 2 * w]))
            self.fc1.bias.copy_(torch.cat([b, 2 * b]))
            self.fc2.weight.copy_(torch.randn(8, 16, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _pruned(model: nn.Module, x: torch.Tensor):
    net = amc.trace(model, x[:1])
    plan = plan_pruning(net, "l2")
    (group,) = plan.groups
    roots = group.units[:8]  # hidden units 0..7
    return plan, roots, plan.apply_units(roots)


def test_refit_restores_redundant_units_exactly() -> None:
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(32, 5, 8)
    plan, roots, small = _pruned(model, x)
    assert shrunk_linears(plan.net, small) == ("fc2",)
    test = torch.randn(16, 5, 8)
    err_pruned = (small(test) - model(test)).abs().max().item()
    errors = refit_linears(plan, roots, small, (x,), ridge=1e-9)
    err_refit = (small(test) - model(test)).abs().max().item()
    assert err_pruned > 0.5  # pruning alone loses a lot...
    assert err_refit < 1e-3  # ...that least squares restores on unseen inputs
    assert errors["fc2"]["after"] < 1e-6 < errors["fc2"]["before"]


def test_row_mask_keeps_padding_out_of_the_fit() -> None:
    torch.manual_seed(1)
    model = Mlp().eval()
    with torch.no_grad():
        model.fc1.weight[8:].mul_(-0.5)  # break the redundancy: refits are now approximate
    x = torch.randn(8, 6, 8)
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[:, 3:] = False
    x_garbage = x.clone()
    x_garbage[:, 3:] = 1e3  # "padding" tokens that would dominate an unmasked fit
    plan, roots, small_a = _pruned(model, x)
    small_b = plan.apply_units(roots)
    refit_linears(plan, roots, small_a, (x_garbage,), row_mask=mask)
    refit_linears(plan, roots, small_b, (x[:, :3],))
    assert torch.allclose(small_a.module_of("fc2").weight, small_b.module_of("fc2").weight, atol=1e-4)


def test_bad_layer_name_is_refused() -> None:
    model = Mlp().eval()
    x = torch.randn(4, 3, 8)
    plan, roots, small = _pruned(model, x)
    with pytest.raises(PruningError, match="not a Linear"):
        refit_linears(plan, roots, small, (x,), layers=["relu"])
    with pytest.raises(PruningError):
        refit_linears(plan, np.zeros(0, dtype=np.int64), small, (x,))  # roots of another pruning


def test_output_energy_scores_rank_a_dead_unit_last() -> None:
    from amc.compressors.linear_ls import output_energy_scores

    torch.manual_seed(2)
    model = Mlp().eval()
    with torch.no_grad():
        model.fc1.weight[3].zero_()
        model.fc1.bias[3] = 0.0  # unit 3 always outputs 0: nothing downstream depends on it
        model.fc2.weight[:, 3] = 100.0  # ...however large its weights (L2 would keep it)
    x = torch.randn(16, 4, 8)
    plan = plan_pruning(amc.trace(model, x[:1]), "l2")
    (scores,) = output_energy_scores(plan, (x,))
    assert scores.shape == (16,) and bool((scores >= 0).all())
    assert int(scores.argmin()) == 3 and float(scores[3]) == 0.0
    assert int(plan.importance[0].argmax()) == 3  # the L2 criterion ranks the same unit first


class TwoBlocks(nn.Module):
    """Two residual MLP blocks (`x + drop(fc2(gelu(fc1(x))))`), as in BERT's and timm's encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": nn.Linear(32, 16),
                                                   "drop": nn.Dropout(0.1)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["drop"](b["fc2"](torch.nn.functional.gelu(b["fc1"](x))))
        return x


def test_residual_targets_absorb_the_error_left_in_the_stream() -> None:
    """With residual=True the second block's fc2 is fitted to what the original SUM needs given the
    stream the pruned first block left, so the network's output error falls below the plain refit's."""
    from amc.compressors.linear_ls import residual_partner

    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(64, 10, 16)
    errs = {}
    for residual in (False, True):
        net = amc.trace(model, x[:1])
        plan = plan_pruning(net, "l2")
        roots = plan.pruned_roots({"blocks.0.fc1": 0.875, "blocks.1.fc1": 0.5})
        small = plan.apply_units(roots)
        refit_linears(plan, roots, small, (x,), residual=residual)
        errs[residual] = float((small(x) - model(x)).pow(2).sum() / model(x).pow(2).sum())
    assert residual_partner(net, "blocks.1.fc2") is not None and residual_partner(net, "blocks.1.fc1") is None
    assert errs[True] < 0.8 * errs[False], errs
