"""ShuffleNet V2 (Ma et al., ECCV 2018) for CIFAR as CRD's `ShuffleV2` (Tian et al., ICLR 2020).

Width 1x: stages of 116/232/464 channels, each a downsampling unit plus 3/7/3 basic
units, a 1x1 stem without pooling and a 1024-wide last 1x1 conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.cifar.shufflenetv1 import channel_shuffle
from pcdistill.models.registry import register_model


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicUnit(nn.Module):
    """Split channels in half; transform one half (1x1, depthwise 3x3, 1x1); concat and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = _conv_bn(half, half, 1)
        self.conv2 = _conv_bn(half, half, 3, groups=half)
        self.conv3 = _conv_bn(half, half, 1)

    def forward(self, x: Tensor) -> Tensor:
        keep, branch = x.chunk(2, dim=1)
        branch = F.relu(self.conv3(self.conv2(F.relu(self.conv1(branch)))))
        return channel_shuffle(torch.cat([keep, branch], dim=1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches (depthwise-then-1x1, and 1x1-depthwise-1x1), concatenated and shuffled."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(_conv_bn(in_ch, in_ch, 3, 2, groups=in_ch), _conv_bn(in_ch, mid, 1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(
            _conv_bn(in_ch, mid, 1), nn.ReLU(inplace=True),
            _conv_bn(mid, mid, 3, 2, groups=mid),
            _conv_bn(mid, mid, 1), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


class ShuffleNetV2(nn.Module):
    """1x1 stem to 24 channels, three stages, a 1x1 conv to `last` channels, linear head."""

    def __init__(self, widths: tuple[int, int, int], units: tuple[int, int, int], last: int,
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stage_sizes = tuple(1 + n for n in units)  # units per stage (downsampling one included)
        layers = [_conv_bn(in_channels, 24, 1), nn.ReLU(inplace=True)]
        in_ch = 24
        for out_ch, count in zip(widths, units):
            layers.append(DownUnit(in_ch, out_ch))
            layers += [BasicUnit(out_ch) for _ in range(count)]
            in_ch = out_ch
        layers += [_conv_bn(in_ch, last, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model("ShuffleV2")
def shufflev2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ShuffleNet V2 1x for CIFAR (Ma et al., ECCV 2018; CRD zoo, Tian et al., ICLR 2020)."""
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes, in_channels)
