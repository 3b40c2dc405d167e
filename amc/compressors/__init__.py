"""amc.compressors: passes that take a ReconstructedNetwork and return a new, cheaper one.

Seed spellings (`ChannelPrunning`, `LowRankDecompostion`) are aliases of the Pythonic names.
"""
from .base import BaseCompressor
from .channel_pruning import ChannelPruning, ChannelPrunning
from .criteria import CRITERIA, Criterion, register_criterion
from .groups import Group
from .lowrank import LowRankDecomposition, LowRankDecompostion
from .masks import channel_masks
from .prune import PruningPlan, plan_pruning, prune, prune_groups
from .quant import ProductQuantization, Quantization, QuantNoise
from .rules import register_rule
from .tokens import TokenPruning
from .vtp import VTP, VisionTransformerPruning

__all__ = ["prune", "prune_groups", "plan_pruning", "PruningPlan", "channel_masks", "Group", "Criterion", "CRITERIA",
           "register_criterion", "register_rule", "BaseCompressor", "ChannelPruning", "ChannelPrunning",
           "LowRankDecomposition", "LowRankDecompostion", "TokenPruning", "VTP",
           "VisionTransformerPruning", "Quantization", "QuantNoise", "ProductQuantization"]
