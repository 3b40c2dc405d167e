"""Filter-importance criteria: one registry, one class per criterion, `__call__(group) -> Tensor`.

A criterion scores every prunable unit of a group (higher = more important); the group's members
(every parameter slice the unit owns, in producers and consumers alike) all contribute.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import PruningError
from .calibration import DEFAULT_SEED, iter_calibration, seeded_rng
from .groups import Group, Member, param_of
from .dependency import owner_of, tensor_identity
from ..graph import reparam
from .._batches import class_rows, logits_of, targets_of
from ..graph.untouched import training_mode
from .sampling import batch_inputs, observe

CRITERIA: Dict[str, Type["Criterion"]] = {}


def register_criterion(name: str) -> Callable[[Type["Criterion"]], Type["Criterion"]]:
    def deco(cls: Type["Criterion"]) -> Type["Criterion"]:
        if name in CRITERIA:
            warnings.warn(f"amc: criterion {name!r} overwritten", stacklevel=2)
        CRITERIA[name] = cls
        cls.name = name
        return cls
    return deco


class Criterion:
    """Base class. `data_driven` criteria get `prepare(net, analysis, dataloader)` called first."""

    name = "base"
    data_driven = False

    def prepare(self, net: nn.Module, analysis: Any, dataloader: Optional[Iterable]) -> None:
        self.net = net
        self.analysis = analysis

    def __call__(self, group: Group) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _param(self, m: Member) -> torch.Tensor:
        return param_of(self.net, self.net.node(m.axis.node).module, m.axis.attr).detach()


def _slices(p: torch.Tensor, dim: int) -> torch.Tensor:
    """[size along dim, rest]: one row per channel slice."""
    flat = p.movedim(dim, 0).reshape(p.shape[dim], -1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def _scatter(group: Group, m: Member, values: torch.Tensor, out: torch.Tensor) -> None:
    idx = torch.from_numpy(m.unit_index)
    ok = idx >= 0
    out.index_add_(0, idx[ok], values[ok].double())


class Magnitude(Criterion):
    p = 2.0

    def __call__(self, group: Group) -> torch.Tensor:
        out = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            if m.axis.attr.endswith(("running_mean", "running_var")):
                continue
            w = self._param(m)
            w = w if w.dtype in (torch.float32, torch.float64) else w.float()
            _scatter(group, m, _power_sums(w, m.axis.dim, self.p), out)
        return out.pow(1.0 / self.p)


def _power_sums(w: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """sum |w|^p over every slice along `dim`. A reduction over the leading dims (a conv's input
    channels) is a strided one that torch runs 2-3x slower than summing a [outer, n, inner] view."""
    if w.dim() == 1:
        return w.abs().pow(p)
    if dim == 0:
        return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1).pow(p)
    if w.numel() == 0:
        return w.new_zeros(w.shape[dim])
    x = w * w if p == 2 else w.abs().pow(p)
    outer, inner = int(np.prod(w.shape[:dim])), int(np.prod(w.shape[dim + 1:]))
    if inner == 1:  # a Linear's input columns: summing a size-1 axis would copy the whole matrix first
        return x.reshape(outer, w.shape[dim]).sum(0)
    return x.reshape(outer, w.shape[dim], inner).sum(2).sum(0)


@register_criterion("l1")
class L1(Magnitude):
    """Sum of |w| over every slice the channel owns (Li et al. filter norm)."""

    p = 1.0


@register_criterion("l2")
class L2(Magnitude):
    """L2 norm over every slice the channel owns (Torch-Pruning's group magnitude, p=2)."""

    p = 2.0


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores (a baseline)."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, group: Group) -> torch.Tensor:
        return torch.rand(group.size, generator=self.gen, dtype=torch.float64)


def _producer_members(group: Group) -> List[Member]:
    """Members that are a layer's output filters (weight rows of conv/linear, parameter dims)."""
    out = []
    for m in group.members:
        if m.axis.attr in ("weight", "value") and m.axis.dim == 0:
            out.append(m)
    return out


@register_criterion("fpgm")
class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019): filters near the median are redundant."""

    def __call__(self, group: Group) -> torch.Tensor:
        out = torch.zeros(group.size, dtype=torch.float64)
        members = [m for m in _producer_members(group) if self._param(m).dim() > 1] or group.members
        for m in members:
            idx = torch.from_numpy(m.unit_index)
            ok = idx >= 0
            flat = _slices(self._param(m), m.axis.dim)[ok]
            if flat.shape[0] < 2:
                continue
            dist = torch.cdist(flat, flat).sum(1)
            out.index_add_(0, idx[ok], dist.double())
        return out


def run_with_observer(net: nn.Module, dataloader: Iterable, observer: Callable, max_batches: int,
                      seed: int = DEFAULT_SEED) -> None:
    """Run `net` on `max_batches` batches' worth of `dataloader`, drawn with `seed` (a map-style
    DataLoader is sampled through its dataset); the caller's RNG and loader are left as they were."""
    with seeded_rng(seed):
        batches = iter_calibration(dataloader, 1.0, seed, max_batches=max_batches)
        observe(net, (batch_inputs(b, net) for b in batches), observer)


