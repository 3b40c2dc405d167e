"""The op registry: one entry per op, keyed by the module class or the callable itself.

Everything amc knows about an op lives in its `OpSpec`: how capture wraps and replays it, its MACs,
and the facets the other layers attach to the same entry (how channels flow through it, how a hard
prune resizes it, whether silencing must treat it as a norm or a producer, how it serialises to JSON).
The graph stores those facets and never reads them, so it still knows nothing of pruning or export.
`register_op` is the one call that adds or extends an entry; `register_module_op` /
`register_function_op` are its older spellings.
"""
from __future__ import annotations

import contextvars
import importlib
import math
import operator
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LoadError
from .macs import (addbmm_macs, addmm_macs, bilinear_macs, chain_macs, contraction_macs, conv_macs, fmha_macs,
                   grouped_mm_macs, rnn_cell_macs, rnn_macs, einsum_macs, fconv_macs, flinear_macs, fnorm_macs,
                   in_numel, linear_macs, matmul_macs, mha_macs, norm_macs, out_numel, sdpa_macs)

MacsFn = Callable[[nn.Module, tuple, dict, Any], int]

# Set by the safe pkl loader: op callables named in a file then resolve from the known torch namespaces
# only, so a file can never make unpickling import an arbitrary module.
STRICT_CALLABLE_NAMES: "contextvars.ContextVar[bool]" = contextvars.ContextVar("amc_strict_names", default=False)

ROLES = ("producer", "norm", "embedding")  # what silencing (Soft Filter Pruning) zeroes: a producer's rows, a
# norm's shift, an embedding's columns


@dataclass
class OpSpec:
    """Everything amc knows about one op, whichever layer uses it."""

    key: Any
    name: str
    wrapper: Optional[type] = None  # op-module class for callables; None for leaf modules
    macs: Optional[MacsFn] = None
    leaf: bool = True  # modules only: held as a leaf node rather than traced into
    meta: Dict[str, Any] = field(default_factory=dict)
    channels: Optional[Callable] = None  # amc.compressors: how channel labels flow through the op
    opaque: bool = False  # declared to stop channels (pruning never crosses it); not an oversight
    resize: Optional[Callable[[nn.Module], None]] = None  # after a hard prune: size attributes from params
    role: Optional[str] = None  # one of ROLES, or None
    json: Optional[Any] = None  # amc.export.json_io: (to_config, from_config) serialiser
    call_sites: Tuple[str, ...] = ()  # plain Python functions: modules whose global capture swaps for a leaf call
    like: Optional["OpSpec"] = None  # facets left unset are read from this entry (`register_op(like=...)`)

    def get(self, facet: str) -> Any:
        """A facet, falling back to the `like` entry's: read at use, so facets registered later (the
        channel rules load with amc.compressors) still reach a layer registered `like` a built-in."""
        value = getattr(self, facet)
        if value in (None, False) and self.like is not None:
            return self.like.get(facet)
        return value

    @property
    def declared(self) -> bool:
        """Pruning knows what to do with it: a channel rule, or an explicit opaque mark."""
        return self.get("channels") is not None or bool(self.get("opaque"))


_MODULE_OPS: Dict[type, OpSpec] = {}
_FUNCTION_OPS: Dict[Any, OpSpec] = {}


def _table(key: Any) -> Dict[Any, OpSpec]:
    return _MODULE_OPS if isinstance(key, type) and issubclass(key, nn.Module) else _FUNCTION_OPS


def _entry(key: Any, name: Optional[str], wrapper: Optional[type], leaf: Optional[bool]) -> OpSpec:
    table = _table(key)
    spec = table.get(key)
    if spec is None:
        is_module = table is _MODULE_OPS
        label = name or getattr(key, "__name__", None) or repr(key)
        spec = OpSpec(key, label, None if is_module else (wrapper or FunctionOp), leaf=True if leaf is None else leaf)
        table[key] = spec
        return spec
    if name is not None:
        spec.name = name
    if wrapper is not None:
        spec.wrapper = wrapper
    if leaf is not None:
        spec.leaf = leaf
    return spec


