"""Does `round_to` make pruned networks as fast as their MACs promise? CPU latency at batch 1 and 32.

    python scripts/bench_round_to.py [--models resnet50,mobilenet_v2] [--round-to 1,8,16] [--threads 1]
    python scripts/bench_round_to.py --target-macs 0.3     # equal MACs budget instead of ratio 0.5

Each model runs in its own process (timeout, memory guard). Per model: torchvision's architecture with
random weights, `amc.prune(ratio=0.5, criterion="l2")` (or `target_macs=`) once per `round_to`, then the original and every
pruned network timed interleaved (rotating order, medians). Efficiency = speedup x MACs(after)/MACs(before):
1.0 means the network got exactly as much faster as its MACs fell. Writes scripts/results/round_to.md/.json
(round_to_macs<t>.md/.json with --target-macs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import math
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _budget import smallest_ratio_under  # noqa: E402
from _isolate import package_version, run_isolated, write_atomic  # noqa: E402
from bench_speed import interleaved  # noqa: E402

DEFAULT_MODELS = "resnet50,mobilenet_v2,efficientnet_b2,regnet_x_1_6gf,vit_b_16"


def tp_at_macs(model, x1, target: float, round_to: int, base: int) -> Tuple[Any, float, float]:
    """Torch-Pruning 1.6.1's MetaPruner (group L2, one ratio for every layer, its `round_to`, heads set up as in
    its examples: sweep_prune._tp_config), the ratio bisected to the largest MACs at or under `target`."""
    import copy

    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    import amc
    from sweep_prune import _tp_config

    def build(ratio: float):
        m = copy.deepcopy(model)
        cfg = _tp_config(m)
        heads = cfg.pop("round_to", 1)  # torchvision ViT: a multiple of num_heads, as TP's example
        cfg["round_to"] = math.lcm(heads, round_to)
        tp.pruner.MetaPruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                             **cfg).step()
        if isinstance(m, VisionTransformer):
            m.hidden_dim = m.conv_proj.out_channels  # TP's example patches it by hand
        return m

    net, ratio, macs = smallest_ratio_under(build, lambda m: amc.count(m, x1)[0] / base, target, steps=14,
                                            close=0.002)
    if net is None:
        raise RuntimeError(f"Torch-Pruning could not reach {target}x MACs with round_to={round_to}")
    return net, macs, ratio


def onnxruntime_runners(nets: Dict[str, Any], x1: Any, folder: str, threads: int) -> Dict[str, Any]:
    """Each network exported by amc's `save_to_onnx` (eager ones traced first) and opened in onnxruntime
    with `threads` intra-op threads: `runner(x)` runs it on a torch tensor."""
    import onnxruntime as ort

    import amc

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    out = {}
    for k, net in nets.items():
        graph = net if isinstance(net, amc.ReconstructedNetwork) else amc.trace(net, x1)
        path = graph.save_to_onnx(os.path.join(folder, f"{k}.onnx"), x1)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out[k] = lambda x, s=sess, n=sess.get_inputs()[0].name: s.run(None, {n: x.numpy()})
    return out


def one_model(name: str, round_to: List[int], threads: int = 1, reps1: int = 15, reps32: int = 3,
              target_macs: float = 0.0, tp: bool = False, runtime: str = "torch") -> Dict[str, Any]:
    import warnings

    import torch
    import torchvision

    import amc

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x1 = torch.randn(1, 3, 224, 224)
    base = amc.count(model, x1)[0]
    nets = {"orig": model}
    macs = {}
    for r in round_to:
        budget = {"target_macs": target_macs} if target_macs else {"ratio": 0.5}
        nets[f"r{r}"] = amc.prune(model, example_inputs=(x1,), round_to=r, **budget).eval()
        macs[r] = amc.count(nets[f"r{r}"], x1)[0] / base
    out: Dict[str, Any] = {"model": name, "macs_ratio": macs}
    if tp:
        if not target_macs:
            raise SystemExit("--tp needs --target-macs (the two tools' ratios mean different things)")
        out["tp_macs_ratio"], out["tp_ratio"], out["tp_error"] = {}, {}, {}
        for r in round_to:
            try:
                nets[f"tp{r}"], out["tp_macs_ratio"][r], out["tp_ratio"][r] = tp_at_macs(model, x1, target_macs, r,
                                                                                         base)
            except Exception as exc:  # noqa: BLE001 - the peer's failure is a row of the table, not the end of ours
                out["tp_error"][r] = f"{type(exc).__name__}: {exc}"[:200]
    folder = tempfile.mkdtemp() if runtime == "onnxruntime" else None
    runners = onnxruntime_runners(nets, x1, folder, threads) if folder else nets
    for batch, reps in ((1, reps1), (32, reps32)):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            times = interleaved({k: (lambda n=n: n(x)) for k, n in runners.items()}, reps=reps, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"b{batch}"] = {r: {"speedup": med["orig"] / med[f"r{r}"],
                                "efficiency": med["orig"] / med[f"r{r}"] * macs[r]} for r in round_to}
        if tp:
            out[f"tp_b{batch}"] = {r: {"speedup": med["orig"] / med[f"tp{r}"],
                                       "efficiency": med["orig"] / med[f"tp{r}"] * out["tp_macs_ratio"][r]}
                                   for r in round_to if f"tp{r}" in med}
        out[f"b{batch}_orig_s"] = med["orig"]
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def render(rows: List[Dict[str, Any]], args: argparse.Namespace, load: str) -> str:
    rts = [int(r) for r in args.round_to.split(",")]
    budget = f"target_macs={args.target_macs}" if args.target_macs else "ratio=0.5"
    lines = ["# round_to: CPU speed of pruned networks against their MACs", "",
             f"Generated by `python scripts/bench_round_to.py --models {args.models} --round-to {args.round_to} "
             f"--threads {args.threads}{' --target-macs ' + str(args.target_macs) if args.target_macs else ''}{' --tp' if args.tp else ''}{' --runtime onnxruntime' if args.runtime == 'onnxruntime' else ''}` on {time.strftime('%Y-%m-%d %H:%M')}; torch {package_version('torch')}, "
             f"torchvision {package_version('torchvision')}; {platform.processor() or platform.machine()}, "
             f"{args.threads} torch thread(s), nothing else running; load average before/after: {load}.",
             "", f"`amc.prune({budget}, criterion=\"l2\")` of torchvision architectures (random weights), 224x224. "
             "Speedup = original latency / pruned latency (interleaved medians); efficiency = speedup x MACs "
             "after/before (1.0: as fast as the MACs promise)."
             + (f" Runtime: onnxruntime {package_version('onnxruntime')} (every network, the original included, "
                "exported by `save_to_onnx` and run with the same thread count)." if args.runtime == "onnxruntime"
                else " Runtime: torch (the amc graph; Torch-Pruning's eager module)."), "",
             "| model | round_to | MACs after/before | speedup b1 | efficiency b1 | speedup b32 | efficiency b32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if args.tp:
        lines[-4] += (" Rows \"TP\": Torch-Pruning 1.6.1's MetaPruner (group L2 magnitude, one ratio for every layer, "
                      "its own `round_to`; torchvision ViT rounded to a multiple of lcm(round_to, num_heads) with "
                      "`hidden_dim` patched, as its example does), the ratio bisected to the same MACs budget; every "
                      "network of a model, TP's included, timed in the same interleaved rounds against the same "
                      "original.")
    eff: Dict[int, Dict[str, List[float]]] = {r: {"b1": [], "b32": []} for r in rts}
    tp_eff: Dict[int, Dict[str, List[float]]] = {r: {"b1": [], "b32": []} for r in rts}
    for row in rows:
        if "b1" not in row:
            lines.append(f"| {row.get('model')} | - | - | - | - | - | {row.get('status', 'failed')} |")
            continue
        for r in rts:
            b1, b32 = row["b1"][str(r)], row["b32"][str(r)]
            eff[r]["b1"].append(b1["efficiency"])
            eff[r]["b32"].append(b32["efficiency"])
            lines.append(f"| {row['model']} | {r} | {row['macs_ratio'][str(r)]:.3f} | {b1['speedup']:.2f}x | "
                         f"{b1['efficiency']:.2f} | {b32['speedup']:.2f}x | {b32['efficiency']:.2f} |")
            if str(r) in row.get("tp_error", {}):
                lines.append(f"| {row['model']} (TP) | {r} | - | - | - | - | failed: {row['tp_error'][str(r)]} |")
            elif "tp_b1" in row:
                t1, t32 = row["tp_b1"][str(r)], row["tp_b32"][str(r)]
                tp_eff[r]["b1"].append(t1["efficiency"])
                tp_eff[r]["b32"].append(t32["efficiency"])
                lines.append(f"| {row['model']} (TP) | {r} | {row['tp_macs_ratio'][str(r)]:.3f} | {t1['speedup']:.2f}x | "
                             f"{t1['efficiency']:.2f} | {t32['speedup']:.2f}x | {t32['efficiency']:.2f} |")
    lines += ["", "Median efficiency over the models:", ""]
    for r in rts:
        if eff[r]["b1"]:
            lines.append(f"- round_to={r}: batch 1 {statistics.median(eff[r]['b1']):.2f}, "
                         f"batch 32 {statistics.median(eff[r]['b32']):.2f}"
                         + (f"; Torch-Pruning: batch 1 {statistics.median(tp_eff[r]['b1']):.2f}, batch 32 "
                            f"{statistics.median(tp_eff[r]['b32']):.2f}" if tp_eff[r]["b1"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--round-to", default="1,8,16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--target-macs", type=float, default=0.0, help="prune to this MACs fraction instead of ratio 0.5")
    p.add_argument("--tp", action="store_true",
                   help="also Torch-Pruning 1.6.1 at the same MACs and round_to, timed in the same rounds (needs --target-macs)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="time the networks in torch, or exported by save_to_onnx and run by onnxruntime")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    load0 = "%.2f" % os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        res = run_isolated(os.path.join(HERE, "bench_round_to.py") + ":one_model",
                           {"name": name, "round_to": [int(r) for r in args.round_to.split(",")],
                            "threads": args.threads, "target_macs": args.target_macs, "tp": args.tp,
                            "runtime": args.runtime},
                           timeout=args.timeout)
        res.setdefault("model", name)
        rows.append(json.loads(json.dumps(res)))  # int keys become strings, as in the JSON file
        print(name, {k: v for k, v in res.items() if k in ("b1", "b32", "status")}, flush=True)
    load = f"{load0} / {os.getloadavg()[0]:.2f}"
    os.makedirs(args.out_dir, exist_ok=True)
    stem = ((f"round_to_macs{args.target_macs:g}" if args.target_macs else "round_to") + ("_tp" if args.tp else "")
            + ("_onnxruntime" if args.runtime == "onnxruntime" else ""))
    write_atomic(os.path.join(args.out_dir, stem + ".json"), json.dumps({"rows": rows, "load": load}, indent=1))
    write_atomic(os.path.join(args.out_dir, stem + ".md"), render(rows, args, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
