"""The pruning API: `amc.prune` and `amc.prune_groups`.

    pruned = amc.prune(model, ratio=0.5, criterion="l2", example_inputs=(x,))
    pruned = amc.prune(net, target_macs=0.5)                 # until MACs fall to half
    pruned = amc.prune(net, ratio={"layer1.0.conv1": 0.3})   # per-layer ratios
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._modes import outside_inference_mode
from .._warnings import warn_user
from ..errors import AmcError, PruningError
from ..graph.capture import as_network, example_tuple
from ..graph.counting import count
from ..graph.network import ReconstructedNetwork
from ..graph.untouched import training_mode, untouched
from .apply import apply
from .base import check_names, module_names
from .budget import WholeInputs, per_sample, smallest_within_budget
from .criteria import Criterion, get_criterion
from .dependency import OUTPUT_CAUSE, Analysis, analyze
from .groups import Group, build_groups, select_units
from .rounding_slack import slack_ratios, units_at
from .rules import rule_for

Ratio = Union[float, Mapping[str, float]]


@dataclass
class PruningPlan:
    """Everything needed to prune `net` at any ratio: analysis, groups, and unit importance."""

    net: ReconstructedNetwork
    example_inputs: Tuple[Any, ...]
    analysis: Analysis
    groups: List[Group]
    roots: np.ndarray
    importance: Optional[List[torch.Tensor]] = None

    def __post_init__(self) -> None:
        self._modes = _modes(self.net)  # the layers' modes when planned (they are the model's own layers)

    def pruned_roots(self, ratio: Ratio) -> np.ndarray:
        chosen = []
        for g, imp in zip(self.groups, self.importance or []):
            r = group_ratio(g, ratio)
            if r > 0:
                chosen.append(select_units(g, imp, r))
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def apply(self, ratio: Ratio, mode: str = "hard") -> ReconstructedNetwork:
        return self.apply_units(self.pruned_roots(ratio), mode)

    def frozen_report(self) -> List[Dict[str, Any]]:
        """Layers whose output channels cannot be pruned, and why: `{"node", "channels", "causes"}` rows,
        the causes being the nodes that froze them (an op with no channel rule, a size tied to an
        input, the network's output shape, `ignore=`)."""
        uf = self.analysis.uf
        space_of = np.asarray(uf.space, dtype=np.int64)
        rows = []
        for sp in self.analysis.spaces:
            elements = np.flatnonzero(space_of == sp.id)
            if sp.kind == "out" and len(elements) and (self.roots[elements] == 0).all():
                rows.append({"node": sp.node, "channels": len(elements), "causes": uf.freeze_causes(elements)})
        return rows

    def prunable_fraction(self) -> float:
        """Fraction of the layers' output channels that pruning can remove at all; channels that only
        the network's output shape freezes (the classifier's) are left out of the count."""
        uf = self.analysis.uf
        space_of = np.asarray(uf.space, dtype=np.int64)
        out_only = {row["node"] for row in self.frozen_report() if row["causes"] == [OUTPUT_CAUSE]}
        ids = [sp.id for sp in self.analysis.spaces if sp.kind == "out" and sp.node not in out_only]
        out = np.isin(space_of, ids)
        return float((self.roots[out] != 0).sum() / out.sum()) if out.any() else 1.0

    def apply_units(self, pruned_roots: np.ndarray, mode: str = "hard") -> ReconstructedNetwork:
        """Prune exactly these units (group.units entries), e.g. the ones a LASSO chose."""
        pruned = apply(self.net, self.analysis, self.roots, np.asarray(pruned_roots, dtype=np.int64), mode)
        try:
            out = pruned.rebaseline_guards(*per_sample(self.example_inputs))  # smaller sizes, same path
        except AmcError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:  # torch's own errors
            raise PruningError(f"the pruned network no longer runs on the example inputs ({type(exc).__name__}: "
                               f"{exc}); the model's Python code may use tensor values as sizes (int(tensor), "
                               "e.g. Mask R-CNN's paste_masks_in_image), which the graph keeps from the trace") from exc
        check_pruned(self.analysis.output, pruned, self.example_inputs, out)
        if _modes(self.net) != self._modes:
            # a training loop switched the model (whose layers the plan shares) since it was planned
            # (SoftFilterPruning): one mode throughout, the network's own
            return pruned.train(pruned.training)
        # else each layer keeps its own mode, as in the model (a frozen-BatchNorm backbone in a training model,
        # an eval model inside nn.DataParallel): one mode for all normalised with batch statistics
        return pruned

    def rescore(self, criterion: Any, dataloader: Optional[Iterable] = None) -> "PruningPlan":
        """Score the same groups with another criterion (the analysis is reused)."""
        crit: Criterion = get_criterion(criterion)
        if crit.data_driven:
            crit.prepare(self.net, self.analysis, dataloader)
        else:
            crit.net, crit.analysis = self.net, self.analysis
        self.importance = [_scores(crit, g) for g in self.groups]
        return self

    def group_of_layer(self, node: str, attr: str = "weight", dim: int = 1) -> Tuple[Optional[Group], np.ndarray]:
        """The group behind one parameter axis of a layer, and the unit index of each position along it
        (-1 for frozen positions). `dim=1` of a conv/linear weight: its input channels."""
        for g in self.groups:
            for m in g.members:
                if m.axis.node == node and m.axis.attr == attr and m.axis.dim == dim:
                    return g, m.unit_index
        return None, np.zeros(0, dtype=np.int64)


def _modes(net: nn.Module) -> List[bool]:
    return [m.training for m in net.modules()]


def _scores(crit: Criterion, g: Group) -> torch.Tensor:
    """One float64 importance per unit of `g`; a criterion returning anything else is refused."""
    raw = crit(g)
    try:
        scores = torch.as_tensor(raw, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PruningError(f"criterion {crit!r} returned {type(raw).__name__} for group {g.id}; it must return "
                           f"one number per channel ({g.size}) ({exc})") from exc
    if scores.dim() != 1 or scores.numel() != g.size:
        raise PruningError(f"criterion {crit!r} returned shape {list(scores.shape)} for group {g.id} of {g.size} "
                           "channels; it must return one number per channel")
    return scores


def group_ratio(g: Group, ratio: Ratio) -> float:
    if isinstance(ratio, Mapping):
        rs = [ratio[p] for p in g.producers if p in ratio]
        return max(rs) if rs else 0.0
    return float(ratio)


def _as_network(model: nn.Module, example_inputs: Optional[Sequence[Any]],
                example_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[ReconstructedNetwork, tuple]:
    inputs = example_tuple(example_inputs, PruningError)
    if isinstance(model, ReconstructedNetwork):
        return model, inputs or model.example_inputs(batch_size=1)
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise PruningError(f"example_kwargs must be a dict of keyword inputs (a tokenizer's batch), got "
                           f"{type(example_kwargs).__name__}")
    net = as_network(model, inputs, dict(example_kwargs or {}), error=PruningError, what="the model to prune")
    # keyword inputs become graph inputs after the positional ones: the graph's own example binds them all
    return net, (net.example_inputs(batch_size=1) if example_kwargs else inputs)


def _keeps_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The user's model (module or graph) leaves these calls exactly as it came: buffers, flags, RNG; what
    they return stays trainable when called inside `torch.inference_mode()`."""
    @functools.wraps(fn)
    @outside_inference_mode
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with untouched(model):
            return fn(model, *args, **kwargs)
    return wrapper


def _nodes_under(net: ReconstructedNetwork, qualname: str) -> List[str]:
    """The nodes a module of the traced model became: its own calls and everything inside it."""
    inside = qualname + "."
    return [n.name for n in net.layer_nodes
            if qualname in (n.name, n.meta.get("target")) or n.name.startswith(inside)
            or str(n.meta.get("target", "")).startswith(inside)]


def layer_names(model: Any, net: ReconstructedNetwork, keys: Iterable[Any], what: str) -> Dict[Any, List[str]]:
    """Each key of `ignore=` / a ratio dict -> the node names it means: a node name, a module (see
    `module_names`) or a container such as "layer4" (all of its nodes). Unknown names raise PruningError."""
    exact = {n.name for n in net.layer_nodes}
    out: Dict[Any, List[str]] = {}
    unknown: List[str] = []
    for key, names in module_names(model, keys, what).items():
        found = [m for q in names for m in ([q] if q in exact else (_nodes_under(net, q) if q else []))]
        if not found:
            unknown.append(key if isinstance(key, str) else f"{type(key).__name__} {names[0]!r}")
        out[key] = list(dict.fromkeys(found))
    if unknown:
        raise PruningError(f"{what} names unknown layers {unknown[:5]}; use node names such as "
                           f"{[n.name for n in net.layer_nodes if n.op in ('Conv2d', 'Linear')][:3]}, "
                           "a container's name (\"layer4\") or the model's modules themselves")
    return out


def _ratio_by_node(model: Any, net: ReconstructedNetwork, ratio: Ratio) -> Ratio:
    """A ratio dict keyed by modules or containers, as one keyed by node names (later keys win)."""
    if not isinstance(ratio, Mapping):
        return ratio
    names = layer_names(model, net, list(ratio), "ratio")
    return {node: ratio[key] for key in ratio for node in names[key]}


def _ignore_by_node(model: Any, net: ReconstructedNetwork, ignore: Any) -> List[str]:
    names = layer_names(model, net, check_names(ignore, "ignore", model=model), "ignore")
    return list(dict.fromkeys(node for nodes in names.values() for node in nodes))


def _validate_ratio(ratio: Ratio, net: ReconstructedNetwork) -> None:
    if isinstance(ratio, Mapping):
        names = {n.name for n in net.layer_nodes}
        unknown = [k for k in ratio if k not in names]
        if unknown:
            raise PruningError(f"ratio names unknown layers {unknown[:5]}; use node names such as "
                               f"{[n.name for n in net.layer_nodes if n.op in ('Conv2d', 'Linear')][:3]}")
        for k, v in ratio.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise PruningError(f"ratio[{k!r}] must be a float in [0, 1) (the fraction of its channels "
                                   f"removed), got {v!r}")
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise PruningError(f"ratio must be a float in [0, 1) or a dict of per-layer ratios, got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise PruningError(f"ratio must be in [0, 1), got {ratio}: it is the fraction of channels removed")


@_keeps_model
def plan_pruning(model: nn.Module, criterion: Any = "l2", example_inputs: Optional[Sequence[Any]] = None,
                 ignore: Iterable[Union[str, nn.Module]] = (), dataloader: Optional[Iterable] = None, round_to: int = 1,
                 heads: bool = False, example_kwargs: Optional[Mapping[str, Any]] = None) -> PruningPlan:
    """Analyse coupling and score every channel once; `plan.apply(ratio)` then prunes at any ratio.

    round_to: kept channel counts are rounded up to a multiple of it (8 or 16 suit CPU/GPU kernels).
    heads: attention (and any channel dim split into (heads, head_dim)) loses whole heads instead of
    the same head dims in every head."""
    check_round_to(round_to)
    net, inputs = _as_network(model, example_inputs, example_kwargs)
    crit: Criterion = get_criterion(criterion)  # fail fast on a bad name, before the analysis
    ignore = _ignore_by_node(model, net, ignore)
    with training_mode(net):
        try:
            a = analyze(net, per_sample(inputs), rule_for, heads=heads)
        except Exception:
            whole = _check_inputs_run(net, inputs)  # bad example_inputs: say so; else the analysis' own error
            if whole is None:
                raise
            inputs = whole
            a = analyze(net, inputs, rule_for, heads=heads)
    for space in a.spaces:  # ignored layers keep their output channels
        if space.node in ignore:
            a.uf.cause = f"ignore={space.node!r}"
            a.uf.freeze(np.arange(1, len(a.uf.parent))[np.asarray(a.uf.space[1:]) == space.id])
    groups, roots = build_groups(a)
    for g in groups:
        g.round_to = int(round_to)
    return PruningPlan(net, inputs, a, groups, roots).rescore(crit, dataloader)


def check_round_to(round_to: Any) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise PruningError(f"round_to must be a whole number >= 1 (kept channels become a multiple of it), "
                           f"got {round_to!r}")


def _check_inputs_run(net: ReconstructedNetwork, inputs: Tuple[Any, ...]) -> Optional[WholeInputs]:
    """Bad example_inputs are the caller's mistake: say so (run only when the analysis failed, so the
    happy path costs no extra forward). Inputs that run whole but not as one sample come back as
    `WholeInputs`, to analyse and count on as they are (with a warning saying what that means)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            net(*per_sample(inputs))
    except Exception as exc:  # noqa: BLE001 - reported with the inputs described
        if isinstance(exc, AmcError) and "value guard failed" in str(exc):
            raise PruningError(
                "pruning runs the network on the first sample of its example inputs (the ones passed, else "
                "random ones shaped like the captured inputs), and that sample takes another branch than "
                f"capture did at a value the model reads into Python ({str(exc)[:300]} ...). Pass "
                "example_inputs= whose first sample takes the captured path (or trace on that one sample)") from exc
        one = per_sample(inputs)
        batched = inputs if any(a is not b for a, b in zip(one, inputs)) else _captured_inputs(net)
        batch = next((b.shape[0] for a, b in zip(per_sample(batched), batched) if a is not b), 1)
        if batch > 1 and batched is not inputs and _runs(net, batched):  # no example given: the graph's own batch
            raise PruningError(
                f"pruning analyses one sample, and the network runs at its captured batch {batch} but not at batch "
                f"1 ({type(exc).__name__}: {str(exc)[:300]} ...): the model fixes its batch size (an "
                "int(x.shape[0]) or a constant batch in a view / reshape; x.size(0) or -1 keeps it free) or "
                "branches on it (Hugging Face decoders without an attention_mask expand their position ids only "
                "when the batch is not 1: pass attention_mask= to amc.trace). Pass example_inputs= at that batch "
                "to prune for it alone, or fix the model") from exc
        if batch > 1 and _runs(net, batched):
            warn_user(
                f"amc.prune: the network runs on its {batch} example inputs but not on the first one alone "
                f"({type(exc).__name__}: {str(exc)[:200]} ...), so pruning analysed all {batch} and budgets count "
                "MACs on all of them. Right when dim 0 is no batch (a graph's nodes, with edge indices into them). "
                "Otherwise the model fixes its batch size (an int(x.shape[0]) or a constant batch in a view / "
                "reshape; x.size(0) or -1 keeps it free) or branches on it (Hugging Face decoders without an "
                "attention_mask expand their position ids only when the batch is not 1: pass attention_mask= to "
                f"amc.trace), and the pruned network, like the traced one, runs at batch {batch} only")
            return WholeInputs(batched)
        raise PruningError(f"the network does not run on example_inputs ({type(exc).__name__}: {str(exc)[:200]}); "
                           "pass the tensors it was traced with, e.g. example_inputs=(x,)") from exc


def _captured_inputs(net: ReconstructedNetwork) -> Tuple[Any, ...]:
    """Random inputs at the batch the graph was captured at, or () where it cannot make them."""
    try:
        return net.example_inputs()
    except Exception:  # noqa: BLE001 - only a hint for the message
        return ()


def _runs(net: ReconstructedNetwork, inputs: Tuple[Any, ...]) -> bool:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            net(*inputs)
    except Exception:  # noqa: BLE001 - only whether it runs matters here
        return False
    return True


def check_pruned(ref: Any, pruned: ReconstructedNetwork, inputs: Tuple[Any, ...], out: Any = None) -> None:
    """The pruned graph must lint, run, and give outputs of the shapes of `ref` (the original's output);
    `out`: its eval-mode output on `inputs` when the caller already has it (the guards' run)."""
    pruned.lint()
    if out is None:
        with torch.no_grad(), training_mode(pruned):
            try:
                out = pruned(*per_sample(inputs))
            except Exception as exc:  # noqa: BLE001 - reported with context
                raise PruningError(f"the pruned network no longer runs ({type(exc).__name__}: {exc}); an op "
                                   "between the pruned layers was not handled: pass its producer in "
                                   "ignore=[...] and report the model") from exc
    if _shapes(ref) != _shapes(out):
        raise PruningError(f"pruning changed the output shapes {_shapes(ref)} -> {_shapes(out)}")


def _shapes(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return [_shapes(v) for v in x]
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return None


@_keeps_model
def prune(model: nn.Module, ratio: Ratio = 0.5, criterion: Any = "l2", example_inputs: Optional[Sequence[Any]] = None,
          ignore: Iterable[Union[str, nn.Module]] = (), mode: str = "hard", dataloader: Optional[Iterable] = None,
          target_macs: Optional[float] = None, round_to: int = 1, target_latency: Optional[float] = None,
          latency_table: Any = None, heads: bool = False, latency_allocation: str = "uniform",
          example_kwargs: Optional[Mapping[str, Any]] = None) -> ReconstructedNetwork:
    """Prune channels and return a new ReconstructedNetwork; the input is left untouched.

    ratio: fraction of each group's channels removed, or `{layer: ratio}` (groups not named stay).
    example_kwargs: keyword inputs to trace a plain module with (a tokenizer's batch), beside or instead
    of example_inputs.
    ignore / ratio keys: node names, the model's modules (`ignore=[model.fc]`) or containers
    (`"layer4"`, `model.layer4`: every layer inside).
    target_macs: prune uniformly until MACs fall to this fraction of the original (<= 1), or to this
    absolute number of MACs (> 1). Overrides `ratio`.
    mode: "hard" removes channels; "soft" zeroes them (same function, same shapes).
    round_to: every pruned group keeps a multiple of this many channels (rounded up). With target_macs
    the budget is still met: the uniform ratio that fits, then the groups win back one rounding step
    each, round-robin, while the network still fits (else every group rounding at once can land far
    under the budget: a 96-wide ViT at 0.75 kept 0.59x).
    target_latency: prune uniformly until the measured latency at the example inputs' batch falls to this
    fraction of the original's (`amc.compressors.latency`: a table of timed ratios, cached on disk, then
    the result timed against the original). `latency_table`: a `LatencyTable` to reuse, else built here.
    latency_allocation: "uniform" (one ratio for every group, from the table above), "layers" (per-group
    ratios from per-layer latency tables, `amc.compressors.layer_latency`: channels go where they buy the
    most measured milliseconds per unit of capacity lost, NetAdapt's idea; `latency_table` is then a
    `LayerLatencyTable`; use it with round_to=8) or "auto" (both, then the one whose outputs stay closer
    to the original's on 4 batches of `dataloader`, BatchNorm re-estimated; `net.meta["latency"]` says
    which and why).
    heads: remove whole attention heads (the head count drops, each kept head keeps its dims and the
    softmax scale) instead of the same dims in every head; nn.MultiheadAttention ties its heads to the
    residual width and keeps its own rule (`amc.compressors.vtp.unfuse_attention` splits it first).
    Bad arguments raise `amc.errors.PruningError` (a ValueError), a model that cannot be traced
    `amc.errors.CaptureError`; no other exception is raised for bad input (fuzzed: scripts/fuzz.py).
    """
    if isinstance(ratio, torch.Tensor) or (isinstance(ratio, (tuple, list)) and ratio
                                           and isinstance(ratio[0], torch.Tensor)):
        raise PruningError("amc.prune's second argument is the ratio, got tensor input(s): pass the inputs as "
                           "amc.prune(model, example_inputs=(x,), target_macs=...)")
    if mode not in ("hard", "soft"):
        raise PruningError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if not isinstance(heads, bool):
        raise PruningError(f"heads must be True or False, got {heads!r}")
    _check_target_macs(target_macs)
    check_round_to(round_to)
    from .latency import check_target_latency

    target_latency = check_target_latency(target_latency)
    if target_latency is not None and target_macs is not None:
        raise PruningError("give target_macs or target_latency, not both")
    net, inputs = _as_network(model, example_inputs, example_kwargs)
    ignore = _ignore_by_node(model, net, ignore)
    if target_macs is None and target_latency is None:
        ratio = _ratio_by_node(model, net, ratio)
    if latency_allocation not in ("uniform", "layers", "auto"):
        raise PruningError(f"latency_allocation must be 'uniform', 'layers' or 'auto', got {latency_allocation!r}")
    if target_latency is not None:
        plan = plan_pruning(net, criterion, inputs, ignore, dataloader, round_to, heads)
        _warn_if_mostly_frozen(plan)
        key = {"criterion": str(criterion), "round_to": round_to, "ignore": sorted(ignore), "heads": heads}
        if latency_allocation != "auto":
            return _to_latency(plan, latency_allocation, target_latency, inputs, mode, latency_table, key)
        return _to_latency_auto(plan, target_latency, inputs, mode, latency_table, key, dataloader)
    if target_macs is None:
        _validate_ratio(ratio, net)
        if not isinstance(ratio, Mapping) and float(ratio) == 0.0:
            return net.copy()
    plan = plan_pruning(net, criterion, inputs, ignore, dataloader, round_to, heads)
    _warn_if_mostly_frozen(plan)
    if target_macs is None:
        return plan.apply(ratio, mode)
    return plan.apply_units(units_at(plan, group_ratios_for_macs(plan, target_macs)), mode)


def _to_latency(plan: PruningPlan, allocation: str, target: float, inputs: Tuple[Any, ...], mode: str,
                table: Any, key: Dict[str, Any]) -> ReconstructedNetwork:
    """`plan` pruned until it measures `target` x the original's latency, one ratio ("uniform") or
    per-group ratios ("layers"), from `table` or one built (and cached) here."""
    from .latency import LatencyTable, build_table, prune_to_latency
    from .layer_latency import LayerLatencyTable, layer_table, prune_to_layer_latency

    kind = LayerLatencyTable if allocation == "layers" else LatencyTable
    if table is not None and not isinstance(table, kind):
        how = ("amc.compressors.layer_latency.layer_table" if allocation == "layers" else "amc.latency_table")
        raise PruningError(f"latency_allocation={allocation!r} reads a {kind.__name__} ({how}), got "
                           f"{type(table).__name__}; pass none to have it built here")
    if allocation == "layers":
        table = table if table is not None else layer_table(plan, inputs, extra_key=key)
        return prune_to_layer_latency(plan, target, inputs, table, mode)
    table = table if table is not None else build_table(plan, inputs, extra_key=key)
    return prune_to_latency(plan, target, inputs, table, mode)


def _to_latency_auto(plan: PruningPlan, target: float, inputs: Tuple[Any, ...], mode: str, table: Any,
                     key: Dict[str, Any], dataloader: Optional[Iterable]) -> ReconstructedNetwork:
    """Both allocations to the same measured budget; the one whose outputs stay closer to the original's
    on a few calibration batches (BatchNorm re-estimated) is kept. Neither allocation wins everywhere
    (scripts/results/latency_budget*.md): the per-layer one on a compute-bound ViT, the uniform one where
    it cuts the layers a network cannot spare."""
    from itertools import islice

    from .sensitivity import least_distorted

    if dataloader is None:
        raise PruningError("latency_allocation='auto' compares the two allocations on calibration data: pass "
                           "dataloader= (a few batches of training inputs; labels are not read)")
    if table is not None:
        raise PruningError("latency_allocation='auto' builds (and caches) a table for each allocation: pass "
                           "latency_table=None")
    nets, failed = {}, {}
    for allocation in ("uniform", "layers"):
        try:
            nets[allocation] = _to_latency(plan, allocation, target, inputs, mode, None, key)
        except PruningError as exc:  # a budget one allocation cannot meet: the other may
            failed[allocation] = str(exc)
    if not nets:
        raise PruningError(f"target_latency={target:g} met by neither allocation: {failed}")
    chosen, scores = least_distorted(plan.net, nets, islice(dataloader, 4))
    net = nets[chosen]
    net.meta["latency"] = {**net.meta.get("latency", {}), "allocation": chosen, "distortion": scores,
                           "failed": failed}
    return net


def _warn_if_mostly_frozen(plan: PruningPlan) -> None:
    """A network that can lose less than half of its channels gets told why, not a silent near no-op."""
    fraction = plan.prunable_fraction()
    if fraction >= 0.5:
        return
    causes: Dict[str, int] = {}
    for row in plan.frozen_report():
        for cause in row["causes"][:1] or ["unknown"]:
            causes[cause] = causes.get(cause, 0) + row["channels"]
    top = sorted(causes.items(), key=lambda kv: -kv[1])[:5]
    warn_user(f"amc.prune: only {fraction:.0%} of the layers' output channels can be pruned; the rest are "
              "frozen by " + "; ".join(f"{c} ({n} channels)" for c, n in top) +
              ". See amc.compressors.plan_pruning(...).frozen_report(); register a channel rule for an op "
              "that has none (amc.register_op)")


def _check_target_macs(target_macs: Any) -> None:
    if target_macs is None:
        return
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) \
            or not 0.0 < float(target_macs) < math.inf:
        raise PruningError(f"target_macs must be a positive fraction (<= 1) or MACs count (> 1), got {target_macs!r}")


def _percent_hint(target_macs: float) -> str:
    """A budget of 1-100 that misses is most likely a percentage: say so, with the fraction to write."""
    if 1.0 < float(target_macs) <= 100.0:
        return (f"; a target_macs above 1 is a count of MACs per sample: for {target_macs:g}% of the MACs "
                f"write target_macs={float(target_macs) / 100:g}")
    return ""


SLACK_TOL = 0.005  # round_to's slack is won back until the MACs are this close under the budget


def _absolute_macs(plan: PruningPlan, target_macs: float, base: Optional[int] = None) -> float:
    """A budget as MACs per sample: a fraction (<= 1) of the plan's network, or a count (> 1)."""
    if target_macs > 1.0:
        return float(target_macs)
    return target_macs * (base if base is not None else count(plan.net, *per_sample(plan.example_inputs))[0])


def group_ratios_for_macs(plan: PruningPlan, target_macs: float) -> List[float]:
    """Per-group ratios keeping at most `target_macs`: the smallest uniform ratio that does, and with
    `round_to` the rounding steps won back where they still fit (every group rounds at once, so one
    ratio alone can land far under the budget). LASSO selection prunes by these counts too."""
    ratio = ratio_for_macs(plan, target_macs)
    if plan.importance is None or all(g.round_to <= 1 for g in plan.groups):
        return [ratio] * len(plan.groups)
    target = _absolute_macs(plan, target_macs)
    inputs1 = per_sample(plan.example_inputs)

    def macs(units: np.ndarray) -> int:
        return count(apply(plan.net, plan.analysis, plan.roots, units, "hard"), *inputs1)[0]

    return slack_ratios(plan, ratio, macs, target, SLACK_TOL)


def ratio_for_macs(plan: PruningPlan, target_macs: float, tol: float = 0.002) -> float:
    """The smallest uniform ratio whose hard-pruned MACs reach `target_macs` (binary search)."""
    _check_target_macs(target_macs)
    base, _ = count(plan.net, *per_sample(plan.example_inputs))
    target = _absolute_macs(plan, target_macs, base)
    if target > base:
        raise PruningError(f"target_macs={target_macs} is above the network's current {base:,} MACs"
                           + _percent_hint(target_macs))
    if target >= base:
        return 0.0

    def macs_at(r: float) -> int:
        pruned = apply(plan.net, plan.analysis, plan.roots, plan.pruned_roots(r), "hard")
        return count(pruned, *per_sample(plan.example_inputs))[0]

    most = macs_at(0.99)
    if most > target:
        raise PruningError(f"cannot reach target_macs={target_macs}: even ratio 0.99 leaves "
                           f"{most:,} of {base:,} MACs (frozen layers, or round_to, keep the rest)"
                           + _percent_hint(target_macs))
    return smallest_within_budget(macs_at, target, hi=0.99, tol=tol)


@_keeps_model
def prune_groups(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None,
                 ignore: Iterable[Union[str, nn.Module]] = (),
                 example_kwargs: Optional[Mapping[str, Any]] = None) -> List[Group]:
    """The coupled channel groups of a network: `group.producers`, `group.layers`, `group.size`."""
    return plan_pruning(model, "l2", example_inputs, ignore, example_kwargs=example_kwargs).groups
