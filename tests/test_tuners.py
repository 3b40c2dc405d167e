"""amc.tuners: short searches on the digits CNN; budget, reproduction, resume, Ray, bad input."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import amc
from amc.errors import LoadError, PruningError, TuningError
from amc.tuners import DDPG, GA, TUNERS, RandomSearch, Tuner, get_tuner, register_tuner


@pytest.fixture(scope="module")
def digits(one_thread):
    from amc.data import digits_loaders
    from amc.models import create, train_classifier

    torch.manual_seed(0)
    train, val = digits_loaders(batch_size=64, seed=0)
    model = create("digits_resnet")
    train_classifier(model, train, val, epochs=3, seed=0)
    model.eval()
    x = next(iter(val))[0][:1]
    return model, x, train, val


def _search(tuner, digits, **kw):
    model, x, train, val = digits
    kw.setdefault("target_macs", 0.5)
    return tuner.search(model, example_inputs=(x,), calibration=train, holdout=val, progress=False, **kw)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _assert_budget(result, model, x, target):
    base = amc.count(model, x)[0]
    for h in result.history:
        if h["status"] == "ok":
            assert h["macs"] <= target * base, h
    # independently: every distinct evaluated policy, pruned by amc.prune, meets the budget
    seen = set()
    for h in result.history:
        key = tuple(sorted(h["policy"].items()))
        if key in seen:
            continue
        seen.add(key)
        macs = amc.count(amc.prune(model, ratio=h["policy"], example_inputs=(x,)), x)[0]
        assert macs <= target * base
        assert macs == h["macs"]


@pytest.mark.parametrize("make", [lambda: DDPG(episodes=10, warmup=4, seed=0),
                                  lambda: GA(generations=2, pop_size=5, seed=0),
                                  lambda: RandomSearch(samples=8, seed=0)], ids=["ddpg", "ga", "random"])
def test_search_meets_budget_and_policy_reproduces_net(digits, make):
    model, x, _, _ = digits
    res = _search(make(), digits)
    assert len(res.history) == make().total_evaluations
    _assert_budget(res, model, x, 0.5)
    assert res.macs_ratio <= 0.5 and res.macs_ratio > 0.45  # the budget is spent, not wasted
    again = amc.prune(model, ratio=res.policy, example_inputs=(x,))
    assert amc.count(again, x) == amc.count(res.net, x)
    torch.testing.assert_close(again(x), res.net(x))
    assert res.score == max(h["score"] for h in res.history if h["status"] == "ok")
    # no layer is emptied and the bounds hold
    assert all(0.0 <= r <= 0.8 for r in res.policy.values())
    for node in res.net.layer_nodes:
        mod = res.net.module_of(node.name)
        if isinstance(mod, torch.nn.Conv2d):
            assert mod.out_channels >= 1 and mod.in_channels >= 1


def test_ddpg_beats_its_warmup_on_a_longer_run(digits):
    """After warm-up the agent's episodes score better on average than the random warm-up ones."""
    res = _search(DDPG(episodes=48, warmup=16, seed=0, parallel_episodes=4), digits)
    warm = [h["score"] for h in res.history[:16] if h["status"] == "ok"]
    late = [h["score"] for h in res.history[-16:] if h["status"] == "ok"]
    assert np.mean(late) > np.mean(warm)


def test_channel_and_lowrank_policies_are_accepted_as_is(digits):
    from amc.compressors.channel_pruning import ChannelPruning
    from amc.compressors.lowrank import LowRankDecomposition

    model, x, train, val = digits
    res = _search(RandomSearch(samples=3, seed=1), digits, compressor="channel")
    assert res.macs_ratio <= 0.5
    cp = ChannelPruning(model, train, compress_ratio=res.policy, example_inputs=(x,), **res.info["compressor_options"])
    torch.testing.assert_close(cp.compress()(x), res.net(x))
    res = _search(RandomSearch(samples=3, seed=1), digits, compressor="lowrank")
    assert res.macs_ratio <= 0.5
    assert all(h["macs"] <= 0.5 * res.base_macs for h in res.history)
    lr = LowRankDecomposition(model, train, compress_ratio=res.policy, example_inputs=(x,),
                              **res.info["compressor_options"])
    torch.testing.assert_close(lr.compress()(x), res.net(x))


