"""BaseTrainer: the fixed PyTorch training loop with the seed's overridable hooks.

Subclasses say how a batch becomes predictions and losses (``get_train_batch_preds`` /
``get_train_losses`` and their validation twins) and when to stop (``if_stop_training``); the loop
does devices, AMP, DDP, schedulers, TensorBoard, tqdm, checkpoints and resume.  The seed's spellings
(``__get_train_losses__``, ``__run__``, ``__if_stop_trainning__``, ...) are the same functions under
a second name, so a seed-style subclass and a Pythonic one run through one code path.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from amc._batches import TARGET_KEYS, call_with, class_rows, dict_inputs, logits_of, per_token, targets_of
from amc._modes import training_mode
from amc.errors import DataError, TrainingError

from . import checkpoint, distributed
from .logging import ScalarLogger, progress

log = logging.getLogger("amc.trainers")

# seed spelling -> Pythonic name.  Both names are bound to the same function on every class.
SEED_ALIASES: Dict[str, str] = {
    "__run__": "run",
    "__get_train_batch_preds__": "get_train_batch_preds",
    "__get_train_losses__": "get_train_losses",
    "__get_val_batch_preds__": "get_val_batch_preds",
    "__get_val_losses__": "get_val_losses",
    "__if_stop_trainning__": "if_stop_training",
    "__if_stop_training__": "if_stop_training",
}

#: run() keyword arguments the loop consumes itself; every other keyword reaches the hooks.
RESERVED_RUN_KWARGS = ("resume",)


def batch_inputs(batch: Any, hook: str) -> Any:
    """What the default hooks feed the network: `batch[0]`, or a dict batch's named inputs (labels left out)."""
    return dict_inputs(batch) if isinstance(batch, Mapping) else _first(batch, 0, hook)


def batch_targets(batch: Any, hook: str) -> Any:
    """What the default hooks score against: `batch[1]`, or a dict batch's `labels` (see `amc._batches`)."""
    if not isinstance(batch, Mapping):
        return _first(batch, 1, hook)
    targets = targets_of(batch)
    if targets is None:
        raise TrainingError(f"the default {hook} needs the targets of a dict batch under one of "
                            f"{sorted(TARGET_KEYS)}; the batch has {sorted(map(str, batch))}: add them or "
                            "override the hook")
    return targets


def _first(batch: Any, index: int, hook: str) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) > index:
        return batch[index]
    raise TrainingError(f"the default {hook} expects batches like (inputs, targets, ...) but got "
                        f"{type(batch).__name__}; override {hook} for this batch layout")


def _batch_size(batch: Any, preds: Any) -> int:
    """Samples in a batch, for sample-weighted means (so sharded evaluation equals the full one)."""
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else \
        next(iter(dict_inputs(batch).values()), None) if isinstance(batch, Mapping) else batch
    for item in (first, logits_of(preds)):
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
    return 1


def _is_classification(preds: Any, batch: Any) -> bool:
    """Logits (N, C) against integer labels (N,): the case where accuracy means something."""
    labels, preds = targets_of(batch), logits_of(preds)
    return (isinstance(preds, torch.Tensor) and isinstance(labels, torch.Tensor) and preds.dim() == 2
            and preds.is_floating_point() and labels.dim() == 1 and not labels.is_floating_point()
            and labels.dtype != torch.bool and labels.shape[0] == preds.shape[0])


