"""ShuffleNet V1 (Zhang et al., CVPR 2018) for CIFAR as CRD's `ShuffleV1` (Tian et al., ICLR 2020).

Groups 3, stage widths 240/480/960 with 4/8/4 units, a 1x1 stem and no stem pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of `groups` groups so the next grouped conv mixes them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add (stride 1) or concat avg-pooled input (stride 2)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        # Downsampling units concatenate the pooled input, so the branch only adds the rest.
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        mid = branch_out // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, mid, 1, groups=first_groups, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        )
        self.conv3 = nn.Sequential(nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False), nn.BatchNorm2d(branch_out))

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.conv1(x)), self.first_groups)
        out = self.conv3(F.relu(self.conv2(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """1x1 conv stem to 24 channels, three shuffle stages (each opening with stride 2), linear head."""

    def __init__(self, widths: tuple[int, int, int], units: tuple[int, int, int], groups: int,
                 num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stage_sizes = tuple(units)  # units per stage, for other zoos' key names
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        layers, in_ch = [], 24
        for out_ch, count in zip(widths, units):
            for i in range(count):
                # The first unit sees only 24 channels, too few to split into groups.
                first_groups = 1 if in_ch == 24 else groups
                layers.append(ShuffleUnit(in_ch, out_ch, 2 if i == 0 else 1, groups, first_groups))
                in_ch = out_ch
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register_model("ShuffleV1")
def shufflev1(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ShuffleNet V1 g=3 for CIFAR (Zhang et al., CVPR 2018; CRD zoo, Tian et al., ICLR 2020)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)
