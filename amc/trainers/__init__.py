"""amc.trainers: train or distil any nn.Module (they know nothing of the graph), plus pruning plug-ins.

``BaseTrainer`` keeps the seed's hook names (``__get_train_losses__``, ``__run__``, ...) as aliases of
the Pythonic ones; ``BaseDistiller`` distils a teacher into a compressed student; ``SoftFilterPruning``
and ``RePr`` are callbacks.
"""
from .base import BaseTrainer
from .batchnorm import recalibrate_bn
from .distiller import BaseDistiller, DistillPreds, FeatureCapture
from .losses import (FeatureReconstructionLoss, KDLoss, LabelSmoothingCrossEntropy, kd_loss,
                     label_smoothing_cross_entropy, make_adapter)
from .plugins import RePr, SoftFilterPruning, TrainerCallback, orthogonality_scores

__all__ = [
    "BaseTrainer", "BaseDistiller", "DistillPreds", "FeatureCapture",
    "TrainerCallback", "SoftFilterPruning", "RePr", "orthogonality_scores",
    "kd_loss", "KDLoss", "label_smoothing_cross_entropy", "LabelSmoothingCrossEntropy",
    "FeatureReconstructionLoss", "make_adapter", "recalibrate_bn",
]
