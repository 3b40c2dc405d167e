"""Channel dependency analysis: which dims of which parameters must be pruned together.

Every prunable channel is an *element* (an int). Producers (conv/linear outputs, parameters used
directly) create fresh elements; every tensor in the graph carries, per dim, a vector of the elements
its positions belong to (None: a dim with no channels to prune, such as batch or space). Ops
propagate those vectors by the rule registered for them (`amc.compressors.rules`): pass-through,
coupling (union-find), concatenation (vectors joined), splitting (sliced), reshaping (blocks), or
freezing (union with element 0, the frozen sentinel: what an unknown op touches is never pruned).

An `Axis` says "index i along dim `dim` of parameter `attr` of node `node` is element vector[i]";
pruning a set of elements is then slicing every axis, which `amc.compressors.apply` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import AmcError, PruningError
from ..graph import reparam
from ..graph.network import ReconstructedNetwork
from ..graph.node import Node
from ..graph.template import Ref, iter_refs, map_template

Vec = Optional[np.ndarray]
OUTPUT_CAUSE = "the network's output shape"  # why the classifier's channels (and what feeds them 1:1) stay


class TL:
    """Labels of one tensor: one element vector (or None) per dim."""

    __slots__ = ("dims",)

    def __init__(self, dims: List[Vec]):
        self.dims = dims

    @classmethod
    def unlabeled(cls, ndim: int) -> "TL":
        return cls([None] * ndim)

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def __repr__(self) -> str:
        return "TL(" + ", ".join("-" if d is None else f"[{len(d)}]" for d in self.dims) + ")"


@dataclass
class Axis:
    """Index i along `dim` of `attr` (a dotted attribute of the node's module) is element `vec[i]`."""

    node: str
    attr: str
    dim: int
    vec: np.ndarray


@dataclass
class Fixup:
    """A non-parameter edit hard pruning must make, e.g. a reshape's constant size or a head count."""

    node: str
    edit: Callable[..., None]  # (net, fixup, keep_of, mode): defined beside the rule that asks for it
    data: Dict[str, Any] = field(default_factory=dict)


def _roots(parent: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Roots of the elements `v`, by pointer jumping over the whole vector at once (then compressed)."""
    r = parent[v]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            break
        r = up
    parent[v] = r
    return r


def _merge(parent: np.ndarray, ra: np.ndarray, rb: np.ndarray) -> None:
    """Union the roots `ra[i]` with `rb[i]` for every i: each connected set of roots hangs under its
    smallest one, which is the root the one-pair-at-a-time union picks (the sentinel 0, then older ones)."""
    if not len(ra):
        return
    u, inv = np.unique(np.concatenate([ra, rb]), return_inverse=True)
    ia, ib = inv[:len(ra)], inv[len(ra):]
    label = u.copy()  # min-label propagation along the pairs: one round when no root is paired twice
    while True:
        m = np.minimum(label[ia], label[ib])
        before = label.copy()
        np.minimum.at(label, ia, m)
        np.minimum.at(label, ib, m)
        if np.array_equal(label, before):
            break
    parent[u] = label


class UnionFind:
    """Union-find over elements; element 0 is the frozen sentinel.

    Beside it, `coupled` keeps the same unions without the sentinel, and `frozen_by` the first reason
    each element was frozen (`cause`, set by the analysis to the node being read), so that a frozen
    group can say which node froze it (`freeze_causes`). Parents live in numpy arrays and vectors are
    joined at once (`union_vecs`, `freeze`): resnet50's analysis makes ~16k unions per prune."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self._coupled = np.zeros(1024, dtype=np.int64)
        self.size = 1
        self.space: List[int] = [-1]
        self.frozen_by: Dict[int, str] = {}
        self.cause = ""

    @property
    def parent(self) -> np.ndarray:
        return self._parent[:self.size]

    @property
    def coupled(self) -> np.ndarray:
        return self._coupled[:self.size]

    def new(self, n: int, space: int) -> np.ndarray:
        start, end = self.size, self.size + n
        if end > len(self._parent):
            cap = max(end, 2 * len(self._parent))
            self._parent = np.concatenate([self._parent, np.zeros(cap - len(self._parent), dtype=np.int64)])
            self._coupled = np.concatenate([self._coupled, np.zeros(cap - len(self._coupled), dtype=np.int64)])
        ids = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = ids
        self._coupled[start:end] = ids
        self.size = end
        self.space.extend([space] * n)
        return ids

    def find(self, a: int) -> int:
        return int(_roots(self._parent, np.asarray([a], dtype=np.int64))[0])

    def union(self, a: int, b: int) -> None:
        self.union_vecs(np.asarray([a], dtype=np.int64), np.asarray([b], dtype=np.int64))

    def freeze_causes(self, elements: np.ndarray) -> List[str]:
        """Why these (frozen) elements are frozen: the causes recorded on anything coupled to them."""
        if not self.frozen_by:
            return []
        classes = _roots(self._coupled, np.unique(np.asarray(elements, dtype=np.int64)))
        keys = np.fromiter(self.frozen_by, dtype=np.int64, count=len(self.frozen_by))
        hit = np.isin(_roots(self._coupled, keys), classes)
        causes = [c for c, h in zip(self.frozen_by.values(), hit.tolist()) if h]
        return list(dict.fromkeys(causes))

    def union_vecs(self, a: Vec, b: Vec) -> None:
        """Couple two equally long vectors position by position; None on one side freezes the other."""
        if a is None and b is None:
            return
        if a is None or b is None:
            self.freeze(b if a is None else a)
            return
        if len(a) != len(b):
            self.freeze(a)
            self.freeze(b)
            return
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        real = (a != 0) & (b != 0)  # the coupled view never joins the sentinel
        ca, cb = _roots(self._coupled, a[real]), _roots(self._coupled, b[real])
        differ = ca != cb
        _merge(self._coupled, ca[differ], cb[differ])
        ra, rb = _roots(self._parent, a), _roots(self._parent, b)
        differ = ra != rb
        _merge(self._parent, ra[differ], rb[differ])

    def freeze(self, v: Vec) -> None:
        if v is None:
            return
        x = np.unique(np.asarray(v, dtype=np.int64))
        x = x[x != 0]
        r = _roots(self._parent, x)
        live = r != 0
        # the first (smallest) element of each still-live class records why: as freezing one by one would
        _, first = np.unique(r[live], return_index=True)
        for e in x[live][first].tolist():
            self.frozen_by.setdefault(e, self.cause or "unknown")
        self._parent[r] = 0

    def roots(self) -> np.ndarray:
        return _roots(self._parent, np.arange(self.size, dtype=np.int64)).copy()


@dataclass
class Space:
    """Where a block of elements was created: a node's output channels or a parameter dim."""

    id: int
    node: str
    kind: str  # "out" (module producer) or "param"
    size: int


class Analysis:
    """Result of `analyze`: elements, couplings, axes, fixups, and per-node labels."""

    def __init__(self, net: ReconstructedNetwork):
        self.net = net
        self.uf = UnionFind()
        self.spaces: List[Space] = []
        self.axes: List[Axis] = []
        self.fixups: List[Fixup] = []
        self.multiples: List[Tuple[np.ndarray, int]] = []  # (dim vector, m): its kept count must be k*m
        self.nonempty: List[np.ndarray] = []  # runs of channels that must keep at least one (apply spares one)
        self.labels: Dict[str, Any] = {}
        self.size_sources: Dict[str, Any] = {}  # TensorSize/IntArith node -> labels of the dims it read
        self.output: Any = None  # the network's output on the example inputs (shapes are checked later)
        self.probed: List[str] = []  # nodes with no rule proven element-wise by probing (rules/probe.py)
        self.heads = False  # a labeled dim split into (..., heads, head_dim) labels the heads, not the dims

    # helpers for rules --------------------------------------------------------------------------
    def new_space(self, node: str, size: int, kind: str = "out") -> np.ndarray:
        space = Space(len(self.spaces), node, kind, size)
        self.spaces.append(space)
        return self.uf.new(size, space.id)

    def axis(self, node: str, attr: str, dim: int, vec: Vec) -> None:
        if vec is not None:
            self.axes.append(Axis(node, attr, dim, vec))

    def freeze_all(self, labels: Any) -> None:
        for tl in iter_labels(labels):
            for v in tl.dims:
                self.uf.freeze(v)

    def fixup(self, node: str, edit: Callable[..., None], **data: Any) -> None:
        self.fixups.append(Fixup(node, edit, data))


def iter_labels(obj: Any):
    if isinstance(obj, TL):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_labels(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_labels(v)


def unlabeled_like(value: Any) -> Any:
    """Labels for a value: None per dim for tensors, structure kept."""
    if isinstance(value, torch.Tensor):
        return TL.unlabeled(value.dim())
    if isinstance(value, (list, tuple)):
        return [unlabeled_like(v) for v in value]
    if isinstance(value, dict):
        return {k: unlabeled_like(v) for k, v in value.items()}
    return None


def _index(value: Any, path: Tuple[Any, ...]) -> Any:
    for p in path:
        if value is None:
            return None
        value = value[p]
    return value


Rule = Callable[["RuleCall"], Any]


@dataclass
class RuleCall:
    """Everything a rule sees for one node."""

    a: Analysis
    node: Node
    module: nn.Module
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    out: Any
    largs: List[Any]
    lkwargs: Dict[str, Any]

    def arg(self, i: int, name: Optional[str] = None, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default) if name else default

    def axis(self, attr: str, dim: int, vec: Vec) -> None:
        """Record that `dim` of this node's parameter `attr` is indexed by the channels `vec`."""
        self.a.axis(self.node.name, attr, dim, vec)

    def larg(self, i: int, name: Optional[str] = None) -> Any:
        if i < len(self.largs):
            return self.largs[i]
        return self.lkwargs.get(name) if name else None


def analyze(net: ReconstructedNetwork, example_inputs: Sequence[Any], rule_for: Callable[[nn.Module, Node], Rule],
            observe: Optional[Callable[[Node, nn.Module, tuple, dict, Any], None]] = None,
            heads: bool = False) -> Analysis:
    """Run the graph once on example inputs and propagate channel labels through every node.

    heads: where a channel dim is split into (heads, head_dim), a unit is a whole head (its head dims
    kept), instead of one head dim shared by every head (the head count kept)."""
    a = Analysis(net)
    a.heads = bool(heads)
    for inp in net.input_nodes:
        a.labels[inp.name] = None  # filled lazily below from the bound value

    def get(ref: Any) -> Any:
        if isinstance(ref, Ref):
            return _index(a.labels.get(ref.node), ref.path)
        return None

    def observer(node: Node, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        largs = [map_template(t, get) if _has_ref(t) else None for t in node.args]
        lkwargs = {k: (map_template(t, get) if _has_ref(t) else None) for k, t in node.kwargs.items()}
        call = RuleCall(a, node, module, args, kwargs, out, largs, lkwargs)
        rule = rule_for(module, node)
        a.uf.cause = f"{node.name} ({node.meta.get('op', type(module).__name__)}" + \
            (", no channel rule)" if getattr(rule, "__name__", "") in ("opaque", "probe_or_freeze") else ")")
        try:
            labels = rule(call)
        except AmcError:
            raise
        except Exception as exc:  # noqa: BLE001 - a rule's bug must name the node, not surface raw
            raise PruningError(f"the channel rule {getattr(rule, '__name__', rule)!r} failed on node {a.uf.cause}: "
                               f"{type(exc).__name__}: {exc}. Pass ignore=[...] for the layers around it, or "
                               "report the model; amc.compressors.rules.mark_opaque(op) stops channels there") \
                from exc
        a.labels[node.name] = labels if labels is not None else unlabeled_like(out)
        how = reparam.computed_by(module)
        if how:  # slicing `weight` would not reach the tensors it is computed from (weight norms are edited exactly)
            a.uf.cause = (f"{node.name} (its weights are computed by {how}; prune it after "
                          "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') or "
                          "torch.nn.utils.remove_spectral_norm(module); weight_norm is pruned as it is)")
            a.freeze_all(a.labels[node.name])
            a.freeze_all(largs)
            a.freeze_all(list(lkwargs.values()))
        if observe is not None:
            observe(node, module, args, kwargs, out)

    env_inputs = list(example_inputs)
    for inp in net.input_nodes:
        if isinstance(inp.index, int) and inp.index < len(env_inputs):
            a.labels[inp.name] = unlabeled_like(env_inputs[inp.index])
    with torch.no_grad():
        out = net.run_observed(tuple(example_inputs), {}, observer)
    # outputs never change shape: everything that reaches them is frozen (named first as the cause, so a
    # tied lm_head's vocabulary reads as output, not as a tensor the embedding shares)
    a.uf.cause = OUTPUT_CAUSE
    for r in iter_refs(net.outputs):
        a.freeze_all(_index(a.labels.get(r.node), r.path))
    _couple_shared_parameters(a)
    a.output = out
    return a


def param_of(net: nn.Module, node_module: str, attr: str) -> torch.Tensor:
    """The tensor behind `attr` (dotted) of the module stored under `node_module` (for a weight-normed or
    masked weight, the weight it computes now: a hook's attribute holds the last call's)."""
    obj, last = owner_of(net, node_module, attr)
    return reparam.computed(obj, last) if last in reparam.computed_weights(obj) else getattr(obj, last)


def owner_of(net: nn.Module, node_module: str, attr: str) -> Tuple[nn.Module, str]:
    """(the module holding `attr` (dotted) of the module under `node_module`, the attribute's last name)."""
    obj: nn.Module = net.network[node_module]
    *path, last = attr.split(".")
    for p in path:
        obj = getattr(obj, p)
    return obj, last


def tensor_identity(net: nn.Module, node_module: str, attr: str) -> int:
    """An id that is the same for every reader of one stored tensor: a weight-normed weight is a new
    tensor at each read, so its `v` stands for it."""
    obj, last = owner_of(net, node_module, attr)
    src = reparam.source_tensor(obj, last)
    return id(src if src is not None else getattr(obj, last))


def _couple_shared_parameters(a: Analysis) -> None:
    """A tensor read by several nodes (a module called twice; tied weights: an embedding reused as the
    output projection) is sliced once, so the channels that index the same dim of it from every side are
    one group, and a dim that a holder without a channel rule also reads (an nn.Embedding) stays whole."""
    holders: Dict[int, set] = {}
    for key, mod in a.net.network.items():
        for attr, t in [*mod.named_parameters(remove_duplicate=False), *mod.named_buffers(remove_duplicate=False)]:
            holders.setdefault(id(t), set()).add((key, attr))
        for attr in reparam.computed_weights(mod):  # its `v` (`weight_orig`) is read as `weight` (tensor_identity)
            holders[id(reparam.source_tensor(mod, attr))] = {(key, attr)}
    by_dim: Dict[Tuple[int, int], List[Axis]] = {}
    for ax in a.axes:
        by_dim.setdefault((tensor_identity(a.net, a.net.node(ax.node).module, ax.attr), ax.dim), []).append(ax)
    for (tid, _), axes in by_dim.items():
        if len(holders.get(tid, ())) < 2 and len({ax.node for ax in axes}) < 2:
            continue  # one holder, read by one node (a module called twice is one holder, two nodes)
        head = axes[0]
        for ax in axes[1:]:
            a.uf.cause = f"{ax.node} (its {ax.attr} is {head.node}'s {head.attr})"
            a.uf.union_vecs(head.vec, ax.vec)
        other = holders[tid] - {(a.net.node(ax.node).module, ax.attr) for ax in axes}
        if other:
            key, attr = sorted(other)[0]
            a.uf.cause = f"{head.node} (its {head.attr} is also {key}.{attr}, which no channel rule slices)"
            a.uf.freeze(head.vec)


def _has_ref(t: Any) -> bool:
    return any(True for _ in iter_refs(t))
