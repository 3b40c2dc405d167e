"""`amc search`: train a zoo model, search per-layer ratios under a MACs budget, write policy, history, plot.

    amc search --tuner ddpg --compressor prune --target-macs 0.5             # digits_resnet on digits
    amc search --tuner ga --compressor channel --target-macs 0.3 --data fashion_mnist --model resnet20
    amc compress --policy out/search/policy.json                             # compress with the policy

The proxy score is accuracy on 8 training batches after BN re-estimation on 4 others (the validation
split is never used for the choice; the training images were seen by the original, so the proxy is
optimistic in level but is only used to rank policies). Writes `<out>/policy.json`, `<out>/history.json`,
`<out>/search.png` and, with --checkpoint, resumes an interrupted search from `<out>/search.ckpt`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from ..errors import LoadError, PruningError

HELP = "search per-layer compression ratios (DDPG, GA, random) under a MACs budget; writes policy JSON and plot"
COMPRESSORS = ("prune", "channel", "lowrank")


def configure(p: argparse.ArgumentParser) -> None:
    # no choices= from the registry here: that would import torch for every `amc --help`; get_tuner
    # checks the name when the job runs and lists the registered tuners
    p.add_argument("--tuner", default="ddpg", help="registered tuner: ddpg, ga or random (default: ddpg)")
    p.add_argument("--compressor", default="prune", choices=COMPRESSORS,
                   help="prune (L2 magnitude), channel (LASSO + least squares) or lowrank (default: prune)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="MACs kept, a fraction in (0, 1) (default: 0.5, or none with --target-latency)")
    p.add_argument("--target-latency", type=float, default=None,
                   help="batch-1 latency kept, a fraction in (0, 1), as per-layer latency tables timed here predict "
                        "it (prune/channel compressors; the best network is then timed)")
    p.add_argument("--data", default="digits", choices=("digits", "fashion_mnist"), help="dataset (default: digits)")
    p.add_argument("--model", default="digits_resnet", help="amc.models zoo name (default: digits_resnet)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the original (default: 10)")
    p.add_argument("--evaluations", type=int, default=300,
                   help="policies evaluated: DDPG episodes, GA generations x population, random samples (default: 300)")
    p.add_argument("--warmup", type=int, default=None, help="DDPG warm-up episodes (default: a third of the episodes)")
    p.add_argument("--pop-size", type=int, default=20, help="GA population (default: 20)")
    p.add_argument("--start", default="random", choices=("random", "uniform"),
                   help="DDPG's warm-up episodes and GA's first generation: random policies (default) or the "
                        "uniform policy and copies moved by N(0, --start-sigma)")
    p.add_argument("--start-sigma", type=float, default=0.1, help="spread of --start uniform (default: 0.1)")
    p.add_argument("--start-count", type=int, default=None, metavar="N",
                   help="with --start uniform: only the first N policies start near uniform, the rest random "
                        "(default: all)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="the proxy takes this many SGD steps on a copy of each candidate before scoring (default 0: "
                        "BN re-estimation only, which ranked better on resnet20 at 0.3x than 30 steps; README, Tuners)")
    p.add_argument("--rerank", type=int, default=0,
                   help="re-score the K best policies after --rerank-steps SGD steps on a copy, on 32 other training "
                        "batches, and keep the best by that score (default 0: the proxy's best)")
    p.add_argument("--rerank-steps", type=int, default=100, help="SGD steps of each re-ranked copy (default: 100)")
    p.add_argument("--rerank-batches", type=int, default=32,
                   help="training batches each re-ranked copy is scored on (default: 32)")
    p.add_argument("--max-ratio", type=float, default=0.8, help="largest fraction removed per layer (default: 0.8)")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="where candidates are evaluated")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images (fashion_mnist)")
    p.add_argument("--out", default=os.path.join("out", "search"), help="output folder (default: out/search)")
    p.add_argument("--checkpoint", action="store_true", help="checkpoint to <out>/search.ckpt and resume from it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_tuner(name: str, evaluations: int, seed: int, warmup: Optional[int] = None, pop_size: int = 20,
               parallel: int = 1, initial: Union[str, Sequence[Mapping[str, float]]] = (),
               initial_sigma: float = 0.1, initial_count: Optional[int] = None) -> Any:
    """A registered tuner sized to about `evaluations` evaluated policies; `initial` ("uniform" or
    policies) starts DDPG's warm-up or GA's first generation (its first `initial_count` policies)."""
    from ..tuners import get_tuner

    cls = get_tuner(name)
    if name == "ddpg":
        return cls(episodes=evaluations, warmup=evaluations // 3 if warmup is None else warmup, seed=seed,
                   parallel_episodes=parallel, initial=initial, initial_sigma=initial_sigma,
                   initial_count=initial_count)
    if name == "ga":
        return cls(generations=max(1, evaluations // pop_size), pop_size=pop_size, seed=seed, initial=initial,
                   initial_sigma=initial_sigma, initial_count=initial_count)
    if name == "random":
        return cls(samples=evaluations, seed=seed, batch=parallel)
    return cls(seed=seed)


def search_job(ns: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from ..jobs.compress import _loaders, _model, check_run_options
    from ..models import train_classifier
    from ..tuners.evaluation import default_evaluator
    from ..tuners.rerank import check_rerank

    latency = getattr(ns, "target_latency", None)
    if ns.target_macs is None and latency is None:
        ns.target_macs = 0.5
    if ns.target_macs is not None and not 0.0 < ns.target_macs < 1.0:
        raise PruningError(f"--target-macs is the fraction of MACs kept and must be in (0, 1), got {ns.target_macs}")
    if ns.evaluations < 1:
        raise PruningError("--evaluations must be >= 1")
    if ns.workers < 1:
        raise PruningError(f"--workers must be >= 1, got {ns.workers}")
    check_run_options(ns)
    if getattr(ns, "finetune_steps", 0) < 0:
        raise PruningError(f"--finetune-steps must be >= 0, got {ns.finetune_steps}")
    check_rerank(getattr(ns, "rerank", 0), getattr(ns, "rerank_steps", 100), getattr(ns, "rerank_batches", 32))
    start = getattr(ns, "start", "random")
    if getattr(ns, "start_sigma", 0.1) < 0:
        raise PruningError(f"--start-sigma must be >= 0, got {ns.start_sigma}")
    start_count = getattr(ns, "start_count", None)
    if start_count is not None and start != "uniform":
        raise PruningError(f"--start-count {start_count} needs --start uniform")
    if start_count is not None and start_count < 1:
        raise PruningError(f"--start-count must be >= 1, got {start_count}")
    tuner = make_tuner(ns.tuner, ns.evaluations, ns.seed, ns.warmup, ns.pop_size,  # a bad name fails before training
                       parallel=ns.workers if ns.executor == "ray" else 1,
                       initial="uniform" if start == "uniform" else (), initial_sigma=getattr(ns, "start_sigma", 0.1),
                       initial_count=start_count)
    threads = torch.get_num_threads()
    if ns.data == "digits":
        torch.set_num_threads(1)  # tiny models: one thread is faster and leaves the other core alone
    try:
        cfg = argparse.Namespace(model=ns.model, data=ns.data, seed=ns.seed, train_limit=ns.train_limit)
        model, size = _model(cfg)
        train, val = _loaders(cfg, size)
        train_classifier(model, train, val, epochs=ns.epochs, seed=ns.seed)
        model.eval()
        x1 = next(iter(val))[0][:1]
        # the proxy: BN re-estimated on 4 training batches, accuracy on the next 8 (never the val split),
        # after --finetune-steps SGD steps on the batches after those
        score = default_evaluator(train, None, bn_batches=4, holdout_batches=8,
                                  finetune_steps=getattr(ns, "finetune_steps", 0))
        os.makedirs(ns.out, exist_ok=True)
        ckpt = os.path.join(ns.out, "search.ckpt") if ns.checkpoint else None
        res = tuner.search(model, example_inputs=(x1,), target_macs=ns.target_macs, target_latency=latency,
                           compressor=ns.compressor,
                           evaluate=score, calibration=train, max_ratio=ns.max_ratio, executor=ns.executor,
                           workers=ns.workers, checkpoint=ckpt, resume=True if ckpt else None,
                           progress=not ns.no_progress, holdout_batches=8, rerank=getattr(ns, "rerank", 0),
                           rerank_steps=getattr(ns, "rerank_steps", 100),
                           rerank_batches=getattr(ns, "rerank_batches", 32))
    finally:
        torch.set_num_threads(threads)
    res.info.update(model=ns.model, data=ns.data, epochs=ns.epochs, seed=ns.seed)
    files = [res.to_json(os.path.join(ns.out, "policy.json")), res.save_history(os.path.join(ns.out, "history.json")),
             res.plot(os.path.join(ns.out, "search.png"))]
    lat = res.info.get("latency")
    print(f"best policy: proxy score {res.score:.4f}, MACs {res.macs_ratio:.3f}x of the original "
          + (f"latency {lat['measured']:.3f}x measured ({lat['predicted']:.3f}x predicted) " if lat else "")
          + f"({len(res.history)} policies evaluated)")
    for k, v in res.policy.items():
        print(f"  {k:<40} {v:.3f}")
    print("wrote " + ", ".join(files))
    return {"result": res, "files": files}


def run_from_args(ns: argparse.Namespace) -> int:
    search_job(ns)
    return 0


def load_policy(path: str) -> Dict[str, Any]:
    """A policy JSON written by `amc search` / `SearchResult.to_json`."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read the policy file {path!r}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("policy"), dict) or "compressor" not in doc:
        raise LoadError(f"{path!r} is not a policy file of `amc search` (needs 'policy' and 'compressor')")
    return doc