def register_op(*keys: Any, name: Optional[str] = None, wrapper: Optional[type] = None, leaf: Optional[bool] = None,
                macs: Optional[MacsFn] = None, channels: Optional[Callable] = None, opaque: Optional[bool] = None,
                resize: Optional[Callable[[nn.Module], None]] = None, role: Optional[str] = None,
                json: Optional[Any] = None, like: Any = None, call_sites: Sequence[str] = (),
                **meta: Any) -> Callable[[Any], Any]:
    """Add or extend the registry entry of module classes / callables; facets left None are kept.

    A plain Python function registered with `leaf=True` is recorded as one node, its body run as is:
    for code whose sizes come from tensor values (`int(box[2] - box[0])`, a loop per detection), which
    a trace would freeze. Capture swaps the function's global in its own module and in `call_sites`
    (the modules that imported it by name), as torch.fx.wrap does.

    `like=nn.Conv2d` starts from that entry's facets (MACs, channel rule, resize, role), so a layer that
    behaves like a known one needs only what differs.
    Returns a decorator, so it also reads as `@register_op(MyConv, macs=...)` above the channel rule
    (the decorated function becomes the `channels` facet) or `@register_op(macs=...)` above a module
    class (the class becomes the key). A facet set twice to different values warns, as timm does."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    facets = {"macs": macs, "channels": channels, "opaque": opaque, "resize": resize, "role": role, "json": json}
    base = None
    if like is not None:
        base = _table(like).get(like)
        if base is None:
            raise ValueError(f"like={like!r} has no op registry entry to start from")

    fresh: set = set()  # (key, facet) set by this call: the decorator may refine them without a warning

    def put(key: Any, values: Dict[str, Any]) -> None:
        spec = _entry(key, name, wrapper, leaf)
        if base is not None:
            spec.like = base
        for facet, value in values.items():
            if value is None:
                continue
            old = getattr(spec, facet)
            if old not in (None, False) and old is not value and (key, facet) not in fresh:
                warnings.warn(f"amc: {facet} of the op registry entry for {key!r} overwritten", stacklevel=4)
            setattr(spec, facet, value)
            fresh.add((key, facet))
        spec.meta.update(meta)
        if call_sites or (leaf and _is_python_function(key)):
            spec.call_sites = tuple(dict.fromkeys((str(key.__module__),) + spec.call_sites + tuple(call_sites)))
            if spec.channels is None:  # its body is not traced: channels stop there unless a rule says more
                spec.opaque = True

    for key in dict.fromkeys(keys):  # aliases such as Tensor.__neg__ is Tensor.neg appear once
        put(key, facets)

    def decorate(obj: Any) -> Any:
        if keys:
            for key in dict.fromkeys(keys):
                put(key, {"channels": obj})
        else:
            put(obj, facets)
        return obj
    return decorate


def register_module_op(*classes: type, name: Optional[str] = None, macs: Optional[MacsFn] = None,
                       leaf: bool = True) -> None:
    """Module classes capture keeps as leaf layer nodes (older spelling of `register_op`)."""
    for cls in classes:
        register_op(cls, name=name or cls.__name__, macs=macs, leaf=leaf)


def register_function_op(*fns: Any, name: str, wrapper: Optional[type] = None,
                         macs: Optional[MacsFn] = None, **meta: Any) -> None:
    """Torch functions / Tensor methods with a dedicated wrapper (older spelling of `register_op`)."""
    register_op(*fns, name=name, wrapper=wrapper or FunctionOp, macs=macs, **meta)


def module_entry(cls: type) -> Optional[OpSpec]:
    """The entry registered for exactly this class (no parent lookup): serialisers are per class."""
    return _MODULE_OPS.get(cls)


def inplace_twin(key: Any) -> Optional[Any]:
    """`torch.sigmoid` -> `torch.sigmoid_`, `Tensor.exp` -> `Tensor.exp_`, `F.elu` -> `F.elu_`: the in-place
    form of a callable, looked up in the namespace the callable itself lives in."""
    name = getattr(key, "__name__", "")
    if isinstance(key, type) or not name or name.endswith("_"):
        return None
    for ns in (torch, torch.Tensor, F):
        if getattr(ns, name, None) is key:
            twin = getattr(ns, name + "_", None)
            return twin if callable(twin) else None
    return None


def registered_ops() -> List[OpSpec]:
    """Every entry, modules first: what the registry-walking tests parametrize over."""
    return list(_MODULE_OPS.values()) + list(_FUNCTION_OPS.values())


def _is_python_function(obj: Any) -> bool:
    return isinstance(obj, types.FunctionType) and (getattr(obj, "__module__", "") or "").split(".")[0] != "torch"


def leaf_functions() -> List[OpSpec]:
    """Plain Python functions registered to be recorded whole (see `register_op`)."""
    return [spec for key, spec in list(_FUNCTION_OPS.items()) if spec.leaf and spec.call_sites]


def plain_layer(module: nn.Module, *bases: type) -> Optional[type]:
    """The first of `bases` that `module` is an instance of while computing what that class computes: the
    class itself, or a subclass that keeps its forward (torchvision's `Conv3DSimple`, a Linear subclass
    that only adds attributes). None otherwise, so the compressors that rebuild a layer from its class's
    arguments never replace a forward they do not know."""
    for base in type(module).__mro__:
        if base in bases:
            return base if type(module).forward is base.forward else None
    return None


def module_spec(module: nn.Module) -> Optional[OpSpec]:
    """Spec of a leaf module: exact class, or a subclass that keeps its parent's forward."""
    cls = type(module)
    spec = _MODULE_OPS.get(cls)
    if spec is not None:
        return spec
    for base in cls.__mro__[1:]:
        spec = _MODULE_OPS.get(base)
        if spec is not None:
            return spec if cls.forward is base.forward else None
    return None


