"""What a tuner searches over: one ratio per decision variable, a MACs budget, and a compressor.

A *variable* is one policy key (a layer name) that sets the ratio of one or more coupled channel
groups (`"prune"`, `"channel"`, a callable) or of one decomposable layer (`"lowrank"`). The policy
`{key: ratio}` is exactly what `amc.prune(ratio=...)`, `ChannelPruning(compress_ratio=...)` or
`LowRankDecomposition(compress_ratio=...)` accept, so `compress(policy)` is the compressor itself.

Two MACs functions:
- `macs(x)`: exact, measured with `amc.count` on the pruned structure (rounding included) or, for
  low-rank, from the per-layer rank arithmetic the compressor uses (re-measured on the compressed net);
- `model_macs(x)`: a bilinear model (each weight layer's MACs times its kept input and output
  fractions) cheap enough for DDPG to clamp every action so the remaining layers can still reach
  the budget. `repair(x)` then raises ratios toward `max_ratio` until the exact MACs meet the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ..compressors.budget import per_sample as _batch1
from ..compressors.base import check_count, check_number
from ..errors import PruningError
from ..graph.counting import count, node_costs
from ..graph.network import ReconstructedNetwork

Bound = Union[float, Mapping[str, float]]
COMPRESSORS = ("prune", "channel", "lowrank")




@dataclass
class Variable:
    """One policy key and what it controls."""

    key: str
    groups: List[int]  # channel groups it sets (empty for low-rank)
    features: List[float]  # AMC's static layer embedding: type, in, out, stride, kernel, params


@dataclass
class MacsModel:
    """MACs ~ const + sum_l m_l * (a_in_l + B_in_l k) * (a_out_l + B_out_l k), k = kept fraction per variable."""

    const: float
    m: np.ndarray
    a_in: np.ndarray
    b_in: np.ndarray  # [layers, variables]
    a_out: np.ndarray
    b_out: np.ndarray

    def __call__(self, kept: np.ndarray) -> float:
        return float(self.const + np.sum(self.m * (self.a_in + self.b_in @ kept) * (self.a_out + self.b_out @ kept)))


@dataclass
class LatencyBudget:
    """A latency budget read from per-layer latency tables (amc.compressors.layer_latency): a policy's
    predicted latency as a fraction of the unpruned prediction, computed from its kept channels without
    building the network."""

    target: float
    table: Any  # LayerLatencyTable
    plan: Any
    dims: Dict[str, Any]
    base_us: float = 0.0

    def fraction(self, group_ratios: Mapping[int, float]) -> float:
        from ..compressors.groups import select_units
        from ..compressors.layer_latency import node_widths, pruned_mask

        plan = self.plan
        roots = [select_units(plan.groups[g], plan.importance[g], r) for g, r in group_ratios.items() if r > 0]
        pruned = pruned_mask(plan, np.concatenate(roots) if roots else np.zeros(0, dtype=np.int64))
        return self.table.predict_us(node_widths(self.dims, pruned)) / self.base_us


@dataclass
class SearchSpace:
    """Variables, bounds, budget and the compressor of one search (built by `build_space`)."""

    net: ReconstructedNetwork
    example_inputs: Tuple[Any, ...]
    compressor: str
    variables: List[Variable]
    lo: np.ndarray
    hi: np.ndarray
    base_macs: int
    target_macs: float  # fraction of base_macs
    model: MacsModel
    backend: Any = field(repr=False, default=None)
    latency: Optional[LatencyBudget] = field(repr=False, default=None)
    _exact: Dict[Tuple[int, ...], int] = field(default_factory=dict, repr=False)
    _latency: Dict[Tuple[int, ...], float] = field(default_factory=dict, repr=False)

    # -- policies ---------------------------------------------------------------------------------
    @property
    def keys(self) -> List[str]:
        return [v.key for v in self.variables]

    @property
    def budget(self) -> float:
        return self.target_macs * self.base_macs

    def clip(self, x: Sequence[float]) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=np.float64), self.lo, self.hi)

    def policy(self, x: Sequence[float]) -> Dict[str, float]:
        return {k: round(float(r), 6) for k, r in zip(self.keys, self.clip(x))}

    def vector(self, policy: Mapping[str, float]) -> np.ndarray:
        """The vector of a policy dict (every key must be one of `keys`; missing keys: ratio 0)."""
        unknown = [k for k in policy if k not in self.keys]
        if unknown:
            raise PruningError(f"the policy names unknown layers {unknown[:5]}; this search's layers are "
                               f"{self.keys[:8]}{' ...' if len(self.keys) > 8 else ''}")
        return np.array([float(policy.get(k, 0.0)) for k in self.keys])

    def signature(self, x: Sequence[float]) -> Tuple[int, ...]:
        """The structure a policy produces (kept channels per group, or ranks): equal signatures, equal nets."""
        return self.backend.signature(self.policy(x))

    # -- MACs -------------------------------------------------------------------------------------
    def macs(self, x: Sequence[float]) -> int:
        sig = self.signature(x)
        if sig not in self._exact:
            self._exact[sig] = int(self.backend.macs(self.policy(x)))
        return self._exact[sig]

    def model_macs(self, x: Sequence[float]) -> float:
        return self.model(1.0 - self.clip(x))

    def latency_fraction(self, x: Sequence[float]) -> Optional[float]:
        """Predicted latency / the original's, from the per-layer tables (None without a latency budget)."""
        if self.latency is None:
            return None
        sig = self.signature(x)
        if sig not in self._latency:
            self._latency[sig] = self.latency.fraction(self.backend.group_ratios(self.policy(x)))
        return self._latency[sig]

    def feasible(self, x: Sequence[float]) -> bool:
        if self.latency is not None and self.latency_fraction(x) > self.latency.target:
            return False
        return self.macs(x) <= self.budget

    def model_feasible(self, x: Sequence[float]) -> bool:
        """The cheap test: the MACs model, and the latency prediction (itself cheap) when there is one."""
        if self.latency is not None and self.latency_fraction(x) > self.latency.target:
            return False
        return self.model_macs(x) <= self.budget

    def _largest_feasible(self, point: Callable[[float], np.ndarray], steps: int) -> Optional[float]:
        """Largest t in [0, 1] with point(t) within the budget, assuming feasibility is monotone in t
        (None if point(0) is not): bracketed by the cheap MACs model, then bisected on exact MACs."""
        if not self.feasible(point(0.0)):
            return None
        if self.feasible(point(1.0)):
            return 1.0
        lo_m, hi_m = 0.0, 1.0
        for _ in range(30):  # the model first: free
            mid = (lo_m + hi_m) / 2
            if self.model_feasible(point(mid)):
                lo_m = mid
            else:
                hi_m = mid
        lo, hi = 0.0, 1.0
        for guess in (lo_m - 0.02, lo_m - 0.1):  # the model is near: bracket around it
            if guess > 0 and self.feasible(point(guess)):
                lo = guess
                break
        for guess in (lo_m + 0.02, lo_m + 0.1):
            if lo < guess < 1 and not self.feasible(point(guess)):
                hi = guess
                break
        for _ in range(steps):
            mid = (lo + hi) / 2
            if self.feasible(point(mid)):
                lo = mid
            else:
                hi = mid
        return lo

    def repair(self, x: Sequence[float], steps: int = 8) -> np.ndarray:
        """`x` moved toward `hi` just far enough that its exact MACs meet the budget (x itself if it does)."""
        x = self.clip(x)
        if self.feasible(x):
            return x
        t = self._largest_feasible(lambda t: self.clip(np.round(self.hi - t * (self.hi - x), 6)), steps)
        return self.clip(np.round(self.hi - t * (self.hi - x), 6))

    def tighten(self, x: Sequence[float], steps: int = 8) -> np.ndarray:
        """A feasible `x` moved toward `lo` as far as the budget allows, so it spends the budget;
        an infeasible one is repaired first."""
        x = self.repair(x, steps)
        t = self._largest_feasible(lambda t: self.clip(np.round(x - t * (x - self.lo), 6)), steps)
        return self.clip(np.round(x - t * (x - self.lo), 6))

    def uniform(self) -> np.ndarray:
        """The uniform policy at the budget: the smallest common ratio that meets it (bisected on exact
        MACs), then the rounding slack spent one variable at a time (one more kept channel or rank where it
        still fits), so its MACs sit near the target (every layer rounding at once lands up to 5% under it
        on 16/32/64-channel nets)."""
        full = lambda r: self.clip(np.full(len(self.keys), r))  # noqa: E731
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.feasible(full(mid)) else (mid, hi)
        v = full(hi)
        for i in range(len(v)):
            sig, w = self.signature(v), v.copy()
            while w[i] > self.lo[i] and self.signature(w) == sig:
                w[i] = max(self.lo[i], w[i] - 0.005)
            if self.signature(w) != sig and self.feasible(w):
                v = w
        return v

    def near_uniform(self, n: int, sigma: float, seed: int) -> List[np.ndarray]:
        """The uniform policy and n-1 copies with every ratio moved by N(0, sigma), clipped to the bounds
        (the search loop repairs them to the budget like any candidate); as policies would round them."""
        n, sigma = check_count(n, "n (policies near uniform)"), check_number(sigma, "sigma", low=0.0)
        u = self.clip(self.vector(self.policy(self.uniform())))
        rng = np.random.default_rng(seed)
        xs = [u] + [self.clip(u + rng.normal(0, sigma, len(u))) for _ in range(n - 1)]
        return [self.clip(self.vector(self.policy(x))) for x in xs]

    def min_ratio_at(self, decided: np.ndarray, t: int, steps: int = 30) -> float:
        """Smallest ratio of variable t such that, with variables < t at `decided` and the rest at
        `hi`, the MACs model still meets the budget (AMC's action clamp)."""
        x = self.hi.copy()
        x[:t] = decided[:t]
        x[t] = self.lo[t]
        if self.model_feasible(x):
            return float(self.lo[t])
        lo_r, hi_r = float(self.lo[t]), float(self.hi[t])
        for _ in range(steps):
            mid = (lo_r + hi_r) / 2
            x[t] = mid
            if self.model_feasible(x):
                hi_r = mid
            else:
                lo_r = mid
        return hi_r

    # -- compressing --------------------------------------------------------------------------------
    def compress(self, x: Sequence[float]) -> ReconstructedNetwork:
        return self.backend.compress(self.policy(x))

    def measure(self, net: nn.Module) -> int:
        return int(count(net, *_batch1(self.example_inputs))[0])


