"""VGG with BatchNorm (Simonyan & Zisserman, ICLR 2015) for CIFAR as used in CRD (Tian et al., ICLR 2020).

Five blocks of 3x3 conv-BN-ReLU layers; 2x2 max-pooling after the first three blocks
(and the fourth while the map is larger than 4x4), then global pooling and one linear layer.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pcdistill.models.cifar import init_weights
from pcdistill.models.registry import register_model

# Conv widths of the five blocks.
_CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    """VGG-BN over 32x32 inputs (stride 8 before the last two blocks)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks, in_ch = [], in_channels
        for widths in _CONFIGS[depth]:
            layers = []
            for out_ch in widths:
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
                in_ch = out_ch
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            # CRD pools after block 4 only for 64x64 inputs, leaving 32x32 ones at 4x4.
            if i < 3 or (i == 3 and x.shape[-1] > 4):
                x = F.max_pool2d(x, 2)
        return self.fc(self.pool(x).flatten(1))


@register_model("vgg8")
def vgg8(num_classes: int, in_channels: int = 3) -> nn.Module:
    """VGG-8 with BN, one conv per block (CRD, Tian et al., ICLR 2020)."""
    return VGG(8, num_classes, in_channels)


@register_model("vgg11")
def vgg11(num_classes: int, in_channels: int = 3) -> nn.Module:
    """VGG-11 with BN (Simonyan & Zisserman, ICLR 2015; CRD zoo)."""
    return VGG(11, num_classes, in_channels)


@register_model("vgg13")
def vgg13(num_classes: int, in_channels: int = 3) -> nn.Module:
    """VGG-13 with BN (Simonyan & Zisserman, ICLR 2015; CRD zoo)."""
    return VGG(13, num_classes, in_channels)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BN (Simonyan & Zisserman, ICLR 2015; CRD zoo)."""
    return VGG(16, num_classes, in_channels)


@register_model("vgg19")
def vgg19(num_classes: int, in_channels: int = 3) -> nn.Module:
    """VGG-19 with BN (Simonyan & Zisserman, ICLR 2015; CRD zoo)."""
    return VGG(19, num_classes, in_channels)
