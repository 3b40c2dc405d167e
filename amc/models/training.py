"""A deliberately small train/evaluate pair for the main job and benchmarks.

SGD + Nesterov momentum with a OneCycle schedule: few knobs, converges fast on small data, and is
reproducible because all randomness it owns comes from ``seed`` (the global RNG is restored after).
The full-featured trainer with hooks lives in ``amc.trainers``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._batches import call_with, class_rows, split_batch, to_device
from ..errors import DataError, TrainingError

Batch = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: Union[str, torch.device] = "cpu") -> Dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over ``loader``, in eval mode (the mode is restored); for a
    language model's `[B, L, V]` logits, over its tokens (`amc._batches.class_rows`)."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for batch in loader:
            try:
                x, y = split_batch(batch)
            except ValueError as exc:
                raise DataError(f"evaluate: {exc}") from exc
            x, y = to_device(x, device), y.to(device)
            logits, y = class_rows(call_with(model, x), y)  # a language model: one row per (next) token
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise DataError("evaluate: the loader yielded no samples")
    return {"acc": correct / total, "loss": loss_sum / total, "n": float(total)}


OPTIMIZERS = ("sgd", "adamw")  # what train_classifier builds


def train_classifier(
    model: nn.Module,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch],
    epochs: int = 5,
    lr: float = 0.1,
    device: Union[str, torch.device] = "cpu",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: Optional[str] = None,
    channels_last: bool = False,
    optimizer: str = "sgd",
) -> Dict[str, object]:
    """Train ``model`` in place; return final validation ``acc``/``loss`` plus ``history`` and ``seconds``.

    Deterministic for a given ``seed``: the global RNG is seeded inside a fork (and restored after),
    and a loader with its own shuffle ``generator`` (as amc.data builds them) has it reseeded, so
    reusing a loader does not change the run.

    ``progress``: a label to show one tqdm bar (stderr) over all ``epochs x batches``, with the
    running loss and accuracy of the epoch, the last validation accuracy and an ETA; None: silent.
    ``channels_last``: train in NHWC memory format (oneDNN's CPU convolutions run ~1.5x faster on
    the small CNNs here); the weights are returned in the default format. Off by default: with torch
    2.14.1 on CPU, fine-tuning pruned resnet20s in NHWC one after another aborted the process with heap
    corruption in backward (reproduced; never in the default layout).
    ``optimizer``: "sgd" (Nesterov momentum; the CNN recipe) or "adamw" (what ViTs need: SGD leaves
    ``vit_digits`` at 65% where AdamW reaches 95%+; ``momentum`` is then unused).

    Raises TrainingError if the loss becomes non-finite (lower ``lr``), DataError on an empty loader.
    """
    if int(epochs) < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs!r}")
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise DataError("train_classifier: train_loader yields no batches")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no weight decay on BN / biases
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        raise TrainingError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if int(epochs) * steps_per_epoch < 10:  # OneCycleLR divides by zero-length phases on tiny budgets
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, epochs=int(epochs), steps_per_epoch=steps_per_epoch, pct_start=0.25
        )
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    loader_gen = getattr(train_loader, "generator", None)
    if isinstance(loader_gen, torch.Generator):
        loader_gen.manual_seed(int(seed))  # the loader's own shuffle stream restarts too
    bar = _bar(progress, int(epochs) * steps_per_epoch)
    try:
        _run_epochs(model, train_loader, val_loader, int(epochs), opt, sched, device, lr, seed, bar, channels_last,
                    history)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    final = history[-1]
    return {
        "acc": final["acc"],
        "loss": final["loss"],
        "train_loss": final["train_loss"],
        "history": history,
        "seconds": time.perf_counter() - start,
    }


def _run_epochs(model: nn.Module, train_loader: Iterable[Batch], val_loader: Iterable[Batch], epochs: int,
                opt: torch.optim.Optimizer, sched: Any, device: Union[str, torch.device], lr: float, seed: int,
                bar: Any, channels_last: bool, history: List[Dict[str, float]]) -> None:
    with torch.random.fork_rng(devices=[]), bar:
        torch.manual_seed(int(seed))
        for epoch in range(int(epochs)):
            model.train()
            loss_sum, seen, hits = 0.0, 0, 0
            for batch in train_loader:
                try:
                    x, y = split_batch(batch)  # (x, y) tuples, or a collator's dict with its labels
                except ValueError as exc:
                    raise DataError(f"train_classifier: {exc}") from exc
                x, y = to_device(x, device), y.to(device)
                if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits, y = class_rows(call_with(model, x), y)  # a Hugging Face output's logits
                loss = F.cross_entropy(logits, y)
                if not math.isfinite(loss.item()):
                    raise TrainingError(
                        f"train_classifier: loss became {loss.item()} in epoch {epoch}; lower lr (now {lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * int(y.numel())
                seen += int(y.numel())
                hits += int((logits.detach().argmax(1) == y).sum())
                bar.update(1)
                bar.set_postfix(_postfix(epoch, epochs, loss_sum / seen, hits / seen, history), refresh=False)
            val = evaluate(model, val_loader, device)
            history.append({"epoch": float(epoch + 1), "train_loss": loss_sum / max(seen, 1), **val})
            bar.set_postfix(_postfix(epoch, epochs, loss_sum / max(seen, 1), hits / max(seen, 1), history))


def _bar(label: Optional[str], total: int) -> Any:
    """A tqdm bar on stderr, or a do-nothing stand-in when ``label`` is None."""
    if label is None:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="batch", dynamic_ncols=True, mininterval=0.5)


def _postfix(epoch: int, epochs: int, loss: float, acc: float, history: List[Dict[str, float]]) -> Dict[str, str]:
    post = {"epoch": f"{epoch + 1}/{int(epochs)}", "loss": f"{loss:.3f}", "acc": f"{100 * acc:.1f}%"}
    if history:
        post["val_acc"] = f"{100 * history[-1]['acc']:.1f}%"
    return post


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None
