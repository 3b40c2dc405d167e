"""Latency as a budget: a table of timed uniform ratios, cached on disk, and amc.prune(target_latency=)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import amc
from amc.compressors import latency
from amc.errors import PruningError

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _wide():
    torch.manual_seed(0)  # wide enough that pruning changes the time far beyond timing noise
    return nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10)).eval()


def test_table_is_timed_interleaved_cached_and_predicts_a_ratio(tmp_path, monkeypatch):
    model, x = _wide(), torch.randn(1, 3, 32, 32)
    table = amc.latency_table(model, (x,), ratios=(0.25, 0.5, 0.75), rounds=5, cache_dir=tmp_path)
    assert table.ratios == [0.0, 0.25, 0.5, 0.75] and len(table.ms) == 4
    assert table.ms[-1] < 0.6 * table.ms[0]  # 0.75 of the channels gone: far faster, whatever the load
    fr = table.fraction()
    assert fr[0] == 1.0 and all(a >= b for a, b in zip(fr, fr[1:]))
    r = table.ratio_for(0.7)
    assert 0.0 < r <= 0.75
    calls = []
    monkeypatch.setattr(latency, "measure", lambda *a, **k: calls.append(1) or [1.0] * len(a[0]))
    again = amc.latency_table(model, (x,), ratios=(0.25, 0.5, 0.75), rounds=5, cache_dir=tmp_path)
    assert again == table and not calls  # read from the cache, nothing timed
    with pytest.raises(PruningError, match="below what the table reaches"):
        table.ratio_for(0.001)


@pytest.mark.parametrize("content", ["{not json", '{"ratios": [0.0], "ms": [1.0]}',
                                     '{"ratios": [0.0, 0.5], "ms": [1.0], "device": "cpu", "key": "k"}'])
def test_an_unreadable_cache_entry_is_measured_again(tmp_path, monkeypatch, content):
    """A stale or foreign cache file (another amc version, a hand edit) must not fail the prune."""
    model, x = _wide(), torch.randn(1, 3, 8, 8)
    monkeypatch.setattr(latency, "measure", lambda nets, *a, **k: [float(len(nets) - i) for i in range(len(nets))])
    first = amc.latency_table(model, (x,), ratios=(0.5,), rounds=1, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(content)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = amc.latency_table(model, (x,), ratios=(0.5,), rounds=1, cache_dir=tmp_path)
    assert again.ms == first.ms and latency.LatencyTable(**json.loads(entry.read_text())) == again


def test_prune_to_a_latency_budget_is_checked_by_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "CACHE", tmp_path)
    model, x = _wide(), torch.randn(1, 3, 32, 32)
    table = amc.latency_table(model, (x,), ratios=(0.3, 0.6, 0.8), rounds=5, cache_dir=tmp_path)
    pruned = amc.prune(model, example_inputs=(x,), target_latency=0.6, latency_table=table)
    info = pruned.meta["latency"]
    assert info["measured"] <= 0.6 * 1.03 and info["ratio"] > 0
    assert amc.count(pruned, x)[0] < amc.count(model, x)[0]
    assert pruned(x).shape == (1, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_latency=1.5), "target_latency is the fraction"),
    (dict(target_latency=0.0), "target_latency is the fraction"),
    (dict(target_latency=0.5, target_macs=0.5), "not both"),
])
def test_bad_latency_budgets_are_refused(kwargs, match):
    model, x = _wide(), torch.randn(1, 3, 32, 32)
    with pytest.raises(PruningError, match=match):
        amc.prune(model, example_inputs=(x,), **kwargs)


def test_latency_table_leaves_the_model_as_it_was(tmp_path):
    model, x = _wide(), torch.randn(1, 3, 32, 32)
    net = amc.trace(model, x).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    amc.latency_table(net, (x,), ratios=(0.5,), rounds=2, cache_dir=False)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
