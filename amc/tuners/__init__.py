"""amc.tuners: search per-layer compression ratios under a MACs budget (the seed's DDPG and GA agents).

    from amc.tuners import DDPG, GA, RandomSearch
    result = DDPG(episodes=300, warmup=100, seed=0).search(
        model, example_inputs=(x,), target_macs=0.5, compressor="prune",
        calibration=train_loader, holdout=val_loader)
    result.policy, result.net, result.macs_ratio, result.history, result.plot("search.png")

One registry (`register_tuner`): a new tuner is one class with setup/propose/observe/done.
"""
from .base import SearchResult, Tuner, pareto_front
from .ddpg import DDPG, DDPGTuner
from .evaluation import AccuracyEvaluator, default_evaluator
from .ga import GA, GeneticTuner
from .random_search import RandomSearch
from .registry import TUNERS, get_tuner, list_tuners, register_tuner
from .space import SearchSpace, build_space

__all__ = ["AccuracyEvaluator", "DDPG", "DDPGTuner", "GA", "GeneticTuner", "RandomSearch", "SearchResult",
           "SearchSpace", "TUNERS", "Tuner", "build_space", "default_evaluator", "get_tuner", "list_tuners",
           "pareto_front", "register_tuner"]
