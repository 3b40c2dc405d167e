"""Long fuzz run of amc's loaders and entry points (the targets of tests/fuzz_targets.py).

Runs every target for `--examples` generated cases (hypothesis, generate phase only, no shrinking: a
failing case is recorded and the run goes on), replays the regression inputs of every bug found so far,
and writes `fuzz.md` + `fuzz.json`: cases tried, accepted and refused per target, and each distinct
failure (exception and the amc line it came from) with its smallest input.

    nice -n 10 python scripts/fuzz.py --examples 2000            # writes scripts/results/fuzz.{md,json}
    python scripts/fuzz.py --examples 50 --targets prune,trace --out-dir /tmp
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _isolate import package_version, write_atomic  # noqa: E402


def _signature(failure: BaseException) -> str:
    """Failures with the same message head and amc source line are one bug."""
    cause = failure.__cause__ or failure
    where = "?"
    for frame in traceback.extract_tb(cause.__traceback__):
        if f"{os.sep}amc{os.sep}" in frame.filename:
            where = f"{os.path.relpath(frame.filename, os.path.dirname(HERE))}:{frame.lineno}"
    head = str(failure).split(":")[0][:80]
    return f"{head} @ {where}"


def run_target(name: str, examples: int, seed: int) -> Dict[str, Any]:
    import fuzz_targets as ft
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    target = ft.TARGETS[name]
    outcomes: collections.Counter = collections.Counter()
    failures: Dict[str, Dict[str, Any]] = {}

    def prop(case: Any) -> None:
        try:
            outcomes[target.check(case)] += 1
        except ft.FuzzFailure as exc:
            outcomes["failed"] += 1
            sig = _signature(exc)
            text = repr(case)
            seen = failures.setdefault(sig, {"count": 0, "message": str(exc)[:300], "example": text[:600]})
            seen["count"] += 1
            if len(text) < len(seen["example"]):
                seen["example"], seen["message"] = text[:600], str(exc)[:300]

    test = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))(given(target.strategy())(prop))
    start = time.time()
    before = ft.TRIED[name]
    hseed(seed)(test)()
    details = {k.split(":", 1)[1]: v for k, v in ft.TRIED.items() if k.startswith(name + ":")}
    return {"target": name, "doc": target.doc, "tried": ft.TRIED[name] - before, "ok": outcomes["ok"],
            "details": details,
            "refused": outcomes["refused"], "failed": outcomes["failed"], "seconds": round(time.time() - start, 1),
            "failures": [{"signature": k, **v} for k, v in failures.items()]}


def replay_regressions() -> List[Dict[str, Any]]:
    import fuzz_targets as ft

    rows = []
    for reg in ft.REGRESSIONS:
        try:
            status = ft.TARGETS[reg.target].check(ft.regression_case(reg))
            result = f"passes ({status})"
        except ft.FuzzFailure as exc:
            result = f"STILL FAILS: {exc}"[:200]
        rows.append({"id": reg.id, "target": reg.target, "bug": reg.bug, "fixed_in": reg.fixed_in, "replay": result})
    return rows


def to_markdown(res: Dict[str, Any]) -> str:
    rows = res["targets"]
    total = sum(r["tried"] for r in rows)
    left = sum(len(r["failures"]) for r in rows)
    lines = ["# Fuzzing amc's loaders and entry points", "",
             f"`{res['command']}` — hypothesis {res['versions']['hypothesis']}, torch {res['versions']['torch']}, "
             f"python {res['versions']['python']}, seed {res['seed']}. Targets and strategies: "
             "`tests/fuzz_targets.py`; the default test suite runs the same targets on a small budget "
             "(`tests/test_fuzz.py`).", "",
             "Property: every refusal is an `amc.errors.AmcError` (the pkl/JSON loaders, `amc.prune`, the "
             "compressors, the tuners and `amc.trace` document no other exception for bad input); no other "
             f"exception, no case over {res['case_seconds']:.0f} s of CPU, and every success lints, runs and has "
             "the right output shape (for `amc.trace`: computes what the model computes; for `amc.prune`, the "
             "compressors and the tuners: the input network is left bit-identical, and a MACs budget is met).", "",
             f"**{total:,} cases tried, {left} distinct failure(s) left.**", "",
             "Seconds are wall time on a shared 2-core machine under `nice -n 10`: a cost indication, not a benchmark.",
             "",
             "| target | what is fuzzed | cases tried | accepted | refused (AmcError) | failures | distinct | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = "".join(f"; {k}: {v:,}" for k, v in r.get("details", {}).items())
        lines.append(f"| `{r['target']}` | {r['doc']}{extra} | {r['tried']:,} | {r['ok']:,} | {r['refused']:,} | "
                     f"{r['failed']} | {len(r['failures'])} | {r['seconds']} |")
    lines += ["", f"| total | | {total:,} | {sum(r['ok'] for r in rows):,} | {sum(r['refused'] for r in rows):,} | "
              f"{sum(r['failed'] for r in rows)} | {left} | {sum(r['seconds'] for r in rows):.0f} |", ""]
    if left:
        lines += ["## Failures left", ""]
        for r in rows:
            for f in r["failures"]:
                lines += [f"- `{r['target']}` ({f['count']}x) **{f['signature']}**: {f['message']}",
                          f"  - smallest input: `{f['example']}`"]
        lines.append("")
    lines += ["## Bugs found by fuzzing, and fixed", "",
              "Each bug's smallest input is kept in `fuzz_targets.REGRESSIONS`; this run replayed it.", "",
              "| # | target | bug | fixed in | replay now |", "|---|---|---|---|---|"]
    for g in res["regressions"]:
        lines.append(f"| {g['id']} | `{g['target']}` | {g['bug']} | {g['fixed_in']} | {g['replay']} |")
    return "\n".join(lines) + "\n"


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="generated cases per target")
    ap.add_argument("--targets", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    import torch

    import fuzz_targets as ft

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    names = [n for n in args.targets.split(",") if n] or list(ft.TARGETS)
    unknown = [n for n in names if n not in ft.TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {list(ft.TARGETS)}")
    rows = []
    for name in names:
        row = run_target(name, args.examples, args.seed)
        print(f"{name}: {row['tried']} tried, {row['ok']} ok, {row['refused']} refused, {row['failed']} failed "
              f"({len(row['failures'])} distinct) in {row['seconds']} s", flush=True)
        for f in row["failures"]:
            print(f"   {f['signature']}: {f['message'][:150]}\n      e.g. {f['example'][:200]}", flush=True)
        rows.append(row)
    res = {"command": "python scripts/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seed": args.seed, "examples_per_target": args.examples, "case_seconds": ft.CASE_SECONDS,
           "versions": {"hypothesis": package_version("hypothesis"), "torch": torch.__version__,
                        "python": platform.python_version()},
           "targets": rows, "regressions": replay_regressions()}
    stem = os.path.join(args.out_dir, "fuzz")
    write_atomic(stem + ".json", json.dumps(res, indent=1) + "\n")
    write_atomic(stem + ".md", to_markdown(res))
    print(f"wrote {stem}.md and {stem}.json")
    return 0 if not any(r["failures"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