def _scored_rows(preds: Any, batch: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) that accuracy counts: a classifier's, or a language model's next tokens; else None."""
    if _is_classification(preds, batch):
        logits = logits_of(preds)
        return logits, targets_of(batch).to(logits.device)
    labels = targets_of(batch)
    if per_token(preds) and isinstance(labels, torch.Tensor) and labels.dim() == 2 \
            and tuple(labels.shape) == tuple(logits_of(preds).shape[:2]):
        return class_rows(preds, labels.to(logits_of(preds).device))
    return None


def _check_optimizer_owns(optimizer: Any, network: nn.Module) -> None:
    """An optimizer built over another module (the original, before trace or pruning made a new network)
    would train nothing, silently: refuse it. Leaving some of the network's parameters out stays allowed."""
    trainable = {id(p) for p in network.parameters() if p.requires_grad}
    groups = getattr(optimizer, "param_groups", None)
    if not trainable or not isinstance(groups, list):
        return
    held = {id(p) for g in groups for p in g.get("params", ())}
    if held and not held & trainable:
        raise TrainingError(f"the optimizer holds {len(held)} parameter tensor(s), none of them the network's: it was "
                            f"built over another module (the model before amc.trace / amc.prune / a compressor made "
                            f"this network?) and would train nothing. Build it over this network: "
                            f"torch.optim.SGD(network.parameters(), lr=...)")