def _require_loader(name: str, dataloader: Optional[Iterable]) -> None:
    if dataloader is None:
        raise PruningError(f"criterion {name!r} is data-driven: pass dataloader= (batches of inputs, or "
                           "(inputs, labels) pairs)")


@register_criterion("apoz")
class APoZ(Criterion):
    """Average Percentage of Zeros after ReLU-like activations (Hu et al. 2016): mostly-zero channels go.

    Units no ReLU observes are scored by mean |activation| at their producers, rescaled into the same range.
    The `max_batches` batches' worth of images it observes are drawn with `seed`.
    """

    data_driven = True

    def __init__(self, max_batches: int = 8, seed: int = DEFAULT_SEED):
        self.max_batches = max_batches
        self.seed = int(seed)

    def prepare(self, net: nn.Module, analysis: Any, dataloader: Optional[Iterable]) -> None:
        super().prepare(net, analysis, dataloader)
        _require_loader(self.name, dataloader)
        self.nonzero: Dict[int, List[float]] = {}
        self.magnitude: Dict[int, List[float]] = {}
        roots = analysis.uf.roots()
        relu_ops = {"ReLU", "ReLU6", "Activation"}

        def observe(node, module, args, kwargs, out) -> None:
            tl = analysis.labels.get(node.name)
            if not isinstance(out, torch.Tensor) or tl is None or not hasattr(tl, "dims") or out.dim() < 2:
                return
            for d, vec in enumerate(tl.dims):
                if vec is None or len(vec) != out.shape[d]:
                    continue
                flat = out.detach().movedim(d, 0).reshape(out.shape[d], -1)
                target = self.nonzero if node.op in relu_ops else self.magnitude
                stat = (flat != 0).double().mean(1) if target is self.nonzero else flat.abs().double().mean(1)
                for r, s in zip(roots[vec].tolist(), stat.tolist()):
                    target.setdefault(r, []).append(s)

        run_with_observer(net, dataloader, observe, self.max_batches, self.seed)

    def __call__(self, group: Group) -> torch.Tensor:
        score = np.full(group.size, np.nan)
        mag = np.zeros(group.size)
        for i, r in enumerate(group.units.tolist()):
            if r in self.nonzero:
                score[i] = float(np.mean(self.nonzero[r]))  # 1 - APoZ
            mag[i] = float(np.mean(self.magnitude.get(r, [0.0])))
        missing = np.isnan(score)
        if missing.any():
            scale = mag[missing].max() or 1.0
            score[missing] = mag[missing] / scale
        return torch.from_numpy(score)


