"""The main job: train a zoo model, compress it, fine-tune it, export it, and print before/after.

    python -m amc.jobs.compress                     # digits_resnet on digits, MACs halved by ChannelPruning
    python -m amc.jobs.compress --model vgg_small --data fashion_mnist --method l1 --ratio 0.5

`--ratio` is the fraction of MACs to remove (0.5: the compressed network has <= half the MACs,
checked with `amc.count`). Writes `<out>/compressed.{json,pkl,onnx}` (a format whose exporter fails
is skipped with a logged warning) and `<out>/summary.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..errors import AmcError, PruningError

if TYPE_CHECKING:  # torch is imported when the job runs, so `amc --help` stays fast
    import torch
    import torch.nn as nn

logger = logging.getLogger("amc.jobs.compress")

HELP = "train a zoo model, compress it (channel pruning, l1/l2/fpgm pruning, low-rank), fine-tune, export"
METHODS = ("channel_pruning", "l1", "l2", "fpgm", "lowrank")
DATASETS = ("digits", "fashion_mnist")


def configure(p: argparse.ArgumentParser) -> None:
    """Declare the job's options on `p` (used by `amc compress` and by `run`)."""
    p.add_argument("--model", default="digits_resnet",
                   help="amc.models zoo name: digits_resnet, vgg_small, resnet20 (default: digits_resnet)")
    p.add_argument("--method", default="channel_pruning", choices=METHODS, help="compression method")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of MACs to remove, in (0, 1) (default: 0.5 = halve the MACs)")
    p.add_argument("--data", default="digits", choices=DATASETS, help="dataset (default: digits)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the original model (default: 10)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs after compression (default: 3)")
    p.add_argument("--out", default=os.path.join("out", "compress"), help="output folder (default: out/compress)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--trainset-ratio", type=float, default=0.5,
                   help="fraction of the training batches used to calibrate channel pruning (default: 0.5)")
    p.add_argument("--sampled-pixels", type=int, default=10,
                   help="output positions sampled per image and layer by channel pruning (default: 10)")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images (fashion_mnist)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for the tiny digits models, else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`amc compress`: add this job to an argparse subparsers object."""
    p = subparsers.add_parser("compress", help=HELP, description=HELP)
    configure(p)
    p.set_defaults(_run=run_from_args)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amc compress", description=HELP)
    configure(p)
    return p


# ------------------------------------------------------------------------------------------------


def _loaders(ns: argparse.Namespace, image_size: int):
    from ..data import digits_loaders, fashion_mnist_loaders

    if ns.data == "digits":
        size = None if image_size == 8 else image_size
        return digits_loaders(batch_size=64, image_size=size, seed=ns.seed)
    size = None if image_size == 28 else image_size
    return fashion_mnist_loaders(batch_size=128, train_limit=ns.train_limit, image_size=size, seed=ns.seed)


def _model(ns: argparse.Namespace) -> Any:
    import torch

    from ..models import create, model_info

    native = model_info(ns.model).input_size[-1]
    size = 8 if ns.data == "digits" and ns.model == "digits_resnet" else (28 if ns.data == "fashion_mnist" else native)
    torch.manual_seed(ns.seed)
    try:
        model = create(ns.model, image_size=size)
    except TypeError:  # the constructor has no image_size: it adapts (global pooling)
        model = create(ns.model)
    return model, size


def latency_ms(net: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    """Median CPU latency (ms) of one forward at the batch size of `x`."""
    import torch

    net.eval()
    with torch.no_grad():
        for _ in range(3):
            net(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _compress(ns: argparse.Namespace, net: Any, train, val, x1: torch.Tensor) -> Any:
    from ..compressors.prune import prune

    target = 1.0 - ns.ratio
    if ns.method == "channel_pruning":
        from ..compressors.channel_pruning import ChannelPruning

        cp = ChannelPruning(net, train, val, trainset_ratio=ns.trainset_ratio, sampled_pixels_per_img=ns.sampled_pixels,
                            compress_ratio=0.0, example_inputs=(x1,), seed=ns.seed)
        cp.compress_ratio = cp.uniform_ratio_for_macs(target)
        logger.info("channel pruning: per-group channel ratio %.4f for MACs <= %.2f", cp.compress_ratio, target)
        return cp.compress()
    if ns.method in ("l1", "l2", "fpgm"):
        return prune(net, criterion=ns.method, example_inputs=(x1,), target_macs=target)
    try:
        from ..compressors.lowrank import LowRankDecomposition  # written alongside; may not exist yet
    except ImportError as exc:
        raise PruningError(f"--method lowrank is not available in this build ({exc}); use channel_pruning, "
                           "l1, l2 or fpgm") from exc
    # target_macs: the whole network meets the budget, like the other methods. fold_bn=False keeps each
    # BatchNorm after its split conv: with it folded away the BN-free net diverges when fine-tuned at
    # the job's lr (digits_resnet: NaN at lr 0.02; with BN kept: 97.8% after 3 epochs).
    lr = LowRankDecomposition(origin_net=net, trainloader=train, valloader=val, trainset_ratio=ns.trainset_ratio,
                              sampled_pixels_per_img=ns.sampled_pixels, compress_ratio=ns.ratio,
                              target_macs=1.0 - ns.ratio, fold_bn=False, example_inputs=(x1,), seed=ns.seed)
    return lr.compress()


def _export(net: Any, out: str, x1: torch.Tensor) -> List[str]:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "compressed")
    written: List[str] = []
    for fmt, fn in (("json", lambda: net.save_to_json(file=base + ".json")),
                    ("pkl", lambda: net.save(pkl=base + ".pkl")),
                    ("onnx", lambda: net.save_to_onnx(base + ".onnx", x1))):
        try:
            written.append(str(fn()))
        except ImportError as exc:
            logger.warning("skipped the %s export: its exporter is not available (%s)", fmt, exc)
        except Exception as exc:  # noqa: BLE001 - one exporter's gap must not lose the others
            logger.warning("skipped the %s export: %s: %s", fmt, type(exc).__name__, exc)
    return written


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = f"{'':<30} {'params':>10} {'MACs':>12} {'val acc':>8} {'latency b1 (ms)':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lat = f"{r['latency_ms']:.3f}" if r.get("latency_ms") is not None else "-"
        lines.append(f"{r['name']:<30} {r['params']:>10,} {r['macs']:>12,} {100 * r['acc']:>7.2f}% {lat:>16}")
    return "\n".join(lines)


def compress_job(ns: argparse.Namespace) -> Dict[str, Any]:
    """Run the job for parsed options; returns the summary (also written to `<out>/summary.json`)."""
    import torch

    from ..graph.capture import trace
    from ..graph.counting import count
    from ..models import evaluate, train_classifier

    if not 0.0 < ns.ratio < 1.0:
        raise PruningError(f"--ratio is the fraction of MACs to remove and must be in (0, 1), got {ns.ratio}")
    if ns.epochs < 1 or ns.finetune_epochs < 0:
        raise PruningError("--epochs must be >= 1 and --finetune-epochs >= 0")
    threads = ns.threads if ns.threads else (1 if ns.data == "digits" else None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # tiny models: one thread is measurably faster on a shared box
    steps = ["train", "compress", "fine-tune", "export", "measure"]
    bar = None
    if not ns.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="amc compress", file=sys.stderr)

    def step(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)

    def done() -> None:
        if bar is not None:
            bar.update(1)

    try:
        model, size = _model(ns)
        train, val = _loaders(ns, size)
        step("train")
        t0 = time.perf_counter()
        res = train_classifier(model, train, val, epochs=ns.epochs, seed=ns.seed)
        logger.info("trained %s for %d epochs in %.1fs: val acc %.4f", ns.model, ns.epochs, res["seconds"], res["acc"])
        done()
        x1 = next(iter(val))[0][:1]
        net = trace(model.eval(), x1)
        step("compress")
        t1 = time.perf_counter()
        small = _compress(ns, net, train, val, x1)
        compress_s = time.perf_counter() - t1
        small.lint()
        macs0, params0 = count(net, x1)
        macs1, params1 = count(small, x1)
        target = (1.0 - ns.ratio) * macs0
        if macs1 > target * 1.0001:
            raise PruningError(f"compressed MACs {macs1:,} exceed the target {target:,.0f} (ratio {ns.ratio})")
        acc_pruned = evaluate(small, val)["acc"]
        done()
        step("fine-tune")
        acc_ft = acc_pruned
        if ns.finetune_epochs > 0:
            acc_ft = train_classifier(small, train, val, epochs=ns.finetune_epochs, lr=0.02, seed=ns.seed)["acc"]
        done()
        step("export")
        small.eval()
        files = _export(small, ns.out, x1)
        done()
        step("measure")
        acc0 = evaluate(net, val)["acc"]
        lat0, lat1 = latency_ms(net, x1), latency_ms(small, x1)
        done()
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(old_threads)
    rows = [
        {"name": f"before ({ns.model})", "params": params0, "macs": macs0, "acc": acc0, "latency_ms": lat0},
        {"name": f"after {ns.method} (no FT)", "params": params1, "macs": macs1, "acc": acc_pruned, "latency_ms": None},
        {"name": f"after {ns.method} + FT", "params": params1, "macs": macs1, "acc": acc_ft, "latency_ms": lat1},
    ]
    table = format_table(rows)
    summary = {"model": ns.model, "method": ns.method, "data": ns.data, "ratio": ns.ratio, "rows": rows,
               "macs_fraction": macs1 / macs0, "compress_seconds": compress_s,
               "total_seconds": time.perf_counter() - t0, "files": files, "table": table}
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "table"}, f, indent=2)
    summary["files"].append(os.path.join(ns.out, "summary.json"))
    print(table)
    print(f"MACs {macs1 / macs0:.3f}x of the original; compressed in {compress_s:.1f}s; wrote "
          + ", ".join(summary["files"]))
    return summary


def run_from_args(ns: argparse.Namespace) -> int:
    """Entry point for `amc compress` (cli.py): run the job, return the exit code."""
    compress_job(ns)
    return 0


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse `argv` (default: sys.argv[1:]) and run the job; returns the summary dict."""
    ns = build_parser().parse_args(argv)
    return compress_job(ns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        run(argv)
    except AmcError as exc:
        print(f"amc compress: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
