"""Save a benchmark's networks now, time them later on a quiet machine (`--save-nets` / `--latency-from`).

Training rows load the machine; timings taken beside them are 10-100x off. So a benchmark writes every
network it built into a folder (ReconstructedNetworks as amc pickles, a peer's eager modules with
torch.save) and a second run, with nothing else on the machine, loads and times them. The folder is
the benchmark's own scratch output, so loading it trusts its pickles.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch

import amc
from _isolate import write_atomic


def save_nets(nets: Dict[str, Any], folder: str) -> None:
    """Write every network of `nets` (label -> network) into `folder`, with an index of the labels."""
    os.makedirs(folder, exist_ok=True)
    index = []
    for i, (key, net) in enumerate(nets.items()):
        graph = isinstance(net, amc.ReconstructedNetwork)
        path = os.path.join(folder, f"{i}.{'pkl' if graph else 'pt'}")
        if graph:
            net.save(path)
        else:
            torch.save(net, path + ".tmp")
            os.replace(path + ".tmp", path)
        index.append({"label": key, "file": os.path.basename(path)})
    write_atomic(os.path.join(folder, "index.json"), json.dumps(index))


def load_nets(folder: str) -> Dict[str, Any]:
    """The networks `save_nets` wrote, by label (older folders: a plain list of labels, all amc pickles)."""
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    out: Dict[str, Any] = {}
    for i, entry in enumerate(index):
        key, name = (entry, f"{i}.pkl") if isinstance(entry, str) else (entry["label"], entry["file"])
        path = os.path.join(folder, name)
        out[key] = (amc.ReconstructedNetwork.load(path, trusted=True) if name.endswith(".pkl")
                    else torch.load(path, weights_only=False).eval())
    return out


def fuse_all(nets: Dict[str, Any], x1: torch.Tensor) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """Every network through `amc.fuse_attention` (eager modules traced on `x1` first), and how many
    attention sites each had fused: `--latency-from DIR --fuse-attention` times them on one runtime."""
    fused = {k: amc.fuse_attention(n, x1) for k, n in nets.items()}
    return fused, {k: len(n.meta["fused_attention"]["fused"]) for k, n in fused.items()}
