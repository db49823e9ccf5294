"""Model zoo: CIFAR (CRD) networks, torchvision ImageNet networks and small CPU-scale nets.

    from pcdistill.models import create, list_models
    model = create("resnet8x4", num_classes=100)
    teacher = create("resnet32x4", num_classes=100, weights="resnet32x4_vanilla/ckpt_epoch_240.pth")
    vit = create("timm/deit_tiny_patch16_224", num_classes=100)     # any timm model (extra `timm`)

Every model maps images to logits of shape (B, num_classes). `weights=` takes a safetensors file or
a torch checkpoint (see `pcdistill.models.weights`); CIFAR networks also read the CRD/mdistiller
zoo's key names.
"""
from pathlib import Path

from torch import nn

from pcdistill.models.registry import build, list_models, register_model
from pcdistill.models.timm_models import list_timm_models
from pcdistill.models.weights import load_weights, read_state_dict

# Imported for their registrations.
from pcdistill.models import small, torchvision_models  # noqa: F401
from pcdistill.models.cifar import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)



def create(name: str, num_classes: int, in_channels: int | None = None, weights: str | Path | None = None,
           **kwargs) -> nn.Module:
    """Build model `name` with `num_classes` logits; `in_channels=None` keeps its natural default.

    `name` is a registered model or `timm/<any timm model>`; `weights` is a file for
    :func:`pcdistill.models.weights.load_weights` (safetensors or a torch checkpoint), loaded strictly.
    """
    model = build(name, num_classes, in_channels, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


__all__ = ["create", "list_models", "list_timm_models", "load_weights", "read_state_dict", "register_model"]
