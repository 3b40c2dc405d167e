"""Tuners benchmark: DDPG, GA and random search against the uniform policy, at equal MACs.

    python scripts/bench_tuners.py                                   # digits CNN, prune (L2), 0.5x and 0.3x
    python scripts/bench_tuners.py --compressors prune channel --evaluations 60 --seeds 0 1 2
    python scripts/bench_tuners.py --data fashion_mnist --models resnet20 vgg_small   # cached originals
    python scripts/bench_tuners.py --render-only                     # tables from the saved JSON

For each (model, target MACs, compressor, tuner, seed): a search with the same number of evaluated
policies, every candidate scored by the default proxy (accuracy on 8 training batches after BN
re-estimation on 4 others; the test split is never used for a choice). The best policy's network is
then scored on the test split (digits: the 20% val split; Fashion-MNIST: the official test set)
after BN re-estimation ("before FT") and after the same short fine-tuning ("after FT"). The uniform
policy (`amc.prune(target_macs=...)`, or ChannelPruning's uniform ratio) gets the same treatment.
Also: Spearman correlation of proxy score and fine-tuned accuracy over the first 24 distinct
policies of random search at the first target, and search wall time with the load average beside it
(labelled: the machine was shared, so these are not clean timings).
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import amc  # noqa: E402
from amc.export.atomic import atomic_write  # noqa: E402
from amc.jobs.search import make_tuner  # noqa: E402
from amc.models import create, evaluate, train_classifier  # noqa: E402
from amc.trainers import recalibrate_bn  # noqa: E402
from amc.tuners import build_space  # noqa: E402
from amc.tuners.evaluation import default_evaluator, take_batches  # noqa: E402

RESULTS = HERE / "results"
TUNERS = ("ddpg", "ga", "random")
FT_EPOCHS, FT_LR = 3, 0.02
QUIET_MARGIN = 0.5  # load average above the benchmark's own threads that still counts as "nothing else running"


def original(data: str, name: str, seed: int = 0):
    """The trained original, its loaders and an example input."""
    if data == "digits":
        from amc.data import digits_loaders

        train, test = digits_loaders(batch_size=64, seed=0)
        torch.manual_seed(seed)
        model = create(name, image_size=8) if name != "digits_resnet" else create(name)
        train_classifier(model, train, test, epochs=10, seed=0)
    else:
        sys.path.insert(0, str(HERE))
        import fashion_originals as fo  # scripts/fashion_originals.py: cached, trained on all 60k images

        model, _ = fo.original(name)
        train, test = fo.loaders()
    model.eval()
    return model, train, test, next(iter(test))[0][:1]


def ft_loader(data: str, limit: int):
    """A fixed subset of `limit` training images for the short fine-tuning (cheaper rows on Fashion-MNIST)."""
    if data != "fashion_mnist":
        raise SystemExit("--ft-train-limit is for --data fashion_mnist (digits has 1,437 training images)")
    from amc.data import fashion_mnist_loaders

    return fashion_mnist_loaders(batch_size=128, train_limit=limit, seed=0)[0]


BN_BATCHES: Dict[int, List[Any]] = {}


FT_TRAIN: Dict[int, Any] = {}  # id(train) -> the loader fine-tuning reads (all of train, or --ft-train-limit images)


def test_scores(net: torch.nn.Module, train, test, ft_epochs: int) -> Dict[str, float]:
    """Test accuracy after BN re-estimation on the same 4 training batches for every row, then after FT
    (the same epochs on the same images for every row: all of train, or the --ft-train-limit subset)."""
    if id(train) not in BN_BATCHES:  # taken once, right after the original was trained, for every row
        BN_BATCHES[id(train)] = take_batches(train, 4)
    bn = BN_BATCHES[id(train)]
    before = evaluate(recalibrate_bn(net, bn), test)["acc"]
    after = before
    if ft_epochs:
        tuned = recalibrate_bn(net, bn)
        after = train_classifier(tuned, FT_TRAIN.get(id(train), train), test, epochs=ft_epochs, lr=FT_LR,
                                 seed=0)["acc"]
    return {"before_ft": before, "after_ft": after}


def proxy(train, finetune_steps: int = 0, holdout_batches: int = 8):
    """The search's score: accuracy on `holdout_batches` training batches after BN re-estimation on 4 others
    (and `finetune_steps` SGD steps on a copy); the test split is never used for a choice."""
    return default_evaluator(train, None, bn_batches=4, holdout_batches=holdout_batches,
                             finetune_steps=finetune_steps)


def compressor_options(args: argparse.Namespace, compressor: str) -> Dict[str, Any]:
    """Options of the compressor every row of a search and its uniform row share."""
    return {"trainset_ratio": args.channel_calibration} if compressor == "channel" else {}


def uniform_net(model, x, train, compressor: str, target: float, options: Dict[str, Any]):
    """The uniform policy at the searches' budget (SearchSpace.uniform: the smallest common ratio that
    meets it, then the rounding slack spent), so the uniform row's MACs sit within ~1% of the target like
    the searched ones."""
    space = build_space(model, (x,), target, compressor, calibration=train, compressor_options=options)
    v = space.uniform()
    return space.compress(v), space.policy(v)


def start_policies(args: argparse.Namespace, tuner: str) -> Dict[str, Any]:
    """--initial-uniform: GA's first generation / DDPG's warm-up near uniform (initial="uniform"), with
    --initial-uniform-count N only its first N policies (initial_count; the rest random, as without the flag)."""
    if args.initial_uniform is None or tuner not in ("ga", "ddpg"):
        return {"initial": (), "initial_sigma": 0.0}
    return {"initial": "uniform", "initial_sigma": args.initial_uniform, "initial_count": args.initial_uniform_count}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(1 if args.data == "digits" else torch.get_num_threads())
    out: Dict[str, Any] = {"args": vars(args), "rows": [], "spearman": {}, "cost": [], "executors": [],
                           "threads": torch.get_num_threads()}
    for name in args.models:
        model, train, test, x = original(args.data, name)
        if args.ft_train_limit:
            FT_TRAIN[id(train)] = ft_loader(args.data, args.ft_train_limit)
        base_acc = evaluate(model, test)["acc"]
        test_scores(model, train, test, 0)  # fixes the rows' BN batches before anything reads the loader
        base_macs = amc.count(model, x)[0]
        score = proxy(train, args.proxy_finetune_steps, args.proxy_holdout_batches)
        if args.ray or args.ray_only:
            out["executors"] += [{"model": name, **e} for e in
                                 executor_cost(model, x, train, score, args.compressors[0], args.targets[0])]
            print(json.dumps(out["executors"]), flush=True)
        for target in [] if args.ray_only else args.targets:
            for comp in args.compressors:
                if args.skip_uniform:
                    net = None
                else:
                    net, policy = uniform_net(model, x, train, comp, target, compressor_options(args, comp))
                row = None if net is None else {
                       "model": name, "target": target, "compressor": comp, "tuner": "uniform", "seed": None,
                       "policy": policy,
                       "macs_ratio": amc.count(net, x)[0] / base_macs, "proxy": score(net),
                       **test_scores(net, train, test, args.ft_epochs), "original_acc": base_acc}
                if row is not None:
                    out["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "policy"}), flush=True)
                for tuner in args.tuners:
                    for seed in args.seeds:
                        t = make_tuner(tuner, args.evaluations, seed, pop_size=args.pop_size,
                                       **start_policies(args, tuner))
                        load0 = os.getloadavg()[0]
                        t0 = time.perf_counter()
                        res = t.search(model, example_inputs=(x,), target_macs=target, compressor=comp,
                                       evaluate=score, calibration=train, progress=False,
                                       compressor_options=compressor_options(args, comp),
                                       holdout_batches=args.proxy_holdout_batches,
                                       rerank=args.rerank, rerank_steps=args.rerank_steps,
                                       rerank_batches=args.rerank_batches)
                        wall = time.perf_counter() - t0
                        row = {"model": name, "target": target, "compressor": comp, "tuner": tuner, "seed": seed,
                               "macs_ratio": res.macs_ratio, "proxy": res.score, "policy": res.policy,
                               **test_scores(res.net, train, test, args.ft_epochs), "original_acc": base_acc,
                               "evaluations": len(res.history),
                               "distinct": sum(not h["cached"] for h in res.history)}
                        if args.rerank:  # what the search's own best would have scored, for the comparison
                            row["rerank"] = [{k: v for k, v in r.items() if k != "policy"} for r in res.info["rerank"]]
                            plain = res.info["rerank"][0]
                            row["pick_changed"] = plain["policy"] != res.policy
                            if not row["pick_changed"]:
                                row["plain_after_ft"] = row["after_ft"]
                            else:
                                sp = build_space(model, (x,), target, comp, calibration=train,
                                                 compressor_options=compressor_options(args, comp))
                                row["plain_after_ft"] = test_scores(sp.compress(sp.vector(plain["policy"])), train,
                                                                    test, args.ft_epochs)["after_ft"]
                        out["rows"].append(row)
                        out["cost"].append({"model": name, "compressor": comp, "tuner": tuner, "seed": seed,
                                            "target": target, "wall_s": wall, "evaluations": len(res.history),
                                            "load_avg_1m": [load0, os.getloadavg()[0]]})
                        print(json.dumps({k: v for k, v in row.items() if k != "policy"}), flush=True)
                        if tuner == "random" and seed == args.seeds[0] and args.spearman and target == args.targets[0]:
                            out["spearman"][f"{name}/{comp}/{target}"] = spearman(res, model, x, train, test, comp,
                                                                                  args.ft_epochs,
                                                                                  compressor_options(args, comp))
                        if tuner == "ddpg" and seed == args.seeds[0]:
                            tag = f"_{args.tag}" if args.tag else ""
                            res.plot(str(RESULTS / f"tuners_{args.data}{tag}_{name}_{comp}_{target}_ddpg.png"))
    return out


def executor_cost(model, x, train, score, comp: str, target: float, n: int = 24) -> List[Dict[str, Any]]:
    """Evaluations per second of the same random search (batches of 2) in-process and on 2 Ray workers."""
    from amc.tuners import RandomSearch

    rows, histories = [], {}
    for executor in ("local", "ray"):
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = RandomSearch(samples=n, seed=0, batch=2).search(model, example_inputs=(x,), target_macs=target,
                                                              compressor=comp, evaluate=score, calibration=train,
                                                              progress=False, executor=executor, workers=2)
        wall = time.perf_counter() - t0
        histories[executor] = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
        rows.append({"executor": executor, "compressor": comp, "evaluations": n, "wall_s": wall,
                     "load_avg_1m": [load0, os.getloadavg()[0]]})
    for r in rows:
        r["same_history_as_local"] = histories[r["executor"]] == histories["local"]
    return rows


def distinct_policies(history: List[Dict[str, Any]], limit: int) -> List[Dict[str, Any]]:
    """The first `limit` successfully evaluated history entries with distinct policies, in search order."""
    seen, picked = set(), []
    for h in history:
        key = tuple(sorted(h["policy"].items()))
        if h["status"] == "ok" and key not in seen and len(picked) < limit:
            seen.add(key)
            picked.append(h)
    return picked


def spearman(res, model, x, train, test, comp: str, ft_epochs: int, options: Dict[str, Any],
             limit: int = 24) -> Dict[str, Any]:
    from scipy.stats import spearmanr

    space = build_space(model, (x,), res.target_macs, comp, calibration=train, compressor_options=options)
    adaptive_bn = proxy(train)  # the plain proxy, beside
    proxies, tuned, plain = [], [], []
    for h in distinct_policies(res.history, limit):
        net = space.compress(space.vector(h["policy"]))
        proxies.append(h["score"])
        plain.append(adaptive_bn(net))
        tuned.append(test_scores(net, train, test, ft_epochs)["after_ft"])
    rho, p = spearmanr(proxies, tuned)
    rho_bn, p_bn = spearmanr(plain, tuned)
    return {"n": len(proxies), "rho": float(rho), "p": float(p), "proxy": proxies, "after_ft": tuned,
            "adaptive_bn": plain, "rho_adaptive_bn": float(rho_bn), "p_adaptive_bn": float(p_bn)}


def _ms(vals: List[float]) -> str:
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"


def render(out: Dict[str, Any]) -> str:
    a = out["args"]
    lines = [f"# Tuners benchmark ({a['data']})", "",
             f"`python scripts/bench_tuners.py --data {a['data']} --models {' '.join(a['models'])} --targets "
             f"{' '.join(map(str, a['targets']))} --compressors {' '.join(a['compressors'])} --evaluations "
             f"{a['evaluations']} --seeds {' '.join(map(str, a['seeds']))} --ft-epochs {a['ft_epochs']}"
             + (f" --ft-train-limit {a['ft_train_limit']}" if a.get("ft_train_limit") else "")
             + ("" if a.get("spearman", True) else " --no-spearman")
             + (f" --proxy-finetune-steps {a['proxy_finetune_steps']}" if a.get("proxy_finetune_steps") else "")
             + (f" --proxy-holdout-batches {a['proxy_holdout_batches']}" if a.get("proxy_holdout_batches", 8) != 8
                else "")
             + (f" --rerank {a['rerank']} --rerank-steps {a['rerank_steps']} --rerank-batches {a['rerank_batches']}"
                if a.get("rerank") else "")
             + (f" --channel-calibration {a['channel_calibration']}" if "channel" in a["compressors"]
                and a.get("channel_calibration", 0.1) != 0.1 else "") + (" --ray-only" if a.get("ray_only") else "")
             + (f" --tuners {' '.join(a['tuners'])}" if a.get("tuners", list(TUNERS)) != list(TUNERS) else "")
             + (f" --initial-uniform {a['initial_uniform']}" if a.get("initial_uniform") is not None else "")
             + (f" --initial-uniform-count {a['initial_uniform_count']}" if a.get("initial_uniform_count") else "")
             + (" --skip-uniform" if a.get("skip_uniform") else "") + "`", "",
             *([out["note"], ""] if out.get("note") else []),
             *([(f"The first {a['initial_uniform_count']} policies of GA's first generation and of DDPG's warm-up"
                 if a.get("initial_uniform_count") else f"GA's first generation ({a['pop_size']} policies) and "
                 f"DDPG's warm-up episodes ({a['evaluations'] // 3})")
                + ": the uniform policy and copies of it with every ratio "
                f"moved by N(0, {a['initial_uniform']}) (clipped to the space; repaired to the budget like every "
                "candidate), not uniformly random policies" + (" (the others are)" if a.get("initial_uniform_count") else "")
                + ".", ""] if a.get("initial_uniform") is not None else []),
             f"Every search evaluates {a['evaluations']} policies (DDPG: episodes, warm-up a third; GA: "
             f"{a['evaluations'] // a['pop_size']} generations x {a['pop_size']}; random: samples). "
             f"Proxy = accuracy on {a.get('proxy_holdout_batches', 8)} training batches after BN re-estimation on 4 others"
             + (f" and {a['proxy_finetune_steps']} SGD steps (lr 0.01, batch of the loader) on the next "
                f"{a['proxy_finetune_steps']} (a copy trained; `finetune_steps=` of the default evaluator). "
                if a.get("proxy_finetune_steps") else ". ")
             +
             "Test accuracy (%) on the held-out split, after "
             f"BN re-estimation (before FT) and after {a['ft_epochs']} epoch(s) of fine-tuning (lr {FT_LR}"
             + (f", on a fixed {a['ft_train_limit']:,}-image subset of the training set" if a.get("ft_train_limit") else "")
             + "); mean ± std "
             "over the search seeds. MACs = measured MACs / original (amc.count).", "",
             "| model | MACs target | compressor | policy | MACs (measured) | proxy | test before FT | test after FT |",
             "|---|---|---|---|---|---|---|---|"]
    rows = out["rows"]
    if not rows:  # --ray-only: the executor timing alone
        lines = lines[:4]
    keys = list(dict.fromkeys((r["model"], r["target"], r["compressor"]) for r in rows))
    for m, t, c in keys:
        for tuner in ("uniform", *TUNERS):
            rs = [r for r in rows if (r["model"], r["target"], r["compressor"], r["tuner"]) == (m, t, c, tuner)]
            if not rs:
                continue
            macs = f"{min(r['macs_ratio'] for r in rs):.3f}–{max(r['macs_ratio'] for r in rs):.3f}"
            lines.append(f"| {m} | {t} | {c} | {tuner} | {macs} | {_ms([r['proxy'] for r in rs])} | "
                         f"{_ms([r['before_ft'] for r in rs])} | {_ms([r['after_ft'] for r in rs])} |")
    reranked = [r for r in rows if "plain_after_ft" in r]
    if reranked:
        lines += ["", f"Re-ranking (`rerank={a['rerank']}`): each search's {a['rerank']} best distinct policies "
                  f"re-scored after {a['rerank_steps']} SGD steps (lr 0.01) on a copy, on {a['rerank_batches']} "
                  "training batches the search did not score on; test accuracy after FT of the re-ranked pick "
                  "and of the search's own best (the proxy's argmax):", "",
                  "| model | MACs target | compressor | tuner | re-ranked pick | search's best | pick changed |",
                  "|---|---|---|---|---|---|---|"]
        for m, t, c in keys:
            for tuner in TUNERS:
                rs = [r for r in reranked if (r["model"], r["target"], r["compressor"], r["tuner"]) == (m, t, c, tuner)]
                if rs:
                    changed = sum(r["pick_changed"] for r in rs)
                    lines.append(f"| {m} | {t} | {c} | {tuner} | {_ms([r['after_ft'] for r in rs])} | "
                                 f"{_ms([r['plain_after_ft'] for r in rs])} | {changed} of {len(rs)} |")
    if rows:
        lines += ["", "Original accuracy: " + ", ".join(sorted({f"{r['model']} {100 * r['original_acc']:.2f}%"
                                                                 for r in rows}))]
    if out["spearman"]:
        lines += ["", "Proxy vs fine-tuned test accuracy (distinct policies of the first random search):", "",
                  "| search | policies | Spearman rho | p | rho, p of adaptive BN alone (same policies) |",
                  "|---|---|---|---|---|"]
        for k, s in out["spearman"].items():
            lines.append(f"| {k} | {s['n']} | {s['rho']:.3f} | {s['p']:.2g} | "
                         + (f"{s['rho_adaptive_bn']:.3f}, {s['p_adaptive_bn']:.2g}" if "rho_adaptive_bn" in s else "-")
                         + " |")
    loads = [x for c in out["cost"] + out.get("executors", []) for x in c["load_avg_1m"]]
    threads = out.get("threads", 1)
    quiet = bool(loads) and max(loads) <= threads + QUIET_MARGIN
    where = (f"measured with nothing else running (the benchmark's own {threads} thread(s) hold the 1-min load "
             f"average near {threads})" if quiet else
             "**measured on a shared 2-core machine under load** (not a clean timing, for orders of magnitude only)")
    if out["cost"]:
        lines += ["", f"Search wall time{' (the re-ranking included)' if a.get('rerank') else ''}, {where}; "
                  "1-min load average before/after beside each:", "",
                  "| model | compressor | tuner | seed | target | evaluations | wall (s) | eval/s | load avg |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in out["cost"]:
            lines.append(f"| {c['model']} | {c['compressor']} | {c['tuner']} | {c['seed']} | {c['target']} | "
                         f"{c['evaluations']} | {c['wall_s']:.1f} | {c['evaluations'] / c['wall_s']:.2f} | "
                         f"{c['load_avg_1m'][0]:.1f}/{c['load_avg_1m'][1]:.1f} |")
    if out.get("executors"):
        lines += ["", f"Evaluations per second, in-process vs 2 Ray workers (random search, batches of 2; {where}):",
                  "",
                  "| model | executor | compressor | evaluations | wall (s) | eval/s | same history as local | "
                  "load avg |", "|---|---|---|---|---|---|---|---|"]
        for e in out["executors"]:
            lines.append(f"| {e.get('model', '-')} | {e['executor']} | {e['compressor']} | {e['evaluations']} | {e['wall_s']:.1f} | "
                         f"{e['evaluations'] / e['wall_s']:.2f} | {e['same_history_as_local']} | "
                         f"{e['load_avg_1m'][0]:.1f}/{e['load_avg_1m'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def save(stem: Path, out: Dict[str, Any], render_fn, measured: bool = True) -> None:
    """`stem`.json (the measurements, unless only re-rendered) and `stem`.md (their table), each written
    atomically; the table printed."""
    if measured:
        with atomic_write(str(stem) + ".json", "w") as f:
            json.dump(out, f, indent=1)
    with atomic_write(str(stem) + ".md", "w") as f:
        f.write(render_fn(out))
    print(render_fn(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", choices=("digits", "fashion_mnist"))
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--compressors", nargs="+", default=["prune"], choices=("prune", "channel"))
    p.add_argument("--tuners", nargs="+", default=list(TUNERS), choices=TUNERS)
    p.add_argument("--evaluations", type=int, default=40)
    p.add_argument("--pop-size", type=int, default=10)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ft-epochs", type=int, default=FT_EPOCHS)
    p.add_argument("--ft-train-limit", type=int, default=None,
                   help="fine-tune every row on this many training images (default: all of them)")
    p.add_argument("--channel-calibration", type=float, default=0.1,
                   help="compressor 'channel': share of the training set ChannelPruning samples and refits on "
                        "(its trainset_ratio; default 0.1 as the library's)")
    p.add_argument("--proxy-finetune-steps", type=int, default=0,
                   help="the proxy also takes this many SGD steps on a copy before scoring (default 0: adaptive "
                        "BN only)")
    p.add_argument("--proxy-holdout-batches", type=int, default=8,
                   help="the proxy scores accuracy on this many training batches after the 4 BN ones (default 8; "
                        "more = less noise between near-equal policies, e.g. after LASSO's least-squares refit)")
    p.add_argument("--skip-uniform", action="store_true", help="searches only (to finish a split run)")
    p.add_argument("--no-spearman", dest="spearman", action="store_false")
    p.add_argument("--ray", action="store_true", help="also time 24 evaluations in-process vs on 2 Ray workers")
    p.add_argument("--ray-only", action="store_true", help="only the in-process vs Ray timing (no searches)")
    p.add_argument("--rerank", type=int, default=0,
                   help="re-score each search's best K policies after --rerank-steps SGD steps on a copy, on "
                        "--rerank-batches other training batches, and keep the best (search(rerank=K)); the "
                        "table then also shows the search's own best after FT")
    p.add_argument("--rerank-steps", type=int, default=100)
    p.add_argument("--rerank-batches", type=int, default=32)
    p.add_argument("--initial-uniform", type=float, default=None, metavar="SIGMA",
                   help="GA's first generation and DDPG's warm-up episodes: the uniform policy and copies with "
                        "each ratio moved by N(0, SIGMA) (initial='uniform', initial_sigma=SIGMA), instead of "
                        "uniformly random policies")
    p.add_argument("--initial-uniform-count", type=int, default=None, metavar="N",
                   help="with --initial-uniform: only the first N policies start near uniform, the rest random")
    p.add_argument("--tag", default=None, help="suffix of the result files")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="TAG",
                   help="join the JSON of runs with these tags (e.g. one process per model) into --tag's files")
    args = p.parse_args()
    if args.proxy_holdout_batches < 1:  # 0 would silently fall back to the evaluator's default of 4
        p.error(f"--proxy-holdout-batches must be >= 1, got {args.proxy_holdout_batches}")
    if args.models is None:
        args.models = ["digits_resnet"] if args.data == "digits" else ["resnet20", "vgg_small"]
    stem = RESULTS / f"tuners_{args.data}{'_' + args.tag if args.tag else ''}"
    if args.merge:
        parts = [json.loads(Path(f"{RESULTS}/tuners_{args.data}_{t}.json").read_text()) for t in args.merge]
        out = {"args": {**parts[0]["args"], "models": [m for q in parts for m in q["args"]["models"]]},
               "rows": [], "spearman": {}, "cost": [], "executors": []}
        for q in parts:
            out["rows"] += q["rows"]
            out["cost"] += q["cost"]
            out["executors"] += q.get("executors", [])
            out["spearman"].update(q["spearman"])
    elif args.render_only:
        out = json.loads(Path(str(stem) + ".json").read_text())
    else:
        RESULTS.mkdir(exist_ok=True)
        out = run(args)
    save(stem, out, render, measured=not args.render_only)


if __name__ == "__main__":
    main()
