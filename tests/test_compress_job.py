"""The main job end to end on the digits: files written, before/after table printed, MACs halved."""
from __future__ import annotations

import json

import pytest

from amc.jobs import compress as job


def test_job_writes_files_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    summary = job.run(["--epochs", "2", "--finetune-epochs", "1", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "before (digits_resnet)" in text and "after channel_pruning + FT" in text
    assert "params" in text and "MACs" in text and "latency" in text
    for name in ("compressed.json", "compressed.pkl", "compressed.onnx", "summary.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["macs_fraction"] <= 0.5
    before, after = saved["rows"][0], saved["rows"][-1]
    assert after["macs"] <= 0.5 * before["macs"] and after["params"] < before["params"]
    assert summary["rows"][1]["acc"] > 0.5  # channel pruning + least squares before fine-tuning


def test_job_l1_method_and_bad_ratio(tmp_path, capsys):
    summary = job.run(["--method", "l1", "--epochs", "1", "--finetune-epochs", "0", "--out", str(tmp_path),
                       "--no-progress"])
    assert summary["macs_fraction"] <= 0.5
    with pytest.raises(Exception, match="ratio"):
        job.run(["--ratio", "1.5", "--out", str(tmp_path), "--no-progress"])


def test_job_lowrank_meets_the_budget_and_fine_tunes(tmp_path, capsys):
    """Low-rank through the job: whole-net MACs within the budget, and fine-tuning improves it (it
    diverged to NaN when the BN was folded away before fine-tuning)."""
    summary = job.run(["--method", "lowrank", "--epochs", "4", "--finetune-epochs", "2", "--out", str(tmp_path),
                       "--no-progress"])
    rows = summary["rows"]
    assert summary["macs_fraction"] <= 0.5
    assert rows[2]["acc"] >= rows[1]["acc"] - 0.01 and rows[2]["acc"] > 0.8, rows


def test_add_parser_registers_subcommand():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    job.add_parser(sub)
    ns = parser.parse_args(["compress", "--model", "vgg_small", "--method", "fpgm", "--ratio", "0.3"])
    assert ns.model == "vgg_small" and ns.method == "fpgm" and ns.ratio == 0.3 and ns._run is job.run_from_args
