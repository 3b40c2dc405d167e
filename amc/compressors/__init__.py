"""amc.compressors: passes that take a ReconstructedNetwork and return a new, cheaper one."""
from .criteria import CRITERIA, Criterion, register_criterion
from .groups import Group
from .prune import PruningPlan, plan_pruning, prune, prune_groups
from .rules import register_rule

__all__ = ["prune", "prune_groups", "plan_pruning", "PruningPlan", "Group", "Criterion", "CRITERIA",
           "register_criterion", "register_rule"]
