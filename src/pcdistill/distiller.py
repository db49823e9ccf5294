"""Student + frozen teacher + distillation loss, as one module for your own training loop.

    distiller = Distiller(student, teacher, PCDLoss(temperature=4.0), ce_weight=1.0, alpha=1.0,
                          warmup_epochs=20)
    logits, losses = distiller(images, targets, epoch=epoch, progress=step / total_steps)
    sum(losses.values()).backward()

The trainer knows nothing about methods: it only sums the named losses this module returns.
:class:`DistillerBase` holds what every distiller of the package shares (the detection and the causal-LM
ones too): the frozen teacher and the warm-up ramp.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pcdistill.losses import call_loss


class DistillerBase(nn.Module):
    """A student, a frozen teacher and the weight ``alpha * min(epoch / warmup_epochs, 1)`` of the distillation term.

    The teacher (None for a student trained on labels alone) gets ``requires_grad=False`` and stays in eval
    mode whatever ``train()`` is given (its BatchNorm statistics and dropout frozen); it is a submodule, so
    ``.to()`` moves it. ``epoch`` is epochs done, counted continuously (1.0 at the end of the first epoch), as
    in the PCD/DKD recipes; ``warmup_epochs=0`` disables the ramp.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, alpha: float = 1.0,
                 warmup_epochs: float = 0.0):
        super().__init__()
        if not (math.isfinite(float(warmup_epochs)) and warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be a finite number >= 0 (0: no warm-up); got {warmup_epochs!r}")
        self.student = student
        self.teacher = teacher
        self.alpha = float(alpha)
        self.warmup_epochs = float(warmup_epochs)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def warmup(self, epoch: float | None) -> float:
        """``min(epoch / warmup_epochs, 1)``, 1 without warm-up; a warm-up refuses ``epoch=None`` rather than
        ramping from 0 for ever."""
        if self.warmup_epochs == 0:
            return 1.0
        if epoch is None:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} scales the distillation term by min(epoch / "
                             f"warmup_epochs, 1), so pass epoch=, the epochs done (e.g. epoch + (step + 1) / "
                             f"len(loader)); or build the distiller with warmup_epochs=0")
        return min(float(epoch) / self.warmup_epochs, 1.0)


class Distiller(DistillerBase):
    """Classification distillation: ``ce_weight * CE(student, y) + warmup * alpha * loss(student, teacher)``.

    ``warmup = min(epoch / warmup_epochs, 1)`` (:meth:`DistillerBase.warmup`); ``epoch`` must be passed
    whenever ``warmup_epochs > 0`` (without it the term would silently stay 0). ``loss`` is any module of
    :mod:`pcdistill.losses` (or None: a vanilla student, CE only); it receives the targets when it declares
    ``needs_target`` (DKD) and ``progress`` when it declares ``needs_progress`` (PCD's curriculum)
    (:func:`pcdistill.losses.call_loss`). The teacher is frozen and run under ``torch.no_grad``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: nn.Module | None, *,
                 ce_weight: float = 1.0, alpha: float = 1.0, warmup_epochs: float = 0.0):
        if loss is not None and teacher is None:
            raise ValueError("a distillation loss needs a teacher; pass teacher=... or loss=None")
        super().__init__(student, teacher, alpha=alpha, warmup_epochs=warmup_epochs)
        self.loss = loss
        self.ce_weight = float(ce_weight)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None, *, epoch: float | None = None,
                progress: float | None = None):
        """Student logits and a dict of named, already weighted losses (empty without targets)."""
        distilling = targets is not None and self.loss is not None
        weight = self.alpha * self.warmup(epoch) if distilling else 0.0  # checks epoch before any work
        logits = self.student(images)
        losses: dict[str, torch.Tensor] = {}
        if targets is None:
            return logits, losses
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(logits, targets)
        if distilling:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            losses["distill"] = weight * call_loss(self.loss, logits, teacher_logits.float(), targets,
                                                   progress=progress)
        return logits, losses
