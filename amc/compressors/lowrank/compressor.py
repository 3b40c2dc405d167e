"""LowRankDecomposition: the seed-style compressor; which layers, which ranks, which factors, one edit."""
from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..._batches import dict_targets
from ..._warnings import warn_user
from ...errors import DataError, PruningError
from ...graph.counting import count
from ...graph.network import ReconstructedNetwork
from ..base import BaseCompressor, Ratio, check_count, check_names, check_target_macs
from ..budget import per_sample
from ..calibration import DEFAULT_SEED
from ..sampling import PositionSampler, count_images, stack_batches, warn_underdetermined
from .asymmetric import activation_bytes, fit_in_order
from .edit import decompose
from .eligible import LayerInfo, eligible_layers, output_layers
from .factorize import (Factors, LowRankMap, holdout_images, linear_factors, nonlinear_factors, nonlinear_label,
                        row_mask, rrr, svd_factors)
from .rank_selection import AccuracyRanks, CombinedRanks, EnergyRanks, RankMetric, ranks_under_budget, uniform_ranks
from .responses import Responses, collect_responses, pca

__all__ = ["LowRankDecomposition", "LowRankDecompostion", "METHODS", "RANK_SELECTIONS"]

METHODS = ("data", "svd")
RANK_SELECTIONS = (None, "energy", "accuracy", "combined")


def _asymmetric_limit() -> float:
    """`amc.compressors.lowrank.ASYMMETRIC_MAX_BYTES`, read when used: the package's name is the knob."""
    from . import ASYMMETRIC_MAX_BYTES

    return ASYMMETRIC_MAX_BYTES


def _check_choices(method: str, rank_selection: Optional[str], nonlinear_case: bool,
                   asymmetric: Optional[bool]) -> None:
    if method not in METHODS:
        raise PruningError(f"method must be one of {METHODS}, got {method!r}")
    if rank_selection not in RANK_SELECTIONS:
        raise PruningError(f"rank_selection must be one of {RANK_SELECTIONS}, got {rank_selection!r}")
    if nonlinear_case and method != "data":
        raise PruningError("nonlinear_case=True reconstructs from data: use method='data'")
    if asymmetric and method != "data":
        raise PruningError("asymmetric=True reconstructs from data: use method='data'")


