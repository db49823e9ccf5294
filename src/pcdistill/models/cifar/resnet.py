"""CIFAR ResNets (He et al., CVPR 2016) as configured in CRD (Tian et al., ICLR 2020).

Three stages of basic blocks at 32/16/8 pixels with (depth - 2) / 6 blocks each; the
"x4" variants widen the stem to 32 and the stages to 64/128/256.
"""
from __future__ import annotations

from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model

_WIDTHS = (16, 16, 32, 64)
_WIDTHS_X4 = (32, 64, 128, 256)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = _conv_bn(out_ch, out_ch, 3)
        self.relu = nn.ReLU(inplace=True)
        same_shape = stride == 1 and in_ch == out_ch
        self.shortcut = nn.Identity() if same_shape else _conv_bn(in_ch, out_ch, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three basic-block stages (strides 1, 2, 2), global pooling and a linear head."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stage_sizes = (blocks_per_stage,) * 3  # blocks per stage, for other zoos' key names
        self.stem = nn.Sequential(_conv_bn(in_channels, widths[0], 3), nn.ReLU(inplace=True))
        stages, in_ch = [], widths[0]
        for out_ch, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(x.flatten(1))


@register_model("resnet8")
def resnet8(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-8 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(8, _WIDTHS, num_classes, in_channels)


@register_model("resnet14")
def resnet14(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-14 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(14, _WIDTHS, num_classes, in_channels)


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-20 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(20, _WIDTHS, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-32 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(32, _WIDTHS, num_classes, in_channels)


@register_model("resnet44")
def resnet44(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-44 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(44, _WIDTHS, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-56 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(56, _WIDTHS, num_classes, in_channels)


@register_model("resnet110")
def resnet110(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-110 for CIFAR (He et al., CVPR 2016; CRD zoo)."""
    return CifarResNet(110, _WIDTHS, num_classes, in_channels)


@register_model("resnet8x4")
def resnet8x4(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-8 with 4x wider stages, the usual CIFAR student (CRD, Tian et al., ICLR 2020)."""
    return CifarResNet(8, _WIDTHS_X4, num_classes, in_channels)


@register_model("resnet32x4")
def resnet32x4(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-32 with 4x wider stages, the usual CIFAR teacher (CRD, Tian et al., ICLR 2020)."""
    return CifarResNet(32, _WIDTHS_X4, num_classes, in_channels)
