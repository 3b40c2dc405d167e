"""Detection sweep: every torchvision detector traced and pruned by amc, beside Torch-Pruning, one model per process.

For every model in `torchvision.models.list_models(module=torchvision.models.detection)` (weights=None,
weights_backbone=None, eval, seeded; the score threshold lowered to 0.0 so random weights give the full
`detections_per_img` boxes and the box/mask/keypoint heads do real work):

  ours  trace at one 320x320 image: equal to eager on another one-image input (every output tensor);
        trace at two images of different sizes (320x320, 256x320): equal to eager at that structure;
        the one-image trace called with two images must raise the structure GraphError;
        `amc.prune(net, ratio=0.5, criterion="l2", example_inputs=([img],))`: output structure (keys, shapes)
        unchanged and every head's class/box/mask/keypoint output channels kept; MACs before/after
        (amc.count), trace and prune wall time.
  TP    Torch-Pruning configured as its examples/torchvision_models/torchvision_pruning.py does for detectors:
        `trainable_backbone_layers=5` (TP does not prune through FrozenBatchNorm), GroupNormPruner with
        GroupMagnitudeImportance(p=1), pruning_ratio=0.5, the example's ignored_layers per family (predictors
        and, for Faster R-CNN, the FPN and the whole roi_heads; for SSD the whole head), example input one
        320x320 image. Handled = no exception and the pruned model returns the original's output structure.
        MACs after/before with amc.count (same counter as ours) and TP's own counter; pruning wall time
        (DependencyGraph + importance + step).
  speed CPU latency at one 320x320 image of the unpruned, ours-pruned and TP-pruned models (inference_mode,
        interleaved rounds, median), with the 1-minute load average before and after beside it.

Each stage runs in its own subprocess (scripts/_isolate.py: process group, timeout, RLIMIT_AS guard).
Results: scripts/results/detection_sweep.json (rewritten after every model) and detection_sweep.md:

    nohup python scripts/sweep_detection.py > /tmp/detection_sweep.log 2>&1 &
    python scripts/sweep_detection.py --models ssdlite320_mobilenet_v3_large --skip-latency
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _isolate import output_shapes, run_isolated, write_atomic  # noqa: E402

SELF = os.path.join(HERE, "sweep_detection.py")
RATIO = 0.5
SIZE = 320
OTHER = (256, 320)  # the second image of the two-image trace: another size, to exercise the batching transform
RESULTS = os.path.join(HERE, "results", "detection_sweep")
# Layers whose output width is the number of classes / box coordinates / masks / keypoints (x anchors).
HEAD_LAYER = re.compile(r"(^|\.)(cls_logits|bbox_pred|bbox_reg|bbox_ctrness|cls_score|mask_fcn_logits|kps_score_lowres)$"
                        r"|^head\.(classification|regression)_head\.module_list\.\d+(\.1)?$")


# ----------------------------------------------------------------------------------------------
# Child side.

def _setup(seed: int, threads: int):
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def build(name: str, seed: int, for_tp: bool = False):
    """The detector (seeded, eval, score threshold 0.0) and three seeded images."""
    import inspect

    import torch
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    kwargs: Dict[str, Any] = {"weights": None, "weights_backbone": None}
    kwargs["box_score_thresh" if "rcnn" in name else "score_thresh"] = 0.0
    if for_tp and "trainable_backbone_layers" in inspect.signature(builder).parameters:
        kwargs["trainable_backbone_layers"] = 5  # as TP's example: "TP does not support FrozenBN"
    torch.manual_seed(seed)
    model = builder(**kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, SIZE, SIZE, generator=g),
            torch.rand(3, *OTHER, generator=g)]
    return model, imgs


def _max_diff(ref: Any, got: Any) -> float:
    """Largest absolute difference over all output tensors; inf when the structures differ."""
    import torch

    if isinstance(ref, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            return float("inf")
        return float((ref.double() - got.double()).abs().max()) if ref.numel() else 0.0
    if isinstance(ref, dict):
        if not isinstance(got, dict) or list(got) != list(ref):
            return float("inf")
        return max([_max_diff(ref[k], got[k]) for k in ref] or [0.0])
    if isinstance(ref, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(ref):
            return float("inf")
        return max([_max_diff(r, g) for r, g in zip(ref, got)] or [0.0])
    return 0.0 if ref == got else float("inf")


def head_layers(model) -> Dict[str, int]:
    """Output channels of every layer whose width is fixed by the task (class / box / mask / keypoint counts)."""
    import torch.nn as nn

    out = {}
    for name, m in model.named_modules():
        if HEAD_LAYER.search(name):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                out[name] = m.out_channels
            elif isinstance(m, nn.Linear):
                out[name] = m.out_features
    return out


def ours_one(name: str, seed: int = 0, threads: int = 1, save_path: str = "") -> Dict[str, Any]:
    """amc: trace at one and two images (equal to eager), the structure guard, prune, count."""
    torch = _setup(seed, threads)
    import amc
    from amc.errors import GraphError

    r: Dict[str, Any] = {"handled": False}
    stage = "build"
    try:
        model, (a, b, c) = build(name, seed)
        r["params_before"] = sum(p.numel() for p in model.parameters())
        heads = head_layers(model)
        with torch.no_grad():
            ref1, ref2 = model([b]), model([a, c])
        stage = "trace 1 image"
        t0 = time.perf_counter()
        net = amc.trace(model, [a])
        r["trace_s"] = time.perf_counter() - t0
        r["guards"] = len(net.guards)
        with torch.no_grad():
            r["eager_diff_1"] = _max_diff(ref1, net([b]))
        r["boxes"] = int(ref1[0]["boxes"].shape[0])
        stage = "structure guard"
        try:
            with torch.no_grad():
                net([a, c])
            r["structure_guard"] = False
        except GraphError as exc:
            r["structure_guard"] = "input structure guard failed" in str(exc)
        stage = "trace 2 images"
        net2 = amc.trace(model, [b, c])
        with torch.no_grad():
            r["eager_diff_2"] = _max_diff(ref2, net2([a, c]))
        del net2
        stage = "count"
        r["macs_before"], _ = amc.count(net, [a])
        stage = "prune"
        t0 = time.perf_counter()
        pruned = amc.prune(net, ratio=RATIO, criterion="l2", example_inputs=([a],))
        r["prune_s"] = time.perf_counter() - t0
        stage = "check"
        pruned.eval()
        with torch.no_grad():
            out = pruned([b])
        r["structure_ok"] = output_shapes(out, repr) == output_shapes(ref1, repr)
        kept = {n: pruned.module_of(n) for n in heads}
        r["heads_kept"] = all(getattr(m, "out_channels", getattr(m, "out_features", None)) == heads[n]
                              for n, m in kept.items())
        r["heads"] = len(heads)
        stage = "count pruned"
        r["macs_after"], r["params_after"] = amc.count(pruned, [a])
        r["handled"] = bool(r["structure_ok"] and r["heads_kept"] and r["structure_guard"]
                            and r["eager_diff_1"] < 1e-3 and r["eager_diff_2"] < 1e-3)
        if not r["handled"]:
            r["error"] = (f"structure_ok={r['structure_ok']} heads_kept={r['heads_kept']} guard="
                          f"{r['structure_guard']} diff1={r['eager_diff_1']:.2g} diff2={r['eager_diff_2']:.2g}")
        if save_path:
            stage = "save"
            torch.save(pruned, save_path)
    except Exception as exc:  # noqa: BLE001 - recorded per model
        r["error"] = f"[{stage}] {type(exc).__name__}: {exc}"[:600]
    return r


def _tp_version() -> str:
    """The installed distribution's version (torch_pruning.__version__ of 1.6.1 still says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "n/a"


