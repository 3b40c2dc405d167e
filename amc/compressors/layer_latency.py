"""Per-layer latency tables and a latency-aware allocation of per-group ratios (NetAdapt's idea, issue 22).

A uniform ratio spends the latency budget blindly: on a CPU a depthwise conv, a BatchNorm or a residual add
costs far more milliseconds per MAC than a dense 3x3 conv, and an early high-resolution layer more than a
late one. Here every node of the graph is timed *inside the real forward* (per-node clocks, interleaved
over networks and rounds, medians) on the original and on the network pruned uniformly at a grid of
kept widths. Each node's time is then fitted as `a + b * x`, `x` being the product of the kept fractions
of the distinct channel dims it reads or writes (a dense conv: kept in x kept out; a BN, ReLU or
depthwise conv: kept channels; an attention matmul: kept head dims). Summed over the nodes, that predicts
any per-group policy's latency in microseconds without building it.

`allocate` then removes channels greedily where they buy the most predicted latency per unit of lost
capacity (the MACs and parameters they carry, times their scores relative to their group's mean), until
the prediction meets the budget; `amc.prune(target_latency=..)` times the result against the original and
re-aims the prediction if the machine disagrees. The tuners read the same prediction as a budget.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import PruningError
from ..graph.network import ReconstructedNetwork, _REPLAY, _direct_calls_allowed, _has_hooks, under_autocast
from ..graph.template import Ref, map_template
from .dependency import iter_labels
from .groups import select_units
from .latency import device_of, warm_up

GRID = (0.0, 0.25, 0.5, 0.75)  # uniform ratios timed to fit every node's width -> time line


def time_nodes(nets: Sequence[ReconstructedNetwork], inputs: Tuple[Any, ...], rounds: int = 9,
               warmup: int = 2) -> List[Tuple[Dict[str, float], float]]:
    """Per network: the median time (s) of each node inside its forward, and the median whole forward.
    Networks are interleaved round by round so a load change hits them all alike."""
    per: List[Dict[str, List[float]]] = [{} for _ in nets]
    total: List[List[float]] = [[] for _ in nets]
    warm_up(nets, inputs, warmup)
    with torch.no_grad():
        for _ in range(rounds):
            for i, net in enumerate(nets):
                t0 = time.perf_counter()
                _timed_forward(net, inputs, per[i])
                total[i].append(time.perf_counter() - t0)
    return [({k: statistics.median(v) for k, v in p.items()}, statistics.median(t)) for p, t in zip(per, total)]


def _timed_forward(net: ReconstructedNetwork, inputs: Tuple[Any, ...], out: Dict[str, List[float]]) -> None:
    env = net._bind_inputs(inputs, {})
    direct = _direct_calls_allowed()
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)

    def clock() -> float:  # a GPU node's time is its kernels': wait for them
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    for name, module, get_args, get_kwargs, frees, kind, amp in net._plan:
        call = (module.fn if kind == _REPLAY else module.forward) if direct and kind and not _has_hooks(module) \
            else module
        if amp:
            call = functools.partial(under_autocast, amp, call)
        args = get_args(env)
        kwargs = get_kwargs(env) if get_kwargs is not None else {}
        t = clock()
        env[name] = call(*args, **kwargs)
        out.setdefault(name, []).append(clock() - t)
        for f in frees:
            del env[f]


def node_dims(plan: Any) -> Dict[str, List[np.ndarray]]:
    """For each node, the root units of each distinct prunable channel dim it reads or writes."""
    a, roots = plan.analysis, plan.roots

    def labels_of(ref: Any) -> Any:
        if not isinstance(ref, Ref):
            return None
        value = a.labels.get(ref.node)
        for p in ref.path:
            try:
                value = value[p]
            except (KeyError, IndexError, TypeError):
                return None
        return value

    dims: Dict[str, List[np.ndarray]] = {}
    for node in plan.net.layer_nodes:
        seen, vecs = set(), []
        sources = [a.labels.get(node.name)] + [map_template(t, labels_of) for t in (*node.args, *node.kwargs.values())]
        for tl in iter_labels(sources):
            for v in tl.dims:
                if v is None:
                    continue
                r = np.unique(roots[np.asarray(v, dtype=np.int64)])
                r = r[r != 0]
                key = r.tobytes()
                if len(r) and key not in seen:
                    seen.add(key)
                    # every element's root: a dim's kept fraction counts frozen elements (root 0) as kept
                    vecs.append(roots[np.asarray(v, dtype=np.int64)])
        dims[node.name] = vecs
    return dims


def _width(dim_roots: np.ndarray, pruned: np.ndarray) -> float:
    return 1.0 - float(pruned[dim_roots].mean())


@dataclass
class LayerLatencyTable:
    """Per node: time (us) = a + b * x, x the product of its dims' kept fractions; plus the rest of the
    forward (Python glue) as a constant. Fitted from per-node clocks at the uniform ratios `grid`."""

    a: Dict[str, float]
    b: Dict[str, float]
    rest_us: float
    grid: List[float]
    measured_ms: List[float]  # whole forward at each grid ratio
    device: str = "cpu"
    info: Dict[str, Any] = field(default_factory=dict)

    def predict_us(self, widths: Dict[str, float]) -> float:
        return self.rest_us + sum(self.a[n] + self.b[n] * widths.get(n, 1.0) for n in self.a)

    def save(self, path: str) -> None:
        from ..export.atomic import atomic_write

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(str(path), "w") as f:
            f.write(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(path: str) -> "LayerLatencyTable":
        return LayerLatencyTable(**json.loads(Path(path).read_text()))


def node_widths(dims: Dict[str, List[np.ndarray]], pruned: np.ndarray) -> Dict[str, float]:
    return {n: float(np.prod([_width(v, pruned) for v in vs])) if vs else 1.0 for n, vs in dims.items()}


def pruned_mask(plan: Any, pruned_roots: np.ndarray) -> np.ndarray:
    """One flag per element root: pruned or not (what `node_widths` reads)."""
    m = np.zeros(len(plan.roots), dtype=bool)
    m[np.asarray(pruned_roots, dtype=np.int64)] = True
    return m


def build_layer_table(plan: Any, inputs: Tuple[Any, ...], grid: Sequence[float] = GRID, rounds: int = 9,
                      dims: Optional[Dict[str, List[np.ndarray]]] = None) -> LayerLatencyTable:
    """Time every node of `plan.net` pruned uniformly at each ratio of `grid` and fit its width line."""
    dims = dims if dims is not None else node_dims(plan)
    grid = sorted({0.0, *[float(r) for r in grid]})
    if any(not 0.0 <= r < 1.0 for r in grid) or len(grid) < 2:
        raise PruningError(f"per-layer latency tables time the network at ratios in [0, 1), at least one above 0; "
                           f"got {grid}")
    nets = [plan.net if r == 0.0 else plan.apply(r, "hard") for r in grid]
    timed = time_nodes(nets, inputs, rounds)
    xs = [node_widths(dims, pruned_mask(plan, plan.pruned_roots(r))) for r in grid]
    a, b = {}, {}
    for n in dims:
        x = np.array([w.get(n, 1.0) for w in xs])
        y = np.array([t.get(n, 0.0) for t, _ in timed]) * 1e6
        if np.ptp(x) < 1e-9:  # a node no pruning reaches: its time is a constant
            a[n], b[n] = float(np.median(y)), 0.0
            continue
        slope, icpt = np.polyfit(x, y, 1)
        if slope < 0:  # timing noise on a tiny node: no width dependence
            slope, icpt = 0.0, float(np.median(y))
        elif icpt < 0:  # time through the origin
            slope, icpt = float((x @ y) / (x @ x)), 0.0
        a[n], b[n] = float(icpt), float(slope)
    rest = float(np.median([tot * 1e6 - sum(t.values()) * 1e6 for t, tot in timed]))
    return LayerLatencyTable(a, b, max(rest, 0.0), grid, [tot * 1e3 for _, tot in timed], device_of(inputs),
                             {"rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "threads": torch.get_num_threads(),
                              "load": list(os.getloadavg()) if hasattr(os, "getloadavg") else None})


def allocate(plan: Any, table: LayerLatencyTable, target: float, dims: Dict[str, List[np.ndarray]],
             max_ratio: float = 0.8, steps: int = 32,
             node_macs: Optional[Dict[str, float]] = None, node_params: Optional[Dict[str, float]] = None,
             strict: bool = True, sensitivity: Optional[Dict[int, Callable[[float], float]]] = None
             ) -> Tuple[Dict[int, float], np.ndarray, float]:
    """Per-group ratios predicted to run within `target` x the unpruned prediction: (group id -> ratio,
    the pruned unit roots, the predicted latency fraction).

    Greedy: each move raises one group's ratio by 1/steps. A move costs the capacity it removes (its share
    of the MACs, averaged with its share of the parameters when `node_params` is given: a late layer holds
    few MACs but many weights), weighted by
    the removed channels' importance relative to their group's mean and by the group's new ratio (a
    deeper cut of one group costs more: the allocation spreads instead of emptying the cheapest group);
    the move with the most predicted latency saved per unit of cost is taken until the prediction meets
    the budget. With flat scores this keeps the most capacity that the latency budget allows.
    `sensitivity` (group id -> distortion at a ratio, `amc.compressors.sensitivity`) replaces that
    capacity cost with measured data: a move costs the distortion it adds (plus a trace of the capacity,
    to order the moves that add none).
    A move only changes the widths of the nodes its group touches, so only groups sharing one of them are
    re-scored. strict=False: where the prediction cannot reach `target`, return the deepest allocation
    (every group at max_ratio) for the clock to judge, instead of raising."""
    groups = {g.id: g for g in plan.groups if g.size and g.multiple_of != 0}
    root_group = np.full(len(plan.roots), -1, dtype=np.int64)
    for g in groups.values():
        root_group[g.units] = g.id
    nodes_of: Dict[int, List[str]] = {gid: [] for gid in groups}
    for n, vs in dims.items():
        for gid in {int(x) for v in vs for x in np.unique(root_group[v]) if x >= 0}:
            nodes_of[gid].append(n)
    groups = {gid: g for gid, g in groups.items() if nodes_of[gid]}
    neighbours = {gid: {h for h in groups if set(nodes_of[h]) & set(nodes_of[gid])} for gid in groups}
    if node_macs is None:  # no MACs known: every node weighs its predicted time
        node_macs = {n: table.b.get(n, 0.0) for n in dims}
    total_macs = max(sum(node_macs.values()), 1e-30)
    total_params = max(sum((node_params or {}).values()), 1e-30)
    rel = {}  # each unit's importance relative to its group's mean
    for gid, g in groups.items():
        imp = plan.importance[gid].double().abs().numpy()
        rel[gid] = dict(zip(g.units.tolist(), (imp / max(float(imp.mean()), 1e-30)).tolist()))
    if sensitivity is not None:
        missing = sorted(set(groups) - set(sensitivity))
        if missing:
            raise PruningError(f"sensitivity lacks groups {missing[:5]}: measure it on this plan "
                               "(amc.compressors.sensitivity.group_sensitivity)")
        s_ref = max(float(np.median([sensitivity[g](0.5) for g in groups])), 1e-12)
    ratio = {gid: 0.0 for gid in groups}
    chosen = {gid: np.zeros(0, dtype=np.int64) for gid in groups}
    pruned = np.zeros(len(plan.roots), dtype=bool)
    widths = node_widths(dims, pruned)

    def width(n: str) -> float:
        return float(np.prod([_width(v, pruned) for v in dims[n]]))

    def candidate(gid: int) -> Optional[Tuple[float, float, np.ndarray, np.ndarray]]:
        g, r = groups[gid], ratio[gid]
        while True:
            r = round(r + 1.0 / steps, 9)
            if r > max_ratio + 1e-9:
                return None
            units = select_units(g, plan.importance[gid], r)
            new = np.setdiff1d(units, chosen[gid])
            if len(new):  # rounding (round_to, heads) may keep the count for a step or two
                break
        pruned[new] = True
        after = {n: width(n) for n in nodes_of[gid]}
        pruned[new] = False
        saved = sum(table.b[n] * (widths[n] - after[n]) for n in nodes_of[gid])
        lost = sum(node_macs.get(n, 0.0) * (widths[n] - after[n]) for n in nodes_of[gid]) / total_macs
        if node_params is not None:
            lost = (lost + sum(node_params.get(n, 0.0) * (widths[n] - after[n]) for n in nodes_of[gid])
                    / total_params) / 2
        if sensitivity is not None:
            added = sensitivity[gid](r) - sensitivity[gid](ratio[gid])
            cost = max(added, 0.0) + 1e-3 * s_ref * max(lost, 1e-9)
            return (saved / cost, r, units, new) if saved > 0 else None
        imp = float(np.mean([rel[gid][u] for u in new.tolist()]))
        cost = max(lost, 1e-9) * imp * r
        return (saved / cost, r, units, new) if saved > 0 else None

    base = table.predict_us(widths)
    now = base
    cand = {gid: candidate(gid) for gid in groups}
    while now > target * base:
        live = [(c[0], gid) for gid, c in cand.items() if c is not None]
        if not live and not strict:
            break
        if not live:
            raise PruningError(f"target_latency={target:g} is below what per-layer pruning reaches (predicted "
                               f"{now / base:.2f}x of the original with every group at max_ratio={max_ratio:g}); "
                               "frozen layers and the unprunable rest set this floor")
        _, gid = max(live)
        _, r, units, new = cand[gid]
        ratio[gid], chosen[gid] = r, units
        pruned[new] = True
        for n in nodes_of[gid]:
            widths[n] = width(n)
        now = table.predict_us(widths)
        for h in neighbours[gid]:
            cand[h] = candidate(h)
    roots = np.concatenate([c for c in chosen.values()]) if chosen else np.zeros(0, dtype=np.int64)
    return ratio, roots, now / base


def node_macs_of(plan: Any) -> Dict[str, float]:
    """MACs of every node of the unpruned network at one sample (the cost `allocate` weighs)."""
    from ..graph.counting import node_costs
    from .budget import per_sample

    return {r["name"]: float(r["macs"]) for r in node_costs(plan.net, *per_sample(plan.example_inputs))}


def node_params_of(plan: Any) -> Dict[str, float]:
    """Parameters held by every node's module (what shrinks with its kept widths)."""
    return {n.name: float(sum(p.numel() for p in plan.net.module_of(n.name).parameters()))
            for n in plan.net.layer_nodes}


