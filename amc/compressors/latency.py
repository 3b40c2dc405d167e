"""Latency as a budget (issue 22): what a pruning ratio buys in measured milliseconds on this machine.

`latency_table` prunes the network uniformly at a grid of ratios and times every candidate *interleaved*
(round after round, each network once per round), so a load change on a shared machine hits them all
alike; medians are kept. The table is cached on disk, keyed by the graph's structure, the input shapes,
the device, the CPU model, torch's version and thread count, so a second call costs nothing.
`amc.prune(..., target_latency=0.5)` reads the smallest ratio the table predicts, prunes, and checks by
timing the pruned network against the original (interleaved again); if the check misses the budget it
bisects the ratio from both sides (too slow: more; far too fast: less), and raises if none meets it.
Per-layer tables and non-uniform policies (NetAdapt's idea): `layer_latency.py`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .._warnings import warn_user
from ..errors import PruningError

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CACHE = Path(os.environ.get("AMC_CACHE", Path.home() / ".cache" / "amc")) / "latency"


@dataclass
class LatencyTable:
    """Median latency (ms) of the network pruned uniformly at each ratio, at the example inputs' batch."""

    ratios: List[float]
    ms: List[float]
    device: str
    key: str
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def base_ms(self) -> float:
        return self.ms[self.ratios.index(0.0)] if 0.0 in self.ratios else max(self.ms)

    def fraction(self) -> List[float]:
        """Latency of each ratio as a fraction of the unpruned network's, made non-increasing in the ratio
        (a larger ratio is never predicted slower: timing noise is not a reason to prune less)."""
        env = np.minimum.accumulate(np.asarray(self.ms, dtype=float))
        return (env / self.base_ms).tolist()

    def ratio_for(self, target: float) -> float:
        """The smallest ratio predicted to run within `target` x the original latency (linear in between)."""
        fr = self.fraction()
        for i, (r, f) in enumerate(zip(self.ratios, fr)):
            if f <= target:
                if i == 0:
                    return r
                r0, f0 = self.ratios[i - 1], fr[i - 1]
                return r0 + (r - r0) * (f0 - target) / max(f0 - f, 1e-12)
        raise PruningError(f"target_latency={target:g} is below what the table reaches: ratio {self.ratios[-1]:g} "
                           f"runs at {fr[-1]:.2f}x the original latency ({self.ms[-1]:.3g} of "
                           f"{self.base_ms:.3g} ms); frozen layers and the unprunable rest set this floor")


