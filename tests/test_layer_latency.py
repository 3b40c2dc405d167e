"""Per-layer latency tables (per-node clocks fitted against kept widths) and the latency-aware allocation
behind amc.prune(target_latency=, latency_allocation="layers")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import amc
from amc.compressors import latency
from amc.compressors.layer_latency import (LayerLatencyTable, allocate, build_layer_table, layer_table,
                                           node_dims, node_macs_of, node_widths)
from amc.compressors.prune import plan_pruning
from amc.errors import PruningError

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
                         nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def _plan(x):
    return plan_pruning(_net(), "l2", (x,), round_to=8)


def test_node_dims_name_the_channel_dims_each_node_reads_or_writes():
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    dims = node_dims(plan)
    convs = [n.name for n in plan.net.layer_nodes if n.op == "Conv2d"]
    assert len(dims[convs[0]]) == 1  # the input image is frozen: only its output channels count
    assert len(dims[convs[1]]) == 2  # dense conv: kept in x kept out
    assert len(dims[convs[2]]) == 1  # depthwise: in and out channels are one dim
    bn = next(n.name for n in plan.net.layer_nodes if n.op == "BatchNorm2d")
    assert len(dims[bn]) == 1
    pruned = np.zeros(len(plan.roots), dtype=bool)
    pruned[plan.pruned_roots(0.5)] = True
    w = node_widths(dims, pruned)
    assert w[convs[1]] == pytest.approx(0.25) and w[bn] == pytest.approx(0.5) and w[convs[2]] == pytest.approx(0.5)


def _table(plan, dims, slow: str, slope: float = 1000.0) -> LayerLatencyTable:
    """A synthetic table: every node costs 10 us per unit width, `slow` costs `slope`."""
    b = {n: (slope if n == slow else 10.0) for n in dims}
    return LayerLatencyTable({n: 1.0 for n in dims}, b, 5.0, [0.0], [1.0])


def test_allocation_prunes_where_the_table_says_time_goes_and_meets_the_prediction():
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    dims = node_dims(plan)
    convs = [n.name for n in plan.net.layer_nodes if n.op == "Conv2d"]
    table = _table(plan, dims, slow=convs[1])
    ratios, roots, predicted = allocate(plan, table, 0.6, dims, node_macs=node_macs_of(plan))
    assert predicted <= 0.6
    assert all(0 <= r <= 0.8 + 1e-9 for r in ratios.values())
    by_producer = {plan.groups[g].producers[0]: r for g, r in ratios.items()}
    # the slow dense conv reads group 0 and writes group 1: those are cut deepest, the rest less
    assert max(by_producer.get(convs[0], 0), by_producer.get(convs[1], 0)) == max(by_producer.values())
    pruned = np.zeros(len(plan.roots), dtype=bool)
    pruned[roots] = True
    assert table.predict_us(node_widths(dims, pruned)) <= 0.6 * table.predict_us(node_widths(dims, pruned & False))
    net = plan.apply_units(roots)
    assert net(x).shape == (1, 10)
    kept = [net.module_of(c).out_channels for c in convs]
    assert all(k % 8 == 0 and k > 0 for k in kept)  # round_to honoured, no layer emptied


def test_unreachable_prediction_is_refused_with_the_floor():
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    dims = node_dims(plan)
    table = LayerLatencyTable({n: 100.0 for n in dims}, {n: 1.0 for n in dims}, 0.0, [0.0], [1.0])
    with pytest.raises(PruningError, match="below what per-layer pruning reaches"):
        allocate(plan, table, 0.3, dims)


def test_measured_table_fits_the_timed_networks_and_is_cached(tmp_path, monkeypatch):
    x = torch.randn(4, 3, 32, 32)
    plan = _plan(x)
    table = layer_table(plan, (x,), rounds=3, cache_dir=tmp_path)
    assert table.measured_ms[0] > table.measured_ms[-1]  # 0.75 of the channels gone: faster
    assert all(v >= 0 for v in table.b.values()) and table.rest_us >= 0
    from amc.compressors import layer_latency

    monkeypatch.setattr(layer_latency, "build_layer_table", lambda *a, **k: pytest.fail("timed again"))
    again = layer_table(plan, (x,), rounds=3, cache_dir=tmp_path)
    assert again.b == table.b and again.a == table.a


def test_prune_to_a_latency_budget_with_per_layer_allocation(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "CACHE", tmp_path)
    model, x = _net(), torch.randn(8, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = amc.prune(model, example_inputs=(x,), target_latency=0.7, latency_allocation="layers", round_to=8)
    info = pruned.meta["latency"]
    assert info["allocation"] == "layers" and info["measured"] <= 0.7 * 1.03 and info["ratios"]
    assert amc.count(pruned, x[:1])[0] < amc.count(model, x[:1])[0]
    assert pruned(x).shape == (8, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    assert list(tmp_path.glob("*.json"))  # the per-layer table was cached


def test_auto_allocation_keeps_the_less_distorted_of_both(tmp_path, monkeypatch):
    """"auto" prunes with both allocations to the same measured budget and returns the one whose outputs
    stay closer to the original's on the calibration batches; the meta says which, with both distortions."""
    from amc.compressors.sensitivity import least_distorted

    monkeypatch.setattr(latency, "CACHE", tmp_path)
    # the choice is what is tested, not the clock: a loaded machine (CI runs tests two at a time) made one
    # allocation miss the budget. The networks are "timed" by their MACs, which pruning lowers for certain.
    monkeypatch.setattr(latency, "measure", lambda nets, inputs, *a, **k: [amc.count(n, *inputs)[0] / 1e6
                                                                           for n in nets])
    torch.manual_seed(0)
    model, x = _net(), torch.randn(8, 3, 32, 32)
    loader = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = amc.prune(model, example_inputs=(x,), target_latency=0.7, latency_allocation="auto", round_to=8,
                       dataloader=loader)
    info = pruned.meta["latency"]
    assert info["allocation"] in ("uniform", "layers") and set(info["distortion"]) == {"uniform", "layers"}
    assert info["distortion"][info["allocation"]] == min(info["distortion"].values())
    assert info["measured"] <= 0.7 * 1.03 and pruned(x).shape == (8, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the selector itself: an exact copy has no distortion and wins over a pruned network; inputs untouched
    graph = amc.trace(model, x)
    copy_, half = graph.copy(), amc.prune(graph, ratio=0.5, example_inputs=(x,))
    state = {k: v.clone() for k, v in half.state_dict().items()}
    name, scores = least_distorted(graph, {"half": half, "same": copy_}, loader[:2])
    assert name == "same" and scores["same"] < scores["half"]  # (the copy moves too: its BN is re-estimated)
    assert all(torch.equal(v, half.state_dict()[k]) for k, v in state.items())  # BN re-estimated on a copy


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_latency=0.5, latency_allocation="greedy"), "latency_allocation must be"),
    (dict(target_latency=0.5, latency_allocation="auto"), "pass dataloader="),
    (dict(target_latency=0.5, latency_allocation="auto", dataloader=[(torch.randn(2, 3, 16, 16),)],
          latency_table=latency.LatencyTable([0.0], [1.0], "cpu", "k")), "pass latency_table=None"),
    (dict(target_latency=0.5, latency_allocation="layers",
          latency_table=latency.LatencyTable([0.0], [1.0], "cpu", "k")), "reads a LayerLatencyTable"),
    (dict(target_latency=0.5, latency_table=LayerLatencyTable({}, {}, 0.0, [0.0], [1.0])), "reads a LatencyTable"),
])
def test_bad_allocation_arguments_are_refused(kwargs, match):
    with pytest.raises(PruningError, match=match):
        amc.prune(_net(), example_inputs=(torch.randn(1, 3, 16, 16),), **kwargs)