# ------------------------------------------------------------------------------------------------
# Channel-group backends: amc.prune, ChannelPruning, or a user callable on the same groups.

def _layer_features(net: ReconstructedNetwork, name: str) -> List[float]:
    mod = net.module_of(name)
    if isinstance(mod, nn.Conv2d):
        return [0.0, mod.in_channels, mod.out_channels, mod.stride[0], mod.kernel_size[0],
                float(mod.weight.numel())]
    if isinstance(mod, nn.Linear):
        return [1.0, mod.in_features, mod.out_features, 0.0, 1.0, float(mod.weight.numel())]
    n = float(sum(p.numel() for p in mod.parameters()))
    return [2.0, 0.0, 0.0, 0.0, 0.0, n]


def _merge_variables(candidates: Dict[str, List[int]], groups_order: List[int]) -> List[Tuple[str, List[int]]]:
    """One key per group: a key that sets exactly that group when there is one, else the smallest key
    covering it (the groups it sets then share the variable)."""
    out: List[Tuple[str, List[int]]] = []
    covered: set = set()
    for gi in groups_order:
        if gi in covered:
            continue
        exact = [k for k, gs in candidates.items() if gs == [gi]]
        if exact:
            key = exact[0]
        else:
            having = [k for k, gs in candidates.items() if gi in gs]
            if not having:
                continue
            key = min(having, key=lambda k: len(candidates[k]))
        out.append((key, list(candidates[key])))
        covered.update(candidates[key])
    return out


