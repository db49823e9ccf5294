"""Model zoo: CIFAR (CRD) networks, torchvision ImageNet networks and small CPU-scale nets.

    from pcdistill.models import create, list_models
    model = create("resnet8x4", num_classes=100)
    teacher = create("resnet32x4", num_classes=100, weights="resnet32x4_vanilla/ckpt_epoch_240.pth")
    vit = create("timm/deit_tiny_patch16_224", num_classes=100)     # any timm model (extra `timm`)

Every model maps images to logits of shape (B, num_classes). `weights=` takes a safetensors file or
a torch checkpoint (see `pcdistill.models.weights`); CIFAR networks also read the CRD/mdistiller
zoo's key names.
"""
from pcdistill.models.registry import create, list_models, register_model
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

__all__ = ["create", "list_models", "list_timm_models", "load_weights", "read_state_dict", "register_model"]
