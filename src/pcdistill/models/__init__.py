"""Model zoo: CIFAR (CRD) networks, torchvision ImageNet networks and small CPU-scale nets.

    from pcdistill.models import create, list_models
    model = create("resnet8x4", num_classes=100)

Every model maps images to logits of shape (B, num_classes).
"""
from pcdistill.models.registry import create, list_models, register_model

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

__all__ = ["create", "list_models", "register_model"]
