"""A pruned ReconstructedNetwork written back into a copy of the user's own eager module.

Pruning edits shapes: every Linear, LayerNorm or Embedding of the graph keeps the qualified name it had
in the model, so the pruned layers can replace the model's layers one for one. What the model computes
from *attributes* (a Hugging Face attention's `num_attention_heads`, `attention_head_size`,
`all_head_size`, ViT's `head_dim`) is set by attribute rules (`attribute_rules`: one registry entry per
convention, the conventions in `attention_rules` and `layer_rules`). The result is checked against the
network on example inputs: a module that still computes something else raises instead of coming back.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .._modes import outside_inference_mode
from ..errors import ExportError
from ..graph import reparam
from ..graph.capture import _amc_keywords, given_inputs
from ..graph.clone import clone_module
from ..graph.ops import Constant, ParamHolder, module_spec
from ..graph.untouched import training_mode
from . import attention_rules, layer_rules  # noqa: F401  (their conventions register on import)
from .attribute_rules import apply_rules
from .layer_sizes import follow_tensors
from .onnx_io import tensor_leaves

def _set_path(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(value, nn.Module) or isinstance(getattr(parent, leaf, None), nn.Module):
        setattr(parent, leaf, value)
    elif leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        parent._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)


def _has_tensor(root: nn.Module, path: str) -> bool:
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError:
        return False
    return leaf in parent._parameters or leaf in parent._buffers


def _same_kind(target: nn.Module, op: nn.Module) -> bool:
    """`op` can stand where `target` is: the same class, or an amc layer registered as a drop-in for
    it (`register_op(..., drop_in_for=nn.Conv1d)`: called the same way, it computes the pruned layer);
    the write-back is checked against the network's output either way."""
    if reparam.base_class(target) is reparam.base_class(op):
        return True
    spec = module_spec(op)
    return spec is not None and spec.meta.get("drop_in_for") is reparam.base_class(target)


def _functional_groups(net: Any, path: str) -> Dict[str, list]:
    """The `groups` the pruned network's `F.conv*d` inside layer `path` runs with (timm's ScaledStdConv2d
    calls `F.conv2d(x, w, ..., self.groups)` itself), or {}."""
    inside = path + "."
    for node, op in net.iter_nodes():
        if node.name.startswith(inside) and node.meta.get("op") == "FunctionalConv":
            groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
            return {"groups": [groups]} if isinstance(groups, int) else {}
    return {}


def _tie_again(out: nn.Module, groups: List[List[str]]) -> None:
    """Each layer was written back as its own copy, so a Parameter the model shared between layers became
    two (fine-tuning would train them apart): the pruned copies, equal as the network's one tensor, are one
    Parameter again."""
    params = dict(out.named_parameters(remove_duplicate=False))
    for names in groups:
        first = params.get(names[0])
        for name in names[1:]:
            other = params.get(name)
            if first is not None and other is not None and other is not first and other.shape == first.shape \
                    and torch.equal(other, first):
                _set_path(out, name, first)


def _write_layers(net: Any, out: nn.Module) -> None:
    modules = dict(out.named_modules(remove_duplicate=False))  # a layer the model holds under two names too
    aliases: Dict[int, List[str]] = {}
    for path, module in modules.items():
        aliases.setdefault(id(module), []).append(path)
    tied: Dict[int, List[str]] = {}  # one Parameter in two layers (an output projection reusing the embedding)
    for name, param in out.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    foreign, written, owners = [], set(), set()

    def place(target: nn.Module, op: nn.Module) -> None:
        new = clone_module(op, {})
        for path in aliases[id(target)]:  # `self.shared = self.c2`: every name of the layer gets the one copy
            _set_path(out, path, new)

    for node, op in net.iter_nodes():
        if isinstance(op, Constant) or node.module in written:  # a shared layer (ALBERT) called again
            continue
        written.add(node.module)
        if isinstance(op, ParamHolder):
            if _has_tensor(out, node.name):
                _set_path(out, node.name, copy.deepcopy(op.value))
                owners.add(node.name.rpartition(".")[0])  # a layer whose weight the model reads directly
                continue
            foreign.append(f"{node.name} (a tensor)")
            continue
        own = list(op.parameters(recurse=True)) + list(op.buffers(recurse=True))
        target = modules.get(node.name)
        if not own:  # a parameterless layer that pruning resized (LayerNorm without affine) goes back too
            if target is not None and reparam.base_class(target) is reparam.base_class(op) and repr(target) != repr(op):
                place(target, op)
            continue
        if target is None or not _same_kind(target, op):
            foreign.append(f"{node.name} ({type(op).__name__})")
            continue
        place(target, op)
    _tie_again(out, [names for names in tied.values() if len(names) > 1])
    for path in owners:  # Mamba's `F.conv1d(x, self.conv1d.weight, groups=self.conv1d.groups)`
        if path in modules:
            follow_tensors(modules[path], _functional_groups(net, path))
    if foreign:
        raise ExportError(
            f"to_module writes pruned layers back by name, but {len(foreign)} layer(s) of the network have no "
            f"layer of the same name and class in the model: {foreign[:5]}. They come from a compressor that "
            "adds or replaces layers (low-rank, quantization, VTP's column gather, token pruning), which the "
            "original module has no place for: keep the ReconstructedNetwork, or export it with "
            "save_to_json/save_to_onnx")


