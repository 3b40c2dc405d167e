"""How much can any per-layer policy gain over uniform after the short fine-tuning, and how noisy is it?

    python scripts/bench_tuner_headroom.py --model resnet20 --target 0.3 --picks-from \
        scripts/results/tuners_fashion_mnist_rerank_resnet20.json     # all four parts
    python scripts/bench_tuner_headroom.py --model vgg_small --compressor channel --target 0.5 --policies 0 \
        --picks-from scripts/results/tuners_fashion_mnist_channel_vgg_small.json   # parts 1 and 3 only

Issue 13 asks DDPG and GA to end above the uniform policy and random search after the same short
fine-tuning as `bench_tuners.py`. This script measures, on one of that benchmark's rows (same cached
original, proxy, budget, BN batches and fine-tuning recipe), whether that order is a property of the
tuners or of one fine-tuning draw:

1. **Fine-tuning noise**: the uniform policy fine-tuned with several data orders (`train_classifier`'s
   seed; seed 0 is the one `bench_tuners.py` uses for every row), and its spread.
2. **Headroom**: the first N distinct policies of random search (seed 0, as the benchmark's Spearman
   part takes them) fine-tuned with seed 0: how many end above uniform, and by how much the best one
   does. Picking that best one reads the test set, so it is an oracle no tuner can beat with this
   fine-tuning draw.
3. **The tuners' picks, averaged over the noise**: the committed policies of `--picks-from` (the rows of
   `tuners_fashion_mnist.json`) re-fine-tuned with every seed; mean per tuner against uniform's mean, and the
   95% interval of its difference to random search run alike (3 search seeds resolve about 0.45 points).
4. **What predicts the fine-tuned accuracy** over the N policies: Spearman of it with the search's proxy,
   the kept parameters and the smallest kept fraction of any layer.

Fine-tunings are memoised per (policy, seed) under $AMC_BENCH_CACHE, so a killed run resumes and a rerun
with more `--picks-from` files only fine-tunes the new picks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import scipy.stats
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_tuners as bt  # noqa: E402  (the benchmark whose row this measures: its original, proxy, recipe)

from amc.export.atomic import atomic_write  # noqa: E402
from amc.jobs.search import make_tuner  # noqa: E402
from amc.models import train_classifier  # noqa: E402
from amc.trainers import recalibrate_bn  # noqa: E402
from amc.tuners import build_space  # noqa: E402
from amc.tuners.evaluation import take_batches  # noqa: E402

RESULTS = HERE / "results"
MEMO = Path(os.environ.get("AMC_BENCH_CACHE", Path.home() / ".cache" / "amc_bench"))  # fashion_originals' cache


class Finetunes:
    """Test accuracy after bench_tuners' fine-tuning (BN re-estimated, 1 epoch, lr FT_LR) with data order
    `seed`, memoised per (policy, seed) in a JSON file written after each one, so a killed run loses one."""

    def __init__(self, path: Path, bn, ft_train, test):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.bn, self.ft_train, self.test = path, bn, ft_train, test
        self.done: Dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        self.hits = 0  # fine-tunings read from the memo instead of run

    def __call__(self, net: torch.nn.Module, policy: Dict[str, float], seed: int) -> float:
        key = json.dumps([sorted(policy.items()), seed])
        self.hits += key in self.done
        if key not in self.done:
            self.done[key] = train_classifier(recalibrate_bn(net, self.bn), self.ft_train, self.test, epochs=1,
                                              lr=bt.FT_LR, seed=seed)["acc"]
            with atomic_write(str(self.path), "w") as f:
                json.dump(self.done, f)
        return self.done[key]


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def stem_name(args: argparse.Namespace) -> str:
    comp = "" if args.compressor == "prune" else f"_{args.compressor}"
    return f"tuner_headroom_{args.model}{comp}_{args.target}"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    model, train, test, x = bt.original("fashion_mnist", args.model)
    bn = take_batches(train, 4)  # the batches bench_tuners.test_scores takes first, for every row
    ft_train = bt.ft_loader("fashion_mnist", args.ft_train_limit)
    finetune = Finetunes(MEMO / f"{stem_name(args)}.memo.json", bn, ft_train, test)
    base_params = params(model)
    options = {"trainset_ratio": args.channel_calibration} if args.compressor == "channel" else {}
    space = build_space(model, (x,), args.target, args.compressor, calibration=train, compressor_options=options)
    out: Dict[str, Any] = {"args": vars(args), "threads": torch.get_num_threads(),
                           "load_avg_1m_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.perf_counter()

    unet, upolicy = bt.uniform_net(model, x, train, args.compressor, args.target, options)
    out["uniform"] = {"policy": upolicy, "params": params(unet) / base_params,
                      "after_ft": {s: finetune(unet, upolicy, s) for s in args.ft_seeds}}
    print("uniform", out["uniform"]["after_ft"], flush=True)

    res = make_tuner("random", args.evaluations, 0, pop_size=10).search(
        model, example_inputs=(x,), target_macs=args.target, compressor=args.compressor, evaluate=bt.proxy(train),
        calibration=train, progress=False, holdout_batches=8, compressor_options=options)
    pols = []
    for h in bt.distinct_policies(res.history, args.policies):  # as bench_tuners' Spearman part takes them
        net = space.compress(space.vector(h["policy"]))
        pols.append({"policy": h["policy"], "proxy": h["score"], "params": params(net) / base_params,
                     "min_kept": 1 - max(h["policy"].values()),
                     "after_ft": finetune(net, h["policy"], args.ft_seeds[0])})
        print(len(pols), round(pols[-1]["proxy"], 4), pols[-1]["after_ft"], flush=True)
    out["random_policies"] = pols

    picks, out["picks_without_policy"] = [], []
    for f in args.picks_from:
        for r in json.loads(Path(f).read_text())["rows"]:
            if (r["model"], r["target"], r["compressor"]) != (args.model, args.target, args.compressor) \
                    or r["tuner"] == "uniform":
                continue
            if "policy" not in r:  # rows of a run that aborted before policies were saved
                out["picks_without_policy"].append(f"{Path(f).name}: {r['tuner']} seed {r['seed']}")
            else:
                net = space.compress(space.vector(r["policy"]))
                picks.append({"file": Path(f).name, "tuner": r["tuner"], "seed": r["seed"],
                              "table_after_ft": r["after_ft"], "params": params(net) / base_params,
                              "after_ft": {s: finetune(net, r["policy"], s) for s in args.ft_seeds}})
                print(picks[-1]["tuner"], picks[-1]["seed"], picks[-1]["after_ft"], flush=True)
    out["picks"] = picks
    out["wall_s"] = time.perf_counter() - t0
    out["memo_hits"] = finetune.hits
    out["load_avg_1m_end"] = os.getloadavg()[0]
    return out


def _spearman(a: List[float], b: List[float]) -> str:
    from scipy.stats import spearmanr

    rho, p = spearmanr(a, b)
    return f"{rho:.2f} (p = {p:.3f})"


def label(pick: Dict[str, Any], evaluations: int = 40) -> str:
    """The tuner, whether its source run started it near uniform (GA's first generation, DDPG's warm-up),
    its search budget where it is not this run's --evaluations, and whether it re-ranked its best few
    (a table may mix plain and re-ranked picks of one tuner; each is compared with random search run alike)."""
    src = RESULTS / pick["file"]
    a = json.loads(src.read_text())["args"] if src.exists() else {}
    sigma, count = a.get("initial_uniform"), a.get("initial_uniform_count")
    start = {"ga": "first generation", "ddpg": "warm-up"}.get(pick["tuner"])
    parts = [f"{start} {f'{count} policies ' if count else ''}near uniform, sigma {sigma}"] \
        if sigma is not None and start else []
    if a.get("evaluations", evaluations) != evaluations:
        parts.append(f"{a['evaluations']} evaluations")
    if a.get("proxy_holdout_batches", 8) != 8:
        parts.append(f"proxy on {a['proxy_holdout_batches']} batches")
    if a.get("rerank"):
        parts.append(f"re-ranked {a['rerank']}")
    return pick["tuner"] + (f" ({', '.join(parts)})" if parts else "")


def difference_interval(a: List[float], b: List[float]) -> str:
    """95% interval of mean(a) - mean(b) in points, Welch's t (scipy): with 3 search seeds a side its width shows
    how large a difference the benchmark can resolve at all."""
    if min(len(a), len(b)) < 2:
        return "-"
    lo, hi = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return f"{lo * 100:+.2f} to {hi * 100:+.2f}"


def render(out: Dict[str, Any]) -> str:
    a = out["args"]
    u = list(out["uniform"]["after_ft"].values())
    seeds = " ".join(str(s) for s in a["ft_seeds"])
    comp = a.get("compressor", "prune")
    lines = [f"# How far above uniform can a policy get after the short fine-tuning? ({a['model']}, {comp}, "
             f"{a['target']}x MACs)", "",
             f"`python scripts/bench_tuner_headroom.py --model {a['model']} --target {a['target']}"
             + (f" --compressor channel --channel-calibration {a['channel_calibration']}" if comp == "channel" else "")
             + f" --policies "
             f"{a['policies']} --ft-seeds {seeds} --picks-from "
             + " ".join(os.path.relpath(f, HERE.parent) for f in a["picks_from"]) + f"` ({out['started']}, {out['wall_s'] / 60:.0f} min"
             + (f" with {out['memo_hits']} fine-tunings read from an earlier run's memo" if out.get("memo_hits") else "")
             + ", "
             f"{out['threads']} torch threads, 1-min load average {out['load_avg_1m_start']:.2f} at the start, "
             f"{out['load_avg_1m_end']:.2f} at the end). Fine-tuning as in `bench_tuners.py`: BN re-estimated on "
             f"the same 4 training batches, 1 epoch on the same {a['ft_train_limit']:,}-image subset, lr "
             f"{bt.FT_LR}; the seed sets the data order (bench_tuners uses seed {a['ft_seeds'][0]} for every row). "
             "Test accuracy (%) on the official test set.", "",
             "## 1. Fine-tuning noise: the uniform policy, one data order per seed", "",
             "| seed | " + " | ".join(str(s) for s in out["uniform"]["after_ft"]) + " | mean | std |",
             "|---|" + "---|" * (len(u) + 2),
             "| after FT | " + " | ".join(f"{v * 100:.2f}" for v in u)
             + f" | {statistics.mean(u) * 100:.2f} | {statistics.stdev(u) * 100:.2f} |"]
    pol = out["random_policies"]
    ft = [p["after_ft"] for p in pol]
    u0 = u[0]
    above = [v for v in ft if v > u0]
    lines += [] if len(pol) < 3 else ["", f"## 2. Headroom: {len(pol)} random policies (random search, seed 0), fine-tuned with seed "
              f"{a['ft_seeds'][0]}", "",
              "| uniform (seed 0) | random policies: mean ± std | best (oracle: chosen on the test set) | "
              "policies above uniform |", "|---|---|---|---|",
              f"| {u0 * 100:.2f} | {statistics.mean(ft) * 100:.2f} ± {statistics.stdev(ft) * 100:.2f} | "
              f"{max(ft) * 100:.2f} ({(max(ft) - u0) * 100:+.2f}) | {len(above)} of {len(ft)} |"]
    lines += [] if len(pol) < 3 else ["", "What ranks the fine-tuned accuracy of these policies (Spearman):", "",
              "| predictor | rho (p) |", "|---|---|",
              f"| the search's proxy (adaptive-BN accuracy on 8 training batches) | "
              f"{_spearman([p['proxy'] for p in pol], ft)} |",
              f"| kept parameters | {_spearman([p['params'] for p in pol], ft)} |",
              f"| smallest kept fraction of any layer | {_spearman([p['min_kept'] for p in pol], ft)} |"]
    if out["picks"]:
        lines += ["", "## 3. The tuners' committed picks, fine-tuned with every seed", "",
                  "| source | tuner | search seed | after FT in the table | " + " | ".join(
                      f"seed {s}" for s in a["ft_seeds"]) + " | mean over FT seeds |",
                  "|---|---|---|---|" + "---|" * (len(a["ft_seeds"]) + 1)]
        for p in out["picks"]:
            v = list(p["after_ft"].values())
            lines.append(f"| {p['file']} | {p['tuner']} | {p['seed']} | {p['table_after_ft'] * 100:.2f} | "
                         + " | ".join(f"{w * 100:.2f}" for w in v) + f" | {statistics.mean(v) * 100:.2f} |")
        if out.get("picks_without_policy"):
            lines += ["", "Rows of `--picks-from` without a saved policy (left out): "
                      + "; ".join(out["picks_without_policy"]) + "."]
        lines += ["", "Per tuner: the mean over its picks and the FT seeds; paired by data order, the seeds at which "
                  "the mean of its picks is above uniform's (and above random search's picks) with that seed; and "
                  "the 95% interval of its difference to random search run alike (Welch's t over the per-policy "
                  "means, one per search seed: an interval that holds 0 means the search seeds cannot tell the two "
                  "apart).", "",
                  "| policy | mean over search seeds and FT seeds | std of the per-policy means | vs uniform | "
                  "above uniform, paired | above random search, paired | vs random search, 95% interval |",
                  "|---|---|---|---|---|---|---|"]
        um = statistics.mean(u)
        lines.append(f"| uniform | {um * 100:.2f} | - | - | - | - | - |")
        labels = {id(p): label(p, a["evaluations"]) for p in out["picks"]}
        rival = {labels[id(p)]: label({**p, "tuner": "random"}, a["evaluations"])  # same number of evaluations
                 for p in out["picks"]}
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for p in out["picks"]:
            groups.setdefault(labels[id(p)], []).append(p)
        per_seed = {t: [statistics.mean(p["after_ft"][s] for p in ps) for s in out["uniform"]["after_ft"]]
                    for t, ps in groups.items()}
        pick_means = {t: [statistics.mean(p["after_ft"].values()) for p in ps] for t, ps in groups.items()}
        for t, by_seed in per_seed.items():
            means = pick_means[t]
            sd = statistics.stdev(means) * 100 if len(means) > 1 else float("nan")
            over_u = sum(a > b for a, b in zip(by_seed, u))
            r = rival[t]
            alike = t != r and r in per_seed
            over_r = f"{sum(x > y for x, y in zip(by_seed, per_seed[r]))} of {len(u)}" if alike else "-"
            lines.append(f"| {t} | {statistics.mean(means) * 100:.2f} | {sd:.2f} | "
                         f"{(statistics.mean(means) - um) * 100:+.2f} | {over_u} of {len(u)} | {over_r} | "
                         f"{difference_interval(means, pick_means[r]) if alike else '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=("resnet20", "vgg_small"))
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--compressor", default="prune", choices=("prune", "channel"))
    p.add_argument("--channel-calibration", type=float, default=0.02,
                   help="compressor 'channel': its trainset_ratio (0.02, as the committed channel tables)")
    p.add_argument("--policies", type=int, default=24)
    p.add_argument("--evaluations", type=int, default=40, help="random search's samples (the benchmark's)")
    p.add_argument("--ft-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--ft-train-limit", type=int, default=10000)
    p.add_argument("--picks-from", nargs="*", default=[str(RESULTS / "tuners_fashion_mnist.json")])
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args()
    stem = RESULTS / stem_name(args)
    out = json.loads(Path(str(stem) + ".json").read_text()) if args.render_only else run(args)
    bt.save(stem, out, render, measured=not args.render_only)


if __name__ == "__main__":
    main()
