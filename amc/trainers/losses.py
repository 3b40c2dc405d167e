"""Loss functions for retraining compressed networks: Hinton KD, label smoothing, feature reconstruction.

Small functions and modules so they can be used outside the trainers (and checked by hand in tests).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from amc.errors import TrainingError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` keeps the gradient scale independent of T so ``alpha`` means the same for every T.
    """
    if temperature <= 0:
        raise TrainingError(f"temperature={temperature} must be > 0")
    if student_logits.shape != teacher_logits.shape:
        raise TrainingError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ; the two networks must predict the same classes")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature ** 2)


def label_smoothing_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross entropy against ``(1 - eps) * onehot + eps / C``; keeps the student from over-confidence."""
    if not 0.0 <= smoothing < 1.0:
        raise TrainingError(f"label smoothing={smoothing} must be in [0, 1)")
    log_probs = F.log_softmax(logits.float(), dim=1)
    nll = -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


class LabelSmoothingCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothing_cross_entropy` (usable as a trainer ``criterion``)."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothing_cross_entropy(logits, target, self.smoothing)


class KDLoss(nn.Module):
    """``alpha * kd_loss + (1 - alpha) * hard-label loss``: the classic distillation objective."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, hard_loss: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise TrainingError(f"alpha={alpha} must be in [0, 1] (weight of the soft-target loss)")
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.hard_loss = hard_loss if hard_loss is not None else nn.CrossEntropyLoss()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        soft = kd_loss(student_logits, teacher_logits, self.temperature)
        out = {"kd_loss": soft}
        if target is not None and self.alpha < 1.0:
            hard = self.hard_loss(student_logits, target)
            out["ce_loss"] = hard
            out["total_loss"] = self.alpha * soft + (1.0 - self.alpha) * hard
        else:
            out["total_loss"] = soft
        return out


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """Map a student feature to the teacher's width: 1x1 conv for (N,C,H,W), linear on the last dim else."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) != len(t):
        raise TrainingError(f"cannot match a student feature of shape {s} to a teacher feature of shape {t}: "
                            "pick layers whose outputs have the same rank")
    if len(s) == 4:
        if s[2:] != t[2:]:
            raise TrainingError(f"student feature {s} and teacher feature {t} differ in spatial size; pick "
                                "layers at the same resolution (only the channel width may differ)")
        return nn.Conv2d(s[1], t[1], kernel_size=1, bias=False)
    if s[:-1] != t[:-1]:
        raise TrainingError(f"student feature {s} and teacher feature {t} differ in more than the last "
                            "dimension; only the width may differ")
    return nn.Linear(s[-1], t[-1], bias=False)


class FeatureReconstructionLoss(nn.Module):
    """Sum over matched layer pairs of ``MSE(adapter(student_feature), teacher_feature)``.

    ``pairs`` is a list of ``(student_module_name, teacher_module_name)``; adapters are created by
    :meth:`build` from example features, only where the widths differ.
    """

    def __init__(self, pairs: Sequence[Tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = [(str(s), str(t)) for s, t in pairs]
        self.adapters = nn.ModuleDict()

    @staticmethod
    def _key(student_name: str) -> str:
        return student_name.replace(".", "__") or "__root__"

    def build(self, student_features: Mapping[str, torch.Tensor], teacher_features: Mapping[str, torch.Tensor]) -> None:
        """Create adapters from one example forward of both networks."""
        for s_name, t_name in self.pairs:
            adapter = make_adapter(student_features[s_name].shape, teacher_features[t_name].shape)
            self.adapters[self._key(s_name)] = adapter

    def per_pair(self, student_features: Mapping[str, torch.Tensor],
                 teacher_features: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = {}
        for s_name, t_name in self.pairs:
            key = self._key(s_name)
            adapter = self.adapters[key] if key in self.adapters else nn.Identity()
            student = adapter(student_features[s_name].float())
            teacher = teacher_features[t_name].detach().float()
            if student.shape != teacher.shape:
                raise TrainingError(f"feature pair ({s_name!r}, {t_name!r}): shapes {tuple(student.shape)} vs "
                                    f"{tuple(teacher.shape)} after the adapter; rebuild the distiller")
            out[f"{s_name}->{t_name}"] = F.mse_loss(student, teacher)
        return out

    def forward(self, student_features: Mapping[str, torch.Tensor],
                teacher_features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        losses = self.per_pair(student_features, teacher_features)
        if not losses:
            return torch.zeros(())
        return torch.stack(list(losses.values())).sum()
