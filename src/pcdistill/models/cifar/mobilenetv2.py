"""MobileNetV2 (Sandler et al., CVPR 2018) for CIFAR as CRD's `mobile_half` (Tian et al., ICLR 2020).

Width multiplier 0.5 and expansion 6, a stride-2 stem and a 1280-wide last 1x1 conv,
so a 32x32 input ends on a 2x2 map.
"""
from __future__ import annotations

from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model

# (channels, blocks, first stride) of the stages after the first, expansion-1 one.
_STAGES = ((24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        # CRD keeps the expansion conv even for expansion 1 (unlike the paper).
        self.body = nn.Sequential(
            *_conv_bn_relu(in_ch, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier and expansion factor, in CRD's CIFAR layout."""

    def __init__(self, width: float, expansion: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        in_ch = int(32 * width)
        layers = _conv_bn_relu(in_channels, in_ch, 3, stride=2)
        stages = [(1, 16, 1, 1)] + [(expansion, *stage) for stage in _STAGES]
        self.stage_sizes = tuple(blocks for _, _, blocks, _ in stages)  # for other zoos' key names
        for t, channels, blocks, stride in stages:
            out_ch = int(channels * width)
            for i in range(blocks):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, t))
                in_ch = out_ch
        layers += _conv_bn_relu(in_ch, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 x0.5 for CIFAR, CRD's `mobile_half` (Sandler et al., CVPR 2018; Tian et al., ICLR 2020)."""
    return MobileNetV2(0.5, 6, num_classes, in_channels)
