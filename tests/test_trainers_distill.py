"""BaseDistiller and the loss helpers: hand-checked KD, label smoothing, adapters, a distillation run."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import TinyCNN, digits_loaders, seed_everything  # noqa: E402

from amc.errors import TrainingError  # noqa: E402
from amc.trainers import (BaseDistiller, BaseTrainer, FeatureReconstructionLoss, KDLoss,  # noqa: E402
                          LabelSmoothingCrossEntropy, kd_loss, label_smoothing_cross_entropy, make_adapter)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def test_kd_loss_equals_hand_computation():
    s, t, T = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax(s), softmax(t)
    expected = T * T * sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # batchmean: a batch of two identical rows gives the same value; identical logits give 0
    assert float(kd_loss(torch.tensor([s, s]), torch.tensor([t, t]), T)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(torch.tensor([s]), torch.tensor([s]), T)) == pytest.approx(0.0, abs=1e-7)


def test_kd_module_mixes_soft_and_hard_losses():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    out = KDLoss(temperature=3.0, alpha=0.7)(s, t, y)
    expected = 0.7 * kd_loss(s, t, 3.0) + 0.3 * F.cross_entropy(s, y)
    assert torch.allclose(out["total_loss"], expected)


def test_label_smoothing_matches_torch():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    ours = label_smoothing_cross_entropy(logits, y, 0.1)
    assert torch.allclose(ours, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
    assert torch.allclose(LabelSmoothingCrossEntropy(0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_adapters_match_widths_and_reject_other_mismatches():
    assert isinstance(make_adapter((2, 8, 4, 4), (2, 8, 4, 4)), nn.Identity)
    conv = make_adapter((2, 4, 4, 4), (2, 8, 4, 4))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv(torch.zeros(2, 4, 4, 4)).shape[1] == 8
    assert isinstance(make_adapter((2, 6), (2, 10)), nn.Linear)
    with pytest.raises(TrainingError, match="spatial size"):
        make_adapter((2, 4, 4, 4), (2, 8, 2, 2))
    loss = FeatureReconstructionLoss([("a", "b")])
    s, t = {"a": torch.randn(2, 4, 3, 3)}, {"b": torch.randn(2, 8, 3, 3)}
    loss.build(s, t)
    expected = F.mse_loss(loss.adapters["a"](s["a"]), t["b"])
    assert torch.allclose(loss(s, t), expected)


def _teacher():
    """A digits CNN trained for a few epochs with BaseTrainer."""
    seed_everything(0)
    tr, va = digits_loaders(batch_size=32, n_train=384, n_val=128)
    teacher = TinyCNN(width=8)
    opt = optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    BaseTrainer(tr, va, None, teacher, nn.CrossEntropyLoss(), opt, None, 3, "cpu", None, None, None,
                progress=False).run()
    return teacher


def test_distillation_run_decreases_kd_and_feature_losses(tmp_path):
    teacher = _teacher()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seed_everything(1)
    tr, va = digits_loaders(batch_size=32, n_train=384, n_val=128)
    student = TinyCNN(width=4)  # the "compressed" network: half the filters, so conv2 needs an adapter
    opt = optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    distiller = BaseDistiller(tr, va, None, student, None, opt, None, 5, "cpu", None, str(tmp_path), None,
                              teacher=teacher, temperature=4.0, alpha=0.7, feature_pairs={"conv2": "conv2"},
                              feature_weight=0.5, label_smoothing=0.1, progress=False)
    history = distiller.run()
    kd = [h["train"]["kd_loss"] for h in history]
    feat = [h["train"]["feature_loss"] for h in history]
    assert kd[-1] < 0.7 * kd[0], kd
    assert feat[-1] < feat[0], feat
    assert set(history[0]["train"]) == {"total_loss", "kd_loss", "ce_loss", "feature_loss"}
    assert history[-1]["val"]["accuracy"] > 0.5  # the student learns the task, scored alone
    adapter = distiller.feature_loss.adapters["conv2"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (8, 16)
    assert any(adapter.weight is p for g in opt.param_groups for p in g["params"])
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # teacher frozen
    saved = torch.load(tmp_path / "last.pth", weights_only=False)
    assert torch.equal(saved["extra"]["feature_loss"]["adapters.conv2.weight"], adapter.weight.detach())


def test_distiller_total_loss_is_the_documented_mix():
    teacher = TinyCNN(width=8)
    seed_everything(0)
    tr, va = digits_loaders(batch_size=16, n_train=32, n_val=16)
    student = TinyCNN(width=4)
    distiller = BaseDistiller(tr, va, None, student, nn.CrossEntropyLoss(), optim.SGD(student.parameters(), lr=0.1),
                              None, 1, "cpu", None, None, None, teacher=teacher, temperature=2.0, alpha=0.25,
                              feature_pairs=[("bn1", "bn1")], feature_weight=3.0, progress=False)
    distiller._before_run({})
    batch = next(iter(tr))
    preds = distiller.__get_train_batch_preds__(batch)
    losses = distiller.__get_train_losses__(preds, batch)
    expected = (0.25 * kd_loss(student(batch[0]), teacher(batch[0]), 2.0)
                + 0.75 * F.cross_entropy(preds.student, batch[1]) + 3.0 * losses["feature_loss"])
    assert torch.allclose(losses["total_loss"], expected, atol=1e-6)
    assert losses["feature_loss"] > 0


def test_distiller_bad_input():
    seed_everything(0)
    tr, va = digits_loaders(batch_size=16, n_train=32, n_val=16)
    student = TinyCNN(width=4)
    opt = optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match="teacher must be the original nn.Module"):
        BaseDistiller(tr, va, None, student, None, opt, None, 1, "cpu", None, None, None)
    with pytest.raises(TrainingError, match="student has no submodule named 'layer9'"):
        BaseDistiller(tr, va, None, student, None, opt, None, 1, "cpu", None, None, None,
                      teacher=TinyCNN(8), feature_pairs={"layer9": "conv1"})
    with pytest.raises(TrainingError, match="alpha=1.5 must be in"):
        BaseDistiller(tr, va, None, student, None, opt, None, 1, "cpu", None, None, None, teacher=TinyCNN(8),
                      alpha=1.5)
    with pytest.raises(TrainingError, match="differ in spatial size"):
        BaseDistiller(tr, va, None, student, None, opt, None, 1, "cpu", None, None, None, teacher=TinyCNN(8),
                      feature_pairs={"conv2": "pool"}, progress=False).run()