def function_spec(fn: Any) -> Optional[OpSpec]:
    try:
        return _FUNCTION_OPS.get(fn)
    except TypeError:  # unhashable callable
        return None


def spec_of(module: nn.Module) -> Optional[OpSpec]:
    """Spec for any op module held by a graph node."""
    if isinstance(module, FunctionOp):
        return function_spec(module.fn)
    return module_spec(module)


# ----------------------------------------------------------------------------------------------
# Naming callables so that graphs pickle by name and JSON can name them without code.

_NAMESPACES: List[Tuple[str, Any]] = []
_NAME_OF: Dict[Any, str] = {}


def _torchvision_ops() -> Any:
    """`torch.ops.torchvision` with every registered op touched: capture records the dispatcher op
    (nms, roi_align of the detectors), and the namespace lists only ops already looked up."""
    ns = torch.ops.torchvision
    for op in torch._C._dispatch_get_all_op_names():
        if op.startswith("torchvision::"):
            getattr(ns, op.split("::", 1)[1].split(".", 1)[0], None)
    return ns


def _namespaces() -> List[Tuple[str, Any]]:
    if not _NAMESPACES:
        import torchvision.ops  # noqa: F401  (torchvision functions appear in some models)

        _NAMESPACES.extend([
            ("torch.nn.functional", F), ("torch", torch), ("torch.Tensor", torch.Tensor),
            ("torch.linalg", torch.linalg), ("torch.fft", torch.fft), ("torch.special", torch.special),
            ("torch.nn.init", torch.nn.init), ("torchvision.ops", importlib.import_module("torchvision.ops")),
            ("operator", operator), ("math", math), ("amc.graph.ops", importlib.import_module(__name__)),
            ("torch.ops.torchvision", _torchvision_ops()),
        ])
    return _NAMESPACES


def _build_names() -> None:
    for ns_name, ns in _namespaces():
        for attr in dir(ns):
            try:
                obj = getattr(ns, attr)
            except Exception:  # noqa: BLE001 - some attributes raise on access
                continue
            if not callable(obj) or isinstance(obj, type) and ns_name != "torch.Tensor":
                continue
            try:
                _NAME_OF.setdefault(obj, f"{ns_name}.{attr}")
            except TypeError:
                pass


def name_of_callable(fn: Any) -> Optional[str]:
    """Stable dotted name of a torch callable, or None when it has none we can resolve back."""
    if not _NAME_OF:
        _build_names()
    try:
        name = _NAME_OF.get(fn)
    except TypeError:
        name = None
    if name is None and _is_python_function(fn) and function_spec(fn) is not None and function_spec(fn).call_sites:
        name = f"{fn.__module__}.{fn.__qualname__}"
    if name is None and isinstance(getattr(fn, "__self__", None), type) and hasattr(fn, "__func__"):
        cls = fn.__self__  # autograd.Function.apply of a user class
        name = f"{cls.__module__}.{cls.__qualname__}.apply"
    return name