def _channel_model(plan: Any, variables: List[Variable], inputs: Tuple[Any, ...]) -> MacsModel:
    rows = node_costs(plan.net, *_batch1(inputs))
    var_of_group: Dict[int, List[int]] = {}
    for vi, v in enumerate(variables):
        for g in v.groups:
            var_of_group.setdefault(g, []).append(vi)
    dims: Dict[Tuple[str, int], Tuple[int, Dict[int, int]]] = {}  # (node, dim) -> (length, {var: positions})
    for gi, g in enumerate(plan.groups):
        vs = var_of_group.get(gi, [])
        for mb in g.members:
            if mb.axis.attr != "weight" or mb.axis.dim not in (0, 1):
                continue
            length, per = dims.setdefault((mb.axis.node, mb.axis.dim), (len(mb.unit_index), {}))
            if vs:  # a group set by several keys: the first one stands for it in the model
                per[vs[0]] = per.get(vs[0], 0) + int((mb.unit_index >= 0).sum())
    n = len(variables)
    const, m, a_in, b_in, a_out, b_out = 0.0, [], [], [], [], []
    for r in rows:
        if (r["name"], 0) not in dims and (r["name"], 1) not in dims:
            const += r["macs"]
            continue
        m.append(float(r["macs"]))
        for dim, a_list, b_list in ((1, a_in, b_in), (0, a_out, b_out)):
            b = np.zeros(n)
            if (r["name"], dim) in dims:
                length, per = dims[(r["name"], dim)]
                for vi, cnt in per.items():
                    b[vi] = cnt / length
                a_list.append(1.0 - b.sum())
            else:
                a_list.append(1.0)
            b_list.append(b)
    if not m:
        return MacsModel(const, np.zeros(0), np.zeros(0), np.zeros((0, n)), np.zeros(0), np.zeros((0, n)))
    return MacsModel(const, np.array(m), np.array(a_in), np.array(b_in), np.array(a_out), np.array(b_out))


