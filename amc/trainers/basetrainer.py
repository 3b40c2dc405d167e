"""Seed import spelling: ``from amc.trainers.basetrainer import *`` (was ``trainer.basetrainer``)."""
import os  # noqa: F401  (the seed's scripts use these names after the star import)

import torch  # noqa: F401
import torch.nn as nn  # noqa: F401
from tensorboardX import SummaryWriter  # noqa: F401

from .base import BaseTrainer

__all__ = ["BaseTrainer", "torch", "nn", "os", "SummaryWriter"]
