"""Training-time pruning plug-ins: Soft Filter Pruning (He et al., IJCAI 2018) and RePr (Prakash et al., CVPR 2019).

SFP silences whole coupled channel groups through the pruning engine (or single convs' filters with
``scope="layer"``); RePr works on ``nn.Conv2d`` weights with per-filter masks.  They talk to the trainer through :class:`TrainerCallback` only.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from amc._modes import training_mode
from amc.errors import PruningError

log = logging.getLogger("amc.trainers")


class TrainerCallback:
    """The plug-in interface: every method is optional and a no-op here.

    Order inside an epoch: ``on_epoch_start`` -> (backward, ``on_before_step``, step, ``on_after_step``)*
    -> ``on_epoch_end`` ->
    validation -> checkpoint.  So what ``on_epoch_end`` leaves in the weights is what gets validated
    and saved.  ``state_dict``/``load_state_dict`` make a plug-in survive a resume.
    """

    def on_train_start(self, trainer: Any) -> None:
        pass

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        pass

    def on_before_step(self, trainer: Any, step: int) -> None:
        """After backward, before the optimizer step (gradients are there to edit)."""

    def on_after_step(self, trainer: Any, step: int) -> None:
        pass

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        pass

    def on_train_end(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------- helpers
def select_convs(module: nn.Module, layers: Optional[Sequence[str]] = None) -> Dict[str, nn.Conv2d]:
    """Named ``nn.Conv2d`` layers to prune: all of them, or the given names (checked)."""
    convs = {name: m for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    if layers is None:
        if not convs:
            raise PruningError(f"{type(module).__name__} has no nn.Conv2d layers; filter pruning has nothing to do")
        return convs
    picked = {}
    for name in layers:
        if name not in convs:
            raise PruningError(f"layer {name!r} is not an nn.Conv2d of {type(module).__name__}; "
                               f"conv layers are {sorted(convs)}")
        picked[name] = convs[name]
    return picked


def filter_norms(conv: nn.Conv2d) -> torch.Tensor:
    """L2 norm of each output filter (the SFP criterion)."""
    return conv.weight.detach().flatten(1).norm(p=2, dim=1)


def orthogonality_scores(weight: torch.Tensor) -> torch.Tensor:
    """RePr's per-filter redundancy ``O_f = sum_j |cos(W_f, W_j)| / J`` over the other filters j.

    ``P = |W^ W^T . (1 - I)|`` with unit-norm rows W^; a *high* score means the filter overlaps its
    neighbours (least orthogonal), so RePr drops the highest scores.
    """
    flat = weight.detach().flatten(1).double()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.t()).abs()
    cos.fill_diagonal_(0.0)
    return (cos.sum(dim=1) / flat.shape[0]).float()


@torch.no_grad()
def apply_filter_mask(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    """Zero the weights (and bias) of filters where ``keep`` is False."""
    drop = ~keep.to(conv.weight.device)
    conv.weight[drop] = 0.0
    if conv.bias is not None:
        conv.bias[drop] = 0.0


@torch.no_grad()
def zero_optimizer_rows(optimizer: Optional[torch.optim.Optimizer], conv: nn.Conv2d, rows: torch.Tensor) -> None:
    """Clear momentum / Adam moments of the given filters so stale state cannot push them back."""
    if optimizer is None:
        return
    for param in (conv.weight, conv.bias):
        if param is None or param not in optimizer.state:
            continue
        for value in optimizer.state[param].values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value[rows.to(value.device)] = 0.0


def _ratio_for(ratio: Union[float, Mapping[str, float]], name: str) -> float:
    r = ratio.get(name, 0.0) if isinstance(ratio, Mapping) else ratio
    if not 0.0 <= float(r) < 1.0:
        raise PruningError(f"pruning ratio {r} for layer {name!r} must be in [0, 1)")
    return float(r)


# ---------------------------------------------------------------------------- Soft Filter Pruning
class SoftFilterPruning(TrainerCallback):
    """At each epoch end silence the ``ratio`` lowest-L2-norm filters; they may regrow next epoch.

    ``scope="group"`` (default) works on the pruning engine's coupled channel groups: a channel of a
    residual stage is scored and silenced in every conv that writes it, and silencing also zeroes the
    following norm layer's bias and running mean, so a silenced channel evaluates to exactly 0 and
    :meth:`hard_prune` removes exactly those channels without changing the output. The network is
    traced once, at the first epoch end, on one sample of the first training batch (or on
    ``example_inputs``). ``scope="layer"`` is the paper's per-conv version: conv weights only, so a
    BatchNorm after a zeroed filter keeps emitting a constant from stale statistics.

    ``masks`` (``{conv name: keep BoolTensor}``) after training are the filters a hard prune removes.
    ``ratio`` may be a float or ``{layer_name: ratio}``; ``start_epoch`` delays the first pruning.
    """

    def __init__(self, ratio: Union[float, Mapping[str, float]] = 0.3, layers: Optional[Sequence[str]] = None,
                 start_epoch: int = 0, scope: str = "group", example_inputs: Optional[Sequence[Any]] = None) -> None:
        if scope not in ("group", "layer"):
            raise PruningError(f"SoftFilterPruning scope={scope!r}; use 'group' (coupled channels) or 'layer'")
        if scope == "group" and layers is not None:
            raise PruningError("SoftFilterPruning(layers=...) picks convs one by one: use scope='layer', or a "
                               "ratio dict {layer: ratio} with scope='group'")
        if isinstance(ratio, Mapping):
            for name in ratio:
                _ratio_for(ratio, name)
            if layers is None and scope == "layer":
                layers = list(ratio)
        else:
            _ratio_for(ratio, "<all>")
        self.ratio, self.layers, self.start_epoch, self.scope = ratio, layers, int(start_epoch), scope
        self.example_inputs = None if example_inputs is None else (
            (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs))
        self.masks: Dict[str, torch.Tensor] = {}
        self.roots: Optional[Any] = None  # group scope: engine units silenced last
        self._plan: Any = None
        self._hook: Any = None

    # -- group scope ------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any) -> None:
        if self.scope == "group" and self.example_inputs is None and self._hook is None:
            def grab(module: nn.Module, args: tuple) -> None:  # one sample of the first batch, then done
                self.example_inputs = tuple(a[:1].detach() if isinstance(a, torch.Tensor) else a for a in args)
                self._hook.remove()
                self._hook = None
            self._hook = trainer.module.register_forward_pre_hook(grab)

    def plan(self, module: nn.Module) -> Any:
        """The engine's pruning plan over ``module`` (traced once; it shares ``module``'s parameters)."""
        if self._plan is None:
            from amc.compressors.prune import plan_pruning

            if not self.example_inputs:
                raise PruningError("SoftFilterPruning(scope='group') needs example_inputs=(tensor,) when it is "
                                   "used outside a trainer (or before the first training step)")
            with training_mode(module, False), torch.no_grad():
                self._plan = plan_pruning(module, "l2", self.example_inputs)
        return self._plan

    @torch.no_grad()
    def _prune_groups(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        from amc.compressors.masks import channel_masks
        from amc.compressors.primitives import silence_units

        plan = self.plan(module).rescore("l2")
        roots = plan.pruned_roots(self.ratio)
        silence_units(plan, roots)
        masks = channel_masks(plan, roots)
        self.roots = roots
        return masks

    def hard_prune(self, module: Optional[nn.Module] = None, recalibrate: Optional[Any] = None) -> Any:
        """A ReconstructedNetwork with the silenced channels physically removed (group scope).

        ``recalibrate``: a loader of training batches; BatchNorm statistics are then re-estimated on
        the pruned network (they were gathered while the silenced filters were regrowing).
        """
        if self.scope != "group" or self.roots is None:
            raise PruningError("hard_prune needs scope='group' and at least one SoftFilterPruning step; for "
                               "scope='layer' use amc.prune on the trained network")
        if module is not None:
            self.plan(module)
        pruned = self._plan.apply_units(self.roots)
        if recalibrate is not None:
            from .batchnorm import recalibrate_bn

            pruned = recalibrate_bn(pruned, recalibrate, copy=False)
        return pruned

    # -- both scopes ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, torch.Tensor]:
        """One SFP step on ``module``; returns and remembers the keep-masks."""
        if self.scope == "group":
            self.masks = self._prune_groups(module)
            return self.masks
        masks = {}
        for name, conv in select_convs(module, self.layers).items():
            n_out = conv.out_channels
            n_prune = int(math.floor(n_out * _ratio_for(self.ratio, name)))
            keep = torch.ones(n_out, dtype=torch.bool)
            if n_prune > 0:
                order = torch.argsort(filter_norms(conv).cpu(), stable=True)
                keep[order[:n_prune]] = False
                apply_filter_mask(conv, keep)
            masks[name] = keep
        self.masks = masks
        return masks

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        if epoch >= self.start_epoch:
            self.prune(trainer.module)

    def on_train_end(self, trainer: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        summary = {n: int((~m).sum()) for n, m in self.masks.items()}
        log.info("SoftFilterPruning: zeroed filters per layer %s; hard-prune them with the graph engine", summary)

    def pruned_filters(self) -> Dict[str, List[int]]:
        """Indices of the zeroed filters per layer (what to remove in a hard prune)."""
        return {name: torch.nonzero(~keep).flatten().tolist() for name, keep in self.masks.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()},
                "roots": None if self.roots is None else [int(r) for r in self.roots]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.masks = {k: v.clone().bool() for k, v in state.get("masks", {}).items()}
        roots = state.get("roots")
        self.roots = None if roots is None else np.asarray(roots, dtype=np.int64)


# ---------------------------------------------------------------------------- RePr
class RePr(TrainerCallback):
    """RePr: train ``s1`` epochs, drop the least orthogonal ``ratio`` of filters for ``s2`` epochs, re-init them.

    Dropped filters are held at zero after every optimizer step during the ``s2`` epochs, then
    re-initialised orthogonal to the kept filters of their layer (and, room permitting, to their own
    values before the drop) by projecting random vectors on the null space of those filters and
    orthonormalising them (QR); they get the mean norm of the kept filters.

    ``scope='global'`` ranks all filters of all layers together as in the paper; the reading notes
    report that this can empty shallow layers, so ``scope='layer'`` (drop ``ratio`` per layer) is
    offered too.  A layer always keeps at least one filter.  ``seed`` drives the re-init through a
    private generator, so training's own random stream (and thus resume) is unaffected.
    """

    def __init__(self, s1: int, s2: int, ratio: float = 0.3, layers: Optional[Sequence[str]] = None,
                 scope: str = "global", seed: int = 0, start_epoch: int = 0) -> None:
        if int(s1) < 1 or int(s2) < 1:
            raise PruningError(f"RePr needs s1 >= 1 and s2 >= 1 epochs, got s1={s1}, s2={s2}")
        if scope not in ("global", "layer"):
            raise PruningError(f"scope={scope!r}; use 'global' (paper) or 'layer'")
        _ratio_for(ratio, "<all>")
        self.s1, self.s2, self.ratio, self.layers = int(s1), int(s2), float(ratio), layers
        self.scope, self.seed, self.start_epoch = scope, int(seed), int(start_epoch)
        self.masks: Dict[str, torch.Tensor] = {}
        self.cycles = 0
        self.last_reinit: Dict[str, Dict[str, List[int]]] = {}
        self._snapshots: Dict[str, torch.Tensor] = {}

    # -- schedule
    def _phase_position(self, epoch: int) -> int:
        return (epoch - self.start_epoch) % (self.s1 + self.s2)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._enforce(trainer.module)  # after a resume the masks come from the checkpoint

    @torch.no_grad()
    def on_before_step(self, trainer: Any, step: int) -> None:
        """Zero the dropped filters' gradients: the sub-network alone shapes clipping and the update."""
        if not self.masks:
            return
        convs = select_convs(trainer.module, list(self.masks))
        for name, keep in self.masks.items():
            for param in (convs[name].weight, convs[name].bias):
                if param is not None and param.grad is not None:
                    param.grad[~keep.to(param.grad.device)] = 0.0

    def on_after_step(self, trainer: Any, step: int) -> None:
        self._enforce(trainer.module)  # weight decay / momentum could still move them

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        if epoch < self.start_epoch:
            return
        pos = self._phase_position(epoch)
        if pos == self.s1 - 1 and not self.masks:
            self.drop(trainer.module, trainer.optimizer)
        elif pos == self.s1 + self.s2 - 1 and self.masks:
            self.reinitialise(trainer.module, trainer.optimizer)

    def on_train_end(self, trainer: Any) -> None:
        if self.masks:
            log.info("RePr: training ended with dropped filters %s still masked",
                     {n: int((~m).sum()) for n, m in self.masks.items()})

    @torch.no_grad()
    def _enforce(self, module: nn.Module) -> None:
        if not self.masks:
            return
        convs = select_convs(module, list(self.masks))
        for name, keep in self.masks.items():
            apply_filter_mask(convs[name], keep)

    # -- ranking and dropping
    def ranking(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Orthogonality score per filter per layer (higher = more redundant)."""
        return {name: orthogonality_scores(conv.weight).cpu() for name, conv in select_convs(module, self.layers).items()}

    @torch.no_grad()
    def drop(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, torch.Tensor]:
        """Mask the bottom ``ratio`` of filters by orthogonality; returns the keep-masks."""
        convs = select_convs(module, self.layers)
        scores = self.ranking(module)
        drop_sets: Dict[str, List[int]] = {name: [] for name in convs}
        if self.scope == "layer":
            for name, s in scores.items():
                n = int(math.floor(len(s) * self.ratio))
                drop_sets[name] = torch.argsort(s, descending=True, stable=True)[:n].tolist()
        else:
            entries = sorted(((float(v), name, i) for name, s in scores.items() for i, v in enumerate(s.tolist())),
                             key=lambda e: -e[0])
            budget = int(math.floor(len(entries) * self.ratio))
            for _, name, i in entries:
                if budget == 0:
                    break
                if len(drop_sets[name]) + 1 >= convs[name].out_channels:
                    continue  # never empty a layer
                drop_sets[name].append(i)
                budget -= 1
        masks = {}
        for name, conv in convs.items():
            keep = torch.ones(conv.out_channels, dtype=torch.bool)
            keep[drop_sets[name]] = False
            if (~keep).any():
                masks[name] = keep
                self._snapshots[name] = conv.weight[~keep.to(conv.weight.device)].detach().cpu().clone()
                apply_filter_mask(conv, keep)
                zero_optimizer_rows(optimizer, conv, ~keep)
        self.masks = masks
        return masks

    # -- re-initialisation
    @torch.no_grad()
    def reinitialise(self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Give dropped filters new values orthogonal to the kept filters of their layer, then unmask."""
        convs = select_convs(module, list(self.masks))
        gen = torch.Generator().manual_seed(self.seed + 1000003 * self.cycles)
        record = {}
        for name, keep in self.masks.items():
            conv = convs[name]
            weight = conv.weight
            flat = weight.detach().flatten(1).double().cpu()
            dropped = torch.nonzero(~keep).flatten()
            kept = torch.nonzero(keep).flatten()
            new = _orthogonal_rows(flat[kept], self._snapshots.get(name), len(dropped), gen, name)
            norms = flat[kept].norm(dim=1)
            scale = float(norms.mean()) if len(kept) and float(norms.mean()) > 0 else math.sqrt(2.0)
            new = new * scale
            weight[dropped.to(weight.device)] = new.to(weight.dtype).to(weight.device).view(len(dropped),
                                                                                           *weight.shape[1:])
            if conv.bias is not None:
                conv.bias[dropped.to(weight.device)] = 0.0
            zero_optimizer_rows(optimizer, conv, ~keep)
            record[name] = {"dropped": dropped.tolist(), "kept": kept.tolist()}
        self.last_reinit = record
        self.masks = {}
        self._snapshots = {}
        self.cycles += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "cycles": self.cycles,
                "snapshots": {k: v.clone() for k, v in self._snapshots.items()}, "last_reinit": self.last_reinit}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.masks = {k: v.clone().bool() for k, v in state.get("masks", {}).items()}
        self._snapshots = {k: v.clone() for k, v in state.get("snapshots", {}).items()}
        self.cycles = int(state.get("cycles", 0))
        self.last_reinit = dict(state.get("last_reinit", {}))