class _ChannelBackend:
    """Policies over coupled channel groups; the architecture of a policy is amc.prune's."""

    def __init__(self, net: ReconstructedNetwork, inputs: Tuple[Any, ...], kind: str, ignore: Sequence[str],
                 criterion: Any, calibration: Optional[Iterable], options: Mapping[str, Any],
                 fn: Optional[Callable[[Dict[str, float]], nn.Module]] = None):
        from ..compressors.prune import plan_pruning

        self.net, self.inputs, self.kind, self.fn = net, inputs, kind, fn
        self.criterion, self.ignore = criterion, list(ignore)
        self.round_to = options.get("round_to", 1)  # kernel-friendly widths, as amc.prune(round_to=)
        self.plan = plan_pruning(net, "l2", inputs, ignore=self.ignore, round_to=self.round_to)
        self.cp = None
        groups = self.plan.groups  # a variable's `groups` are indices into this list
        usable = [i for i, g in enumerate(groups) if g.size > 1 and g.multiple_of != 0]
        order = {nd.name: i for i, nd in enumerate(net.layer_nodes)}
        first = {i: min(order[p] for p in g.producers) if g.producers else len(order) for i, g in enumerate(groups)}
        usable.sort(key=lambda gi: first[gi])
        if kind == "channel":
            from ..compressors.channel_pruning import ChannelPruning

            if calibration is None:
                raise PruningError("compressor='channel' (LASSO channel selection) needs calibration=<a train "
                                   "DataLoader> to sample layer responses")
            opts = {"trainset_ratio": 0.1, **dict(options)}
            self.options = opts
            self.cp = ChannelPruning(net, calibration, None, compress_ratio=0.0, example_inputs=inputs,
                                     ignore=self.ignore, **opts)
            candidates = {k: sorted(gi for gi in self.cp.groups_of_key(k) if gi in usable)
                          for k in self.cp.layer_names()}
        else:
            candidates = {}
            for gi in usable:  # amc.prune: a key sets every group it produces
                for p in groups[gi].producers:
                    candidates.setdefault(p, []).append(gi)
        candidates = {k: gs for k, gs in candidates.items() if gs}
        self.variables = [Variable(k, gs, _layer_features(net, k)) for k, gs in _merge_variables(candidates, usable)]

    def group_ratios(self, policy: Mapping[str, float]) -> Dict[int, float]:
        out: Dict[int, float] = {}
        for v in self.variables:
            for g in v.groups:
                out[g] = max(out.get(g, 0.0), float(policy.get(v.key, 0.0)))
        return out

    def signature(self, policy: Mapping[str, float]) -> Tuple[int, ...]:
        from ..compressors.groups import keep_counts

        ratios = self.group_ratios(policy)
        return tuple(keep_counts(self.plan.groups[g], r) if r > 0 else 0 for g, r in sorted(ratios.items()))

    def structure(self, policy: Mapping[str, float]) -> ReconstructedNetwork:
        from ..compressors.apply import apply
        from ..compressors.groups import select_units

        plan = self.plan
        chosen = [select_units(plan.groups[g], plan.importance[g], r) for g, r in self.group_ratios(policy).items()
                  if r > 0]
        roots = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return apply(self.net, plan.analysis, plan.roots, roots, "hard")

    def macs(self, policy: Mapping[str, float]) -> int:
        return int(count(self.structure(policy), *_batch1(self.inputs))[0])

    def compress(self, policy: Mapping[str, float]) -> nn.Module:
        if self.fn is not None:
            return self.fn(dict(policy))
        if self.cp is not None:
            self.cp.validate_ratio(dict(policy))
            self.cp.compress_ratio = dict(policy)
            return self.cp.compress()
        from ..compressors.prune import prune

        return prune(self.net, ratio=dict(policy), criterion=self.criterion, example_inputs=self.inputs,
                     ignore=self.ignore, round_to=self.round_to)