def resolve_callable(name: str, allow_any: bool = False) -> Any:
    """Inverse of `name_of_callable`. Only the known torch namespaces unless `allow_any` (pickle path)."""
    if not _NAME_OF:
        _build_names()
    for ns_name, ns in _namespaces():
        if name.startswith(ns_name + ".") and "." not in name[len(ns_name) + 1:]:
            attr = name[len(ns_name) + 1:]
            obj = getattr(ns, attr, None)
            try:
                known = obj is not None and _NAME_OF.get(obj) == name
            except TypeError:
                known = False
            if known or (obj is not None and allow_any):  # only names capture itself would write
                return obj
    from .known_leaves import register_known

    register_known(name)
    for spec in leaf_functions():  # registered by code this process imported: no foreign import
        if f"{spec.key.__module__}.{spec.key.__qualname__}" == name:
            return spec.key
    if allow_any:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for p in parts[i:]:
                obj = getattr(obj, p)
            return obj
    raise LoadError(f"unknown op callable {name!r}: it is not a torch/torchvision function amc can load "
                    "without running foreign code; save with pkl for custom ops")


# ----------------------------------------------------------------------------------------------
# Op modules: every captured call becomes one of these, so the graph is modules and parameters.

class FunctionOp(nn.Module):
    """Replays one torch function or Tensor method; the node supplies the arguments."""

    def __init__(self, fn: Any, fn_name: Optional[str] = None):
        super().__init__()
        self.fn = fn
        self.fn_name = fn_name or name_of_callable(fn)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.fn_name or repr(self.fn)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        if self.fn_name is not None:
            state["fn"] = None  # pickled by name, resolved on load
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.fn is None:
            self.fn = resolve_callable(self.fn_name, allow_any=not STRICT_CALLABLE_NAMES.get())


class ElemAdd(FunctionOp):
    """Seed name: element-wise addition (residual connections)."""


class ElemMul(FunctionOp):
    """Element-wise multiplication (gates, squeeze-excitation)."""


class Concatenate(FunctionOp):
    """Seed name: torch.cat along a dim."""


class TensorReshape(FunctionOp):
    """Seed name: view / reshape / flatten; sizes come from the graph, never frozen."""


class TensorTranspose(FunctionOp):
    """Seed name: permute / transpose."""


class TensorSqueeze(FunctionOp):
    """Seed name: squeeze / unsqueeze."""


class Interpolate(FunctionOp):
    """Seed name: F.interpolate / upsample."""


class PixelShuffle(FunctionOp):
    """Seed name: F.pixel_shuffle."""


class TensorSlice(FunctionOp):
    """Indexing, chunk, split, unbind: one input, pieces out."""


class MatMul(FunctionOp):
    """matmul / bmm / einsum / attention products."""


class SetItem(nn.Module):
    """`x[idx] = v`, returning the mutated `x` so later uses point at this node."""

    fn_name = "torch.Tensor.__setitem__"

    def forward(self, x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # symbolic_trace of amc.export.to_fx's module: a Proxy has no
            x.tracer.create_proxy("call_function", operator.setitem, (x, index, value), {})  # __setitem__
            return x
        x[index] = value
        return x


class TensorSize(nn.Module):
    """`x.shape` / `x.size(dim)` / `x.numel()` at run time: sizes are read, never frozen."""

    def __init__(self, dim: Optional[int] = None, numel: bool = False):
        super().__init__()
        self.dim = dim
        self.numel = numel

    def forward(self, x: torch.Tensor) -> Any:
        if self.numel:
            return x.numel()
        return x.shape if self.dim is None else x.shape[self.dim]

    def extra_repr(self) -> str:
        return "numel" if self.numel else f"dim={self.dim}"


class GetAttr(nn.Module):
    """A tensor-valued attribute such as `x.T`, `x.mT`, `x.real`."""

    def __init__(self, attr: str):
        super().__init__()
        self.attr = attr

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(x, self.attr)

    def extra_repr(self) -> str:
        return self.attr


class ParamHolder(nn.Module):
    """A parameter or buffer that traced-into code used directly (not through a leaf module)."""

    def __init__(self, value: torch.Tensor, is_buffer: bool = False):
        super().__init__()
        if is_buffer or not isinstance(value, nn.Parameter):
            self.register_buffer("value", value)
        else:
            self.value = value

    def forward(self) -> torch.Tensor:
        return self.value


class Constant(nn.Module):
    """A tensor made during forward from constants only; cloned when a later op mutates it."""

    def __init__(self, value: torch.Tensor, clone: bool = False):
        super().__init__()
        self.register_buffer("value", value.detach().clone())
        self.clone = clone

    def forward(self) -> torch.Tensor:
        return self.value.clone() if self.clone else self.value


class TrainingFlag(nn.Module):
    """The network's train/eval mode, read at run time: a dropout that the traced code switched on because
    its module was training (`F.dropout(x, p, training=self.training)`, an attention's
    `dropout_p=p if self.training else 0.`) reads it, so `.eval()` turns it off as it does in the model."""

    def forward(self) -> bool:
        return self.training


_GUARD_OPS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
              "ge": operator.ge, "truth": operator.truth}