def test_ga_starts_from_given_policies(digits):
    """`initial=` puts a known policy in the first generation: it is evaluated (repaired to the budget) and
    the best result is never worse than it."""
    first = _search(RandomSearch(samples=2, seed=1), digits)
    res = _search(GA(generations=2, pop_size=4, seed=0, initial=[first.policy]), digits)
    assert any(h["policy"] == first.policy for h in res.history if h["round"] == 0)
    assert res.score >= first.score
    with pytest.raises(PruningError, match="initial must be"):
        GA(pop_size=2, initial=[first.policy] * 3)
    with pytest.raises(PruningError, match="unknown layers"):
        _search(GA(generations=1, pop_size=2, initial=[{"no_such_layer": 0.5}]), digits)


def test_ddpg_warms_up_on_given_policies(digits):
    """DDPG's `initial=`: the first warm-up episodes execute the given policies (a feasible one unchanged),
    the others stay random; more than `warmup` of them or unknown layer names are refused."""
    first = _search(RandomSearch(samples=2, seed=1), digits)
    res = _search(DDPG(episodes=6, warmup=3, seed=0, initial=[first.policy]), digits)
    assert res.history[0]["policy"] == first.policy
    assert res.history[1]["policy"] != first.policy
    assert res.score >= first.score
    with pytest.raises(PruningError, match="at most warmup=1 policies"):
        DDPG(warmup=1, initial=[first.policy] * 2)
    with pytest.raises(PruningError, match="unknown layers"):
        _search(DDPG(episodes=2, warmup=1, initial={"no_such_layer": 0.5}), digits)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_uniform_policy_spends_the_budget(digits, target):
    """SearchSpace.uniform: one common ratio (up to the rounding slack it spends), within the budget and
    within 2% of it on the digits CNN, where a plain common ratio rounds every layer down at once."""
    model, x, train, _ = digits
    space = amc.tuners.build_space(model, (x,), target, "prune", calibration=train)
    u = space.uniform()
    assert space.feasible(u) and space.macs(u) >= 0.98 * space.budget
    assert u.max() - u.min() < 0.05
    copies = space.near_uniform(5, 0.1, seed=0)
    assert np.array_equal(copies[0], space.clip(space.vector(space.policy(u)))) and len(copies) == 5
    assert all(np.abs(c - u).max() > 0 for c in copies[1:])


@pytest.mark.parametrize("make", [lambda: GA(generations=1, pop_size=4, seed=0, initial="uniform"),
                                  lambda: DDPG(episodes=5, warmup=3, seed=0, initial="uniform")], ids=["ga", "ddpg"])
def test_tuners_start_near_uniform(digits, make):
    """initial="uniform": GA's first generation / DDPG's warm-up is the uniform policy and copies moved by
    N(0, initial_sigma), all within the budget; other strings are refused by name."""
    model, x, train, _ = digits
    u = amc.tuners.build_space(model, (x,), 0.5, "prune", calibration=train).uniform()
    tuner = make()
    res = _search(tuner, digits)
    first = res.history[:tuner.pop_size if isinstance(tuner, GA) else tuner.warmup]
    keys = list(res.history[0]["policy"])
    dist = [np.abs(np.array([h["policy"][k] for k in keys]) - u).max() for h in first]
    assert min(dist) < 1e-5 and max(dist) < 0.5
    _assert_budget(res, model, x, 0.5)
    with pytest.raises(PruningError, match="'uniform' or a list"):
        type(tuner)(initial="uniformly")


@pytest.mark.parametrize("make", [lambda **kw: GA(generations=1, pop_size=5, seed=2, **kw),
                                  lambda **kw: DDPG(episodes=5, warmup=5, seed=2, **kw)], ids=["ga", "ddpg"])
def test_initial_count_starts_only_the_first_policies_near_uniform(digits, make):
    """initial="uniform", initial_count=k evaluates what the k listed near-uniform policies give (the
    half-and-half start the benchmark measured), and the rest is what a random start draws."""
    model, x, train, _ = digits
    space = amc.tuners.build_space(model, (x,), 0.5, "prune", calibration=train)
    listed = [space.policy(v) for v in space.near_uniform(2, 0.1, seed=2)]
    counted = _search(make(initial="uniform", initial_count=2), digits)
    assert _strip(counted.history) == _strip(_search(make(initial=listed), digits).history)
    assert counted.history[0]["policy"] == listed[0]  # the uniform policy meets the budget: not repaired
    everything = _search(make(initial="uniform"), digits).history  # all near uniform: the same first two
    assert _strip(everything[:2]) == _strip(counted.history[:2]) and everything[2]["policy"] != counted.history[2]["policy"]
    with pytest.raises(PruningError, match="initial='uniform' only"):
        make(initial=listed, initial_count=1)
    with pytest.raises(PruningError, match="initial_count must be an int >= 1"):
        make(initial="uniform", initial_count=0)
    with pytest.raises(PruningError, match="initial_count must be at most"):
        make(initial="uniform", initial_count=6)
    with pytest.raises(PruningError, match="sigma must be a finite number >= 0"):
        space.near_uniform(2, -0.1, seed=0)
    with pytest.raises(PruningError, match=r"n \(policies near uniform\) must be an int >= 1"):
        space.near_uniform(0, 0.1, seed=0)


