"""Random search: the honest baseline every learned tuner must beat at the same number of evaluations.

Each candidate draws every layer's ratio uniformly in [min_ratio, max_ratio]; the search loop then
repairs it to the MACs budget, exactly as it does for DDPG's and GA's candidates.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ..compressors.base import check_count
from .base import Tuner
from .registry import register_tuner
from .space import SearchSpace


@register_tuner("random")
class RandomSearch(Tuner):
    """`samples` uniform random policies, `batch` per round (evaluated concurrently by executor="ray")."""

    def __init__(self, samples: int = 100, seed: int = 0, batch: int = 1, **unknown: Any):
        super().__init__(seed, **unknown)
        self.samples, self.batch = check_count(samples, "samples"), check_count(batch, "batch")

    def config(self) -> Dict[str, Any]:
        return {"seed": self.seed, "samples": self.samples, "batch": self.batch}

    @property
    def total_evaluations(self) -> int:
        return self.samples

    def setup(self, space: SearchSpace) -> None:
        self.space = space
        self.rng = np.random.default_rng(self.seed)
        self.drawn = 0

    def propose(self) -> List[np.ndarray]:
        n = min(self.batch, self.samples - self.drawn)
        self.drawn += n
        return [self.rng.uniform(self.space.lo, self.space.hi) for _ in range(n)]

    def observe(self, xs: List[np.ndarray], records: List[Dict[str, Any]]) -> None:
        pass

    def done(self) -> bool:
        return self.drawn >= self.samples

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = state["drawn"]
