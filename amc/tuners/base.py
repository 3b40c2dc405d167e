"""The search loop every tuner shares, and its result.

A tuner implements four methods and inherits `search()`:

    setup(space)          # build the agent / population for this search space
    propose() -> [x, ...] # next candidates (ratio vectors); the loop repairs them to the budget
    observe(xs, records)  # the executed (repaired) vectors and their history records (score, MACs)
    done() -> bool

plus `state_dict()` / `load_state_dict()` for checkpoints. The loop evaluates candidates (cached per
distinct pruned structure, locally or on Ray), records every one in `history`, shows a tqdm bar,
writes tensorboardX scalars and checkpoints atomically every `checkpoint_every` rounds.
"""
from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..compressors.base import check_count, check_names, check_seed, unknown_arguments
from .._modes import outside_inference_mode
from ..errors import LoadError, PruningError, TuningError
from ..export.atomic import atomic_write
from ..trainers.checkpoint import _numpy_state_as_tensors, _numpy_state_from_tensors
from .evaluation import EvalJob, Evaluator, LocalExecutor, RayExecutor, default_evaluator
from .rerank import check_rerank, rerank as rerank_top
from .space import Bound, SearchSpace, build_space

CHECKPOINT_VERSION = 1
EXECUTORS = ("local", "ray")


@dataclass
class SearchResult:
    """The best policy, its compressed network, and everything the search evaluated."""

    policy: Dict[str, float]
    net: nn.Module
    macs_ratio: float  # MACs of `net` / MACs of the original, measured with amc.count
    score: float
    history: List[Dict[str, Any]]
    target_macs: float
    compressor: str
    tuner: str
    base_macs: int
    front: List[Dict[str, Any]] = field(default_factory=list)  # Pareto front (multi-objective GA)
    info: Dict[str, Any] = field(default_factory=dict)

    def to_json(self, path: str) -> str:
        """Write the policy JSON that `amc compress --policy` and `amc.prune(ratio=...)` take."""
        doc = {"tuner": self.tuner, "compressor": self.compressor, "target_macs": self.target_macs,
               "macs_ratio": self.macs_ratio, "score": self.score, "base_macs": self.base_macs,
               "policy": self.policy, **{k: v for k, v in self.info.items() if _jsonable(v)}}
        with atomic_write(path, "w") as f:
            json.dump(doc, f, indent=2)
        return path

    def save_history(self, path: str) -> str:
        with atomic_write(path, "w") as f:
            json.dump({"history": self.history, "front": self.front}, f, indent=1)
        return path

    def plot(self, path: str) -> str:
        """Score per evaluation with the best so far, and the best policy's kept fraction per layer (PNG)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ok = [h for h in self.history if h["status"] == "ok"]
        panels = 3 if self.front else 2
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
        ax = axes[0]
        ax.scatter([h["index"] for h in ok], [h["score"] for h in ok], s=8, alpha=0.5, label="evaluated")
        best, xs, ys = -np.inf, [], []
        for h in ok:
            best = max(best, h["score"])
            xs.append(h["index"])
            ys.append(best)
        ax.plot(xs, ys, color="C3", label="best so far")
        ax.set_xlabel("evaluation")
        ax.set_ylabel("score")
        ax.set_title(f"{self.tuner} / {self.compressor}, MACs <= {self.target_macs:g}x")
        ax.legend(loc="lower right")
        ax = axes[1]
        keys = list(self.policy)
        ax.bar(range(len(keys)), [1.0 - self.policy[k] for k in keys], color="C0")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=70, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"best policy: score {self.score:.4f}, MACs {self.macs_ratio:.3f}x")
        if self.front:
            ax = axes[2]
            ax.scatter([h["macs_ratio"] for h in ok], [h["score"] for h in ok], s=6, alpha=0.3, label="evaluated")
            ax.plot([f["macs_ratio"] for f in self.front], [f["score"] for f in self.front], "o-", color="C3",
                    label="Pareto front")
            ax.set_xlabel("MACs ratio")
            ax.set_ylabel("score")
            ax.legend(loc="lower right")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        return path


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _build_job(space_args: Dict[str, Any], evaluate: Evaluator, threads: Optional[int]) -> EvalJob:
    """What a Ray worker runs once: the same search space, built from the same arguments."""
    return EvalJob(build_space(**space_args), evaluate, threads)


def pareto_front(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Records not dominated in (lower MACs, higher score), sorted by MACs."""
    front: List[Dict[str, Any]] = []
    for r in sorted(records, key=lambda r: (r["macs"], -r["score"])):
        if not front or r["score"] > front[-1]["score"]:
            front.append(r)
    return front


