"""Export a ReconstructedNetwork to ONNX, with a dynamic batch axis, and check it with onnxruntime.

The network is exported in eval mode with the TorchScript exporter (`torch.onnx.export(dynamo=False)`),
which follows the graph's run loop and records every size read (`TensorSize` nodes), so batch size is
free in the exported model. With `check=True` the file is validated by `onnx.checker` and run by
onnxruntime at a batch size different from the example's; it only replaces `path` when that passes.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportError
from ..graph.capture import given_inputs
from ..graph.network import ReconstructedNetwork
from ..graph.template import Ref
from ..graph.untouched import training_mode
from .atomic import atomic_path

RTOL, ATOL = 1e-3, 1e-4


def flatten_leaves(obj: Any) -> List[Any]:
    """Leaves in the order torch.onnx flattens nested inputs/outputs (lists, tuples, dict values)."""
    if isinstance(obj, (list, tuple)):
        return [leaf for v in obj for leaf in flatten_leaves(v)]
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in flatten_leaves(v)]
    return [obj]


def tensor_leaves(obj: Any) -> List[torch.Tensor]:
    """The tensors among `flatten_leaves(obj)`, in order (a transformers ModelOutput is a dict)."""
    return [t for t in flatten_leaves(obj) if isinstance(t, torch.Tensor)]


def _leaf_names(template: Any, base: str) -> List[str]:
    """Readable names for the leaves of an output/input structure (dict keys, node names)."""
    if isinstance(template, Ref):
        return [template.node + "".join(f"_{p}" for p in template.path)]
    if isinstance(template, dict):  # dict outputs (segmentation heads) are named by their keys
        return [n for k, v in template.items()
                for n in ([str(k)] if isinstance(v, Ref) else _leaf_names(v, f"{base}_{k}"))]
    if isinstance(template, (list, tuple)):
        return [n for i, v in enumerate(template) for n in _leaf_names(v, f"{base}_{i}")]
    return [base]


def _unique(names: Sequence[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for n in names:
        n = n.replace(".", "_") or "value"
        if n.isdigit():  # TorchScript reserves numeric names for unnamed values ("Invalid name: '1'")
            n = f"value_{n}"
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        seen.setdefault(n, 0)
        out.append(n)
    return out


def _rebatch(x: Any, batch: int) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.is_floating_point():
        return torch.randn((batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return x[torch.arange(batch) % x.shape[0]]  # keep valid ids / masks


def _inputs_by_name(net: Any, named: Dict[str, Any]) -> Tuple[Any, ...]:
    """`save_onnx(net, path, input_ids=..., attention_mask=...)`: the inputs in call order, by the names the
    capture gave them."""
    names = net.input_names()
    unknown = sorted(set(named) - set(names))
    missing = [n for n in names if n is not None and n not in named]
    if unknown or missing or None in names:
        raise ExportError(f"save_onnx takes the network's inputs by name, {[n for n in names if n]}"
                          + (f"; got unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else "")
                          + ("; a positional argument was captured as a non-tensor, so give them by position"
                             if None in names else "")
                          + " (its own keywords are opset, check, example_inputs, dynamic_axes)")
    return tuple(named[n] for n in names)


def _input_names(net: Any, inputs: Tuple[Any, ...]) -> List[str]:
    """One name per input leaf, in the order `net.example_inputs()` gives them: positional slots, then the
    inputs captured as keywords (a tokenizer's batch keeps `input_ids`, `attention_mask`)."""
    known = net.input_names()
    names: List[str] = []
    for i, value in enumerate(inputs):
        base = known[i] if i < len(known) and known[i] is not None else f"input_{i}"
        leaves = flatten_leaves(value)
        names += [base] if len(leaves) == 1 else [f"{base}_{j}" for j in range(len(leaves))]
    return names


def _export(net: nn.Module, inputs: Tuple[Any, ...], path: str, opset: int, input_names: List[str],
            output_names: List[str], axes: Dict[str, Dict[int, str]]) -> None:
    dynamic_axes = {n: {0: "batch", **axes.get(n, {})} for n in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        try:
            torch.onnx.export(net, inputs, path, dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        except TypeError as exc:  # a torch without the TorchScript exporter: use torch.export's
            if "dynamo" not in str(exc):
                raise
            dims: Dict[str, Any] = {}
            shapes = tuple({a: dims.setdefault(d, torch.export.Dim(d)) for a, d in dynamic_axes[n].items()}
                           if isinstance(x, torch.Tensor) and x.dim() else None
                           for n, x in zip(input_names, inputs))
            torch.onnx.export(net, inputs, path, dynamo=True, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=shapes)


def _check(path: str, net: nn.Module, inputs: Tuple[Any, ...], input_names: List[str],
           output_names: List[str], axes: Dict[str, Dict[int, str]]) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model is invalid: {exc}") from exc
    first = next((x for x in flatten_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim()), None)
    batch = (int(first.shape[0]) + 1) if first is not None else 2
    new_inputs = tuple(_rebatch_tree(x, batch) for x in inputs)
    sizes = _grown_sizes(inputs, input_names, axes)
    if sizes:
        new_inputs = _resize_inputs(new_inputs, input_names, axes, sizes)
    with torch.no_grad():
        try:
            expected = tensor_leaves(net(*new_inputs))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            if not sizes:  # the batch axis is always dynamic in the file: a model that fixes it cannot export
                raise ExportError(f"the network does not run at batch {batch} ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}); the model fixes its batch size (an int() of a size, a "
                                  "reshape to constants), but ONNX files from save_onnx take any batch: read "
                                  "sizes with x.shape[0] without int() and trace again") from exc
            raise ExportError(f"dynamic_axes: the network does not run at {_said(sizes)} ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); a traced op fixes that size (a position embedding, a reshape "
                              "to constants, a size check), so the axis cannot be dynamic") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    atol, rel = _tolerance(net)
    if rel:  # fake-quantised: check the QDQ graph as written (onnxruntime's fused integer kernels round ties
        # and requantise their own way: about 1-3% of the logits on resnet20, which says nothing about the export)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, flatten_leaves(new_inputs)) if n in wanted}
        got = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are its own classes, per status code
        raise ExportError(f"onnxruntime cannot run the exported file on CPU ({type(exc).__name__}: {str(exc)[:300]}); "
                          "an op in a dtype it has no CPU kernel for (bfloat16 from torch.autocast or .bfloat16() "
                          "has none for Gemm/Conv) is the usual cause: export the float32 network, or pass "
                          "check=False to keep the file unchecked") from exc
    if len(got) != len(expected):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, the network {len(expected)}")
    for name, ref, out in zip(output_names, expected, got):
        ref_np = ref.detach().cpu().numpy()
        if ref_np.shape != out.shape:
            raise ExportError(f"ONNX output {name!r} has shape {list(out.shape)} at batch {batch}{_said(sizes, ', ')}, "
                              f"the network "
                              f"gives {list(ref_np.shape)}: a size was frozen at export")
        if not np.allclose(out, ref_np, rtol=RTOL, atol=atol, equal_nan=True):
            delta = out.astype(np.float64) - ref_np.astype(np.float64)
            rel_l2 = float(np.linalg.norm(delta) / max(np.linalg.norm(ref_np.astype(np.float64)), 1e-30))
            if rel_l2 > rel:
                raise ExportError(f"ONNX output {name!r} differs from the network at batch {batch}{_said(sizes, ', ')} "
                                  f"(max abs diff "
                                  f"{float(np.max(np.abs(delta))):.3g}, relative L2 {rel_l2:.3g}; rtol {RTOL}, atol "
                                  f"{atol:.3g}" + (f", relative L2 allowed {rel:.3g})" if rel else ")"))


def _axes_by_name(dynamic_axes: Any, input_names: List[str], inputs: Tuple[Any, ...]) -> Dict[str, Dict[int, str]]:
    """`dynamic_axes` ({input name or position: {axis: name}}, torch.onnx.export's form; a list of axes is
    named after the input) checked against the inputs: the batch axis is always dynamic already."""
    if dynamic_axes is None:
        return {}
    if not isinstance(dynamic_axes, dict):
        raise ExportError("dynamic_axes must be a dict {input name or position: {axis: name}}, e.g. "
                          "{'x': {2: 'height', 3: 'width'}}; got " + type(dynamic_axes).__name__)
    leaves = flatten_leaves(inputs)
    out: Dict[str, Dict[int, str]] = {}
    for key, axes in dynamic_axes.items():
        name = input_names[key] if isinstance(key, int) and 0 <= key < len(input_names) else key
        if name not in input_names:
            raise ExportError(f"dynamic_axes names {key!r}, not an input of the network; its inputs are "
                              f"{input_names} (or their positions 0..{len(input_names) - 1})")
        x = leaves[input_names.index(name)]
        if isinstance(axes, (list, tuple)):
            axes = {a: f"{name}_{a}" for a in axes}
        if not isinstance(axes, dict) or not all(isinstance(a, int) and isinstance(d, str) for a, d in axes.items()):
            raise ExportError(f"dynamic_axes[{key!r}] must map axis numbers to names, e.g. {{2: 'height'}}; "
                              f"got {axes!r}")
        rank = x.dim() if isinstance(x, torch.Tensor) else 0
        for a in axes:
            if not -rank <= a < rank:
                raise ExportError(f"dynamic_axes[{key!r}]: input {name!r} has no axis {a} (shape "
                                  f"{list(x.shape) if rank else 'scalar'}); give axes 0..{rank - 1}")
        # the batch axis (0) is dynamic anyway, under its own name: naming it too, as torch.onnx's users do, is fine
        out[name] = {a % rank: d for a, d in axes.items() if a % rank}
    return out


def _grown_sizes(inputs: Tuple[Any, ...], input_names: List[str], axes: Dict[str, Dict[int, str]]) -> Dict[str, int]:
    """A new size for every dynamic axis name, checked by onnxruntime: the traced size plus its largest
    power-of-two factor up to 32 (224 -> 256, 28 -> 32, 10 -> 12), so strided nets still divide evenly."""
    leaves = dict(zip(input_names, flatten_leaves(inputs)))
    traced: Dict[str, int] = {}
    for name, named in axes.items():
        for a, dim in named.items():
            if traced.setdefault(dim, int(leaves[name].shape[a])) != leaves[name].shape[a]:
                raise ExportError(f"dynamic_axes: the axes named {dim!r} have different sizes in the example "
                                  "inputs; one name means one size (give them different names)")
    return {dim: n + min(n & -n, 32) if n else 1 for dim, n in traced.items()}


def _resize(x: torch.Tensor, size: Dict[int, int]) -> torch.Tensor:
    for a, n in size.items():
        if x.is_floating_point():
            shape = list(x.shape)
            shape[a] = n
            x = torch.randn(shape, dtype=x.dtype, device=x.device)
        else:  # ids and masks: repeat the example's values, so they stay valid
            x = x.index_select(a, torch.arange(n, device=x.device) % x.shape[a])
    return x


def _resize_inputs(inputs: Tuple[Any, ...], input_names: List[str], axes: Dict[str, Dict[int, str]],
                   sizes: Dict[str, int]) -> Tuple[Any, ...]:
    names = iter(input_names)

    def walk(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return type(v)(walk(u) for u in v)
        if isinstance(v, dict):
            return {k: walk(u) for k, u in v.items()}
        name = next(names)
        if name in axes and isinstance(v, torch.Tensor):
            return _resize(v, {a: sizes[d] for a, d in axes[name].items()})
        return v

    return tuple(walk(v) for v in inputs)


def _said(sizes: Dict[str, int], lead: str = "") -> str:
    return (lead + ", ".join(f"{d}={n}" for d, n in sizes.items())) if sizes else ""


_FOLDABLE = {"Min": np.minimum, "Max": np.maximum}  # element-wise ops of constants that fold_constant_quantize evaluates


def fold_constant_quantize(path: str) -> int:
    """Store the weights of QDQ models as integers: every QuantizeLinear whose inputs are all constants is
    replaced by its integer result (ONNX rounding: half to even), so the file holds int8 codes + scales and
    onnxruntime reads `DequantizeLinear(int8 weight)`. Min/Max of constants (a clipped weight grid) are
    evaluated on the way; a dequantized Gemm gets an int32 bias (`quantize_gemm_bias`). Returns how many
    were folded (the file is untouched when nothing changed)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # Constant nodes and Identity-of-constant (the exporter's dedup) count as constants
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            const[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in const:
            const[node.output[0]] = const[node.input[0]]
        elif node.op_type in _FOLDABLE and node.input and all(i in const for i in node.input):
            const[node.output[0]] = functools.reduce(_FOLDABLE[node.op_type], [const[i] for i in node.input])
    folded, drop = {}, []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not all(i in const for i in node.input):
            continue
        x, scale, zp = (const[i] for i in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and x.ndim > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp_b = scale.reshape(shape), zp.reshape(shape)
        else:
            zp_b = zp
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x.astype(np.float64) / scale) + zp_b, info.min, info.max).astype(zp.dtype)
        name = node.output[0] + "_int"
        graph.initializer.append(numpy_helper.from_array(q, name))
        folded[node.output[0]] = name
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    if not quantize_gemm_bias(graph, const) and not folded:
        return 0
    while True:  # dead constant chains, consumers first (a Min feeding a folded QuantizeLinear, then its inputs)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant", *_FOLDABLE)
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.save(model, path)
    return len(folded)


def quantize_gemm_bias(graph: Any, const: Dict[str, Any]) -> int:
    """Give every Gemm whose input and weight are dequantized an int32 bias (scale = input scale x weight
    scale, zero point 0), as onnxruntime's own quantiser writes it: with a float bias onnxruntime does not
    fuse the Gemm into QGemm and dequantizes the whole int8 weight at every run (MobileNetV2's classifier:
    0.45 ms of 7.4 at batch 1). The bias moves by at most half a step of the product scale. Returns how
    many Gemms changed."""
    from onnx import helper, numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in const:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dq_a, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0 or dq_a is None or dq_w is None \
                or dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear" \
                or dq_a.input[1] not in const or dq_w.input[1] not in const:
            continue
        s_a, s_w = np.asarray(const[dq_a.input[1]]), np.asarray(const[dq_w.input[1]])
        bias = np.asarray(const[node.input[2]], dtype=np.float64)
        if s_a.size != 1 or s_w.size not in (1, bias.size) or bias.ndim != 1:
            continue
        scale = (float(s_a.reshape(())) * s_w.astype(np.float64).reshape(-1)).astype(np.float32)
        scale = scale.reshape(()) if scale.size == 1 else scale
        if not np.all(scale > 0):
            continue
        q = np.rint(bias / scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2 ** 31 - 1:  # would not fit: keep the float bias (exact, just slower)
            continue
        q = q.astype(np.int32)
        stem = node.output[0] + "_bias"
        graph.initializer.extend([numpy_helper.from_array(q, stem + "_int"),
                                  numpy_helper.from_array(scale, stem + "_scale"),
                                  numpy_helper.from_array(np.zeros(scale.shape, np.int32), stem + "_zero")])
        dq = helper.make_node("DequantizeLinear", [stem + "_int", stem + "_scale", stem + "_zero"], [stem],
                              **({"axis": 0} if scale.size > 1 else {}))
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = stem
        changed += 1
    return changed


def _tolerance(net: nn.Module) -> Tuple[float, float]:
    """(absolute, relative L2) tolerance of the onnxruntime check: float rounding, or, for fake-quantised
    networks, what their ops declare (`onnx_atol`, `onnx_rel_l2`): a value on a rounding tie may land on the
    next step, and such flips spread with depth (resnet20 INT8: 0.2% of the logits; MobileNetV2: 17%, the
    QDQ graph run as written). A wrong export is off by far more."""
    atol = max([ATOL] + [float(m.onnx_atol) for m in net.modules() if hasattr(m, "onnx_atol")])
    rel = max([0.0] + [float(m.onnx_rel_l2) for m in net.modules() if hasattr(m, "onnx_rel_l2")])
    return atol, rel


def _rebatch_tree(x: Any, batch: int) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_rebatch_tree(v, batch) for v in x)
    if isinstance(x, dict):
        return {k: _rebatch_tree(v, batch) for k, v in x.items()}
    return _rebatch(x, batch)


def x86_without_vnni() -> bool:
    """True on an x86 CPU with no VNNI / AMX-INT8 instructions (AVX2 only), where onnxruntime's u8 x s8
    integer kernels add products pairwise in int16 and can saturate with 8-bit weights."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False  # not Linux: unknown, so no warning
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _warn_if_int8_saturates(net: ReconstructedNetwork, path: str) -> None:
    if any(getattr(m, "weight_bits", None) == 8 for m in net.modules()) and x86_without_vnni():
        warnings.warn(f"{path}: 8-bit weights on an x86 CPU without VNNI: onnxruntime's integer kernels here add "
                      "u8 x s8 products pairwise in int16 and can saturate (outputs off by many quantisation "
                      "steps). Quantise with weight_bits=7 (onnxruntime's reduce_range remedy) for this CPU; "
                      "CPUs with VNNI run 8-bit weights exactly", stacklevel=3)


def save_onnx(net: ReconstructedNetwork, path: str, *inputs: Any, opset: int = 17,
              check: bool = True, example_inputs: Any = None, dynamic_axes: Any = None, **named_inputs: Any) -> str:
    """Write `net` as ONNX to `path` (atomically) with a dynamic batch axis on every input and output.

    The inputs (`save_onnx(net, path, x)`, `(x,)`, `example_inputs=(x,)`, or by name as traced:
    `save_onnx(net, path, **batch)`) default to `net.example_inputs()`. `dynamic_axes={"x": {2: "height", 3: "width"}}` (torch.onnx.export's form; keys
    are input names or positions) frees more axes, e.g. image size or sequence length. With `check`, the
    model must pass `onnx.checker` and match the network under onnxruntime at another batch size (and
    another size on every dynamic axis), else ExportError.
    """
    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"save_onnx expects a ReconstructedNetwork, got {type(net).__name__}")
    inputs = given_inputs(net, inputs, example_inputs, ExportError)
    if named_inputs:
        if inputs:
            raise ExportError("save_onnx got inputs both by position and by name: give one of them")
        inputs = _inputs_by_name(net, named_inputs)
    inputs = inputs or net.example_inputs()
    if not inputs:
        raise ExportError("save_onnx needs example inputs: the network has no positional tensor inputs recorded")
    input_names = _unique(_input_names(net, inputs))
    axes = _axes_by_name(dynamic_axes, input_names, inputs)
    output_names = _unique(_leaf_names(net.outputs, "output"))
    path = os.fspath(path)
    with training_mode(net, False):
        with torch.no_grad():
            try:
                n_out = len(tensor_leaves(net(*inputs)))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # inputs that do not fit
                raise ExportError(f"save_onnx: the network does not run on the example inputs ({type(exc).__name__}: "
                                  f"{str(exc)[:300]}); pass inputs shaped like the ones it was traced with") from exc
        if n_out != len(output_names):  # outputs holding non-tensors: let the exporter number them
            output_names = [f"output_{i}" for i in range(n_out)]
        with atomic_path(path) as tmp:
            try:
                _export(net, inputs, tmp, opset, input_names, output_names, axes)
            except ExportError:
                raise
            except Exception as exc:  # noqa: BLE001 - the exporter's errors are many and undocumented
                raise ExportError(f"torch.onnx.export failed for {path!r}: {type(exc).__name__}: "
                                  f"{str(exc)[:500]}") from exc
            fold_constant_quantize(tmp)
            _warn_if_int8_saturates(net, path)
            if check:
                _check(tmp, net, inputs, input_names, output_names, axes)
    return path