def test_build_layer_table_is_deterministic_in_shape():
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    table = build_layer_table(plan, (x,), grid=(0.5,), rounds=2)
    assert table.grid == [0.0, 0.5] and set(table.a) == {n.name for n in plan.net.layer_nodes}


def test_public_latency_table_per_layer_feeds_prune(tmp_path):
    """Timed twice at most: a table of 3 rounds taken while another test loads the machine (the suite runs 2
    workers on 2 cores) can mispredict, and the prune then refuses, as it should; the second try re-times
    the table, as the error message tells users to."""
    model, x = _net(), torch.randn(8, 3, 32, 32)
    for attempt in range(2):
        table = amc.latency_table(model, (x,), ratios=(0.25, 0.5, 0.75), rounds=3, cache_dir=tmp_path, round_to=8,
                                  per_layer=True, refresh=attempt > 0)
        assert isinstance(table, LayerLatencyTable) and table.grid == [0.0, 0.25, 0.5, 0.75]
        try:
            pruned = amc.prune(model, example_inputs=(x,), target_latency=0.75, latency_allocation="layers",
                               round_to=8, latency_table=table)
            break
        except PruningError as exc:
            assert "not met" in str(exc) and attempt == 0, exc
    assert pruned.meta["latency"]["measured"] <= 0.75 * 1.03


@pytest.mark.parametrize("ratios", [(1.5,), (0.0,), (-0.2, 0.5)])
def test_bad_per_layer_grids_are_refused(ratios, tmp_path):
    with pytest.raises(PruningError, match="ratios in \\[0, 1\\)"):
        amc.latency_table(_net(), (torch.randn(1, 3, 16, 16),), ratios=ratios, per_layer=True, cache_dir=tmp_path)


def test_a_corrupt_cached_table_is_timed_again(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    table = layer_table(plan, (x,), rounds=2, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{half a file")
    again = layer_table(plan, (x,), rounds=2, cache_dir=tmp_path)
    assert set(again.a) == set(table.a) and LayerLatencyTable.load(str(path)).a == again.a


def test_parameters_in_the_cost_protect_a_weight_heavy_layer():
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(x)
    dims = node_dims(plan)
    convs = [n.name for n in plan.net.layer_nodes if n.op == "Conv2d"]
    table = LayerLatencyTable({n: 1.0 for n in dims}, {n: 10.0 for n in dims}, 5.0, [0.0], [1.0])
    macs = node_macs_of(plan)
    heavy = {n: (1e6 if n == convs[3] else 1.0) for n in dims}  # the 1x1 conv holds "all" the weights

    def cut(ratios):
        return max(r for g, r in ratios.items() if convs[3] in plan.groups[g].producers)

    plain, _, _ = allocate(plan, table, 0.6, dims, node_macs=macs)
    weighted, _, _ = allocate(plan, table, 0.6, dims, node_macs=macs, node_params=heavy)
    assert cut(weighted) < cut(plain)
