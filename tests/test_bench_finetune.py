"""Smoke test of scripts/bench_finetune.py: its core function on the --quick budget (well under a minute).

Checks the result's shape and that the numbers are sane (accuracies are fractions, the compressed
network has at most half the MACs, the Markdown renders), not the accuracies the full run reports.
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_finetune.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def quick(bench):
    threads = torch.get_num_threads()
    res = bench.run_bench(quick=True)
    assert torch.get_num_threads() == threads  # the global thread count is restored
    return res


def _frac(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.parametrize("part", ["digits", "fashion"])
def test_compress_finetune_part(quick, part):
    r = quick[part]
    for key in ("acc_original", "acc_pruned", "acc_finetuned", "acc_distilled", "gap_finetuned_pts",
                "gap_distilled_pts", "macs_original", "macs_pruned", "macs_fraction", "params_original",
                "params_pruned", "channel_ratio", "seconds", "kd", "config"):
        assert key in r, key
    for key in ("acc_original", "acc_pruned", "acc_finetuned", "acc_distilled"):
        assert _frac(r[key]), (key, r[key])
    assert 0 < r["macs_pruned"] <= 0.5 * r["macs_original"]
    assert r["macs_fraction"] == pytest.approx(r["macs_pruned"] / r["macs_original"])
    assert r["params_pruned"] < r["params_original"]
    assert r["gap_finetuned_pts"] == pytest.approx(100 * (r["acc_finetuned"] - r["acc_original"]))
    if part == "digits":
        assert r["acc_original"] > 0.3  # one quick epoch on the digits learns something (chance is 0.1)
    assert all(math.isfinite(v) and v >= 0 for v in r["seconds"].values())


def test_plugins_part(quick):
    p = quick["plugins"]
    assert set(p["rows"]) == {"plain", "SFP(0.3)", "SFP(0.3) per-conv", "RePr global", "RePr per-layer",
                              "plain, 3 epochs", "SFP(0.3), 3 epochs"}
    for row in p["rows"].values():
        assert _frac(row["acc"])
    assert p["rows"]["plain"]["gap_pts"] == 0.0
    sfp = p["rows"]["SFP(0.3)"]["zeroed_filters"]
    assert sfp and all(v > 0 for v in sfp.values())
    for name in ("RePr global", "RePr per-layer"):
        drops = p["rows"][name]["drops"]
        assert drops and all(0 < d < drops[0]["sizes"][n] for n, d in drops[0]["dropped"].items())
    for row in p["hard_pruned_l2"].values():
        assert _frac(row["acc"]) and 0 < row["macs_fraction"] < 1


def test_markdown_and_observations(bench, quick):
    res = dict(quick, observations=bench.observations(quick))
    md = bench.to_markdown(res, "python scripts/bench_finetune.py --quick")
    assert "| digits_resnet / digits |" in md and "| resnet20 / fashion_mnist |" in md
    assert "RePr global" in md and "--quick" in md


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout
