"""Small BN-ReLU CNNs and an MLP sized for CPU runs on 1-channel images.

Targets: sklearn digits (1x8x8), Fashion-MNIST (1x28x28) and side-by-side pairs (1x28x56).
The CNNs take any input of at least 8x8; cnn_large is the teacher, cnn_tiny the student.
``batch_norm=False`` drops BatchNorm (whose per-process statistics make multi-process CPU runs
differ from single-process ones; SyncBatchNorm needs CUDA).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from math import prod

import torch.nn.functional as F
from torch import Tensor, nn

from pcdistill.models.registry import register_model


class _PoolIfLarge(nn.Module):
    """2x2 max-pooling that stops once the short side drops below 6, so 8x8 inputs keep a 4x4 map."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 6 else x


class SmallCNN(nn.Module):
    """Stages of 3x3 conv-BN-ReLU separated by 2x2 max-pooling, a 2x2 adaptive pool, linear head."""

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int, in_channels: int = 1,
                 batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i, widths in enumerate(stages):
            if i:
                layers.append(_PoolIfLarge())
            for out_ch in widths:
                norm = nn.BatchNorm2d(out_ch) if batch_norm else nn.Identity()
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm), norm, nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # A 2x2 grid rather than global pooling keeps where things are, e.g. which digit of a pair is left.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class MLP(nn.Module):
    """Flatten, one hidden Linear-BN-ReLU layer, linear head; built for one fixed input shape."""

    def __init__(self, num_classes: int, in_channels: int, input_size: Sequence[int], hidden: int = 256):
        super().__init__()
        if not (
            isinstance(input_size, Sequence)
            and len(input_size) == 2
            and all(isinstance(s, numbers.Integral) and s >= 1 for s in input_size)
        ):
            raise ValueError(f"input_size must be (height, width) of positive ints, got {input_size!r}")
        self.input_shape = (in_channels, *(int(s) for s in input_size))
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prod(self.input_shape), hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"mlp was built for inputs of shape {self.input_shape} (in_channels, *input_size), "
                f"got {tuple(x.shape[1:])}; create it with a matching input_size"
            )
        return self.net(x)


@register_model("cnn_tiny")
def cnn_tiny(num_classes: int, in_channels: int = 1, batch_norm: bool = True) -> nn.Module:
    """Student-sized 3-conv CNN (16/32/64 channels), a LeNet-style baseline (LeCun et al., 1998)."""
    return SmallCNN([[16], [32], [64]], num_classes, in_channels, batch_norm)


@register_model("cnn_small")
def cnn_small(num_classes: int, in_channels: int = 1, batch_norm: bool = True) -> nn.Module:
    """Mid-sized 3-conv CNN (32/64/128 channels), a LeNet-style baseline (LeCun et al., 1998)."""
    return SmallCNN([[32], [64], [128]], num_classes, in_channels, batch_norm)


@register_model("cnn_large")
def cnn_large(num_classes: int, in_channels: int = 1, batch_norm: bool = True) -> nn.Module:
    """Teacher-sized 5-conv VGG-style CNN (32/64/128x2/256; Simonyan & Zisserman, ICLR 2015)."""
    return SmallCNN([[32], [64], [128, 128], [256]], num_classes, in_channels, batch_norm)


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 1, input_size: Sequence[int] = (8, 8)) -> nn.Module:
    """One-hidden-layer (256) perceptron for fixed-size inputs `input_size=(H, W)` (Rumelhart et al., 1986)."""
    return MLP(num_classes, in_channels, input_size)