def test_multi_objective_ga_returns_a_pareto_front(digits):
    res = _search(GA(generations=3, pop_size=6, seed=0, objectives=("score", "macs")), digits, target_macs=0.7)
    front = res.front
    assert len(front) >= 2
    ok = [h for h in res.history if h["status"] == "ok"]
    for f in front:  # nothing evaluated dominates a front point
        assert not any(h["macs"] <= f["macs"] and h["score"] > f["score"] for h in ok)
    assert [f["macs"] for f in front] == sorted(f["macs"] for f in front)


def test_resume_after_a_kill_equals_the_uninterrupted_run(digits, tmp_path):
    class Killed(BaseException):
        pass

    model, x, train, val = digits
    from amc.tuners.evaluation import default_evaluator

    score = default_evaluator(train, val)
    for make in (lambda: DDPG(episodes=12, warmup=4, seed=3, parallel_episodes=2, batch_size=8),
                 lambda: GA(generations=3, pop_size=4, seed=3),
                 lambda: DDPG(episodes=10, warmup=8, seed=3, parallel_episodes=2, batch_size=8, initial="uniform")):
        full = _search(make(), digits, evaluate=score)
        calls = {"n": 0}

        def dying(net):
            calls["n"] += 1
            if calls["n"] == 7:
                raise Killed()  # not an Exception: the search does not record it, it dies
            return score(net)

        ckpt = str(tmp_path / f"{make().name}.ckpt")
        with pytest.raises(Killed):
            _search(make(), digits, evaluate=dying, checkpoint=ckpt)
        resumed = _search(make(), digits, evaluate=score, checkpoint=ckpt, resume=True)
        assert _strip(resumed.history) == _strip(full.history)
        assert resumed.policy == full.policy
        assert any(h["cached"] is False for h in resumed.history[-2:])  # it really evaluated after resuming
    with pytest.raises(LoadError, match="another search"):  # the same DDPG, started wider
        _search(DDPG(episodes=10, warmup=8, seed=3, parallel_episodes=2, batch_size=8, initial="uniform",
                     initial_sigma=0.2), digits, checkpoint=ckpt, resume=True)
    with pytest.raises(LoadError, match="another search"):
        _search(GA(generations=4, pop_size=4, seed=3), digits, checkpoint=ckpt, resume=True)


def test_failing_evaluator_is_recorded_and_the_search_goes_on(digits):
    calls = {"n": 0}

    def flaky(net):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("flaky evaluator")
        return float("nan") if calls["n"] % 3 == 1 else 0.5

    res = _search(RandomSearch(samples=6, seed=0), digits, evaluate=flaky)
    failed = [h for h in res.history if h["status"] == "failed"]
    assert {"flaky evaluator" in h["error"] or "nan" in h["error"] for h in failed} == {True}
    assert len(failed) == 4 and res.score == 0.5
    with pytest.raises(TuningError, match="all 3 evaluated policies failed"):
        _search(RandomSearch(samples=3, seed=0), digits, evaluate=lambda net: float("nan"))


