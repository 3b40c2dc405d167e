"""Graph passes that turn a float ReconstructedNetwork into a fake-quantised one: fold BatchNorm into the conv
before it, swap weight layers for their quantised twins, and place activation quantisers where onnxruntime's
QDQ fusion needs them (every weight layer's input, and its output after the ReLU that follows it, if any).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...errors import QuantizationError
from ...graph import reparam
from ...graph.edit import insert_after, remove_nodes
from ...graph.network import ReconstructedNetwork
from ...graph.node import Node
from ...graph.ops import FunctionOp, TensorReshape, TensorSqueeze, TensorTranspose
from ...graph.template import Ref, iter_refs
from ..lowrank.eligible import _act_of
from .quantizers import ActQuant, _QuantWeight, quant_class


def _sole_plain_input(node: Node) -> Optional[str]:
    refs = list(iter_refs((node.args, node.kwargs)))
    if len(refs) != 1 or refs[0].path or not node.args or not isinstance(node.args[0], Ref):
        return None
    return refs[0].node


def _module_uses(net: ReconstructedNetwork) -> Dict[str, int]:
    uses: Dict[str, int] = {}
    for n in net.layer_nodes:
        uses[n.module] = uses.get(n.module, 0) + 1
    return uses


@torch.no_grad()
def fold_batchnorm(net: ReconstructedNetwork) -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` with every eval-mode BatchNorm that is the sole reader of a conv folded into that conv
    (exact in eval mode), and the names of the BatchNorm nodes removed."""
    net = net.copy()
    users, uses = net.users(), _module_uses(net)
    folded: List[str] = []
    for node in net.layer_nodes:
        conv = net.network[node.module]
        readers = users.get(node.name, [])
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or quant_class(conv) is None \
                or uses[node.module] != 1 or len(readers) != 1:  # subclasses with the conv's own forward too
            continue
        bn_node = readers[0]
        bn = net.network[bn_node.module]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or uses[bn_node.module] != 1 \
                or _sole_plain_input(bn_node) != node.name or bn.running_mean is None \
                or bn.num_features != conv.out_channels:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        w = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype)
        reparam.assign(conv, "weight", w.detach())  # a weight-normed conv through its g and v
        conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + shift).to(conv.weight.dtype))
        folded.append(bn_node.name)
    return (remove_nodes(net, folded) if folded else net), folded