class BaseTrainer:
    """Train any ``nn.Module``; override the hooks, then call :meth:`run` (seed: ``__run__``).

    Extra keyword-only options beside the seed's arguments:
    ``callbacks`` (plug-ins with ``on_epoch_start/on_before_step/on_after_step/on_epoch_end``), ``resume``
    (True: ``<checkpoints_folder>/last.pth``; or a path), ``amp`` (mixed precision on CUDA),
    ``grad_clip`` (max grad norm), ``scheduler_interval`` ('epoch' or 'step'; ReduceLROnPlateau always
    steps per epoch on the validation total loss), ``best_key``/``best_mode`` (which validation
    metric picks ``best.pth``), ``progress`` (tqdm bars), ``log_every`` (steps between step scalars).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Bind a hook overridden under one spelling to the other spelling too (one code path)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        for seed_name, py_name in SEED_ALIASES.items():
            if seed_name in own and py_name not in own:
                setattr(cls, py_name, own[seed_name])
        for seed_name, py_name in SEED_ALIASES.items():
            if py_name in cls.__dict__ and seed_name not in own:
                setattr(cls, seed_name, cls.__dict__[py_name])

    def __init__(self,
                 train_loader: Any,
                 val_loader: Any = None,
                 eval_loader: Any = None,
                 network: Optional[nn.Module] = None,
                 criterion: Optional[Callable] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Any = None,
                 epochs: int = 1,
                 device: Any = None,
                 tbx_writer: Any = None,
                 checkpoints_folder: Optional[Union[str, Path]] = None,
                 additional_args: Any = None,
                 *,
                 callbacks: Sequence[Any] = (),
                 resume: Union[bool, str, Path] = False,
                 amp: bool = False,
                 grad_clip: Optional[float] = None,
                 scheduler_interval: str = "epoch",
                 best_key: str = "total_loss",
                 best_mode: str = "min",
                 progress: bool = True,
                 log_every: int = 1) -> None:
        if not isinstance(network, nn.Module):
            raise TrainingError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if optimizer is None:
            raise TrainingError("optimizer is None; build one over network.parameters() "
                                "(e.g. torch.optim.SGD(network.parameters(), lr=0.01))")
        _check_optimizer_owns(optimizer, network)
        if int(epochs) < 0:
            raise TrainingError(f"epochs={epochs} must be >= 0")
        if scheduler_interval not in ("epoch", "step"):
            raise TrainingError(f"scheduler_interval={scheduler_interval!r}; use 'epoch' or 'step'")
        if best_mode not in ("min", "max"):
            raise TrainingError(f"best_mode={best_mode!r}; use 'min' (losses) or 'max' (accuracy)")

        self._dist, self._device = distributed.setup(device)
        network.to(self._device)  # in place: the optimizer keeps pointing at the same Parameters
        self._network: nn.Module = distributed.wrap(network, self._dist, self._device)
        self._train_loader = distributed.shard_train_loader(train_loader, self._dist)
        self._val_loader = distributed.shard_eval_loader(val_loader, self._dist)
        self._eval_loader = distributed.shard_eval_loader(eval_loader, self._dist)
        self._criterion = criterion
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._epochs = int(epochs)
        self._tbx_writer = tbx_writer
        self._checkpoints_folder = Path(checkpoints_folder) if checkpoints_folder is not None else None
        self._additional_args = additional_args
        self.args = additional_args
        self.callbacks: List[Any] = list(callbacks)
        self._resume = resume
        self._grad_clip = grad_clip
        self._scheduler_interval = scheduler_interval
        self._best_key, self._best_mode = best_key, best_mode
        self._progress = progress
        self._log_every = max(1, int(log_every))

        self._amp = bool(amp) and self._device.type == "cuda"
        if amp and not self._amp:
            warnings.warn("amp=True needs CUDA; training in full precision on CPU", RuntimeWarning, stacklevel=2)
        self._scaler = torch.amp.GradScaler("cuda") if self._amp else None
        self._logger = ScalarLogger(tbx_writer, enabled=self._dist.is_main)

        self.epoch = 0            # completed epochs
        self.global_step = 0      # optimizer steps taken
        self.history: List[Dict[str, Any]] = []
        self.best_metric: Optional[float] = None
        self.eval_metrics: Dict[str, float] = {}
        self._stopped = False  # if_stop_training said so: a resume does not train further
        self._warned: set = set()

    # ------------------------------------------------------------------ properties
    @property
    def module(self) -> nn.Module:
        """The user's network without the DDP wrapper (what checkpoints and plug-ins see)."""
        return distributed.unwrap(self._network)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or the only process): the one that logs and writes checkpoints."""
        return self._dist.is_main

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def checkpoint_paths(self) -> Dict[str, Optional[Path]]:
        folder = self._checkpoints_folder
        return {"last": folder / checkpoint.LAST_NAME if folder else None,
                "best": folder / checkpoint.BEST_NAME if folder else None}

    @property
    def lr(self) -> float:
        """Learning rate of the first parameter group."""
        return float(self._optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ hooks (override these)
    def get_train_batch_preds(self, batch_train_data: Any, *args: Any, **kwargs: Any) -> Any:
        """Predictions for one training batch. Default: ``network(batch[0])``; a dict batch (a Hugging Face
        collator's) is passed by name, its labels left out."""
        return self._default_preds(batch_train_data, "get_train_batch_preds / __get_train_batch_preds__")

    def get_train_losses(self, batch_preds: Any, batch_train_data: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Losses for one training batch; must contain ``'total_loss'`` (the one backpropagated)."""
        return self._criterion_losses(batch_preds, batch_train_data, "get_train_losses / __get_train_losses__")

    def get_val_batch_preds(self, batch_val_data: Any, *args: Any, **kwargs: Any) -> Any:
        """Predictions for one validation batch. Default: ``network(batch[0])``, or a dict batch by name."""
        return self._default_preds(batch_val_data, "get_val_batch_preds / __get_val_batch_preds__")

    def get_val_losses(self, batch_preds: Any, batch_val_data: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """Losses for one validation batch; must contain ``'total_loss'``."""
        return self._criterion_losses(batch_preds, batch_val_data, "get_val_losses / __get_val_losses__")

    def if_stop_training(self, *args: Any, **kwargs: Any) -> bool:
        """Asked after every epoch with run()'s keyword arguments; True ends training early."""
        return False

    def _default_preds(self, batch: Any, hook: str) -> Any:
        return call_with(self._network, self.to_device(batch_inputs(batch, hook)))

    def _criterion_losses(self, preds: Any, batch: Any, hook: str) -> Dict[str, Any]:
        if self._criterion is None:
            raise TrainingError(f"criterion is None and {hook} is not overridden; pass a criterion "
                                "(e.g. nn.CrossEntropyLoss()) or override the hook")
        targets = self.to_device(batch_targets(batch, hook))
        if per_token(preds) and isinstance(targets, torch.Tensor) and targets.dim() == 2:
            return {"total_loss": self._criterion(*class_rows(preds, targets))}  # a language model's next tokens
        return {"total_loss": self._criterion(logits_of(preds), targets)}

    def to_device(self, data: Any) -> Any:
        """Move tensors (also inside lists, tuples and dicts) to the training device."""
        if isinstance(data, torch.Tensor):
            return data.to(self._device, non_blocking=True)
        if isinstance(data, (list, tuple)):
            return type(data)(self.to_device(d) for d in data)
        if isinstance(data, Mapping):
            return {k: self.to_device(v) for k, v in data.items()}
        return data

    # ------------------------------------------------------------------ extension points for subclasses
    def _before_run(self, kwargs: Dict[str, Any]) -> None:
        """Called once at the start of run(), before a resume loads state (BaseDistiller builds adapters)."""

    def _after_backward(self) -> None:
        """Called between backward and the optimizer step."""

    def _extra_state(self) -> Dict[str, Any]:
        """Subclass state that must survive a resume."""
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ the loop
    def run(self, **kwargs: Any) -> List[Dict[str, Any]]:
        """Train for ``epochs`` (or until ``if_stop_training``); returns the per-epoch history.

        ``resume=`` overrides the constructor's; every other keyword reaches each hook.
        """
        resume = kwargs.pop("resume", self._resume)
        self._check_loader(self._train_loader, "train_loader")
        self._check_loader(self._val_loader, "val_loader")
        self._check_loader(self._eval_loader, "eval_loader")
        self._before_run(kwargs)
        path = checkpoint.resolve_resume_path(resume, self._checkpoints_folder)
        if path is not None:
            self.load_state_dict(checkpoint.load_checkpoint(path, map_location=self._device))
            log.info("resumed from %s at epoch %d/%d", path, self.epoch, self._epochs)
        elif resume is True:
            log.info("resume=True but no %s yet in %s; starting from scratch", checkpoint.LAST_NAME,
                     self._checkpoints_folder)
        if self._stopped:
            log.info("the checkpoint's run was stopped by if_stop_training at epoch %d; nothing to do", self.epoch)
            return self.history

        for cb in self.callbacks:
            _call(cb, "on_train_start", self)
        try:
            while self.epoch < self._epochs:
                if self._run_epoch(self.epoch, kwargs):
                    break
            for cb in self.callbacks:
                _call(cb, "on_train_end", self)
            if self._eval_loader is not None:
                self.eval_metrics = self.evaluate(self._eval_loader, **kwargs)
                self._logger.scalars("eval", self.eval_metrics, self.epoch)
        finally:
            self._logger.flush()
        return self.history

    def _run_epoch(self, epoch: int, kwargs: Dict[str, Any]) -> bool:
        distributed.set_epoch(self._train_loader, epoch)
        for cb in self.callbacks:
            _call(cb, "on_epoch_start", self, epoch)
        lrs = [float(g["lr"]) for g in self._optimizer.param_groups]
        train_metrics = self._train_epoch(epoch, kwargs)
        for cb in self.callbacks:
            _call(cb, "on_epoch_end", self, epoch)
        if self.callbacks:  # plug-ins may edit weights with per-rank randomness: rank 0's copy wins
            distributed.broadcast_module(self.module, self._dist)

        val_metrics: Dict[str, float] = {}
        if self._val_loader is not None:
            val_metrics = self.evaluate(self._val_loader, **kwargs)
            bad = [k for k, v in val_metrics.items() if not math.isfinite(v)]
            if bad:
                raise TrainingError(f"validation after epoch {epoch + 1} gave non-finite {bad}; the network "
                                    f"diverged. {self._recovery_advice()}")
        self._step_scheduler_epoch(train_metrics, val_metrics)

        self.history.append({"epoch": epoch + 1, "lr": lrs[0], "lrs": lrs, "train": train_metrics,
                             "val": val_metrics})
        self._logger.scalars("train_epoch", train_metrics, epoch + 1)
        self._logger.scalars("val", val_metrics, epoch + 1)
        self._logger.scalar("lr", lrs[0], epoch + 1)
        for i, lr in enumerate(lrs[1:], start=1):
            self._logger.scalar(f"lr/group{i}", lr, epoch + 1)
        self._logger.flush()

        self.epoch = epoch + 1
        stop = distributed.any_true(bool(self.if_stop_training(**kwargs)), self._dist, self._device)
        self._stopped = stop
        self._save_checkpoints(val_metrics or train_metrics)
        if stop:
            log.info("if_stop_training returned True after epoch %d; stopping", self.epoch)
        return stop

    def _train_epoch(self, epoch: int, kwargs: Dict[str, Any]) -> Dict[str, float]:
        self._network.train()
        sums: Dict[str, float] = defaultdict(float)
        samples, batches = 0, 0
        hook = "get_train_losses / __get_train_losses__"
        bar = progress(self._train_loader, f"epoch {epoch + 1}/{self._epochs} train",
                       self._progress and self._dist.is_main)
        for batch in bar:
            batches += 1
            self._optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                preds = self.get_train_batch_preds(batch, **kwargs)
                losses = self.get_train_losses(preds, batch, **kwargs)
            values = self._check_losses(losses, hook, f"epoch {epoch + 1}, batch {batches}", train=True)
            self._backward_and_step(losses["total_loss"])
            self.global_step += 1
            for cb in self.callbacks:
                _call(cb, "on_after_step", self, self.global_step)
            if (self._scheduler is not None and self._scheduler_interval == "step"
                    and not isinstance(self._scheduler, ReduceLROnPlateau)):
                self._scheduler.step()

            n = _batch_size(batch, preds)
            samples += n
            for k, v in values.items():
                sums[k] += v * n
            if self.global_step % self._log_every == 0:
                self._logger.scalars("train", values, self.global_step)
                self._logger.scalar("train/lr", self.lr, self.global_step)
            bar.set_postfix(loss=f"{values['total_loss']:.4g}")
        bar.close()
        if batches == 0:
            raise DataError(f"train_loader yielded no batches in epoch {epoch + 1}; the dataset is empty or "
                            "exhausted (an iterator can be consumed only once) - pass a DataLoader with data")
        totals = distributed.all_reduce_sums({**sums, "__samples": samples}, self._dist, self._device)
        count = totals.pop("__samples")
        return {k: v / count for k, v in totals.items()}

    def _backward_and_step(self, total: torch.Tensor) -> None:
        if self._scaler is not None:
            self._scaler.scale(total).backward()
        else:
            total.backward()
        self._after_backward()
        for cb in self.callbacks:
            _call(cb, "on_before_step", self, self.global_step + 1)
        if self._grad_clip is not None:
            if self._scaler is not None:
                self._scaler.unscale_(self._optimizer)
            params = [p for g in self._optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self._grad_clip)
        if self._scaler is not None:
            self._scaler.step(self._optimizer)
            self._scaler.update()
        else:
            self._optimizer.step()

    @torch.no_grad()
    def evaluate(self, loader: Any = None, **kwargs: Any) -> Dict[str, float]:
        """Mean validation losses (sample-weighted, reduced over ranks) and accuracy for classifiers.

        Under torchrun every rank must call it.  The hooks see the unwrapped network here, so
        evaluation runs no collectives and ranks may hold different numbers of batches.
        """
        loader = self._val_loader if loader is None else loader
        if loader is None:
            return {}
        hook = "get_val_losses / __get_val_losses__"
        wrapped, module = self._network, self.module
        sums: Dict[str, float] = defaultdict(float)
        samples = correct = labelled = 0
        with training_mode(module, False):
            self._network = module
            try:
                bar = progress(loader, "validate", self._progress and self._dist.is_main)
                for i, batch in enumerate(bar, start=1):
                    with self._autocast():
                        preds = self.get_val_batch_preds(batch, **kwargs)
                        losses = self.get_val_losses(preds, batch, **kwargs)
                    values = self._check_losses(losses, hook, f"validation batch {i}", train=False)
                    n = _batch_size(batch, preds)
                    samples += n
                    for k, v in values.items():
                        sums[k] += v * n
                    rows = _scored_rows(preds, batch)
                    if rows is not None:
                        logits, labels = rows
                        correct += int((logits.argmax(dim=1) == labels).sum())
                        labelled += int(labels.numel())
                bar.close()
            finally:
                self._network = wrapped
        totals = distributed.all_reduce_sums({**sums, "__samples": samples, "__correct": correct,
                                              "__labelled": labelled}, self._dist, self._device)
        count, correct_all, labelled_all = totals.pop("__samples"), totals.pop("__correct"), totals.pop("__labelled")
        if count == 0:
            raise DataError("the validation/evaluation loader yielded no batches; pass a loader with data "
                            "or val_loader=None to skip validation")
        metrics = {k: v / count for k, v in totals.items()}
        if labelled_all > 0:
            metrics["accuracy"] = correct_all / labelled_all
        return metrics

    def _check_losses(self, losses: Any, hook: str, where: str, train: bool) -> Dict[str, float]:
        """The hook contract: a dict with a scalar, finite 'total_loss' (differentiable when training)."""
        if not isinstance(losses, Mapping):
            raise TrainingError(f"{hook} returned {type(losses).__name__} at {where}; it must return a dict "
                                "like {'total_loss': loss_tensor, ...}")
        if "total_loss" not in losses:
            raise TrainingError(f"{hook} returned a dict without 'total_loss' (keys: {sorted(losses)}) at {where}; "
                                "put the loss to optimise under the key 'total_loss'")
        total = losses["total_loss"]
        if train:
            if not isinstance(total, torch.Tensor) or total.numel() != 1:
                raise TrainingError(f"{hook}: 'total_loss' must be a scalar tensor at {where}, got "
                                    f"{type(total).__name__}{tuple(total.shape) if isinstance(total, torch.Tensor) else ''}; "
                                    "reduce it with .mean() or .sum()")
            if not total.requires_grad:
                raise TrainingError(f"{hook}: 'total_loss' does not require grad at {where}; it was computed "
                                    "under torch.no_grad() or detached, so nothing can be trained")
        values: Dict[str, float] = {}
        for name, value in losses.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise TrainingError(f"{hook}: loss {name!r} has shape {tuple(value.shape)} at {where}; "
                                        "every logged loss must be a scalar")
                value = value.detach().float().item()
            try:
                values[str(name)] = float(value)
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"{hook}: loss {name!r} is a {type(value).__name__} at {where}; "
                                    "use tensors or numbers") from exc
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"non-finite loss {', '.join(f'{k}={values[k]}' for k in bad)} from {hook} at "
                                f"{where}: training diverged or the inputs contain NaN/inf. Lower the learning "
                                f"rate, set grad_clip=..., or check the data. {self._recovery_advice()}")
        return values

    def _recovery_advice(self) -> str:
        last = self.checkpoint_paths["last"]
        if last is not None and last.is_file():
            return f"The last good checkpoint {str(last)!r} was kept; continue from it with resume=True."
        return "No checkpoint was written yet (set checkpoints_folder to keep one per epoch)."

    def _step_scheduler_epoch(self, train_metrics: Dict[str, float], val_metrics: Dict[str, float]) -> None:
        sched = self._scheduler
        if sched is None:
            return
        if isinstance(sched, ReduceLROnPlateau):
            if "total_loss" in val_metrics:
                sched.step(val_metrics["total_loss"])
            else:
                self._warn_once("plateau", "ReduceLROnPlateau without a val_loader steps on the training loss")
                sched.step(train_metrics["total_loss"])
        elif self._scheduler_interval == "epoch":
            sched.step()

    def _autocast(self) -> Any:
        if self._amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    @staticmethod
    def _check_loader(loader: Any, name: str) -> None:
        if loader is None:
            if name == "train_loader":
                raise DataError("train_loader is None; pass a torch.utils.data.DataLoader over the training set")
            return
        try:
            n = len(loader)
        except TypeError:
            return  # iterable-style: checked after the first pass
        if n == 0:
            dataset = getattr(loader, "dataset", None)
            size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else "?"
            raise DataError(f"{name} has no batches (dataset size {size}, batch_size="
                            f"{getattr(loader, 'batch_size', '?')}, drop_last={getattr(loader, 'drop_last', '?')}); "
                            "give it data, or lower batch_size / set drop_last=False")

    # ------------------------------------------------------------------ checkpoints
    def _improved(self, metrics: Dict[str, float]) -> bool:
        key = self._best_key if self._best_key in metrics else "total_loss"
        if key != self._best_key:
            self._warn_once("best_key", f"best_key={self._best_key!r} is not among the metrics "
                                        f"{sorted(metrics)}; choosing best.pth by 'total_loss'")
        value = metrics.get(key)
        if value is None:
            return False
        better = (self.best_metric is None or (value < self.best_metric if self._best_mode == "min"
                                               else value > self.best_metric))
        if better:
            self.best_metric = float(value)
        return better

    def _save_checkpoints(self, metrics: Dict[str, float]) -> None:
        if self._checkpoints_folder is None:
            return
        for name, tensor in self.module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TrainingError(f"after epoch {self.epoch} the network's {name!r} holds NaN/inf; refusing to "
                                    f"checkpoint a diverged state. {self._recovery_advice()}")
        improved = self._improved(metrics)
        state = self.state_dict()  # collective under torchrun (RNG states of every rank)
        if self._dist.is_main:
            checkpoint.atomic_save(state, self._checkpoints_folder / checkpoint.LAST_NAME)
            if improved:
                checkpoint.atomic_save(state, self._checkpoints_folder / checkpoint.BEST_NAME)
        distributed.barrier(self._dist)

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resume needs; the RNG entry holds one state per rank."""
        gens = checkpoint.loader_generators(self._train_loader, self._val_loader)
        rng = distributed.all_gather_object(checkpoint.capture_rng_state(gens), self._dist)
        return {
            "format": checkpoint.FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "stopped": self._stopped,
            "best_metric": self.best_metric,
            "history": self.history,
            "network": self.module.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict() if hasattr(self._scheduler, "state_dict") else None,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
            "extra": self._extra_state(),
            "rng": rng,
            "world_size": self._dist.world_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (network, optimizer, scheduler, plug-ins, counters and RNGs)."""
        self.module.load_state_dict(state["network"])
        self._optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and hasattr(self._scheduler, "load_state_dict"):
            self._scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self._scaler is not None:
            self._scaler.load_state_dict(state["scaler"])
        saved_cbs = state.get("callbacks", [])
        if len(saved_cbs) != len(self.callbacks):
            raise TrainingError(f"the checkpoint holds state for {len(saved_cbs)} callbacks but the trainer has "
                                f"{len(self.callbacks)}; resume with the same plug-ins in the same order")
        for cb, cb_state in zip(self.callbacks, saved_cbs):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        self._load_extra_state(state.get("extra", {}))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self._stopped = bool(state.get("stopped", False))
        self.best_metric = state.get("best_metric")
        self.history = list(state.get("history", []))
        rng = state["rng"]
        if len(rng) != self._dist.world_size:
            warnings.warn(f"checkpoint was written by {len(rng)} ranks, resuming with {self._dist.world_size}; "
                          "random streams (shuffling, dropout) will differ from an uninterrupted run",
                          RuntimeWarning, stacklevel=2)
        gens = checkpoint.loader_generators(self._train_loader, self._val_loader)
        checkpoint.restore_rng_state(rng[self._dist.rank % len(rng)], gens)


def _call(callback: Any, name: str, *args: Any) -> None:
    method = getattr(callback, name, None)
    if method is not None:
        method(*args)


# Seed spellings on the base class itself (subclasses get theirs from __init_subclass__).
for _seed, _py in SEED_ALIASES.items():
    setattr(BaseTrainer, _seed, getattr(BaseTrainer, _py))
del _seed, _py