@register_criterion("thinet")
class ThiNet(Criterion):
    """ThiNet (Luo et al. 2017): greedily remove the channels whose summed contribution to the next
    layer's sampled outputs stays smallest. Scores are the reverse greedy removal order.

    Images, sampled outputs and column subsets come from `seed` alone: every `prepare` restarts the
    generator, so one instance scores the same network the same way each time."""

    data_driven = True

    def __init__(self, max_batches: int = 4, samples_per_batch: int = 256, seed: int = DEFAULT_SEED,
                 max_columns: int = 2048):
        self.max_batches = max_batches
        self.max_columns = max_columns
        self.samples = samples_per_batch
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def prepare(self, net: nn.Module, analysis: Any, dataloader: Optional[Iterable]) -> None:
        super().prepare(net, analysis, dataloader)
        _require_loader(self.name, dataloader)
        self.gen = torch.Generator().manual_seed(self.seed)
        consumers = {ax.node for ax in analysis.axes if ax.attr == "weight" and ax.dim == 1}
        self.contrib: Dict[str, List[torch.Tensor]] = {n: [] for n in consumers}

        def observe(node, module, args, kwargs, out) -> None:
            if node.name not in self.contrib or not args or not isinstance(args[0], torch.Tensor):
                return
            c = self._contributions(module, args[0])
            if c is not None:
                self.contrib[node.name].append(c)

        run_with_observer(net, dataloader, observe, self.max_batches, self.seed)
        self.contrib = {k: torch.cat(v, 1) for k, v in self.contrib.items() if v}

    def _contributions(self, m: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[in_channels, samples]: each input channel's share of randomly sampled output values."""
        if isinstance(m, nn.Linear):
            x2 = x.reshape(-1, x.shape[-1])
            rows = torch.randint(0, x2.shape[0], (self.samples,), generator=self.gen)
            outs = torch.randint(0, m.out_features, (self.samples,), generator=self.gen)
            return (x2[rows] * m.weight[outs]).T.detach()
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            cols = torch.nn.functional.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
            n, _, L = cols.shape
            cols = cols.view(n, m.in_channels, -1, L)
            b = torch.randint(0, n, (self.samples,), generator=self.gen)
            pos = torch.randint(0, L, (self.samples,), generator=self.gen)
            f = torch.randint(0, m.out_channels, (self.samples,), generator=self.gen)
            patches = cols[b, :, :, pos]  # [S, C, k]
            w = m.weight.view(m.out_channels, m.in_channels, -1)[f]  # [S, C, k]
            return (patches * w).sum(-1).T.detach()
        return None

    def __call__(self, group: Group) -> torch.Tensor:
        blocks = []
        for m in group.members:
            if m.axis.node in self.contrib and m.axis.attr == "weight" and m.axis.dim == 1:
                c = self.contrib[m.axis.node]
                idx = torch.from_numpy(m.unit_index)
                ok = idx >= 0
                per_unit = torch.zeros(group.size, c.shape[1], dtype=torch.float64)
                per_unit.index_add_(0, idx[ok], c[ok].double())
                blocks.append(per_unit)
        if not blocks:
            fallback = L2()  # no conv/linear consumer observed: magnitude instead
            fallback.net = self.net
            return fallback(group)
        contrib = torch.cat(blocks, 1)
        if contrib.shape[1] > self.max_columns:  # a random subset of sampled outputs keeps it O(n^2)
            cols = torch.randperm(contrib.shape[1], generator=self.gen)[: self.max_columns]
            contrib = contrib[:, cols]
        gram = contrib @ contrib.T  # ||acc + x_c||^2 = ||acc||^2 + 2 <acc, x_c> + ||x_c||^2
        n = group.size
        dots = torch.zeros(n, dtype=torch.float64)
        diag = gram.diagonal().clone()
        left = torch.ones(n, dtype=torch.bool)
        removed: List[int] = []
        for _ in range(n):
            cost = torch.where(left, 2 * dots + diag, torch.full_like(dots, float("inf")))
            best = int(torch.argmin(cost))
            removed.append(best)
            dots += gram[:, best]
            left[best] = False
        score = torch.empty(n, dtype=torch.float64)
        score[torch.tensor(removed)] = torch.arange(n, dtype=torch.float64)
        return score


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the output's logits: per sample, or per token for a language model (shifted by one
    for a Hugging Face causal LM, labels -100 left out: `amc._batches.class_rows`)."""
    if not isinstance(logits_of(output), torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise PruningError("the default loss needs logits and integer targets; pass loss_fn=")
    return nn.functional.cross_entropy(*class_rows(output, targets))


class _LossCriterion(Criterion):
    """A criterion that reads the loss on labelled calibration batches (`loss_fn(output, targets)`, default
    `default_loss`), `max_batches` of them drawn with `seed`."""

    data_driven = True
    default_batches = 4

    def __init__(self, max_batches: Optional[int] = None, seed: int = DEFAULT_SEED,
                 loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None):
        self.max_batches = self.default_batches if max_batches is None else max_batches
        self.seed = int(seed)
        self.loss_fn = loss_fn or default_loss

    def _labelled(self, net: nn.Module, dataloader: Optional[Iterable]) -> List[Tuple[Tuple[Any, ...], Any]]:
        _require_loader(self.name, dataloader)
        with seeded_rng(self.seed):
            batches = [(batch_inputs(b, net), targets_of(b))
                       for b in iter_calibration(dataloader, 1.0, self.seed, max_batches=self.max_batches)]
        if not batches:
            raise PruningError(f"criterion {self.name!r}: the dataloader yielded no batches")
        if any(t is None for _, t in batches):
            raise PruningError(f"criterion {self.name!r} needs labelled batches ((inputs, labels) pairs or dicts "
                               "with labels) to compute the loss")
        return batches


@register_criterion("taylor")
class Taylor(_LossCriterion):
    """First-order Taylor estimate of the loss change when a unit goes (Molchanov et al. 2019; the seed's
    "Approximate Oracle"): `(sum over every weight the unit owns of gradient x weight)^2` on each of
    `max_batches` (4) labelled batches, averaged. Gradients come from `torch.autograd.grad` in eval mode, so
    the network's `.grad`, BatchNorm statistics and flags stay as they were."""

    def prepare(self, net: nn.Module, analysis: Any, dataloader: Optional[Iterable]) -> None:
        super().prepare(net, analysis, dataloader)
        batches = self._labelled(net, dataloader)
        # (stored tensor, dim) pairs the groups slice, by an id that is stable for a computed weight too
        axes: Dict[Tuple[int, int], Tuple[str, str, int]] = {}
        sources: List[torch.Tensor] = []
        for ax in analysis.axes:
            module, t = net.node(ax.node).module, param_of(net, net.node(ax.node).module, ax.attr)
            computed = reparam.sources(*owner_of(net, module, ax.attr))
            if (isinstance(t, nn.Parameter) or computed) and t.is_floating_point():  # no BN statistics
                axes.setdefault((tensor_identity(net, module, ax.attr), ax.dim), (module, ax.attr, ax.dim))
                sources += computed or [t]
        params = list({id(t): t for t in sources}.values())
        # per (tensor, dim), one vector per batch: gradient x weight summed over each slice along dim
        self.sums: Dict[Tuple[int, int], List[torch.Tensor]] = {key: [] for key in axes}
        with training_mode(net, False), _grads_enabled(params), parametrize.cached():
            for inputs, targets in batches:
                loss = self.loss_fn(net(*inputs), targets)
                if not torch.isfinite(loss):
                    raise PruningError(f"criterion 'taylor': the loss is {float(loss)} on a calibration batch")
                # the weights this forward used: a parametrization's cached one, a hook's attribute
                used = {key: getattr(*owner_of(net, module, attr)) for key, (module, attr, _) in axes.items()}
                grads = dict(zip(used, torch.autograd.grad(loss, list(used.values()), allow_unused=True)))
                for key, (_, _, dim) in axes.items():
                    g, t = grads[key], used[key]
                    prod = (g * t).detach().double() if g is not None else torch.zeros_like(t, dtype=torch.float64)
                    self.sums[key].append(prod.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1))
        self.batches = len(batches)

    def __call__(self, group: Group) -> torch.Tensor:
        per_batch = torch.zeros(self.batches, group.size, dtype=torch.float64)
        for m in group.members:
            key = (tensor_identity(self.net, self.net.node(m.axis.node).module, m.axis.attr), m.axis.dim)
            if key not in self.sums or m.axis.attr.endswith(("running_mean", "running_var")):
                continue
            for b, sums in enumerate(self.sums[key]):
                _scatter(group, m, sums, per_batch[b])
        return per_batch.pow(2).mean(0)


