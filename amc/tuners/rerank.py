"""A second, costlier look at the search's best few policies before one is returned.

Why: the search ranks dozens of candidates with a cheap, noisy proxy (a few hundred held-out images
after BN re-estimation), so its single best is partly luck (the winner's curse), and what users keep is
the network *after* fine-tuning. `rerank=k` re-scores the k best distinct policies after a short
fine-tuning on a copy and on more held-out batches, and returns the best by that score: successive
halving's last rung, paid only k times.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Tuple

from ..errors import PruningError, TuningError
from .evaluation import Evaluator


def check_rerank(rerank: Any, steps: Any, batches: Any) -> None:
    """Fail before the search (or the CLI's training) on settings the re-ranking cannot use."""
    for name, value, low in (("rerank", rerank, 0), ("rerank_steps", steps, 0), ("rerank_batches", batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PruningError(f"{name} must be an int >= {low}, got {value!r}")


def top_distinct(history: List[Dict[str, Any]], k: int) -> List[Dict[str, Any]]:
    """The k best successful records by search score, one per distinct policy (the first of equal scores)."""
    ok = sorted((h for h in history if h["status"] == "ok"), key=lambda h: -h["score"])
    seen, out = set(), []
    for h in ok:
        key = tuple(sorted(h["policy"].items()))
        if key not in seen:
            seen.add(key)
            out.append(h)
        if len(out) == k:
            break
    return out


def rerank(space: Any, history: List[Dict[str, Any]], k: int, evaluate: Evaluator
           ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Re-score the k best policies with `evaluate`; return the winner's record and the table (policy,
    search score, rerank score or the error). Ties go to the better search score. A candidate whose
    re-scoring fails is skipped; all failing is an error."""
    table = []
    for h in top_distinct(history, k):
        row = {"index": h["index"], "policy": dict(h["policy"]), "score": h["score"], "rerank_score": None}
        t0 = time.perf_counter()
        try:
            value = float(evaluate(space.compress(space.vector(h["policy"]))))
            if not math.isfinite(value):
                raise ValueError(f"the rerank evaluator returned {value}")
            row["rerank_score"] = value
        except Exception as exc:  # noqa: BLE001 - recorded; the other candidates still compete
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - t0
        table.append(row)
    scored = [i for i, r in enumerate(table) if r["rerank_score"] is not None]
    if not scored:
        raise TuningError(f"re-ranking failed for all {len(table)} candidates; first error: {table[0].get('error')}")
    best = max(scored, key=lambda i: (table[i]["rerank_score"], -i))
    winner = next(h for h in history if h["index"] == table[best]["index"])
    return winner, table
