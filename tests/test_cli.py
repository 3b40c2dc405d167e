"""The `amc` console command: `amc trace` end to end, errors, the subcommand registry, `--help`,
a closed pipe, lazy subpackages, and drawings of deep networks."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import amc
from amc import cli
from amc.errors import ExportError
from amc.export.json_io import load_json
from amc.export.pkl import load_pkl

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python args` from the repository root with amc importable, as a user's shell would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_trace_resnet18_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["trace", "resnet18", "--out", str(out), "--input-size", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "total:" in printed and "MACs" in printed  # the summary table
    assert "JSON round trip verified" in printed
    for ext in ("json", "safetensors", "pkl", "onnx", "gv"):
        assert (out / f"resnet18.{ext}").is_file(), ext
        assert f"wrote {out / f'resnet18.{ext}'}" in printed, ext
    if shutil.which("dot"):
        for ext in ("png", "svg"):  # the SVG is written beside the PNG, and listed
            assert (out / f"resnet18.{ext}").is_file(), ext
            assert f"wrote {out / f'resnet18.{ext}'}" in printed, ext
    # MACs are per sample: the traced example batch is 2, the table's total is the batch-1 count
    total = int(re.search(r"total: ([\d,]+) MACs", printed).group(1).replace(",", ""))
    net = load_pkl(str(out / "resnet18.pkl"))
    per_sample = amc.count(net, torch.randn(1, 3, 64, 64))[0]
    assert total == per_sample and amc.count(net, torch.randn(2, 3, 64, 64))[0] == 2 * per_sample
    assert "per sample" in printed
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
        p.add_argument("--scale", type=float, default=0.5)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new name registers silently

        @cli.command("hello", "say hello", configure)
        def hello(args: argparse.Namespace) -> int:
            print(f"scale={args.scale}")
            return 0

    assert cli.main(["hello", "--scale", "0.3"]) == 0
    assert "scale=0.3" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="'hello' registered twice"):  # a real clash is still reported
        cli.command("hello", "again", configure)(hello)


def test_no_duplicate_registration_warning():
    """The warning printed on every test run came from the registry test re-registering 'compress';
    importing the CLI, as a module and as `python -m amc.cli`, registers each command once."""
    for args in (["-W", "error", "-c", "import amc.cli as c; c.build_parser(); import amc.jobs.compress"],
                 ["-W", "error::UserWarning", "-m", "amc.cli", "compress", "--help"]):
        proc = _python(*args)
        assert proc.returncode == 0, proc.stderr
        assert "registered twice" not in proc.stderr


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: channel_pruning)", "(default: digits)", "(default: digits_resnet)",
                    "(default: 0.5)", "(default: 10 on digits"):
        assert default in text, default
    with pytest.raises(SystemExit):
        cli.main(["trace", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 224)" in text and "(default: png)" in text


def test_list_models_into_a_closed_pipe_is_quiet():
    """`amc trace --list-models | head`: the reader goes away; no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "amc.cli", "trace", "--list-models"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write: every write meets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err  # 128 + SIGPIPE, like a Unix tool stopped by the signal
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_subpackages_are_attributes_without_importing_them():
    code = ("import sys, amc; assert 'torch' not in sys.modules, 'import amc stays cheap'; "
            "print(amc.compressors.ChannelPruning.__name__, amc.trainers.__name__, amc.tuners.__name__, "
            "amc.export.__name__, amc.models.create.__name__, amc.data.__name__, amc.graph.__name__, "
            "amc.errors.AmcError.__name__, 'compressors' in dir(amc))")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ChannelPruning", "amc.trainers", "amc.tuners", "amc.export", "create", "amc.data",
                                   "amc.graph", "AmcError", "True"]
    with pytest.raises(AttributeError, match="no attribute 'compresors'"):
        amc.compresors  # noqa: B018 - a typo is still an AttributeError


