"""Genetic search of per-layer ratios with pymoo (GA, or NSGA-II for score and MACs together).

pymoo's ask/tell interface runs the evolution (selection, SBX crossover, polynomial mutation,
survival); this class only repairs each offspring to the budget before it is scored, so infeasible
candidates are never evaluated, and hands the scores back. The repaired vector replaces the
offspring in the population (Lamarckian repair, as pymoo's `Repair` operators do).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..compressors.base import check_count, check_number
from ..errors import LoadError, PruningError
from .signing import sign, verify
from .base import Tuner, check_initial, check_initial_count, initial_vectors, start_config
from .registry import register_tuner
from .space import SearchSpace

OBJECTIVES = ("score", "macs")
FAILED = 1e6  # objective value of a candidate whose evaluation failed (minimised)


@register_tuner("ga")
class GA(Tuner):
    """Population search. generations x pop_size evaluations (the first generation is the random
    initial population). objectives=("score",) maximises the score; ("score", "macs") runs NSGA-II and
    `result.front` is the Pareto front of (MACs, score) over every evaluated policy. `initial`: policies
    ({layer: ratio}, as `result.policy` gives) placed in the first generation, so a known good allocation
    (a uniform ratio, a hand-made rule, an earlier search) is refined instead of rediscovered;
    initial="uniform": the whole first generation is the uniform policy at the budget and copies with every
    ratio moved by N(0, initial_sigma), where uniformly random policies would start far from it;
    initial_count=k: only the first k policies start near uniform, the rest random (half and half was the
    best start measured on resnet20; README, Tuners)."""

    def __init__(self, generations: int = 20, pop_size: int = 16, seed: int = 0,
                 objectives: Sequence[str] = ("score",), crossover_eta: float = 15.0, mutation_eta: float = 20.0,
                 initial: Union[str, Sequence[Mapping[str, float]]] = (), initial_sigma: float = 0.1,
                 initial_count: Optional[int] = None, **unknown: Any):
        super().__init__(seed, **unknown)
        pop_size, generations = check_count(pop_size, "pop_size", minimum=2), check_count(generations, "generations")
        self.initial = check_initial(initial, pop_size, f"pop_size={pop_size}")
        self.initial_sigma = check_number(initial_sigma, "initial_sigma", low=0.0)
        self.initial_count = check_initial_count(initial_count, self.initial, pop_size, f"pop_size={pop_size}")
        objectives = tuple(objectives) if isinstance(objectives, (list, tuple)) else (objectives,)
        if not objectives or any(o not in OBJECTIVES for o in objectives) or len(set(objectives)) != len(objectives):
            raise PruningError(f"objectives must be ('score',) or ('score', 'macs'), got {objectives!r}")
        if "score" not in objectives:
            raise PruningError("objectives must include 'score'")
        self.generations, self.pop_size, self.objectives = generations, pop_size, objectives
        self.crossover_eta = check_number(crossover_eta, "crossover_eta", low=0.0, low_open=True)
        self.mutation_eta = check_number(mutation_eta, "mutation_eta", low=0.0, low_open=True)
        self.multi_objective = len(objectives) > 1

    def config(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("seed", "generations", "pop_size", "objectives", "crossover_eta",
                                              "mutation_eta")} | start_config(self.initial, self.initial_sigma,
                                                                                 keep_empty=True,
                                                                                 count=self.initial_count)

    @property
    def total_evaluations(self) -> int:
        return self.generations * self.pop_size

    def setup(self, space: SearchSpace) -> None:
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM

        self.space = space
        problem = Problem(n_var=len(space.variables), n_obj=len(self.objectives), xl=space.lo.copy(),
                          xu=np.maximum(space.hi, space.lo + 1e-9))
        common = dict(pop_size=self.pop_size, crossover=SBX(eta=self.crossover_eta, prob=0.9),
                      mutation=PM(eta=self.mutation_eta), eliminate_duplicates=True)
        if self.initial:  # the given policies, then uniform random ones (what pymoo would draw)
            rng = np.random.default_rng(self.seed)
            x0 = rng.uniform(problem.xl, problem.xu, size=(self.pop_size, problem.n_var))
            start = initial_vectors(space, self.initial, self.pop_size, self.initial_sigma, self.seed,
                                    self.initial_count)
            x0[:len(start)] = start
            common["sampling"] = x0
        if self.multi_objective:
            from pymoo.algorithms.moo.nsga2 import NSGA2

            algorithm = NSGA2(**common)
        else:
            from pymoo.algorithms.soo.nonconvex.ga import GA as PymooGA

            algorithm = PymooGA(**common)
        algorithm.setup(problem, termination=("n_gen", self.generations), seed=self.seed, verbose=False)
        self.algorithm, self.problem, self._pending = algorithm, problem, None

    def propose(self) -> List[np.ndarray]:
        self._pending = self.algorithm.ask()
        return [np.asarray(x, dtype=np.float64) for x in self._pending.get("X")]

    def observe(self, xs: List[np.ndarray], records: List[Dict[str, Any]]) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        pop = self._pending
        pop.set("X", np.asarray(xs))
        rows = []
        for rec in records:
            if rec["status"] != "ok":
                rows.append([FAILED] * len(self.objectives))
                continue
            row = [-rec["score"]]
            if "macs" in self.objectives:
                row.append(rec["macs_ratio"])
            rows.append(row)
        Evaluator().eval(StaticProblem(self.problem, F=np.asarray(rows, dtype=np.float64)), pop)
        self.algorithm.tell(infills=pop)
        self._pending = None

    def done(self) -> bool:
        return not self.algorithm.has_next()

    def state_dict(self) -> Dict[str, Any]:
        import cloudpickle  # pymoo's operators hold local closures that plain pickle refuses

        blob = cloudpickle.dumps(self.algorithm)
        return {"algorithm": torch.frombuffer(bytearray(blob), dtype=torch.uint8), "signature": sign(blob)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Unpickling pymoo's algorithm runs code from the file, so only a blob this user signed is read."""
        import cloudpickle

        blob = bytes(state["algorithm"].numpy().tobytes())
        if not verify(blob, state.get("signature")):
            raise LoadError("this GA checkpoint was not written by this user on this machine (its signature does "
                            "not match the key in ~/.cache/amc): resuming it would run code from the file, so "
                            "amc refuses; start the search afresh")
        self.algorithm = cloudpickle.loads(blob)
        self.problem = self.algorithm.problem


GeneticTuner = GA