def _split_inputs(net: Any, inputs: Tuple[Any, ...]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """`net.example_inputs()` as the eager model takes them: keyword inputs by their names."""
    slots = net._positional_slots()
    keyword = [n.name for n in net.input_nodes if not isinstance(n.index, int)]
    return tuple(inputs[:slots]), dict(zip(keyword, inputs[slots:]))


def _outputs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], problem: str) -> List[torch.Tensor]:
    try:
        return tensor_leaves(module(*args, **kwargs))
    except Exception as e:
        raise ExportError(problem.format(error=f"{type(e).__name__}: {str(e)[:300]}")) from e


def _check_same(net: Any, out: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], rtol: float) -> None:
    with torch.no_grad(), training_mode(net), training_mode(out):  # eval inside; every flag restored after
        want = _outputs(net, args, kwargs, "the pruned network itself does not run on the example inputs "
                        "({error}): pass inputs like the ones it was traced with, "
                        "to_module(net, model, *inputs, **keyword_inputs)")
        got = _outputs(out, args, kwargs, f"the pruned {type(out).__name__} fails to run after its layers were "
                       "written back ({error}): an attribute it computes shapes from has no rule; add one with "
                       "amc.export.register_attribute_rule")
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        raise ExportError(f"the pruned {type(out).__name__} returns tensors of shapes {[tuple(t.shape) for t in got]}, "
                          f"the network {[tuple(t.shape) for t in want]}")
    for i, (a, b) in enumerate(zip(want, got)):
        if a.is_floating_point():
            err = (a - b).abs().max().item() if a.numel() else 0.0
            if err > rtol * max(1.0, a.abs().max().item()):
                raise ExportError(
                    f"the pruned {type(out).__name__} computes something else than the pruned network (output "
                    f"{i}: max difference {err:.3g}): one of its modules derives a size or scale from an attribute "
                    "that no rule updated; add one with amc.export.register_attribute_rule")
        elif not torch.equal(a, b):
            raise ExportError(f"the pruned {type(out).__name__} returns a different output {i} than the network")


@outside_inference_mode
def to_module(net: Any, model: nn.Module, *example_inputs: Any, rtol: float = 1e-4,
              **example_kwargs: Any) -> nn.Module:
    """A copy of `model` (the module `net` was traced from) running the pruned `net`'s layers.

    The pruned weights replace the model's layers of the same name, attention attributes are updated
    (registered rules), and the copy is checked to return what `net` returns on the example inputs (the
    ones given, else `net.example_inputs()`); `model` itself is not changed. Raises ExportError when a
    layer has no counterpart (compressors that add layers) or the outputs differ.
    """
    from ..graph.network import ReconstructedNetwork

    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"to_module takes the pruned ReconstructedNetwork first, got {type(net).__name__}")
    if not isinstance(model, nn.Module) or isinstance(model, ReconstructedNetwork):
        raise ExportError("to_module takes the original eager nn.Module (the one traced) second, got "
                          f"{type(model).__name__}")
    out = clone_module(model, {})
    _write_layers(net, out)
    apply_rules(out, net)
    example_inputs, example_kwargs = _amc_keywords(net, example_inputs, example_kwargs, ExportError)
    example_inputs = given_inputs(net, example_inputs, None, ExportError)  # (x,) given as one argument
    if example_inputs or example_kwargs:
        args, kwargs = example_inputs, example_kwargs
    else:
        args, kwargs = _split_inputs(net, net.example_inputs())
    from .hf import describe_in_config, is_transformers_model

    if is_transformers_model(out):  # before the check: layers that read their sizes from the config (Phi-3)
        describe_in_config(out, model)
    _check_same(net, out, args, kwargs, rtol)
    return out
