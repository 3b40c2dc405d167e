"""Seed import spelling: ``from amc.trainers.basedistiller import *`` (was ``trainer.basedistiller``)."""
import torch  # noqa: F401
import torch.nn as nn  # noqa: F401

from .base import BaseTrainer
from .distiller import BaseDistiller
from .losses import KDLoss, LabelSmoothingCrossEntropy, kd_loss

__all__ = ["BaseDistiller", "BaseTrainer", "KDLoss", "LabelSmoothingCrossEntropy", "kd_loss", "torch", "nn"]
