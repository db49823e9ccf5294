"""CIFAR (3x32x32) networks of the CRD benchmark (Tian et al., ICLR 2020), logits only.

The submodules register themselves when `pcdistill.models` imports them; this package
itself only holds what they share.
"""
from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions and identity BatchNorm, as in the CRD zoo."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
