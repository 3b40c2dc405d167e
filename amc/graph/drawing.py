"""Draw a ReconstructedNetwork with graphviz: one box per node, op type and output shape inside.

A deep network drawn as one top-to-bottom chain is a ribbon (resnet18: 460 x 16,303 px) that cannot be
read when shown whole. So a long graph is folded into side-by-side columns, like a newspaper: the nodes
in topological order are cut into columns of about ``sqrt(2 * n)`` nodes, preferring cuts between
top-level modules (``layer1``, ``layer2``, ...), and each column is a labelled cluster. Edges between
columns do not constrain the ranking, so every column starts at the top.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections import Counter
from typing import Any, Dict, List, Sequence

from ..errors import ExportError
from .network import ReconstructedNetwork
from .node import Node
from .template import iter_refs

_HIDDEN = {"TensorSize", "IntArith", "TrainingFlag"}
#: Graphs with at most this many visible nodes are drawn as one top-to-bottom chain.
FOLD_ABOVE = 16


def _shape_text(desc: Any) -> str:
    if isinstance(desc, dict) and "shape" in desc:
        return "x".join(str(s) for s in desc["shape"])
    if isinstance(desc, list):
        return ", ".join(_shape_text(d) for d in desc[:4]) + (", ..." if len(desc) > 4 else "")
    return "" if desc is None else str(desc)


def _top_module(name: str) -> str:
    return name.split(".", 1)[0]


def fold_columns(names: Sequence[str], height: int) -> List[List[str]]:
    """Cut node names (topological order) into columns of about ``height`` names.

    Runs of nodes from one top-level module stay together up to 1.5 columns' height; a longer run is
    split. Runs are packed greedily, so small neighbours (``conv1``, ``bn1``, ``relu``) share a column.
    """
    runs: List[List[str]] = []
    for name in names:
        if runs and _top_module(runs[-1][-1]) == _top_module(name):
            runs[-1].append(name)
        else:
            runs.append([name])
    columns: List[List[str]] = [[]]
    for run in runs:
        if len(run) <= height * 3 // 2:  # a module slightly over a column's height still gets one column
            if columns[-1] and len(columns[-1]) + len(run) > height:
                columns.append([])
            columns[-1].extend(run)
            continue
        for start in range(0, len(run), height):
            columns.append(run[start:start + height])
    return [c for c in columns if c]


def _column_label(column: Sequence[str], sizes: Dict[str, int]) -> str:
    """The top-level module(s) a column holds; for part of one module, the range of submodules."""
    tops = list(dict.fromkeys(_top_module(n) for n in column))
    if len(tops) > 1:
        return f"{tops[0]} … {tops[-1]}"
    if sizes[tops[0]] == len(column):
        return tops[0]
    first, last = (n.rsplit(".", 1)[0] for n in (column[0], column[-1]))
    if first == last:  # a flat Sequential: name the first and last layer
        first, last = column[0], column[-1]
    shared = os.path.commonprefix([first + ".", last + "."]).rpartition(".")[0]
    return f"{first} … {last[len(shared) + 1:] if shared else last}"


def to_graphviz(net: ReconstructedNetwork, fold_above: int = FOLD_ABOVE) -> "graphviz.Digraph":  # noqa: F821
    """The drawing as a ``graphviz.Digraph``; graphs over ``fold_above`` visible nodes are folded into columns."""
    import graphviz

    g = graphviz.Digraph("amc", graph_attr={"rankdir": "TB"}, node_attr={"shape": "box", "fontsize": "10"})
    hidden = {n.name for n in net.layer_nodes if n.op in _HIDDEN}
    visible: List[Node] = [n for n in net.layer_nodes if n.name not in hidden]
    fold = len(visible) > fold_above
    columns = fold_columns([n.name for n in visible], max(8, math.ceil(math.sqrt(2 * len(visible))))) if fold else []
    column_of: Dict[str, int] = {name: i for i, col in enumerate(columns) for name in col}

    def box(target: Any, node: Node) -> None:
        color = "lightpink" if node.meta.get("fallback") else "white"
        target.node(node.name, f"{node.name}\\n{node.op}\\n{_shape_text(node.meta.get('out'))}",
                    style="filled", fillcolor=color)

    if fold:
        g.attr(newrank="true", nodesep="0.15", ranksep="0.3")
        by_name = {n.name: n for n in visible}
        sizes = Counter(_top_module(n.name) for n in visible)
        for i, col in enumerate(columns):
            with g.subgraph(name=f"cluster_{i}") as sub:
                sub.attr(label=_column_label(col, sizes), style="rounded", color="grey70", fontsize="12")
                for name in col:
                    box(sub, by_name[name])
        # The inputs, then one invisible anchor above each column, chained left to right on one rank
        # outside the clusters: dot keeps such flat edges in order, so the columns read left to right.
        anchors = [f"__column_{i}__" for i in range(len(columns))]
        with g.subgraph() as top:
            top.attr(rank="same")
            for node in net.input_nodes:
                top.node(node.name)
            for anchor in anchors:
                top.node(anchor, "", style="invis", width="0", height="0")
            chain = [n.name for n in net.input_nodes] + anchors
            for a, b in zip(chain, chain[1:]):
                top.edge(a, b, style="invis")
        for anchor, col in zip(anchors, columns):
            g.edge(anchor, col[0], style="invis")
    else:
        for node in visible:
            box(g, node)
    for node in net.input_nodes:
        g.node(node.name, f"{node.name}\\ninput\\n{_shape_text(node.meta.get('out'))}", shape="ellipse")
    for node in visible:
        for src in dict.fromkeys(r.node for r in iter_refs((node.args, node.kwargs))):
            if src in hidden:
                continue
            across = fold and column_of.get(src, 0) != column_of[node.name]
            g.edge(src, node.name, **({"constraint": "false", "color": "grey50"} if across else {}))
    g.node("__output__", "output", shape="ellipse")
    for src in dict.fromkeys(r.node for r in iter_refs(net.outputs)):
        g.edge(src, "__output__")
    return g


def draw(net: ReconstructedNetwork, path: str, format: str = "png") -> str:
    """Write `<path>.gv` always; where graphviz's `dot` is installed also render `<path>.<format>` and,
    for raster formats, `<path>.svg` beside it (zoomable, text searchable), from one layout.

    Returns the rendered file's path, or the `.gv` path where `dot` is missing.
    """
    g = to_graphviz(net)
    base = str(path)
    for ext in (".gv", ".png", ".svg", ".pdf"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    gv = base + ".gv"
    tmp = gv + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(g.source)
    os.replace(tmp, gv)
    dot = shutil.which("dot")
    if dot is None:
        return gv
    formats = [format] + (["svg"] if format != "svg" else [])
    outputs = [(f"{base}.{fmt}", f"{base}.tmp.{fmt}") for fmt in formats]
    cmd = [dot, gv]
    for fmt, (_, tmp_out) in zip(formats, outputs):
        cmd += [f"-T{fmt}", "-o", tmp_out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        for _, tmp_out in outputs:
            if os.path.exists(tmp_out):
                os.remove(tmp_out)
        raise ExportError(f"graphviz dot failed to render {gv!r} as {'/'.join(formats)}: {proc.stderr.strip()}; "
                          "check the format name (`dot -T?` lists them)")
    for out, tmp_out in outputs:
        os.replace(tmp_out, out)
    return outputs[0][0]
