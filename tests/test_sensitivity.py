"""Per-group sensitivity (output distortion with one group pruned alone) and the per-layer latency
allocation that spends its budget by it (`allocate(..., sensitivity=)`, the benchmark's "sensitivity" row)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from amc.compressors.layer_latency import LayerLatencyTable, allocate, node_dims, node_macs_of
from amc.compressors.prune import plan_pruning
from amc.compressors.sensitivity import curve, group_sensitivity
from amc.errors import DataError, PruningError

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _net() -> nn.Module:
    """conv1's channels 4.. are read by nobody (conv2's columns for them are zero) and weigh little: pruning
    up to 12 of its 16 channels changes nothing, while every one of conv2's channels reaches the output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        net[0].weight[4:] *= 0.1
        net[2].weight[:, 4:] = 0.0
    return net


def _groups(plan):
    convs = [n.name for n in plan.net.layer_nodes if n.op == "Conv2d"]
    by_producer = {g.producers[0]: g.id for g in plan.groups if g.size and g.multiple_of != 0}
    return by_producer[convs[0]], by_producer[convs[1]]


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 12, 12, generator=g),) for _ in range(n)]


def test_a_group_nobody_reads_costs_nothing_and_one_that_reaches_the_output_does():
    x = torch.randn(1, 3, 12, 12)
    plan = plan_pruning(_net(), "l2", (x,))
    unread, read = _groups(plan)
    plan.net.train()
    sens = group_sensitivity(plan, _batches())
    assert all(m.training for m in plan.net.modules())  # its network's flags are left as they were
    assert max(sens[unread]) < 1e-10  # 4, 8, 12 of its channels gone: the output is the same
    assert 0 < sens[read][0] <= sens[read][1] <= sens[read][2]


def test_curve_is_monotone_through_zero_and_extends_past_the_grid():
    f = curve([0.1, 0.05, 0.4])  # a noisy dip is flattened: cutting more never costs less
    assert f(0.0) == 0.0 and f(0.25) == pytest.approx(0.1) and f(0.5) == pytest.approx(0.1)
    assert f(0.375) == pytest.approx(0.1) and f(0.75) == pytest.approx(0.4)
    assert f(0.8) == pytest.approx(0.4 + 0.05 * (0.4 - 0.1) / 0.25)


def test_allocation_spends_the_budget_where_it_distorts_least():
    x = torch.randn(1, 3, 12, 12)
    plan = plan_pruning(_net(), "l2", (x,))
    unread, read = _groups(plan)
    dims = node_dims(plan)
    table = LayerLatencyTable({n: 0.0 for n in dims}, {n: 10.0 for n in dims}, 0.0, [0.0], [1.0])
    sens = {g: curve(v) for g, v in group_sensitivity(plan, _batches()).items()}
    ratios, _, predicted = allocate(plan, table, 0.75, dims, node_macs=node_macs_of(plan), sensitivity=sens)
    assert predicted <= 0.75
    assert ratios[unread] > 0.5 and ratios[read] == 0.0  # every move went where it distorts nothing
    with pytest.raises(PruningError, match="sensitivity lacks groups"):
        allocate(plan, table, 0.75, dims, sensitivity={unread: sens[unread]})


def test_no_calibration_batches_is_a_clear_error():
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(DataError, match="yielded none"):
        group_sensitivity(plan_pruning(_net(), "l2", (x,)), [])


def test_least_distorted_refuses_no_candidates_and_no_batches():
    from amc.compressors.sensitivity import least_distorted

    net = torch.nn.Linear(3, 2)
    with pytest.raises(DataError, match="at least one candidate"):
        least_distorted(net, {}, [(torch.randn(2, 3),)])
    with pytest.raises(DataError, match="yielded none"):
        least_distorted(net, {"same": net}, [])