_GUARD_SYMBOLS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "truth": "bool"}


class ShapeGuard(nn.Module):
    """A Python decision capture took on a traced size (`if x.shape[-1] > 8:`, `assert C == 64`).

    The graph holds the path taken for the captured sizes; at run time the same comparison is evaluated
    on the new sizes and, if it comes out differently, the run stops with a GraphError naming the source
    line instead of computing something else (or failing deep inside a layer). Passes that change sizes
    on purpose (pruning) re-baseline `expected` on the pruned network, whose path is by construction the
    captured one."""

    def __init__(self, op: str, expected: bool, source: str = "", captured: Any = None, value: bool = False):
        super().__init__()
        self.value = bool(value)  # a tensor's value read into Python (`if mask.all():`), not a size
        if op not in _GUARD_OPS:
            raise LoadError(f"unknown guard comparison {op!r}; expected one of {sorted(_GUARD_OPS)}")
        self.op = op
        self.expected = bool(expected)
        self.source = str(source)
        self.captured = captured
        self.rebaseline = False

    def forward(self, a: Any, b: Any = None) -> None:
        fn = _GUARD_OPS[self.op]
        result = bool(fn(a) if self.op == "truth" else fn(a, b))
        if self.rebaseline and not self.value:  # sizes follow a pruning pass; the inputs' values do not
            self.expected, self.captured = result, _guard_values(a, b)
        elif result != self.expected:
            from ..errors import GraphError

            if self.value:
                raise GraphError(f"value guard failed at {self.source or 'an unknown line'}: the model read a "
                                 f"tensor's value into Python there, and capture took the path where "
                                 f"{self.describe(self.captured)} is {self.expected}; this input gives "
                                 f"{self.describe(_guard_values(a, b))} = {result}, so the graph would compute "
                                 "something else. Trace with an input that takes this path, or make the model "
                                 "compute it with tensor ops (torch.where) instead of a Python branch")
            raise GraphError(f"shape guard failed at {self.source or 'an unknown line'}: capture took the path "
                             f"where {self.describe(self.captured)} is {self.expected}, but this input gives "
                             f"{self.describe(_guard_values(a, b))} = {result}. The graph only holds the captured "
                             "path: trace the model again with an input of this shape (or call it with inputs "
                             "shaped like the example)")
        return None

    def describe(self, values: Any) -> str:
        a, b = values if isinstance(values, (list, tuple)) and len(values) == 2 else (values, None)
        return f"bool({a})" if self.op == "truth" else f"{a} {_GUARD_SYMBOLS[self.op]} {b}"

    def extra_repr(self) -> str:
        return f"{self.describe(self.captured)} is {self.expected} ({self.source})"


def _guard_values(a: Any, b: Any) -> Tuple[Any, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return plain(a), plain(b)


class AutogradFunctionOp(FunctionOp):
    """A custom `torch.autograd.Function` kept whole, so its backward is kept too."""


# ----------------------------------------------------------------------------------------------
# The entries. Modules: held as leaves. Functions: dedicated wrappers.

register_module_op(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, macs=conv_macs)
register_module_op(nn.Linear, macs=linear_macs)
register_module_op(nn.Bilinear, macs=bilinear_macs)
register_module_op(nn.RNNCell, nn.LSTMCell, nn.GRUCell, macs=rnn_cell_macs)
register_module_op(nn.Embedding, nn.EmbeddingBag)
register_module_op(nn.RNN, nn.LSTM, nn.GRU, macs=rnn_macs)
register_module_op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                   nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, macs=norm_macs)
register_module_op(nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU, macs=out_numel)
register_module_op(nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
                   nn.Hardtanh, nn.SELU, nn.CELU, macs=out_numel)
