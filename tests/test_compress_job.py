"""The main job end to end on the digits: files written, before/after table printed, MACs halved,
the budget vocabulary (`--target-macs` kept, deprecated `--ratio` removed), progress, `--original`."""
from __future__ import annotations

import argparse
import json
import re
import warnings

import pytest
import torch

import amc
from amc.errors import DataError, LoadError, PruningError
from amc.jobs import compress as job


def test_job_writes_files_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    summary = job.run(["--epochs", "2", "--finetune-epochs", "1", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "before (digits_resnet)" in text and "after channel_pruning + FT" in text
    assert "params" in text and "MACs" in text and "latency" in text
    wrote = re.search(r"wrote (.*)$", text, re.M).group(1).split(", ")
    for name in ("compressed.json", "compressed.safetensors", "compressed.pkl", "compressed.onnx", "summary.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in wrote, name  # every file written is named, the weights sidecar too
    saved = json.loads((out / "summary.json").read_text())
    assert saved["macs_fraction"] <= 0.5
    before, after = saved["rows"][0], saved["rows"][-1]
    assert after["macs"] <= 0.5 * before["macs"] and after["params"] < before["params"]
    assert summary["rows"][1]["acc"] > 0.5  # channel pruning + least squares before fine-tuning


def test_job_l1_method_and_bad_budget(tmp_path, capsys):
    summary = job.run(["--method", "l1", "--epochs", "1", "--finetune-epochs", "0", "--out", str(tmp_path),
                       "--no-progress"])
    assert summary["macs_fraction"] <= 0.5 and summary["target_macs"] == 0.5
    with pytest.raises(PruningError, match="--target-macs is the fraction of MACs kept"):
        job.run(["--target-macs", "1.5", "--out", str(tmp_path), "--no-progress"])


@pytest.mark.parametrize("argv,error,match", [
    (["--seed", "-1"], PruningError, "--seed must be an int in"),                    # was scikit-learn's error
    (["--seed", str(10 ** 20)], PruningError, "--seed must be an int in"),          # was an overflow ValueError
    (["--threads", "-1"], PruningError, "--threads must be >= 1"),                  # was torch's RuntimeError
    (["--data", "fashion_mnist", "--train-limit", "0"], DataError, "--train-limit must be >= 1"),
])
def test_run_options_are_refused_before_training(tmp_path, argv, error, match):
    """Found by trying odd values on the command line: each failed mid-job with a foreign exception."""
    with pytest.raises(error, match=match):
        job.run([*argv, "--out", str(tmp_path), "--no-progress"])
    from amc import cli
    assert cli.main(["compress", *argv, "--out", str(tmp_path), "--no-progress"]) == 1  # a message, no traceback
    if "--threads" not in argv:  # amc search shares the others
        assert cli.main(["search", *argv, "--out", str(tmp_path), "--no-progress"]) == 1


def test_search_names_its_own_flag(tmp_path, capsys):
    from amc import cli
    assert cli.main(["search", "--workers", "0", "--executor", "ray", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "--workers must be >= 1" in capsys.readouterr().err  # not the tuner's internal parallel_episodes


def test_target_macs_is_the_fraction_kept(tmp_path, capsys):
    """--target-macs 0.7 keeps 70% of the MACs (as the API's target_macs); read as 'removed' it would keep 30%."""
    fast = ["--method", "l1", "--epochs", "1", "--finetune-epochs", "0", "--out", str(tmp_path), "--no-progress"]
    summary = job.run(["--target-macs", "0.7", *fast])
    assert 0.6 < summary["macs_fraction"] <= 0.7 and summary["target_macs"] == 0.7
    with pytest.warns(FutureWarning, match=r"--ratio .* is deprecated.*--ratio 0.3 is --target-macs 0.7"):
        old = job.run(["--ratio", "0.3", *fast])  # the deprecated alias: the fraction removed
    assert old["target_macs"] == pytest.approx(0.7) and old["macs_fraction"] == summary["macs_fraction"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job.resolve_options(job.build_parser().parse_args(["--target-macs", "0.7"]))  # no warning without --ratio
    with pytest.warns(FutureWarning), pytest.raises(PruningError, match="disagree"):
        job.resolve_options(job.build_parser().parse_args(["--ratio", "0.3", "--target-macs", "0.5"]))
    with pytest.raises(PruningError, match="--ratio is the fraction of MACs removed"):
        job.resolve_options(job.build_parser().parse_args(["--ratio", "1.5"]))


def test_per_data_defaults():
    digits = job.resolve_options(job.build_parser().parse_args([]))
    fashion = job.resolve_options(job.build_parser().parse_args(["--data", "fashion_mnist"]))
    assert (digits.epochs, digits.finetune_epochs, digits.trainset_ratio) == (10, 3, 0.5)
    assert fashion.epochs == job.DATA_DEFAULTS["fashion_mnist"]["epochs"] and fashion.trainset_ratio < 0.5
    given = job.resolve_options(job.build_parser().parse_args(["--data", "fashion_mnist", "--epochs", "1"]))
    assert given.epochs == 1  # an explicit value wins


def test_job_shows_progress_per_batch(tmp_path, capsys):
    """Stage lines and a per-batch bar with loss, accuracy and ETA, not one bar that sits at 0/5."""
    job.run(["--method", "l1", "--epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    for stage in ("[1/5] train digits_resnet on digits: 1 epochs x 23 batches", "[2/5] compress with l1",
                  "[3/5] fine-tune: 1 epochs", "[4/5] export", "[5/5] measure"):
        assert stage in err, stage
    assert re.search(r"train: +\d+%.*\| *\d+/23 \[.*<.*loss=\d\.\d+, acc=\d+\.\d%", err), err[-500:]
    assert "23/23" in err and "val_acc=" in err and "fine-tune:" in err


def test_original_weights_are_used_instead_of_training(tmp_path, capsys, one_thread):
    from amc.data import digits_loaders
    from amc.models import create, evaluate, train_classifier

    torch.manual_seed(0)
    model = create("digits_resnet")
    train, val = digits_loaders(batch_size=64, seed=0)
    train_classifier(model, train, val, epochs=1, seed=0)
    acc = evaluate(model, val)["acc"]
    torch.save(model.state_dict(), tmp_path / "original.pt")
    summary = job.run(["--original", str(tmp_path / "original.pt"), "--method", "l1", "--finetune-epochs", "0",
                       "--out", str(tmp_path / "out"), "--no-progress"])
    assert "[1/5] original: loaded digits_resnet weights" in capsys.readouterr().err
    assert summary["rows"][0]["acc"] == acc and summary["original"] == str(tmp_path / "original.pt")
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "original.safetensors"))  # as scripts/originals/ ships them
    summary = job.run(["--original", str(tmp_path / "original.safetensors"), "--method", "l1", "--finetune-epochs",
                       "0", "--out", str(tmp_path / "out2"), "--no-progress"])
    assert summary["rows"][0]["acc"] == acc
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoadError, match="not a state_dict saved by torch.save or safetensors"):
        job.run(["--original", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(LoadError, match="no such file"):
        job.run(["--original", str(tmp_path / "missing.pt"), "--out", str(tmp_path), "--no-progress"])
    torch.save(create("vgg_small").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(LoadError, match="does not fit --model digits_resnet"):
        job.run(["--original", str(tmp_path / "vgg.pt"), "--out", str(tmp_path), "--no-progress"])


def test_channels_last_training_returns_the_default_format(one_thread):
    from amc.data import digits_loaders
    from amc.models import create, train_classifier

    torch.manual_seed(0)
    model = create("digits_resnet")
    train, val = digits_loaders(batch_size=64, seed=0)
    res = train_classifier(model, train, val, epochs=2, seed=0, channels_last=True)
    assert res["acc"] > 0.85
    assert all(p.is_contiguous() for p in model.parameters())  # NCHW again for capture and export


def test_job_lowrank_meets_the_budget_and_fine_tunes(tmp_path, capsys):
    """Low-rank through the job: whole-net MACs within the budget, and fine-tuning improves it (it
    diverged to NaN when the BN was folded away before fine-tuning)."""
    summary = job.run(["--method", "lowrank", "--epochs", "4", "--finetune-epochs", "2", "--out", str(tmp_path),
                       "--no-progress"])
    rows = summary["rows"]
    assert summary["macs_fraction"] <= 0.5
    assert rows[2]["acc"] >= rows[1]["acc"] - 0.01 and rows[2]["acc"] > 0.8, rows


def test_add_parser_registers_subcommand():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    job.add_parser(sub)
    ns = parser.parse_args(["compress", "--model", "vgg_small", "--method", "fpgm", "--target-macs", "0.7"])
    assert ns.model == "vgg_small" and ns.method == "fpgm" and ns.target_macs == 0.7 and ns._run is job.run_from_args


def test_job_token_pruning_of_a_vit(tmp_path, capsys, one_thread):
    """`amc compress --model vit_digits --method tokens`: APT on the embedded digits, budget met, exported."""
    summary = job.run(["--model", "vit_digits", "--method", "tokens", "--target-macs", "0.7", "--epochs", "2",
                       "--apt-epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path), "--no-progress"])
    assert summary["macs_fraction"] <= 0.7
    assert any(f.endswith("compressed.json") for f in summary["files"])
    assert "after tokens" in capsys.readouterr().out
    with pytest.raises(PruningError, match="no transformer encoder"):
        job.run(["--model", "digits_resnet", "--method", "tokens", "--epochs", "1", "--out", str(tmp_path),
                 "--no-progress"])


def test_job_quantises_and_chains_after_pruning(tmp_path, capsys):
    """`--method quant` keeps the MACs and writes an INT8 ONNX timed in onnxruntime; `channel,quant` prunes
    first; a chain that quantises before pruning is refused by the parser."""
    onnx = pytest.importorskip("onnx")
    fast = ["--epochs", "2", "--finetune-epochs", "0", "--no-progress"]
    summary = job.run(["--method", "quant", "--out", str(tmp_path / "q"), *fast])
    assert summary["latency_by"] == "onnxruntime" and 0.99 < summary["macs_fraction"] <= 1.0
    assert summary["rows"][1]["acc"] > summary["rows"][0]["acc"] - 0.02
    model = onnx.load(str(tmp_path / "q" / "compressed.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)
    chained = job.run(["--method", "channel,quant", "--weight-observer", "mse", "--out", str(tmp_path / "cq"),
                       *fast])
    assert chained["macs_fraction"] <= 0.5 and chained["rows"][1]["acc"] > 0.8
    model = onnx.load(str(tmp_path / "cq" / "compressed.onnx"))  # the clipped grid is stored as int8 too
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)
    with pytest.raises(PruningError, match="last step of a chain"):  # argparse's bare "invalid choice" before
        job.run(["--method", "quant,channel", "--out", str(tmp_path / "bad"), *fast])


def test_job_prunes_to_a_latency_budget(tmp_path, monkeypatch):
    from amc.compressors import latency

    monkeypatch.setattr(latency, "CACHE", tmp_path / "cache")
    # the job's plumbing is tested, not the clock (test_latency_budget times for real): networks are "timed"
    # by their MACs, so a loaded CI machine cannot make an allocation miss the budget
    monkeypatch.setattr(latency, "measure", lambda nets, inputs, *a, **k: [amc.count(n, *inputs)[0] / 1e6
                                                                           for n in nets])
    summary = job.run(["--method", "l2", "--target-latency", "0.9", "--epochs", "1", "--finetune-epochs", "0",
                       "--out", str(tmp_path / "out"), "--no-progress"])
    check = summary["latency_check"]
    assert check["measured"] <= 0.9 * 1.03 and (tmp_path / "cache").is_dir() and check["allocation"] == "uniform"
    summary = job.run(["--method", "l2", "--target-latency", "0.9", "--latency-allocation", "layers", "--epochs",
                       "1", "--finetune-epochs", "0", "--out", str(tmp_path / "out2"), "--no-progress"])
    check = summary["latency_check"]
    assert check["measured"] <= 0.9 * 1.03 and check["allocation"] == "layers" and check["ratios"]
    summary = job.run(["--method", "l2", "--target-latency", "0.9", "--latency-allocation", "auto", "--epochs",
                       "1", "--finetune-epochs", "0", "--out", str(tmp_path / "out3"), "--no-progress"])
    check = summary["latency_check"]
    assert check["measured"] <= 0.9 * 1.03 and set(check["distortion"]) == {"uniform", "layers"}
    assert check["distortion"][check["allocation"]] == min(check["distortion"].values())
    for bad, match in ((["--target-latency", "0.5", "--method", "lowrank"], "criterion methods"),
                       (["--target-latency", "0.5", "--target-macs", "0.5"], "not both"),
                       (["--target-latency", "1.5", "--method", "l1"], "in \\(0, 1\\)")):
        with pytest.raises(PruningError, match=match):
            job.run([*bad, "--out", str(tmp_path / "bad"), "--no-progress"])


@pytest.mark.parametrize("argv,match", [
    (["--method", "tokens"], "--method tokens prunes the tokens of a ViT, and --model digits_resnet is not one"),
    (["--method", "quant,channel"], "must be the last step of a chain, e.g. --method channel,quant"),
])
def test_method_and_model_that_cannot_go_together_fail_before_training(tmp_path, capsys, argv, match):
    """Both trained the original for minutes first: tokens then found no encoder, and the misordered chain got
    argparse's bare 'invalid choice'."""
    with pytest.raises(PruningError, match=match):
        job.run([*argv, "--out", str(tmp_path), "--no-progress"])
    assert "train digits_resnet" not in capsys.readouterr().err


def test_an_unreadable_policy_fails_before_training(tmp_path, capsys):
    """`--policy missing.json` trained the original for minutes, then could not read the file."""
    from amc.errors import LoadError

    bad = tmp_path / "policy.json"
    bad.write_text("{not json")
    for path in (tmp_path / "missing.json", bad):
        with pytest.raises(LoadError, match="cannot read the policy file"):
            job.run(["--policy", str(path), "--out", str(tmp_path), "--no-progress"])
        assert "train digits_resnet" not in capsys.readouterr().err


def test_tokens_preflight_accepts_the_zoo_vits():
    from amc.jobs.compress import check_method

    for model, data in (("vit_digits", "digits"), ("vit_fashion", "fashion_mnist")):
        check_method(argparse.Namespace(method="tokens", model=model, data=data, seed=0))
