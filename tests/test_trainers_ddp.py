"""BaseTrainer under torchrun with 2 CPU ranks (gloo): identical weights, reduced metrics, rank-0-only files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

WORKER = Path(__file__).resolve().with_name("_ddp_worker.py")
ROOT = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert all(r["ddp"] == "DistributedDataParallel" for r in reports)
    assert reports[0]["train_batches"] == 4  # 256 samples / 2 ranks / 32 per batch: each rank got half
    assert reports[0]["hash"] == reports[1]["hash"]
    # metrics reduced across ranks: identical on both, and equal to the full (unsharded) validation set
    assert reports[0]["history"] == reports[1]["history"]
    for r in reports:
        assert r["history"][-1]["val"]["total_loss"] == pytest.approx(r["full_val_loss"], rel=1e-5)
        assert r["history"][-1]["val"]["accuracy"] == pytest.approx(r["full_val_acc"], abs=1e-6)
    # only rank 0 wrote checkpoints and TensorBoard files
    names = [Path(p).name for p in reports[0]["writes"]]
    assert names.count("last.pth") == 2 and 1 <= names.count("best.pth") <= 2 and len(names) <= 4
    assert reports[1]["writes"] == []
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pth", "last.pth"]
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 1
