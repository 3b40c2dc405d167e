"""amc.graph: capture any nn.Module into a ReconstructedNetwork; run, count, draw it (amc.export registers
its file formats in `formats`)."""
from .capture import trace
from .counting import count, count_params, node_costs
from .formats import register_format
from .network import ReconstructedNetwork
from .node import InputNode, Node
from .ops import register_function_op, register_module_op
from .template import Ref
from . import reconstructor

__all__ = ["trace", "count", "count_params", "node_costs", "ReconstructedNetwork", "InputNode", "Node",
           "Ref", "register_function_op", "register_module_op", "register_format", "reconstructor"]
