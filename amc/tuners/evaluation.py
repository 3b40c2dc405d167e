"""Scoring candidate policies: the default evaluator, one evaluation job, and where jobs run.

The default score is top-1 accuracy on held-out batches after the BatchNorm statistics of the
compressed network are re-estimated on a few calibration batches (adaptive BN, as EagleEye and
MetaPruning do): without it a pruned network's stale statistics rank policies almost at random.

`executor="local"` evaluates in this process; `executor="ray"` hands candidates to Ray actors, each of
which rebuilds the search space once from the same arguments, so results are identical and the same
search runs on a Ray cluster (`ray.init(address=...)` before `search()` is the user's choice).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..compressors.base import check_count, check_number
from .._copying import copy_module
from .._batches import call_with, class_rows, split_batch, to_device
from ..compressors.calibration import check_loader
from ..errors import DataError, PruningError

Evaluator = Callable[[nn.Module], float]


def take_batches(loader: Iterable, n: Optional[int], skip: int = 0) -> List[Any]:
    """The first `n` batches (after `skip`) of one pass over `loader`, as a list (None: all).

    The loader's shuffle generator and the global RNG are restored afterwards, so taking the same
    batches twice (a resumed search, a Ray worker, a second search) gives the same batches."""
    if isinstance(loader, (list, tuple)):
        return list(loader[skip:] if n is None else loader[skip:skip + n])
    gen = getattr(loader, "generator", None)
    saved = gen.get_state() if isinstance(gen, torch.Generator) else None
    out: List[Any] = []
    try:
        with torch.random.fork_rng():
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                if n is not None and len(out) >= n:
                    break
                out.append(batch)
    finally:
        if saved is not None:
            gen.set_state(saved)
    return out


class AccuracyEvaluator:
    """Accuracy on `holdout` batches after BN re-estimation on `bn_batches` (both lists of (x, y)), and,
    with `finetune` batches, after one SGD step on each (a copy is trained: the candidate is left as is).

    Why the steps: at aggressive budgets adaptive BN alone leaves pruned networks near chance, and a few
    steps show how fast a policy recovers. Not the default: measured on the Fashion-MNIST resnet20 at
    0.3x MACs, 30 steps ranked 1-epoch fine-tuned accuracy worse than adaptive BN (README, Tuners)."""

    def __init__(self, bn_batches: Sequence[Any], holdout: Sequence[Any], finetune: Sequence[Any] = (),
                 lr: float = 0.01, seed: int = 0):
        if not holdout:
            raise DataError("the default evaluator needs held-out batches: pass holdout=<a DataLoader> or a "
                            "calibration loader with more batches than bn_batches")
        self.bn_batches, self.holdout, self.finetune = list(bn_batches), list(holdout), list(finetune)
        self.lr, self.seed = float(lr), int(seed)

    def __call__(self, net: nn.Module) -> float:
        from ..models.training import evaluate
        from ..trainers.batchnorm import recalibrate_bn

        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        if has_bn and self.bn_batches:
            net = recalibrate_bn(net, self.bn_batches)
        if self.finetune:
            net = self._steps(net)
        with torch.no_grad():
            return float(evaluate(net, self.holdout)["acc"])

    def _steps(self, net: nn.Module) -> nn.Module:
        """One SGD step (momentum 0.9) per fine-tuning batch on a copy of `net`, seeded: same net, same score."""
        tuned = copy_module(net)
        params = [p for p in tuned.parameters() if p.requires_grad]
        if not params:  # nothing to train: the score is the untrained one
            return tuned.eval()
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        device = params[0].device
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            tuned.train()
            for batch in self.finetune:
                x, y = split_batch(batch)
                loss = nn.functional.cross_entropy(*class_rows(call_with(tuned, to_device(x, device)), y.to(device)))
                if not torch.isfinite(loss):
                    raise ValueError(f"the proxy's fine-tuning loss became {float(loss)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return tuned.eval()


def default_evaluator(calibration: Optional[Iterable], holdout: Optional[Iterable] = None, bn_batches: int = 4,
                      holdout_batches: Optional[int] = None, finetune_steps: int = 0,
                      finetune_lr: float = 0.01, skip: int = 0) -> AccuracyEvaluator:
    """`bn_batches` calibration batches re-estimate BN; the score is accuracy on `holdout` (all of it, or its
    first `holdout_batches`), or, without one, on the next `holdout_batches` (default 4) calibration batches.
    `finetune_steps` > 0: first that many SGD steps (lr `finetune_lr`) on the calibration batches after
    those, a copy of the candidate trained (costlier; ranks policies by how they recover, see
    AccuracyEvaluator). `skip`: without a holdout, leave that many calibration batches after the BN ones
    unused (another evaluator's held-out batches, so the two score on different images)."""
    finetune_steps = check_count(finetune_steps, "finetune_steps", minimum=0)
    check_number(finetune_lr, "finetune_lr", low=0.0, low_open=True)
    bn_batches, skip = check_count(bn_batches, "bn_batches", minimum=0), check_count(skip, "skip", minimum=0)
    if holdout_batches is not None:
        check_count(holdout_batches, "holdout_batches", minimum=0)
    if calibration is None:
        raise DataError("the default evaluator needs calibration=<a train DataLoader> (BN re-estimation) and "
                        "holdout=<a held-out DataLoader>; or pass evaluate=<net -> score>")
    check_loader(calibration, "calibration")
    check_loader(holdout, "holdout")
    bn = take_batches(calibration, bn_batches)
    if holdout is not None:
        held = take_batches(holdout, holdout_batches)
    else:
        held = take_batches(calibration, holdout_batches or 4, skip=bn_batches + int(skip))
    tune: List[Any] = []
    if finetune_steps:
        used = bn_batches + (0 if holdout is not None else int(skip) + len(held))
        tune = take_batches(calibration, int(finetune_steps), skip=used)
        if len(tune) < int(finetune_steps):
            raise DataError(f"finetune_steps={finetune_steps} needs that many calibration batches after the "
                            f"{used} used for BN and held-out scoring; the loader has {used + len(tune)}")
    return AccuracyEvaluator(bn, held, tune, finetune_lr)


class EvalJob:
    """Compress one policy vector, measure its MACs on the network, score it; never raises for a
    failing evaluator (the candidate is returned as failed, with the reason)."""

    def __init__(self, space: Any, evaluate: Evaluator, threads: Optional[int] = None):
        self.space, self.evaluate, self.threads = space, evaluate, threads

    def __call__(self, x: Sequence[float]) -> Dict[str, Any]:
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        out: Dict[str, Any] = {"status": "ok", "error": None, "score": None, "macs": None}
        try:
            net = self.space.compress(x)
            out["macs"] = self.space.measure(net)
        except PruningError as exc:
            out.update(status="failed", error=f"compression failed: {exc}")
            out["seconds"] = time.perf_counter() - t0
            return out
        latency = self.space.latency_fraction(x) if getattr(self.space, "latency", None) is not None else None
        if latency is not None:
            out["latency"] = latency
        if out["macs"] > self.space.budget:
            out.update(status="failed", error=f"over budget: {out['macs']:,} MACs > {self.space.budget:,.0f}")
        elif latency is not None and latency > self.space.latency.target:
            out.update(status="failed", error=f"over budget: predicted latency {latency:.3f}x > "
                                              f"{self.space.latency.target:g}x")
        else:
            try:
                score = self.evaluate(net)
                score = float(score)
                if not math.isfinite(score):
                    raise ValueError(f"the evaluator returned {score}")
                out["score"] = score
            except Exception as exc:  # noqa: BLE001 - recorded as a failed candidate, the search goes on
                out.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        out["seconds"] = time.perf_counter() - t0
        return out


class LocalExecutor:
    name = "local"

    def __init__(self, job: EvalJob):
        self.job = job

    def map(self, xs: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
        return [self.job(x) for x in xs]

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray actors, each holding its own copy of the search space and evaluator (built once)."""

    name = "ray"

    def __init__(self, build: Callable[[], EvalJob], workers: int = 2, threads: int = 1):
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as exc:
            raise PruningError("executor='ray' needs Ray: pip install 'amc[ray]'") from exc
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)

        @ray.remote(num_cpus=1)
        class _Worker:
            def __init__(self, build_blob: Any, n_threads: int):
                torch.set_num_threads(n_threads)
                self.job = build_blob()

            def run(self, x: Any) -> Dict[str, Any]:
                return self.job(x)

        blob = ray.put(build)
        self.actors = [_Worker.remote(blob, threads) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, xs: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
        return list(self.pool.map(lambda actor, x: actor.run.remote(x), list(xs)))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()
