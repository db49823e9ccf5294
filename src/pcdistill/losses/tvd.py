"""Total variation distance between teacher and student (DistillKit, Liger-Kernel)."""
from __future__ import annotations

import torch

from ._common import (REDUCTIONS, LossModule, check_bool, check_choice, check_logits, check_positive_finite,
                      log_softmax_rows)
from ._rows import RowSpec, spec_loss


def tvd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool):
    """Per-row ``T^2 * 0.5 * sum_c |p_t,c - p_s,c|`` and its gradient ``T p_s,c (g_c - sum_k p_s,k g_k)``,
    ``g = 0.5 sign(p_s - p_t)`` with ``sign(0) = 0``."""
    p_s = log_softmax_rows(s / temperature).exp()
    diff = p_s - log_softmax_rows(t / temperature).exp()
    loss = 0.5 * diff.abs().sum(-1) * temperature**2
    if not want_grad:
        return loss, None
    g = 0.5 * torch.sign(diff)  # the subgradient 0 where p_s == p_t (absent classes included)
    return loss, p_s * (g - (p_s * g).sum(-1, keepdim=True)) * temperature


def tvd_row_spec(*, temperature: float = 1.0, standardize: bool = False) -> RowSpec:
    """:func:`tvd_loss` as rows (options checked)."""
    temperature = check_positive_finite("temperature", temperature)
    check_bool("standardize", standardize)

    def rows(s, t, extra, want_grad):
        return tvd_rows(s, t, temperature, want_grad)

    return RowSpec(rows, work_arrays=8, standardize=standardize)


def tvd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
             standardize: bool = False, reduction: str = "mean", valid: torch.Tensor | None = None,
             class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Total variation distance: ``T^2 * 0.5 * sum_c |p_t,c - p_s,c|`` per row, ``p = softmax(z / T)``.

    As in DistillKit's ``tvd`` loss and Liger-Kernel's ``LigerTVDLoss`` (there without ``T^2``; here KD's
    factor, so magnitudes compare at any ``T``). Bounded by ``T^2``. ``temperature`` defaults to 1.

    Gradient w.r.t. the student logits: ``T p_s,c (g_c - sum_k p_s,k g_k)`` with ``g = 0.5 sign(p_s - p_t)``.
    Where ``p_s,c == p_t,c`` exactly, ``|.|`` has no derivative: the subgradient ``sign(0) = 0`` is used
    (so a student equal to its teacher gets a zero gradient). The teacher gets no gradient.

    Args as :func:`pcdistill.losses.kd_loss`.

    Masked classes and non-finite values (docs/method.md):

    - ``-inf`` in both inputs: the class is absent (both probabilities 0; the row's loss is that of the
      row without it);
    - ``-inf`` in one input only: that side's probability is 0 and the class adds ``0.5 p`` of the other
      side: the loss stays finite;
    - NaN anywhere in a row: that row's loss is NaN. ``class_mask`` equals slicing the classes off.

    Never an exception for these. Half-precision inputs are computed in float32; rows are processed in
    chunks under :func:`pcdistill.losses.set_memory_budget`.
    """
    check_logits(student_logits, teacher_logits)
    spec = tvd_row_spec(temperature=temperature, standardize=standardize)
    return spec_loss(spec, student_logits, teacher_logits, reduction=reduction, valid=valid, class_mask=class_mask)


class TVDLoss(LossModule):
    """Module form of :func:`tvd_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, temperature: float = 1.0, standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_positive_finite("temperature", temperature)
        check_bool("standardize", standardize)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(temperature=temperature, standardize=standardize, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None, class_mask=None):
        return tvd_loss(student_logits, teacher_logits, valid=valid, class_mask=class_mask, **self.kwargs)
