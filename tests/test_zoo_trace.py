"""Golden equality over model zoos: traced network == eager at batch 2 (traced) and 3, and lint() holds.

The default run covers a representative torchvision subset (one of each architecture family), one
segmentation model with a dict output and three timm models; `--runslow` adds heavier ones. The full
zoo is swept by scripts/sweep_trace.py (one subprocess per model) with its table in scripts/results/.
Inputs are as small as each model allows to keep the file fast; ViT/Swin/MaxViT need 224.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

# name -> (input size, per-test timeout s)
TORCHVISION = {
    "resnet18": (64, 60),
    "mobilenet_v3_small": (64, 60),
    "densenet121": (64, 90),
    "inception_v3": (299, 120),
    "googlenet": (64, 60),
    "shufflenet_v2_x1_0": (64, 60),
    "squeezenet1_0": (64, 60),
    "efficientnet_b0": (64, 60),
    "regnet_x_400mf": (64, 60),
    "convnext_tiny": (64, 90),
    "swin_t": (224, 120),
    "vit_b_16": (224, 120),
    "maxvit_t": (224, 120),
}
TORCHVISION_SLOW = {
    "resnext50_32x4d": (128, 180),
    "wide_resnet50_2": (128, 180),
    "efficientnet_v2_s": (128, 180),
    "mnasnet1_0": (128, 120),
    "regnet_y_1_6gf": (128, 180),
    "swin_v2_t": (256, 300),
    "vgg11_bn": (64, 180),
    "vit_b_32": (224, 180),
}
SEGMENTATION = {"lraspp_mobilenet_v3_large": (128, 90)}
SEGMENTATION_SLOW = {"fcn_resnet50": (224, 300), "deeplabv3_mobilenet_v3_large": (224, 300)}
TIMM = {"resnet18": (64, 60), "vit_tiny_patch16_224": (224, 90), "efficientnet_b0": (64, 60)}
TIMM_SLOW = {"convnext_atto": (64, 120), "mobilenetv3_small_100": (64, 120),
             "swin_tiny_patch4_window7_224": (224, 300)}

# Ops that the representative models are known to capture through the generic replay node. A model
# that gains (or loses) a fallback is noticed here.
EXPECTED_FALLBACKS: dict = {}  # swin_t's Tensor.ne and maxvit_t's torch.swapaxes are registered now


def _params(table: dict, slow: bool = False) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(name, size, marks=[*marks, pytest.mark.timeout(t)], id=name)
            for name, (size, t) in table.items()]


def _check(check_trace, model, size: int, key: str):
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = check_trace(model, lambda b: torch.randn(b, 3, size, size), trace_batch=2, other_batches=(3,))
    assert net.fallback_ops == EXPECTED_FALLBACKS.get(key, {})
    assert len(net.layer_nodes) > 10
    return net


@pytest.mark.parametrize("name,size", _params(TORCHVISION) + _params(TORCHVISION_SLOW, slow=True))
def test_torchvision_classification(check_trace, name, size):
    model = torchvision.models.get_model(name, weights=None)
    net = _check(check_trace, model, size, f"tv:{name}")
    n_model = sum(p.numel() for p in model.parameters())
    n_net = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    if name not in ("inception_v3", "googlenet"):  # their aux heads are unused in eval mode
        assert n_net == n_model


@pytest.mark.parametrize("name,size", _params(SEGMENTATION) + _params(SEGMENTATION_SLOW, slow=True))
def test_torchvision_segmentation_dict_output(check_trace, name, size):
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    net = _check(check_trace, model, size, f"tv_seg:{name}")
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size))
    assert isinstance(out, dict) and "out" in out and out["out"].shape[-2:] == (size, size)


@pytest.mark.parametrize("name,size", _params(TIMM) + _params(TIMM_SLOW, slow=True))
def test_timm(check_trace, name, size):
    import timm
    model = timm.create_model(name, pretrained=False)
    _check(check_trace, model, size, f"timm:{name}")
