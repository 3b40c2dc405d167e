"""Pruning sweep over the torchvision classification zoo: amc.prune vs Torch-Pruning, one model per subprocess.

For every model in `torchvision.models.list_models(module=torchvision.models)` with at most
--max-params parameters (weights=None, eval, torch.manual_seed(seed); input 224, inception_v3 299):

  ours  `amc.prune(net, ratio=0.5, criterion="l2")` on the traced net: handled (ran, output shape right
        at batch 1 and 2), MACs/params before and after (amc.count), trace and prune wall time, error;
        for torchvision ViTs the first attention block's embed_dim/head_dim before and after.
  TP    `tp.pruner.MetaPruner(importance=GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
        ignored_layers=[final classifier layers (out == 1000)])`, heads configured as in TP's examples
        (torchvision ViT: round_to=num_heads and `model.hidden_dim = conv_proj.out_channels` after
        step, from examples/torchvision_models/torchvision_pruning.py; swin/maxvit qkv layers:
        num_heads={qkv: heads}, from examples/transformers/prune_timm_vit.py): handled (no exception, the
        pruned model runs with the right output shape), MACs after with TP's own counter
        (tp.utils.count_ops_and_params) and with amc.count on the TP-pruned model, wall time
        (DependencyGraph build inside MetaPruner + importance + step), error.
  speed CPU latency of the unpruned, ours-pruned and TP-pruned models at batch 1 and 32
        (inference_mode, 2 threads, warm-up, interleaved rounds, median; batch 32 gets fewer rounds
        and is skipped when its estimated cost exceeds the per-model budget).

The three stages run in separate subprocesses (scripts/_isolate.py: process group, timeout, RLIMIT_AS
guard), so a hang or memory blow-up in one (TP on swin/maxvit) never loses the others. Pruned models
travel between them as torch.save pickles in a temporary folder.

Results: scripts/results/prune_sweep.json (rewritten after every model, so a partial run is readable)
and scripts/results/prune_sweep.md. Examples:

    nohup python scripts/sweep_prune.py > /tmp/prune_sweep.log 2>&1 &
    python scripts/sweep_prune.py --models resnet18,vit_b_16 --skip-latency
    python scripts/sweep_prune.py --resume --models swin_t      # re-run one model, keep the rest
    python scripts/sweep_prune.py --resume --jobs 2             # finish an interrupted sweep
    python scripts/sweep_prune.py --zoo timm --skip-latency     # smallest model of every timm family
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _isolate import output_shapes, package_version as _version, run_isolated, write_atomic  # noqa: E402

INPUT_SIZE = {"inception_v3": 299}
NUM_CLASSES = 1000
RATIO = 0.5
# TP is known to hang or blow up memory on these; run them last so a partial sweep covers the rest.
RUN_LAST = ("swin", "maxvit")
# A representative model of every family runs first, so a sweep cut short still covers the zoo's shapes.
RUN_FIRST = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16",
             "googlenet", "inception_v3", "shufflenet_v2_x1_0", "squeezenet1_1", "mnasnet1_0", "regnet_y_400mf",
             "regnet_x_400mf", "vgg11_bn", "resnext50_32x4d", "efficientnet_v2_s", "vit_b_32", "swin_t", "maxvit_t",
             "swin_v2_t", "wide_resnet50_2")
SELF = os.path.join(HERE, "sweep_prune.py")


# ----------------------------------------------------------------------------------------------
# Child side: each function runs in its own process (see _isolate.py) and returns a JSON-able dict.

def _setup(seed: int, threads: int):
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


TIMM = "timm:"  # model names of the timm zoo carry this prefix (`--zoo timm`)


def _create(name: str):
    """A torchvision model, or a timm one for `timm:<name>` (random weights, 1000 classes)."""
    if name.startswith(TIMM):
        import timm

        return timm.create_model(name[len(TIMM):], pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def build(name: str, size: int, seed: int):
    """The model (seeded, eval) and a seeded example input of batch 1."""
    import torch

    torch.manual_seed(seed)
    model = _create(name).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model, x


def _attn_dims(mod) -> Optional[Dict[str, int]]:
    if mod is None:
        return None
    return {k: int(getattr(mod, k)) for k in ("embed_dim", "head_dim", "num_heads") if hasattr(mod, k)}


VIT_ATTN = "encoder.layers.encoder_layer_0.self_attention"


def ours_one(name: str, size: int, seed: int = 0, threads: int = 2, save_path: str = "",
             round_to: int = 1) -> Dict[str, Any]:
    """amc: trace, prune at RATIO with L2, check, count; optionally torch.save the pruned net."""
    torch = _setup(seed, threads)
    import amc

    r: Dict[str, Any] = {"handled": False}
    stage = "build"
    try:
        model, x = build(name, size, seed)
        r["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            ref1, ref2 = model(x), model(x.repeat(2, 1, 1, 1))
        stage = "trace"
        t0 = time.perf_counter()
        net = amc.trace(model, x)
        r["trace_s"] = time.perf_counter() - t0
        stage = "count"
        r["macs_before"], r["params_before"] = amc.count(net, x)
        stage = "prune"
        t0 = time.perf_counter()
        pruned = amc.prune(net, ratio=RATIO, criterion="l2", example_inputs=(x,), round_to=round_to)
        r["prune_s"] = time.perf_counter() - t0
        stage = "check"
        pruned.eval()
        with torch.no_grad():
            o1, o2 = pruned(x), pruned(x.repeat(2, 1, 1, 1))
        r["out_shape_ok"] = output_shapes(o1) == output_shapes(ref1) and output_shapes(o2) == output_shapes(ref2)
        stage = "count pruned"
        r["macs_after"], r["params_after"] = amc.count(pruned, x)
        if name.startswith("vit_"):
            r["attn_before"] = _attn_dims(model.get_submodule(VIT_ATTN))
            r["attn_after"] = _attn_dims(pruned.module_of(VIT_ATTN) if _has_node(pruned, VIT_ATTN) else None)
        r["handled"] = bool(r["out_shape_ok"])
        if not r["handled"]:
            r["error"] = (f"output shape {output_shapes(o1)} / {output_shapes(o2)} != "
                          f"{output_shapes(ref1)} / {output_shapes(ref2)}")
        if save_path:
            stage = "save"
            torch.save(pruned, save_path)
    except Exception as exc:  # noqa: BLE001 - recorded per model
        r["error"] = f"[{stage}] {type(exc).__name__}: {exc}"[:600]
    return r


def _has_node(net, name: str) -> bool:
    return any(n.name == name for n in net.layer_nodes)


def _tp_config(model) -> Dict[str, Any]:
    """ignored_layers / round_to / num_heads as TP's own examples set them up for this architecture."""
    import torch.nn as nn
    from torchvision.models.vision_transformer import VisionTransformer

    ignored = [m for m in model.modules()
               if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
               or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)]
    cfg: Dict[str, Any] = {"ignored_layers": ignored}
    if isinstance(model, VisionTransformer):
        # examples/torchvision_models/torchvision_pruning.py: "Rounding the number of channels to the
        # nearest multiple of num_heads", and model.hidden_dim patched after step().
        cfg["round_to"] = model.encoder.layers[0].num_heads
        return cfg
    heads = {}
    for m in model.modules():  # prune_timm_vit.py: num_heads[m.qkv] = m.num_heads
        qkv = getattr(m, "qkv", None) or getattr(m, "to_qkv", None)
        n = getattr(m, "num_heads", None) or getattr(m, "n_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(n, int):
            heads[qkv] = n
    if heads:
        cfg["num_heads"] = heads
        cfg["prune_head_dims"] = True
        cfg["prune_num_heads"] = False
    return cfg


def tp_one(name: str, size: int, seed: int = 0, threads: int = 2, save_path: str = "",
           amc_count: bool = True, round_to: int = 1) -> Dict[str, Any]:
    """Torch-Pruning MetaPruner at RATIO with group L2 magnitude; check, count; optionally save."""
    torch = _setup(seed, threads)
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    r: Dict[str, Any] = {"handled": False, "tp_version": tp.__version__}
    stage = "build"
    try:
        model, x = build(name, size, seed)
        with torch.no_grad():
            ref1, ref2 = model(x), model(x.repeat(2, 1, 1, 1))
        stage = "tp count"
        macs, params = tp.utils.count_ops_and_params(model, x)
        r["tp_macs_before"], r["tp_params_before"] = int(macs), int(params)
        cfg = _tp_config(model)
        if round_to > 1:  # TP's own round_to; a ViT's stays a multiple of its head count too
            cfg["round_to"] = math.lcm(cfg.get("round_to", 1), round_to)
        r["config"] = {k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.items()}
        stage = "pruner"
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=RATIO, **cfg)
        r["graph_s"] = time.perf_counter() - t0
        stage = "step"
        pruner.step()
        r["prune_s"] = time.perf_counter() - t0
        stage = "check"
        if isinstance(model, VisionTransformer):
            with torch.no_grad():
                try:
                    model(x)
                    r["runs_without_patch"] = True
                except Exception as exc:  # noqa: BLE001
                    r["runs_without_patch"] = False
                    r["unpatched_error"] = f"{type(exc).__name__}: {exc}"[:200]
            model.hidden_dim = model.conv_proj.out_channels  # TP's example does this by hand
            r["attn_after"] = _attn_dims(model.get_submodule(VIT_ATTN))
        with torch.no_grad():
            o1, o2 = model(x), model(x.repeat(2, 1, 1, 1))
        r["out_shape_ok"] = output_shapes(o1) == output_shapes(ref1) and output_shapes(o2) == output_shapes(ref2)
        stage = "tp count pruned"
        macs, params = tp.utils.count_ops_and_params(model, x)
        r["tp_macs_after"], r["tp_params_after"] = int(macs), int(params)
        r["params_after"] = sum(p.numel() for p in model.parameters())
        r["handled"] = bool(r["out_shape_ok"])
        if not r["handled"]:
            r["error"] = (f"output shape {output_shapes(o1)} / {output_shapes(o2)} != "
                          f"{output_shapes(ref1)} / {output_shapes(ref2)}")
        if save_path and r["handled"]:
            stage = "save"
            torch.save(model, save_path)
        if amc_count and r["handled"]:
            stage = "amc.count of TP model"
            import amc

            try:
                r["macs_after"], _ = amc.count(model, x)
            except Exception as exc:  # noqa: BLE001 - an amc tracing problem, not a TP one
                r["amc_count_error"] = f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - recorded per model
        r["error"] = f"[{stage}] {type(exc).__name__}: {exc}"[:600]
    return r