class LowRankDecomposition(BaseCompressor):
    """Seed-style low-rank compressor (see `amc.compressors.lowrank` for the math).

    Extra arguments beyond BaseCompressor's:
      nonlinear_case: reconstruct through the following ReLU/ReLU6 (Zhang et al. 2015 nonlinear case);
        per layer, the nonlinear solution is kept only where its post-ReLU error on held-out calibration
        images (HOLDOUT_FRACTION of them) is below the linear solution's, else the linear one is used
        (`report[layer]` has both errors), so nonlinear is never worse than linear per layer there.
      method: "data" (response PCA, default) or "svd" (weights only; `nonlinear_case` needs "data").
      rank_selection: None (ranks from the ratio per layer), "energy", "accuracy" or "combined" (ENC, the
        strategies of `.rank_selection`): `compress_ratio` (float) is then the fraction of the decomposed
        layers' total MACs removed.
      ranks: explicit {layer: rank}; overrides the ratio for those layers (ranks may reach full rank).
      target_macs: fraction of the whole network's MACs kept (<= 1), e.g. 1/1.5; overrides compress_ratio.
      layers / ignore: restrict the decomposed layers (default: every Conv1d/2d/3d with groups=1 and Linear but
        the layer that writes the network output, see `decompose_output_layer`).
      decompose_output_layer: also decompose, under a float `compress_ratio` or `target_macs`, the layer
        that writes the network output (a classifier's last Linear). Default False: its rank would bound
        the number of separable classes for a negligible share of the MACs (digits CNN at 0.5x: 94.9%
        with it, 98.7% without, scripts/results/robustness.md); channel pruning never shrinks that output either. Naming
        it in `layers`, a `compress_ratio` dict or `ranks` decomposes it anyway.
      fold_bn: fold a conv's sole BatchNorm user into it first (default True): the fit then approximates
        the BN output, the response the next layer sees, and the nonlinear case applies. Measured on the
        digits CNN (scripts/results/robustness.md) folding gives the lower logit error and the higher
        agreement with the original at 0.5x, 0.3x and 0.2x MACs; keep BN (False) to fine-tune afterwards
        (the BN-free network diverges at usual learning rates, see amc.jobs.compress).
      val_batches, acc_grid: cost of the "accuracy" metric (batches per evaluation, ranks measured per layer).
      nonlinear_iters: alternating iterations of the nonlinear solver. seed: calibration images, positions
        and the held-out split (see BaseCompressor).
      asymmetric: fit each layer, in network order, to the original responses from the inputs the
        already-decomposed layers before it produce (Zhang et al. 2015, sec. 3.3), so errors do not
        pile up with depth. One pass over the calibration images, held in memory as one batch.
        Default: on for method="data" (resnet20 at 2x: 88.6% instead of 45.2%); False fits every
        layer on the original network's inputs.
    A `compress_ratio` dict decomposes only the layers it names, each at its own ratio.
    """

    name = "lowrank"
    linear_addmm = True

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 trainset_ratio: float = 0.1, sampled_pixels_per_img: Optional[int] = None,
                 compress_ratio: Ratio = 0.5, checkpointfolder: Optional[str] = None, device: Any = "cpu",
                 verbose: bool = False,
                 drawgraph: bool = False, accuracy_first: bool = False, accuracy_threshold: float = 0.0,
                 nonlinear_case: bool = False, args: Any = None, example_inputs: Optional[Sequence[Any]] = None,
                 method: str = "data", rank_selection: Optional[str] = None,
                 ranks: Optional[Mapping[str, int]] = None, target_macs: Optional[float] = None,
                 layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = (), fold_bn: bool = True,
                 val_batches: int = 4, acc_grid: int = 8, nonlinear_iters: int = 25, seed: int = DEFAULT_SEED,
                 asymmetric: Optional[bool] = None, decompose_output_layer: bool = False):
        _check_choices(method, rank_selection, nonlinear_case, asymmetric)
        self.asymmetric = (method == "data") if asymmetric is None else bool(asymmetric)
        self._asymmetric_by_default = asymmetric is None
        self.nonlinear_case = bool(nonlinear_case)
        self.decompose_output_layer = bool(decompose_output_layer)
        self.method = method
        self.rank_selection = rank_selection
        self.target_macs = check_target_macs(target_macs)
        self.fold_bn = bool(fold_bn)
        self.val_batches = check_count(val_batches, "val_batches")
        self.acc_grid = check_count(acc_grid, "acc_grid")
        self.nonlinear_iters = check_count(nonlinear_iters, "nonlinear_iters", minimum=0)
        layers = None if layers is None else check_names(layers, "layers", model=origin_net)
        self._layers_arg, self._ignore_arg = layers, tuple(check_names(ignore, "ignore", model=origin_net))
        self._responses: Optional[Dict[str, Responses]] = None
        super().__init__(origin_net, trainloader, valloader, trainset_ratio, sampled_pixels_per_img, compress_ratio,
                         checkpointfolder, device, verbose, drawgraph, accuracy_first, accuracy_threshold, args,
                         example_inputs, seed=seed)
        self.infos = eligible_layers(self.origin_graph, self.fold_bn)
        for what, names in (("layers", layers or ()), ("ignore", self._ignore_arg)):
            bad = [n for n in names if n not in self.infos]
            if bad:
                raise PruningError(f"{what} names {bad[:5]} that are not decomposable layers; valid names include "
                                   f"{list(self.infos)[:5]} (Conv1d/2d/3d with groups=1, Linear)")
        self.ranks = self._checked_ranks(ranks)
        self.report: Dict[str, Dict[str, Any]] = {}
        self._energy = EnergyRanks(self.infos, self._spectrum)
        self._accuracy = AccuracyRanks(self.origin_graph, self.infos, functools.partial(self.factors, nonlinear=False),
                                       self._val_batches, self.acc_grid)
        #: the ENC strategy `rank_selection` names (None: ranks from the ratio)
        self.rank_metric: Optional[RankMetric] = {
            None: None, "energy": self._energy, "accuracy": self._accuracy,
            "combined": CombinedRanks(self._energy, self._accuracy)}[rank_selection]

    def _checked_ranks(self, ranks: Optional[Mapping[str, int]]) -> Dict[str, int]:
        if ranks is not None and not isinstance(ranks, Mapping):
            raise PruningError(f"ranks must be a dict {{layer_name: rank}}, got {ranks!r}")
        for k, v in (ranks or {}).items():
            if k not in self.infos:
                raise PruningError(f"ranks names unknown layer {k!r}; valid names include {list(self.infos)[:5]}")
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.infos[k].full_rank:
                raise PruningError(f"ranks[{k!r}] must be an int in [1, {self.infos[k].full_rank}], got {v!r}")
        return dict(ranks or {})

    # -- names --------------------------------------------------------------------------------
    def layer_names(self) -> List[str]:
        """Decomposable layers: Conv1d/2d/3d (groups=1) and Linear nodes."""
        return list(eligible_layers(self.origin_graph, getattr(self, "fold_bn", True)))

    def targets(self, ratio: Ratio) -> List[str]:
        if isinstance(ratio, Mapping):
            names = list(ratio)
        elif self._layers_arg:
            names = list(self._layers_arg)
        else:
            out = set() if self.decompose_output_layer else set(output_layers(self.origin_graph, self.infos))
            names = [n for n in self.infos if n not in out]
        names += [n for n in self.ranks if n not in names]
        skip = set(self._ignore_arg)
        return [n for n in self.infos if n in names and n not in skip]

    # -- data ---------------------------------------------------------------------------------
    def responses(self) -> Dict[str, Responses]:
        if self._responses is None:
            infos = [self.infos[n] for n in self.infos if n not in self._ignore_arg]
            self.log("lowrank: sampling %s positions/image of %d layers on %.0f%% of the training images",
                     self.sampled_pixels_per_img or "auto", len(infos), 100 * self.trainset_ratio)
            self._responses = collect_responses(self.origin_graph, infos, self.calibration_batches(),
                                                self.sampled_pixels_per_img, self.seed)
        return self._responses

    def _val_batches(self) -> List[Tuple[Any, Any]]:
        if self.valloader is None:
            raise DataError("rank_selection='accuracy'/'combined' needs a valloader")
        out = []
        for batch in self.valloader:
            x = self.batch_inputs(batch)
            y = dict_targets(batch) if isinstance(batch, Mapping) else \
                batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            out.append((tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in x), y))
            if len(out) >= self.val_batches:
                break
        if not out:
            raise DataError("valloader yielded no batches")
        return out

    # -- ENC metrics (the strategies of .rank_selection) -----------------------------------------
    def _spectrum(self, name: str) -> torch.Tensor:
        """The layer's energies, descending: response PCA eigenvalues ("data"), squared singular values ("svd")."""
        if self.method == "svd":
            return torch.linalg.svdvals(self.infos[name].weight) ** 2
        return self.responses()[name].evals

    def energy(self, name: str) -> np.ndarray:
        """Fraction of energy kept at rank 1..full_rank."""
        return self._energy(name)

    def accuracy_curve(self, name: str) -> np.ndarray:
        """Normalised val accuracy with only `name` decomposed (linear/svd factors), rank 1..full_rank."""
        return self._accuracy(name)

    def metric(self, name: str) -> np.ndarray:
        """The `rank_selection` metric of `name` at rank 1..full_rank."""
        return self.rank_metric(name)

    # -- factors ------------------------------------------------------------------------------
    def factors(self, name: str, r: int, nonlinear: Optional[bool] = None) -> Factors:
        """Rank-`r` factors (A, P, bias) of layer `name` (records how in `self.report[name]`)."""
        info = self.infos[name]
        nonlinear = self.nonlinear_case if nonlinear is None else nonlinear
        if self.method == "svd":
            self.report[name] = {"rank": r, "method": "svd"}
            return svd_factors(info, r)
        resp = self.responses()[name]
        if nonlinear and info.act is not None and r < info.N:
            holdout = row_mask(holdout_images(count_images(self.calibration_batches()), self.seed), resp.Y.shape[0])
            f, stats = nonlinear_factors(info, resp, r, iters=self.nonlinear_iters, holdout=holdout)
            self.report[name] = {"rank": r, "rows": int(resp.Y.shape[0]), **stats,
                                 "method": nonlinear_label(info, stats)}
            return f
        if nonlinear and info.act is None:
            why = ("its BatchNorm was not folded (fold_bn=False)" if not self.fold_bn and
                   any(u.op.startswith("BatchNorm") for u in self.origin_graph.users()[name])
                   else "it is not followed by a ReLU/ReLU6")
            self.log("lowrank: %s uses the linear case: %s", name, why)
        self.report[name] = {"rank": r, "method": "linear", "rows": int(resp.Y.shape[0])}
        return linear_factors(info, resp, r)

    def _bias_after(self, name: str) -> bool:
        return self.infos[name].keeps_bias(self.method)

    # -- planning ranks -----------------------------------------------------------------------
    def plan_ranks(self, ratio: Ratio) -> Dict[str, int]:
        """{layer: rank} for `ratio` (or `target_macs`); a layer missing from the result stays whole."""
        names = self.targets(ratio)
        if not names:
            raise PruningError("no decomposable layer selected (Conv1d/2d/3d with groups=1 or Linear)")
        free = [n for n in names if n not in self.ranks]
        fixed = {n: self.ranks[n] for n in names if n in self.ranks}
        if self.target_macs is not None:
            budget = self._target_budget(free, fixed)
            if budget is None:
                return fixed
            if self.rank_selection is None:
                return {**fixed, **uniform_ranks(self.infos, free, budget, self.method)}
            return {**fixed, **self._select(free, budget)}
        if isinstance(ratio, Mapping) or self.rank_selection is None:
            out = dict(fixed)
            for n in free:
                r = float(ratio[n]) if isinstance(ratio, Mapping) else float(ratio)
                out[n] = self.infos[n].rank_for_ratio(r)
            return out
        budget = (1.0 - float(ratio)) * sum(self.infos[n].macs_before() for n in free)
        return {**fixed, **self._select(free, budget)}

    def _target_budget(self, free: List[str], fixed: Mapping[str, int]) -> Optional[float]:
        """The MACs the `free` layers may keep under `target_macs`, the `fixed` ranks counted; None when
        they need not shrink at all."""
        total, _ = count(self.origin_graph, *per_sample(self.example_inputs))
        fixed_delta = sum(self.infos[n].macs_before() - self.infos[n].macs_after(r, self._bias_after(n))
                          for n, r in fixed.items())
        need = total * (1.0 - self.target_macs) - fixed_delta  # MACs the free layers must remove
        before = sum(self.infos[n].macs_before() for n in free)
        if need <= 0:
            return None
        if need > before:
            raise PruningError(f"target_macs={self.target_macs:.4f} needs {need:,.0f} fewer MACs but the "
                               f"decomposable layers only cost {before:,.0f}")
        return before - need

    def _select(self, names: List[str], budget: float) -> Dict[str, int]:
        chosen = ranks_under_budget(self.rank_metric, self.infos, self.progress(names, "rank metrics"), budget,
                                    self.method)
        self.log("lowrank: %s selection kept %d of %d layers whole", self.rank_selection,
                 sum(1 for r in chosen.values() if r == 0), len(chosen))
        return {n: r for n, r in chosen.items() if r > 0}

    # -- the pass -----------------------------------------------------------------------------
    def _compress(self, ratio: Ratio) -> ReconstructedNetwork:
        ranks = self.plan_ranks(ratio)
        self.report = {}
        factors = {}
        if self.asymmetric:  # implies method == "data" (checked in __init__)
            factors = self._asymmetric_factors(ranks)
        for n in self.progress([n for n in ranks if n not in factors], "decomposing"):
            A, P, b = self.factors(n, ranks[n])
            factors[n] = (A, P, b if self._bias_after(n) else None)
        if self.method == "data":
            warn_underdetermined("LowRankDecomposition", [(n, int(self.report[n].get("rows", 0)), self.infos[n].N)
                                                          for n in factors if n in self.report],
                                 self.sampled_pixels_per_img)
        net = decompose(self.origin_graph, factors, self.infos, copy=True,
                        extra_meta={n: {"method": self.report[n]["method"]} for n in factors})
        self.chosen_ranks = ranks
        self.log("lowrank: decomposed %d layers (%s)", len(factors),
                 ", ".join(f"{n}:r={r}" for n, r in list(ranks.items())[:8]) + (" ..." if len(ranks) > 8 else ""))
        return net

    def _asymmetric_factors(self, ranks: Mapping[str, int]) -> Dict[str, Factors]:
        """Factors fitted in network order against the original responses (`.asymmetric`); {} when the
        default asymmetric pass would need more memory than ASYMMETRIC_MAX_BYTES (then per layer)."""
        batches = self.calibration_batches()
        n_images = count_images(batches)
        need, limit = activation_bytes(self.origin_graph, n_images), _asymmetric_limit()
        if need > limit:
            msg = (f"the asymmetric low-rank pass holds all {n_images} calibration images as one batch, about "
                   f"{need / 2**30:.1f} GiB of activations (limit {limit / 2**30:.0f} GiB); lower trainset_ratio")
            if not self._asymmetric_by_default:
                raise DataError(msg + ", or pass asymmetric=False")
            warn_user(msg + "; falling back to the per-layer fit (asymmetric=False) for this run")
            return {}
        fit = functools.partial(self._fit_asymmetric, ranks, holdout_images(n_images, self.seed))
        return fit_in_order(self.origin_graph, [self.infos[n] for n in ranks], stack_batches(batches),
                            PositionSampler(self.sampled_pixels_per_img, n_images, self.seed), fit, self.progress)

    def _fit_asymmetric(self, ranks: Mapping[str, int], held: torch.Tensor, info: LayerInfo, X: torch.Tensor,
                        Y: torch.Tensor) -> LowRankMap:
        """One layer's map y' = P Q x + c from its approximated-network responses X to the original's Y."""
        r = ranks[info.name]
        if self.nonlinear_case and info.act is not None and r < info.N:
            (P, Q, c), stats = nonlinear_factors(info, pca(Y), r, iters=self.nonlinear_iters, X=X, raw=True,
                                                 holdout=row_mask(held, Y.shape[0]))
            self.report[info.name] = {"rank": r, "rows": int(Y.shape[0]), **stats,
                                      "method": nonlinear_label(info, stats) + ", asymmetric"}
            return P, Q, c
        self.report[info.name] = {"rank": r, "method": "linear, asymmetric", "rows": int(Y.shape[0])}
        return rrr(Y, X, r)

    def backoff(self, ratio: Ratio, attempt: int) -> Ratio:
        if self.target_macs is not None:
            self.target_macs = 1.0 - (1.0 - self.target_macs) * 0.8
        return super().backoff(ratio, attempt)


#: the seed's spelling
LowRankDecompostion = LowRankDecomposition
