"""Speed of the ReconstructedNetwork vs eager (and torch.fx's GraphModule), and capture time vs one forward.

CPU, `torch.set_num_threads(2)`, `torch.inference_mode()`. All implementations run in one process,
interleaved (each repetition runs every implementation once, in a rotating order), after warm-up;
we report medians and the ratio to eager. Capture time: `amc.trace(resnet50, x)` vs one eager
forward (no_grad) at the capture batch, interleaved, median of several. When our forward is > 5%
slower than eager or capture > 3x eager, the script profiles the slow part with cProfile and puts
the top functions in the report.

    python scripts/bench_speed.py                      # writes scripts/results/speed.md and speed.json
    python scripts/bench_speed.py --models resnet50 --batches 1 --reps 5 --out-dir /tmp
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _isolate import write_atomic  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

import amc  # noqa: E402


CPU_TIMES: Dict[str, List[float]] = {}


def interleaved(fns: Dict[str, Callable[[], Any]], reps: int, warmup: int) -> Dict[str, List[float]]:
    """Time every fn once per repetition, rotating the order; returns the per-rep wall times of each.

    The process CPU time of each run is kept in CPU_TIMES (a second signal on a shared machine, where
    wall time also counts the time other processes held the cores).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    CPU_TIMES.clear()
    CPU_TIMES.update({n: [] for n in names})
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            CPU_TIMES[n].append(time.process_time() - c0)
    return times


def profile_top(fn: Callable[[], Any], n: int = 12, repeat: int = 1) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(repeat):
        fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(n)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:start + n + 1])


def build(name: str) -> Any:
    """A model of amc's registry at its own input size (small nets: the per-op cost shows), else
    torchvision's at 224x224."""
    if name in amc.models.list_models():
        info = amc.models.model_info(name)
        return amc.models.create(name, in_channels=info.input_size[0]).eval(), tuple(info.input_size)
    return torchvision.models.get_model(name, weights=None).eval(), (3, 224, 224)