def _png_size(path: Path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_deep_network_drawing_is_folded_into_columns(tmp_path):
    """resnet18 was one 460 x 16,303 px ribbon; folded into columns it reads when shown whole."""
    import torchvision.models as tvm

    from amc.graph.drawing import fold_columns, to_graphviz

    net = amc.trace(tvm.resnet18().eval(), torch.randn(1, 3, 32, 32))
    source = to_graphviz(net).source
    n_clusters = source.count("subgraph cluster_")
    assert 4 <= n_clusters <= 10, n_clusters
    assert "label=layer1" in source and "label=layer4" in source  # columns follow the top-level modules
    path = net.draw(str(tmp_path / "resnet18"))
    if shutil.which("dot"):
        assert path.endswith(".png") and (tmp_path / "resnet18.svg").is_file()
        width, height = _png_size(Path(path))
        assert max(width, height) / min(width, height) < 2.5, (width, height)
        svg = (tmp_path / "resnet18.svg").read_text()
        left = {int(i): min(float(x) for x in re.findall(r"(-?[\d.]+),", d))
                for i, d in re.findall(r'<title>cluster_(\d+)</title>\s*<path[^>]*d="([^"]+)"', svg)}
        assert len(left) == n_clusters and [left[i] for i in sorted(left)] == sorted(left.values()), left  # in order
        with pytest.raises(ExportError, match="nonsense"):
            net.draw(str(tmp_path / "bad"), format="nonsense")
    names = [f"{top}.{i}" for top in ("a", "b", "c") for i in range(7)] + ["head"]
    cols = fold_columns(names, height=8)
    assert [c[0] for c in cols] == ["a.0", "b.0", "c.0"] and cols[-1][-1] == "head"  # modules stay whole
    assert sum(cols, []) == names
    long = fold_columns([f"features.{i}" for i in range(30)], height=8)
    assert [len(c) for c in long] == [8, 8, 8, 6]  # one long module is cut into columns


def test_small_network_drawing_stays_one_chain():
    from amc.graph.drawing import to_graphviz

    net = amc.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))
    assert "cluster_" not in to_graphviz(net).source


def test_amc_errors_become_exit_code_1(tmp_path, monkeypatch, capsys):
    from amc.errors import ExportError

    def failing(*a, **k):
        raise ExportError("node 'x' cannot be exported")

    monkeypatch.setattr("amc.graph.network.ReconstructedNetwork.save_to_json", failing)
    assert cli.main(["trace", "resnet18", "--out", str(tmp_path), "--input-size", "32", "--no-onnx"]) == 1
    assert "amc trace: error: node 'x' cannot be exported" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    """`--method` reads the criteria registry only when a value is checked or help is printed."""
    proc = _python("-c", "import sys, amc.cli as c; c.build_parser(); assert 'torch' not in sys.modules")
    assert proc.returncode == 0, proc.stderr


def test_a_registered_criterion_is_a_compress_method(monkeypatch, capsys):
    """`amc compress --method` offers every criterion in the registry: a new one needs no edit of the job."""
    from amc.compressors import criteria
    from amc.jobs import compress as job

    monkeypatch.setattr(criteria, "CRITERIA", dict(criteria.CRITERIA))
    scored = []

    @criteria.register_criterion("toy_index")
    class ToyIndex(criteria.Criterion):
        def __call__(self, group):
            scored.append(group.id)
            return torch.arange(group.size, dtype=torch.float64)  # the first channels go first

    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    assert "toy_index" in capsys.readouterr().out
    ns = cli.build_parser().parse_args(["compress", "--method", "toy_index", "--target-macs", "0.6"])
    assert ns.method == "toy_index"
    x = torch.randn(2, 3, 8, 8)
    net = amc.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval(), x)
    small = job._compress(ns, net, [(x, torch.zeros(2))], None, x[:1])
    assert scored and amc.count(small, x[:1])[0] <= 0.6 * amc.count(net, x[:1])[0]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compress", "--method", "toy_nonsense"])
    assert "invalid choice: 'toy_nonsense'" in capsys.readouterr().err


def test_compress_help_names_every_registered_model():
    """The --model help is written out (no torch at --help); a model added to the registry must appear."""
    from amc.jobs.compress import MODEL_HELP

    named = set(re.findall(r"[a-z][a-z0-9_]+", MODEL_HELP.split(":", 1)[1]))
    assert set(amc.models.list_models()) <= named, sorted(set(amc.models.list_models()) - named)
