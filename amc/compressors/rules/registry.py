"""Channel rules are a facet of the one op registry (`amc.graph.ops.register_op`).

`@register_rule(key, ...)` sets the `channels` facet of the entry for a module class or callable;
`mark_opaque(...)` declares that channels stop at an op. An op with neither is opaque too, but the
registry-walking test refuses that for registered ops: every entry says what pruning does with it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ...graph.node import Node
from ...graph.ops import AutogradFunctionOp, register_op, spec_of
from ..dependency import Rule, RuleCall

T = torch.Tensor


def register_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Decorator: the channel rule of these module classes / callables (their op entries' `channels`)."""
    def deco(fn: Rule) -> Rule:
        register_op(*keys, channels=fn)
        return fn
    return deco


def mark_opaque(*keys: Any) -> None:
    """Declare that no channel flows through these ops: whatever reaches them is frozen."""
    register_op(*keys, opaque=True)


def opaque(c: RuleCall) -> Any:
    """Unknown op: freeze whatever channels reach it; its outputs carry none."""
    c.a.freeze_all(c.largs)
    c.a.freeze_all(c.lkwargs)
    return None


def rule_for(module: nn.Module, node: Node) -> Rule:
    """The registered channel rule of a graph node's op module; `opaque` for ops declared opaque; for any
    other op without a rule (custom autograd functions included: BLOOM's GeLU), a probe that proves it
    element-wise or freezes."""
    spec = None if isinstance(module, AutogradFunctionOp) else spec_of(module)
    rule = spec.get("channels") if spec is not None else None
    if rule is not None:
        return rule
    if spec is not None and spec.get("opaque"):
        return opaque
    from .probe import probe_or_freeze

    return probe_or_freeze
