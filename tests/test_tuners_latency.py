"""amc.tuners with a latency budget: every evaluated policy meets the per-layer tables' prediction, the
best network is timed against the original, and bad latency requests are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from amc.compressors import latency
from amc.compressors.layer_latency import LayerLatencyTable, node_dims, node_widths
from amc.errors import PruningError
from amc.tuners import DDPG, GA, RandomSearch
from amc.tuners.space import build_space

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def _score(net):  # deterministic and cheap: prefers keeping the first conv's channels
    return float(sum(p.numel() for p in net.parameters()))


@pytest.mark.parametrize("make", [lambda: DDPG(episodes=8, warmup=3, seed=0),
                                  lambda: GA(generations=2, pop_size=4, seed=0),
                                  lambda: RandomSearch(samples=6, seed=0)], ids=["ddpg", "ga", "random"])
def test_search_under_a_latency_budget(make, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "CACHE", tmp_path)
    model, x = _net(), torch.randn(4, 3, 32, 32)
    result = make().search(model, example_inputs=(x,), target_macs=None, target_latency=0.6, evaluate=_score,
                           progress=False)
    ok = [h for h in result.history if h["status"] == "ok"]
    assert ok and all(h["latency_ratio"] <= 0.6 for h in ok)
    # independently of the search: the policy's predicted latency from the cached table
    table = LayerLatencyTable.load(str(next(tmp_path.glob("*.json"))))
    from amc.compressors.prune import plan_pruning

    plan = plan_pruning(model, "l2", (x,))
    dims = node_dims(plan)
    pruned = np.zeros(len(plan.roots), dtype=bool)
    pruned[plan.pruned_roots(result.policy)] = True
    base = table.predict_us(node_widths(dims, np.zeros_like(pruned)))
    assert table.predict_us(node_widths(dims, pruned)) / base <= 0.6 + 1e-9
    info = result.info["latency"]
    assert info["target"] == 0.6 and info["measured"] > 0 and info["predicted"] <= 0.6
    assert result.net(x).shape == (4, 10)


def test_latency_and_macs_budgets_together(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "CACHE", tmp_path)
    model, x = _net(), torch.randn(4, 3, 32, 32)
    result = RandomSearch(samples=5, seed=1).search(model, example_inputs=(x,), target_macs=0.5,
                                                     target_latency=0.8, evaluate=_score, progress=False)
    for h in result.history:
        if h["status"] == "ok":
            assert h["macs_ratio"] <= 0.5 and h["latency_ratio"] <= 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_latency=1.2), "target_latency is the fraction"),
    (dict(target_latency=0.01), "target_latency=0.01 is unreachable"),
    (dict(target_latency=0.5, compressor="lowrank"), "no per-layer latency table"),
    (dict(target_latency=0.5, latency_table=latency.LatencyTable([0.0], [1.0], "cpu", "k")),
     "must be a LayerLatencyTable"),
    (dict(target_latency=0.5, latency_table=LayerLatencyTable({"x": 1.0}, {"x": 1.0}, 0.0, [0.0], [1.0])),
     "built for another network"),
])
def test_bad_latency_requests_are_refused(kwargs, match, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "CACHE", tmp_path)
    with pytest.raises(PruningError, match=match):
        build_space(_net(), (torch.randn(2, 3, 32, 32),), None, **kwargs)


def test_cli_search_under_a_latency_budget_then_compress(tmp_path, monkeypatch):
    import json

    from amc.cli import main

    monkeypatch.setattr(latency, "CACHE", tmp_path / "cache")
    out = tmp_path / "search"
    assert main(["search", "--tuner", "random", "--target-latency", "0.9", "--evaluations", "3", "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "policy.json").read_text())
    assert doc["latency"]["predicted"] <= 0.9 and doc["target_macs"] == 1.0
    assert all(h["latency_ratio"] <= 0.9 for h in json.loads((out / "history.json").read_text())["history"]
               if h["status"] == "ok")
    assert main(["compress", "--policy", str(out / "policy.json"), "--epochs", "1", "--finetune-epochs", "0",
                 "--out", str(tmp_path / "compress"), "--no-progress"]) == 0
    assert main(["search", "--target-latency", "1.5", "--out", str(out)]) == 1  # a clear error, exit code 1
