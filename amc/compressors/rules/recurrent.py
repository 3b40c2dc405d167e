"""Recurrent layers (nn.RNN, nn.GRU, nn.LSTM): the hidden size is one channel space shared by every layer
and direction (the module has one `hidden_size`), read gate by gate in the stacked weights (`[i|f|g|o]` for
an LSTM), by the recurrent weights' columns, by the next layer's input weights and by the outputs.

A removed hidden unit computes exactly zero when its rows are zeroed (soft): its gate pre-activations are
0, so its cell and state stay at their zero start. Hard pruning removes the same rows and columns and sets
`hidden_size`, so soft and hard agree. An initial state given by the caller ties the hidden units to
whatever produced it; projections (`proj_size`) and packed sequences are left unpruned (opaque).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from ...graph.ops import register_op
from ..dependency import TL, RuleCall, unlabeled_like
from .common import _dims_of, _tl
from .registry import opaque, register_rule

GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


def _state_dims(c: RuleCall, value: Any, labels: Any, hid: np.ndarray) -> None:
    """Couple a caller-given initial state's last dim with the hidden units."""
    if isinstance(value, torch.Tensor):
        tl = _tl(labels)
        last = tl.dims[-1] if tl is not None and tl.ndim == value.dim() else None
        if last is None:
            c.a.uf.freeze(hid)
        else:
            c.a.uf.union_vecs(last, hid)
    elif isinstance(value, (tuple, list)):
        for v, lab in zip(value, labels if isinstance(labels, (tuple, list)) else [None] * len(value)):
            _state_dims(c, v, lab, hid)


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent(c: RuleCall) -> Any:
    m, name = c.module, c.node.name
    x = c.args[0] if c.args else c.kwargs.get("input")
    if type(m) not in GATES or getattr(m, "proj_size", 0) or not isinstance(x, torch.Tensor) \
            or isinstance(x, PackedSequence):
        opaque(c)
        return unlabeled_like(c.out)
    dims = _dims_of(c, 0, x)
    hid = c.a.new_space(name, m.hidden_size)
    gates = np.tile(hid, GATES[type(m)])
    directions = 2 if m.bidirectional else 1
    both = np.concatenate([hid] * directions)
    for layer in range(m.num_layers):
        for suffix in ("", "_reverse")[:directions]:
            s = f"_l{layer}{suffix}"
            c.axis(f"weight_ih{s}", 1, dims[-1] if layer == 0 else both)
            for attr in (f"weight_ih{s}", f"weight_hh{s}") + ((f"bias_ih{s}", f"bias_hh{s}") if m.bias else ()):
                c.axis(attr, 0, gates)
            c.axis(f"weight_hh{s}", 1, hid)
    h0 = c.args[1] if len(c.args) > 1 else c.kwargs.get("hx")
    if h0 is not None:
        _state_dims(c, h0, c.largs[1] if len(c.largs) > 1 else c.lkwargs.get("hx"), hid)
    out = TL(dims[:-1] + [both])
    state = TL([None] * (c.out[1].dim() - 1 if isinstance(c.out[1], torch.Tensor) else 2) + [hid]) \
        if isinstance(c.out[1], torch.Tensor) else [TL([None] * (t.dim() - 1) + [hid]) for t in c.out[1]]
    return [out, state]


def _resize_recurrent(m: nn.Module) -> None:
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]


register_op(nn.RNN, nn.GRU, nn.LSTM, resize=_resize_recurrent)
