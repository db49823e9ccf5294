"""torchvision ImageNet architectures, always randomly initialised (`weights=None`, no downloads)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from pcdistill.models.registry import register_model


def _build(builder_name: str, num_classes: int, in_channels: int) -> nn.Module:
    # torchvision takes ~1.5 s to import, so only pay for it when such a model is built.
    from torchvision import models

    builder: Callable[..., nn.Module] = getattr(models, builder_name)
    model = builder(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for a freshly initialised one reading `in_channels` channels."""
    path, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, bias=old.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


@register_model("tv_resnet18")
def tv_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 for ImageNet-size inputs (He et al., CVPR 2016)."""
    return _build("resnet18", num_classes, in_channels)


@register_model("tv_resnet34")
def tv_resnet34(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-34 for ImageNet-size inputs (He et al., CVPR 2016)."""
    return _build("resnet34", num_classes, in_channels)


@register_model("tv_resnet50")
def tv_resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 for ImageNet-size inputs (He et al., CVPR 2016)."""
    return _build("resnet50", num_classes, in_channels)


@register_model("tv_mobilenet_v2")
def tv_mobilenet_v2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV2 for ImageNet-size inputs (Sandler et al., CVPR 2018)."""
    return _build("mobilenet_v2", num_classes, in_channels)


@register_model("tv_mobilenet_v3_small")
def tv_mobilenet_v3_small(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV3-Small for ImageNet-size inputs (Howard et al., ICCV 2019)."""
    return _build("mobilenet_v3_small", num_classes, in_channels)


@register_model("tv_mobilenet_v3_large")
def tv_mobilenet_v3_large(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV3-Large for ImageNet-size inputs (Howard et al., ICCV 2019)."""
    return _build("mobilenet_v3_large", num_classes, in_channels)
