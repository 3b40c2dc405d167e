"""Token pruning for Vision Transformers (APT, seed 000): learned agents drop tokens between encoder blocks."""
from .agent import TokenAgent, keep_top
from .compressor import TokenPruning, dynamic_macs
from .merge import TokenMerge
from .placement import agents_of, find_blocks, insert_agents, set_mode
from .trainer import APTTrainer
from .training import APTStep, train_apt

__all__ = ["TokenPruning", "TokenAgent", "TokenMerge", "APTStep", "APTTrainer", "train_apt", "agents_of", "dynamic_macs", "find_blocks", "insert_agents", "keep_top",
           "set_mode"]