def tp_ignored_layers(model, name: str) -> List[Any]:
    """examples/torchvision_models/torchvision_pruning.py's ignored_layers, by family (the example names
    fasterrcnn_*, fcos_resnet50_fpn, keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2,
    retinanet_resnet50_fpn_v2 and ssd*; the v1/v2 siblings get their family's list)."""
    ignored: List[Any] = []
    if "ssd" in name:
        ignored.append(model.head)
    if "fasterrcnn" in name:
        ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.backbone.fpn, model.roi_heads]
    if "fcos" in name:
        ignored += [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg,
                    model.head.regression_head.bbox_ctrness]
    if "keypointrcnn" in name:
        ignored += [model.rpn.head.cls_logits, model.backbone.fpn.layer_blocks, model.rpn.head.bbox_pred,
                    model.roi_heads.box_head, model.roi_heads.box_predictor, model.roi_heads.keypoint_predictor]
    if "maskrcnn" in name:
        ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor,
                    model.roi_heads.mask_predictor]
    if "retinanet" in name:
        ignored += [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    return ignored


def tp_one(name: str, seed: int = 0, threads: int = 1, save_path: str = "") -> Dict[str, Any]:
    """Torch-Pruning as its torchvision example configures detectors; check structure and heads, count."""
    torch = _setup(seed, threads)
    import torch_pruning as tp

    r: Dict[str, Any] = {"handled": False, "tp_version": _tp_version()}
    stage = "build"
    try:
        model, (a, b, _) = build(name, seed, for_tp=True)
        heads = head_layers(model)
        with torch.no_grad():
            ref = model([b])
        stage = "amc.count"
        import amc

        try:
            r["macs_before"], _ = amc.count(model, [a])
        except Exception as exc:  # noqa: BLE001 - an amc problem, not TP's
            r["amc_count_error"] = f"{type(exc).__name__}: {exc}"[:300]
        stage = "tp count"
        macs, _ = tp.utils.count_ops_and_params(model, ([a],))
        r["tp_macs_before"] = int(macs)
        for p in model.parameters():
            p.requires_grad_(True)
        stage = "pruner"
        t0 = time.perf_counter()
        pruner = tp.pruner.GroupNormPruner(model, example_inputs=([a],),
                                           importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           iterative_steps=1, pruning_ratio=RATIO, global_pruning=False,
                                           ignored_layers=tp_ignored_layers(model, name))
        stage = "step"
        for group in pruner.step(interactive=True):
            group.prune()
        r["prune_s"] = time.perf_counter() - t0
        stage = "check"
        model.eval()
        with torch.no_grad():
            out = model([b])
        r["structure_ok"] = output_shapes(out, repr) == output_shapes(ref, repr)
        r["heads_kept"] = all(getattr(model.get_submodule(n), "out_channels",
                                      getattr(model.get_submodule(n), "out_features", None)) == c
                              for n, c in heads.items())
        stage = "count pruned"
        macs, _ = tp.utils.count_ops_and_params(model, ([a],))
        r["tp_macs_after"] = int(macs)
        try:
            r["macs_after"], _ = amc.count(model, [a])
        except Exception as exc:  # noqa: BLE001
            r["amc_count_error"] = f"{type(exc).__name__}: {exc}"[:300]
        r["handled"] = bool(r["structure_ok"] and r["heads_kept"])
        if not r["handled"]:
            r["error"] = f"structure_ok={r['structure_ok']} heads_kept={r['heads_kept']}"
        if save_path and r["handled"]:
            stage = "save"
            torch.save(model, save_path)
    except Exception as exc:  # noqa: BLE001 - recorded per model
        r["error"] = f"[{stage}] {type(exc).__name__}: {exc}"[:600]
    return r


def latency_one(name: str, seed: int = 0, threads: int = 1, paths: Optional[Dict[str, str]] = None,
                rounds: int = 5) -> Dict[str, Any]:
    """Median latency at one 320x320 image, interleaved rounds; the load average before and after."""
    torch = _setup(seed, threads)
    model, (a, _, _) = build(name, seed)
    models = {"orig": model}
    for key, path in (paths or {}).items():
        if path and os.path.exists(path):
            models[key] = torch.load(path, weights_only=False).eval()
    times: Dict[str, List[float]] = {k: [] for k in models}
    r: Dict[str, Any] = {"load_before": os.getloadavg()[0]}
    with torch.inference_mode():
        for m in models.values():
            m([a])  # warm-up
        keys = list(models)
        for i in range(rounds):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                t0 = time.perf_counter()
                models[k]([a])
                times[k].append(time.perf_counter() - t0)
    r["load_after"] = os.getloadavg()[0]
    r["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    r["rounds"] = rounds
    return r


# ----------------------------------------------------------------------------------------------
# Parent side.

def run_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    row: Dict[str, Any] = {"model": name}
    tmp = tempfile.mkdtemp(prefix="amc_det_sweep_")
    try:
        paths = {"ours": os.path.join(tmp, "ours.pt"), "tp": os.path.join(tmp, "tp.pt")}
        keep = not args.skip_latency
        common = {"name": name, "seed": args.seed, "threads": args.threads}
        row["ours"] = run_isolated(f"{SELF}:ours_one", {**common, "save_path": paths["ours"] if keep else ""},
                                   timeout=args.timeout, mem_gb=args.mem_gb)
        row["tp"] = run_isolated(f"{SELF}:tp_one", {**common, "save_path": paths["tp"] if keep else ""},
                                 timeout=args.timeout, mem_gb=args.mem_gb)
        if keep:
            row["latency"] = run_isolated(f"{SELF}:latency_one", {**common, "rounds": args.rounds,
                                          "paths": {k: p for k, p in paths.items() if os.path.exists(p)}},
                                          timeout=args.timeout, mem_gb=args.mem_gb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    o, t = row["ours"], row["tp"]
    if o.get("handled"):
        row["ours_macs_ratio"] = o["macs_after"] / o["macs_before"]
    if t.get("handled") and t.get("macs_after") and t.get("macs_before"):
        row["tp_macs_ratio"] = t["macs_after"] / t["macs_before"]
    if "ours_macs_ratio" in row and "tp_macs_ratio" in row:
        row["ours_ge_tp"] = row["ours_macs_ratio"] <= row["tp_macs_ratio"] * 1.001
    return row


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _status(stage: Dict[str, Any]) -> str:
    if stage.get("handled"):
        return "yes"
    return f"**{stage['status'].upper()}**" if stage.get("status") in ("timeout", "oom", "crash") else "**NO**"


def render(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    both = [r for r in rows if "ours_ge_tp" in r]
    lines = ["# Detection sweep: amc.prune vs Torch-Pruning on torchvision's detectors", "",
             f"Generated by `{meta['command']}` on {meta['date']}; torch {meta['torch']}, torchvision "
             f"{meta['torchvision']}, torch-pruning {meta['torch_pruning']}; CPU ({meta['cpus']} cores), "
             f"{meta['threads']} torch thread(s) per model. Random weights (weights=None, weights_backbone=None), "
             f"eval, score threshold 0.0 (so every image yields `detections_per_img` boxes and every head runs); "
             f"ratio {RATIO}, L2 (ours) / group L1 as in TP's example (TP). Images {SIZE}x{SIZE} (the two-image "
             f"trace adds a {OTHER[0]}x{OTHER[1]} one; the transform of each model resizes as it always does).",
             "",
             "**Timings**: the 1-minute load average at the start and end of each model's latency run is "
             "printed beside its latency (other benchmarks on this 2-core machine were paused with SIGSTOP "
             "while it ran; the sweep's own threads make up the load). Compare ratios between columns of one "
             "row, not seconds across rows.", "",
             "## Summary", "",
             f"- Models run: {len(rows)} of {len(rows) + len(meta.get('missing', []))}. **ours handles {sum(bool(r['ours'].get('handled')) for r in rows)}/{len(rows)}** "
             f"(trace at 1 and 2 images equal to eager, two-image call of the one-image trace refused, pruned "
             f"with output structure and head widths kept); **TP handles {sum(bool(r['tp'].get('handled')) for r in rows)}"
             f"/{len(rows)}** (no exception, output structure and head widths kept).",
             *([f"- **Not run** (the sweep was cut short): {', '.join(meta['missing'])}."] if meta.get("missing") else []),
             f"- Where both handle a model ({len(both)}), ours removes at least as many MACs as TP (amc.count on "
             f"both, 0.1% tolerance) on **{sum(r['ours_ge_tp'] for r in both)}/{len(both)}**.", ""]
    if both:
        lines.append(f"- Median MACs after/before where both handle: ours "
                     f"{statistics.median(r['ours_macs_ratio'] for r in both):.3f}, TP "
                     f"{statistics.median(r['tp_macs_ratio'] for r in both):.3f}.")
        lines.append("")
    lines += ["## Per model", "",
              "| model | ours | TP | MACs before (G) | ours after/before | TP after/before | TP after/before (TP count) "
              "| ours trace s | ours prune s | TP prune s | latency ms orig / ours / TP | load avg (start-end) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t, lat = r["ours"], r["tp"], r.get("latency") or {}
        med = lat.get("median_s") or {}
        ms = " / ".join(_fmt(med[k] * 1e3, ".0f") if k in med else "-" for k in ("orig", "ours", "tp"))
        load = f"{lat['load_before']:.1f}-{lat['load_after']:.1f}" if "load_before" in lat else "-"
        tpc = t["tp_macs_after"] / t["tp_macs_before"] if t.get("tp_macs_after") and t.get("tp_macs_before") else None
        lines.append(f"| {r['model']} | {_status(o)} | {_status(t)} | "
                     f"{_fmt(o.get('macs_before') and o['macs_before'] / 1e9, '.2f')} | "
                     f"{_fmt(r.get('ours_macs_ratio'))} | {_fmt(r.get('tp_macs_ratio'))} | {_fmt(tpc)} | "
                     f"{_fmt(o.get('trace_s'), '.1f')} | {_fmt(o.get('prune_s'), '.1f')} | {_fmt(t.get('prune_s'), '.1f')} | "
                     f"{ms} | {load} |")
    fails = [(r["model"], who, r[who]["error"]) for r in rows for who in ("ours", "tp") if r[who].get("error")]
    if fails:
        lines += ["", "## Failures", ""] + [f"- {m} — {who}: {err}" for m, who, err in fails]
    lines += ["", "## Checks (ours)", "",
              "| model | boxes | guards | max diff 1 image | max diff 2 images | structure guard | heads kept |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["ours"]
        lines.append(f"| {r['model']} | {o.get('boxes', '-')} | {o.get('guards', '-')} | "
                     f"{_fmt(o.get('eager_diff_1'), '.1e')} | {_fmt(o.get('eager_diff_2'), '.1e')} | "
                     f"{o.get('structure_guard', '-')} | {o.get('heads_kept', '-')} ({o.get('heads', '-')}) |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    import torch
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="", help="comma-separated subset (default: all detectors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per stage per model")
    p.add_argument("--mem-gb", type=float, default=12.0, help="address-space guard per child")
    p.add_argument("--rounds", type=int, default=5, help="latency rounds (median)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--out", default=RESULTS, help="results path without extension")
    p.add_argument("--merge", default="", help="comma-separated result .json files of partial sweeps (e.g. run "
                   "on model subsets in parallel): render them together into --out and exit")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.load(open(f, encoding="utf-8")) for f in args.merge.split(",")]
        meta = dict(parts[0]["meta"], command=" + ".join(x["meta"]["command"] for x in parts),
                    load_end=max(x["meta"].get("load_end", 0.0) for x in parts))
        order = torchvision.models.list_models(module=torchvision.models.detection)
        by_model = {r["model"]: r for x in reversed(parts) for r in x["rows"]}  # the first file wins
        rows = sorted(by_model.values(), key=lambda r: order.index(r["model"]))
        meta["missing"] = [n for n in order if n not in {r["model"] for r in rows}]
        write_atomic(args.out + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        write_atomic(args.out + ".md", render(rows, meta))
        return 0
    names = torchvision.models.list_models(module=torchvision.models.detection)
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown detectors {unknown}; choose from {names}")
        names = [n for n in names if n in wanted]
    meta = {"command": "python scripts/sweep_detection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_pruning": _tp_version(),
            "cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
            "load_start": os.getloadavg()[0]}
    rows: List[Dict[str, Any]] = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(run_model(name, args))
        print(f"{name}: ours {_status(rows[-1]['ours'])}, TP {_status(rows[-1]['tp'])}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        meta["load_end"] = os.getloadavg()[0]
        write_atomic(args.out + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        write_atomic(args.out + ".md", render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
