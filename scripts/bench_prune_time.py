"""Pruning wall time, amc vs Torch-Pruning, on resnet50 and vit_b_16 (ratio 0.5, L2), interleaved in one process.

Variants timed in every round (order rotated each round, median over rounds):
  ours_prune        `amc.prune(net, 0.5, "l2")` on an already traced net: coupling analysis + groups +
                    L2 importance + hard prune + the output-shape check amc.prune always does
  ours_plan/apply   the same split in two: `plan_pruning` (analysis + groups + L2) and `plan.apply(0.5)`
  ours_total        `amc.trace(model, x)` + `amc.prune(...)`
  tp                `tp.pruner.MetaPruner(...)` (builds the DependencyGraph) + `pruner.step()` on a fresh
                    deep copy of the model (the copy is not timed), configured as in sweep_prune.py
                    (GroupMagnitudeImportance(p=2), classifier ignored, ViT round_to=num_heads)

Reports ratios ours/TP of the medians. When ours is slower, --profile (default on) runs cProfile on one
`amc.prune` per model and lists the top functions by cumulative and by own time.

Output: scripts/results/prune_time.md and prune_time.json (written atomically). Example:

    python scripts/bench_prune_time.py --reps 5
    python scripts/bench_prune_time.py --models resnet50 --reps 3 --no-profile
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _isolate import package_version, write_atomic  # noqa: E402
from sweep_prune import RATIO, _tp_config, build  # noqa: E402

VARIANTS = ("ours_prune", "ours_plan_apply", "ours_total", "tp")


def time_round(name: str, model, x, net, order: List[str]) -> Dict[str, float]:
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    import amc
    from amc.compressors import plan_pruning

    out: Dict[str, float] = {}
    for v in order:
        gc.collect()
        if v == "ours_prune":
            t0 = time.perf_counter()
            amc.prune(net, ratio=RATIO, criterion="l2", example_inputs=(x,))
            out[v] = time.perf_counter() - t0
        elif v == "ours_plan_apply":
            t0 = time.perf_counter()
            plan = plan_pruning(net, "l2", (x,))
            t1 = time.perf_counter()
            plan.apply(RATIO)
            t2 = time.perf_counter()
            out["ours_plan"], out["ours_apply"] = t1 - t0, t2 - t1
        elif v == "ours_total":
            t0 = time.perf_counter()
            n2 = amc.trace(model, x)
            t1 = time.perf_counter()
            amc.prune(n2, ratio=RATIO, criterion="l2", example_inputs=(x,))
            out["ours_trace"], out[v] = t1 - t0, time.perf_counter() - t0
        elif v == "tp":
            m = copy.deepcopy(model)
            cfg = _tp_config(m)
            t0 = time.perf_counter()
            pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=RATIO, **cfg)
            t1 = time.perf_counter()
            pruner.step()
            t2 = time.perf_counter()
            out["tp_graph"], out["tp_step"], out[v] = t1 - t0, t2 - t1, t2 - t0
            if isinstance(m, VisionTransformer):
                m.hidden_dim = m.conv_proj.out_channels
            del pruner, m
    return out


def profile_ours(net, x, top: int) -> Dict[str, str]:
    import amc

    prof = cProfile.Profile()
    prof.enable()
    amc.prune(net, ratio=RATIO, criterion="l2", example_inputs=(x,))
    prof.disable()
    res = {}
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        text = s.getvalue()
        res[key] = text[text.find("ncalls"):] if "ncalls" in text else text
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_b_16", help="comma list of torchvision models")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds per model (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true", help="skip cProfile even when ours is slower")
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)

    import torch
    import torch_pruning as tp

    import amc

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    results: Dict[str, Any] = {}
    args.load_before = os.getloadavg()[0]
    tp_version = package_version("torch_pruning")  # TP 1.6.1's __version__ still says 1.6.0
    for name in [m for m in args.models.split(",") if m]:
        model, x = build(name, 299 if name == "inception_v3" else 224, args.seed)
        net = amc.trace(model, x)
        time_round(name, model, x, net, list(VARIANTS))  # warm-up: imports, allocator, caches
        rounds = []
        for i in range(args.reps):
            order = list(VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)])
            rounds.append(time_round(name, model, x, net, order))
            print(f"{name} round {i + 1}/{args.reps}: " + ", ".join(f"{k}={v:.2f}s" for k, v in rounds[-1].items()),
                  flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        res = {"rounds": rounds, "median": med,
               "ratio_prune": med["ours_prune"] / med["tp"], "ratio_total": med["ours_total"] / med["tp"],
               "ratio_per_round": [r["ours_prune"] / r["tp"] for r in rounds]}
        if not args.no_profile and med["ours_prune"] > med["tp"]:
            res["profile"] = profile_ours(net, x, args.top)
        results[name] = res
        args.load_after = os.getloadavg()[0]
        write(results, args, tp_version)
    print(render(results, args, tp_version))
    return 0


def write(results: Dict[str, Any], args: argparse.Namespace, tp_version: str) -> None:
    write_atomic(os.path.join(args.out_dir, "prune_time.json"),
                 json.dumps({"args": vars(args), "torch_pruning": tp_version, "results": results}, indent=1))
    write_atomic(os.path.join(args.out_dir, "prune_time.md"), render(results, args, tp_version))


def render(results: Dict[str, Any], args: argparse.Namespace, tp_version: str) -> str:
    import torch

    lines = ["# Pruning time: amc vs Torch-Pruning", "",
             f"Generated by `python scripts/bench_prune_time.py --reps {args.reps}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, torch-pruning {tp_version}; CPU, "
             f"{args.threads} threads, 2-core machine, 1-minute load average {getattr(args, 'load_before', float('nan')):.2f} "
             f"before and {getattr(args, 'load_after', float('nan')):.2f} after (the run itself adds about "
             f"{args.threads}; nothing else was started beside it; absolute seconds are noisy: the variants run interleaved in one process, order rotated each round, so the ratios are the "
             f"number to read). Ratio {RATIO}, L2 magnitude, hard pruning. Medians of {args.reps} rounds "
             f"after one warm-up round.", "",
             "| model | ours: amc.prune on traced net (s) | = plan_pruning + apply (s) | trace (s) | ours: trace + prune (s) | "
             "TP: DependencyGraph (s) | TP: step (s) | TP total (s) | ours/TP (prune) | ours/TP (trace + prune) | "
             "per-round ours/TP (prune) | median per-round ours/TP (prune) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        m = r["median"]
        lines.append(f"| {name} | {m['ours_prune']:.2f} | {m['ours_plan']:.2f} + {m['ours_apply']:.2f} | "
                     f"{m['ours_trace']:.2f} | {m['ours_total']:.2f} | {m['tp_graph']:.2f} | {m['tp_step']:.2f} | "
                     f"{m['tp']:.2f} | **{r['ratio_prune']:.2f}x** | **{r['ratio_total']:.2f}x** | "
                     f"{', '.join(f'{v:.2f}' for v in r['ratio_per_round'])} | "
                     f"{statistics.median(r['ratio_per_round']):.2f}x |")
    for name, r in results.items():
        if "profile" in r:
            lines += ["", f"## cProfile of one `amc.prune` on traced {name} (ours is slower)", "",
                      "By cumulative time:", "", "```", r["profile"]["cumulative"].rstrip(), "```", "",
                      "By own time:", "", "```", r["profile"]["tottime"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
