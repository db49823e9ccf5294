"""Student + frozen teacher + distillation loss, as one module for your own training loop.

    distiller = Distiller(student, teacher, PCDLoss(temperature=4.0), ce_weight=1.0, alpha=1.0,
                          warmup_epochs=20)
    logits, losses = distiller(images, targets, epoch=epoch, progress=step / total_steps)
    sum(losses.values()).backward()

The trainer knows nothing about methods: it only sums the named losses this module returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_epoch(epoch, warmup_epochs: float) -> None:
    """A warm-up needs the epoch: refuse ``epoch=None`` rather than ramp from 0 for ever."""
    if epoch is None and warmup_epochs > 0:
        raise ValueError(f"warmup_epochs={warmup_epochs:g} scales the distillation term by min(epoch / "
                         f"warmup_epochs, 1), so pass epoch=, the epochs done (e.g. epoch + (step + 1) / "
                         f"len(loader)); or build the distiller with warmup_epochs=0")


class Distiller(nn.Module):
    """Classification distillation: ``ce_weight * CE(student, y) + warmup * alpha * loss(student, teacher)``.

    ``warmup = min(epoch / warmup_epochs, 1)`` (1 when ``warmup_epochs`` is 0), as in the PCD/DKD
    recipes; ``epoch`` is epochs done, counted continuously (1.0 at the end of the first epoch), and
    must be passed whenever ``warmup_epochs > 0`` (without it the term would silently stay 0).
    ``loss`` is any module of :mod:`pcdistill.losses` (or None: a vanilla student, CE only); it
    receives the targets when it declares ``needs_target`` (DKD) and ``progress`` when it declares
    ``needs_progress`` (PCD's curriculum). The teacher is frozen: no gradients, always in eval mode,
    run under ``torch.no_grad``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: nn.Module | None, *,
                 ce_weight: float = 1.0, alpha: float = 1.0, warmup_epochs: float = 0.0):
        super().__init__()
        if loss is not None and teacher is None:
            raise ValueError("a distillation loss needs a teacher; pass teacher=... or loss=None")
        self.student = student
        self.teacher = teacher
        self.loss = loss
        self.ce_weight = float(ce_weight)
        self.alpha = float(alpha)
        self.warmup_epochs = float(warmup_epochs)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher stay frozen
        return self

    def warmup(self, epoch: float) -> float:
        return 1.0 if self.warmup_epochs <= 0 else min(float(epoch) / self.warmup_epochs, 1.0)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None, *, epoch: float | None = None,
                progress: float | None = None):
        """Student logits and a dict of named, already weighted losses (empty without targets)."""
        if targets is not None and self.loss is not None:
            check_epoch(epoch, self.warmup_epochs)
        logits = self.student(images)
        losses: dict[str, torch.Tensor] = {}
        if targets is None:
            return logits, losses
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(logits, targets)
        if self.loss is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            kwargs = {}
            if getattr(self.loss, "needs_progress", False):
                kwargs["progress"] = progress
            args = (targets,) if getattr(self.loss, "needs_target", False) else ()
            value = self.loss(logits, teacher_logits.float(), *args, **kwargs)
            losses["distill"] = self.warmup(0.0 if epoch is None else epoch) * self.alpha * value
        return logits, losses
