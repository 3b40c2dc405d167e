"""amc.models: a small registry of plain-PyTorch networks plus a minimal train/evaluate helper.

``create("digits_resnet")`` builds a model by name; ``list_models()`` is what zoo tests iterate.
"""
from ._registry import (ModelArgumentError, ModelEntry, UnknownModelError, create, list_models, model_info,
                        register_model)
from .training import evaluate, train_classifier
from .vit import SmallViT, vit_digits, vit_fashion
from .zoo import BasicBlock, SmallResNet, VGGSmall, digits_resnet, resnet20, vgg_small

__all__ = [
    "BasicBlock",
    "ModelArgumentError",
    "ModelEntry",
    "SmallResNet",
    "SmallViT",
    "UnknownModelError",
    "VGGSmall",
    "create",
    "digits_resnet",
    "evaluate",
    "list_models",
    "model_info",
    "register_model",
    "resnet20",
    "train_classifier",
    "vgg_small",
    "vit_digits",
    "vit_fashion",
]
