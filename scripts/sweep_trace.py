"""Trace sweep over the torchvision zoo (+ segmentation + a few timm models), one model per subprocess.

For every model (weights=None, eval, seeded) the child process:
  1. runs eager at batch 2 and 3,
  2. traces at batch 2 (timed), `lint()`s the result,
  3. compares the ReconstructedNetwork with eager at batch 2 and 3 (rtol 1e-4, atol 1e-5),
  4. when `amc.export.json_io` / `amc.export.pkl` exist: saves and loads JSON and pkl and compares the
     loaded network with the traced one at batch 2,
  5. runs `torch.fx.symbolic_trace(net)` (through `amc.export.to_fx`) and compares it with the network at
     batch 2 and 3 (not part of "pass": its own column and count),
  6. records node count, fallback ops and the first error with the stage it happened in.

Results: scripts/results/trace_sweep.json (updated after each model, so a partial run is readable)
and scripts/results/trace_sweep.md. Example:

    nohup python scripts/sweep_trace.py --jobs 1 > /tmp/sweep.log 2>&1 &
    python scripts/sweep_trace.py --models resnet18,tv_seg:fcn_resnet50 --resume
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _isolate import package_version as _version, run_isolated, write_atomic  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
TIMM_MODELS = ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_100"]
INPUT_SIZE = {"inception_v3": 299}
SEG_SIZE = 224


# ----------------------------------------------------------------------------------------------
# Child side (runs inside one subprocess per model).

def build_model(source: str, name: str):
    import torch
    import torchvision

    if source == "tv":
        return torchvision.models.get_model(name, weights=None)
    if source == "tv_seg":
        return torchvision.models.get_model(name, weights=None, weights_backbone=None)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    raise ValueError(f"unknown model source {source!r}")


def _flatten(out: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "out", out)]
    if isinstance(out, dict):
        return [kv for k, v in out.items() for kv in _flatten(v, f"{prefix}[{k!r}]")]
    if isinstance(out, (list, tuple)):
        return [kv for i, v in enumerate(out) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix or "out", out)]


def compare(ref: Any, got: Any) -> Tuple[bool, float, str]:
    """(equal within tolerance, max abs diff, reason when not equal)."""
    import torch

    a, b = _flatten(ref), _flatten(got)
    if [k for k, _ in a] != [k for k, _ in b]:
        return False, math.inf, f"structure differs: {[k for k, _ in a]} vs {[k for k, _ in b]}"
    worst = 0.0
    for (k, x), (_, y) in zip(a, b):
        if not isinstance(x, torch.Tensor):
            if x != y:
                return False, math.inf, f"{k}: {x!r} != {y!r}"
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return False, math.inf, f"{k}: shape {tuple(x.shape)} vs {getattr(y, 'shape', type(y))}"
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
        if not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            return False, worst, f"{k}: max abs diff {worst:.3g}"
    return True, worst, ""


def _export_roundtrips(net, x2, out2, result: Dict[str, Any]) -> None:
    import torch

    for kind in ("json", "pkl"):
        try:
            if kind == "json":
                import amc.export.json_io  # noqa: F401
            else:
                import amc.export.pkl  # noqa: F401
        except ImportError:
            result[f"{kind}_roundtrip"] = "n/a"
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = os.path.join(tmp, "net." + kind)
                if kind == "json":
                    net.save_to_json(file=path)
                    loaded = type(net).load_from_json(file=path)
                else:
                    net.save(pkl=path)
                    loaded = type(net).load(pkl=path)
                loaded.eval()
                with torch.no_grad():
                    got = loaded(x2.clone())
                ok, diff, why = compare(out2, got)
                result[f"{kind}_roundtrip"] = ok
                if not ok:
                    result.setdefault("error", f"{kind} round trip: {why}")
            except Exception as exc:  # noqa: BLE001 - recorded per model
                result[f"{kind}_roundtrip"] = False
                result.setdefault(f"{kind}_error", f"{type(exc).__name__}: {exc}"[:300])


def _fx_check(net, *cases, result: Dict[str, Any], key: str = "fx") -> None:
    """torch.fx.symbolic_trace of the network (the tools built on FX start there) equals the network."""
    import torch

    try:
        gm = torch.fx.symbolic_trace(net)
        with torch.no_grad():
            checks = [compare(out, gm(x.clone())) for x, out in cases]
        result[key] = all(ok for ok, _, _ in checks)
        why = "; ".join(w for _, _, w in checks if w)
        if why:
            result[f"{key}_error"] = why[:300]
    except Exception as exc:  # noqa: BLE001 - recorded per model
        result[key] = False
        result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]


def trace_one(source: str, name: str, size: int, seed: int = 0, threads: int = 2,
              max_params: Optional[float] = None) -> Dict[str, Any]:
    """Everything the sweep records for one model. Runs in its own process (see _isolate.py)."""
    import warnings

    import torch

    import amc

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    warnings.simplefilter("ignore")
    result: Dict[str, Any] = {"source": source, "model": name, "input": size, "status": "error"}
    stage = "build"
    try:
        model = build_model(source, name).eval()
        result["params"] = sum(p.numel() for p in model.parameters())
        if max_params is not None and result["params"] > max_params:  # the meta-device count failed
            result["status"] = "skipped"
            return result
        gen = torch.Generator().manual_seed(seed)
        x2 = torch.randn(2, 3, size, size, generator=gen)
        x3 = torch.randn(3, 3, size, size, generator=gen)
        stage = "eager"
        with torch.no_grad():
            ref2, ref3 = model(x2.clone()), model(x3.clone())
        stage = "trace"
        t0 = time.perf_counter()
        net = amc.trace(model, x2.clone())
        result["trace_s"] = time.perf_counter() - t0
        result["nodes"] = len(net.layer_nodes)
        result["fallbacks"] = net.fallback_ops
        stage = "lint"
        net.lint()
        stage = "run"
        with torch.no_grad():
            out2 = net(x2.clone())
            out3 = net(x3.clone())
        result["eq_b2"], result["diff_b2"], why2 = compare(ref2, out2)
        result["eq_b3"], result["diff_b3"], why3 = compare(ref3, out3)
        if why2 or why3:
            result["error"] = "; ".join(w for w in (why2 and f"b2 {why2}", why3 and f"b3 {why3}") if w)
        stage = "export"
        _export_roundtrips(net, x2, out2, result)
        _fx_check(net, (x2, out2), (x3, out3), result=result)
        _fx_check(model, (x2, ref2), (x3, ref3), result=result, key="fx_original")  # the peer: FX on the model
        ok = result["eq_b2"] and result["eq_b3"] and all(
            result.get(f"{k}_roundtrip") in (True, "n/a") for k in ("json", "pkl"))
        result["status"] = "pass" if ok else "fail"
    except Exception as exc:  # noqa: BLE001 - recorded per model
        result["error"] = f"[{stage}] {type(exc).__name__}: {exc}"[:400]
    return result


# ----------------------------------------------------------------------------------------------
# Parent side.

def param_count(source: str, name: str) -> Optional[int]:
    """Parameter count built on the meta device (no memory, no init cost); None when that fails."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(source, name)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - the child will count it for real
        return None


