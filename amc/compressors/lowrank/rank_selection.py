"""Rank per layer: uniform from one compress ratio, or ENC-style under a MACs budget.

ENC (Kim et al. 2019, "Efficient Neural Network Compression") scores every rank of every layer with a
metric in (0, 1] (1: as good as the whole layer) and keeps the ranks that maximise the product of the
per-layer metrics under the budget (`select_ranks`: a Lagrangian sweep over the convex hull, then a
greedy fill). A metric is a small strategy object with one method, `curve(layer)`:

- `EnergyRanks`: the share of the layer's energy the kept components hold (response PCA eigenvalues,
  or the weight's squared singular values);
- `AccuracyRanks`: validation accuracy with only that layer decomposed, on a grid of ranks;
- `CombinedRanks`: their product.

Called as `metric(layer)` it computes each layer's curve once. `ranks_under_budget(metric, ...)` is the
selection a compressor or a tuner runs with any of them; `uniform_ranks` is the budget without a metric.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ...errors import PruningError
from ...graph.network import ReconstructedNetwork
from ...graph.untouched import training_mode
from ..budget import smallest_within_budget
from .edit import decompose
from .eligible import LayerInfo
from .factorize import Factors

__all__ = ["RankMetric", "EnergyRanks", "AccuracyRanks", "CombinedRanks", "ranks_under_budget", "select_ranks",
           "uniform_ranks"]

#: labelled validation batches: (model inputs, labels or None)
ValBatches = List[Tuple[Tuple[Any, ...], Any]]


class RankMetric:
    """Per layer, the quality of ranks 1..full_rank in (0, 1], computed once per layer; subclasses give
    `curve(layer)`."""

    def __init__(self) -> None:
        self._curves: Dict[str, np.ndarray] = {}

    def __call__(self, layer: str) -> np.ndarray:
        if layer not in self._curves:
            self._curves[layer] = self.curve(layer)
        return self._curves[layer]

    def curve(self, layer: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement curve(layer)")


class EnergyRanks(RankMetric):
    """Share of the layer's energy kept at each rank; `spectrum(layer)`: its energies, descending
    (response covariance eigenvalues, or squared singular values of the weight)."""

    def __init__(self, infos: Mapping[str, LayerInfo], spectrum: Callable[[str], torch.Tensor]):
        super().__init__()
        self.infos, self.spectrum = infos, spectrum

    def curve(self, layer: str) -> np.ndarray:
        c = torch.cumsum(self.spectrum(layer), 0)
        e = (c / c[-1].clamp_min(1e-30)).numpy()
        out = np.ones(self.infos[layer].full_rank)
        out[:min(len(e), len(out))] = e[:len(out)]
        return out


def _top1(net: nn.Module, batches: ValBatches, ref: Sequence[torch.Tensor]) -> float:
    """Top-1 accuracy on labelled batches; top-1 agreement with the original (`ref`) on unlabelled ones."""
    correct = total = 0
    with torch.no_grad(), training_mode(net):
        for (x, y), r in zip(batches, ref):
            pred = net(*x).argmax(-1).cpu()
            target = y.cpu() if isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point() else r
            correct += int((pred == target).sum())
            total += int(target.numel())
    return correct / max(total, 1)


class AccuracyRanks(RankMetric):
    """Validation accuracy with only that layer decomposed (`factors(layer, rank)`), measured at `grid`
    ranks up to its max rank and interpolated, relative to the original network's (monotone in rank).
    `batches()` gives the validation batches, read once."""

    def __init__(self, net: ReconstructedNetwork, infos: Mapping[str, LayerInfo],
                 factors: Callable[[str, int], Factors], batches: Callable[[], ValBatches], grid: int):
        super().__init__()
        self.net, self.infos, self.factors, self.batches, self.grid = net, infos, factors, batches, grid
        self._reference: Any = None

    def reference(self) -> Tuple[ValBatches, List[torch.Tensor], float]:
        """(validation batches, the original's predictions on them, its accuracy)."""
        if self._reference is None:
            batches = self.batches()
            with torch.no_grad(), training_mode(self.net):
                pred = [self.net(*x).argmax(-1).cpu() for x, _ in batches]
            self._reference = (batches, pred, _top1(self.net, batches, pred))
        return self._reference

    def curve(self, layer: str) -> np.ndarray:
        batches, ref, base = self.reference()
        info = self.infos[layer]
        grid = np.unique(np.round(np.linspace(1, info.max_rank, max(2, self.grid))).astype(int))
        accs = [_top1(decompose(self.net, {layer: self.factors(layer, int(r))}, self.infos, copy=False), batches, ref)
                for r in grid]
        curve = np.interp(np.arange(1, info.full_rank + 1), grid, accs)
        curve[info.max_rank:] = max(curve[info.max_rank - 1], base)
        curve = np.maximum.accumulate(curve)
        return np.clip(curve / max(base, 1e-12), 1e-6, 1.0)


class CombinedRanks(RankMetric):
    """ENC's combined metric: energy times accuracy."""

    def __init__(self, energy: RankMetric, accuracy: RankMetric):
        super().__init__()
        self.energy, self.accuracy = energy, accuracy

    def curve(self, layer: str) -> np.ndarray:
        e = self.energy(layer)
        return e * self.accuracy(layer)


def ranks_under_budget(metric: Callable[[str], np.ndarray], infos: Mapping[str, LayerInfo], names: Iterable[str],
                       budget: float, method: str) -> Dict[str, int]:
    """{layer: rank} maximising the product of `metric` over `names` with their MACs summing to at most
    `budget`; rank 0: the layer stays whole. `method` ("data"/"svd") decides whether factors carry a bias."""
    options = {}
    for n in names:
        info = infos[n]
        m = metric(n)[: info.max_rank]
        ranks = np.arange(1, info.max_rank + 1)
        costs = np.array([info.macs_after(int(r), info.keeps_bias(method)) for r in ranks], dtype=np.float64)
        # rank 0 = keep the layer whole (metric 1)
        options[n] = (np.concatenate([ranks, [0]]), np.concatenate([costs, [info.macs_before()]]),
                      np.concatenate([m, [1.0]]))
    return select_ranks(options, budget)


def uniform_ranks(infos: Mapping[str, LayerInfo], names: Sequence[str], budget: float, method: str) -> Dict[str, int]:
    """The ranks of the mildest uniform compress ratio whose layers `names` cost at most `budget` MACs."""
    def at(q: float) -> Dict[str, int]:
        return {n: infos[n].rank_for_ratio(q) for n in names}

    def cost(q: float) -> float:
        return sum(infos[n].macs_after(r, infos[n].keeps_bias(method)) for n, r in at(q).items())

    hi = 1.0 - 1e-9
    if cost(hi) > budget:
        raise PruningError(f"cannot reach the MACs budget {budget:,.0f} even at rank 1 everywhere")
    return at(smallest_within_budget(cost, budget, hi, max_steps=60))


def select_ranks(options: Mapping[str, Tuple[np.ndarray, np.ndarray, np.ndarray]], budget: float) -> Dict[str, int]:
    """Maximise sum(log metric) s.t. sum(cost) <= budget; options[l] = (ranks, costs, metrics) with a
    rank of 0 meaning "keep the layer whole". Lagrangian sweep on the convex hull, then greedy fill."""
    names = list(options)
    logm = {n: np.log(np.clip(options[n][2], 1e-12, None)) for n in names}
    costs = {n: options[n][1].astype(np.float64) for n in names}

    def pick(lmb: float) -> Dict[str, int]:
        return {n: int(np.argmax(logm[n] - lmb * costs[n])) for n in names}

    def total(choice: Mapping[str, int]) -> float:
        return sum(costs[n][i] for n, i in choice.items())

    cheapest = {n: int(np.argmin(costs[n])) for n in names}
    if total(cheapest) > budget:
        raise PruningError(f"the MACs budget {budget:,.0f} is below what rank 1 everywhere costs "
                           f"({total(cheapest):,.0f}); ask for less compression")
    hi = 1.0
    while total(pick(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            break
    choice = pick(smallest_within_budget(lambda lmb: total(pick(lmb)), budget, hi, max_steps=100))
    if total(choice) > budget:
        choice = cheapest
    _greedy_fill(choice, costs, logm, budget - total(choice))
    return {n: int(options[n][0][i]) for n, i in choice.items()}


def _greedy_fill(choice: Dict[str, int], costs: Mapping[str, np.ndarray], logm: Mapping[str, np.ndarray],
                 left: float) -> None:
    """Spend what the budget has `left` on the best metric gain per MAC, one option at a time (in place)."""
    while True:
        best, best_gain = None, 0.0
        for n in choice:
            i = choice[n]
            dc = costs[n] - costs[n][i]
            dm = logm[n] - logm[n][i]
            ok = (dc > 0) & (dc <= left) & (dm > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, dm / np.where(dc > 0, dc, 1), -np.inf)
            j = int(np.argmax(ratio))
            if ratio[j] > best_gain:
                best, best_gain = (n, j), ratio[j]
        if best is None:
            return
        n, j = best
        left -= costs[n][j] - costs[n][choice[n]]
        choice[n] = j
