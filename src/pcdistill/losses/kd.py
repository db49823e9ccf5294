"""Vanilla logit knowledge distillation."""
from __future__ import annotations

import torch
from torch import nn

from ._common import (REDUCTIONS, as_rows, check_choice, check_logits, check_positive_finite, check_valid,
                      mask_rows, reduce_rows, standardize_logits)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
            standardize: bool = False, reduction: str = "mean", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Knowledge distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per row.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    With ``standardize=True`` both logits are z-scored per row first (Sun et al., CVPR 2024).

    Args:
        student_logits, teacher_logits: ``(..., C)``; leading dimensions are rows.
        temperature: ``T > 0``.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (shape of the leading dimensions).
        valid: optional boolean mask of the leading shape; invalid rows contribute nothing.
    """
    check_logits(student_logits, teacher_logits)
    temperature = check_positive_finite("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    s, t = mask_rows(*as_rows(student_logits, teacher_logits), mask)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    log_p_s = torch.log_softmax(s / temperature, dim=-1)
    log_p_t = torch.log_softmax(t / temperature, dim=-1)
    row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * temperature**2
    return reduce_rows(row, mask, reduction, leading)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, temperature: float = 4.0, standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_positive_finite("temperature", temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(temperature=temperature, standardize=standardize, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None):
        return kd_loss(student_logits, teacher_logits, valid=valid, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
