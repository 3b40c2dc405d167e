"""Draw a ReconstructedNetwork with graphviz: one box per node, op type and output shape inside."""
from __future__ import annotations

import os
import shutil
from typing import Any

from .network import ReconstructedNetwork
from .template import iter_refs

_HIDDEN = {"TensorSize", "IntArith"}


def _shape_text(desc: Any) -> str:
    if isinstance(desc, dict) and "shape" in desc:
        return "x".join(str(s) for s in desc["shape"])
    if isinstance(desc, list):
        return ", ".join(_shape_text(d) for d in desc[:4]) + (", ..." if len(desc) > 4 else "")
    return "" if desc is None else str(desc)


def to_graphviz(net: ReconstructedNetwork) -> "graphviz.Digraph":  # noqa: F821
    import graphviz

    g = graphviz.Digraph("amc", graph_attr={"rankdir": "TB"}, node_attr={"shape": "box", "fontsize": "10"})
    hidden = {n.name for n in net.layer_nodes if n.op in _HIDDEN}
    for node in net.input_nodes:
        g.node(node.name, f"{node.name}\\ninput\\n{_shape_text(node.meta.get('out'))}", shape="ellipse")
    for node in net.layer_nodes:
        if node.name in hidden:
            continue
        color = "lightpink" if node.meta.get("fallback") else "white"
        g.node(node.name, f"{node.name}\\n{node.op}\\n{_shape_text(node.meta.get('out'))}",
               style="filled", fillcolor=color)
        for src in dict.fromkeys(r.node for r in iter_refs((node.args, node.kwargs))):
            if src not in hidden:
                g.edge(src, node.name)
    g.node("__output__", "output", shape="ellipse")
    for src in dict.fromkeys(r.node for r in iter_refs(net.outputs)):
        g.edge(src, "__output__")
    return g


def draw(net: ReconstructedNetwork, path: str, format: str = "png") -> str:
    """Write `<path>.gv` always, and render `<path>.<format>` when graphviz's `dot` is installed.

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
    if shutil.which("dot") is None:
        return gv
    out = f"{base}.{format}"
    tmp_out = f"{base}.tmp.{format}"
    g.render(filename=os.path.basename(gv), directory=os.path.dirname(os.path.abspath(gv)), format=format,
             outfile=tmp_out, cleanup=False)
    os.replace(tmp_out, out)
    with open(tmp, "w", encoding="utf-8") as f:  # render rewrote the source; keep ours, atomically
        f.write(g.source)
    os.replace(tmp, gv)
    return out
