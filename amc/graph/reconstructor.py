"""The seed's capture-boundary API, as thin wrappers over `amc.graph.capture`.

    reconstructor.insertCaptureBoundaryStart(network)
    out = network(x)
    reconstructor.insertCaptureBoundaryEnd()
    net, graph = reconstructor.getReconstructedNetwork(ifDraw=True, drawPath="out/origin_net")
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn

from ..errors import CaptureError
from .capture import Tracer
from .network import ReconstructedNetwork

_current: Optional[Tracer] = None
_finished: Optional[Tracer] = None


def insertCaptureBoundaryStart(network: nn.Module) -> None:
    """Start recording; the next call of `network` is captured."""
    global _current, _finished
    if not isinstance(network, nn.Module):
        raise CaptureError(f"insertCaptureBoundaryStart expects an nn.Module, got {type(network).__name__}")
    if _current is not None:
        raise CaptureError("insertCaptureBoundaryStart called twice: call insertCaptureBoundaryEnd() first")
    tracer = Tracer(network)
    tracer.start()
    _current, _finished = tracer, None


def insertCaptureBoundaryEnd() -> None:
    """Stop recording."""
    global _current, _finished
    if _current is None:
        raise CaptureError("insertCaptureBoundaryEnd called without insertCaptureBoundaryStart(network)")
    try:
        _current.end()
    finally:
        _finished, _current = _current, None


def getReconstructedNetwork(ifDraw: bool = False, drawPath: str = "origin_net",
                            draw_format: str = "png") -> Tuple[ReconstructedNetwork, "graphviz.Digraph"]:  # noqa: F821
    """The captured network and its graphviz graph (rendered to `drawPath` when `ifDraw`)."""
    if _current is not None:
        raise CaptureError("call insertCaptureBoundaryEnd() before getReconstructedNetwork()")
    if _finished is None:
        raise CaptureError("nothing captured: wrap one forward pass in insertCaptureBoundaryStart/End")
    net = _finished.build()
    from .drawing import draw, to_graphviz

    if ifDraw:
        draw(net, drawPath, format=draw_format)
    return net, to_graphviz(net)


# Pythonic names beside the seed's.
capture_start = insertCaptureBoundaryStart
capture_end = insertCaptureBoundaryEnd
get_reconstructed_network = getReconstructedNetwork
