"""Faster R-CNN detectors with FPN backbones, randomly initialised (`weights=None`, no downloads).

Faster R-CNN: Ren, He, Girshick, Sun, "Faster R-CNN: Towards Real-Time Object Detection with
Region Proposal Networks", NeurIPS 2015. FPN: Lin, Dollar, Girshick, He, Hariharan, Belongie,
"Feature Pyramid Networks for Object Detection", CVPR 2017.

    model = create_detector("fasterrcnn_resnet18_fpn", num_classes=C + 1,
                            min_size=128, max_size=128, anchor_sizes=(8, 16, 32, 64, 128))

`num_classes` counts the background (label 0), so a dataset with C object classes needs C + 1.
The models are torchvision `FasterRCNN` instances: in train mode `model(images, targets)` returns
the loss dict, in eval mode `model(images)` the detections. Backbones use `nn.BatchNorm2d` (there
are no pretrained statistics to freeze) and every backbone layer is trainable by default.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pcdistill.registry import Registry, closest

DetectorFactory = Callable[..., FasterRCNN]

DETECTORS: Registry[DetectorFactory] = Registry("detector")

ASPECT_RATIOS = (0.5, 1.0, 2.0)

# Options forwarded to torchvision's FasterRCNN unchanged; the other options are handled here.
_PASSTHROUGH = (
    "min_size",
    "max_size",
    "box_batch_size_per_image",
    "box_positive_fraction",
    "box_score_thresh",
    "box_detections_per_img",
    "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
)
OPTIONS = _PASSTHROUGH + ("trainable_backbone_layers", "anchor_sizes", "fpn_channels", "box_head_size")


def _box_head(num_classes: int, channels: int, size: int) -> dict:
    """torchvision's two-layer box head and predictor, sized ``size`` (its default is 1024)."""
    return {"box_head": TwoMLPHead(channels * 7 * 7, size), "box_predictor": FastRCNNPredictor(size, num_classes)}


def _resnet_fpn(backbone_name: str):
    """Factory of a ResNet-FPN Faster R-CNN: 5 pyramid levels (P2-P6), one anchor size per level."""

    def build(num_classes: int, *, trainable_backbone_layers: int = 5, anchor_sizes=(32, 64, 128, 256, 512),
              fpn_channels: int = 256, box_head_size: int = 1024, **kwargs) -> FasterRCNN:
        body = getattr(resnet, backbone_name)(weights=None, norm_layer=nn.BatchNorm2d)
        if not 0 <= trainable_backbone_layers <= 5:
            raise ValueError(f"trainable_backbone_layers must lie in [0, 5]; got {trainable_backbone_layers}")
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
        if trainable_backbone_layers == 5:
            trainable.append("bn1")
        for name, param in body.named_parameters():
            param.requires_grad_(any(name.startswith(layer) for layer in trainable))
        top = body.inplanes  # channels of layer4's output: 512 (basic blocks) or 2048 (bottlenecks)
        backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                                   [top // 8, top // 4, top // 2, top], fpn_channels, extra_blocks=LastLevelMaxPool())
        sizes = tuple(int(s) for s in anchor_sizes)
        if len(sizes) != 5:
            raise ValueError(f"anchor_sizes of {backbone_name}-FPN must give one size per pyramid level "
                             f"(5: P2..P6); got {anchor_sizes!r}")
        anchors = AnchorGenerator(tuple((s,) for s in sizes), (ASPECT_RATIOS,) * len(sizes))
        return FasterRCNN(backbone, None, rpn_anchor_generator=anchors,
                          **_box_head(num_classes, fpn_channels, box_head_size), **kwargs)

    build.__doc__ = f"Faster R-CNN with a {backbone_name}-FPN backbone (He et al., CVPR 2016; Lin et al., 2017)."
    return build


def _mobilenet_v3_fpn(num_classes: int, *, trainable_backbone_layers: int = 6,
                      anchor_sizes=(32, 64, 128, 256, 512), fpn_channels: int = 256, box_head_size: int = 1024,
                      **kwargs) -> FasterRCNN:
    """Faster R-CNN with a MobileNetV3-Large FPN backbone (Howard et al., ICCV 2019): 3 pyramid
    levels (the last two stages and a max-pooled one), every anchor size on every level."""
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  norm_layer=nn.BatchNorm2d, trainable_layers=trainable_backbone_layers)
    if fpn_channels != backbone.out_channels:
        raise ValueError(f"the MobileNetV3 FPN has {backbone.out_channels} channels; fpn_channels cannot change it")
    sizes = tuple(int(s) for s in anchor_sizes)
    anchors = AnchorGenerator((sizes,) * 3, (ASPECT_RATIOS,) * 3)
    return FasterRCNN(backbone, None, rpn_anchor_generator=anchors,
                      **_box_head(num_classes, fpn_channels, box_head_size), **kwargs)


for _depth in (18, 50, 101):
    DETECTORS.register(f"fasterrcnn_resnet{_depth}_fpn")(_resnet_fpn(f"resnet{_depth}"))
DETECTORS.register("fasterrcnn_mobilenet_v3_fpn")(_mobilenet_v3_fpn)


def list_detectors() -> list[str]:
    """Names of the registered detectors, sorted."""
    return DETECTORS.names()


def create_detector(name: str, num_classes: int, **options) -> FasterRCNN:
    """Build detector `name` with `num_classes` outputs, background included (C + 1).

    Options (all optional):

    * `min_size` (int, or tuple of ints drawn at random per training batch for multi-scale
      training; evaluation uses the last), `max_size` (int): torchvision's resizing of the
      shorter / longer image side (defaults 800 / 1333);
    * `box_batch_size_per_image` (512) and `box_positive_fraction` (0.25): RoI sampling of the
      box head;
    * `trainable_backbone_layers`: backbone stages left trainable, counted from the top; default
      all (5 for ResNet, 6 for MobileNetV3);
    * `anchor_sizes`: anchor side lengths in pixels of the resized image; for ResNet-FPN one per
      pyramid level P2..P6 (default (32, 64, 128, 256, 512); (8, 16, 32, 64, 128) suits 128-pixel
      images), for MobileNetV3-FPN all of them on each of its 3 levels;
    * `fpn_channels` (256, ResNet only) and `box_head_size` (1024): widths of the FPN and of the
      two-layer box head; on small CPU-scale images smaller ones cut most of the cost;
    * `box_score_thresh` (0.05), `box_detections_per_img` (100), `rpn_pre_nms_top_n_train`,
      `rpn_post_nms_top_n_train` (2000 each), `rpn_pre_nms_top_n_test`, `rpn_post_nms_top_n_test`
      (1000 each): passed to torchvision's `FasterRCNN`.

    An unknown option is a TypeError naming it.
    """
    factory = DETECTORS.get(name)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        hint = closest(unknown[0], OPTIONS)
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for detector {name!r}{hint}; "
                        f"its options are: {', '.join(OPTIONS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an int >= 2; got {num_classes!r}")
    return factory(num_classes, **options)


def detector_num_classes(model: FasterRCNN) -> int:
    """Classes of a Faster R-CNN box predictor, background included."""
    return int(model.roi_heads.box_predictor.cls_score.out_features)
