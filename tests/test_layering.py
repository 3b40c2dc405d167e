"""The design's one-way flow, checked on the source (every import, function-level ones included).

- amc.graph owns the IR and knows nothing downstream: no module under amc/graph imports amc.export,
  amc.compressors, amc.trainers, amc.tuners, amc.jobs or amc.cli. The network's save/load methods
  reach the exporters through the format registry (amc.graph.formats), filled by amc.export.
- amc.trainers train any nn.Module and know nothing of the graph. Their only entry points into the
  rest of amc are TRAINER_ENTRY_POINTS: the errors, the neutral `training_mode` and batch layout, and the compressors'
  public pruning API (`plan_pruning` / PruningPlan methods, the in-place primitives, `channel_masks`),
  and they never take a PruningPlan apart (its analysis, axes, graph nodes).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from amc.errors import ExportError
from amc.graph import formats

ROOT = Path(__file__).resolve().parents[1]
AMC = ROOT / "amc"

GRAPH_MUST_NOT_IMPORT = ("amc.export", "amc.compressors", "amc.trainers", "amc.tuners", "amc.jobs", "amc.cli")
TRAINER_ENTRY_POINTS = ("amc.errors", "amc._modes", "amc._batches", "amc._copying", "amc.compressors.prune", "amc.compressors.primitives",
                        "amc.compressors.masks")


def _package(path: Path) -> List[str]:
    """The package a relative import in `path` starts from (`amc/graph/ops.py` -> amc.graph)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]


def _imported(source: str, package: List[str]) -> Iterator[Tuple[int, str]]:
    """(line, dotted name) of everything `source` imports, relative imports resolved from `package`;
    `from m import a` gives `m.a` (a submodule or an attribute of m). `import_module("...")` with a
    literal counts too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from ((node.lineno, f"{module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, str(node.args[0].value)


def _imports_of(package: str) -> Iterator[Tuple[Path, int, str]]:
    for path in sorted((AMC / package).rglob("*.py")):
        for line, name in _imported(path.read_text(), _package(path)):
            yield path, line, name


def _within(name: str, prefixes: Tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _where(path: Path, line: int, name: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {name}"


def test_import_walker_sees_relative_function_level_and_dynamic_imports():
    source = ("from ..export.pkl import save_pkl\nfrom . import ops\nfrom .. import FORMAT_PROVIDERS\n"
              "def f():\n    import amc.tuners\n    importlib.import_module('amc.jobs')\n")
    names = [name for _, name in _imported(source, ["amc", "graph"])]
    assert names == ["amc.export.pkl.save_pkl", "amc.graph.ops", "amc.FORMAT_PROVIDERS", "amc.tuners", "amc.jobs"]
    assert _package(AMC / "graph" / "__init__.py") == _package(AMC / "graph" / "ops.py") == ["amc", "graph"]


def test_graph_imports_nothing_downstream():
    bad = [_where(path, line, name) for path, line, name in _imports_of("graph")
           if _within(name, GRAPH_MUST_NOT_IMPORT)]
    assert not bad, "amc.graph must not know the packages that use it:\n" + "\n".join(bad)


def test_trainers_reach_amc_only_through_their_entry_points():
    bad = [_where(path, line, name) for path, line, name in _imports_of("trainers")
           if _within(name, ("amc",)) and not _within(name, ("amc.trainers", *TRAINER_ENTRY_POINTS))]
    assert not bad, ("amc.trainers may import only " + ", ".join(TRAINER_ENTRY_POINTS) + " from amc:\n"
                     + "\n".join(bad))


def test_trainers_do_not_walk_the_pruning_plan():
    """A PruningPlan is used through its methods and the compressors' functions, never taken apart."""
    internals = {"analysis", "axes", "groups", "net", "layer_nodes", "input_nodes", "module_of", "node"}
    bad = [f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}"
           for path in sorted((AMC / "trainers").rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and node.attr in internals]
    assert not bad, "\n".join(bad)


def test_save_and_load_work_after_importing_the_graph_alone(tmp_path):
    """The registry imports the format providers on first use: no `import amc.export` needed."""
    code = ("import sys, torch\n"
            "from amc.graph.capture import trace\n"
            "net = trace(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))\n"
            "assert not [m for m in sys.modules if m.startswith('amc.export')], 'graph imported export'\n"
            f"path = net.save(pkl={str(tmp_path / 'n.pkl')!r})\n"
            "back = type(net).load(pkl=path)\n"
            "assert 'amc.export' in sys.modules and back.layer_nodes[0].op == 'Conv2d'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_every_network_method_has_its_format_registered():
    import amc.export  # noqa: F401 - what `net.save(...)` imports on first use

    for name, direction in [("pkl", "save"), ("pkl", "load"), ("json", "save"), ("json", "load"),
                            ("onnx", "save"), ("vnmodel", "save")]:
        assert callable(getattr(formats.file_format(name), direction)), (name, direction)


def test_format_registry_warns_on_overwrite_and_names_unknown_formats(monkeypatch):
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new name registers silently
        formats.register_format("toy", save=lambda net, path: path)
    assert formats.file_format("toy").save(None, "x.toy") == "x.toy"
    with pytest.warns(UserWarning, match="file format 'toy' overwritten"):
        formats.register_format("toy", save=lambda net, path: path)
    with pytest.raises(ExportError, match=r"no file format 'nonsense' is registered \(known: .*'pkl'"):
        formats.file_format("nonsense")