register_module_op(nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                   nn.AlphaDropout, nn.Flatten, nn.Unflatten, nn.GLU,
                   nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d, nn.ConstantPad2d,
                   nn.ReflectionPad2d, nn.ReplicationPad2d)
register_module_op(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, macs=in_numel)
register_module_op(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, macs=out_numel)
register_module_op(nn.MultiheadAttention, macs=mha_macs)

T = torch.Tensor
register_function_op(torch.add, T.add, T.add_, T.__add__, T.__iadd__, T.__radd__, operator.add, name="ElemAdd",
                     wrapper=ElemAdd)
register_function_op(torch.sub, T.sub, T.sub_, T.__sub__, T.__isub__, T.__rsub__, torch.rsub, name="ElemSub")
register_function_op(torch.mul, T.mul, T.mul_, T.__mul__, T.__imul__, T.__rmul__, name="ElemMul", wrapper=ElemMul)
register_function_op(torch.div, T.div, T.div_, T.__truediv__, T.__itruediv__, T.__rtruediv__, T.__floordiv__,
                     T.__rfloordiv__, T.__pow__, T.__rpow__, torch.pow, T.pow, T.__neg__, torch.neg, T.neg,
                     T.__mod__, T.sqrt, torch.sqrt, T.rsqrt, torch.rsqrt, T.exp, torch.exp, T.log, torch.log,
                     T.abs, torch.abs, T.clamp, torch.clamp, T.clamp_, T.clamp_min, T.clamp_max, torch.maximum,
                     torch.minimum, torch.where, T.masked_fill, T.masked_fill_, T.__and__, T.__or__, T.__invert__,
                     T.__eq__, T.__ne__, T.__lt__, T.__le__, T.__gt__, T.__ge__, T.eq, T.ne, T.lt, T.le, T.gt,
                     T.ge, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, T.float, T.to, T.type_as,
                     T.detach, T.clone, T.contiguous, T.zero_, T.fill_, T.copy_, T.sign, T.round,
                     T.sigmoid, T.sigmoid_, T.tanh, T.tanh_, T.relu, T.relu_, T.softmax,
                     T.log_softmax, T.mean, torch.mean, T.sum, torch.sum, T.max, T.min, T.amax, T.amin, torch.amax,
                     torch.amin, torch.logsumexp, torch.clone,
                     torch.max, torch.min, T.norm, torch.norm, T.var, T.std, T.argmax, torch.argmax, T.cumsum,
                     torch.cumsum, T.new_zeros, T.new_ones, T.new_full, T.new_empty, T.new_tensor,
                     torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.zeros,
                     torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.tensor,
                     torch.as_tensor, torch.meshgrid, T.roll, torch.roll, T.flip, torch.flip, T.type, T.bool,
                     T.long, T.int, T.half, T.bfloat16, T.double, T.abs_,
                     name="Elementwise")
#: element-wise math a model may call as torch.f or x.f (Falcon's rotary cos/sin, erf-based GELUs, ...)
ELEMENTWISE_MATH = tuple(f for name in (
    "cos", "sin", "tan", "acos", "asin", "atan", "cosh", "sinh", "asinh", "acosh", "atanh", "erf", "erfc",
    "erfinv", "log1p", "expm1", "exp2", "log2", "log10", "reciprocal", "square", "floor", "ceil", "trunc", "frac",
    "sign", "sgn", "round", "nan_to_num", "logit", "isnan", "isinf", "isfinite", "atan2", "hypot", "fmod",
    "remainder", "float_power", "logaddexp", "copysign", "true_divide", "floor_divide")
    for f in dict.fromkeys((getattr(torch, name, None), getattr(T, name, None))) if callable(f))  # ordered
register_function_op(*ELEMENTWISE_MATH, name="Elementwise")
register_function_op(torch.cat, torch.concat, torch.concatenate, name="Concatenate", wrapper=Concatenate)
register_function_op(torch.stack, name="Stack")
register_function_op(T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten,
                     T.view_as, T.reshape_as, name="TensorReshape", wrapper=TensorReshape)
register_function_op(T.permute, torch.permute, T.transpose, torch.transpose, T.transpose_, T.t, torch.t,
                     T.swapaxes, torch.swapaxes, T.swapdims, torch.swapdims, T.movedim, torch.movedim,
                     name="TensorTranspose", wrapper=TensorTranspose)