class _LowRankBackend:
    """One variable per decomposable layer: the fraction of its weight MACs removed."""

    def __init__(self, net: ReconstructedNetwork, inputs: Tuple[Any, ...], ignore: Sequence[str],
                 calibration: Optional[Iterable], options: Mapping[str, Any]):
        from ..compressors.lowrank import LowRankDecomposition

        if calibration is None:
            raise PruningError("compressor='lowrank' needs calibration=<a train DataLoader> to fit the factors")
        opts = {"trainset_ratio": 0.1, "fold_bn": False, **dict(options)}
        self.options = opts
        self.lr = LowRankDecomposition(net, calibration, None, compress_ratio=0.0, example_inputs=inputs,
                                       ignore=tuple(ignore), **opts)
        self.net, self.inputs = net, inputs
        skip = set(ignore)
        self.names = [n for n in self.lr.infos if n not in skip]
        self.variables = [Variable(n, [], _layer_features(net, n)) for n in self.names]
        self.base = int(count(net, *_batch1(inputs))[0])

    def _bias(self, name: str) -> bool:
        return self.lr.infos[name].keeps_bias(self.lr.method)

    def signature(self, policy: Mapping[str, float]) -> Tuple[int, ...]:
        return tuple(self.lr.infos[n].rank_for_ratio(float(policy.get(n, 0.0))) for n in self.names)

    def macs(self, policy: Mapping[str, float]) -> int:
        saved = 0
        for n, r in zip(self.names, self.signature(policy)):
            info = self.lr.infos[n]
            saved += info.macs_before() - info.macs_after(r, self._bias(n))
        return self.base - saved

    def model(self) -> MacsModel:
        """Linear in the kept fraction: rank ~ (1 - ratio) * max rank."""
        n = len(self.names)
        m, b = [], []
        const = float(self.base)
        for i, name in enumerate(self.names):
            info = self.lr.infos[name]
            full = info.macs_after(info.max_rank, self._bias(name))
            const -= info.macs_before()
            m.append(float(full))
            row = np.zeros(n)
            row[i] = 1.0
            b.append(row)
        z = np.zeros(n)
        return MacsModel(const, np.array(m), np.ones(n), np.zeros((n, n)), z, np.array(b))

    def compress(self, policy: Mapping[str, float]) -> nn.Module:
        self.lr.validate_ratio(dict(policy))
        self.lr.compress_ratio = dict(policy)
        return self.lr.compress()


def _bounds(keys: List[str], value: Bound, what: str, default: float) -> np.ndarray:
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in keys]
        if unknown:
            raise PruningError(f"{what} names unknown layers {unknown[:5]}; searchable layers: {keys[:8]}")
        vals = [value.get(k, default) for k in keys]
    else:
        vals = [value] * len(keys)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise PruningError(f"{what} must be in [0, 1) (the fraction removed; 1 would empty a layer), got {v!r}")
    return np.asarray(vals, dtype=np.float64)


