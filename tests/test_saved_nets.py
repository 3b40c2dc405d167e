"""scripts/_saved_nets.py: a benchmark's networks saved now and timed later come back computing the same.

The quiet-machine latency runs (`--latency-from`) time what the accuracy runs built; a network that
came back different (or an eager peer module that did not come back) would put wrong rows in a table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import amc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _ort import ort_runners  # noqa: E402
from _saved_nets import load_nets, save_nets  # noqa: E402


def test_graphs_and_eager_modules_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = amc.trace(model, x)
    pruned = amc.prune(graph, ratio=0.5, example_inputs=(x,))
    nets = {"unpruned": graph, "0.5|pruned": pruned, "eager": model}
    save_nets(nets, str(tmp_path))
    back = load_nets(str(tmp_path))
    assert list(back) == list(nets)
    assert isinstance(back["0.5|pruned"], amc.ReconstructedNetwork) and not isinstance(back["eager"], amc.ReconstructedNetwork)
    with torch.no_grad():
        for key, net in nets.items():
            assert torch.equal(back[key](x), net(x)), key


def test_reads_the_older_index_of_labels(tmp_path):
    """Folders written before eager modules were saved hold a plain list of labels and i.pkl files."""
    graph = amc.trace(nn.Linear(3, 2).eval(), torch.randn(1, 3))
    graph.save(str(tmp_path / "0.pkl"))
    (tmp_path / "index.json").write_text(json.dumps(["unpruned"]))
    back = load_nets(str(tmp_path))
    x = torch.randn(4, 3)
    assert torch.equal(back["unpruned"](x), graph(x))


class _Unexportable(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()  # ONNX has no op for it: the export fails


def test_ort_runners_compute_what_torch_computes_and_record_export_failures(tmp_path):
    """The onnxruntime columns time the same function as the torch columns, eager peers included; a
    network that cannot export is reported (or raises), never timed as something else."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    nets = {"graph": amc.trace(model, x), "eager": model, "bad": _Unexportable()}
    errors: dict = {}
    runners = ort_runners(nets, x, str(tmp_path), errors=errors)
    assert set(runners) == {"graph", "eager"} and list(errors) == ["bad"]
    x5 = torch.randn(5, 3, 8, 8)  # the export keeps a dynamic batch axis
    for key in runners:
        assert torch.allclose(torch.from_numpy(runners[key](x5)[0]), model(x5), atol=1e-5), key
    with pytest.raises(Exception):
        ort_runners({"bad": _Unexportable()}, x, str(tmp_path))
