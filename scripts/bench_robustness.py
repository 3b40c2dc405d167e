"""Robustness of the data-driven compressors: spread over calibration seeds, defaults vs other settings,
and low-rank vs channel pruning at equal MACs (issue 20).

    python scripts/bench_robustness.py                    # digits CNN (a few minutes on 2 cores)
    python scripts/bench_robustness.py --fashion          # + Fashion-MNIST resnet20, vgg_small (needs the cached
                                                          #   originals of scripts/fashion_originals.py)
    python scripts/bench_robustness.py --fashion --skip-digits --fashion-models resnet20 \
        --out scripts/results/robustness_fashion      # Fashion only, into its own table (hours on 2 busy cores)

Digits CNN: `vgg_small(image_size=16)` (5 conv-bn-relu, 3 max-pools, Linear-ReLU-Linear) trained 8 epochs
on scikit-learn's digits resized to 16x16 (1,437 training images; accuracy on the 360 held-out ones, one
image = 0.28 points), cached under $AMC_BENCH_CACHE (default ~/.cache/amc_bench). Every compressor runs with
`compress_ratio=0.5` (half of each conv/linear layer's MACs) and the seed's `trainset_ratio=0.5`, once per
calibration `seed` in 0..4 (`--seeds`); `seed` alone decides the calibration images and positions. Rows
give mean, sample std and range (max - min) of the test accuracy, no fine-tuning.

"Equal MACs": ChannelPruning at `target_macs` t, then LowRankDecomposition at `target_macs` = the MACs
ChannelPruning reached (so low-rank never gets more MACs), both with their defaults.

Writes scripts/results/robustness.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import amc  # noqa: E402
from amc.compressors import ChannelPruning, LowRankDecomposition  # noqa: E402
from amc.data import digits_loaders  # noqa: E402
from amc.models import create, evaluate, train_classifier  # noqa: E402

RESULTS = HERE / "results"
CACHE = Path(os.environ.get("AMC_BENCH_CACHE", Path.home() / ".cache" / "amc_bench"))

LOWRANK = [  # (label, kwargs); the first row is the defaults
    ("LowRank defaults", {}),
    ("LowRank nonlinear_case=True", dict(nonlinear_case=True)),
    ("LowRank 8 px/img (the seed's)", dict(sampled_pixels_per_img=8)),
    ("LowRank 32 px/img", dict(sampled_pixels_per_img=32)),
    ("LowRank fold_bn=False", dict(fold_bn=False)),
    ("LowRank at target_macs=0.3", dict(target_macs=0.3)),
    ("LowRank fold_bn=False at target_macs=0.3", dict(fold_bn=False, target_macs=0.3)),
    ("LowRank asymmetric=False", dict(asymmetric=False)),
    ("LowRank decompose_output_layer=True", dict(decompose_output_layer=True)),
    ("LowRank method='svd'", dict(method="svd")),
]
CHANNEL = [
    ("ChannelPruning defaults", {}),
    ("ChannelPruning 8 px/img (the seed's)", dict(sampled_pixels_per_img=8)),
    ("ChannelPruning 32 px/img", dict(sampled_pixels_per_img=32)),
    ("ChannelPruning selection='max_response'", dict(selection="max_response")),
]


def digits_cnn() -> Tuple[torch.nn.Module, Any, Any, Dict[str, Any]]:
    """The digits CNN (trained once, cached) and its loaders."""
    train, val = digits_loaders(batch_size=64, image_size=16, seed=0)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "digits_vgg_small16_e8_lr0.05_s0.pt"
    torch.manual_seed(0)
    model = create("vgg_small", image_size=16)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        info = json.loads(path.with_suffix(".json").read_text())
    else:
        res = train_classifier(model, train, val, epochs=8, lr=0.05, seed=0)
        info = {"epochs": 8, "lr": 0.05, "train_seconds": res["seconds"]}
        from amc.export.atomic import atomic_path, atomic_write

        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
        with atomic_write(path.with_suffix(".json"), "w") as f:
            f.write(json.dumps(info))
    return model.eval(), train, val, info


def fashion_original(name: str = "resnet20"):
    import fashion_originals

    model, info = fashion_originals.original(name)
    train, test = fashion_originals.loaders()
    return model.eval(), train, test, info


def logit_error(model, net, val) -> float:
    """||net(x) - model(x)||^2 / ||model(x)||^2 over the test images: finer-grained than accuracy."""
    num = den = 0.0
    with torch.no_grad():
        for x, _ in val:
            ref = model(x)
            num += float(((net(x) - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / max(den, 1e-30)


def agreement(model, net, images: torch.Tensor) -> float:
    """Top-1 agreement (percent) of the compressed network with the original on `images`."""
    with torch.no_grad():
        return 100 * float((net(images).argmax(-1) == model(images).argmax(-1)).float().mean())


def all_images(train, val, cap: int = 10_000) -> torch.Tensor:
    """The test images and up to `cap` training images (all 1,797 digits)."""
    return torch.cat([train.dataset.tensors[0][:cap], val.dataset.tensors[0]])


def run_rows(model, train, val, x1, settings, cls, seeds, common) -> List[Dict[str, Any]]:
    macs0 = amc.count(model, x1)[0]
    images = all_images(train, val)
    rows = []
    for label, kw in settings:
        accs, macs, fallbacks, errs, agree = [], [], [], [], []
        t = time.perf_counter()
        for s in (seeds if kw.get("method") != "svd" else seeds[:1]):  # svd reads no data: one run
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = cls(model, train, val, seed=s, **{**common, **kw})
                net = c.compress()
            accs.append(100 * evaluate(net, val)["acc"])
            macs.append(amc.count(net, x1)[0] / macs0)
            errs.append(logit_error(model, net, val))
            agree.append(agreement(model, net, images))
            if isinstance(c, LowRankDecomposition) and c.nonlinear_case:
                fallbacks.append(sum(1 for r in c.report.values() if r["method"].startswith("linear (")))
        row = {"setting": label, "kwargs": {k: v for k, v in kw.items()}, "accs": accs,
               "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "range": float(max(accs) - min(accs)), "macs": float(np.mean(macs)), "logit_err": float(np.mean(errs)),
               "agreement": float(np.mean(agree)),
               "seconds_per_run": (time.perf_counter() - t) / len(accs)}
        if fallbacks:
            row["nonlinear_fallback_layers"] = fallbacks
        rows.append(row)
        print(f"  {label:<42} {row['mean']:6.2f} +- {row['std']:.2f} (range {row['range']:.2f})  "
              f"MACs {row['macs']:.3f}x", flush=True)
    return rows


def equal_macs(model, train, val, x1, seeds, common, targets) -> List[Dict[str, Any]]:
    macs0 = amc.count(model, x1)[0]
    out = []
    for t in targets:
        cp_acc, lr_acc, cp_m, lr_m = [], [], [], []
        for s in seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cp = ChannelPruning(model, train, val, seed=s, target_macs=t, **common).compress()
                m_cp = amc.count(cp, x1)[0] / macs0
                lr = LowRankDecomposition(model, train, val, seed=s, target_macs=m_cp, **common).compress()
            cp_acc.append(100 * evaluate(cp, val)["acc"])
            lr_acc.append(100 * evaluate(lr, val)["acc"])
            cp_m.append(m_cp)
            lr_m.append(amc.count(lr, x1)[0] / macs0)
        row = {"target_macs": t, "channel_pruning": cp_acc, "lowrank": lr_acc,
               "cp_macs": float(np.mean(cp_m)), "lr_macs": float(np.mean(lr_m)),
               "cp_mean": float(np.mean(cp_acc)), "lr_mean": float(np.mean(lr_acc)),
               "cp_std": float(np.std(cp_acc, ddof=1)), "lr_std": float(np.std(lr_acc, ddof=1))}
        out.append(row)
        print(f"  equal MACs {t}: CP {row['cp_mean']:.2f} ({row['cp_macs']:.3f}x)  LR {row['lr_mean']:.2f} "
              f"({row['lr_macs']:.3f}x)", flush=True)
    return out


def benchmark(name, model, train, val, x1, seeds, common, targets, settings_lr, settings_cp) -> Dict[str, Any]:
    print(f"{name}:", flush=True)
    base = 100 * evaluate(model, val)["acc"]
    rows = run_rows(model, train, val, x1, settings_lr, LowRankDecomposition, seeds, common)
    rows += run_rows(model, train, val, x1, settings_cp, ChannelPruning, seeds, common)
    return {"base_acc": base, "rows": rows, "equal_macs": equal_macs(model, train, val, x1, seeds, common, targets)}


def verdict(m: Dict[str, Any]) -> List[str]:
    out = []
    for family in ("LowRank", "ChannelPruning"):
        rows = [r for r in m["rows"] if r["setting"].startswith(family) and "target_macs" not in r["kwargs"]]
        if not rows:
            continue
        d = rows[0]
        best = max(rows, key=lambda r: r["mean"])
        out.append(f"- {family}: defaults {d['mean']:.2f} +- {d['std']:.2f}, range {d['range']:.2f} points over "
                   f"{len(d['accs'])} seeds ({'<=' if d['range'] <= 1.0 else '>'} 1 point); best setting "
                   f"{best['setting']!r} {best['mean']:.2f}: defaults {best['mean'] - d['mean']:.2f} points below "
                   f"({'within' if best['mean'] - d['mean'] <= 0.5 else 'NOT within'} 0.5).")
    fold = {r["setting"]: r for r in m["rows"]}
    for a, b in (("LowRank defaults", "LowRank fold_bn=False"),
                 ("LowRank at target_macs=0.3", "LowRank fold_bn=False at target_macs=0.3")):
        if a in fold and b in fold:
            out.append(f"- BN folded vs kept ({a.replace('LowRank ', '')}): accuracy {fold[a]['mean']:.2f} vs "
                       f"{fold[b]['mean']:.2f}, logit error {fold[a]['logit_err']:.4f} vs {fold[b]['logit_err']:.4f}, "
                       f"agreement {fold[a]['agreement']:.2f} vs {fold[b]['agreement']:.2f}.")
    for e in m["equal_macs"]:
        diff = e["lr_mean"] - e["cp_mean"]
        pooled = max(np.hypot(e["cp_std"], e["lr_std"]), 1e-9)
        if abs(diff) <= pooled:
            what = "a tie within the seed spread"
        else:
            what = "low-rank loses LESS (the seed's claim holds)" if diff > 0 else "low-rank loses MORE (the seed's claim fails)"
        out.append(f"- Equal MACs ({e['cp_macs']:.3f}x CP, {e['lr_macs']:.3f}x low-rank): low-rank {e['lr_mean']:.2f} "
                   f"vs channel pruning {e['cp_mean']:.2f} ({diff:+.2f} points): {what}.")
    return out


def write_md(res: Dict[str, Any], path: Path) -> None:
    cfg = res["config"]
    L = ["# Robustness of the data-driven compressors (issue 20)", "",
         f"Generated by `python scripts/bench_robustness.py{' --fashion' if cfg['fashion'] else ''}` on {cfg['date']}; "
         f"torch {cfg['torch']}, CPU, {cfg['threads']} thread(s). No fine-tuning anywhere.", "",
         f"- Every run: `compress_ratio=0.5` (half of each conv/linear layer's MACs), `trainset_ratio="
         f"{cfg.get('fashion_trainset_ratio', cfg['trainset_ratio']) if not any('digits' in k for k in res['models']) else cfg['trainset_ratio']}`, calibration `seed` in {cfg['seeds']}; the global RNG plays no part (the "
         "compressors draw from their own seed). mean +- sample std and range (max - min) of test accuracy, in points.",
         "- Defaults: positions per image sized from each layer (16 rows per fit dimension, at least 10 per image), "
         "BN folded (low-rank), asymmetric fit (low-rank), LASSO + least squares (channel pruning), the classifier's "
         "last Linear not decomposed.",
         "- Equal MACs: ChannelPruning at `target_macs` t, then LowRankDecomposition at the MACs channel pruning "
         "reached.",
         "- logit error: ||f'(x) - f(x)||^2 / ||f(x)||^2 of the compressed vs the original logits on the test "
         "images, mean over seeds; agreement: top-1 agreement (%) with the original on the test images and up to "
         "10,000 training images (no labels needed), mean over seeds. Both are finer-grained than accuracy on a "
         "small test set.", *([f"- {cfg['note']}."] if cfg.get("note") else []), ""]
    for name, m in res["models"].items():
        L += [f"## {name} (original: {m['base_acc']:.2f}%)", "", m.get("about", ""), "",
              "| setting | mean | std | range | MACs | logit error | agreement | per seed |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in m["rows"]:
            extra = f" (nonlinear fell back to linear on {r['nonlinear_fallback_layers']} layers)" \
                if "nonlinear_fallback_layers" in r else ""
            L.append(f"| {r['setting']} | {r['mean']:.2f} | {r['std']:.2f} | {r['range']:.2f} | {r['macs']:.3f}x | "
                     f"{r['logit_err']:.4f} | {r['agreement']:.2f} | "
                     + " / ".join(f"{a:.2f}" for a in r["accs"]) + extra + " |")
        L += ["", "| equal MACs, target | ChannelPruning | MACs | LowRank | MACs |", "|---|---:|---:|---:|---:|"]
        for e in m["equal_macs"]:
            L.append(f"| {e['target_macs']} | {e['cp_mean']:.2f} +- {e['cp_std']:.2f} | {e['cp_macs']:.3f}x | "
                     f"{e['lr_mean']:.2f} +- {e['lr_std']:.2f} | {e['lr_macs']:.3f}x |")
        L += ["", "Reading:", "", *verdict(m), ""]
    from _isolate import write_atomic

    write_atomic(str(path), "\n".join(L) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trainset-ratio", type=float, default=0.5)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--fashion", action="store_true", help="also Fashion-MNIST resnet20 and vgg_small (cached "
                    "originals)")
    ap.add_argument("--fashion-trainset-ratio", type=float, default=0.043,
                    help="calibration share on Fashion (0.043: about 2,500 of the 60,000 images)")
    ap.add_argument("--fashion-models", nargs="+", default=["resnet20", "vgg_small"])
    ap.add_argument("--skip-digits", action="store_true", help="only the Fashion-MNIST models")
    ap.add_argument("--out", default=str(RESULTS / "robustness"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: Dict[str, Any] = {"config": {"seeds": a.seeds, "threads": a.threads, "trainset_ratio": a.trainset_ratio,
                                      "fashion_trainset_ratio": a.fashion_trainset_ratio,
                                      "targets": a.targets, "fashion": a.fashion, "torch": torch.__version__,
                                      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")},
                           "models": {}}
    out = Path(a.out)
    if not a.skip_digits:
        model, train, val, info = digits_cnn()
        x1 = next(iter(val))[0][:1]
        common = dict(trainset_ratio=a.trainset_ratio, compress_ratio=0.5, example_inputs=(x1,))
        m = benchmark("digits CNN", model, train, val, x1, a.seeds, common, a.targets, LOWRANK, CHANNEL)
        m["about"] = (f"`vgg_small(image_size=16)` on scikit-learn digits at 16x16, trained {info['epochs']} epochs "
                      "(cached); accuracy on the 360 held-out images (1 image = 0.28 points).")
        res["models"]["digits CNN"] = m
        save(res, out)
    for name in (a.fashion_models if a.fashion else ()):
        model, train, test, info = fashion_original(name)
        x1 = next(iter(test))[0][:1]
        common = dict(trainset_ratio=a.fashion_trainset_ratio, compress_ratio=0.5, example_inputs=(x1,))
        settings = (LOWRANK[:2] + LOWRANK[4:5], CHANNEL[:1]) if name == "resnet20" else (LOWRANK[:1], CHANNEL[:1])
        m = benchmark(f"Fashion-MNIST {name}", model, train, test, x1, a.seeds, common, a.targets[:1], *settings)
        m["about"] = ("The full-data original of `scripts/fashion_originals.py`; accuracy on the 10,000-image test "
                      f"set; calibration on {a.fashion_trainset_ratio:.1%} of the training images.")
        res["models"][f"Fashion-MNIST {name}"] = m
        save(res, out)  # after each model: a long run that is stopped keeps what it finished
    print(out.with_suffix(".md").read_text())
    return 0


def save(res: Dict[str, Any], out: Path) -> None:
    from _isolate import write_atomic

    write_atomic(str(out.with_suffix(".json")), json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
