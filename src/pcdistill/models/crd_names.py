"""Key names of the CRD / RepDistiller / mdistiller CIFAR zoo, mapped onto ours.

The standard CIFAR-100 teacher checkpoints (``<name>_vanilla/ckpt_epoch_240.pth``) hold the same
tensors as our networks, computed in the same order, under the names of that zoo's
``models/cifar/*.py`` (``conv1.weight`` where ours is ``stem.0.0.weight``). One function per
architecture family turns one of our module paths into theirs; :func:`crd_key_map` applies it to
every tensor of a model.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from pcdistill.models.cifar.mobilenetv2 import MobileNetV2
from pcdistill.models.cifar.resnet import CifarResNet
from pcdistill.models.cifar.resnetv2 import ResNet
from pcdistill.models.cifar.shufflenetv1 import ShuffleNetV1
from pcdistill.models.cifar.shufflenetv2 import ShuffleNetV2
from pcdistill.models.cifar.vgg import VGG
from pcdistill.models.cifar.wrn import WideResNet

# Inside one block: our sub-module path -> theirs.
_BASIC_BLOCK = {"conv1.0": "conv1", "conv1.1": "bn1", "conv2.0": "conv2", "conv2.1": "bn2"}
_RESNET_BLOCK = _BASIC_BLOCK | {"shortcut.0": "downsample.0", "shortcut.1": "downsample.1"}
_RESNETV2_BLOCK = _BASIC_BLOCK | {"conv3.0": "conv3", "conv3.1": "bn3", "shortcut.0": "shortcut.0",
                                  "shortcut.1": "shortcut.1"}
_WRN_BLOCK = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "shortcut": "convShortcut"}
_SHUFFLEV1_UNIT = _BASIC_BLOCK | {"conv3.0": "conv3", "conv3.1": "bn3"}
_SHUFFLEV2_UNIT = _SHUFFLEV1_UNIT | {  # a DownUnit's two branches are their DownBlock's conv1-2 and conv3-5
    "left.0.0": "conv1", "left.0.1": "bn1", "left.1.0": "conv2", "left.1.1": "bn2",
    "right.0.0": "conv3", "right.0.1": "bn3", "right.2.0": "conv4", "right.2.1": "bn4",
    "right.3.0": "conv5", "right.3.1": "bn5"}
_MOBILENET_BLOCK = {f"body.{i}": f"conv.{i}" for i in (0, 1, 3, 4, 6, 7)}


def _staged(path: str, top: dict[str, str], container: str, offset: int, sizes, template: str,
            block: dict[str, str]) -> str:
    """``top[path]``, or the block ``container.<offset + i>.<rest>`` renamed as ``template`` + ``block[rest]``.

    Our blocks sit in one flat sequence; theirs are grouped by stage: ``template`` receives the
    1-based ``stage``, the 0-based ``stage0`` and the position ``pos`` inside the stage.
    """
    if path in top:
        return top[path]
    match = re.fullmatch(rf"{re.escape(container)}\.(\d+)\.(.+)", path)
    if not match or match[2] not in block:
        raise KeyError(path)
    index = int(match[1]) - offset
    for stage0, size in enumerate(sizes):
        if 0 <= index < size:
            return f"{template.format(stage=stage0 + 1, stage0=stage0, pos=index)}.{block[match[2]]}"
        index -= size
    raise KeyError(path)


def _resnet(model: CifarResNet, path: str) -> str:
    return _staged(path, {"stem.0.0": "conv1", "stem.0.1": "bn1", "fc": "fc"},
                   "stages", 0, model.stage_sizes, "layer{stage}.{pos}", _RESNET_BLOCK)


def _resnetv2(model: ResNet, path: str) -> str:
    return _staged(path, {"stem.0.0": "conv1", "stem.0.1": "bn1", "fc": "linear"},
                   "stages", 0, model.stage_sizes, "layer{stage}.{pos}", _RESNETV2_BLOCK)


def _wrn(model: WideResNet, path: str) -> str:
    return _staged(path, {"stem": "conv1", "head.0": "bn1", "fc": "fc"},
                   "stages", 0, model.stage_sizes, "block{stage}.layer.{pos}", _WRN_BLOCK)


def _vgg(model: VGG, path: str) -> str:
    # Their blocks drop the last ReLU, so conv and BN indices inside a block agree with ours.
    same = {str(k): str(k) for k in range(max(len(b) for b in model.blocks))}
    return _staged(path, {"fc": "classifier"}, "blocks", 0, (1,) * len(model.blocks), "block{stage0}", same)


def _mobilenetv2(model: MobileNetV2, path: str) -> str:
    n = sum(model.stage_sizes)
    top = {"features.0": "conv1.0", "features.1": "conv1.1",  # features.2 is the stem's ReLU
           f"features.{3 + n}": "conv2.0", f"features.{4 + n}": "conv2.1", "fc": "classifier.0"}
    return _staged(path, top, "features", 3, model.stage_sizes, "blocks.{stage0}.{pos}", _MOBILENET_BLOCK)


def _shufflev1(model: ShuffleNetV1, path: str) -> str:
    return _staged(path, {"stem.0": "conv1", "stem.1": "bn1", "fc": "linear"},
                   "stages", 0, model.stage_sizes, "layer{stage}.{pos}", _SHUFFLEV1_UNIT)


def _shufflev2(model: ShuffleNetV2, path: str) -> str:
    last = 2 + sum(model.stage_sizes)  # features: stem conv-BN, ReLU, the units, last conv-BN, ReLU
    top = {"features.0.0": "conv1", "features.0.1": "bn1", f"features.{last}.0": "conv2",
           f"features.{last}.1": "bn2", "fc": "linear"}
    return _staged(path, top, "features", 2, model.stage_sizes, "layer{stage}.{pos}", _SHUFFLEV2_UNIT)


_FAMILIES: dict[type, Callable[[nn.Module, str], str]] = {
    CifarResNet: _resnet, ResNet: _resnetv2, WideResNet: _wrn, VGG: _vgg, MobileNetV2: _mobilenetv2,
    ShuffleNetV1: _shufflev1, ShuffleNetV2: _shufflev2,
}


def crd_key_map(model: nn.Module) -> dict[str, str] | None:
    """Their state-dict key -> ours for every tensor of ``model``; None when the zoo has no such family."""
    rename = _FAMILIES.get(type(model))
    if rename is None:
        return None
    mapping = {}
    for key in model.state_dict():
        path, _, leaf = key.rpartition(".")
        mapping[f"{rename(model, path)}.{leaf}"] = key
    return mapping