def swap_layers(net: ReconstructedNetwork, make: Callable[[Node, nn.Module], Optional[nn.Module]],
                layers: Optional[Sequence[str]] = None, ignore: Sequence[str] = ()
                ) -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` where `make(node, module)` replaces the module of every node (all, or those named in
    `layers`, less `ignore`) for which it returns one; returns it and the replaced node names."""
    names = {n.name for n in net.layer_nodes}
    for what, given in (("layers", layers or ()), ("ignore", ignore)):
        unknown = sorted(set(given) - names)
        if unknown:
            raise QuantizationError(f"{what} names unknown nodes {unknown[:5]}; see [n.name for n in net.layer_nodes]")
    net = net.copy()
    done: List[str] = []
    swapped: Dict[str, nn.Module] = {}
    for node in net.layer_nodes:
        if (layers is not None and node.name not in layers) or node.name in ignore:
            continue
        if node.module not in swapped:
            new = make(node, net.network[node.module])
            if new is None:
                continue
            swapped[node.module] = new
        done.append(node.name)
    if layers is not None and not done:
        raise QuantizationError(f"none of layers={list(layers)[:5]} can be quantised (Conv/Linear layers only)")
    for key, mod in swapped.items():
        net.network[key] = mod
    net.recompile()
    return net, done


def quantize_weights(net: ReconstructedNetwork, bits: int, layers: Optional[Sequence[str]] = None,
                     ignore: Sequence[str] = (), observer: str = "minmax") -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` whose Conv1d/2d/3d and Linear layers (all, or the nodes named in `layers`, less
    `ignore`) compute with `bits`-bit weights on a `observer` grid; returns it and the quantised node names."""
    return swap_layers(net, lambda node, mod: quant_class(mod).from_float(mod, bits, observer)
                       if quant_class(mod) is not None else None, layers, ignore)


def activation_points(net: ReconstructedNetwork) -> List[str]:
    """Nodes (or inputs) whose output gets an activation quantiser: the input of every quantised weight layer,
    and its output, taken after a sole following ReLU/ReLU6; never a network output (logits stay float)."""
    users = net.users()
    outputs = {r.node for r in iter_refs(net.outputs)}
    points: Dict[str, None] = {}
    for node in net.layer_nodes:
        if not isinstance(net.network[node.module], _QuantWeight):
            continue
        src = _sole_plain_input(node)
        if src is not None:
            points[src] = None
        out = node.name
        readers = users.get(node.name, [])
        if len(readers) == 1 and _sole_plain_input(readers[0]) == node.name and _act_of(net, readers[0]):
            out = readers[0].name
        if out not in outputs:
            points[out] = None
    return list(points)


def insert_act_quants(net: ReconstructedNetwork, bits: int, observer: str, percentile: float
                      ) -> Tuple[ReconstructedNetwork, List[str]]:
    """A copy of `net` with an ActQuant after every point of `activation_points`; returns it and the new nodes."""
    points = activation_points(net)
    if not points:
        return net, []
    new = insert_after(net, {p: ActQuant(bits, observer, percentile) for p in points}, "aq", "ActQuant")
    return new, [n.name for n in new.layer_nodes if isinstance(new.network[n.module], ActQuant)]


#: modules whose output values are some of their input's values (moved, selected or kept): an activation
#: already on a quantisation grid stays on it
_SAME_GRID = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
              nn.Dropout3d, TensorReshape, TensorTranspose, TensorSqueeze)
_SAME_GRID_FUNCTIONS = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                        "adaptive_max_pool3d", "flatten", "dropout", "contiguous"}


def _keeps_grid(module: nn.Module) -> bool:
    if getattr(module, "return_indices", False):
        return False
    if isinstance(module, _SAME_GRID):
        return True
    return type(module) is FunctionOp and (module.fn_name or "").rsplit(".", 1)[-1] in _SAME_GRID_FUNCTIONS


def _data_input(node: Node) -> Optional[str]:
    """The node whose tensor `node` reads first (shape arguments such as `x.size(0)` aside)."""
    first = node.args[0] if node.args else None
    return first.node if isinstance(first, Ref) and not first.path else None


@torch.no_grad()
def share_grids(net: ReconstructedNetwork) -> List[str]:
    """Give every activation quantiser that reads another one's output through ops that only move or select
    values (max pooling, reshapes, dropout) that quantiser's scale and zero point, and return their names.
    The values are on its grid already: a second grid would only round them again (a coarser one when it
    was calibrated on the pooled maxima), and onnxruntime runs the pooling in int8 only when both are one."""
    nodes = {n.name: n for n in net.layer_nodes}
    shared: List[str] = []
    for node in net.layer_nodes:
        quant = net.network[node.module]
        if not isinstance(quant, ActQuant):
            continue
        src = _data_input(node)
        while src in nodes:
            module = net.network[nodes[src].module]
            if isinstance(module, ActQuant):
                if module.bits == quant.bits:
                    quant.scale.copy_(module.scale)
                    quant.zero_point.copy_(module.zero_point)
                    shared.append(node.name)
                break
            if not _keeps_grid(module):
                break
            src = _data_input(nodes[src])
    return shared


def act_quants(net: nn.Module) -> List[ActQuant]:
    return [m for m in net.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(net: ReconstructedNetwork, batches: Sequence[Tuple], seed: int) -> None:
    """Run `batches` through `net` (eval mode) with every ActQuant recording, then fix their ranges."""
    quants = act_quants(net)
    if not quants:
        return
    if not batches:
        raise QuantizationError("the calibration loader gave no batches: activation ranges cannot be measured "
                                "(pass a non-empty trainloader, or act_bits=None for weight-only quantisation)")
    was = net.training
    net.eval()
    for i, q in enumerate(quants):
        q.calibrating = True
        q.generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
    try:
        for inputs in batches:
            net(*inputs)
    finally:
        for q in quants:
            q.calibrating = False
    for q in quants:
        q.calibrate_done()
        q.generator = None
    share_grids(net)
    net.train(was)
