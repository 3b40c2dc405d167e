"""Pruning criteria at equal MACs: which channels go, with one uniform ratio for every group.

    python scripts/bench_criteria.py                              # resnet20 and vgg_small, ratios 0.3 and 0.5
    python scripts/bench_criteria.py --models resnet20 --ratios 0.5 --criteria l2 taylor --no-tp
    python scripts/bench_criteria.py --render-only                # the table from the saved JSON

The Fashion-MNIST originals (scripts/fashion_originals.py, cached) lose the same number of channels in every
group (`amc.prune(ratio=r)`), so every row of a (model, ratio) has the same MACs and only the choice of
channels differs. Data-driven criteria (APoZ, ThiNet, Taylor, Oracle) read the same 4 labelled training
batches. Beside amc's rows, Torch-Pruning 1.6.1's MetaPruner with its group L2 magnitude and group Taylor
importances (gradients from the same 4 batches) at the same ratio. Every row: test accuracy (official
10k test set) after BatchNorm re-estimation on 4 other training batches, and after the same fine-tuning
(`--ft-epochs` on `--ft-train-limit` images, one run per `--ft-seeds` seed). The seconds are the scoring +
pruning wall time (indicative: the load average is in the header).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import amc  # noqa: E402
from amc.models import evaluate, train_classifier  # noqa: E402
from amc.trainers import recalibrate_bn  # noqa: E402
from amc.tuners.evaluation import take_batches  # noqa: E402
from _isolate import cpu_info, package_version, write_atomic  # noqa: E402

RESULTS = HERE / "results"
CRITERIA = ("l1", "l2", "fpgm", "apoz", "thinet", "taylor", "oracle", "random")
FT_LR = 0.02


def tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float, kind: str, batches: List[Any]) -> torch.nn.Module:
    """Torch-Pruning's MetaPruner at the same per-group ratio, its classifier kept (as amc keeps the output)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    imp = tp.importance.GroupMagnitudeImportance(p=2) if kind == "l2" else tp.importance.GroupTaylorImportance()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, ignored_layers=[head])
    if kind == "taylor":
        model.zero_grad()
        for inputs, labels in batches:
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    pruner.step()
    model.zero_grad()
    return model.eval()


def scores(net: torch.nn.Module, bn: List[Any], ft_train: Any, test: Any, ft_epochs: int, seeds: List[int]
           ) -> Dict[str, Any]:
    before = evaluate(recalibrate_bn(copy.deepcopy(net), bn), test)["acc"]
    after = []
    for seed in seeds if ft_epochs else ():
        tuned = recalibrate_bn(copy.deepcopy(net), bn)
        after.append(train_classifier(tuned, ft_train, test, epochs=ft_epochs, lr=FT_LR, seed=seed)["acc"])
    return {"before_ft": before, "after_ft": after}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import fashion_originals as fo
    from amc.data import fashion_mnist_loaders

    out: Dict[str, Any] = {"args": vars(args), "rows": [], "originals": {},
                           "env": {"torch": torch.__version__, "torch_pruning": package_version("torch_pruning"),
                                   "cpu": cpu_info(), "threads": torch.get_num_threads(),
                                   "load_before": os.getloadavg()[0],
                                   "date": time.strftime("%Y-%m-%d %H:%M")}}
    ft_train = fashion_mnist_loaders(batch_size=128, train_limit=args.ft_train_limit, seed=0)[0]
    for name in args.models:
        model, _ = fo.original(name)
        model.eval()
        train, test = fo.loaders(name=name)
        calib = take_batches(train, 4)           # what the data-driven criteria read
        bn = take_batches(train, 4, skip=4)      # BN re-estimation, the same for every row
        x = calib[0][0][:1]
        base = amc.count(model, x)[0]
        out["originals"][name] = {"acc": evaluate(model, test)["acc"], "macs": base}
        for ratio in args.ratios:
            rows = [("amc", c) for c in args.criteria] + ([("tp", k) for k in ("l2", "taylor")] if args.tp else [])
            for lib, crit in rows:
                t0 = time.perf_counter()
                if lib == "amc":
                    net = amc.prune(model, example_inputs=(x,), ratio=ratio, criterion=crit, dataloader=calib)
                else:
                    net = tp_prune(model, x, ratio, crit, calib)
                seconds = time.perf_counter() - t0
                row = {"model": name, "ratio": ratio, "library": lib, "criterion": crit, "seconds": seconds,
                       "macs": amc.count(net, x)[0] / base,
                       **scores(net, bn, ft_train, test, args.ft_epochs, args.ft_seeds)}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                write(out, args.out)
    out["env"]["load_after"] = os.getloadavg()[0]
    write(out, args.out)
    return out


