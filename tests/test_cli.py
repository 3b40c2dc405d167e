"""The `amc` console command: `amc trace` end to end, errors, and the subcommand registry."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from amc import cli
from amc.export.json_io import load_json
from amc.export.pkl import load_pkl


def test_trace_resnet18_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["trace", "resnet18", "--out", str(out), "--input-size", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "total:" in printed and "MACs" in printed  # the summary table
    assert "JSON round trip verified" in printed
    for ext in ("json", "safetensors", "pkl", "onnx", "gv"):
        assert (out / f"resnet18.{ext}").is_file(), ext
    if shutil.which("dot"):
        assert list(out.glob("resnet18*.png")), "dot is installed, so the drawing is rendered"
    doc = json.loads((out / "resnet18.json").read_text())
    assert doc["nodes"][0]["out"]["shape"] == [2, 64, 32, 32]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_json(str(out / "resnet18.json"))(x), load_pkl(str(out / "resnet18.pkl"))(x))


def test_unknown_model_exits_with_a_hint(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown model 'resnet1'.*resnet18.*amc trace --list-models"):
        cli.main(["trace", "resnet1", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_list_models_and_usage(capsys):
    assert cli.main(["trace", "--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet18" in names and "mobilenet_v3_small" in names
    assert cli.main([]) == 2
    assert "trace" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["trace"])


def test_a_new_subcommand_is_one_registration(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ratio", type=float, default=0.5)

    @cli.command("compress", "compress a model", configure)
    def compress(args: argparse.Namespace) -> int:
        print(f"ratio={args.ratio}")
        return 0

    assert cli.main(["compress", "--ratio", "0.3"]) == 0
    assert "ratio=0.3" in capsys.readouterr().out


def test_amc_errors_become_exit_code_1(tmp_path, monkeypatch, capsys):
    from amc.errors import ExportError

    def failing(*a, **k):
        raise ExportError("node 'x' cannot be exported")

    monkeypatch.setattr("amc.graph.network.ReconstructedNetwork.save_to_json", failing)
    assert cli.main(["trace", "resnet18", "--out", str(tmp_path), "--input-size", "32", "--no-onnx"]) == 1
    assert "amc trace: error: node 'x' cannot be exported" in capsys.readouterr().err