def check_initial(initial: Any, limit: int, where: str) -> Union[str, List[Dict[str, float]]]:
    """`initial=` of a tuner: "uniform", or at most `limit` policies ({layer: ratio} dicts; one dict
    alone is one policy)."""
    if isinstance(initial, str):
        if initial != "uniform":
            raise PruningError(f"initial must be 'uniform' or a list of policies, got {initial!r}")
        return initial
    initial = list(initial) if isinstance(initial, (list, tuple)) else [initial]
    if len(initial) > limit or any(not isinstance(p, Mapping) for p in initial):
        raise PruningError(f"initial must be 'uniform' or at most {where} policies ({{layer: ratio}} dicts), "
                           f"got {len(initial)} item(s)")
    return [dict(p) for p in initial]


def check_initial_count(count: Any, initial: Union[str, List[Dict[str, float]]], limit: int,
                        where: str) -> Optional[int]:
    """`initial_count=`: how many of the first policies start near uniform (None: all of them); only
    with initial="uniform", where a list of policies already says how many there are."""
    if count is None:
        return None
    if initial != "uniform":
        raise PruningError(f"initial_count={count!r} applies to initial='uniform' only, got initial={initial!r}")
    count = check_count(count, "initial_count")
    if count > limit:
        raise PruningError(f"initial_count must be at most {where}, got {count}")
    return count


def start_config(initial: Union[str, List[Dict[str, float]]], sigma: float, keep_empty: bool = False,
                 count: Optional[int] = None) -> Dict[str, Any]:
    """The `initial=` part of a tuner's config(): absent when unused unless `keep_empty` (so checkpoints
    written before the option existed still resume), `initial_sigma` and `initial_count` only where read."""
    if not initial:
        return {"initial": initial} if keep_empty else {}
    if initial != "uniform":
        return {"initial": initial}
    return {"initial": initial, "initial_sigma": sigma, **({"initial_count": count} if count is not None else {})}


def initial_vectors(space: SearchSpace, initial: Union[str, List[Dict[str, float]]], n: int, sigma: float,
                    seed: int, count: Optional[int] = None) -> List[np.ndarray]:
    """The vectors a tuner starts from: the given policies, or for "uniform" the uniform policy at the
    budget and copies moved by N(0, sigma) (space.near_uniform), n in all or the first `count` of the n
    (the tuner draws the rest at random). Unknown layer names raise here."""
    if initial == "uniform":
        n = n if count is None else min(n, count)
        return space.near_uniform(n, sigma, seed) if n > 0 else []
    return [space.clip(space.vector(p)) for p in initial]


