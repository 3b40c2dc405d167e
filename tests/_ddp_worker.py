"""Tiny models/data for the trainer tests, and the worker that tests/test_trainers_ddp.py runs under torchrun.

As a script: ``python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR`` trains
a digits CNN with BaseTrainer and writes ``OUT_DIR/rank<r>.json`` (test-only output) with a hash of
the final weights, the history and how many checkpoint files this rank wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_DIGITS = None


def digits_tensors(n_train: int = 384, n_val: int = 128) -> Tuple[torch.Tensor, ...]:
    """sklearn's 8x8 digits as (N,1,8,8) float in [0,1] and int64 labels; a fixed split."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        _DIGITS = x[perm], y[perm]
    x, y = _DIGITS
    return x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val]


def digits_loaders(batch_size: int = 32, n_train: int = 384, n_val: int = 128, shuffle: bool = True):
    xtr, ytr, xva, yva = digits_tensors(n_train, n_val)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(TensorDataset(xva, yva), batch_size=batch_size, shuffle=False)
    return train, val


class TinyCNN(nn.Module):
    """conv-bn-relu x2, pool, linear: enough structure for filter pruning on 8x8 digits."""

    def __init__(self, width: int = 8, classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(self.drop(x.flatten(1)))


def state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    from amc.trainers import BaseTrainer, SoftFilterPruning, checkpoint

    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    writes = []
    real_save = checkpoint.atomic_save

    def counting_save(obj, path):  # records which rank writes checkpoint files
        writes.append(str(path))
        real_save(obj, path)

    checkpoint.atomic_save = counting_save
    seed_everything(0)  # same init on every rank (DDP also broadcasts rank 0's weights)
    train, val = digits_loaders(batch_size=32, n_train=256, n_val=100)
    net = TinyCNN(width=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = BaseTrainer(train, val, None, net, nn.CrossEntropyLoss(), opt, sched, epochs=2, device="cpu",
                          tbx_writer=str(out / "tb"), checkpoints_folder=str(out / "ckpt"), additional_args=None,
                          callbacks=[SoftFilterPruning(0.25)], progress=False)
    history = trainer.run()
    # Full (unsharded) validation loss of this rank's final weights, computed without the trainer.
    xva, yva = digits_tensors(256, 100)[2:]
    net.eval()
    with torch.no_grad():
        logits = trainer.module(xva)
        full_val = float(nn.functional.cross_entropy(logits, yva))
        full_acc = float((logits.argmax(1) == yva).float().mean())
    report = {"rank": rank, "world_size": trainer.world_size, "hash": state_hash(trainer.module),
              "history": history, "writes": writes, "full_val_loss": full_val, "full_val_acc": full_acc,
              "train_batches": len(trainer._train_loader), "ddp": type(trainer._network).__name__}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
