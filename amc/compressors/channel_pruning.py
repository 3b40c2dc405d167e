"""Channel pruning by LASSO channel selection + least-squares reconstruction (He et al., ICCV 2017).

    cp = ChannelPruning(net, trainloader, valloader, compress_ratio=0.5)   # half of each layer's MACs
    small = cp.compress()                                                  # a ReconstructedNetwork
    small = ChannelPruning(net, trainloader, target_macs=0.4).compress()   # 0.4x the network's MACs

For every prunable channel group (`amc.compressors.plan_pruning`; residual groups included) the layers
that *consume* the group's channels (Conv2d with groups=1, Linear) are sampled (`amc.compressors.sampling`):
`sampled_pixels_per_img` output positions per calibration image (default None: enough for `ROWS_PER_DIM`
rows per input column of the layer's least-squares fit, at least 10 per image), the input patch X at
each position and the original output Y. Calibration images and positions come from the compressor's
`seed` only.
The contribution of unit u to a consumer's output is Z_u = X_u W_u^T, so Y = sum_u Z_u (+ the rest).

1. Selection: beta = argmin ||sum_u Z_u - sum_u beta_u Z_u||^2 + alpha |beta|_1 with at most k nonzeros,
   solved by LARS on the unit Gram matrix G[u, v] = <Z_u, Z_v> (several consumers: their Grams, each
   normalised by its ||Y||^2, are summed). G is formed without materialising Z: with M = W^T W and
   S = X^T X over the (channel, kernel) columns, G = U^T blocksum(M * S) U, U mapping channels to units.
   Baselines on the same statistics: "first_k" (keep the first k units) and "max_response" (the k
   largest ||Z_u|| = sqrt(G[u, u])).
2. All groups are pruned at once (`plan.apply_units`).
3. Least squares: consumer by consumer in topological order, in ONE pass of the pruned network over the
   calibration images, the consumer's kept weights (and bias) are re-fitted so that the PRUNED inputs
   reproduce the ORIGINAL outputs at the sampled positions; the corrected output replaces the pass's
   output in place, so later layers see corrected inputs (errors do not accumulate). The fit is ridge
   regression towards the original kept weights (normal equations in float64): with few calibration
   rows (100 images x 10 positions against 512 x 9 columns) plain least squares is underdetermined.

Budgets (seed 003 section 4, the same vocabulary as `LowRankDecomposition`):

- `compress_ratio` r (float): the fraction of each conv/linear layer's MACs removed. Channels are
  shared by the layers that write and read them, so one uniform channel fraction p is used for every
  group, found by bisection so that the conv/linear layers pruning can shrink lose r of their summed
  MACs: a layer whose input and output channels are both pruned loses 1 - (1 - p)^2 (about r), one with
  a frozen side (the stem, the classifier) loses p. r = 0.5 gives about 0.5x the network's MACs.
  `channel_fraction(r)` reports p.
- `compress_ratio` dict `{layer: r}`: keyed by conv/linear node names; a key prunes the INPUT channels
  of that layer (the group it consumes, as in He et al.) by the fraction r, which removes r of that
  layer's MACs while its output channels stay; for a layer that consumes no prunable group (the first
  conv) its output channels. Groups not named are not pruned; a layer whose input and output groups
  are both named loses 1 - (1 - r_in)(1 - r_out).
- `round_to` n: every pruned group keeps a multiple of n channels (rounded up), as in `amc.prune`; with
  `target_macs` the groups then win rounding steps back while the budget holds, as `amc.prune` does, so
  LASSO prunes the same counts per group as L2 would (not one ratio rounded up everywhere at once).
- `target_macs` t: the whole network keeps at most t of its MACs (overrides `compress_ratio`);
  `uniform_ratio_for_macs(t)` gives the float `compress_ratio` that reaches it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import PruningError
from ..graph import reparam
from ..graph.capture import example_tuple
from ..graph.counting import node_costs
from ..graph.network import ReconstructedNetwork
from .apply import apply
from .base import BaseCompressor, Ratio, check_names, check_target_macs
from .budget import per_sample, smallest_within_budget
from .calibration import DEFAULT_SEED
from .channel_selection import SELECTIONS, choose_units, lasso_select, unit_gram
from .groups import keep_counts, select_units
from .prune import PruningPlan, check_round_to, group_ratios_for_macs, plan_pruning, ratio_for_macs
from .refit import fit_layer, relative_error
from .sampling import (PositionSampler, conv_patches, count_images, hooked_pass, input_rows, observe, output_rows,
                       stack_batches, warn_underdetermined)

logger = logging.getLogger("amc.compressors")

__all__ = ["ChannelPruning", "ChannelPrunning", "ChannelBudget", "SELECTIONS", "uniform_ratio_for_macs", "lasso_select",
           "fit_layer", "unit_gram", "conv_patches"]  # conv_patches: re-exported from .sampling, its home


# ------------------------------------------------------------------------------------------------
# what is sampled


@dataclass
class _Consumer:
    """A layer that reads a group's channels through dim 1 of its weight."""

    node: str
    group: int
    unit_index: np.ndarray  # input channel (or feature) -> unit of the group, -1: not this group's