def job_list(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import torchvision

    jobs = [("tv", n, INPUT_SIZE.get(n, 224)) for n in torchvision.models.list_models(module=torchvision.models)]
    jobs += [("tv_seg", n, SEG_SIZE) for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    if not args.no_timm:
        jobs += [("timm", n, 224) for n in TIMM_MODELS]
    if args.models:
        wanted = set(args.models.split(","))
        jobs = [j for j in jobs if j[1] in wanted or f"{j[0]}:{j[1]}" in wanted]
    out = []
    for source, name, size in jobs:
        params = param_count(source, name)
        out.append({"source": source, "model": name, "input": size, "params": params,
                    "skip": params is not None and params > args.max_params})
    return out


def _fmt_bool(v: Any) -> str:
    return {True: "yes", False: "**NO**", "n/a": "n/a", None: "-"}.get(v, str(v))


def render_markdown(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    ran = [r for r in results if r.get("status") != "skipped"]
    passed = [r for r in ran if r.get("status") == "pass"]
    skipped = [r for r in results if r.get("status") == "skipped"]
    rt = {k: sum(1 for r in ran if r.get(f"{k}_roundtrip") is True) for k in ("json", "pkl")}
    fb = sum(1 for r in ran if r.get("fallbacks"))
    fx_ran = [r for r in ran if "fx" in r]
    lines = [
        "# Trace sweep",
        "",
        f"Generated by `python scripts/sweep_trace.py` on {time.strftime('%Y-%m-%d %H:%M')}; torch "
        f"{_version('torch')}, torchvision {_version('torchvision')}, timm {_version('timm')}; CPU, "
        f"{args.threads} thread(s) per model, timeout {args.timeout:.0f} s, memory guard {args.mem_gb} GB.",
        "",
        f"**{len(passed)}/{len(ran)} models pass** (trace at batch 2, lint, equal to eager at batch 2 and 3 with "
        f"rtol {RTOL:g}, atol {ATOL:g}, export round trips equal where export exists). "
        f"JSON round trip ok: {rt['json']}, pkl round trip ok: {rt['pkl']}; models with fallback ops: {fb}; "
        f"skipped for > {args.max_params / 1e6:.0f}M params: {len(skipped)} "
        f"({', '.join(r['model'] for r in skipped) or 'none'}).",
        "",
        f"`torch.fx.symbolic_trace(net)` (what torch.ao's `prepare_fx` and FX passes start from) equals the network "
        f"at batch 2 and 3 on **{sum(r['fx'] is True for r in fx_ran)}/{len(fx_ran)}** models"
        + "".join(f"; {r['model']}: {r.get('fx_error', '')[:120]}" for r in fx_ran if r["fx"] is not True)
        + f"; `torch.fx.symbolic_trace(model)` on the original model itself (the peer): "
        f"**{sum(r.get('fx_original') is True for r in fx_ran)}/{len(fx_ran)}** (column fx orig).",
        "",
        "| model | params (M) | input | nodes | trace s | eager-equal b2 | eager-equal b3 | max diff | json rt | "
        "pkl rt | fx | fx orig | fallbacks | error |",
        "|---|---:|---:|---:|---:|:-:|:-:|---:|:-:|:-:|:-:|:-:|---|---|",
    ]
    for r in ran:
        name = r["model"] if r["source"] == "tv" else f"{r['source']}:{r['model']}"
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else "?"
        diff = max((r.get(k) or 0.0) for k in ("diff_b2", "diff_b3"))
        fbs = ", ".join(f"{k}×{v}" for k, v in (r.get("fallbacks") or {}).items())
        err = r.get("error") or r.get("json_error") or r.get("pkl_error") or ""
        if r.get("json_error") and r.get("pkl_error"):
            err = f"json: {r['json_error']}; pkl: {r['pkl_error']}"
        err = err.replace("|", "\\|").replace("\n", " ")[:200]
        trace_s = f"{r['trace_s']:.2f}" if r.get("trace_s") is not None else "-"
        lines.append(f"| {name} | {params} | {r.get('input', '')} | {r.get('nodes', '-')} | {trace_s} | "
                     f"{_fmt_bool(r.get('eq_b2'))} | {_fmt_bool(r.get('eq_b3'))} | {diff:.1e} | "
                     f"{_fmt_bool(r.get('json_roundtrip'))} | {_fmt_bool(r.get('pkl_roundtrip'))} | "
                     f"{_fmt_bool(r.get('fx'))} | {_fmt_bool(r.get('fx_original'))} | "
                     f"{fbs} | {('[' + r['status'] + '] ' if r.get('status') not in ('pass', 'fail') else '') + err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1, help="models run at the same time (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per model process (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    p.add_argument("--mem-gb", type=float, default=16.0, help="address-space limit per model process, GB")
    p.add_argument("--max-params", type=float, default=250e6, help="skip models with more parameters")
    p.add_argument("--models", default="", help="comma list to run only these (name or source:name)")
    p.add_argument("--no-timm", action="store_true", help="leave out the timm models")
    p.add_argument("--resume", action="store_true",
                   help="keep results already in the JSON for models not being re-run")
    p.add_argument("--skip-done", action="store_true",
                   help="with --resume: run only models missing from the JSON, timed out, crashed, or "
                        "recorded before export existed (json/pkl round trip 'n/a')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)

    json_path = os.path.join(args.out_dir, "trace_sweep.json")
    md_path = os.path.join(args.out_dir, "trace_sweep.md")
    jobs = job_list(args)
    previous: Dict[str, Dict[str, Any]] = {}
    if args.resume and os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            previous = {f"{r['source']}:{r['model']}": r for r in json.load(f)["results"]}
    order = [f"{j['source']}:{j['model']}" for j in jobs]
    if args.skip_done:
        def done(r: Dict[str, Any]) -> bool:
            return r.get("status") in ("pass", "fail", "skipped") and "n/a" not in (
                r.get("json_roundtrip"), r.get("pkl_roundtrip"))
        jobs = [j for j in jobs if not done(previous.get(f"{j['source']}:{j['model']}", {}))]
    results: Dict[str, Dict[str, Any]] = dict(previous)
    for key in previous:
        if key not in order:
            order.append(key)

    lock = threading.Lock()

    def save() -> None:
        with lock:
            _save()

    def _save() -> None:
        rows = [results[k] for k in order if k in results]
        write_atomic(json_path, json.dumps({"rtol": RTOL, "atol": ATOL, "results": rows}, indent=1, default=str))
        write_atomic(md_path, render_markdown(rows, args))

    def work(job: Dict[str, Any]) -> None:
        key = f"{job['source']}:{job['model']}"
        if job["skip"]:
            results[key] = {**job, "status": "skipped"}
            return
        r = run_isolated(os.path.join(HERE, "sweep_trace.py") + ":trace_one",
                         {"source": job["source"], "name": job["model"], "size": job["input"], "seed": args.seed,
                          "threads": args.threads, "max_params": args.max_params},
                         timeout=args.timeout, mem_gb=args.mem_gb)
        for k in ("source", "model", "input"):
            r.setdefault(k, job[k])
        if r.get("params") is None:
            r["params"] = job["params"]
        results[key] = r
        print(f"[{len(results)}/{len(order)}] {key}: {r.get('status')} "
              f"trace={r.get('trace_s', float('nan')):.2f}s wall={r.get('wall_s', 0):.0f}s {r.get('error', '')}",
              flush=True)
        save()

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(work, jobs))
    save()
    rows = [results[k] for k in order if k in results]
    ran = [r for r in rows if r.get("status") != "skipped"]
    print(f"{sum(r.get('status') == 'pass' for r in ran)}/{len(ran)} pass; wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