register_function_op(T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.squeeze_, T.unsqueeze_,
                     name="TensorSqueeze", wrapper=TensorSqueeze)
register_function_op(T.expand, T.expand_as, T.repeat, T.repeat_interleave, torch.repeat_interleave,
                     T.tile, torch.tile, torch.broadcast_to, name="TensorExpand")
register_function_op(T.__getitem__, T.chunk, torch.chunk, T.split, torch.split, T.unbind, torch.unbind,
                     T.narrow, torch.narrow, T.select, torch.select, T.index_select, torch.index_select,
                     T.gather, torch.gather, T.unfold, T.tensor_split, torch.tensor_split, name="TensorSlice",
                     wrapper=TensorSlice)
register_function_op(F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest, name="Interpolate",
                     wrapper=Interpolate, macs=out_numel)
register_function_op(F.grid_sample, name="GridSample")
register_function_op(T.index_add, T.index_add_, torch.index_add, T.scatter_add, T.scatter_add_, torch.scatter_add,
                     T.scatter_reduce, T.scatter_reduce_, torch.scatter_reduce, name="Scatter")
register_function_op(F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle,
                     name="PixelShuffle", wrapper=PixelShuffle)
register_function_op(torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.bmm, T.bmm, torch.mm, T.mm,
                     name="MatMul", wrapper=MatMul, macs=matmul_macs)
register_function_op(torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addmv, T.addmv, name="MatMul",
                     wrapper=MatMul, macs=addmm_macs)
register_function_op(torch.mv, T.mv, torch.dot, T.dot, torch.inner, T.inner, torch.tensordot, name="MatMul",
                     wrapper=MatMul, macs=contraction_macs)
register_function_op(torch.outer, T.outer, torch.ger, T.ger, name="MatMul", wrapper=MatMul, macs=out_numel)
register_function_op(torch.addbmm, T.addbmm, name="MatMul", wrapper=MatMul, macs=addbmm_macs)
register_function_op(torch.linalg.multi_dot, torch.chain_matmul, name="MatMul", wrapper=MatMul, macs=chain_macs)
register_function_op(F.bilinear, name="FunctionalBilinear", macs=bilinear_macs)
register_function_op(*[f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f],
                     name="GroupedMatMul", macs=grouped_mm_macs)  # MoE experts: counted, no channel rule yet
register_function_op(F.multi_head_attention_forward, name="MultiheadAttentionForward", macs=fmha_macs)  # (WavLM)
register_function_op(torch.einsum, name="Einsum", wrapper=MatMul, macs=einsum_macs)
register_function_op(F.scaled_dot_product_attention, name="ScaledDotProductAttention", wrapper=MatMul,
                     macs=sdpa_macs)
register_function_op(F.linear, name="FunctionalLinear", macs=flinear_macs)
register_function_op(F.conv1d, F.conv2d, F.conv3d, name="FunctionalConv", macs=fconv_macs)
register_function_op(F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.normalize, F.rms_norm,
                     name="FunctionalNorm", macs=fnorm_macs)
register_function_op(F.relu, F.relu6, F.relu_, torch.relu, torch.relu_, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
                     torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh, F.glu,
                     name="Activation", macs=out_numel)
register_function_op(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.dropout, F.dropout2d,
                     F.pad, F.embedding, F.one_hot, name="Functional")
register_function_op(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                     F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                     F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.unfold, F.fold,
                     name="Pooling", macs=in_numel)
register_function_op(operator.mul, operator.floordiv, operator.truediv, operator.sub, operator.mod,
                     operator.neg, operator.getitem, name="IntArith")

# amc's own op modules: never in a user's model, so capture traces into them (leaf=False); their entries
# exist so that the passes and the exporters find their facets in the same place as everyone else's.
register_op(TensorSize, GetAttr, SetItem, ParamHolder, Constant, ShapeGuard, TrainingFlag, leaf=False)

# The in-place form of a registered op (`torch.sigmoid_(z)`, `z.exp_()`, `x.cumsum_(1)`) computes the same
# values into its first argument (capture records the mutation): it is the same op to every layer, so its
# entry reads every facet from the out-of-place one (`like`), including those registered later.
for _spec in list(_FUNCTION_OPS.values()):
    _twin = inplace_twin(_spec.key)
    if _twin is not None and function_spec(_twin) is None:
        register_op(_twin, name=_spec.name, wrapper=_spec.wrapper, like=_spec.key)
