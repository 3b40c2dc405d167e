"""BaseDistiller: retrain a compressed (student) network against the original (teacher).

Loss = ``alpha * KD(T) + (1 - alpha) * hard-label loss + feature_weight * sum MSE(features)``, where
features are outputs of named submodules captured with forward hooks, matched through a 1x1-conv /
linear adapter when the compressed layer is narrower than the teacher's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from amc._modes import training_mode
from amc.errors import TrainingError

from . import distributed
from .._batches import call_with, class_rows, logit_rows, per_token
from .base import BaseTrainer, batch_inputs, batch_targets
from .losses import FeatureReconstructionLoss, LabelSmoothingCrossEntropy, kd_loss

log = logging.getLogger("amc.trainers")

FeaturePairs = Union[None, Mapping[str, str], Sequence[Tuple[str, str]]]


class FeatureCapture:
    """Forward hooks that keep the latest output of each named submodule (``capture.features[name]``)."""

    def __init__(self, module: nn.Module, names: Iterable[str], role: str = "network") -> None:
        modules = dict(module.named_modules())
        self.features: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            target = modules.get(name)
            if target is None:
                try:  # an amc network also finds its layers by their names in the traced model
                    target = module.get_submodule(name)
                except AttributeError:
                    target = None
            if target is None:
                options = [n for n in modules if n][:12]
                raise TrainingError(f"{role} has no submodule named {name!r}; feature_pairs must use names from "
                                    f"named_modules() (for an amc network, also its layer names: "
                                    f"[n.name for n in net.layer_nodes]), e.g. {options}")
            self._handles.append(target.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[name] = output
        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class DistillPreds:
    """What ``get_train_batch_preds`` hands to ``get_train_losses`` in a distiller."""

    student: torch.Tensor
    teacher: torch.Tensor
    student_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_output: Any = None  # the student's output as it came (a language model's, for its token loss)


def _normalise_pairs(pairs: FeaturePairs) -> List[Tuple[str, str]]:
    if pairs is None:
        return []
    if isinstance(pairs, Mapping):
        return [(str(s), str(t)) for s, t in pairs.items()]
    out = []
    for pair in pairs:
        if isinstance(pair, str):
            out.append((pair, pair))
        else:
            s, t = pair
            out.append((str(s), str(t)))
    return out


class BaseDistiller(BaseTrainer):
    """A BaseTrainer whose training loss distils ``teacher`` into ``network`` (the student).

    Seed arguments as in BaseTrainer, plus keyword-only: ``teacher``, ``temperature``, ``alpha``
    (weight of the KD term), ``feature_pairs`` ({student_module: teacher_module} or a list of pairs),
    ``feature_weight``, ``label_smoothing`` (used when ``criterion`` is None), ``example_input`` (to size
    adapters; else the first validation/training batch is used).  Validation scores the student alone.
    """

    def __init__(self, train_loader: Any, val_loader: Any = None, eval_loader: Any = None,
                 network: Optional[nn.Module] = None, criterion: Any = None, optimizer: Any = None,
                 scheduler: Any = None, epochs: int = 1, device: Any = None, tbx_writer: Any = None,
                 checkpoints_folder: Any = None, additional_args: Any = None, *,
                 teacher: Optional[nn.Module] = None, temperature: float = 4.0, alpha: float = 0.9,
                 feature_pairs: FeaturePairs = None, feature_weight: float = 1.0, label_smoothing: float = 0.0,
                 example_input: Optional[Any] = None, **trainer_kwargs: Any) -> None:
        if not isinstance(teacher, nn.Module):
            raise TrainingError(f"teacher must be the original nn.Module, got {type(teacher).__name__}")
        if not 0.0 <= alpha <= 1.0:
            raise TrainingError(f"alpha={alpha} must be in [0, 1] (weight of the soft-target loss)")
        if temperature <= 0:
            raise TrainingError(f"temperature={temperature} must be > 0")
        if criterion is None:
            criterion = LabelSmoothingCrossEntropy(label_smoothing)
        super().__init__(train_loader, val_loader, eval_loader, network, criterion, optimizer, scheduler, epochs,
                         device, tbx_writer, checkpoints_folder, additional_args, **trainer_kwargs)
        self._teacher = teacher.to(self._device).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.feature_pairs = _normalise_pairs(feature_pairs)
        self.feature_loss = FeatureReconstructionLoss(self.feature_pairs)
        self._example_input = example_input
        self._student_capture: Optional[FeatureCapture] = None
        self._teacher_capture: Optional[FeatureCapture] = None
        self._adapters_built = False
        if self.feature_pairs:
            self._student_capture = FeatureCapture(self.module, [s for s, _ in self.feature_pairs], "student")
            self._teacher_capture = FeatureCapture(self._teacher, [t for _, t in self.feature_pairs], "teacher")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    # ------------------------------------------------------------------ adapters
    def build_adapters(self, example_input: Any) -> None:
        """Size adapters from one forward of both networks; their params join the optimizer."""
        if self._adapters_built or not self.feature_pairs:
            return
        student = self.module
        with training_mode(student, False), torch.no_grad(), torch.random.fork_rng(devices=[]):
            self._forward_both(self.to_device(example_input), student)
        self.feature_loss.build(self._student_capture.features, self._teacher_capture.features)
        self.feature_loss.to(self._device)
        params = [p for p in self.feature_loss.parameters()]
        known = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            self._optimizer.add_param_group({"params": new})
            log.info("distiller: added %d adapter parameters to the optimizer", len(new))
        self._adapters_built = True

    def adapter_parameters(self) -> List[nn.Parameter]:
        return list(self.feature_loss.parameters())

    def _before_run(self, kwargs: Dict[str, Any]) -> None:
        if not self.feature_pairs or self._adapters_built:
            return
        example = self._example_input
        if example is None:
            loader = self._val_loader if self._val_loader is not None else self._train_loader
            with torch.random.fork_rng(devices=[]):  # peeking must not shift the shuffling stream
                batch = next(iter(loader))
            example = batch_inputs(batch, "BaseDistiller (pass example_input=...)")
        self.build_adapters(example)

    def _after_backward(self) -> None:
        distributed.average_gradients(self.feature_loss.parameters(), self._dist)

    def _extra_state(self) -> Dict[str, Any]:
        return {"feature_loss": self.feature_loss.state_dict()}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        if "feature_loss" in state:
            self.feature_loss.load_state_dict(state["feature_loss"])

    # ------------------------------------------------------------------ hooks
    def _forward_both(self, inputs: Any, student: nn.Module) -> Tuple[Any, Any]:
        """The student's and the teacher's outputs as they come (logits, or a model output holding them)."""
        for capture in (self._student_capture, self._teacher_capture):
            if capture is not None:
                capture.clear()
        with torch.no_grad():
            teacher = call_with(self._teacher, inputs)
        return call_with(student, inputs), teacher

    def get_train_batch_preds(self, batch_train_data: Any, *args: Any, **kwargs: Any) -> DistillPreds:
        """Student (through DDP when distributed) and teacher on the same inputs, plus captured features."""
        inputs = self.to_device(batch_inputs(batch_train_data, "get_train_batch_preds / __get_train_batch_preds__"))
        student, teacher = self._forward_both(inputs, self._network)
        return DistillPreds(  # per-token logits as rows: KD's softmax runs over the vocabulary
            student=logit_rows(student), teacher=logit_rows(teacher), student_output=student,
            student_features=dict(self._student_capture.features) if self._student_capture else {},
            teacher_features=dict(self._teacher_capture.features) if self._teacher_capture else {})

    def get_train_losses(self, batch_preds: DistillPreds, batch_train_data: Any, *args: Any,
                         **kwargs: Any) -> Dict[str, torch.Tensor]:
        """``total_loss`` plus its parts (``kd_loss``, ``ce_loss``, ``feature_loss``) for TensorBoard."""
        soft = kd_loss(batch_preds.student, batch_preds.teacher, self.temperature)
        losses: Dict[str, torch.Tensor] = {"kd_loss": soft}
        total = self.alpha * soft
        if self.alpha < 1.0:
            targets = self.to_device(batch_targets(batch_train_data, "get_train_losses / __get_train_losses__"))
            out = batch_preds.student_output
            hard = self._criterion(*class_rows(out, targets)) if per_token(out) and targets.dim() == 2 \
                else self._criterion(batch_preds.student, targets)
            losses["ce_loss"] = hard
            total = total + (1.0 - self.alpha) * hard
        if self.feature_pairs:
            feat = self.feature_loss(batch_preds.student_features, batch_preds.teacher_features)
            losses["feature_loss"] = feat
            total = total + self.feature_weight * feat
        losses["total_loss"] = total
        return losses
