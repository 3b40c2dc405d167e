"""Small, plain-``nn.Module`` networks for the main job, tests and benchmarks.

Only Conv2d / BatchNorm2d / ReLU / MaxPool2d / AdaptiveAvgPool2d / flatten / Linear and residual
``+``: exactly the ops graph capture and channel pruning must handle, so the zoo exercises coupled
channels (residual adds), consumed channels (flatten into Linear) and 1x1 shortcut convs.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._registry import register_model


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut ("option B") whenever shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """Stem conv, stages of BasicBlocks, global average pool, flatten, Linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        blocks_per_stage: Union[int, Sequence[int]],
        strides: Sequence[int],
        stem_stride: int = 1,
        stem_pool: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(blocks_per_stage, int):
            blocks_per_stage = [blocks_per_stage] * len(widths)
        stem: List[nn.Module] = [*_conv_bn(in_channels, widths[0], 3, stem_stride), nn.ReLU(inplace=False)]
        if stem_pool:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        stages, cin = [], widths[0]
        for width, n, stride in zip(widths, blocks_per_stage, strides):
            blocks = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGGSmall(nn.Module):
    """conv-bn-relu stacks with max-pools, then flatten straight into a two-layer MLP classifier."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        cfg: Sequence[Union[int, str]],
        image_size: int,
        hidden: int,
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        cin, side = in_channels, int(image_size)
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
            else:
                layers += [*_conv_bn(cin, int(item)), nn.ReLU(inplace=False)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _init_weights(model: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming fan-out convs, unit BN, small-normal Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_model("digits_resnet", input_size=(1, 8, 8))
def digits_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32, image_size: int = 8) -> nn.Module:
    """Two-stage ResNet for 8x8 digits: ~77k params at width 32.

    For digits resized to 16 or 32, pass ``image_size`` so the stem brings the map back to 8x8
    (stride-2 conv, plus a max-pool at 32): same accuracy, without 4-16x the compute on 2 cores.
    """
    factor = max(1, int(image_size) // 8)
    return SmallResNet(
        num_classes, in_channels, widths=(width, 2 * width), blocks_per_stage=1, strides=(1, 2),
        stem_stride=2 if factor >= 2 else 1, stem_pool=factor >= 4,
    )


@register_model("vgg_small", input_size=(1, 28, 28))
def vgg_small(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    cfg: Tuple[Union[int, str], ...] = (32, 32, "M", 64, 64, "M", 128, "M"),
    hidden: int = 128,
) -> nn.Module:
    """VGG-style net for 28x28 Fashion-MNIST: 5 conv-bn-relu, 3 max-pools, flatten, Linear-ReLU-Linear."""
    return VGGSmall(num_classes, in_channels, cfg, image_size, hidden)


@register_model("resnet20", input_size=(1, 28, 28))
def resnet20(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """CIFAR ResNet-20 (3 stages x 3 BasicBlocks, 16/32/64) with 1x1-conv shortcuts; 1-channel 28x28 by default."""
    return SmallResNet(num_classes, in_channels, widths=(16, 32, 64), blocks_per_stage=3, strides=(1, 2, 2))