def build_space(model: nn.Module, example_inputs: Optional[Sequence[Any]], target_macs: Optional[float],
                compressor: Union[str, Callable[[Dict[str, float]], nn.Module]] = "prune",
                calibration: Optional[Iterable] = None, ignore: Iterable[str] = (), min_ratio: Bound = 0.0,
                max_ratio: Bound = 0.8, criterion: Any = "l2",
                compressor_options: Optional[Mapping[str, Any]] = None, target_latency: Optional[float] = None,
                latency_table: Any = None, example_kwargs: Optional[Mapping[str, Any]] = None) -> SearchSpace:
    """Validate the request and build its SearchSpace (see the module docstring). target_latency: a
    budget on the latency predicted by per-layer latency tables (fraction of the original's; built and
    cached here, or `latency_table`), alone (target_macs=None) or beside target_macs. A plain module given
    no example inputs is traced on the first `calibration` batch (a collator's dict by keyword)."""
    from ..compressors.latency import check_target_latency
    from ..compressors.prune import _as_network, _ignore_by_node

    target_latency = check_target_latency(target_latency)
    if target_latency is not None and compressor == "lowrank":
        raise PruningError("target_latency searches channel groups (compressor 'prune', 'channel' or a callable); "
                           "low-rank ranks have no per-layer latency table yet")
    if target_macs is None and target_latency is not None:
        target_macs = 1.0  # latency alone: no MACs budget
    elif isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0.0 < target_macs < 1.0:
        raise PruningError(f"target_macs is the fraction of the original MACs to keep and must be in (0, 1), "
                           f"got {target_macs!r}")
    if not callable(compressor) and compressor not in COMPRESSORS:
        raise PruningError(f"compressor must be one of {COMPRESSORS} or a callable policy -> network, "
                           f"got {compressor!r}")
    if not isinstance(model, ReconstructedNetwork) and example_inputs is None and not example_kwargs \
            and calibration is not None:
        from ..compressors.sampling import example_from_batch

        example_inputs, example_kwargs = example_from_batch(next(iter(calibration)), model)
    net, inputs = _as_network(model, example_inputs, example_kwargs)
    ignore = _ignore_by_node(model, net, ignore)  # node names, containers ("layer4") and modules alike
    options = dict(compressor_options or {})
    if compressor == "lowrank":
        backend: Any = _LowRankBackend(net, inputs, ignore, calibration, options)
        model_fn = backend.model()
    else:
        kind = "callable" if callable(compressor) else compressor
        backend = _ChannelBackend(net, inputs, kind, ignore, criterion, calibration, options,
                                  fn=compressor if callable(compressor) else None)
    if not backend.variables:
        raise PruningError("nothing to search: no prunable group / decomposable layer is left "
                           f"(ignore={ignore[:5]})")
    if compressor != "lowrank":
        model_fn = _channel_model(backend.plan, backend.variables, inputs)
    keys = [v.key for v in backend.variables]
    lo, hi = _bounds(keys, min_ratio, "min_ratio", 0.0), _bounds(keys, max_ratio, "max_ratio", 0.8)
    if np.any(lo > hi):
        bad = [k for k, a, b in zip(keys, lo, hi) if a > b]
        raise PruningError(f"min_ratio is above max_ratio for {bad[:5]}")
    base = int(count(net, *_batch1(inputs))[0])
    space = SearchSpace(net, inputs, compressor if isinstance(compressor, str) else "callable",
                        backend.variables, lo, hi, base, float(target_macs), model_fn, backend)
    if target_latency is not None:
        space.latency = _latency_budget(backend, inputs, target_latency, latency_table)
        reach = space.latency_fraction(hi)
        if reach > target_latency:
            raise PruningError(f"target_latency={target_latency:g} is unreachable: with every layer at its "
                               f"max_ratio the per-layer tables predict {reach:.3f}x of the original latency; "
                               "raise max_ratio or target_latency")
    best = space.macs(hi)
    if best > space.budget and target_macs < 1.0:
        raise PruningError(f"target_macs={target_macs} is unreachable: with every layer at its max_ratio the "
                           f"network keeps {best:,} of {base:,} MACs ({best / base:.3f}); raise max_ratio or "
                           "target_macs, or drop layers from ignore=")
    return space


def _latency_budget(backend: Any, inputs: Tuple[Any, ...], target: float, table: Any) -> LatencyBudget:
    from ..compressors.layer_latency import LayerLatencyTable, layer_table, node_dims, node_widths

    if not hasattr(backend, "plan"):
        raise PruningError("target_latency searches channel groups (compressor 'prune', 'channel' or a callable); "
                           "low-rank ranks have no per-layer latency table yet")
    if table is not None and not isinstance(table, LayerLatencyTable):
        raise PruningError("latency_table must be a LayerLatencyTable (amc.latency_table(..., per_layer=True)), got "
                           f"{type(table).__name__}")
    plan = backend.plan
    dims = node_dims(plan)
    if table is None:
        table = layer_table(plan, inputs, dims=dims, extra_key={"criterion": "l2", "round_to": backend.round_to,
                                                                "ignore": sorted(backend.ignore), "heads": False})
    missing = [n for n in dims if n not in table.a]
    if missing:
        raise PruningError(f"latency_table was built for another network: it has no entry for {missing[:3]}")
    budget = LatencyBudget(float(target), table, plan, dims)
    budget.base_us = table.predict_us(node_widths(dims, np.zeros(len(plan.roots), dtype=bool)))
    return budget
