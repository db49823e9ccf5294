"""ResNet-18/34/50 (He et al., CVPR 2016) for 32x32 inputs, CRD's `resnetv2` (Tian et al., ICLR 2020).

The ImageNet stage layout (64/128/256/512 wide, strides 1/2/2/2) behind a 3x3 stride-1
stem without max-pooling. Post-activation blocks despite the module name.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 and in_ch == out_ch else _conv_bn(in_ch, out_ch, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_ch, planes, 3, stride)
        self.conv2 = _conv_bn(planes, planes, 3)
        self.shortcut = _shortcut(in_ch, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_ch, planes, 1)
        self.conv2 = _conv_bn(planes, planes, 3, stride)
        self.conv3 = _conv_bn(planes, planes * 4, 1)
        self.shortcut = _shortcut(in_ch, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(out) + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem, four stages of `block` (strides 1, 2, 2, 2), global pooling, linear head."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stage_sizes = tuple(blocks)  # blocks per stage, for other zoos' key names
        self.stem = nn.Sequential(_conv_bn(in_channels, 64, 3), nn.ReLU(inplace=True))
        layers, in_ch = [], 64
        for planes, count, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
            for i in range(count):
                layers.append(block(in_ch, planes, stride if i == 0 else 1))
                in_ch = planes * block.expansion
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register_model("ResNet18")
def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 inputs (He et al., CVPR 2016; CRD zoo)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("ResNet34")
def resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-34 for 32x32 inputs (He et al., CVPR 2016; CRD zoo)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


@register_model("ResNet50")
def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-50 for 32x32 inputs (He et al., CVPR 2016; CRD zoo)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
