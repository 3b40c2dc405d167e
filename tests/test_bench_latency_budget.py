"""scripts/bench_latency_budget.py's distillation recovery (`--kd-steps`): it must pull a damaged student
towards the teacher on the calibration crops, leave it in eval mode and give the thread count back, since
the latency rows are timed in the same process before it runs."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_latency_budget
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_latency_budget


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                              reduction="batchmean"))


def test_distill_on_crops_moves_the_student_to_the_teacher_and_restores_threads():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    crops = torch.randn(16, 3, 24, 24)
    before = _kl(student.eval(), teacher, crops)
    threads = torch.get_num_threads()
    _bench().distill_on_crops(student, teacher, crops, steps=40, batch=8, lr=0.05)
    assert torch.get_num_threads() == threads
    assert not student.training
    assert _kl(student, teacher, crops) < 0.5 * before


def test_a_row_the_final_timing_puts_over_budget_is_flagged():
    import json

    res = json.loads((SCRIPTS / "results" / "latency_budget_resnet50_fashion_mr06.json").read_text())
    rows = [line for line in _bench().render(res).splitlines() if line.startswith("| resnet50_fashion")]
    assert len(rows) == 2 and all("(over budget)" in line for line in rows)  # 0.557x and 0.548x of 0.5x
    res = json.loads((SCRIPTS / "results" / "latency_budget_vit_fashion_b32.json").read_text())
    rows = [line for line in _bench().render(res).splitlines() if line.startswith("| vit_fashion")]
    assert len(rows) == 3 and not any("(over budget)" in line for line in rows)  # 0.482x-0.510x
