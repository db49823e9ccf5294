"""Wide ResNets (Zagoruyko & Komodakis, BMVC 2016) for CIFAR as used in CRD (Tian et al., ICLR 2020).

WRN-d-k: pre-activation basic blocks, (d - 4) / 6 per stage, stage widths 16k/32k/64k.
"""
from __future__ import annotations

from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 conv on the pre-activated input when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        same_shape = stride == 1 and in_ch == out_ch
        self.shortcut = None if same_shape else nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        # The original WRN keeps the raw input on identity paths but projects the activated one.
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """3x3 stem, three pre-activation stages (strides 1, 2, 2), BN-ReLU, pooling, linear head."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.stage_sizes = (blocks_per_stage,) * 3  # blocks per stage, for other zoos' key names
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages, in_ch = [], 16
        for out_ch, stride in zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2)):
            for i in range(blocks_per_stage):
                stages.append(PreActBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.flatten(1))


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int, in_channels: int = 3) -> nn.Module:
    """WRN-16-1 (Zagoruyko & Komodakis, BMVC 2016; CRD zoo)."""
    return WideResNet(16, 1, num_classes, in_channels)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """WRN-16-2 (Zagoruyko & Komodakis, BMVC 2016; CRD zoo)."""
    return WideResNet(16, 2, num_classes, in_channels)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int, in_channels: int = 3) -> nn.Module:
    """WRN-40-1 (Zagoruyko & Komodakis, BMVC 2016; CRD zoo)."""
    return WideResNet(40, 1, num_classes, in_channels)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """WRN-40-2 (Zagoruyko & Komodakis, BMVC 2016; CRD zoo)."""
    return WideResNet(40, 2, num_classes, in_channels)