def layer_table(plan: Any, inputs: Tuple[Any, ...], rounds: int = 9, cache_dir: Any = None, refresh: bool = False,
                extra_key: Optional[Dict[str, Any]] = None, dims: Optional[Dict[str, List[np.ndarray]]] = None,
                grid: Sequence[float] = GRID) -> LayerLatencyTable:
    """`build_layer_table`, cached on disk like the uniform table (same key: graph, shapes, device, CPU,
    torch, threads), so a second prune of the same network at another budget times nothing."""
    from .latency import _key, cache_path

    key = _key(plan.net, inputs, {"kind": "layers", "grid": sorted({0.0, *map(float, grid)}),
                                  "device": device_of(inputs), **(extra_key or {})})
    path = cache_path(cache_dir, key)
    if path is not None and path.exists() and not refresh:
        try:
            return LayerLatencyTable.load(str(path))
        except (ValueError, TypeError, OSError):  # an unreadable cache entry is timed again and replaced
            pass
    table = build_layer_table(plan, inputs, grid=grid, rounds=rounds, dims=dims)
    table.info["key"] = key
    if path is not None:
        table.save(str(path))
    return table


def prune_to_layer_latency(plan: Any, target: float, inputs: Tuple[Any, ...], table: LayerLatencyTable,
                           mode: str = "hard", rounds: int = 15, tolerance: float = 0.03, tries: int = 4,
                           max_ratio: float = 0.8, dims: Optional[Dict[str, List[np.ndarray]]] = None,
                           capacity: str = "macs+params",
                           sensitivity: Optional[Dict[int, Callable[[float], float]]] = None) -> Any:
    """Allocate per-group ratios for `target` from the per-layer table, prune, and time the result against
    the original. Where the machine disagrees with the prediction the aim is corrected (lower when slower,
    higher when more than `tolerance` faster: pruning more than the budget asks costs accuracy); the
    result within budget closest to it is kept."""
    from .latency import measure

    dims = dims if dims is not None else node_dims(plan)
    macs, params = node_macs_of(plan), node_params_of(plan)
    aim, tried, best = target, [], None
    for _ in range(tries):
        ratios, roots, predicted = allocate(plan, table, aim, dims, max_ratio=max_ratio, node_macs=macs,
                                            node_params=params if capacity == "macs+params" else None,
                                            strict=False,  # the prediction may be pessimistic: time it
                                            sensitivity=sensitivity)
        net = plan.apply_units(roots, "hard")
        base_ms, ms = measure([plan.net, net], inputs, rounds)
        fraction = ms / base_ms
        tried.append({"aim": round(aim, 4), "predicted": round(predicted, 4), "measured": round(fraction, 4)})
        if fraction <= target * (1 + tolerance):
            if best is None or fraction > best[0]:
                best = (fraction, ms, base_ms, net, roots, ratios, predicted)
            if fraction >= target * (1 - tolerance):
                break
        elif predicted > aim * 1.001:  # already the deepest allocation, and the clock says too slow
            break
        aim = min(aim * target / fraction, 0.999)
    if best is None:
        raise PruningError(f"target_latency={target:g} not met with per-layer allocation: {tried}; the rest of "
                           "the network (frozen layers, unprunable ops) or timing noise keeps it slower. Try a "
                           "larger target_latency, or time on a quiet machine")
    fraction, ms, base_ms, net, roots, ratios, predicted = best
    out = net if mode == "hard" else plan.apply_units(roots, mode)
    out.meta["latency"] = {"target": target, "allocation": "sensitivity" if sensitivity else "layers",
                           "measured": fraction, "ms": ms,
                           "original_ms": base_ms, "predicted": predicted, "tried": tried,
                           "ratios": {plan.groups[g].producers[0]: r for g, r in ratios.items() if r > 0}}
    return out