def compress_with_policy(ns: argparse.Namespace, net: Any, train: Any, x1: Any) -> Any:
    """`amc compress --policy`: the compressor the policy was searched with, at its per-layer ratios.
    Sets `ns.method` / `ns.target_macs` so the job's table and budget check describe the policy."""
    doc = load_policy(ns.policy)
    policy, kind = doc["policy"], doc["compressor"]
    ns.target_macs = float(doc["target_macs"])
    opts = dict(doc.get("compressor_options") or {})
    if kind == "prune":
        from ..compressors.prune import prune

        ns.method = doc.get("criterion") or "l2"
        return prune(net, ratio=policy, criterion=ns.method, example_inputs=(x1,), ignore=doc.get("ignore", ()))
    if kind == "channel":
        from ..compressors.channel_pruning import ChannelPruning

        ns.method = "channel_pruning"
        return ChannelPruning(net, train, compress_ratio=policy, example_inputs=(x1,),
                              ignore=doc.get("ignore", ()), **opts).compress()
    if kind == "lowrank":
        from ..compressors.lowrank import LowRankDecomposition

        ns.method = "lowrank"
        return LowRankDecomposition(net, train, compress_ratio=policy, example_inputs=(x1,),
                                    ignore=tuple(doc.get("ignore", ())), **opts).compress()
    raise LoadError(f"{ns.policy!r}: compressor {kind!r} cannot be replayed from a file (a callable)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