@dataclass
class _LayerSample:
    """What the original network did at one layer, at the sampled positions."""

    pos: Optional[torch.Tensor]  # [N, P] flat output positions (conv) or row positions (linear 3-d+)
    y: torch.Tensor  # [N * P, out] original output (bias included)
    grams: Dict[int, torch.Tensor] = field(default_factory=dict)  # group id -> [n, n] float64


def _conv_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and not m.transposed


def _fan_in(module: nn.Module) -> int:
    """Columns of a conv/linear layer's least-squares fit: in_channels / groups x kernel area, or in_features."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * int(np.prod(module.kernel_size))
    return int(module.weight.shape[1])


def _flat_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# budgets


class ChannelBudget:
    """`compress_ratio` (fraction of the conv/linear layers' MACs removed) <-> the uniform fraction of
    every group's channels pruned, on one pruning plan, measured on the exact pruned shapes."""

    def __init__(self, plan: PruningPlan):
        self.plan = plan
        self._macs: Dict[float, Dict[str, int]] = {}
        self._fractions: Dict[float, float] = {}  # compress_ratio -> channel fraction
        self._group_fractions: Dict[float, List[float]] = {}  # -target_macs -> per-group fractions

    def layer_macs(self, fraction: float) -> Dict[str, int]:
        """MACs per sample of every conv/linear node with all groups pruned at the channel `fraction`."""
        key = round(float(fraction), 12)
        if key not in self._macs:
            plan = self.plan
            net = plan.net if fraction <= 0 else apply(plan.net, plan.analysis, plan.roots,
                                                       plan.pruned_roots(fraction), "hard")
            self._macs[key] = {r["name"]: int(r["macs"]) for r in node_costs(net, *per_sample(plan.example_inputs))
                               if isinstance(net.module_of(r["name"]), (nn.modules.conv._ConvNd, nn.Linear))}
        return self._macs[key]

    def shrinkable_macs(self, fraction: float) -> int:
        """Summed MACs, at `fraction`, of the conv/linear layers that pruning can shrink."""
        full, most, now = self.layer_macs(0.0), self.layer_macs(0.99), self.layer_macs(fraction)
        return sum(now[n] for n in full if most.get(n, full[n]) < full[n])

    def channel_fraction(self, compress_ratio: float) -> float:
        """Smallest uniform channel fraction at which those layers lose `compress_ratio` of their MACs."""
        r = float(compress_ratio)
        if r <= 0.0:
            return 0.0
        if r in self._fractions:
            return self._fractions[r]
        base, floor = self.shrinkable_macs(0.0), self.shrinkable_macs(0.99)
        target = (1.0 - r) * base * (1 + 1e-12) + 1e-6  # MACs are integers: a ratio read back reaches them
        if base == 0 or floor > target:
            most = 1.0 - floor / max(base, 1)
            raise PruningError(f"compress_ratio={r} asks for {r:.0%} of the conv/linear MACs, but pruning every "
                               f"group down to 1% of its channels (at least one each) removes only {most:.1%} of them; "
                               "lower compress_ratio")
        self._fractions[r] = smallest_within_budget(self.shrinkable_macs, target, hi=0.99, tol=5e-4)
        return self._fractions[r]

    def fraction_for_target(self, target_macs: float) -> float:
        """Smallest uniform channel fraction at which the whole network keeps <= `target_macs` of its MACs."""
        key = -float(target_macs)  # negative keys: whole-network targets, beside compress_ratio entries
        if key not in self._fractions:
            self._fractions[key] = ratio_for_macs(self.plan, target_macs)
        return self._fractions[key]

    def group_fractions_for_target(self, target_macs: float) -> List[float]:
        """Per-group channel fractions for `target_macs`: the uniform fraction, and with `round_to` the
        rounding steps won back while the budget holds (as `amc.prune(target_macs=..., round_to=...)`)."""
        key = -float(target_macs)
        if key not in self._group_fractions:
            self._group_fractions[key] = group_ratios_for_macs(self.plan, target_macs)
        return self._group_fractions[key]

    def ratio_for_target(self, target_macs: float) -> float:
        """The float compress_ratio that prunes exactly as `target_macs` does (without `round_to`; with
        it, `target_macs` also gives rounding steps back per group, which one float cannot say)."""
        p = self.fraction_for_target(target_macs)
        r = 1.0 - self.shrinkable_macs(p) / max(self.shrinkable_macs(0.0), 1)
        self._fractions[r] = p
        return r


# ------------------------------------------------------------------------------------------------
# the compressor


class ChannelPruning(BaseCompressor):
    """He et al. 2017 channel pruning on amc's coupled channel groups (see the module docstring).

    Seed arguments are those of `BaseCompressor`, plus `lars_alpha_init` (initial LASSO penalty of the
    fallback alpha search). `compress_ratio` is the fraction of each conv/linear layer's MACs removed
    (module docstring, "Budgets"). Extras: `target_macs` (fraction of the whole network's MACs kept;
    overrides `compress_ratio`), `selection` ("lasso" | "first_k" | "max_response"), `least_squares`
    (re-fit weights after pruning), `ridge` (relative ridge of that fit), `seed` (calibration images
    and positions), `ignore` (layers whose output channels stay).

    After `compress()`: `self.kept` maps group producers to kept unit indices, `self.layer_errors`
    maps consumer names to the relative reconstruction error of their output before/after the fit.
    """

    name = "channel_pruning"

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 trainset_ratio: float = 0.1, sampled_pixels_per_img: Optional[int] = None,
                 compress_ratio: Ratio = 0.5, checkpointfolder: Optional[str] = None, device: Any = "cpu",
                 verbose: bool = False, drawgraph: bool = False, lars_alpha_init: float = 1e-4,
                 accuracy_first: bool = False, accuracy_threshold: float = 0.0, args: Any = None,
                 example_inputs: Optional[Sequence[Any]] = None, selection: str = "lasso", least_squares: bool = True,
                 ridge: float = 1e-3, seed: int = DEFAULT_SEED, ignore: Iterable[str] = (),
                 target_macs: Optional[float] = None, round_to: int = 1):
        check_round_to(round_to)
        if selection not in SELECTIONS:
            raise PruningError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if isinstance(lars_alpha_init, bool) or not isinstance(lars_alpha_init, (int, float)) or lars_alpha_init < 0:
            raise PruningError(f"lars_alpha_init must be a non-negative float, got {lars_alpha_init!r}")
        if not isinstance(ridge, (int, float)) or ridge < 0:
            raise PruningError(f"ridge must be a non-negative float, got {ridge!r}")
        self.lars_alpha_init = float(lars_alpha_init)
        self.selection = selection
        self.least_squares = bool(least_squares)
        self.ridge = float(ridge)
        self.target_macs = check_target_macs(target_macs)
        self.ignore = check_names(ignore, "ignore", model=origin_net)
        self.round_to = int(round_to)
        self._plan: Optional[PruningPlan] = None
        self._samples: Optional[Dict[str, _LayerSample]] = None
        self._calib: Optional[Tuple[Any, ...]] = None
        self.kept: Dict[Tuple[str, ...], np.ndarray] = {}
        self.layer_errors: Dict[str, Dict[str, float]] = {}
        self.sampled_rows: Dict[str, int] = {}  # consumer -> calibration rows its fit used
        self._budget: Optional[ChannelBudget] = None
        super().__init__(origin_net, trainloader, valloader, trainset_ratio=trainset_ratio,
                         sampled_pixels_per_img=sampled_pixels_per_img, compress_ratio=compress_ratio,
                         checkpointfolder=checkpointfolder, device=device, verbose=verbose, drawgraph=drawgraph,
                         accuracy_first=accuracy_first, accuracy_threshold=accuracy_threshold, args=args,
                         example_inputs=example_inputs, seed=seed)

    # -- structure ------------------------------------------------------------------------------
    def layer_names(self) -> List[str]:
        """Conv2d / Linear node names: the keys a `compress_ratio` dict may use."""
        g = self.origin_graph
        return [n.name for n in g.layer_nodes if isinstance(g.network[n.module], (nn.Conv2d, nn.Linear))]

    @property
    def plan(self) -> PruningPlan:
        if self._plan is None:
            self._plan = plan_pruning(self.origin_graph, "l2", self.example_inputs, ignore=self.ignore,
                                      round_to=self.round_to)
        return self._plan

    def consumers(self) -> Dict[int, List[_Consumer]]:
        """Group id -> the conv (groups=1) / linear layers reading its channels, in topological order."""
        plan = self.plan
        order = {n.name: i for i, n in enumerate(plan.net.layer_nodes)}
        out: Dict[int, List[_Consumer]] = {}
        for gi, g in enumerate(plan.groups):
            cons = []
            for m in g.members:
                if m.axis.attr != "weight" or m.axis.dim != 1:
                    continue
                mod = plan.net.module_of(m.axis.node)
                if _conv_ok(mod) or isinstance(mod, nn.Linear):
                    cons.append(_Consumer(m.axis.node, gi, m.unit_index))
            out[gi] = sorted(cons, key=lambda c: order[c.node])
        return out

    def groups_of_key(self, key: str) -> List[int]:
        """The groups a `compress_ratio` key names: the groups whose channels the layer consumes (He et al.:
        pruning layer L removes L's input channels), else, for a layer that consumes no prunable group
        (e.g. the first conv), the groups it produces."""
        cons = [gi for gi, cs in self.consumers().items() if any(c.node == key for c in cs)]
        if cons:
            return cons
        return [gi for gi, g in enumerate(self.plan.groups) if key in g.producers]

    def validate_ratio(self, ratio: Ratio) -> None:
        super().validate_ratio(ratio)
        if isinstance(ratio, Mapping):
            for k in ratio:
                if not self.groups_of_key(k):
                    raise PruningError(f"compress_ratio names layer {k!r}, whose channels cannot be pruned (its "
                                       "input and output channels are frozen, e.g. by the network output); "
                                       f"prunable layers include {self.prunable_layer_names()[:5]}")

    def prunable_layer_names(self) -> List[str]:
        return [n for n in self.layer_names() if self.groups_of_key(n)]

    def group_ratios(self, ratio: Ratio) -> Dict[int, float]:
        """Group id -> fraction of its channels to prune (`target_macs`, when set, decides instead)."""
        if self.target_macs is not None:
            return dict(enumerate(self.budget.group_fractions_for_target(self.target_macs)))
        if not isinstance(ratio, Mapping):
            p = self.channel_fraction(float(ratio))
            return {gi: p for gi in range(len(self.plan.groups))}
        out: Dict[int, float] = {}
        for k, v in ratio.items():
            for gi in self.groups_of_key(k):
                out[gi] = max(out.get(gi, 0.0), float(v))
        return out

    # -- budgets: compress_ratio (per-layer MACs removed) <-> uniform channel fraction ------------
    @property
    def budget(self) -> "ChannelBudget":
        if self._budget is None:
            self._budget = ChannelBudget(self.plan)
        return self._budget

    def channel_fraction(self, compress_ratio: float) -> float:
        """The uniform fraction of every group's channels pruned for a float `compress_ratio`."""
        return self.budget.channel_fraction(compress_ratio)

    def uniform_ratio_for_macs(self, target_macs: float = 0.5) -> float:
        """The float `compress_ratio` (fraction of the conv/linear MACs removed) whose pruned network
        keeps at most `target_macs` of the original MACs; passing it back gives exactly that network."""
        return self.budget.ratio_for_target(target_macs)

    # -- statistics of the original network (ratio independent, cached across back-off attempts) --
    def calibration_inputs(self) -> Tuple[Any, ...]:
        if self._calib is None:
            self._calib = stack_batches(self.calibration_batches())
        return self._calib

    def collect(self) -> Dict[str, _LayerSample]:
        """One pass of the original network: sampled outputs and unit Gram matrices of every consumer."""
        if self._samples is not None:
            return self._samples
        cons_by_node: Dict[str, List[_Consumer]] = {}
        for gi, cons in self.consumers().items():
            for c in cons:
                cons_by_node.setdefault(c.node, []).append(c)
        inputs = self.calibration_inputs()
        sampler = PositionSampler(self.sampled_pixels_per_img, count_images([inputs]), self.seed)
        samples: Dict[str, _LayerSample] = {}
        bar = iter(self.progress(range(len(cons_by_node)), desc="channel pruning: sampling", total=len(cons_by_node)))

        def record(node, module, args, kwargs, out) -> None:
            cons = cons_by_node.get(node.name)
            if cons is None:
                return
            conv = isinstance(module, nn.Conv2d)
            pos = sampler.draw(out, _fan_in(module), channels_first=conv)
            xs, w = input_rows(module, args[0], pos), _flat_weight(module)
            kk = w.shape[1] // len(cons[0].unit_index)
            s = _LayerSample(pos, output_rows(out, pos, channels_first=conv).cpu())
            for c in cons:
                n_units = len(self.plan.groups[c.group].units)
                s.grams[c.group] = unit_gram(xs, w, c.unit_index, n_units, kk).cpu()
            samples[node.name] = s
            next(bar, None)

        last = [n.name for n in self.origin_graph.layer_nodes if n.name in cons_by_node]
        observe(self.origin_graph, [inputs], record, stop_after=last[-1] if last else None)
        self._samples = samples
        return samples

    # -- the pass -------------------------------------------------------------------------------
    def select(self, ratio: Ratio) -> np.ndarray:
        """Roots of the units to prune in every group at `ratio` (also fills `self.kept`)."""
        plan = self.plan
        samples = self.collect()
        pruned: List[np.ndarray] = []
        self.kept = {}
        ratios = self.group_ratios(ratio)
        for gi, cons in self.consumers().items():
            g = plan.groups[gi]
            r = ratios.get(gi, 0.0)
            n_prune = keep_counts(g, r) if r > 0 else 0
            if n_prune <= 0:
                continue
            k = g.size - n_prune
            grams = [samples[c.node].grams[gi] for c in cons if c.node in samples and gi in samples[c.node].grams]
            if not grams:  # nothing reads the group through a weight: magnitude, as amc.prune would
                pruned.append(select_units(g, plan.importance[gi], r))
                continue
            gram = sum(gm / max(float(gm.sum()), 1e-30) for gm in grams)  # each consumer's ||Y||^2 -> 1
            kept = choose_units(self.selection, gram, k, self.lars_alpha_init)
            mask = np.ones(g.size, dtype=bool)
            mask[kept] = False
            self.kept[tuple(g.producers)] = kept
            pruned.append(g.units[mask])
        return np.concatenate(pruned) if pruned else np.zeros(0, dtype=np.int64)

    def _compress(self, ratio: Ratio) -> ReconstructedNetwork:
        plan = self.plan
        if not isinstance(ratio, Mapping) or self.target_macs is not None:
            self.log("channel pruning: uniform channel fraction %.4f (%s)", next(iter(self.group_ratios(ratio).values()), 0.0),
                     f"target_macs={self.target_macs}" if self.target_macs is not None else f"compress_ratio={ratio}")
        pruned_roots = self.select(ratio)
        pruned = plan.apply_units(pruned_roots)
        self.layer_errors = {}
        self.sampled_rows = {}
        if self.least_squares and len(pruned_roots):
            self._fit_dims: List[Tuple[str, int, int]] = []
            self.reconstruct(pruned, pruned_roots)
            warn_underdetermined("ChannelPruning least squares", self._fit_dims, self.sampled_pixels_per_img)
        return pruned

    def backoff(self, ratio: Ratio, attempt: int) -> Ratio:
        if self.target_macs is not None:
            self.target_macs = 1.0 - (1.0 - self.target_macs) * 0.8
        return super().backoff(ratio, attempt)

    def _out_keep(self, node: str, pruned_roots: np.ndarray) -> Optional[np.ndarray]:
        """Kept output rows of `node`'s weight (None: all)."""
        a, roots = self.plan.analysis, self.plan.roots
        mask = np.zeros(len(roots), dtype=bool)
        mask[pruned_roots] = True
        for ax in a.axes:
            if ax.node == node and ax.attr == "weight" and ax.dim == 0:
                keep = ~mask[roots[ax.vec]]
                return None if keep.all() else np.flatnonzero(keep)
        return None

    def reconstruct(self, pruned: ReconstructedNetwork, pruned_roots: np.ndarray) -> None:
        """Least squares on every consumer of a pruned group, in one pass of the pruned network.

        A forward pre-hook on each consumer fits its weights on the inputs it is about to receive,
        so the layer then runs with the corrected weights and later layers see corrected inputs.
        """
        samples = self.collect()
        mask = np.zeros(len(self.plan.roots), dtype=bool)
        mask[pruned_roots] = True
        targets = set()
        for gi, cons in self.consumers().items():
            g = self.plan.groups[gi]
            if mask[g.units].any():
                targets.update(c.node for c in cons if c.node in samples)
        if not targets:
            return
        bar = iter(self.progress(range(len(targets)), desc="channel pruning: least squares", total=len(targets)))

        def fit(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                self._fit_one(name, module, args[0], samples[name], pruned_roots)
                next(bar, None)
            return hook

        hooked_pass(pruned, self.calibration_inputs(), {name: fit(name) for name in targets}, pre=True)

    def _fit_one(self, name: str, module: nn.Module, x: torch.Tensor, s: _LayerSample,
                 pruned_roots: np.ndarray) -> None:
        xs = input_rows(module, x, s.pos)
        rows = self._out_keep(name, pruned_roots)
        y = (s.y if rows is None else s.y[:, torch.from_numpy(rows)]).to(xs.device)
        w0 = _flat_weight(module)
        b0 = module.bias.detach() if module.bias is not None else None
        before = xs @ w0.T + (b0 if b0 is not None else 0)
        self.sampled_rows[name] = int(xs.shape[0])
        self._fit_dims.append((name, int(xs.shape[0]), int(xs.shape[1])))
        w, b = fit_layer(xs, y, w0, b0, self.ridge)
        w = w.to(module.weight.dtype)
        reparam.assign(module, "weight", w.reshape(module.weight.shape))  # a weight-normed one through g and v
        if b is not None:
            module.bias.data.copy_(b.to(module.bias.dtype))
        after = xs @ w.T + (module.bias.detach() if module.bias is not None else 0)
        self.layer_errors[name] = {"before": relative_error(before, y), "after": relative_error(after, y)}


def uniform_ratio_for_macs(net: nn.Module, example_inputs: Sequence[Any], target_macs: float = 0.5,
                           ignore: Iterable[str] = ()) -> float:
    """The float compress_ratio (fraction of the conv/linear MACs removed) whose channel-pruned network
    keeps at most `target_macs` (fraction) of `net`'s MACs."""
    plan = plan_pruning(net, "l2", example_tuple(example_inputs, PruningError), ignore=ignore)
    return ChannelBudget(plan).ratio_for_target(target_macs)


ChannelPrunning = ChannelPruning  # the seed's spelling
