"""Property tests: amc's loaders and entry points, fed generated and mutated inputs (hypothesis).

Every failure must be an `amc.errors.AmcError`; no other exception, no hang, and every success must be
a usable network (`tests/fuzz_targets.py` states the property per target). This file runs each target on
a small, derandomized budget; `scripts/fuzz.py` runs the same targets on a long one and writes
`scripts/results/fuzz.md`. The inputs of the bugs fuzzing found are replayed here too.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fuzz_targets as ft
from amc.errors import LoadError

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# Cases per target in the default suite (the whole file stays well under a minute on one core).
BUDGET = {"json_doc": 80, "json_bytes": 40, "json_sidecar": 50, "pkl_bytes": 30, "pkl_objects": 40,
          "prune": 60, "compressor_args": 40, "trace": 60, "vit_compressor_args": 40, "quant_args": 40,
          "tuner_args": 40, "latency_prune": 25}
# Targets whose strategies must reach the success path too, not only refusals.
MUST_ACCEPT = {"json_doc", "json_sidecar", "pkl_bytes", "pkl_objects", "prune", "compressor_args", "trace",
               "vit_compressor_args", "quant_args", "tuner_args", "latency_prune"}


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_fuzz_target(name: str) -> None:
    target = ft.TARGETS[name]
    outcomes = {"ok": 0, "refused": 0}
    before = ft.TRIED[name]

    @settings(max_examples=BUDGET[name], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def run(case):
        outcomes[target.check(case)] += 1

    run()
    tried = ft.TRIED[name] - before
    assert tried >= BUDGET[name], f"{name}: only {tried} cases ran"
    assert outcomes["refused"] > 0, f"{name}: no case was refused; the strategy is too tame"
    if name in MUST_ACCEPT:
        assert outcomes["ok"] > 0, f"{name}: no case was accepted; the success path was never checked"


@pytest.mark.parametrize("reg", ft.REGRESSIONS, ids=lambda r: f"{r.id}-{r.target}")
def test_fuzz_regressions(reg: ft.Regression) -> None:
    """Each bug fuzzing found stays fixed: its smallest input now passes the property."""
    assert ft.TARGETS[reg.target].check(ft.regression_case(reg)) in ("ok", "refused")


def _spin() -> None:
    while True:  # a Python-level loop: the CPU timer's signal is handled between bytecodes
        pass


def test_harness_catches_what_it_must() -> None:
    """The property checker itself: a foreign exception, a hang and an unusable success all fail."""
    assert ft._classify(lambda: (_ for _ in ()).throw(LoadError("bad file")))[0] == "refused"
    with pytest.raises(ft.FuzzFailure, match="KeyError escaped"):
        ft._classify(lambda: {}["missing"])
    ft.CASE_SECONDS, saved = 0.3, ft.CASE_SECONDS
    try:
        with pytest.raises(ft.FuzzFailure, match="hang"):
            ft._classify(_spin)
    finally:
        ft.CASE_SECONDS = saved
    with pytest.raises(ft.FuzzFailure, match="not a ReconstructedNetwork"):
        ft._usable(torch.nn.Linear(2, 2), "a loader", (torch.zeros(1, 2),))
    broken = ft.tiny()[2].copy()
    broken.layer_nodes[0].args = ()
    broken.recompile()
    with pytest.raises(ft.FuzzFailure, match="does not run"):
        ft._usable(broken, "a loader", (ft.tiny()[1],))
