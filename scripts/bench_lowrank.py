"""Low-rank decomposition on Fashion-MNIST: svd vs data-driven linear vs nonlinear, before fine-tuning.

    python scripts/bench_lowrank.py                                   # full-data originals, 10k test set
    python scripts/bench_lowrank.py --train-limit 4000 --epochs 3 --test-limit 2000   # a quick subset

For vgg_small and resnet20 (amc.models): by default the full-data originals of
scripts/fashion_originals.py (60k images, 8 epochs, cached, shared with the other Fashion
benchmarks); with `--train-limit N` a model trained here on the first N training images (weights
cached in /tmp/amc_bench_lowrank). Every Conv2d except the stem (1 input channel) is decomposed at 2x: each decomposed layer keeps <= 0.5 of its weight MACs (uniform
per-layer rank formula), so the decomposed layers' total (conv + its folded BN) is <= 0.5x. Rows with
ENC rank selection spend the same budget (0.5 of the decomposed layers' MACs) globally; the
"accuracy"/"combined" metric is measured on 1,024 *training* images (58,976..60,000; held out from
a subset model, seen in training by the full-data originals), never on the test set. Calibration: `trainset_ratio` of the training loader,
`sampled_pixels_per_img` positions per image. Accuracy is on the first `--test-limit` images of the
official test set.

Writes scripts/results/lowrank.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors.lowrank import LowRankDecomposition
from amc.data import fashion_mnist_datasets
from amc.models import create, evaluate, train_classifier

CACHE = Path("/tmp/amc_bench_lowrank")
RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS = [  # (label, kwargs)
    ("svd", dict(method="svd")),
    ("linear", dict(method="data", asymmetric=False)),
    ("nonlinear", dict(method="data", nonlinear_case=True, asymmetric=False)),
    ("svd + ENC energy", dict(method="svd", rank_selection="energy")),
    ("linear + ENC energy", dict(method="data", rank_selection="energy", asymmetric=False)),
    ("nonlinear + ENC energy", dict(method="data", nonlinear_case=True, rank_selection="energy", asymmetric=False)),
    ("linear + ENC combined", dict(method="data", rank_selection="combined", asymmetric=False)),
    # Zhang et al. 2015 sec. 3.3: each layer fitted to the original responses from the inputs the
    # already-decomposed layers before it produce (LowRankDecomposition(asymmetric=True))
    ("linear, asymmetric", dict(method="data", asymmetric=True)),
    ("nonlinear, asymmetric", dict(method="data", nonlinear_case=True, asymmetric=True)),
    ("nonlinear + ENC energy, asymmetric", dict(method="data", nonlinear_case=True, rank_selection="energy",
                                                asymmetric=True)),
]


def loaders(train_limit: int, test_limit: int, batch: int = 128):
    train_full, test = fashion_mnist_datasets(val_limit=test_limit)
    x, y = train_full.tensors
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:train_limit], y[:train_limit]), batch_size=batch, shuffle=True, generator=g)
    select = DataLoader(TensorDataset(x[-1024:], y[-1024:]), batch_size=256)
    test_loader = DataLoader(test, batch_size=500)
    return train, select, test_loader


def trained_model(name: str, train, test, epochs: int, train_limit: int):
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}_e{epochs}_n{train_limit}.pt"
    model = create(name)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        info = json.loads(path.with_suffix(".json").read_text())
    else:
        t = time.perf_counter()
        res = train_classifier(model, train, test, epochs=epochs, lr=0.05, seed=0)
        info = {"train_seconds": time.perf_counter() - t, "epochs": epochs}
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(info))
        print(f"  trained {name}: test acc {res['acc']:.4f} in {info['train_seconds']:.0f}s", flush=True)
    return model.eval(), info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=0, help="0: full-data cached originals (default)")
    ap.add_argument("--test-limit", type=int, default=0, help="0: the whole 10k test set (default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["vgg_small", "resnet20"])
    ap.add_argument("--budget", nargs="*", default=[],
                    help="per-model NAME=TRAIN_LIMIT,EPOCHS overrides (resnet20 is ~4x slower per image)")
    ap.add_argument("--trainset-ratio", type=float, default=0.043,
                    help="calibration share of the training images (default 0.043: about 2,500 full-data images)")
    ap.add_argument("--pixels", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "lowrank"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    budget = {k: tuple(int(v) for v in val.split(",")) for k, val in (b.split("=") for b in a.budget)}
    x1 = torch.randn(1, 1, 28, 28)
    results = {"config": {**vars(a), "torch": torch.__version__, "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d %H:%M")}, "models": {}}
    for name in a.models:
        print(f"{name}:", flush=True)
        limit, epochs = budget.get(name, (a.train_limit, a.epochs))
        train, select, test = loaders(limit or 60000, a.test_limit or 10000)
        if limit:
            model, tinfo = trained_model(name, train, test, epochs, limit)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import fashion_originals

            model, info = fashion_originals.original(name)
            tinfo = {"train_seconds": info["train_seconds"], "epochs": info["epochs"], "lr": info["lr"],
                     "source": "scripts/fashion_originals.py"}
        tinfo = {**tinfo, "train_limit": limit or 60000}
        base_acc = evaluate(model, test)["acc"]
        graph = amc.trace(model, x1)
        convs = [n.name for n, m in graph.iter_nodes() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
        layers = convs[1:]  # all but the stem
        macs0 = amc.count(graph, x1)[0]
        rows = []
        for label, kw in VARIANTS:
            t = time.perf_counter()
            c = LowRankDecomposition(model, train, select, trainset_ratio=a.trainset_ratio,
                                     sampled_pixels_per_img=a.pixels, compress_ratio=0.5, layers=layers,
                                     val_batches=4, acc_grid=6, example_inputs=(x1,), **kw)
            net = c.compress()
            secs = time.perf_counter() - t
            acc = evaluate(net, test)["acc"]
            before = sum(c.infos[n].macs_before() for n in layers)
            after = sum(c.infos[n].macs_after(r, c._bias_after(n)) for n, r in c.chosen_ranks.items())
            after += sum(c.infos[n].macs_before() for n in layers if n not in c.chosen_ranks)
            macs1 = amc.count(net, x1)[0]
            methods = sorted({v["method"] for v in c.report.values()})
            row = {"variant": label, "acc": acc, "drop": base_acc - acc, "layers_macs_before": before,
                   "layers_macs_after": after, "layers_ratio": after / before, "net_macs_before": macs0,
                   "net_macs_after": macs1, "net_ratio": macs1 / macs0, "seconds": secs,
                   "ranks": c.chosen_ranks, "methods": methods}
            if kw.get("nonlinear_case"):
                objs = [(v["linear_obj"], v["nonlinear_obj"]) for v in c.report.values() if "linear_obj" in v]
                row["calib_obj_linear_vs_nonlinear"] = [float(np.sum([o[0] for o in objs])),
                                                        float(np.sum([o[1] for o in objs]))]
            rows.append(row)
            print(f"  {label:<24} acc {acc:.4f} (drop {100 * (base_acc - acc):5.2f} pts) layers {after / before:.3f}x "
                  f"net {macs1 / macs0:.3f}x  {secs:.1f}s", flush=True)
        results["models"][name] = {"base_acc": base_acc, "train": tinfo, "layers": layers, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_md(results, out.with_suffix(".md"))  # re-render only: python -c "...write_md(json.load(...), path)"
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}.md/.json/.png")
    return 0


def write_md(res, path: Path) -> None:
    cfg = res["config"]
    full = not cfg["train_limit"]
    cmd = "python scripts/bench_lowrank.py" + ("" if full else (
        f" --epochs {cfg['epochs']} --train-limit {cfg['train_limit']} --test-limit {cfg['test_limit']}"
        f" --trainset-ratio {cfg['trainset_ratio']} --pixels {cfg['pixels']}"
        + (f" --budget {' '.join(cfg['budget'])}" if cfg.get("budget") else "")))
    n_test = cfg["test_limit"] or 10000
    L = ["# Low-rank decomposition at 2x, before fine-tuning (Fashion-MNIST)", "",
         f"Generated by `{cmd}` on {cfg['date']}; torch {cfg['torch']}, CPU, {cfg['threads']} threads.", ""]
    if full:
        L += ["- Originals: `scripts/fashion_originals.py` (all 60,000 training images, 8 epochs of SGD-Nesterov + "
              "OneCycle, cached and shared with the other Fashion benchmarks); accuracy on the official "
              f"{n_test:,}-image test set."]
    else:
        L += [f"- Models trained {cfg['epochs']} epochs on the first {cfg['train_limit']:,} Fashion-MNIST training "
              f"images (SGD + OneCycle, amc.models.train_classifier); accuracy on the first {n_test:,} images of the "
              "official test set.",
              "- Per-model overrides (train images, epochs): "
              + ", ".join(f"{n}: {m['train']['train_limit']:,} images, {m['train']['epochs']} epochs"
                          for n, m in res["models"].items()) + "."]
    L += [
         "- Decomposed: every Conv2d except the stem (1 input channel); BN folded into each decomposed conv. "
         "**Budget: MACs of the decomposed layers (conv + folded BN) <= 0.5x** (column `layers`); whole-net ratio "
         "in column `net` (the stem, pools, residual adds and classifier stay).",
         f"- Calibration: {100 * cfg['trainset_ratio']:g}% of the training images (a subset drawn with the compressor's seed), "
         f"{cfg['pixels']} sampled positions per image. ENC `combined` measures accuracy on 1,024 training "
         "images (the last ones; " + ("seen in training by the full-data originals" if full else "never trained on")
         + "), never on the test set.",
         "- `svd`: weight SVD; `linear`: response PCA (Zhang et al. 2015 linear case); `nonlinear`: through the "
         "following ReLU (Zhang et al. 2015 nonlinear case, 25 alternating iterations, best iterate on calibration "
         "data); layers not followed by a ReLU (resnet20's conv2 and 1x1 shortcuts feed the residual add) use the "
         "linear case. Rows marked `asymmetric` fit each layer, in network order, to the original responses from the "
         "inputs the already-decomposed layers produce (Zhang et al. 2015 sec. 3.3; `asymmetric=True`); the others fit "
         "every layer on the original network's inputs. Rows without ENC use the per-layer rank formula `r = floor(0.5 C k^2 N / (C k^2 + N))`.",
         ""]
    for name, m in res["models"].items():
        L += [f"## {name} (test acc before: {m['base_acc']:.4f})", "",
              "| variant | test acc | drop (pts) | layers MACs after/before | net MACs after/before | compress s |",
              "|---|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            L.append(f"| {r['variant']} | {r['acc']:.4f} | {100 * r['drop']:.2f} | {r['layers_ratio']:.3f} | "
                     f"{r['net_ratio']:.3f} | {r['seconds']:.1f} |")
        L.append("")
        nl = next((r for r in m["rows"] if r["variant"] == "nonlinear"), None)
        if nl and "calib_obj_linear_vs_nonlinear" in nl:
            lo, no = nl["calib_obj_linear_vs_nonlinear"]
            L += [f"Nonlinear solver, summed per-sample post-ReLU calibration error over the layers it applies to: "
                  f"linear start {lo:.4g} -> nonlinear {no:.4g} ({100 * (1 - no / max(lo, 1e-30)):.1f}% lower).", ""]
    L += ["## Reading", "", *verdict(res), ""]
    path.write_text("\n".join(L))


def verdict(res):
    out = []
    for name, m in res["models"].items():
        acc = {r["variant"]: r["acc"] for r in m["rows"]}
        order = acc["nonlinear"] >= acc["linear"] >= acc["svd"]
        n_test = res["config"].get("test_limit") or 10000
        gap = abs(acc["nonlinear"] - acc["linear"]) * n_test
        out.append(f"- {name}: nonlinear {acc['nonlinear']:.4f}, linear {acc['linear']:.4f}, svd {acc['svd']:.4f} -> "
                   + ("goal ordering holds (nonlinear loses least, svd most)." if order else
                      "goal ordering nonlinear >= linear >= svd does NOT hold here.")
                   + (f" (nonlinear vs linear differ by {gap:.0f} test image(s): a tie.)" if gap <= 3 else ""))
        if "linear, asymmetric" in acc:
            best = max(acc, key=acc.get)
            out.append(f"- {name}: asymmetric fitting (each layer against the original responses, from the inputs "
                       f"of the layers already decomposed) lifts linear {acc['linear']:.4f} -> "
                       f"{acc['linear, asymmetric']:.4f} and nonlinear {acc['nonlinear']:.4f} -> "
                       f"{acc['nonlinear, asymmetric']:.4f}; best row: {best} ({acc[best]:.4f}, "
                       f"{100 * (m['base_acc'] - acc[best]):.2f} pts below the original).")
    return out


def plot(res, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    models = list(res["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        m = res["models"][name]
        labels = [r["variant"] for r in m["rows"]]
        ax.barh(labels, [100 * r["drop"] for r in m["rows"]], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy drop (points), no fine-tuning")
        ax.set_title(f"{name} at 2x (base {100 * m['base_acc']:.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
