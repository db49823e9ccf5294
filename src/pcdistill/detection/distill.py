"""Logit distillation on the RoI classification head of Faster R-CNN, following the detection recipe
of DKD (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022).

One training step of `RoIDistiller`:

1. the student's transform batches the images; its backbone and RPN give proposals and the RPN
   losses (Faster R-CNN, Ren et al., 2015; FPN, Lin et al., 2017);
2. the student's RoI heads sample `box_batch_size_per_image` proposals per image (25% positive by
   default, ground-truth boxes included) with their matched labels, background 0 included;
3. the student pools them on its FPN features and its box head and predictor give class logits
   (N, C + 1) and box regressions; torchvision's `fastrcnn_loss` gives `loss_classifier` and
   `loss_box_reg`;
4. the frozen teacher (eval mode, no grad) runs its backbone on the SAME transformed image batch and
   pools the SAME proposals, in the same order, on its own features, so row i of both logit tensors
   describes the same box;
5. `distill = alpha * min(epoch / warmup_epochs, 1) * loss(student_logits, teacher_logits)` over
   the sampled proposals, background rows included.

Only public torchvision submodules are composed (`transform`, `backbone`, `rpn`,
`roi_heads.select_training_samples`, `box_roi_pool`, `box_head`, `box_predictor`); no torchvision
code is patched.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss

from pcdistill.detection.models import detector_num_classes
from pcdistill.distiller import DistillerBase
from pcdistill.losses import call_loss

_TRANSFORM_SETTINGS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size")


class RoIOutputs(NamedTuple):
    """Everything one RoI pass produces. Proposals and per-image tensors are lists (one entry per
    image); logits, boxes and labels are concatenated over images in proposal order."""

    proposals: list[torch.Tensor]  # (n_i, 4) xyxy in the transformed image's coordinates
    labels: torch.Tensor  # int64 (N,), 0 = background
    regression_targets: list[torch.Tensor]  # (n_i, 4) box-coder encoded
    student_logits: torch.Tensor  # (N, C + 1)
    student_boxes: torch.Tensor  # (N, 4 * (C + 1))
    teacher_logits: torch.Tensor | None
    teacher_boxes: torch.Tensor | None
    rpn_losses: dict[str, torch.Tensor]


def _features(model: FasterRCNN, batch: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    features = model.backbone(batch)
    return OrderedDict([("0", features)]) if isinstance(features, torch.Tensor) else features


def _box_outputs(model: FasterRCNN, features, proposals, image_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, proposals, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


def check_compatible(student: FasterRCNN, teacher: FasterRCNN) -> None:
    """ValueError unless both detectors have the same classes and the same transform settings
    (the teacher reads the student's transformed batch, so both must expect the same one)."""
    s_classes, t_classes = detector_num_classes(student), detector_num_classes(teacher)
    if s_classes != t_classes:
        raise ValueError(f"student and teacher must have the same number of classes (background included); "
                         f"student has {s_classes}, teacher has {t_classes}")
    for key in _TRANSFORM_SETTINGS:
        s_value, t_value = getattr(student.transform, key), getattr(teacher.transform, key)
        if s_value != t_value:
            raise ValueError(f"student and teacher must use the same transform settings; {key}: "
                             f"student {s_value!r}, teacher {t_value!r}")


class RoIDistiller(DistillerBase):
    """A Faster R-CNN student trained with RoI-logit distillation from a frozen teacher.

    Args:
        student, teacher: torchvision `FasterRCNN` models with the same number of classes and
            transform settings. `teacher` may be None only when no distillation term is asked for.
        loss: a logit-distillation module from `pcdistill.losses` (called as
            `loss(student_logits, teacher_logits[, labels][, progress=...])`, labels when it has
            `needs_target`, progress when it has `needs_progress`), or None for a vanilla student.
        alpha: weight of the distillation term.
        warmup_epochs: the term is scaled by `min(epoch / warmup_epochs, 1)`; 0 disables the ramp.
        box_reg_weight: if > 0, adds `distill_box`: `box_reg_weight * ramp * smooth-L1 (beta 1/9)`
            between the student's and the teacher's regressions for the labelled class of the
            positive proposals, summed and divided by the number of sampled proposals (the
            normalisation of `loss_box_reg`).

    The teacher is frozen (:class:`pcdistill.distiller.DistillerBase`: a submodule, so `.to()` moves
    it, with `requires_grad=False`, in eval mode whatever `train()` is given); save
    `distiller.student` alone as the result.
    """

    def __init__(self, student: FasterRCNN, teacher: FasterRCNN | None, loss: nn.Module | None = None, *,
                 alpha: float = 1.0, warmup_epochs: float = 0.0, box_reg_weight: float = 0.0):
        if box_reg_weight < 0:
            raise ValueError(f"box_reg_weight must be >= 0; got {box_reg_weight}")
        if teacher is None and (loss is not None or box_reg_weight > 0):
            raise ValueError("a teacher is needed when a distillation loss or box_reg_weight > 0 is given")
        if teacher is not None:
            check_compatible(student, teacher)
        super().__init__(student, teacher, alpha=alpha, warmup_epochs=warmup_epochs)
        self.loss = loss
        self.box_reg_weight = float(box_reg_weight)

    @property
    def distills(self) -> bool:
        """Whether a training step uses the teacher."""
        return self.loss is not None or self.box_reg_weight > 0

    def rois(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
             with_teacher: bool = True) -> RoIOutputs:
        """One RoI pass as described in the module docstring. RPN proposal counts and losses follow
        the student's mode (train or eval); the sampling always uses the student's RoI heads."""
        student = self.student
        batch, targets = student.transform(images, targets)
        features = _features(student, batch.tensors)
        proposals, rpn_losses = student.rpn(batch, features, targets)
        proposals, _, labels, regression_targets = student.roi_heads.select_training_samples(proposals, targets)
        s_logits, s_boxes = _box_outputs(student, features, proposals, batch.image_sizes)
        t_logits = t_boxes = None
        if with_teacher and self.teacher is not None:
            with torch.no_grad():
                t_features = _features(self.teacher, batch.tensors)
                t_logits, t_boxes = _box_outputs(self.teacher, t_features, proposals, batch.image_sizes)
        return RoIOutputs(proposals, torch.cat(labels), regression_targets, s_logits, s_boxes, t_logits, t_boxes,
                          rpn_losses)

    def roi_logits(self, images, targets):
        """(student_logits (N, C + 1), teacher_logits (N, C + 1), labels int64 (N,), proposals list of
        (n_i, 4)) on the same sampled proposals, row i of both logits describing proposal i."""
        out = self.rois(images, targets)
        return out.student_logits, out.teacher_logits, out.labels, out.proposals

    def distill_loss(self, student_logits, teacher_logits, labels, progress=None) -> torch.Tensor:
        """`loss` on the two logit tensors, with labels / progress when the loss asks for them."""
        return call_loss(self.loss, student_logits, teacher_logits, labels, progress=progress)

    def forward(self, images, targets=None, *, epoch: float | None = None, progress: float | None = None):
        """Train mode: `(None, losses)` with `loss_classifier`, `loss_box_reg`, `loss_objectness`,
        `loss_rpn_box_reg`, plus `distill` (and `distill_box`) when distilling; `epoch` (fractional)
        drives the warm-up (required when `warmup_epochs > 0`), `progress` in [0, 1] is passed to losses
        that need it.
        Eval mode: the student's detections, a list of dicts (boxes xyxy in input-image pixels,
        labels, scores), exactly as torchvision returns them."""
        if not self.training:
            return self.student(images)
        if targets is None:
            raise ValueError("RoIDistiller needs targets in train mode")
        ramp = self.warmup(epoch) if self.distills else 0.0  # checks epoch before any work
        out = self.rois(images, targets, with_teacher=self.distills)
        labels = list(out.labels.split([len(p) for p in out.proposals]))
        loss_classifier, loss_box_reg = fastrcnn_loss(out.student_logits, out.student_boxes, labels,
                                                      out.regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **out.rpn_losses}
        if self.loss is not None:
            value = self.distill_loss(out.student_logits, out.teacher_logits, out.labels, progress)
            losses["distill"] = self.alpha * ramp * value
        if self.box_reg_weight > 0:
            losses["distill_box"] = self.box_reg_weight * ramp * _box_distill(out)
        return None, losses


def _box_distill(out: RoIOutputs) -> torch.Tensor:
    n = out.student_logits.shape[0]
    positive = torch.where(out.labels > 0)[0]
    classes = out.labels[positive]
    student = out.student_boxes.reshape(n, -1, 4)[positive, classes]
    teacher = out.teacher_boxes.reshape(n, -1, 4)[positive, classes]
    return F.smooth_l1_loss(student, teacher, beta=1 / 9, reduction="sum") / max(n, 1)
