"""Vanilla logit knowledge distillation."""
from __future__ import annotations

import math

import torch

from ._common import (REDUCTIONS, LossModule, cheap_to_look, check_bool, check_choice, check_logits,
                      check_positive_finite, log_softmax_rows)
from ._rows import RowSpec, spec_loss


def _kd_terms(log_p_s, log_p_t, temperature: float, want_grad: bool, masked: bool):
    p_t = log_p_t.exp()
    log_ratio = log_p_t.sub_(log_p_s)
    if masked:
        log_ratio.masked_fill_(p_t == 0, 0.0)  # 0 log 0 = 0, as F.kl_div; NaN stays NaN
    loss = torch.linalg.vecdot(log_ratio, p_t).mul_(temperature**2)
    grad = log_p_s.exp_().sub_(p_t).mul_(temperature) if want_grad else None
    return loss, grad


def kd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool):
    """Per-row ``T^2 KL(p_t || p_s)`` and its gradient ``T (p_s - p_t)`` w.r.t. the student logits."""
    if cheap_to_look(s):
        # every masked class or row of only -inf makes some row NaN unguarded: only then the guarded pass
        loss, grad = _kd_terms(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                               temperature, want_grad, masked=False)
        if not math.isnan(loss.sum().item()):  # one read: rows are finite or +inf, only NaN sums to NaN
            return loss, grad
    return _kd_terms(log_softmax_rows(s / temperature), log_softmax_rows(t / temperature), temperature, want_grad,
                     masked=True)


def kd_row_spec(*, temperature: float = 4.0, standardize: bool = False) -> RowSpec:
    """:func:`kd_loss` as rows (options checked)."""
    temperature = check_positive_finite("temperature", temperature)
    check_bool("standardize", standardize)

    def rows(s, t, extra, want_grad):
        return kd_rows(s, t, temperature, want_grad)

    return RowSpec(rows, work_arrays=8, standardize=standardize)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
            standardize: bool = False, reduction: str = "mean", valid: torch.Tensor | None = None,
            class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Knowledge distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per row.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    With ``standardize=True`` both logits are z-scored per row first (Sun et al., CVPR 2024).

    Args:
        student_logits, teacher_logits: ``(..., C)``; leading dimensions are rows.
        temperature: ``T > 0``.
        reduction: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (shape of the leading dimensions).
        valid: optional boolean mask of the leading shape; invalid rows contribute nothing.
        class_mask: optional boolean ``(C,)``; classes where it is False are left out (as if sliced off).

    Masked classes follow docs/method.md: ``-inf`` in both inputs removes the class from the row,
    ``-inf`` in the teacher only contributes 0, ``-inf`` in the student only gives ``+inf``, NaN gives NaN.
    Rows are processed in chunks under :func:`pcdistill.losses.set_memory_budget`.
    """
    check_logits(student_logits, teacher_logits)
    spec = kd_row_spec(temperature=temperature, standardize=standardize)
    return spec_loss(spec, student_logits, teacher_logits, reduction=reduction, valid=valid, class_mask=class_mask)


class KDLoss(LossModule):
    """Module form of :func:`kd_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, temperature: float = 4.0, standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_positive_finite("temperature", temperature)
        check_bool("standardize", standardize)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(temperature=temperature, standardize=standardize, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None, class_mask=None):
        return kd_loss(student_logits, teacher_logits, valid=valid, class_mask=class_mask, **self.kwargs)