def _orthogonal_rows(kept: torch.Tensor, old: Optional[torch.Tensor], count: int, gen: torch.Generator,
                     name: str) -> torch.Tensor:
    """``count`` orthonormal rows orthogonal to the span of ``kept`` (and of ``old`` when there is room)."""
    dim = kept.shape[1]
    basis_rows = kept
    if old is not None and len(old):
        with_old = torch.cat([kept, old.flatten(1).double()], dim=0)
        if _rank(with_old) + count <= dim:
            basis_rows = with_old
    rank = _rank(basis_rows)
    if rank > 0:
        _, s, vh = torch.linalg.svd(basis_rows, full_matrices=False)
        basis = vh[:rank]
    else:
        basis = torch.zeros(0, dim, dtype=torch.float64)
    room = dim - rank
    rows = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    n_orth = min(count, room)
    if n_orth < count:
        warnings.warn(f"RePr: layer {name!r} has {dim}-dim filters and {rank} independent kept filters, so only "
                      f"{n_orth} of {count} re-initialised filters can be orthogonal to them; the rest are random",
                      RuntimeWarning, stacklevel=3)
    if n_orth > 0:
        proj = rows[:n_orth] - (rows[:n_orth] @ basis.t()) @ basis
        q, _ = torch.linalg.qr(proj.t())           # columns: orthonormal basis of the projected rows
        q = q - basis.t() @ (basis @ q)            # one more projection removes round-off
        q = q / q.norm(dim=0, keepdim=True)
        rows[:n_orth] = q.t()
    if n_orth < count:
        rest = rows[n_orth:]
        rows[n_orth:] = rest / rest.norm(dim=1, keepdim=True)
    return rows


def _rank(matrix: torch.Tensor) -> int:
    if matrix.numel() == 0:
        return 0
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * max(matrix.shape) * torch.finfo(matrix.dtype).eps * 10).sum())