def test_bad_input_gets_clear_errors(digits):
    model, x, train, val = digits
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(PruningError, match="target_macs"):
            _search(RandomSearch(samples=1), digits, target_macs=bad)
    with pytest.raises(PruningError, match="unreachable"):
        _search(RandomSearch(samples=1), digits, target_macs=0.05, max_ratio=0.3)
    with pytest.raises(PruningError, match="unknown layers"):
        _search(RandomSearch(samples=1), digits, max_ratio={"no.such.layer": 0.5})
    with pytest.raises(PruningError, match="max_ratio"):
        _search(RandomSearch(samples=1), digits, max_ratio=1.0)
    with pytest.raises(PruningError, match="compressor"):
        _search(RandomSearch(samples=1), digits, compressor="magic")
    with pytest.raises(PruningError, match="unknown tuner"):
        get_tuner("nope")
    with pytest.raises(PruningError, match="example_kwargs must be a dict"):
        RandomSearch(samples=1).search(model, example_kwargs="input_ids", target_macs=0.5, progress=False)
    with pytest.raises(PruningError, match="needs example inputs"):  # nothing to trace on: no inputs, no loader
        RandomSearch(samples=1).search(model, target_macs=0.5, progress=False)
    res = _search(RandomSearch(samples=1), digits)
    from amc.tuners import build_space

    space = build_space(model, (x,), 0.5)
    with pytest.raises(PruningError, match="unknown layers"):
        space.vector({"stem.9": 0.1})
    with pytest.raises(PruningError, match="unknown layers"):
        amc.prune(model, ratio={**res.policy, "stem.9": 0.1}, example_inputs=(x,))


def test_min_ratio_ignore_and_a_callable_compressor(digits):
    model, x, _, _ = digits
    res = _search(RandomSearch(samples=3, seed=0), digits, ignore=["stem.0"], min_ratio={"stages.0.0.conv1": 0.3})
    assert "stem.0" not in res.policy and res.policy["stages.0.0.conv1"] >= 0.3
    assert res.net.module_of("stem.0").out_channels == model.stem[0].out_channels
    seen = []

    def compress(policy):
        seen.append(policy)
        return amc.prune(model, ratio=policy, example_inputs=(x,), criterion="l1")

    res = _search(RandomSearch(samples=2, seed=0), digits, compressor=compress)
    assert len(seen) == 3 and res.macs_ratio <= 0.5  # 2 evaluations + the final network


def test_ddpg_rewards():
    rec = {"status": "ok", "score": 0.9, "macs": 1000}
    assert DDPG(reward="score").reward(rec) == 0.9
    assert math.isclose(DDPG(reward="score_log_macs").reward(rec), -0.1 * math.log(1000))
    assert DDPG().reward({"status": "failed", "score": None, "macs": 10}) is None
    with pytest.raises(PruningError, match="reward"):
        DDPG(reward="speed")