def latency_one(name: str, size: int, seed: int = 0, threads: int = 2, paths: Optional[Dict[str, str]] = None,
                budget_s: float = 40.0, max_reps_b1: int = 7, max_reps_b32: int = 3,
                runtime: str = "torch") -> Dict[str, Any]:
    """Median latency of the original and each pruned model at batch 1 and 32, interleaved rounds; with
    runtime="onnxruntime", of each one exported by amc's `save_to_onnx` and run by onnxruntime."""
    torch = _setup(seed, threads)
    model, x = build(name, size, seed)
    models = {"orig": model}
    for key, path in (paths or {}).items():
        if path and os.path.exists(path):
            models[key] = torch.load(path, weights_only=False).eval()
    r: Dict[str, Any] = {}
    if runtime == "onnxruntime":
        folder = tempfile.mkdtemp(prefix="amc_sweep_onnx_")
        try:
            from _ort import ort_runners

            r["export_errors"] = {}
            models = ort_runners(models, x, folder, threads, check=lambda k: False, errors=r["export_errors"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the sessions hold their models in memory
        if "orig" not in models:
            r["error"] = f"the unpruned model did not export: {r['export_errors'].get('orig', '?')}"
            return r
    start = time.perf_counter()

    def timed(m, inp) -> float:
        t0 = time.perf_counter()
        m(inp)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for batch, share, max_reps in ((1, 0.35, max_reps_b1), (32, 1.0, max_reps_b32)):
            inp = x.repeat(batch, 1, 1, 1)
            left = budget_s * share - (time.perf_counter() - start)
            # Every model takes every position in the round order once (a full rotation) before the
            # budget may stop the rounds: with fewer rounds, whichever model follows the unpruned one
            # pays for its freed memory and the comparison between pruned models is biased.
            rotation = len(models)
            if batch > 1:
                # estimate from batch 1 (measured: a batch-32 image costs 0.2-0.3x a batch-1 image here)
                est = sum(r["b1"][k] for k in models) * batch * 0.3 if "b1" in r else float("inf")
                # a forward of several seconds gains nothing from a warm-up round: spend the budget on timing
                warm = est < 3.0 * len(models)
                if est * (rotation + (1 if warm else 0)) > left:  # (warm-up +) a full rotation would not fit
                    r[f"b{batch}_skipped"] = f"estimated {est:.0f}s per round x {rotation} rounds > budget"
                    continue
            else:
                warm = True
            times: Dict[str, List[float]] = {k: [] for k in models}
            if warm:
                for k, m in models.items():
                    timed(m, inp)
            r[f"b{batch}_warmup"] = warm
            for i in range(max(max_reps, rotation)):
                t0 = time.perf_counter()
                keys = list(models)
                keys = keys[i % len(keys):] + keys[:i % len(keys)]  # rotate the order each round
                for k in keys:
                    times[k].append(timed(models[k], inp))
                t_round = time.perf_counter() - t0
                left = budget_s * share - (time.perf_counter() - start)
                if i + 1 >= rotation and t_round > left:
                    break
            r[f"b{batch}"] = {k: statistics.median(v) for k, v in times.items()}
            r[f"b{batch}_reps"] = len(times["orig"])
    r["latency_s"] = time.perf_counter() - start
    return r


# ----------------------------------------------------------------------------------------------
# Parent side.

def param_count(name: str) -> int:
    import torch

    try:
        with torch.device("meta"):
            model = _create(name)
    except Exception:  # noqa: BLE001 - some builders (regnet) compute on tensors; build for real
        model = _create(name)
    return sum(p.numel() for p in model.parameters())


def _timm_size(name: str) -> int:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name[len(TIMM):], pretrained=False)
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def timm_smallest_per_family() -> List[Tuple[str, int, int]]:
    """`(timm:<name>, input size, params)` of the smallest model of every timm family (the name up to its
    first '_' or digit: resnet18 -> resnet, vit_tiny_patch16_224 -> vit), by parameter count on meta."""
    import re

    import timm
    import torch

    best: Dict[str, Tuple[int, str, int]] = {}
    for name in timm.list_models():
        family = re.split(r"[_\d]", name, maxsplit=1)[0] or name
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
            n = sum(p.numel() for p in model.parameters())
            size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        except Exception:  # noqa: BLE001 - a builder that cannot run on meta is skipped here
            continue
        if family not in best or n < best[family][0]:
            best[family] = (n, name, size)
    return [(TIMM + name, size, n) for n, name, size in sorted(best.values(), key=lambda v: v[1])]


def _cached_families() -> List[Tuple[str, int, int]]:
    """`timm_smallest_per_family()` (about 10 minutes of meta builds), kept per timm version in the cache."""
    import timm

    path = os.path.join(os.environ.get("AMC_BENCH_CACHE", os.path.expanduser("~/.cache/amc_bench")),
                        f"timm_families_{timm.__version__}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return [tuple(v) for v in json.load(f)]
    picked = timm_smallest_per_family()
    write_atomic(path, json.dumps(picked))
    return picked


def job_list(models: str, max_params: float, zoo: str = "torchvision") -> List[Dict[str, Any]]:
    import torchvision

    if zoo == "timm":
        wanted = [m if m.startswith(TIMM) else TIMM + m for m in models.split(",") if m]
        picked = [(n, _timm_size(n), param_count(n)) for n in wanted] if wanted else _cached_families()
        return [{"model": n, "input": size, "params": p, "skip": p > max_params} for n, size, p in picked]
    names = torchvision.models.list_models(module=torchvision.models)
    if models:
        wanted = [m for m in models.split(",") if m]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            raise SystemExit(f"unknown models {unknown}; see torchvision.models.list_models()")
        names = [n for n in names if n in wanted]
    rest = [n for n in names if n not in RUN_FIRST]
    names = ([n for n in RUN_FIRST if n in names] + [n for n in rest if not n.startswith(RUN_LAST)]
             + [n for n in rest if n.startswith(RUN_LAST)])
    jobs = []
    for n in names:
        p = param_count(n)
        jobs.append({"model": n, "input": INPUT_SIZE.get(n, 224), "params": p, "skip": p > max_params})
    return jobs


def run_model(job: Dict[str, Any], args: argparse.Namespace, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One model's stages; with `previous` (--ours-only) Torch-Pruning's stored result is kept."""
    name, size = job["model"], job["input"]
    row: Dict[str, Any] = {"model": name, "input": size, "params": job["params"]}
    tmp = tempfile.mkdtemp(prefix="amc_prune_sweep_")
    try:
        paths = {"ours": os.path.join(tmp, "ours.pt"), "tp": os.path.join(tmp, "tp.pt")}
        keep = not args.skip_latency
        row["ours"] = run_isolated(f"{SELF}:ours_one", {"name": name, "size": size, "seed": args.seed,
                                   "threads": args.threads, "save_path": paths["ours"] if keep else "",
                                   "round_to": args.round_to},
                                   timeout=args.timeout, mem_gb=args.mem_gb)
        if previous is not None:
            row["tp"] = previous["tp"]
        else:
            row["tp"] = run_isolated(f"{SELF}:tp_one", {"name": name, "size": size, "seed": args.seed,
                                     "threads": args.threads, "save_path": paths["tp"] if keep else "",
                                     "round_to": args.round_to},
                                     timeout=args.tp_timeout, mem_gb=args.mem_gb)
        if keep and any(os.path.exists(p) for p in paths.values()):
            row["latency"] = run_isolated(
                f"{SELF}:latency_one", {"name": name, "size": size, "seed": args.seed, "threads": args.threads,
                                        "paths": {k: p for k, p in paths.items() if os.path.exists(p)},
                                        "budget_s": args.latency_budget, "runtime": args.runtime},
                timeout=args.latency_budget * 2 + (600 if args.runtime == "onnxruntime" else 120), mem_gb=args.mem_gb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    derive(row)
    return row


def derive(row: Dict[str, Any]) -> None:
    """Ratios and comparisons computed from the raw stage results."""
    o, t, lat = row.get("ours") or {}, row.get("tp") or {}, row.get("latency") or {}
    before = o.get("macs_before")
    if o.get("handled") and before:
        row["ours_macs_ratio"] = o["macs_after"] / before
        row["ours_params_ratio"] = o["params_after"] / o["params_before"]
    if t.get("handled"):
        if before and t.get("macs_after"):
            row["tp_macs_ratio"] = t["macs_after"] / before
        if t.get("tp_macs_before"):
            row["tp_macs_ratio_tpcount"] = t["tp_macs_after"] / t["tp_macs_before"]
        if o.get("params_before"):
            row["tp_params_ratio"] = t["params_after"] / o["params_before"]
    if o.get("handled") and t.get("handled") and "tp_macs_ratio" in row:
        row["ours_ge_tp"] = row["ours_macs_ratio"] <= row["tp_macs_ratio"] * 1.001
    elif o.get("handled") and t and not t.get("handled"):  # TP error, timeout or crash
        row["ours_ge_tp"] = "tp failed"
    if o.get("prune_s") and t.get("prune_s"):
        row["time_ratio"] = (o["prune_s"] + o.get("trace_s", 0.0)) / t["prune_s"]
    for b in ("b1", "b32"):
        med = lat.get(b)
        if med and med.get("orig"):
            for k in ("ours", "tp"):
                if med.get(k):
                    row[f"speedup_{k}_{b}"] = med["orig"] / med[k]
                    if row.get(f"{k}_macs_ratio"):
                        row[f"efficiency_{k}_{b}"] = row[f"speedup_{k}_{b}"] * row[f"{k}_macs_ratio"]


def _status(stage: Dict[str, Any]) -> str:
    if not stage:
        return "-"
    if stage.get("handled"):
        return "yes"
    if stage.get("status") in ("timeout", "oom", "crash"):
        return f"**{stage['status'].upper()}**"
    return "**NO**"


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _clean(s: str, n: int = 220) -> str:
    return (s or "").replace("|", "\\|").replace("\n", " ")[:n]


def render_markdown(rows: List[Dict[str, Any]], remaining: List[str], args: argparse.Namespace) -> str:
    ran = [r for r in rows if not r.get("skipped")]
    skipped = [r for r in rows if r.get("skipped")]
    ours_ok = [r for r in ran if (r.get("ours") or {}).get("handled")]
    tp_ok = [r for r in ran if (r.get("tp") or {}).get("handled")]
    both = [r for r in ran if r.get("ours_ge_tp") in (True, False)]
    ge = [r for r in both if r["ours_ge_tp"] is True]
    ours_only = [r for r in ran if r.get("ours_ge_tp") == "tp failed"]
    tp_only = [r for r in tp_ok if not (r.get("ours") or {}).get("handled")]
    tr = sorted(r["time_ratio"] for r in ran if r.get("time_ratio"))
    sp = {f"{k}_{b}": sorted(r[f"speedup_{k}_{b}"] for r in ran if r.get(f"speedup_{k}_{b}"))
          for k in ("ours", "tp") for b in ("b1", "b32")}
    mr = {k: sorted(r[f"{k}_macs_ratio"] for r in both if r.get(f"{k}_macs_ratio")) for k in ("ours", "tp")}
    ef = {f"{k}_{b}": sorted(r[f"efficiency_{k}_{b}"] for r in ran if r.get(f"efficiency_{k}_{b}"))
          for k in ("ours", "tp") for b in ("b1", "b32")}
    title = "# Pruning sweep: amc.prune vs Torch-Pruning" + (" (PARTIAL)" if remaining else "")
    lines = [title, "",
             f"Generated by `{_command(args)}` on {time.strftime('%Y-%m-%d %H:%M')}; torch "
             f"{_version('torch')}, torchvision {_version('torchvision')}, torch-pruning {_version('torch_pruning')}; "
             f"CPU, {args.threads} torch thread(s) per model on a shared 2-core machine (latencies are noisy: "
             f"interleaved rounds, medians; compare the ratios, not the seconds). Ratio {RATIO} (fraction of "
             f"channels removed per group), L2, round_to {getattr(args, 'round_to', 1)} (ours and TP); latency in "
             f"{getattr(args, 'runtime', 'torch')}"
             + (" (every model exported by amc's save_to_onnx)" if getattr(args, "runtime", "torch") == "onnxruntime"
                else "") + f". Timeouts: ours {args.timeout:.0f} s, TP {args.tp_timeout:.0f} s; "
             f"memory guard {args.mem_gb} GB." + (f" {args.note}" if getattr(args, "note", "") else ""),
             ""]
    if remaining:
        lines += [f"**PARTIAL: {len(remaining)} models not run yet:** {', '.join(remaining)}", ""]
    lines += [
        "## Summary", "",
        f"- Models run: {len(ran)} (skipped for > {args.max_params / 1e6:.0f}M params: "
        f"{', '.join(r['model'] for r in skipped) or 'none'}).",
        f"- **ours handles {len(ours_ok)}/{len(ran)}**, **TP handles {len(tp_ok)}/{len(ran)}** "
        "(handled = ran without error and the pruned model gives the original's output shape at batch 1 and 2).",
        f"- Where both handle a model ({len(both)}), ours removes at least as many MACs as TP (amc.count on "
        f"both pruned models, 0.1% tolerance) on **{len(ge)}/{len(both)}**; ours handles {len(ours_only)} "
        f"models TP fails; TP handles {len(tp_only)} models ours fails.",
        f"- Median MACs after/before on the models both handle: ours {_f(_med(mr['ours']))}, "
        f"TP {_f(_med(mr['tp']))}.",
        f"- Pruning time, ours (trace + analysis + L2 + hard prune) / TP (DependencyGraph + importance + "
        f"step): median {_f(_med(tr), '{:.2f}')}x over {len(tr)} models (min {_f(tr[0] if tr else None, '{:.2f}')}, "
        f"max {_f(tr[-1] if tr else None, '{:.2f}')}); see prune_time.md for the careful benchmark.",
        f"- Median latency speedup vs unpruned, batch 1: ours {_f(_med(sp['ours_b1']), '{:.2f}')}x, "
        f"TP {_f(_med(sp['tp_b1']), '{:.2f}')}x; batch 32: ours {_f(_med(sp['ours_b32']), '{:.2f}')}x, "
        f"TP {_f(_med(sp['tp_b32']), '{:.2f}')}x. " + _latency_coverage(ran, sp),
        "- Median efficiency (speedup x MACs after/before; 1.0 = as fast as the MACs promise), batch 1: "
        + ", ".join(f"{who} {_f(_med(ef[f'{k}_b1']), '{:.2f}')} ({len(ef[f'{k}_b1'])} models)"
                    for who, k in (("ours", "ours"), ("TP", "tp")))
        + "; batch 32: " + ", ".join(f"{who} {_f(_med(ef[f'{k}_b32']), '{:.2f}')} ({len(ef[f'{k}_b32'])} models)"
                                     for who, k in (("ours", "ours"), ("TP", "tp"))) + ".",
        *_speedup_vs_tp(ran),
        "",
        "### Failures", ""]
    fails = [(r["model"], side, (r.get(side) or {})) for r in ran for side in ("ours", "tp")
             if not (r.get(side) or {}).get("handled")]
    for model, side, st in fails:
        lines.append(f"- {model} — {'ours' if side == 'ours' else 'TP'}: "
                     f"{_clean(st.get('error') or st.get('status') or 'not run', 400)}")
    if not fails:
        lines.append("- none")
    vits = [r for r in ran if r["model"].startswith("vit_")]
    if vits:
        lines += ["", "### ViT attention dims (encoder_layer_0.self_attention: embed_dim/head_dim/num_heads)", "",
                  "| model | before | ours after | TP after | TP runs without the manual `hidden_dim` patch |",
                  "|---|---|---|---|---|"]
        for r in vits:
            o, t = r.get("ours") or {}, r.get("tp") or {}
            fmt = lambda d: "/".join(str(d.get(k, "?")) for k in ("embed_dim", "head_dim", "num_heads")) if d else "-"  # noqa: E731
            lines.append(f"| {r['model']} | {fmt(o.get('attn_before'))} | {fmt(o.get('attn_after'))} | "
                         f"{fmt(t.get('attn_after'))} | {_yn(t.get('runs_without_patch'))} "
                         f"{_clean(t.get('unpatched_error', ''), 120)} |")
    lines += ["", "## Per model", "",
              "MACs ratio = MACs after / before, both counted by amc.count (TP's own counter in brackets). "
              "Speedup = unpruned median latency / pruned median latency. Time ratio = ours (trace + prune) / "
              "TP (MetaPruner init + step), seconds in brackets.", "",
              "| model | params (M) | ours handled | ours MACs ratio | TP handled | TP MACs ratio [TP count] | "
              "ours >= TP reduction? | speedup b1 ours / TP | speedup b32 ours / TP | time ours / TP | notes |",
              "|---|---:|:-:|---:|:-:|---:|:-:|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | skipped | - | skipped | - | - | - | - | - | "
                         f"> {args.max_params / 1e6:.0f}M params |")
            continue
        o, t, lat = r.get("ours") or {}, r.get("tp") or {}, r.get("latency") or {}
        notes = []
        if not o.get("handled"):
            notes.append("ours: " + _clean(o.get("error") or o.get("status", ""), 160))
        if not t.get("handled"):
            notes.append("TP: " + _clean(t.get("error") or t.get("status", ""), 160))
        if t.get("runs_without_patch") is False:
            notes.append("TP needs manual `model.hidden_dim` patch")
        if t.get("amc_count_error"):
            notes.append("amc.count of TP model: " + _clean(t["amc_count_error"], 100))
        if lat.get("status"):
            notes.append("latency: " + _clean(lat.get("error", lat["status"]), 100))
        if lat.get("b32_skipped"):
            notes.append("b32 " + lat["b32_skipped"])
        ge = r.get("ours_ge_tp")
        ge_s = {True: "yes", False: "**no**", "tp failed": "yes (TP failed)"}.get(ge, "-")
        time_s = (f"{_f(r.get('time_ratio'), '{:.2f}')}x ({_f(o.get('trace_s', 0) + o.get('prune_s', 0), '{:.1f}')}"
                  f" / {_f(t.get('prune_s'), '{:.1f}')} s)") if r.get("time_ratio") else "-"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {_status(o)} | {_f(r.get('ours_macs_ratio'))} | {_status(t)} | "
            f"{_f(r.get('tp_macs_ratio'))} [{_f(r.get('tp_macs_ratio_tpcount'))}] | {ge_s} | "
            f"{_f(r.get('speedup_ours_b1'), '{:.2f}')} / {_f(r.get('speedup_tp_b1'), '{:.2f}')} | "
            f"{_f(r.get('speedup_ours_b32'), '{:.2f}')} / {_f(r.get('speedup_tp_b32'), '{:.2f}')} | {time_s} | "
            f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def _latency_coverage(ran: List[Dict[str, Any]], sp: Dict[str, List[float]]) -> str:
    n1, n32 = len(sp["ours_b1"]), len(sp["ours_b32"])
    if n1 == n32 == len(ran):
        return f"Latency measured on all {len(ran)} models at batch 1 and 32."
    return (f"Latency measured on {n1} models at batch 1 "
            f"({', '.join(r['model'] for r in ran if r.get('speedup_ours_b1')) or 'none'}) and {n32} at batch 32; "
            "the rest ran with --skip-latency or over budget.")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces the table (non-default options only)."""
    parts = ["python scripts/sweep_prune.py"]
    if getattr(args, "zoo", "torchvision") != "torchvision":
        parts.append(f"--zoo {args.zoo}")
    if getattr(args, "models", ""):
        parts.append(f"--models {args.models}")
    if getattr(args, "skip_latency", False):
        parts.append("--skip-latency")
    if getattr(args, "threads", 2) != 2:
        parts.append(f"--threads {args.threads}")
    if getattr(args, "latency_budget", 40.0) != 40.0:
        parts.append(f"--latency-budget {args.latency_budget:g}")
    if getattr(args, "round_to", 1) != 1:
        parts.append(f"--round-to {args.round_to}")
    if getattr(args, "runtime", "torch") != "torch":
        parts.append(f"--runtime {args.runtime}")
    return " ".join(parts)


def _speedup_vs_tp(ran: List[Dict[str, Any]], tol: float = 0.05) -> List[str]:
    """How often our pruned model runs as fast as TP's (within tol) where both were timed."""
    out = []
    for b in ("b1", "b32"):
        pairs = [(r["model"], r[f"speedup_ours_{b}"], r[f"speedup_tp_{b}"]) for r in ran
                 if r.get(f"speedup_ours_{b}") and r.get(f"speedup_tp_{b}")]
        if not pairs:
            continue
        ok = [p for p in pairs if p[1] >= p[2] * (1 - tol)]
        worse = sorted((p for p in pairs if p[1] < p[2] * (1 - tol)), key=lambda p: p[1] / p[2])
        out.append(f"- Batch {b[1:]}: our pruned model is at least as fast as TP's (within {tol:.0%}) on "
                   f"**{len(ok)}/{len(pairs)}** models timed for both"
                   + (("; slower on " + ", ".join(f"{m} ({o:.2f}x vs {t:.2f}x)" for m, o, t in worse[:12])
                       + (" ..." if len(worse) > 12 else "")) if worse else "") + ".")
    return out


def _yn(v: Any) -> str:
    return {True: "yes", False: "**no**"}.get(v, "-")


def _med(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma list of torchvision model names to run (default: all)")
    p.add_argument("--skip-latency", action="store_true", help="do not measure CPU latency")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in the JSON and run only the models missing there "
                        "(plus those named in --models)")
    p.add_argument("--ours-only", action="store_true",
                   help="re-run only amc's stage of the models already in the JSON (all, or those in --models) "
                        "and keep Torch-Pruning's stored results: for a rerun after amc's rules change")
    p.add_argument("--jobs", type=int, default=1,
                   help="models run at the same time (default 1; more is faster but adds latency noise)")
    p.add_argument("--max-params", type=float, default=250e6, help="skip models with more parameters")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for ours per model (default 600)")
    p.add_argument("--tp-timeout", type=float, default=300.0, help="seconds for TP per model (default 300)")
    p.add_argument("--latency-budget", type=float, default=40.0,
                   help="latency seconds per model, about 1/3 for batch 1 and the rest for batch 32 (default 40)")
    p.add_argument("--mem-gb", type=float, default=12.0, help="RLIMIT_AS per child process in GB (default 12)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per child (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--note", default="", help="a sentence about the run's conditions, printed under the title")
    p.add_argument("--render-only", action="store_true", help="re-render the markdown from the JSON and exit")
    p.add_argument("--round-to", type=int, default=1,
                   help="ours and TP keep multiples of it per group (default 1: exact ratios)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="time the models in torch, or exported by amc's save_to_onnx and run by onnxruntime")
    p.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision",
                   help="timm: the smallest model of every timm family (random weights, its default input size), "
                        "written to prune_sweep_timm.{json,md}")
    args = p.parse_args(argv)
    stem = (("prune_sweep" if args.zoo == "torchvision" else "prune_sweep_timm")
            + (f"_r{args.round_to}" if args.round_to != 1 else "") + ("_onnxruntime" if args.runtime != "torch" else ""))
    if args.render_only:
        json_path = os.path.join(args.out_dir, f"{stem}.json")
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        run_args = argparse.Namespace(**{**data["meta"]["args"], **({"note": args.note} if args.note else {})})
        rows = data["results"]
        for r in rows:
            if not r.get("skipped"):
                derive(r)
        write_atomic(os.path.join(args.out_dir, f"{stem}.md"),
                     render_markdown(rows, data["meta"].get("remaining", []), run_args))
        print(f"re-rendered {os.path.join(args.out_dir, stem + '.md')}")
        return 0

    json_path = os.path.join(args.out_dir, f"{stem}.json")
    md_path = os.path.join(args.out_dir, f"{stem}.md")
    jobs = job_list(args.models, args.max_params, args.zoo)
    results: Dict[str, Dict[str, Any]] = {}
    order = [j["model"] for j in job_list("", args.max_params, args.zoo)] if args.resume else \
        [j["model"] for j in jobs]
    if args.resume and os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            for r in json.load(f)["results"]:
                results[r["model"]] = r
    forced = set(m if args.zoo == "torchvision" or m.startswith(TIMM) else TIMM + m
                 for m in args.models.split(",") if m)
    todo = [j for j in jobs if not j["skip"] and (j["model"] in forced or j["model"] not in results)]
    if args.ours_only:
        if not args.resume:
            p.error("--ours-only re-runs models stored in the JSON: use it with --resume")
        todo = [j for j in jobs if not j["skip"] and "tp" in results.get(j["model"], {})
                and (not forced or j["model"] in forced)]
    previous = dict(results) if args.ours_only else {}
    for job in jobs:
        if job["skip"]:
            results[job["model"]] = {"model": job["model"], "input": job["input"], "params": job["params"],
                                     "skipped": True}
    lock = threading.Lock()

    def save() -> None:
        with lock:
            rows = [results[k] for k in sorted(results)]
            remaining = [k for k in order if k not in results]
            meta = {"ratio": RATIO, "criterion": "l2", "torch_pruning": _version("torch_pruning"),
                    "partial": bool(remaining), "remaining": remaining, "args": vars(args)}
            write_atomic(json_path, json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
            write_atomic(md_path, render_markdown(rows, remaining, args))

    counter = iter(range(1, len(todo) + 1))

    def work(job: Dict[str, Any]) -> None:
        t0 = time.perf_counter()
        row = run_model(job, args, previous.get(job["model"]))
        with lock:
            results[job["model"]] = row
            i = next(counter)
        print(f"[{i}/{len(todo)}] {job['model']}: ours={_status(row.get('ours'))} "
              f"{_f(row.get('ours_macs_ratio'))} tp={_status(row.get('tp'))} {_f(row.get('tp_macs_ratio'))} "
              f"time={_f(row.get('time_ratio'), '{:.2f}')} b1={_f(row.get('speedup_ours_b1'), '{:.2f}')}/"
              f"{_f(row.get('speedup_tp_b1'), '{:.2f}')} wall={time.perf_counter() - t0:.0f}s "
              f"{(row.get('ours') or {}).get('error', '')[:150]} {(row.get('tp') or {}).get('error', '')[:150]}",
              flush=True)
        save()

    save()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(work, todo))
    save()
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
