"""`VTP` (Vision Transformer Pruning, seed 001): learned gates, L1 sparsity training, prune, fold, fine-tune.

The dims come out through amc's pruning engine, so every coupling is kept: the residual width (every
reader and writer of the stream), the per-head dims (q, k, v and the attention output alike, the head
count unchanged, the softmax scale the original's), and each MLP's hidden width. A unit's score is the
mean |gate| over the gates that scale it; units scoring below the threshold zeta are removed (at least one
unit of a group, and whole heads' worth when the group asks for it, are kept), zeta being given or found
by bisection for the MACs target.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._batches import class_rows, labels_of
from ...errors import PruningError, TrainingError
from ...graph.network import ReconstructedNetwork
from ..base import BaseCompressor, batch_inputs, check_count, check_number
from ..groups import keep_counts
from ..prune import PruningPlan, plan_pruning
from ...graph.counting import count
from .columns import column_scores, reader_gates, select_reader_columns
from .gates import FeatureGate, fold_gates, insert_gates
from .unfuse import unfuse_attention

logger = logging.getLogger("amc.compressors.vtp")


TIE_BREAK = 1e-9


def gate_scores(plan: PruningPlan) -> List[Optional[np.ndarray]]:
    """Per group, the mean |gate| of each unit (None for a group no gate scales). Equal gates (untrained,
    or saturated at the same value) are ordered by the plan's own weight importance, added at 1e-9 scale,
    so a MACs budget still finds a threshold between them."""
    out: List[Optional[np.ndarray]] = []
    for gi, g in enumerate(plan.groups):
        total, count = np.zeros(g.size), np.zeros(g.size)
        for m in g.members:
            if m.axis.attr != "gate":
                continue
            gate = plan.net.network[plan.net.node(m.axis.node).module]
            vals = gate.gate.detach().abs().double().numpy()
            ok = m.unit_index >= 0
            np.add.at(total, m.unit_index[ok], vals[ok])
            np.add.at(count, m.unit_index[ok], 1)
        if not count.any():
            out.append(None)
            continue
        imp = plan.importance[gi].double().numpy() if plan.importance else np.zeros(g.size)
        out.append(total / np.maximum(count, 1) + TIE_BREAK * imp / max(float(np.abs(imp).max()), 1e-30))
    return out


def units_below(plan: PruningPlan, scores: List[Optional[np.ndarray]], zeta: float) -> Tuple[np.ndarray, List[str]]:
    """Units whose score is below `zeta`; every group keeps at least what `keep_counts` allows. Returns the
    units and the groups that would have lost every unit (kept at their minimum instead)."""
    chosen, emptied = [], []
    for g, s in zip(plan.groups, scores):
        if s is None:
            continue
        n = int((s < zeta).sum())
        if n == 0:
            continue
        if n >= g.size:
            emptied.append(g.producers[0] if g.producers else f"group {g.id}")
        k = keep_counts(g, min(n, g.size - 1) / g.size)  # number pruned, honouring heads / round_to
        if k > 0:
            chosen.append(g.units[np.argsort(s, kind="stable")[:k]])
    return (np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)), emptied


def train_gates(net: nn.Module, loader: Iterable, epochs: int, lr: float, sparsity: float, device: Any,
                gate_lr: Optional[float] = None) -> List[float]:
    """Joint training: task loss + `sparsity` x sum |gate| (the model and the gates); mean loss per epoch.
    The gates take `gate_lr` (default `lr`): at a fine-tuning lr they would barely leave 1 in an epoch."""
    gates = [m.gate for m in net.modules() if isinstance(m, FeatureGate)]
    ids = {id(g) for g in gates}
    rest = [p for p in net.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": gates, "lr": lr if gate_lr is None else gate_lr}],
                            weight_decay=0.0)
    history = []
    for epoch in range(int(epochs)):
        net.train()
        total, seen = 0.0, 0
        for batch in loader:
            x, y = batch_inputs(batch)[0].to(device), labels_of(batch, "VTP").to(device)
            loss = F.cross_entropy(*class_rows(net(x), y)) + sparsity * sum(g.abs().sum() for g in gates)
            if not math.isfinite(float(loss.detach())):
                raise TrainingError(f"VTP sparsity training: loss became {float(loss.detach())} in epoch {epoch + 1};"
                                    " lower lr or sparsity (the network was not changed)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(y.shape[0])
            seen += int(y.shape[0])
        history.append(total / max(seen, 1))
        logger.info("VTP epoch %d: loss %.4f", epoch + 1, history[-1])
    net.eval()
    return history


class VTP(BaseCompressor):
    """Vision Transformer Pruning with learned gates (seed 001); see the module docstring.

    `compress_ratio`: fraction of the MACs removed (or `target_macs`: fraction kept); `threshold` (zeta):
    prune the units whose mean |gate| is below it instead of meeting a MACs budget. `sparsity`: the L1
    weight on the gates; `epochs`: sparsity training; `finetune_epochs`: AdamW fine-tuning after pruning
    (0: none); `lr`: both; `gate_lr`: the gates' own lr during sparsity training. `heads=True` also
    removes whole heads (the head count drops; a head scores the mean |gate| on its output dims), then
    the kept heads' dims, as above. A plain module's nn.MultiheadAttention is unfused first (a qkv and a
    proj Linear around F.scaled_dot_product_attention: same function), so it is gated and pruned like a
    timm block; in a graph given as a ReconstructedNetwork it stays fused, its heads tied to the width.
    `residual="readers"`: the residual width stays whole and each Linear reading it (qkv, fc1) drops the
    input columns its own gate puts below zeta (VTP's consumer-side form).
    """

    name = "vtp"

    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 compress_ratio: float = 0.5, target_macs: Optional[float] = None, sparsity: float = 1e-4,
                 epochs: int = 3, finetune_epochs: int = 3, lr: float = 1e-4, threshold: Optional[float] = None,
                 heads: bool = False, round_to: int = 1, gate_lr: float = 1e-2, residual: str = "stream",
                 **kwargs: Any):
        if target_macs is not None:
            if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) \
                    or not 0.0 < float(target_macs) <= 1.0:
                raise PruningError(f"target_macs must be a fraction in (0, 1], got {target_macs!r}")
            compress_ratio = 1.0 - float(target_macs)
        super().__init__(origin_net, trainloader, valloader, compress_ratio=compress_ratio, **kwargs)
        if isinstance(compress_ratio, dict):
            raise PruningError("VTP takes a float compress_ratio (fraction of the MACs removed), not a dict")
        if not isinstance(heads, bool):
            raise PruningError(f"heads must be True or False, got {heads!r}")
        self.sparsity = check_number(sparsity, "sparsity", low=0.0)
        self.lr = check_number(lr, "lr", low=0.0, low_open=True)
        self.threshold = None if threshold is None else check_number(threshold, "threshold (zeta, or None)")
        self.round_to = check_count(round_to, "round_to")
        self.heads = heads
        self.gate_lr = check_number(gate_lr, "gate_lr", low=0.0, low_open=True)
        if residual not in ("stream", "readers"):
            raise PruningError(f"residual must be 'stream' (prune the residual width everywhere) or 'readers' "
                               f"(each reader of the stream drops its own input columns), got {residual!r}")
        self.residual = residual
        self.epochs = check_count(epochs, "epochs", minimum=0)
        self.finetune_epochs = check_count(finetune_epochs, "finetune_epochs", minimum=0)
        self.gated, self.gate_pairs = insert_gates(self.origin_graph)
        self.train_history: List[float] = []
        self.zeta: Optional[float] = None
        self.warnings: List[str] = []

    def _as_graph(self, net: nn.Module) -> ReconstructedNetwork:
        """A plain module's nn.MultiheadAttention is unfused first (`unfuse_attention`, on a copy), so its
        projections get gates and its heads can go; a graph is used as given."""
        self.unfused = 0
        if isinstance(net, nn.Module) and not isinstance(net, ReconstructedNetwork):
            net, self.unfused = unfuse_attention(net)
        return super()._as_graph(net)

    def _compress(self, ratio: Any) -> ReconstructedNetwork:
        gated = self.gated.copy().to(self.device)
        if self.epochs:
            self.train_history = train_gates(gated, self.trainloader, self.epochs, self.lr, self.sparsity, self.device,
                                             self.gate_lr)
        self.trained_gated = gated  # the gated network after sparsity training (gates not yet folded)
        x = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in self.example_inputs)
        plan = plan_pruning(gated, "l2", x, round_to=self.round_to)
        head_plan = plan_pruning(gated, "l2", x, heads=True) if self.heads else None
        if head_plan is not None and not any(s is not None for s in head_scores(head_plan)):
            raise PruningError("VTP(heads=True) found no attention heads whose output a gate scales (it looks for "
                               "a (heads, head_dim) split read by a gated Linear; an nn.MultiheadAttention is only "
                               "unfused when VTP gets the plain model, not a traced graph); use heads=False")
        if self.threshold is not None:
            self.zeta = float(self.threshold)
        else:
            self.zeta = self._zeta_for_macs(plan, head_plan, 1.0 - float(ratio), x)
        pruned, emptied = self._prune_below(plan, head_plan, self.zeta, x)
        if emptied:
            msg = (f"VTP threshold {self.zeta:.4g} would remove every dim of {emptied}; at least one is kept "
                   "(lower the threshold or sparsity)")
            self.warnings.append(msg)
            logger.warning(msg)
        pruned = fold_gates(pruned)
        if self.finetune_epochs:
            from ...models.training import train_classifier

            train_classifier(pruned, self.trainloader, self.valloader or self.trainloader,
                             epochs=self.finetune_epochs, lr=self.lr, optimizer="adamw", weight_decay=0.05)
        return pruned.eval()

    def _prune_below(self, plan: PruningPlan, head_plan: Optional[PruningPlan], zeta: float,
                     x: Tuple[Any, ...]) -> Tuple[ReconstructedNetwork, List[str]]:
        """The gated network without the units scoring below `zeta` (gates not folded): whole heads first
        (when `heads=True`, each head scored by the mean |gate| on its output dims), then every group of
        the head-pruned network (the kept heads' dims, MLP hidden, and the residual width: as one group,
        or with `residual="readers"` reader by reader, the stream kept whole)."""
        emptied: List[str] = []
        if head_plan is not None:
            units, emptied = units_below(head_plan, head_scores(head_plan), zeta)
            plan = plan_pruning(head_plan.apply_units(units, "hard"), "l2", x, round_to=self.round_to)
        scores = gate_scores(plan)
        stream = stream_gates(plan) if self.residual == "readers" else {}
        if stream:
            scores = [None if g.id in stream else sc for g, sc in zip(plan.groups, scores)]
        units, emptied2 = units_below(plan, scores, zeta)
        net = plan.apply_units(units, "hard")
        if stream:
            net, emptied3 = select_reader_columns(net, sorted(set().union(*stream.values())), zeta)
            emptied2 += emptied3
        return net, emptied + emptied2

    def _zeta_for_macs(self, plan: PruningPlan, head_plan: Optional[PruningPlan], target: float,
                       x: Tuple[Any, ...]) -> float:
        """The largest zeta whose pruned network has at most `target` of the original's MACs."""
        base = count(self.origin_graph, *x)[0]
        known = [s for s in gate_scores(plan) if s is not None]
        if head_plan is not None:
            known += [s for s in head_scores(head_plan) if s is not None]
        if not known:
            raise PruningError("VTP: no prunable group is scaled by a gate")
        if self.residual == "readers":  # readers cut at single gate values, not group means
            stream = sorted(set().union(*stream_gates(plan).values()))
            known += [column_scores(g, lin).numpy() for g, lin in reader_gates(plan.net, stream).values()]
        values = np.unique(np.concatenate(known))

        def cost(z: float) -> float:
            return count(self._prune_below(plan, head_plan, z, x)[0], *x)[0] / base

        least = cost(float(values[-1]) + 1e-12)
        if least > target:
            hint = (" (residual='readers' keeps the residual stream, and every layer no gate scales, whole; "
                    "residual='stream' can prune further)" if self.residual == "readers" else "")
            raise PruningError(f"VTP cannot reach target {target:.3f} of the MACs: with one unit left per gated "
                               f"group the network keeps {least:.3f}{hint}; raise target_macs")
        lo, hi = 0, len(values) - 1
        while lo < hi:  # smallest index i whose zeta = values[i] + eps meets the target
            mid = (lo + hi) // 2
            if cost(float(values[mid]) + 1e-12) <= target:
                hi = mid
            else:
                lo = mid + 1
        return float(values[lo]) + 1e-12


def stream_gates(plan: PruningPlan) -> Dict[int, List[str]]:
    """Groups whose features several gated Linears read (the residual stream: every block's qkv and fc1
    gates), {group id: their gate nodes}; an MLP's hidden units or a head's dims have one reader."""
    out: Dict[int, List[str]] = {}
    for g in plan.groups:
        gates = sorted({m.axis.node for m in g.members if m.axis.attr == "gate"})
        if len(gates) > 1:
            out[g.id] = gates
    return out


def head_scores(plan: PruningPlan) -> List[Optional[np.ndarray]]:
    """`gate_scores` of the head groups of a `heads=True` plan only (a group one of whose gates scales
    several positions per unit: a head's dims); None elsewhere."""
    out: List[Optional[np.ndarray]] = []
    for g, s in zip(plan.groups, gate_scores(plan)):
        spans = [np.bincount(m.unit_index[m.unit_index >= 0]).max(initial=0) for m in g.members
                 if m.axis.attr == "gate"]
        out.append(s if spans and max(spans) > 1 else None)
    return out


VisionTransformerPruning = VTP

__all__ = ["VTP", "VisionTransformerPruning", "gate_scores", "head_scores", "stream_gates", "units_below",
           "train_gates"]