def _label(row: Dict[str, Any]) -> str:
    if row["library"] == "tp":
        return f"Torch-Pruning {'group L2' if row['criterion'] == 'l2' else 'group Taylor'}"
    return {"l1": "L1", "l2": "L2", "fpgm": "FPGM", "apoz": "APoZ", "thinet": "ThiNet", "taylor": "Taylor",
            "oracle": "Oracle", "random": "random"}.get(row["criterion"], row["criterion"])


def render(out: Dict[str, Any]) -> str:
    a, env = out["args"], out["env"]
    lines = ["# Pruning criteria at equal MACs (one ratio for every group)", "",
             f"Generated by `python scripts/bench_criteria.py {' '.join(a.get('argv', []))}`".rstrip() +
             f" on {env['date']}; torch {env['torch']}, torch-pruning {env['torch_pruning']}, {env['cpu']}, "
             f"{env['threads']} torch thread(s); 1-minute load average {env['load_before']:.2f} before, "
             f"{env.get('load_after', float('nan')):.2f} after (seconds are indicative).", "",
             "Originals: " + ", ".join(f"{n} {v['acc'] * 100:.2f}% ({v['macs'] / 1e6:.1f} MMACs)"
                                       for n, v in out["originals"].items()) +
             ". Data-driven criteria read the same 4 labelled training batches (Taylor: 4, Oracle: its default 2 "
             "of them); every row: BN re-estimated on 4 other training batches, test accuracy (10k) before "
             f"fine-tuning, then {a['ft_epochs']} epoch(s) of SGD (lr {FT_LR}) on {a['ft_train_limit']:,} training "
             f"images, seed(s) {a['ft_seeds']} (mean ± sd over seeds).", "",
             "| model | channels removed per group | criterion | MACs (x orig) | test % before FT | test % after FT "
             "| scoring + pruning s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    if out.get("notes"):
        lines[-2:-2] = ["Reading of this run (written by hand after it, kept in the JSON's `notes`):", "",
                        *[f"- {n}" for n in out["notes"]], ""]
    for r in out["rows"]:
        after = r["after_ft"]
        ft = (f"{statistics.mean(after) * 100:.2f}" + (f" ± {statistics.stdev(after) * 100:.2f}" if len(after) > 1
                                                       else "")) if after else "-"
        lines.append(f"| {r['model']} | {r['ratio']} | {_label(r)} | {r['macs']:.3f} | {r['before_ft'] * 100:.2f} "
                     f"| {ft} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def write(out: Dict[str, Any], stem: str) -> None:
    write_atomic(stem + ".json", json.dumps(out, indent=1))
    write_atomic(stem + ".md", render(out))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg_small"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    p.add_argument("--no-tp", dest="tp", action="store_false", help="skip Torch-Pruning's rows")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-train-limit", type=int, default=10000)
    p.add_argument("--ft-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=str(RESULTS / "criteria"))
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    args.argv = argv
    if args.render_only:
        out = json.loads(Path(args.out + ".json").read_text())
        write_atomic(args.out + ".md", render(out))
        return 0
    run(args)
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
