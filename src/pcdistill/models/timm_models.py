"""timm models by name: ``timm/<name>`` for any ``timm.list_models()`` entry (optional extra ``timm``).

    create("timm/deit_tiny_patch16_224", num_classes=100)                  # random initialisation
    create("timm/resnet50", num_classes=1000, pretrained=True)             # timm downloads its weights
    create("timm/resnet50", num_classes=100, weights="teacher.pth")        # weights from a file

Options are passed to ``timm.create_model`` (``pretrained``, ``drop_rate``, ``img_size``, ...);
``in_channels`` becomes timm's ``in_chans``.
"""
from __future__ import annotations

from torch import nn

from pcdistill.registry import closest

PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the timm package: pip install 'pcdistill[timm]'") from None
    return timm


def list_timm_models(pattern: str = "*") -> list[str]:
    """``timm/<name>`` for every architecture timm knows (matching ``pattern``), sorted."""
    return [PREFIX + name for name in _timm().list_models(pattern)]


def pretrained_num_classes(name: str) -> int | None:
    """The class count of timm's default pretrained weights for ``timm/<arch>`` (no download)."""
    cfg = _timm().models.get_pretrained_cfg(name[len(PREFIX):])
    return cfg.num_classes if cfg else None


def create_timm(name: str, num_classes: int, in_channels: int | None = None, pretrained: bool = False,
                **options) -> nn.Module:
    """``timm.create_model`` for ``timm/<arch>``; ``pretrained=True`` downloads timm's weights."""
    timm = _timm()
    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}{closest(arch, timm.list_models())}; "
                         f"`pcdistill list timm` shows every name")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be true or false, got {pretrained!r}")
    if in_channels is not None:
        options["in_chans"] = in_channels
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **options)