def measure(nets: Sequence[nn.Module], inputs: Tuple[Any, ...], rounds: int = 15, warmup: int = 2) -> List[float]:
    """Median latency (ms) of each network on `inputs`, interleaved round by round."""
    times: List[List[float]] = [[] for _ in nets]
    sync = torch.cuda.synchronize if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs) else None
    warm_up(nets, inputs, warmup)
    with torch.no_grad():
        for _ in range(rounds):
            for i, net in enumerate(nets):
                if sync:
                    sync()
                t = time.perf_counter()
                net(*inputs)
                if sync:
                    sync()
                times[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def warm_up(nets: Sequence[nn.Module], inputs: Tuple[Any, ...], runs: int = 2) -> None:
    """Eval mode and a few untimed runs each (allocator, caches, lazy kernels) before any clock starts."""
    with torch.no_grad():
        for net in nets:
            net.eval()
            for _ in range(runs):
                net(*inputs)


def device_of(inputs: Tuple[Any, ...]) -> str:
    """The device the example inputs live on (where the tables are timed)."""
    return str(next((x.device for x in inputs if isinstance(x, torch.Tensor)), "cpu"))


def cache_path(cache_dir: Any, key: str) -> Optional[Path]:
    """The cache file of a table: None for no cache (cache_dir=False); CACHE is read at call time, so
    $AMC_CACHE or a patched CACHE applies."""
    if cache_dir is False:
        return None
    return Path(CACHE if cache_dir is None else cache_dir) / f"{key}.json"


def _key(net: nn.Module, inputs: Tuple[Any, ...], extra: Dict[str, Any]) -> str:
    sig = {"nodes": [(n.name, n.meta.get("op", "?")) for n in getattr(net, "layer_nodes", [])],
           "params": [(k, list(v.shape)) for k, v in net.state_dict().items()],
           "inputs": [list(x.shape) if isinstance(x, torch.Tensor) else repr(x) for x in inputs],
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(), **extra}
    return hashlib.sha1(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cached(path: Path) -> Optional[LatencyTable]:
    """A cached table, or None (with a warning) when the file is not one this version wrote: it is then
    measured again and overwritten rather than failing a prune on a stale cache."""
    try:
        table = LatencyTable(**json.loads(path.read_text()))
        if len(table.ratios) != len(table.ms) or 0.0 not in table.ratios:
            raise ValueError("ratios and latencies do not match")
        return table
    except (OSError, ValueError, TypeError) as exc:
        warn_user(f"latency cache {str(path)!r} is unreadable ({exc}); measuring the table again", RuntimeWarning)
        return None


def build_table(plan: Any, inputs: Tuple[Any, ...], ratios: Sequence[float] = DEFAULT_RATIOS, rounds: int = 15,
                cache_dir: Any = None, refresh: bool = False,
                extra_key: Optional[Dict[str, Any]] = None) -> LatencyTable:
    """The latency table of a pruning plan's network (see module doc); read from `cache_dir` when there."""
    ratios = sorted({0.0, *[float(r) for r in ratios]})
    if any(not 0.0 <= r < 1.0 for r in ratios):
        raise PruningError(f"latency table ratios must be in [0, 1), got {ratios}")
    device = device_of(inputs)
    key = _key(plan.net, inputs, {"ratios": ratios, "device": device, **(extra_key or {})})
    path = cache_path(cache_dir, key)
    if path is not None and path.exists() and not refresh:
        cached = _read_cached(path)
        if cached is not None:
            return cached
    nets = [plan.net if r == 0.0 else plan.apply(r, "hard") for r in ratios]
    ms = measure(nets, inputs, rounds)
    table = LatencyTable(ratios, ms, device, key, {"rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M"),
                                                   "load": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                                                   "threads": torch.get_num_threads(), "cpu": _cpu_name()})
    if path is not None:
        from ..export.atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(str(path), "w") as f:
            f.write(json.dumps(asdict(table), indent=1))
    return table


def _keeps_model(fn):
    from .prune import _keeps_model as keep

    return keep(fn)


@_keeps_model
def latency_table(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None,
                  ratios: Sequence[float] = DEFAULT_RATIOS, criterion: Any = "l2", ignore: Sequence[str] = (),
                  round_to: int = 1, rounds: int = 15, cache_dir: Any = None,
                  refresh: bool = False, per_layer: bool = False) -> Any:
    """`amc.latency_table(model, (x,))`: measured latency of `model` pruned uniformly at `ratios` with
    `criterion`, on this machine at the batch of `x` (see module doc). Pass it to `amc.prune(...,
    target_latency=f, latency_table=table)`, or let `amc.prune` build (and cache) it. `cache_dir`: None for
    $AMC_CACHE/latency (default ~/.cache/amc/latency), a folder, or False for no cache.
    per_layer=True: a `LayerLatencyTable` instead (every node timed inside the forward at these ratios and
    fitted against its kept widths; `amc.prune(..., latency_allocation="layers")` reads it)."""
    from .base import check_count
    from .prune import _as_network, plan_pruning

    check_count(rounds, "rounds")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r < 1.0 for r in ratios):
        raise PruningError(f"a list of ratios in [0, 1) is expected (fractions to time the network pruned at), "
                           f"got {ratios!r}")
    net, inputs = _as_network(model, example_inputs)
    plan = plan_pruning(net, criterion, inputs, ignore, None, round_to)
    if per_layer:
        from .layer_latency import layer_table

        return layer_table(plan, inputs, rounds=rounds, cache_dir=cache_dir, refresh=refresh, grid=ratios,
                           extra_key={"criterion": str(criterion), "round_to": round_to, "ignore": sorted(ignore),
                                      "heads": False})
    return build_table(plan, inputs, ratios, rounds, cache_dir, refresh,
                       extra_key={"criterion": str(criterion), "round_to": round_to, "ignore": sorted(ignore)})


def check_target_latency(target_latency: Any) -> Optional[float]:
    if target_latency is None:
        return None
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) \
            or not 0.0 < float(target_latency) < 1.0:
        raise PruningError(f"target_latency is the fraction of the original's measured latency to keep, in (0, 1); "
                           f"got {target_latency!r}")
    return float(target_latency)


def prune_to_latency(plan: Any, target: float, inputs: Tuple[Any, ...], table: LatencyTable, mode: str = "hard",
                     rounds: int = 15, tolerance: float = 0.03, tries: int = 5) -> nn.Module:
    """Prune `plan` uniformly to the table's ratio for `target`, then time it against the original. A
    ratio measured slower than `target` (x (1 + tolerance) for timing noise) is raised, one more than
    `tolerance` faster is lowered (pruning beyond the budget costs accuracy), bisecting between the ratios
    tried; the measured-within-budget ratio closest to the target is kept."""
    ratio = table.ratio_for(target)
    lo, hi = 0.0, 0.99  # lo: known too slow (or unpruned); hi: known within budget (or the most we try)
    tried, best = [], None
    for _ in range(tries):
        net = plan.apply(ratio, "hard")
        base_ms, ms = measure([plan.net, net], inputs, rounds)
        fraction = ms / base_ms
        tried.append((round(ratio, 4), fraction))
        if fraction <= target * (1 + tolerance):
            if best is None or fraction > best[0]:
                best = (fraction, ms, base_ms, ratio, net)
            if fraction >= target * (1 - tolerance):
                break
            hi = min(hi, ratio)
        else:
            lo = max(lo, ratio)
        nxt = [r for r in table.ratios if lo < r < hi] if best is None else []
        ratio = nxt[0] if nxt and nxt[0] > ratio else (lo + hi) / 2
    if best is None:
        raise PruningError(f"target_latency={target:g} not met: measured (ratio, latency fraction) {tried}; the "
                           "rest of the network (frozen layers, unprunable ops) or timing noise keeps it slower. "
                           "Try a larger target_latency, or time on a quiet machine")
    fraction, ms, base_ms, ratio, net = best
    out = net if mode == "hard" else plan.apply(ratio, mode)
    out.meta["latency"] = {"target": target, "allocation": "uniform", "ratio": ratio, "measured": fraction, "ms": ms,
                           "original_ms": base_ms, "table": table.key, "tried": tried}
    return out