def bench_forward(name: str, batches: List[int], reps: Dict[int, int], warmup: int,
                  capture_batch: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model, shape = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = amc.trace(model, torch.randn(capture_batch, *shape)).eval()
    try:
        gm = torch.fx.symbolic_trace(model).eval()
        fx_error = None
    except Exception as exc:  # noqa: BLE001 - reported as a missing peer column
        gm, fx_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    out: Dict[str, Any] = {"model": name, "fx_error": fx_error, "batches": {}}
    for b in batches:
        x = torch.randn(b, *shape)
        fns = {"eager": lambda: model(x), "amc": lambda: net(x)}
        if gm is not None:
            fns["fx"] = lambda: gm(x)
        with torch.inference_mode():
            ref = model(x)
            assert torch.allclose(net(x), ref, rtol=1e-4, atol=1e-5), "amc net differs from eager"
            times = interleaved(fns, reps[b], warmup)
            med = {k: statistics.median(v) for k, v in times.items()}
            paired = statistics.median(a / e for a, e in zip(times["amc"], times["eager"]))
            cpu = {k: statistics.median(v) for k, v in CPU_TIMES.items()}
            row = {"median_s": med, "ratio_amc": med["amc"] / med["eager"], "paired_ratio_amc": paired,
                   "cpu_median_s": cpu, "cpu_ratio_amc": cpu["amc"] / cpu["eager"],
                   "ratio_fx": med["fx"] / med["eager"] if "fx" in med else None, "reps": reps[b]}
            if row["ratio_amc"] > 1.05:
                row["profile_amc"] = profile_top(lambda: net(x), repeat=2)
                row["profile_eager"] = profile_top(lambda: model(x), repeat=2)
        out["batches"][b] = row
        print(f"{name} b{b}: eager {med['eager'] * 1e3:.1f} ms, amc {med['amc'] * 1e3:.1f} ms "
              f"(x{row['ratio_amc']:.3f}), fx {med.get('fx', float('nan')) * 1e3:.1f} ms", flush=True)
    return out


def bench_capture(name: str, batch: int, reps: int, warmup: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)

    def eager() -> Any:
        with torch.no_grad():
            return model(x)

    def capture() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return amc.trace(model, x)

    fns = {"eager": eager, "capture": capture}
    try:
        fns["fx_symbolic_trace"] = lambda: torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001
        pass
    times = interleaved(fns, reps, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in CPU_TIMES.items()}
    row = {"model": name, "batch": batch, "reps": reps, "median_s": med, "ratio": med["capture"] / med["eager"],
           "cpu_ratio": cpu["capture"] / cpu["eager"],
           "paired_ratio": statistics.median(c / e for c, e in zip(times["capture"], times["eager"]))}
    if row["ratio"] > 3.0:
        row["profile_capture"] = profile_top(capture)
    print(f"capture {name} b{batch}: eager {med['eager'] * 1e3:.1f} ms, capture {med['capture'] * 1e3:.1f} ms "
          f"(x{row['ratio']:.2f})", flush=True)
    return row


def render(fwd: List[Dict[str, Any]], cap: Dict[str, Any], args: argparse.Namespace,
           load: Dict[str, Any] = None) -> str:
    lines = [
        "# Speed: ReconstructedNetwork vs eager (CPU)",
        "",
        f"Generated by `python scripts/bench_speed.py`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, `torch.inference_mode()`, torchvision models at 224x224 and amc.models at their own input size, weights=None (random). Implementations "
        f"run interleaved in one process (rotating order) after {args.warmup} warm-up run(s); times are "
        "medians. `amc/eager` is the ratio of medians, `paired` the median of per-repetition ratios. "
        f"The network was captured at batch {args.capture_batch} and run at each batch below.",
        "",
        *([f"Machine load average (1/5/15 min) before: {', '.join(f'{v:.1f}' for v in load['before'])}; after: "
           f"{', '.join(f'{v:.1f}' for v in load['after'])} (2 cores)."] if load else []),
        *([args.note] if getattr(args, "note", "") else []),
        "",
        "| model | batch | reps | eager ms | amc ms | amc / eager | paired | CPU-time amc / eager | "
        "fx GraphModule ms | fx / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in fwd:
        for b, row in r["batches"].items():
            m = row["median_s"]
            fx = f"{m['fx'] * 1e3:.1f}" if "fx" in m else f"n/a ({r['fx_error']})"
            fxr = f"{row['ratio_fx']:.3f}" if row["ratio_fx"] is not None else "-"
            lines.append(f"| {r['model']} | {b} | {row['reps']} | {m['eager'] * 1e3:.1f} | {m['amc'] * 1e3:.1f} | "
                         f"**{row['ratio_amc']:.3f}** | {row['paired_ratio_amc']:.3f} | {row.get('cpu_ratio_amc', float('nan')):.3f} | "
                         f"{fx} | {fxr} |")
    m = cap["median_s"]
    lines += [
        "",
        "## Capture time",
        "",
        "| model | batch | reps | eager forward ms | amc.trace ms | trace / eager | paired | CPU-time ratio | "
        "fx symbolic_trace ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {cap['model']} | {cap['batch']} | {cap['reps']} | {m['eager'] * 1e3:.1f} | {m['capture'] * 1e3:.1f} | "
        f"**{cap['ratio']:.2f}** | {cap['paired_ratio']:.2f} | {cap.get('cpu_ratio', float('nan')):.2f} | "
        + (f"{m['fx_symbolic_trace'] * 1e3:.1f} |" if "fx_symbolic_trace" in m else "n/a |"),
        "",
        f"Target: forward within 5% of eager, capture <= 3x one eager forward. Forward: "
        + ", ".join(f"{r['model']} b{b} {'ok' if row['ratio_amc'] <= 1.05 else 'SLOWER'} "
                    f"(x{row['ratio_amc']:.3f})" for r in fwd for b, row in r["batches"].items())
        + f". Capture: {'ok' if cap['ratio'] <= 3 else 'SLOWER than target'} (x{cap['ratio']:.2f}).",
    ]
    profiles = [(f"{r['model']} batch {b}", row) for r in fwd for b, row in r["batches"].items()
                if "profile_amc" in row]
    for title, row in profiles:
        lines += ["", f"### Profile: amc forward, {title} (cProfile, 2 runs, by tottime)", "", "```",
                  row["profile_amc"], "```", "", "Eager, same input:", "", "```", row["profile_eager"], "```"]
    if "profile_capture" in cap:
        lines += ["", "### Profile: amc.trace (cProfile, by tottime)", "", "```", cap["profile_capture"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,vit_b_16", help="comma list of torchvision models or amc.models names (vit_fashion, resnet20)")
    p.add_argument("--batches", default="1,32", help="comma list of batch sizes")
    p.add_argument("--reps", type=int, default=15, help="repetitions at batch 1 (default 15)")
    p.add_argument("--reps-large", type=int, default=5, help="repetitions at batches > 8 (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--capture-batch", type=int, default=1, help="batch of the capture (default 1)")
    p.add_argument("--capture-reps", type=int, default=7, help="captures timed (default 7)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--note", default="", help="free text added to the report (e.g. machine load)")
    p.add_argument("--render-only", action="store_true", help="re-render speed.md from speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render_only:
        with open(os.path.join(args.out_dir, "speed.json"), encoding="utf-8") as f:
            data = json.load(f)
        text = render(data["forward"], data["capture"], args, data.get("load"))
        write_atomic(os.path.join(args.out_dir, "speed.md"), text)
        print(text)
        return 0
    load_before = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    reps = {b: (args.reps if b <= 8 else args.reps_large) for b in batches}
    fwd = [bench_forward(n, batches, reps, args.warmup, args.capture_batch) for n in args.models.split(",")]
    cap = bench_capture("resnet50", args.capture_batch, args.capture_reps, args.warmup)
    load = {"before": load_before, "after": os.getloadavg()}
    write_atomic(os.path.join(args.out_dir, "speed.json"),
                 json.dumps({"forward": fwd, "capture": cap, "load": load}, indent=1))
    text = render(fwd, cap, args, load)
    write_atomic(os.path.join(args.out_dir, "speed.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
