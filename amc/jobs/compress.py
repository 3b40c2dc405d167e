"""The main job: train a zoo model, compress it, fine-tune it, export it, and print before/after.

    amc compress                                    # digits_resnet on digits, MACs halved by ChannelPruning
    amc compress --data fashion_mnist               # the same on Fashion-MNIST (minutes, see the README)
    amc compress --model vgg_small --data fashion_mnist --method l1 --target-macs 0.5

`--target-macs` is the fraction of the whole network's MACs kept (0.5: the compressed network has
<= half the MACs, checked with `amc.count`), as `target_macs` means everywhere in the API; the old
`--ratio` (fraction removed) still works with a deprecation warning. Writes
`<out>/compressed.{json,safetensors,pkl,onnx}` (a format whose exporter fails is skipped with a logged
warning) and `<out>/summary.json`; `--export vnmodel` adds `compressed.vnmodel`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import AmcError, DataError, LoadError, PruningError

if TYPE_CHECKING:  # torch is imported when the job runs, so `amc --help` stays fast
    import torch
    import torch.nn as nn

logger = logging.getLogger("amc.jobs.compress")

HELP = "train a zoo model, compress it (channel pruning, criterion pruning, low-rank), fine-tune, export"


class MethodChoices:
    """`--method` choices: channel_pruning, lowrank and every criterion in amc.compressors.criteria.CRITERIA.

    The registry is read when argparse checks a value or prints help, not when the parser is built: a
    criterion registered before the job runs is a method without editing this file, and `amc --help`
    does not import torch."""

    def names(self) -> Tuple[str, ...]:
        from ..compressors.criteria import CRITERIA

        return ("channel_pruning", "channel", *CRITERIA, "lowrank", "tokens", *QUANT_METHODS)

    def __contains__(self, name: object) -> bool:
        """One method, or a chain `a,b` whose last step may quantise (`channel,quant`)."""
        if not isinstance(name, str):
            return False
        steps = name.split(",")
        known = self.names()
        return all(s in known for s in steps)  # the order (quantisation last) is checked with a message

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


#: methods that quantise instead of removing MACs; they come last in a chain (`--method channel,quant`)
QUANT_METHODS = ("quant", "pq")
METHODS = MethodChoices()
#: ViTs train and fine-tune with AdamW (SGD leaves vit_digits at 65%); (lr, fine-tune lr, weight decay)
VIT_OPTIM = (3e-3, 1e-4, 0.05)


def _is_vit(model: str) -> bool:
    return model.startswith("vit")
DATASETS = ("digits", "fashion_mnist")
EXTRA_EXPORTS = ("vnmodel",)
#: Per-dataset defaults of the options left unset, chosen so the job finishes on a 2-core CPU (digits: under
#: a minute; Fashion-MNIST: minutes at >= 90% test accuracy, see the README). One torch thread: these small
#: models gain little from a second one, and on a shared machine it stalls waiting for a busy core. The
#: Calibration uses few of Fashion-MNIST's 469 batches. NHWC (channels_last) training is ~1.5x faster on
#: CPU but off: with torch 2.14.1, fine-tuning pruned resnet20s in NHWC one after another aborted with heap
#: corruption in backward ("free(): invalid next size", reproduced at the 6th of 8), never in NCHW.
DATA_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": {"epochs": 10, "finetune_epochs": 3, "trainset_ratio": 0.5, "threads": 1, "channels_last": False},
    "fashion_mnist": {"epochs": 4, "finetune_epochs": 2, "trainset_ratio": 0.05, "threads": 1,
                      "channels_last": False},
}


def _per_data(option: str) -> str:
    return ", ".join(f"{v[option]} on {k}" for k, v in DATA_DEFAULTS.items())


# Written out so that `--help` imports no torch; tests/test_cli.py checks it names every registered model.
MODEL_HELP = ("amc.models zoo name: digits_resnet, resnet20, vgg_small (CNNs); vit_digits, vit_fashion (ViTs, "
              "for --method tokens) (default: digits_resnet)")


def configure(p: argparse.ArgumentParser) -> None:
    """Declare the job's options on `p` (used by `amc compress` and by `run`)."""
    p.add_argument("--model", default="digits_resnet", help=MODEL_HELP)
    p.add_argument("--method", default="channel_pruning", choices=METHODS, metavar="METHOD",
                   help="compression method: %(choices)s (a criterion name prunes with amc.prune; tokens: APT "
                        "token pruning of a ViT such as vit_digits; quant: INT8 post-training quantisation; pq: "
                        "product quantisation); chain with commas, quantisation last: channel,quant")
    p.add_argument("--bits", type=int, default=8,
                   help="--method quant: weight bits (8: INT8 kernels in onnxruntime; 2-7: smaller codes); "
                        "activations are 8-bit")
    p.add_argument("--weight-observer", choices=["minmax", "mse"], default="minmax",
                   help="--method quant: weight grid per channel (mse clips outliers: less weight error at 4 bits "
                        "and below)")
    p.add_argument("--apt-epochs", type=int, default=2, help="--method tokens: APT training epochs (agents + model)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="fraction of the whole network's MACs kept, in (0, 1); 0.5 halves them (default: 0.5)")
    p.add_argument("--target-latency", type=float, default=None,
                   help="criterion methods (l1, l2, ...): fraction of the original's measured batch-1 latency "
                        "kept, in (0, 1), instead of a MACs budget (timed on this machine; see amc.latency_table)")
    p.add_argument("--latency-allocation", choices=("uniform", "layers", "auto"), default="uniform",
                   help="--target-latency: one ratio for every layer (uniform), per-layer ratios from per-layer "
                        "latency tables (layers: channels go where they buy the most milliseconds), or both and the "
                        "one whose outputs stay closer to the original's on training batches (auto)")
    p.add_argument("--ratio", type=float, default=None,
                   help="deprecated: fraction of MACs removed, i.e. 1 - --target-macs; use --target-macs")
    p.add_argument("--data", default="digits", choices=DATASETS, help="dataset")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs of the original model (default: {_per_data('epochs')})")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"fine-tuning epochs after compression (default: {_per_data('finetune_epochs')})")
    p.add_argument("--original", default=None, metavar="PATH",
                   help="start from these weights of --model (a state_dict saved with torch.save, e.g. the cached "
                        "originals of scripts/fashion_originals.py in ~/.cache/amc_bench) instead of training")
    p.add_argument("--out", default=os.path.join("out", "compress"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--trainset-ratio", type=float, default=None,
                   help="fraction of the training batches used to calibrate channel pruning and low-rank "
                        f"(default: {_per_data('trainset_ratio')})")
    p.add_argument("--sampled-pixels", type=int, default=10,
                   help="output positions sampled per image and layer by channel pruning")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images (fashion_mnist)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1; small models gain little from more, and a shared machine's "
                        "busy core stalls them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the stage lines stay)")
    p.add_argument("--policy", default=None,
                   help="policy JSON of `amc search`: its compressor and per-layer ratios replace --method and "
                        "--target-macs")
    p.add_argument("--export", action="append", choices=EXTRA_EXPORTS, default=[],
                   help="also write <out>/compressed.vnmodel: an ONNX Runtime ORT file at the data's image size "
                        "(the seed's save_to_vnmodel; not Venus's own format)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`amc compress`: add this job to an argparse subparsers object."""
    from ..cli import HelpFormatter

    p = subparsers.add_parser("compress", help=HELP, description=HELP, formatter_class=HelpFormatter)
    configure(p)
    p.set_defaults(_run=run_from_args)
    return p


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    p = argparse.ArgumentParser(prog="amc compress", description=HELP, formatter_class=HelpFormatter)
    configure(p)
    return p


def resolve_options(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-dataset defaults and turn the deprecated `--ratio` into `--target-macs` (in place).

    Raises PruningError on a budget outside (0, 1), or `--ratio` and `--target-macs` that disagree.
    """
    ratio = getattr(ns, "ratio", None)
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise PruningError(f"--ratio is the fraction of MACs removed and must be in (0, 1), got {ratio}; "
                               "better, give --target-macs, the fraction kept (--ratio is deprecated)")
        warnings.warn("amc compress: --ratio (fraction of MACs removed) is deprecated; use --target-macs, the "
                      f"fraction kept: --ratio {ratio:g} is --target-macs {1.0 - ratio:g}", FutureWarning,
                      stacklevel=2)
        if ns.target_macs is not None and abs(ns.target_macs - (1.0 - ratio)) > 1e-9:
            raise PruningError(f"--ratio {ratio} (fraction removed) and --target-macs {ns.target_macs} (fraction "
                               "kept) disagree; give only --target-macs")
        ns.target_macs = 1.0 - ratio
        ns.ratio = None
    latency = getattr(ns, "target_latency", None)
    if latency is not None:
        from ..compressors.criteria import CRITERIA

        if ns.target_macs is not None:
            raise PruningError("give --target-macs or --target-latency, not both")
        if any(m not in CRITERIA for m in ns.method.split(",")) or getattr(ns, "policy", None):
            raise PruningError(f"--target-latency works with the criterion methods ({', '.join(CRITERIA)}), "
                               f"not --method {ns.method}")
        if not 0.0 < latency < 1.0:
            raise PruningError(f"--target-latency is the fraction of the measured latency kept, in (0, 1); got "
                               f"{latency}")
    if ns.target_macs is None:
        ns.target_macs = 0.5
    if getattr(ns, "original", None) and not os.path.isfile(ns.original):
        raise LoadError(f"--original {ns.original!r}: no such file; give a state_dict saved with torch.save or "
                        "safetensors, e.g. scripts/originals/*.safetensors (the benchmarks' Fashion-MNIST originals)")
    if not 0.0 < ns.target_macs < 1.0:
        raise PruningError(f"--target-macs is the fraction of MACs kept and must be in (0, 1), got "
                           f"{ns.target_macs}; 0.5 halves the MACs")
    defaults = DATA_DEFAULTS[ns.data]
    if getattr(ns, "epochs", None) is None and _is_vit(ns.model):
        ns.epochs = 3 * defaults["epochs"]  # ViTs converge slower (vit_digits: 94% after 30 epochs)
    for option in ("epochs", "finetune_epochs", "trainset_ratio"):
        if getattr(ns, option, None) is None:
            setattr(ns, option, defaults[option])
    if ns.epochs < 1 or ns.finetune_epochs < 0:
        raise PruningError("--epochs must be >= 1 and --finetune-epochs >= 0")
    check_run_options(ns)
    check_method(ns)
    return ns


def check_method(ns: argparse.Namespace) -> None:
    """Method and model that cannot go together, or a --policy file that cannot be read, refused before the
    original is trained (minutes)."""
    if getattr(ns, "policy", None):
        from .search import load_policy

        load_policy(ns.policy)
    steps = ns.method.split(",")
    early = [s for s in steps[:-1] if s in QUANT_METHODS]
    if early:
        order = ",".join([s for s in steps if s not in QUANT_METHODS] + early)
        raise PruningError(f"--method {ns.method}: quantisation ({', '.join(early)}) must be the last step of a "
                           f"chain, e.g. --method {order}")
    if "tokens" in steps:
        import torch

        from ..compressors.tokens.placement import find_blocks
        from ..graph.capture import trace

        model, size = _model(ns)  # untrained: only its structure is read
        try:
            find_blocks(trace(model.eval(), torch.zeros(1, 1, size, size)))  # the zoo's images: 1 channel
        except PruningError as exc:
            raise PruningError(f"--method tokens prunes the tokens of a ViT, and --model {ns.model} is not one "
                               f"({exc}); use --model vit_digits, or vit_fashion with --data fashion_mnist") from None


def check_run_options(ns: argparse.Namespace) -> None:
    """--seed, --threads and --train-limit, refused before any training (out of range they surface as a
    scikit-learn, numpy or torch exception mid-job)."""
    from ..compressors.base import check_seed

    check_seed(ns.seed, "--seed")
    threads = getattr(ns, "threads", None)
    if threads is not None and threads < 0:
        raise PruningError(f"--threads must be >= 1 (or 0: the dataset's default), got {threads}")
    limit = getattr(ns, "train_limit", None)
    if limit is not None and limit < 1:
        raise DataError(f"--train-limit must be >= 1 training images, got {limit}")


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
    if getattr(ns, "policy", None):
        from .search import compress_with_policy

        return compress_with_policy(ns, net, train, x1)

    for method in ns.method.split(","):
        net = _compress_step(ns, method, net, train, val, x1)
    return net


def _compress_step(ns: argparse.Namespace, method: str, net: Any, train, val, x1: torch.Tensor) -> Any:
    from ..compressors.criteria import CRITERIA
    from ..compressors.prune import prune

    target = ns.target_macs
    if method == "quant":
        from ..compressors.quant import Quantization

        return Quantization(net, train, weight_bits=ns.bits, weight_observer=ns.weight_observer,
                            trainset_ratio=ns.trainset_ratio,
                            example_inputs=(x1,), seed=ns.seed).compress()
    if method == "pq":
        from ..compressors.quant import ProductQuantization

        return ProductQuantization(net, train, example_inputs=(x1,), seed=ns.seed).compress()
    if method in ("channel_pruning", "channel"):
        from ..compressors.channel_pruning import ChannelPruning

        cp = ChannelPruning(net, train, val, trainset_ratio=ns.trainset_ratio, sampled_pixels_per_img=ns.sampled_pixels,
                            target_macs=target, example_inputs=(x1,), seed=ns.seed)
        return cp.compress()
    if method in CRITERIA:  # data-driven criteria (apoz, thinet) observe the training batches
        if getattr(ns, "target_latency", None) is not None:
            return prune(net, criterion=method, example_inputs=(x1,), target_latency=ns.target_latency,
                         dataloader=train, latency_allocation=getattr(ns, "latency_allocation", "uniform"))
        return prune(net, criterion=method, example_inputs=(x1,), target_macs=target, dataloader=train)
    if method == "tokens":
        from ..compressors.tokens import TokenPruning

        return TokenPruning(net, train, val, target_macs=target, epochs=ns.apt_epochs, example_inputs=(x1,),
                            seed=ns.seed, verbose=not ns.no_progress).compress()
    from ..compressors.lowrank import LowRankDecomposition

    # target_macs: the whole network meets the budget, like the other methods. fold_bn=False keeps each
    # BatchNorm after its split conv: with it folded away the BN-free net diverges when fine-tuned at
    # the job's lr (digits_resnet: NaN at lr 0.02; with BN kept: 97.8% after 3 epochs).
    lr = LowRankDecomposition(origin_net=net, trainloader=train, valloader=val, trainset_ratio=ns.trainset_ratio,
                              sampled_pixels_per_img=ns.sampled_pixels, compress_ratio=1.0 - target,
                              target_macs=target, fold_bn=False, example_inputs=(x1,), seed=ns.seed)
    return lr.compress()


def _prunes(method: str) -> bool:
    """Whether the method chain removes MACs (a quantisation-only chain keeps them)."""
    return any(m not in QUANT_METHODS for m in method.split(","))


def ort_latency_ms(path: str, x: torch.Tensor, repeats: int = 30) -> float:
    """Median onnxruntime CPU latency (ms) of the ONNX file at `path` on `x` (one thread, like the torch rows)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _export(net: Any, out: str, x1: torch.Tensor, extra: Sequence[str] = ()) -> List[str]:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "compressed")
    written: List[str] = []
    formats = [("json", lambda: net.save_to_json(file=base + ".json")),
               ("pkl", lambda: net.save(pkl=base + ".pkl")),
               ("onnx", lambda: net.save_to_onnx(base + ".onnx", x1))]
    if "vnmodel" in extra:
        formats.append(("vnmodel", lambda: net.save_to_vnmodel(pkl=base + ".vnmodel",
                                                              model_base_size_hw=tuple(x1.shape[-2:]))))
    for fmt, fn in formats:
        try:
            written.append(str(fn()))
        except ImportError as exc:
            logger.warning("skipped the %s export: its exporter is not available (%s)", fmt, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one exporter's gap must not lose the others
            logger.warning("skipped the %s export: %s: %s", fmt, type(exc).__name__, exc)
            continue
        if fmt == "json" and os.path.isfile(base + ".safetensors"):
            written.append(base + ".safetensors")  # the JSON's weights sidecar: ship the two together
    return written


def _stage(index: int, text: str) -> None:
    """One line per stage on stderr, so a long stage is never silent even without bars."""
    print(f"amc compress [{index}/5] {text}", file=sys.stderr, flush=True)


def _load_original(ns: argparse.Namespace, model: Any) -> None:
    import torch

    try:
        if str(ns.original).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(ns.original)
        else:
            state = torch.load(ns.original, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise LoadError(f"--original {ns.original!r} is not a state_dict saved by torch.save or safetensors "
                        f"({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise LoadError(f"--original {ns.original!r} does not fit --model {ns.model} on --data {ns.data}: {exc}; "
                        "give the weights of that model") from None


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

    from ..export.atomic import atomic_write
    from ..graph.capture import trace
    from ..graph.counting import count
    from ..models import evaluate, train_classifier

    resolve_options(ns)
    defaults = DATA_DEFAULTS[ns.data]
    threads = ns.threads if ns.threads else defaults["threads"]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # tiny models: one thread is measurably faster on a shared box
    bars = not ns.no_progress
    t0 = time.perf_counter()
    try:
        model, size = _model(ns)
        train, val = _loaders(ns, size)
        if ns.original:
            _load_original(ns, model)
            _stage(1, f"original: loaded {ns.model} weights from {ns.original}")
        else:
            _stage(1, f"train {ns.model} on {ns.data}: {ns.epochs} epochs x {len(train)} batches")
            optim = dict(optimizer="adamw", lr=VIT_OPTIM[0], weight_decay=VIT_OPTIM[2]) if _is_vit(ns.model) else {}
            res = train_classifier(model, train, val, epochs=ns.epochs, seed=ns.seed, channels_last=defaults[
                "channels_last"], progress="train" if bars else None, **optim)
            logger.info("trained %s for %d epochs in %.1fs: val acc %.4f", ns.model, ns.epochs, res["seconds"],
                        res["acc"])
        x1 = next(iter(val))[0][:1]
        net = trace(model.eval(), x1)
        _stage(2, f"compress with {ns.method}" + (f" to <= {ns.target_latency:g} of the measured latency"
                                                  if getattr(ns, "target_latency", None) is not None else
                                                  f" to <= {ns.target_macs:g} of the MACs" if _prunes(ns.method)
                                                  else f" ({ns.bits}-bit weights)" if ns.method == "quant" else "")
               + (f" (calibrating on {ns.trainset_ratio:g} of the training batches)"
                  if ns.method in ("channel_pruning", "lowrank") else ""))
        t1 = time.perf_counter()
        small = _compress(ns, net, train, val, x1)
        compress_s = time.perf_counter() - t1
        if getattr(ns, "ratio", None) is not None:  # `--policy` records its budget as a removed fraction
            ns.target_macs, ns.ratio = 1.0 - ns.ratio, None
        small.lint()
        macs0, params0 = count(net, x1)
        macs1, params1 = count(small, x1)
        target = ns.target_macs * macs0
        if macs1 > target * 1.0001 and _prunes(ns.method) and getattr(ns, "target_latency", None) is None:
            raise PruningError(f"compressed MACs {macs1:,} exceed the target {target:,.0f} "
                               f"(--target-macs {ns.target_macs:g})")
        acc_pruned = evaluate(small, val)["acc"]
        acc_ft = acc_pruned
        if ns.finetune_epochs > 0:
            _stage(3, f"fine-tune: {ns.finetune_epochs} epochs x {len(train)} batches "
                          f"(compressed in {compress_s:.1f}s, {100 * acc_pruned:.2f}% before fine-tuning)")
            # a quantised net has its BatchNorm folded away: at lr 0.02 channel,quant on digits_resnet fell to
            # 15% after one epoch, at 0.005 it reached 98.1% (QAT fine-tunes with a smaller lr)
            cnn_lr = 0.005 if ns.method.split(",")[-1] == "quant" else 0.02
            optim = dict(optimizer="adamw", lr=VIT_OPTIM[1], weight_decay=VIT_OPTIM[2]) if _is_vit(ns.model) \
                else dict(lr=cnn_lr)
            acc_ft = train_classifier(small, train, val, epochs=ns.finetune_epochs, seed=ns.seed,
                                      channels_last=defaults["channels_last"],
                                      progress="fine-tune" if bars else None, **optim)["acc"]
        else:
            _stage(3, "fine-tune: skipped (--finetune-epochs 0)")
        _stage(4, f"export to {ns.out}")
        small.eval()
        files = _export(small, ns.out, x1, getattr(ns, "export", None) or ())
        _stage(5, "measure accuracy and latency")
        acc0 = evaluate(net, val)["acc"]
        if ns.method.split(",")[-1] == "quant" and any(f.endswith(".onnx") for f in files):
            # torch runs fake quantisation (slower than float): the INT8 speed is onnxruntime's, so both
            # rows are timed there
            reference = os.path.join(ns.out, "original.onnx")
            net.save_to_onnx(reference, x1)
            lat0 = ort_latency_ms(reference, x1)
            lat1 = ort_latency_ms(next(f for f in files if f.endswith(".onnx")), x1)
            latency_by = "onnxruntime"
        else:
            lat0, lat1 = latency_ms(net, x1), latency_ms(small, x1)
            latency_by = "torch"
    finally:
        torch.set_num_threads(old_threads)
    rows = [
        {"name": f"before ({ns.model})", "params": params0, "macs": macs0, "acc": acc0, "latency_ms": lat0},
        {"name": f"after {ns.method} (no FT)", "params": params1, "macs": macs1, "acc": acc_pruned, "latency_ms": None},
        {"name": f"after {ns.method} + FT", "params": params1, "macs": macs1, "acc": acc_ft, "latency_ms": lat1},
    ]
    table = format_table(rows)
    summary = {"model": ns.model, "method": ns.method, "data": ns.data, "target_macs": ns.target_macs,
               "target_latency": getattr(ns, "target_latency", None),
               "latency_check": getattr(small, "meta", {}).get("latency"),
               "epochs": ns.epochs, "finetune_epochs": ns.finetune_epochs, "original": ns.original, "rows": rows,
               "macs_fraction": macs1 / macs0, "compress_seconds": compress_s,
               "total_seconds": time.perf_counter() - t0, "files": files, "latency_by": latency_by, "table": table}
    os.makedirs(ns.out, exist_ok=True)
    with atomic_write(os.path.join(ns.out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "table"}, f, indent=2)
    summary["files"].append(os.path.join(ns.out, "summary.json"))
    print(table)
    if latency_by == "onnxruntime":
        print("latency: onnxruntime CPU, 1 thread (INT8 kernels for the quantised network, fp32 for the original)")
    print(f"MACs {macs1 / macs0:.3f}x of the original; compressed in {compress_s:.1f}s; whole job "
          f"{summary['total_seconds']:.0f}s; wrote " + ", ".join(summary["files"]))
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
