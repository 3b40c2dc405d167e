"""Channel pruning (He et al. 2017) benchmark: accuracy at 2x MACs reduction, single-layer
reconstruction error (their Fig. 3), and ChannelPruning cost on torchvision resnet18.

    python scripts/bench_channel_pruning.py                        # everything
    python scripts/bench_channel_pruning.py --skip-resnet18 --train-limit 2000 --epochs 3   # a quick subset

A skipped section keeps its previous results (read back from channel_pruning.json).

1. Fashion-MNIST: by default the full-data originals of scripts/fashion_originals.py (60k training
   images, 8 epochs, cached; accuracy on the official 10k test set); with --train-limit N a subset
   model trained for --epochs (cached in /tmp/amc_bench_cp). Each is pruned to MACs <= 0.5x (measured with amc.count), WITHOUT fine-tuning, by
   ChannelPruning (LASSO + least squares), amc L1-norm pruning (`amc.prune(criterion="l1",
   target_macs=0.5)`) and Torch-Pruning's MetaPruner + GroupMagnitudeImportance(p=2) (its uniform
   ratio searched to the same MACs budget).
2. Fig. 3 of He et al.: for single vgg_small layers, relative error ||Y - Y'||^2 / ||Y||^2 of the
   layer's output on HELD-OUT test images vs the fraction of its input channels pruned, for
   "first k", "max response" and LASSO selection, all followed by least squares.
3. resnet18 (weights=None, 100 natural-photo crops at 224, 10 positions each, 2x MACs target):
   wall time and peak RSS of ChannelPruning, measured in a child process.

Writes scripts/results/channel_pruning.{md,json} and channel_pruning_recon.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CACHE = "/tmp/amc_bench_cp"


# ------------------------------------------------------------------------------------------------
# 1. accuracy at 2x


def trained_model(name: str, train, val, epochs: int, train_limit: int, seed: int = 0) -> nn.Module:
    from amc.models import create, train_classifier

    if not train_limit:
        sys.path.insert(0, HERE)
        import fashion_originals

        return fashion_originals.original(name, seed=seed)[0]

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}_fmnist_n{train_limit}_e{epochs}_s{seed}.pt")
    torch.manual_seed(seed)
    model = create(name)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        t = time.perf_counter()
        train_classifier(model, train, val, epochs=epochs, seed=seed)
        print(f"  trained {name} in {time.perf_counter() - t:.0f}s", flush=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def tp_prune_to_macs(model: nn.Module, x1: torch.Tensor, target_macs: int) -> Tuple[nn.Module, float]:
    """Torch-Pruning MetaPruner + GroupMagnitudeImportance(p=2) at the largest MACs <= target."""
    import torch_pruning as tp

    from amc.graph.counting import count

    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def at(r: float) -> nn.Module:
        m = copy.deepcopy(model)
        last_m = [mm for mm in m.modules() if isinstance(mm, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=r, ignored_layers=[last_m])
        pruner.step()
        return m.eval()

    del last
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = at(mid)
        if count(m, x1)[0] <= target_macs:
            hi, best = mid, m
        else:
            lo = mid
    return (best if best is not None else at(hi)), hi


def accuracy_table(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import amc
    from amc.compressors.channel_pruning import ChannelPruning
    from amc.data import fashion_mnist_loaders
    from amc.models import evaluate

    train, val = fashion_mnist_loaders(batch_size=128, train_limit=args.train_limit or None,
                                       val_limit=args.val_limit or None)
    rows = []
    for name in ("vgg_small", "resnet20"):
        print(f"[accuracy] {name}", flush=True)
        model = trained_model(name, train, val, args.epochs, args.train_limit)
        x1 = next(iter(val))[0][:1]
        net = amc.trace(model, x1)
        macs0, params0 = amc.count(net, x1)
        acc0 = evaluate(net, val)["acc"]
        rows.append({"model": name, "method": "original", "macs": macs0, "params": params0, "acc": acc0, "seconds": 0.0})

        t = time.perf_counter()
        cp = ChannelPruning(net, train, val, trainset_ratio=args.trainset_ratio, sampled_pixels_per_img=10,
                            compress_ratio=0.0, example_inputs=(x1,))
        cp.compress_ratio = cp.uniform_ratio_for_macs(0.5)  # fraction of the conv/linear MACs removed
        small = cp.compress()
        rows.append({"model": name, "method": "ChannelPruning (LASSO + LS)", "ratio": cp.channel_fraction(cp.compress_ratio),
                     "compress_ratio": cp.compress_ratio,
                     "seconds": time.perf_counter() - t, **_measure(small, x1, val)})
        for sel in ("max_response", "first_k"):
            cp.selection = sel
            t = time.perf_counter()
            small = cp._compress(cp.compress_ratio)
            rows.append({"model": name, "method": f"{sel} + LS (He et al. baseline)",
                         "ratio": cp.channel_fraction(cp.compress_ratio),
                         "seconds": time.perf_counter() - t, **_measure(small, x1, val)})
        cp.selection, cp.least_squares = "lasso", False
        t = time.perf_counter()
        small = cp._compress(cp.compress_ratio)
        rows.append({"model": name, "method": "LASSO selection, no LS", "ratio": cp.channel_fraction(cp.compress_ratio),
                     "seconds": time.perf_counter() - t, **_measure(small, x1, val)})

        t = time.perf_counter()
        l1 = amc.prune(net, criterion="l1", target_macs=0.5)
        rows.append({"model": name, "method": "amc L1-norm (amc.prune)", "seconds": time.perf_counter() - t,
                     **_measure(l1, x1, val)})
        t = time.perf_counter()
        tpm, r = tp_prune_to_macs(model, x1, int(0.5 * macs0))
        rows.append({"model": name, "method": "Torch-Pruning L2 magnitude", "ratio": r,
                     "seconds": time.perf_counter() - t, **_measure(tpm, x1, val)})
        for row in rows[-7:]:
            print(f"  {row['method']:<36} MACs {row['macs'] / macs0:.3f}x acc {row['acc']:.4f}", flush=True)
    return rows


def _measure(net: nn.Module, x1: torch.Tensor, val) -> Dict[str, Any]:
    import amc
    from amc.models import evaluate

    macs, params = amc.count(net, x1)
    return {"macs": macs, "params": params, "acc": evaluate(net, val)["acc"]}


# ------------------------------------------------------------------------------------------------
# 2. single-layer reconstruction error (He et al. Fig. 3)


def recon_curves(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    import amc
    from amc.data import fashion_mnist_loaders

    train, val = fashion_mnist_loaders(batch_size=128, train_limit=args.train_limit or None,
                                       val_limit=args.val_limit or None)
    model = trained_model("vgg_small", train, val, args.epochs, args.train_limit)
    x1 = next(iter(val))[0][:1]
    held_out = torch.cat([b[0] for _, b in zip(range(4), val)])[:500]
    return _curves(amc.trace(model, x1), train, held_out, x1, ("features.3", "features.10", "features.14",
                                                                "classifier.0"), args.trainset_ratio)


def recon_curves_mobilenet(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    """The same curves on a real ImageNet network: torchvision MobileNetV2 with its pretrained weights,
    calibrated on one half of the bundled photo crops and measured on the other half."""
    import amc
    from torch.utils.data import DataLoader, TensorDataset

    from amc.data import photo_split, pretrained_mobilenet_v2

    calib, held_out = photo_split()
    x1 = calib[:1]
    net = amc.trace(pretrained_mobilenet_v2(), x1)
    loader = DataLoader(TensorDataset(calib), batch_size=25)
    return _curves(net, loader, held_out, x1, ("features.6.conv.2", "features.13.conv.2", "features.17.conv.2",
                                               "features.18.0"), 1.0)


def _curves(net, loader, held_out: torch.Tensor, x1: torch.Tensor, names, trainset_ratio: float
            ) -> Dict[str, Dict[str, List[float]]]:
    """Relative output error of each layer, after least squares, when only its input channels are pruned."""
    from amc.compressors.channel_pruning import ChannelPruning

    cp = ChannelPruning(net, loader, None, trainset_ratio=trainset_ratio, compress_ratio=0.0, example_inputs=(x1,))
    layers = [n for n in names if n in cp.prunable_layer_names()]
    ratios = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    curves: Dict[str, Dict[str, List[float]]] = {}
    ref = _layer_outputs(net, held_out, layers)
    for layer in layers:
        print(f"[recon] {layer}", flush=True)
        curves[layer] = {}
        for sel in ("first_k", "max_response", "lasso"):
            cp.selection = sel
            errs = []
            for r in ratios:
                small = cp._compress({layer: r})
                got = _layer_outputs(small, held_out, [layer])[layer]
                errs.append(float((got - ref[layer]).pow(2).sum() / ref[layer].pow(2).sum()))
            curves[layer][sel] = errs
    curves["_ratios"] = ratios  # type: ignore[assignment]
    return curves


def _layer_outputs(net, x: torch.Tensor, layers: List[str]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}

    def observe(node, module, a, kw, o) -> None:
        if node.name in layers:
            out[node.name] = o.detach().clone()

    net.eval()
    with torch.no_grad():
        net.run_observed((x,), {}, observe)
    return out


def plot_curves(curves: Dict[str, Any], path: str, net_name: str = "vgg_small",
                title: str = "Single-layer pruning error on Fashion-MNIST (cf. He et al. 2017, Fig. 3)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = curves["_ratios"]
    layers = [k for k in curves if not k.startswith("_")]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.4), squeeze=False)
    labels = {"first_k": "first k", "max_response": "max response", "lasso": "ours (LASSO)"}
    for ax, layer in zip(axes[0], layers):
        for sel, style in (("first_k", "s--"), ("max_response", "^-."), ("lasso", "o-")):
            ax.plot(ratios, curves[layer][sel], style, label=labels[sel], markersize=4)
        ax.set_title(f"{net_name} {layer}", fontsize=9)
        ax.set_xlabel("fraction of input channels pruned")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative error ‖Y − Y′‖² / ‖Y‖²\n(held-out images, after LS)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------
# 3. resnet18 cost (child process, so ru_maxrss is this job's own peak)


def resnet18_child(out_path: str, threads: int) -> None:
    import torchvision

    import amc
    from amc.compressors.channel_pruning import ChannelPruning
    from amc.data import photo_crops

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        x = photo_crops(size=224, crops_per_image=13)[:100]
        source = "natural photo crops (amc.data.photo_crops)"
    except Exception as exc:  # noqa: BLE001 - photos are optional
        x = torch.randn(100, 3, 224, 224)
        source = f"random normal images (photos unavailable: {type(exc).__name__})"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    loader = [(x[i:i + 25], torch.zeros(25, dtype=torch.long)) for i in range(0, len(x), 25)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cp = ChannelPruning(model, loader, None, trainset_ratio=1.0, sampled_pixels_per_img=10, compress_ratio=0.0,
                        example_inputs=(x[:1],))
    t1 = time.perf_counter()
    ratio = cp.uniform_ratio_for_macs(0.5)
    t2 = time.perf_counter()
    cp.compress_ratio = ratio  # the compress_ratio (conv/linear MACs removed) that reaches 0.5x
    ru = resource.getrusage(resource.RUSAGE_SELF)
    small = cp.compress()
    t3 = time.perf_counter()
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)
    macs0 = amc.count(cp.origin_graph, x[:1])[0]
    macs1 = amc.count(small, x[:1])[0]
    res = {"images": int(len(x)), "source": source, "threads": threads, "ratio": cp.channel_fraction(ratio),
           "compress_ratio": ratio,
           "trace_seconds": t1 - t0, "ratio_search_seconds": t2 - t1, "compress_seconds": t3 - t2,
           "total_seconds": t3 - t0, "compress_cpu_seconds": cpu, "macs_before": macs0, "macs_after": macs1,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
           "rss_before_gb": rss0 / 1e6, "process_seconds": time.perf_counter() - t_start}
    with open(out_path, "w") as f:
        json.dump(res, f)


def resnet18_cost(threads: int) -> Dict[str, Any]:
    out = os.path.join(CACHE, "resnet18_child.json")
    os.makedirs(CACHE, exist_ok=True)
    print("[resnet18] child process", flush=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--resnet18-child", out, "--threads", str(threads)],
                   check=True)
    with open(out) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------


def _curve_lines(curves: Dict[str, Any]) -> List[str]:
    lines = ["| layer | method | " + " | ".join(f"{r:.1f}" for r in curves["_ratios"]) + " |",
             "|---|---|" + "---:|" * len(curves["_ratios"])]
    for layer, c in curves.items():
        if layer.startswith("_"):
            continue
        for sel, errs in c.items():
            lines.append(f"| {layer} | {sel} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")
    lines += ["", "Reading (computed from the table; mean error over the nine ratios, and at how many ratios "
              "LASSO's error is the lowest of the three or within 5% of it):", ""]
    for layer, c in curves.items():
        if layer.startswith("_"):
            continue
        means = {sel: sum(e) / len(e) for sel, e in c.items()}
        best = [min(v[i] for v in c.values()) for i in range(len(curves["_ratios"]))]
        wins = sum(c["lasso"][i] <= 1.05 * best[i] + 1e-4 for i in range(len(best)))
        lines.append(f"- {layer}: mean " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                     + f"; LASSO lowest or within 5% at {wins}/{len(best)} ratios.")
    return lines + [""]


def write_markdown(args: argparse.Namespace, rows, curves, r18, curves_mb=None) -> str:
    cmd = "python scripts/bench_channel_pruning.py" + (
        f" --train-limit {args.train_limit} --val-limit {args.val_limit} --epochs {args.epochs}" if args.train_limit
        else "")
    lines = ["# Channel pruning (He et al. 2017) — benchmark", "",
             f"`{cmd}` — CPU, {args.threads} torch thread(s) (2 shared cores: times are noisy).", ""]
    if args.train_limit:
        data = (f"Subset for time on 2 cores: the first {args.train_limit} training images (trained "
                f"{args.epochs} epochs, SGD OneCycle), accuracy on {args.val_limit or 10000} test images.")
    else:
        data = ("Full data: the originals of `scripts/fashion_originals.py` (all 60,000 training images, "
                "8 epochs of SGD-Nesterov + OneCycle, cached and shared with the other Fashion benchmarks); "
                f"accuracy on the official {args.val_limit or 10000:,}-image test set.")
    if rows:
        lines += ["## Fashion-MNIST, MACs <= 0.5x, no fine-tuning", "",
                  f"{data} "
                  f"ChannelPruning calibrates on {args.trainset_ratio:.1%} of the training images, 10 positions "
                  "per image. MACs by `amc.count` (ptflops conventions). All pruned networks are evaluated "
                  "as they come out of the pruner.", "",
                  "| model | method | MACs | MACs ratio | params | top-1 | seconds |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        base = {r["model"]: r for r in rows if r["method"] == "original"}
        for r in rows:
            b = base[r["model"]]
            lines.append(f"| {r['model']} | {r['method']} | {r['macs']:,} | {r['macs'] / b['macs']:.3f} | "
                         f"{r['params']:,} | {100 * r['acc']:.2f}% | {r['seconds']:.1f} |")
        lines.append("")
    if curves:
        lines += ["## Single-layer reconstruction error (cf. He et al. Fig. 3)", "",
                  "![recon](channel_pruning_recon.png)", "",
                  "vgg_small on Fashion-MNIST. Relative error ||Y - Y'||² / ||Y||² of the layer output on 500 "
                  "held-out test images; only that layer's input channels are pruned; every method is followed by "
                  "the same least squares.", ""] + _curve_lines(curves)
    if curves_mb:
        lines += ["### The same on a real ImageNet network: pretrained MobileNetV2", "",
                  "![recon MobileNetV2](channel_pruning_recon_mobilenet_v2.png)", "",
                  "torchvision MobileNetV2 with its ImageNet weights; calibrated on 100 bundled photo crops "
                  "(`photo_split()` first half), error on the other 100. The layers are 1x1 convs whose inputs "
                  "are wide: the project convs of blocks 6, 13 and 17 (192, 576 and 960 input channels) and the "
                  "last 1x1 conv (320).", ""] + _curve_lines(curves_mb)
    if r18:
        lines += ["## torchvision resnet18, 2x MACs target", "",
                  f"weights=None, {r18['images']} {r18['source']} at 224x224, 10 sampled positions per image "
                  f"and layer, {r18['threads']} threads, measured in a child process (ru_maxrss). "
                  "`--skip-resnet18` keeps this section from the last run that measured it; the committed figures "
                  "were measured alone on the machine (load average below 1) with `python "
                  "scripts/bench_channel_pruning.py --skip-accuracy --skip-recon`.", "",
                  "| step | value |", "|---|---:|",
                  f"| trace + analysis setup | {r18['trace_seconds']:.1f} s |",
                  f"| ratio search (`uniform_ratio_for_macs(0.5)`, 10 prune+count trials) | {r18['ratio_search_seconds']:.1f} s |",
                  f"| ChannelPruning.compress() (sampling, LASSO, prune, least squares) | {r18['compress_seconds']:.1f} s |",
                  f"| compress() CPU time (user+sys, all threads) | {r18['compress_cpu_seconds']:.1f} s |",
                  f"| total wall time | {r18['total_seconds']:.1f} s |",
                  f"| peak RSS (whole child process) | {r18['peak_rss_gb']:.2f} GB |",
                  f"| MACs | {r18['macs_before']:,} -> {r18['macs_after']:,} ({r18['macs_after'] / r18['macs_before']:.3f}x) |",
                  f"| uniform channel ratio | {r18['ratio']:.4f} |", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-limit", type=int, default=0, help="0: the full-data cached originals (default)")
    p.add_argument("--val-limit", type=int, default=0, help="0: the whole 10k test set (default)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of a --train-limit subset model")
    p.add_argument("--trainset-ratio", type=float, default=0.085,
                   help="calibration share of the training images (default 0.085: about 5,000 images, as He et al.)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-recon", action="store_true")
    p.add_argument("--skip-resnet18", action="store_true")
    p.add_argument("--skip-recon-mobilenet", action="store_true")
    p.add_argument("--resnet18-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.resnet18_child:
        resnet18_child(args.resnet18_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    sys.path.insert(0, HERE)
    from _isolate import write_atomic

    json_path = os.path.join(RESULTS, "channel_pruning.json")
    old = json.load(open(json_path)) if os.path.exists(json_path) else {}
    rows = old.get("accuracy", []) if args.skip_accuracy else accuracy_table(args)
    curves = old.get("recon", {}) if args.skip_recon else recon_curves(args)
    if curves and not args.skip_recon:
        plot_curves(curves, os.path.join(RESULTS, "channel_pruning_recon.png"))
    curves_mb = old.get("recon_mobilenet_v2", {}) if args.skip_recon_mobilenet else recon_curves_mobilenet(args)
    if curves_mb and not args.skip_recon_mobilenet:
        plot_curves(curves_mb, os.path.join(RESULTS, "channel_pruning_recon_mobilenet_v2.png"), "mobilenet_v2",
                    "Single-layer pruning error, pretrained MobileNetV2 on natural photos (cf. He et al. 2017, Fig. 3)")
    r18 = old.get("resnet18", {}) if args.skip_resnet18 else resnet18_cost(args.threads)
    md_args = argparse.Namespace(**{**vars(args), **old.get("args", {})}) if args.skip_accuracy else args
    md = write_markdown(md_args, rows, curves, r18, curves_mb)
    write_atomic(os.path.join(RESULTS, "channel_pruning.md"), md + "\n")
    write_atomic(json_path, json.dumps({"args": vars(md_args), "accuracy": rows, "recon": curves,
                                        "recon_mobilenet_v2": curves_mb, "resnet18": r18}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