@register_criterion("oracle")
class Oracle(_LossCriterion):
    """The seed's "Oracle" (Molchanov et al. 2017's reference): each unit's score is the loss increase
    measured with that unit alone soft-pruned (zeroed), on `max_batches` (2) labelled batches. Exact where
    Taylor is a first-order estimate, and one network copy plus `max_batches` forwards per unit: for small
    networks, or to check a cheaper criterion against it."""

    default_batches = 2

    def prepare(self, net: nn.Module, analysis: Any, dataloader: Optional[Iterable]) -> None:
        super().prepare(net, analysis, dataloader)
        self.batches = self._labelled(net, dataloader)
        self.roots = analysis.uf.roots()
        self.base = self._loss(net)

    def _loss(self, net: nn.Module) -> float:
        with torch.no_grad(), training_mode(net, False):
            return float(sum(float(self.loss_fn(net(*x), t)) for x, t in self.batches) / len(self.batches))

    def __call__(self, group: Group) -> torch.Tensor:
        from .apply import apply

        return torch.tensor([self._loss(apply(self.net, self.analysis, self.roots, np.array([u]), "soft")) - self.base
                             for u in group.units.tolist()], dtype=torch.float64)


class _grads_enabled:
    """Parameters that require grad for the block (a frozen backbone's too), as they were after."""

    def __init__(self, params: List[torch.Tensor]):
        self.params = params

    def __enter__(self) -> None:
        self.before = [p.requires_grad for p in self.params]
        self.mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc: Any) -> None:
        for p, flag in zip(self.params, self.before):
            p.requires_grad_(flag)
        torch.set_grad_enabled(self.mode)


def get_criterion(criterion: Any) -> Criterion:
    """A criterion instance from a registry name or an instance/callable."""
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str):
        key = criterion.lower()
        if key not in CRITERIA:
            raise PruningError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
        return CRITERIA[key]()
    if callable(criterion):
        return _CallableCriterion(criterion)
    raise PruningError(f"criterion must be a name in {sorted(CRITERIA)} or a Criterion, got {criterion!r}")


class _CallableCriterion(Criterion):
    def __init__(self, fn: Callable[[Group], torch.Tensor]):
        self.fn = fn

    def __call__(self, group: Group) -> Any:
        return self.fn(group)  # PruningPlan checks and converts what a user's function returns


# the seed's names (its TODO list spells them "Oracel" and "Approximate Oracel"): both spellings work
CRITERIA["approximate_oracle"] = CRITERIA["approximate_oracel"] = Taylor
CRITERIA["oracel"] = Oracle
