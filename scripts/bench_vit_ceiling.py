"""How fast can a pruned small ViT run on this CPU? Token-pruning ceilings and narrower-ViT references,
measured (issues 14 and 15).

    python scripts/bench_vit_ceiling.py                   # widths 96 / 128 / 192, patch 4; and patch 2
    python scripts/bench_vit_ceiling.py --reps1 200 --reps64 10

For each ViT shape (Fashion-MNIST's 28x28 input, 6 pre-norm blocks, random weights: weights do not change
CPU time) and each MACs budget, APT's structure is built by `TokenPruning(epochs=0)` (the agents' places
and kept counts for that budget), then every agent is replaced by a slice that keeps CLS and the next k
tokens (`bench_token_pruning.ceiling_net`): no scorer, no selection, no merging. That network is the
fastest any token pruner keeping those counts can run; its efficiency (speedup x its MACs ratio) at
batch 1 caps what APT, EViT, ToMe or any other rule can reach there. Timed in torch (the unpruned graph
against the ceiling graph, interleaved medians, 1 thread) and in onnxruntime (both exported by
`save_to_onnx`, 1 intra-op thread).

Dimension pruning (issue 15) has no such free slice; its reference is the same ViT built narrower: every
width (residual stream, qkv, MLP) scaled so the MACs match the budget, heads kept, the head dim a multiple
of 8 where one is close. Pruning that narrows every width alike removes the most per-token work (LayerNorm,
residual adds) a dims pruner can; the reference shows what such a network runs at on this CPU.

Writes scripts/results/vit_ceiling.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import amc  # noqa: E402
from amc.compressors import TokenPruning  # noqa: E402
from amc.models.vit import SmallViT  # noqa: E402
from _isolate import cpu_info, write_atomic  # noqa: E402
from _ort import ort_runners  # noqa: E402
from bench_speed import interleaved  # noqa: E402
from bench_token_pruning import FirstTokens, ceiling_net  # noqa: E402

RESULTS = HERE / "results"
SHAPES = [  # (label, patch, width, heads): vit_fashion's shape, then the width range, then more tokens
    ("vit_fashion (patch 4, width 96)", 4, 96, 3),
    ("patch 4, width 128", 4, 128, 4),
    ("patch 4, width 192", 4, 192, 3),
    ("patch 2, width 96", 2, 96, 3),
]


def timed(nets: Dict[str, Any], x: torch.Tensor, reps: int) -> Dict[str, float]:
    """Interleaved median seconds per call of every network on `x`."""
    with torch.no_grad():
        times = interleaved({k: (lambda n=n: n(x)) for k, n in nets.items()}, reps=reps, warmup=3)
    return {k: statistics.median(v) for k, v in times.items()}


def one_shape(label: str, patch: int, dim: int, heads: int, budgets: List[float], args: argparse.Namespace,
              folder: str) -> List[Dict[str, Any]]:
    """One ViT shape: its token-pruning ceiling at each budget, timed against the unpruned graph."""
    torch.manual_seed(0)
    model = SmallViT(10, 1, 28, patch, dim, 6, heads, 2.0).eval()
    x8 = torch.randn(8, 1, 28, 28)
    loader = DataLoader(TensorDataset(x8, torch.zeros(8, dtype=torch.long)), batch_size=4)
    x1, x64 = x8[:1], torch.randn(64, 1, 28, 28)
    base = amc.count(model, x1)[0]
    nets: Dict[str, Any] = {"unpruned": amc.trace(model, x1)}
    rows: List[Dict[str, Any]] = []
    for b in budgets:
        apt = TokenPruning(model, loader, target_macs=b, epochs=0, example_inputs=(x1,)).compress()
        net = nets[str(b)] = ceiling_net(apt)
        rows.append({"shape": label, "tokens": (28 // patch) ** 2 + 1, "width": dim, "mmacs": base / 1e6,
                     "budget": b, "macs": amc.count(net, x1)[0] / base,
                     "keep": [m.keep for m in net.network.values() if isinstance(m, FirstTokens)]})
    _time_rows(rows, nets, ort_runners(nets, x1, folder), x1, x64, args)
    return rows


def narrower(budgets: List[float], args: argparse.Namespace, folder: str, dim: int = 96,
             heads: int = 3) -> List[Dict[str, Any]]:
    """vit_fashion against itself built narrower (random weights), one width per budget: among the multiples
    of 2 * heads, one within 0.03 of the budget's MACs ratio (a multiple of 8 * heads if any is; else the
    closest), so the reference runs on the widths a fast kernel prefers where the budget allows."""
    torch.manual_seed(0)
    x1, x64 = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28)
    base_model = SmallViT(10, 1, 28, 4, dim, 6, heads, 2.0).eval()
    base = amc.count(base_model, x1)[0]
    ratio = {w: amc.count(SmallViT(10, 1, 28, 4, w, 6, heads, 2.0), x1)[0] / base
             for w in range(2 * heads, dim, 2 * heads)}
    nets: Dict[str, Any] = {"unpruned": amc.trace(base_model, x1)}
    rows: List[Dict[str, Any]] = []
    for b in budgets:
        wide = min(ratio, key=lambda w: (abs(ratio[w] - b) > 0.03, w % (8 * heads) != 0, abs(ratio[w] - b)))
        nets[str(b)] = amc.trace(SmallViT(10, 1, 28, 4, wide, 6, heads, 2.0).eval(), x1)
        rows.append({"shape": f"vit_fashion built at width {wide}", "tokens": 50, "width": wide,
                     "mmacs": base / 1e6, "budget": b, "macs": ratio[wide], "keep": "-"})
    _time_rows(rows, nets, ort_runners(nets, x1, folder), x1, x64, args)
    return rows


def _time_rows(rows: List[Dict[str, Any]], nets: Dict[str, Any], runners: Dict[str, Any], x1, x64,
               args: argparse.Namespace) -> None:
    """Speedups (unpruned / the row's network, keyed by its budget) in torch and onnxruntime, b1 and b64."""
    for batch, x, reps in (("b1", x1, args.reps1), ("b64", x64, args.reps64)):
        t = timed(nets, x, reps)
        o = timed(runners, x, reps)
        for r in rows:
            k = str(r["budget"])
            r[f"torch_{batch}"] = t["unpruned"] / t[k]
            r[f"ort_{batch}"] = o["unpruned"] / o[k]
            r[f"torch_ms_{batch}"] = {"unpruned": 1e3 * t["unpruned"], "ceiling": 1e3 * t[k]}
            r[f"ort_ms_{batch}"] = {"unpruned": 1e3 * o["unpruned"], "ceiling": 1e3 * o[k]}
    for r in rows:
        print({k: v for k, v in r.items() if "_ms_" not in k}, flush=True)


HEAD = ["| ViT (6 blocks, 28x28) | tokens | MMACs | budget | MACs | kept per agent | torch b1 | eff. | torch b64 | "
        "eff. | ORT b1 | eff. | ORT b64 | eff. | unpruned ms b1 torch / ORT |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]


def _row(r: Dict[str, Any]) -> str:
    cells = []
    for k in ("torch_b1", "torch_b64", "ort_b1", "ort_b64"):
        cells += [f"{r[k]:.2f}x", f"{r[k] * r['macs']:.2f}"]
    return (f"| {r['shape']} | {r['tokens']} | {r['mmacs']:.1f} | {r['budget']} | {r['macs']:.3f}x | {r['keep']} | "
            + " | ".join(cells) + f" | {r['torch_ms_b1']['unpruned']:.2f} / {r['ort_ms_b1']['unpruned']:.2f} |")


def render(res: Dict[str, Any]) -> str:
    a = res["args"]
    tokens = [r for r in res["rows"] if r["keep"] != "-"]
    dims = [r for r in res["rows"] if r["keep"] == "-"]
    lines = ["# Latency ceilings of pruned small ViTs on this CPU (issues 14 and 15)", "",
             f"Generated by `python scripts/bench_vit_ceiling.py --reps1 {a['reps1']} --reps64 {a['reps64']}` on "
             f"{res['date']}; torch {torch.__version__}, onnxruntime {res['ort']}, {platform.machine()} CPU "
             f"({res['cpu']}), 1 thread; nothing else running; 1-minute load average {res['load_before'][0]:.2f} "
             f"before, {res['load_after'][0]:.2f} after. Speedup = unpruned / the row's network (interleaved "
             "medians); efficiency = speedup x the row's MACs ratio (1.0 = as fast as the MACs promise; issues 14 "
             "and 15 ask 0.9).", "",
             "## Token pruning (issue 14)", "",
             "Each row: APT's structure for the budget (`TokenPruning(epochs=0)`: agent places and kept counts) "
             "with every agent replaced by a slice keeping CLS and the next k tokens: no scorer, no selection, "
             "no merging. No token pruner keeping these counts runs faster.", "", *HEAD, *map(_row, tokens)]
    if dims:
        lines += ["", "## Dimension pruning (issue 15)", "",
                  "`vit_fashion` against the same ViT built narrower (every width: residual stream, qkv and MLP; "
                  "3 heads; random weights), at the width whose MACs are closest to the budget (a multiple of 24 "
                  "where one is within 0.03): what a pruned network that narrows every width alike runs at. The "
                  "gated VTP rows of `vit_dims.md` keep the residual width.", "", *HEAD, *map(_row, dims)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.65, 0.45])
    ap.add_argument("--dims-budgets", type=float, nargs="+", default=[0.75, 0.6, 0.4])
    ap.add_argument("--reps1", type=int, default=200)
    ap.add_argument("--reps64", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "vit_ceiling"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.out + ".json").read_text())
    else:
        import onnxruntime

        torch.set_num_threads(1)
        res = {"args": vars(args), "load_before": os.getloadavg(), "rows": [], "ort": onnxruntime.__version__,
               "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M")}
        with tempfile.TemporaryDirectory() as folder:
            for label, patch, dim, heads in SHAPES:
                res["rows"] += one_shape(label, patch, dim, heads, args.budgets, args, folder)
            res["rows"] += narrower(args.dims_budgets, args, folder)
        res["load_after"] = os.getloadavg()
    write_atomic(args.out + ".json", json.dumps(res, indent=1))
    write_atomic(args.out + ".md", render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
