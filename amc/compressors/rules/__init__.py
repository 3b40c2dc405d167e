"""Channel rules: how channel labels flow through each op, one facet of its op registry entry.

A rule sees one node's call (`RuleCall`) and returns the labels of its outputs; it may couple, freeze or
create channel spaces, record parameter axes, and ask for an edit hard or soft pruning must make. The
modules group the rules by op family; importing this package registers all of them.
"""
from . import attention, indexing, layout, pointwise, recurrent, reductions, sizes  # noqa: F401 - registration
from .common import elementwise, passthrough
from .layers import conv, linear
from .registry import mark_opaque, opaque, register_rule, rule_for

# The building blocks a new layer's rule usually starts from (see README, "Extending amc").
__all__ = ["register_rule", "mark_opaque", "opaque", "rule_for", "conv", "linear", "passthrough", "elementwise"]