class Tuner:
    """Base class of the tuners (see the module docstring)."""

    name = "tuner"
    multi_objective = False

    def __init__(self, seed: int = 0, **unknown: Any):
        if unknown:  # GA(population=8): name the tuner and the argument meant (pop_size), as compressors do
            raise unknown_arguments(type(self), unknown)
        self.seed = check_seed(seed)
        self.space: Optional[SearchSpace] = None

    # -- the four methods a tuner implements --------------------------------------------------------
    def setup(self, space: SearchSpace) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def propose(self) -> List[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, xs: List[np.ndarray], records: List[Dict[str, Any]]) -> None:  # pragma: no cover
        raise NotImplementedError

    def done(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    @property
    def total_evaluations(self) -> Optional[int]:
        return None

    def config(self) -> Dict[str, Any]:
        """Hyper-parameters that must match for a checkpoint to be resumed."""
        return {"seed": self.seed}

    def reward(self, record: Dict[str, Any]) -> Optional[float]:
        return record["score"]

    # -- the loop ---------------------------------------------------------------------------------
    @outside_inference_mode
    def search(self, model: nn.Module, example_inputs: Optional[Sequence[Any]] = None, target_macs: float = 0.5,
               compressor: Union[str, Callable[[Dict[str, float]], nn.Module]] = "prune",
               evaluate: Optional[Evaluator] = None, calibration: Optional[Iterable] = None,
               holdout: Optional[Iterable] = None, ignore: Iterable[str] = (), min_ratio: Bound = 0.0,
               max_ratio: Bound = 0.8, criterion: Any = "l2", compressor_options: Optional[Mapping[str, Any]] = None,
               executor: str = "local", workers: int = 2, checkpoint: Optional[str] = None,
               checkpoint_every: int = 1, resume: Union[bool, str, None] = None, progress: bool = True,
               logdir: Optional[str] = None, bn_batches: int = 4,
               holdout_batches: Optional[int] = None, finetune_steps: int = 0, tighten: Optional[bool] = None,
               target_latency: Optional[float] = None, latency_table: Any = None, rerank: int = 0,
               rerank_steps: int = 100, rerank_batches: int = 32,
               example_kwargs: Optional[Mapping[str, Any]] = None) -> SearchResult:
        """Search per-layer ratios whose compressed network keeps at most `target_macs` of the MACs.

        example_inputs / example_kwargs: what to trace a plain module on, as amc.prune takes them (default:
          the first `calibration` batch, a collator's dict by keyword).

        target_latency: instead of (target_macs=None) or beside target_macs, a budget on the latency that
          per-layer latency tables predict at the example inputs' batch (fraction of the original's;
          `amc.latency_table(..., per_layer=True)`, built and cached here unless `latency_table`). Every
          evaluated policy meets the prediction; the best network is then timed against the original
          (`result.info["latency"]`).

        compressor: "prune" (amc.prune with `criterion`), "channel" (ChannelPruning, LASSO), "lowrank"
          (LowRankDecomposition), or a callable `policy -> network` over amc.prune's groups.
        evaluate: `net -> float`, higher is better; default: accuracy on `holdout` after BN
          re-estimation on `bn_batches` batches of `calibration` (and, with `finetune_steps`, after that
          many SGD steps on a copy: ~5x slower, and on resnet20 at 0.3x not a better ranking; README).
        min_ratio / max_ratio: fraction removed per layer, a float or {layer: float}; max < 1, so no
          layer is ever emptied (and at least one channel always stays).
        tighten: move every candidate to the budget (lower ratios until the MACs just fit), so
          policies compare at equal MACs; default on, off for a multi-objective search.
        executor: "local" or "ray" (`workers` actors). checkpoint / checkpoint_every / resume: an
          atomic checkpoint file every N rounds; `resume=True` (or a path) continues from it.
        rerank: after the search, re-score its `rerank` best distinct policies after `rerank_steps` SGD
          steps on a copy, on `rerank_batches` held-out batches (holdout's, or calibration batches after
          those the search scored on), and return the best by that score (`result.info["rerank"]`).
        """
        if executor not in EXECUTORS:
            raise PruningError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        check_count(checkpoint_every, "checkpoint_every")
        ignore = check_names(ignore, "ignore", model=model)  # modules (ignore=[model.fc]) named before tracing
        if compressor_options is not None and not isinstance(compressor_options, Mapping):
            raise PruningError(f"compressor_options must be a dict of the compressor's keyword arguments, "
                               f"got {compressor_options!r}")
        check_rerank(rerank, rerank_steps, rerank_batches)
        if rerank and self.multi_objective:
            raise PruningError("rerank picks one policy; a multi-objective search returns a Pareto front: drop one")
        rescore = (default_evaluator(calibration, holdout, bn_batches, rerank_batches, rerank_steps,
                                     skip=holdout_batches or 4)  # images the search did not choose on
                   if rerank else None)  # built now: missing data fails before the search, not after it
        space_args = dict(model=model, example_inputs=example_inputs, target_macs=target_macs,
                          compressor=compressor, calibration=calibration, ignore=list(ignore),
                          min_ratio=min_ratio, max_ratio=max_ratio, criterion=criterion,
                          compressor_options=dict(compressor_options or {}), target_latency=target_latency,
                          latency_table=latency_table, example_kwargs=example_kwargs)
        space = build_space(**space_args)
        if space.latency is not None:  # Ray workers rebuild the space: hand them this table, time nothing
            space_args["latency_table"] = space.latency.table
        if evaluate is not None and finetune_steps:
            raise PruningError("finetune_steps configures the default evaluator; with evaluate= it would be "
                               "ignored: drop one of them (or fine-tune inside your evaluator)")
        if evaluate is None:
            evaluate = default_evaluator(calibration, holdout, bn_batches, holdout_batches, finetune_steps)
        elif not callable(evaluate):
            raise PruningError(f"evaluate must be a callable net -> float, got {type(evaluate).__name__}")
        self.space = space
        self._tighten = (not self.multi_objective) if tighten is None else bool(tighten)
        self.setup(space)
        state = {"round": 0, "history": [], "cache": {}}
        resume_path = checkpoint if resume is True else (resume or None)
        if resume_path:
            if os.path.exists(resume_path):
                state = self._load(resume_path, space)
            elif resume is not True:
                raise LoadError(f"resume={resume_path!r}: no such checkpoint file")
        runner = (LocalExecutor(EvalJob(space, evaluate)) if executor == "local" else
                  RayExecutor(functools.partial(_build_job, space_args, evaluate, 1), workers=workers))
        bar = writer = None
        try:
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.total_evaluations, desc=f"amc search ({self.name})",
                           initial=len(state["history"]))
            if logdir:
                from tensorboardX import SummaryWriter

                writer = SummaryWriter(logdir)
            ok = [h for h in state["history"] if h["status"] == "ok"]
            best = max((h["score"] for h in ok), default=-np.inf)
            best_macs = next((h["macs_ratio"] for h in ok if h["score"] == best), float("nan"))
            while not self.done():
                records = self._round(space, runner, state)
                for r in records:
                    if r["status"] == "ok" and r["score"] > best:
                        best, best_macs = r["score"], r["macs_ratio"]
                    if writer is not None:
                        reward = self.reward(r) if r["status"] == "ok" else None
                        if reward is not None:
                            writer.add_scalar("search/reward", reward, r["index"])
                            writer.add_scalar("search/score", r["score"], r["index"])
                        if np.isfinite(best):
                            writer.add_scalar("search/best", best, r["index"])
                        if r["macs_ratio"] is not None:
                            writer.add_scalar("search/macs_ratio", r["macs_ratio"], r["index"])
                if bar is not None:
                    bar.update(len(records))
                    bar.set_postfix_str(f"best {best:.4f} at MACs {best_macs:.3f}x")
                if checkpoint and (state["round"] % checkpoint_every == 0 or self.done()):
                    self._save(checkpoint, space, state)
        finally:
            runner.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return self._result(space, state["history"], criterion, list(ignore), dict(compressor_options or {}),
                            rerank, rescore)

    def _round(self, space: SearchSpace, runner: Any, state: Dict[str, Any]) -> List[Dict[str, Any]]:
        raw = self.propose()
        xs = [space.tighten(x) if self._tighten else space.repair(x) for x in raw]
        sigs = [space.signature(x) for x in xs]
        cache: Dict[Tuple[int, ...], Dict[str, Any]] = state["cache"]
        todo: Dict[Tuple[int, ...], np.ndarray] = {}
        for s, x in zip(sigs, xs):
            if s not in cache and s not in todo:
                todo[s] = x
        for s, out in zip(todo, runner.map(list(todo.values()))):
            cache[s] = out
        records = []
        fresh = set(todo)
        for s, x in zip(sigs, xs):
            out = cache[s]
            rec = {"index": len(state["history"]) + len(records), "round": state["round"],
                   "policy": space.policy(x), "status": out["status"], "error": out["error"],
                   "score": out["score"], "macs": out["macs"],
                   "macs_ratio": None if out["macs"] is None else out["macs"] / space.base_macs,
                   **({"latency_ratio": out.get("latency")} if space.latency is not None else {}),
                   "cached": s not in fresh, "seconds": out["seconds"] if s in fresh else 0.0}
            fresh.discard(s)
            records.append(rec)
        self.observe(xs, records)
        state["history"].extend(records)
        state["round"] += 1
        return records

    # -- checkpoints ------------------------------------------------------------------------------
    def _identity(self, space: SearchSpace) -> Dict[str, Any]:
        return {"tuner": self.name, "config": self.config(), "tighten": self._tighten, "keys": space.keys,
                "lo": space.lo.tolist(),
                "hi": space.hi.tolist(), "target_macs": space.target_macs, "base_macs": space.base_macs,
                "compressor": space.compressor,
                **({"target_latency": space.latency.target} if space.latency is not None else {})}

    def _save(self, path: str, space: SearchSpace, state: Dict[str, Any]) -> None:
        doc = {"version": CHECKPOINT_VERSION, "identity": self._identity(space), "state": state,
               "tuner_state": self.state_dict(),
               "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state_as_tensors(np.random.get_state()),
                       "python": random.getstate()}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path, "wb") as f:
            torch.save(doc, f)

    def _load(self, path: str, space: SearchSpace) -> Dict[str, Any]:
        try:  # weights_only (+ numpy's array rebuild): a checkpoint naming code to run is refused
            with torch.serialization.safe_globals(_numpy_globals()):
                doc = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported as a LoadError with the path
            raise LoadError(f"cannot read the search checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != CHECKPOINT_VERSION:
            raise LoadError(f"{path!r} is not an amc search checkpoint (version {CHECKPOINT_VERSION})")
        mine = self._identity(space)
        theirs = doc["identity"]
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise LoadError(f"the checkpoint {path!r} belongs to another search (differs in {diff}); "
                            "resume with the same tuner, settings, model and target, or start afresh")
        self.load_state_dict(doc["tuner_state"])
        torch.set_rng_state(doc["rng"]["torch"])
        np.random.set_state(_numpy_state_from_tensors(doc["rng"]["numpy"]))
        random.setstate(doc["rng"]["python"])
        return doc["state"]

    # -- the result -------------------------------------------------------------------------------
    def _result(self, space: SearchSpace, history: List[Dict[str, Any]], criterion: Any,
                ignore: List[str], options: Dict[str, Any], top: int = 0,
                rescore: Optional[Evaluator] = None) -> SearchResult:
        ok = [h for h in history if h["status"] == "ok"]
        if not ok:
            errors = list(dict.fromkeys(h["error"] for h in history))[:3]
            raise TuningError(f"all {len(history)} evaluated policies failed; first errors: {errors}. Check the "
                              "evaluate function (it must return a finite float) and the compressor")
        best = max(ok, key=lambda h: h["score"])  # the first of equal scores
        table = None
        if top and rescore is not None:
            best, table = rerank_top(space, history, top, rescore)
        net = space.compress(space.vector(best["policy"]))
        macs = space.measure(net)
        front = [dict(r) for r in pareto_front(ok)] if self.multi_objective else []
        options = dict(getattr(space.backend, "options", options))  # with the defaults the search used
        info = {"criterion": criterion if isinstance(criterion, str) else None, "seed": self.seed,
                "ignore": ignore, "compressor_options": options, "evaluations": len(history)}
        if table is not None:
            info["rerank"] = table
        if space.latency is not None:
            from ..compressors.latency import measure

            base_ms, ms = measure([space.net, net], tuple(space.example_inputs))
            info["latency"] = {"target": space.latency.target, "predicted": space.latency_fraction(
                space.vector(best["policy"])), "measured": ms / base_ms, "ms": ms, "original_ms": base_ms}
        return SearchResult(policy=dict(best["policy"]), net=net, macs_ratio=macs / space.base_macs,
                            score=float(best["score"]), history=history, target_macs=space.target_macs,
                            compressor=space.compressor, tuner=self.name, base_macs=space.base_macs,
                            front=front, info=info)


def _numpy_globals() -> List[Any]:
    """numpy's array and scalar rebuild functions and dtype classes: data constructors, no code paths."""
    core = getattr(np, "_core", None) or np.core
    found: List[Any] = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [v for v in vars(dtypes).values() if isinstance(v, type) and issubclass(v, np.dtype)]
    return found
