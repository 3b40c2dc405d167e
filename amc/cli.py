"""The `amc` console command.

    amc trace resnet18 --out out/ [--input-size 224] [--batch 2] [--no-onnx] [--format png]
    amc trace --list-models

Each subcommand is one function registered with `@command(name, help)`; its decorator argument
`configure(parser)` adds the subcommand's options. Adding `amc compress` is one more such pair.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import AmcError


@dataclass
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: Dict[str, Command] = {}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` appends each option's default, so no help string has to repeat it. Flags and unset
    options (default False, None or []) show none, nor does help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as `amc <name>`; `configure(parser)` declares its options."""
    def decorate(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            warnings.warn(f"amc: command {name!r} registered twice; the later one wins", stacklevel=2)
        COMMANDS[name] = Command(name, help, configure, fn)
        return fn
    return decorate


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="amc", description="Auto Model Compressor", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"amc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`amc trace --list-models | head`): stop quietly, as Unix tools do.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a tool killed by the signal reports


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except AmcError as exc:
        print(f"amc {args.command}: error: {exc}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------
# amc trace

def classification_models() -> List[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _configure_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="torchvision classification model name, e.g. resnet18")
    p.add_argument("--out", default="amc_out", help="output directory")
    p.add_argument("--input-size", type=int, default=224, help="square input resolution")
    p.add_argument("--batch", type=int, default=2,
                   help="example batch size used for tracing (the summary's MACs are per sample, batch 1)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--format", default="png",
                   help="drawing format rendered by graphviz dot; an .svg is written beside a raster format")
    p.add_argument("--list-models", action="store_true", help="print the valid model names and exit")


def _max_diff(a: Any, b: Any) -> float:
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        return float((a - b).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        return max((_max_diff(v, b.get(k)) for k, v in a.items()), default=0.0) if isinstance(b, dict) else float("inf")
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf")
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


@command("trace", "trace a torchvision classification model and write JSON, pkl, ONNX and a drawing",
         _configure_trace)
def trace_command(args: argparse.Namespace) -> int:
    if args.list_models:
        print("\n".join(classification_models()))
        return 0
    if not args.model:
        raise SystemExit("amc trace: give a model name, e.g. `amc trace resnet18`; "
                         "`amc trace --list-models` lists them")
    names = classification_models()
    if args.model not in names:
        close = difflib.get_close_matches(args.model, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SystemExit(f"amc trace: unknown model {args.model!r}{hint}; run `amc trace --list-models` to see "
                         "the valid names")
    if args.input_size < 1 or args.batch < 1:
        raise SystemExit("amc trace: --input-size and --batch must be positive")

    import torch
    import torchvision.models as tvm

    from .graph.capture import trace

    model = tvm.get_model(args.model, weights=None).eval()
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    net = trace(model, x)
    net.summary(x[:1])  # per-sample figures: what papers and model cards quote
    print(f"(MACs per sample, batch 1; traced with an example batch of {args.batch})")

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.model)
    written = [net.save_to_json(base + ".json"), base + ".safetensors", net.save(base + ".pkl")]
    if not args.no_onnx:
        written.append(net.save_to_onnx(base + ".onnx", x))
    drawing = net.draw(base, format=args.format)
    written += [base + ".gv"] + ([drawing] if drawing != base + ".gv" else [])
    if drawing not in (base + ".gv", base + ".svg") and os.path.isfile(base + ".svg"):  # drawn beside it
        written.append(base + ".svg")
    if shutil.which("dot") is None:
        print("graphviz `dot` not found: wrote the .gv source only", file=sys.stderr)

    loaded = net.load_from_json(base + ".json")
    with torch.no_grad():
        diff = _max_diff(net(x), loaded(x))
    if not diff <= 1e-5:
        print(f"amc trace: JSON round trip differs from the traced network (max abs diff {diff:.3g})",
              file=sys.stderr)
        return 1
    print(f"JSON round trip verified (max abs diff {diff:.3g})")
    for path in written:
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# amc compress (the main job lives in amc.jobs.compress)

def _configure_compress(p: argparse.ArgumentParser) -> None:
    from .jobs.compress import configure

    configure(p)


@command("compress", "train a zoo model, compress it, fine-tune, export, print before/after", _configure_compress)
def _compress(args: argparse.Namespace) -> int:
    from .jobs.compress import run_from_args

    return run_from_args(args)


# ----------------------------------------------------------------------------------------------
# amc search (the job lives in amc.jobs.search)

def _configure_search(p: argparse.ArgumentParser) -> None:
    from .jobs.search import configure

    configure(p)


@command("search", "search per-layer ratios (DDPG, GA, random) under a MACs budget; writes policy, history, plot",
         _configure_search)
def _search(args: argparse.Namespace) -> int:
    from .jobs.search import run_from_args

    return run_from_args(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