def test_registry_result_files_and_plot(digits, tmp_path):
    assert {"ddpg", "ga", "random"} <= set(TUNERS)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        @register_tuner("random")
        class Other(RandomSearch):
            pass
    assert any("registered twice" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_tuner("random")(RandomSearch)  # put the real one back
    assert get_tuner("random") is RandomSearch and issubclass(get_tuner("ddpg"), Tuner)

    res = _search(RandomSearch(samples=3, seed=0), digits, logdir=str(tmp_path / "tb"))
    doc = json.loads(open(res.to_json(str(tmp_path / "policy.json"))).read())
    assert doc["policy"] == res.policy and math.isclose(doc["macs_ratio"], res.macs_ratio)
    png = res.plot(str(tmp_path / "search.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_cli_search_then_compress_with_the_policy(tmp_path, one_thread):
    from amc.cli import main

    out = tmp_path / "search"
    assert main(["search", "--tuner", "random", "--compressor", "prune", "--target-macs", "0.5", "--evaluations", "3",
                 "--epochs", "2", "--out", str(out), "--no-progress", "--checkpoint"]) == 0
    doc = json.loads((out / "policy.json").read_text())
    assert doc["compressor"] == "prune" and doc["macs_ratio"] <= 0.5 and doc["policy"]
    assert len(json.loads((out / "history.json").read_text())["history"]) == 3
    assert (out / "search.png").exists() and (out / "search.ckpt").exists()
    summary_dir = tmp_path / "compress"
    assert main(["compress", "--policy", str(out / "policy.json"), "--epochs", "2", "--finetune-epochs", "0",
                 "--out", str(summary_dir), "--no-progress"]) == 0
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert summary["method"] == "l2" and abs(summary["macs_fraction"] - doc["macs_ratio"]) < 1e-9
    assert main(["search", "--target-macs", "1.5", "--out", str(out)]) == 1  # a clear error, exit code 1
    assert main(["search", "--tuner", "nope", "--out", str(out)]) == 1
    assert main(["search", "--finetune-steps", "-1", "--out", str(out)]) == 1


def test_cli_search_with_a_finetuning_proxy(tmp_path, one_thread):
    from amc.cli import main

    out = tmp_path / "search"
    assert main(["search", "--tuner", "random", "--target-macs", "0.5", "--evaluations", "2", "--epochs", "1",
                 "--finetune-steps", "3", "--out", str(out), "--no-progress"]) == 0
    hist = json.loads((out / "history.json").read_text())["history"]
    assert len(hist) == 2 and all(h["status"] == "ok" for h in hist)


def test_cli_search_starting_near_uniform(tmp_path, one_thread, capsys):
    from amc.cli import main

    out = tmp_path / "search"
    assert main(["search", "--tuner", "ga", "--start", "uniform", "--start-sigma", "-1", "--out", str(out),
                 "--no-progress"]) == 1
    assert "--start-sigma must be >= 0" in capsys.readouterr().err
    assert main(["search", "--tuner", "ga", "--start-count", "2", "--out", str(out), "--no-progress"]) == 1
    assert "--start-count 2 needs --start uniform" in capsys.readouterr().err
    assert main(["search", "--tuner", "ga", "--start", "uniform", "--start-count", "0", "--out", str(out),
                 "--no-progress"]) == 1
    assert "--start-count must be >= 1" in capsys.readouterr().err
    assert main(["search", "--tuner", "ga", "--pop-size", "3", "--target-macs", "0.5", "--evaluations", "3",
                 "--epochs", "1", "--start", "uniform", "--out", str(out), "--no-progress"]) == 0
    hist = json.loads((out / "history.json").read_text())["history"]
    ratios = [list(h["policy"].values()) for h in hist]
    assert len(hist) == 3 and any(max(r) - min(r) < 0.05 for r in ratios)  # the uniform policy is evaluated


def test_cli_search_with_reranking(tmp_path, one_thread, capsys):
    from amc.cli import main

    out = tmp_path / "search"
    assert main(["search", "--rerank", "2", "--rerank-steps", "-1", "--out", str(out), "--no-progress"]) == 1
    assert "rerank_steps must be an int >= 0" in capsys.readouterr().err
    assert main(["search", "--tuner", "random", "--target-macs", "0.5", "--evaluations", "3", "--epochs", "1",
                 "--rerank", "2", "--rerank-steps", "3", "--rerank-batches", "2", "--out", str(out),
                 "--no-progress"]) == 0
    doc = json.loads((out / "policy.json").read_text())
    assert len(doc["rerank"]) == 2 and doc["policy"] in [r["policy"] for r in doc["rerank"]]


def test_round_to_reaches_the_searched_networks(digits):
    """compressor_options={"round_to": 8}: every evaluated network has kernel-friendly widths, the budget
    holds, and amc.prune(round_to=8) reproduces the result from its policy."""
    model, x, _, _ = digits
    res = _search(RandomSearch(samples=6, seed=0), digits, compressor_options={"round_to": 8})
    base = amc.count(model, x)[0]
    assert all(h["macs"] <= 0.5 * base for h in res.history if h["status"] == "ok")
    widths = [m.out_channels for m in res.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    again = amc.prune(model, ratio=res.policy, example_inputs=(x,), round_to=8)
    assert amc.count(again, x) == amc.count(res.net, x)


def test_finetune_steps_proxy_trains_a_copy_and_is_deterministic(digits):
    """The proxy with SGD steps scores the pruned net after training a copy: the candidate's weights
    are unchanged, the same net scores the same twice, and the steps move the score (they are taken)."""
    from amc.tuners.evaluation import default_evaluator

    model, x, train, val = digits
    net = amc.prune(model, ratio=0.6, example_inputs=(x,))
    before = {k: v.clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    plain = default_evaluator(train, val, finetune_steps=0)(net)
    tuned = default_evaluator(train, val, finetune_steps=6, finetune_lr=0.05)
    a, b = tuned(net), tuned(net)
    assert a == b
    assert a != plain
    for k, v in net.state_dict().items():
        if k in before and not k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, before[k]), k


def test_finetune_steps_bad_input(digits):
    from amc.errors import DataError
    from amc.tuners.evaluation import default_evaluator

    _, _, train, val = digits
    with pytest.raises(PruningError, match="finetune_steps"):
        default_evaluator(train, val, finetune_steps=-1)
    with pytest.raises(DataError, match="finetune_steps=10000"):
        default_evaluator(train, None, finetune_steps=10000)
    with pytest.raises(PruningError, match="finetune_steps configures the default evaluator"):
        _search(RandomSearch(samples=2, seed=0), digits, evaluate=lambda net: 1.0, finetune_steps=3)


def test_rerank_rescores_the_best_policies_after_finetuning(digits):
    """rerank=k re-scores the search's k best distinct policies (fine-tuned copies, other held-out
    batches) and returns the best by that score; each rerank score is the stated evaluator's."""
    from amc.tuners.evaluation import default_evaluator

    model, x, train, val = digits
    plain = _search(RandomSearch(samples=8, seed=0), digits, target_macs=0.4)
    res = _search(RandomSearch(samples=8, seed=0), digits, target_macs=0.4, rerank=3, rerank_steps=4,
                  rerank_batches=2)
    assert _strip(res.history) == _strip(plain.history)   # the search itself is unchanged
    table = res.info["rerank"]
    assert len(table) == 3 and len({tuple(sorted(r["policy"].items())) for r in table}) == 3
    assert [r["score"] for r in table] == sorted((r["score"] for r in table), reverse=True)
    assert all(r["seconds"] > 0 for r in table)                # what the second look cost, per policy
    assert table[0]["policy"] == plain.policy                  # the search's own best leads the table
    again = default_evaluator(train, val, 4, 2, 4, skip=4)
    for r in table:
        assert r["rerank_score"] == again(amc.prune(model, ratio=r["policy"], example_inputs=(x,)))
    best = max(table, key=lambda r: r["rerank_score"])
    assert res.policy == best["policy"]
    assert amc.count(res.net, x) == amc.count(amc.prune(model, ratio=res.policy, example_inputs=(x,)), x)
    assert res.score == best["score"]                          # the search's score of the kept policy


def test_rerank_bad_input_and_failures(digits):
    from amc.errors import DataError
    from amc.tuners.rerank import rerank

    for kw in ({"rerank": -1}, {"rerank": True}, {"rerank": 2, "rerank_steps": -1}, {"rerank": 2, "rerank_batches": 0},
               {"rerank": 1.5}):
        with pytest.raises(PruningError, match="rerank"):
            _search(RandomSearch(samples=2, seed=0), digits, **kw)
    with pytest.raises(PruningError, match="Pareto front"):
        _search(GA(generations=1, pop_size=4, objectives=("score", "macs")), digits, rerank=2)
    model, x, train, _ = digits
    with pytest.raises(DataError, match="finetune_steps=5000"):   # before any candidate is evaluated
        RandomSearch(samples=2, seed=0).search(model, example_inputs=(x,), calibration=train, progress=False,
                                               rerank=2, rerank_steps=5000)
    from amc.tuners import build_space

    res = _search(RandomSearch(samples=4, seed=0), digits)
    space = build_space(model, (x,), 0.5, "prune", calibration=train)
    calls = []

    def half_broken(net):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return float(len(calls))

    winner, table = rerank(space, res.history, 3, half_broken)
    assert "boom" in table[0]["error"] and table[0]["rerank_score"] is None
    assert winner["policy"] == table[-1]["policy"]
    with pytest.raises(TuningError, match="re-ranking failed for all"):
        rerank(space, res.history, 2, lambda net: float("nan"))


@pytest.mark.parametrize("tuner,kwargs,meant", [("GA", {"population": 8}, "pop_size"),
                                                ("RandomSearch", {"evaluations": 8}, "samples"),
                                                ("DDPG", {"warm_up": 3}, "warmup")])
def test_a_tuner_names_the_argument_meant(tuner, kwargs, meant):
    """GA(population=8) got Python's bare TypeError; difflib alone would have offered mutation_eta."""
    import amc.tuners
    from amc.errors import AmcError

    with pytest.raises(TypeError, match=f"{tuner} takes no argument .*did you mean '{meant}'") as e:
        getattr(amc.tuners, tuner)(**kwargs)
    assert isinstance(e.value, AmcError)


def test_ignore_takes_modules_as_amc_prune_does():
    """`ignore=[model.fc]` (Torch-Pruning's habit) was refused as 'must be a list of node names'."""
    from amc.models import create

    model = create("digits_resnet").eval()
    x = torch.randn(1, 1, 8, 8)
    last = [n for n in model.named_modules() if isinstance(n[1], torch.nn.Conv2d)][-1]
    kw = dict(example_inputs=(x,), target_macs=0.7, evaluate=lambda n: 1.0, progress=False)
    by_module = RandomSearch(samples=2, seed=0).search(model, ignore=[last[1]], **kw)
    by_name = RandomSearch(samples=2, seed=0).search(model, ignore=[last[0]], **kw)
    assert by_module.policy == by_name.policy and by_module.info["ignore"] == [last[0]]
    assert amc.count(by_module.net, x) == amc.count(by_name.net, x)
