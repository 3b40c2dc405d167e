"""The compressors' shared machinery on tiny inputs: sampling rows and passes (amc.compressors.sampling),
the one MACs-budget search (amc.compressors.budget), the low-rank ENC rank strategies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import amc
from amc.compressors.budget import smallest_within_budget
from amc.compressors.lowrank import CombinedRanks, EnergyRanks, LayerInfo, RankMetric, ranks_under_budget, uniform_ranks
from amc.compressors.sampling import (PositionSampler, StopPass, count_images, hooked_pass, input_rows, observe,
                                      output_rows, positions_per_image, stack_batches)


# -- budget ----------------------------------------------------------------------------------------------


def test_budget_search_finds_the_first_step_that_fits():
    cost = lambda x: 10 - math.floor(10 * x)  # noqa: E731 - a step function, cheaper as x grows
    assert abs(smallest_within_budget(cost, 6.5, hi=0.99, tol=1e-6) - 0.4) < 1e-6
    assert smallest_within_budget(cost, 6.5, hi=0.99, tol=1e-6) >= 0.4  # never on the side that does not fit
    x = smallest_within_budget(cost, 6.5, hi=0.99)  # tol 0: to float precision
    assert cost(x) <= 6.5 and cost(np.nextafter(x, 0.0)) > 6.5
    assert smallest_within_budget(cost, 100.0, hi=0.5) < 1e-6  # everything fits: towards 0
    assert smallest_within_budget(cost, 6.5, hi=0.99, max_steps=1) == 0.495  # one halving only


# -- sampling --------------------------------------------------------------------------------------------


def test_positions_are_seeded_distinct_and_sized_per_layer():
    out = torch.randn(3, 4, 5, 5)
    a, b = (PositionSampler(None, n_images=3, seed=7).draw(out, fit_dim=4, channels_first=True) for _ in range(2))
    assert torch.equal(a, b)  # the seed alone decides
    assert a.shape == (3, positions_per_image(None, 4, 3, 25)) == (3, 22)  # 16 rows per dim over 3 images
    assert all(len(set(row.tolist())) == a.shape[1] for row in a)
    assert PositionSampler(8, 3, 0).draw(torch.randn(3, 6, 4), 4, channels_first=False) is None  # 6 tokens <= 8
    assert PositionSampler(2, 3, 0).draw(torch.randn(3, 6, 4), 4, channels_first=False).shape == (3, 2)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(3, 5, (3, 1), padding="same",
                                                                                         padding_mode="reflect")])
def test_input_rows_times_weight_give_the_output_rows_of_a_conv(conv):
    x = torch.randn(2, 3, 7, 7)
    out = conv(x).detach()
    pos = PositionSampler(6, 2, 0).draw(out, 27, channels_first=True)
    w = conv.weight.detach().reshape(5, -1)
    torch.testing.assert_close(input_rows(conv, x, pos) @ w.T + conv.bias.detach(),
                               output_rows(out, pos, channels_first=True))


def test_input_rows_of_a_linear_on_tokens():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 9, 4)
    out = lin(x).detach()
    pos = PositionSampler(5, 2, 0).draw(out, 4, channels_first=False)
    assert pos.shape == (2, 5)
    torch.testing.assert_close(lin(input_rows(lin, x, pos)).detach(), output_rows(out, pos, channels_first=False))


def test_stack_and_count_calibration_batches():
    batches = [(torch.ones(2, 3), "mask"), (torch.zeros(5, 3), "other")]
    x, extra = stack_batches(batches)
    assert x.shape == (7, 3) and extra == "mask" and count_images(batches) == 7


# -- passes ----------------------------------------------------------------------------------------------


def _chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    return amc.trace(model, torch.randn(2, 4))


def test_hooked_pass_replaces_outputs_stops_after_the_last_hook_and_restores_flags():
    net = _chain()
    net.train()
    net.module_of("1").eval()  # a submodule the user keeps in eval mode
    seen, ran_last = [], []
    net.module_of("3").register_forward_hook(lambda m, a, o: ran_last.append(True))
    hooks = {"0": lambda m, a, o: torch.zeros_like(o),  # replaces layer 0's output
             "2": lambda m, a, o: seen.append((m.training, a[0].abs().sum().item()))}
    hooked_pass(net, (torch.randn(3, 4),), hooks)
    assert seen == [(False, 0.0)] and not ran_last  # eval inside; layer 3 never ran
    assert net.training and not net.module_of("1").training  # every flag back as it was


def test_observe_stops_after_the_named_node_on_every_batch():
    net = _chain()
    names = []
    observe(net, [(torch.randn(2, 4),), (torch.randn(1, 4),)], lambda node, *_: names.append(node.name),
            stop_after="1")
    assert names == ["0", "1", "0", "1"]

    def stop_at_once(node, *_):
        raise StopPass

    observe(net, [(torch.randn(2, 4),)], stop_at_once)  # an observer may end the pass itself


# -- rank strategies -------------------------------------------------------------------------------------


def _infos():
    return {n: LayerInfo(n, "linear", C=16, k2=1, N=16, positions=1, has_bias=True) for n in ("a", "b")}


def test_energy_strategy_and_budgeted_selection():
    infos = _infos()
    spectra = {"a": torch.tensor([8.0, 1, 1] + [0] * 13), "b": torch.ones(16)}
    energy = EnergyRanks(infos, spectra.__getitem__)
    np.testing.assert_allclose(energy("a")[:3], [0.8, 0.9, 1.0])
    budget = infos["a"].macs_after(2) + infos["b"].macs_after(6)  # too little to keep either layer whole
    ranks = ranks_under_budget(energy, infos, ["a", "b"], budget, "data")
    assert sum(infos[n].macs_after(r) if r else infos[n].macs_before() for n, r in ranks.items()) <= budget
    assert ranks["a"] < ranks["b"]  # "a" holds its energy in fewer components
    uniform = uniform_ranks(infos, ["a", "b"], budget, "data")
    assert uniform["a"] == uniform["b"] and sum(infos[n].macs_after(r) for n, r in uniform.items()) <= budget


def test_combined_strategy_is_the_product_and_curves_are_computed_once():
    calls = []

    class Half(RankMetric):
        def curve(self, layer):
            calls.append(layer)
            return np.full(16, 0.5)

    infos = _infos()
    combined = CombinedRanks(EnergyRanks(infos, lambda n: torch.ones(16)), Half())
    np.testing.assert_allclose(combined("a"), np.arange(1, 17) / 16 * 0.5)
    combined("a")
    assert calls == ["a"]
