"""Reverse KL divergence: the student's distribution against the teacher's (MiniLLM)."""
from __future__ import annotations

import torch

from ._common import (REDUCTIONS, LossModule, check_bool, check_choice, check_logits, check_positive_finite,
                      log_softmax_rows, xlogy_diff)
from ._rows import RowSpec, spec_loss


def rkl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool):
    """Per-row ``T^2 KL(p_s || p_t)`` and its gradient ``T (p_s r - p_s KL)``, ``r = log p_s - log p_t``."""
    log_p_s = log_softmax_rows(s / temperature)
    p_s = log_p_s.exp()
    terms = xlogy_diff(p_s, log_p_s, log_softmax_rows(t / temperature))  # p_s r, 0 where p_s is 0
    kl = terms.sum(-1)
    # d KL / d a_j = p_j (r_j - KL) for a = s / T (the "+1" of d(p log p) cancels as sum_c dp_c = 0)
    grad = (terms - p_s * kl.unsqueeze(-1)) * temperature if want_grad else None
    return kl * temperature**2, grad


def rkl_row_spec(*, temperature: float = 1.0, standardize: bool = False) -> RowSpec:
    """:func:`rkl_loss` as rows (options checked)."""
    temperature = check_positive_finite("temperature", temperature)
    check_bool("standardize", standardize)

    def rows(s, t, extra, want_grad):
        return rkl_rows(s, t, temperature, want_grad)

    return RowSpec(rows, work_arrays=8, standardize=standardize)


def rkl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
             standardize: bool = False, reduction: str = "mean", valid: torch.Tensor | None = None,
             class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse KL: ``T^2 * KL(p_s || p_t) = T^2 * sum_c p_s,c (log p_s,c - log p_t,c)`` per row, ``p = softmax(z / T)``.

    Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024 (the
    mode-seeking divergence; MiniLLM optimizes it over sampled sequences, this is its per-token form, as
    in GKD's ``beta = 1`` and DistillKit). ``temperature`` defaults to 1 as in those papers; the ``T^2``
    factor is KD's, so the magnitude compares with :func:`pcdistill.losses.kd_loss` at any ``T``.

    Gradient (closed form, w.r.t. the student logits): ``T * p_s,c (r_c - KL)`` with
    ``r = log p_s - log p_t`` and ``KL = sum_c p_s,c r_c``. The teacher gets no gradient.

    Args as :func:`pcdistill.losses.kd_loss`: ``(..., C)`` logits, ``temperature > 0``,
    ``standardize`` (z-score both rows first, Sun et al. CVPR 2024), ``reduction``, ``valid``, ``class_mask``.

    Masked classes and non-finite values (docs/method.md), with the sum over ``p_s`` here:

    - ``-inf`` in both inputs: the class is absent (the row's loss is that of the row without it);
    - ``-inf`` in the student only: ``p_s = 0``, the class contributes ``0 log 0 = 0`` (finite);
    - ``-inf`` in the teacher only, where ``p_s > 0``: the loss is ``+inf`` (its value; that row's
      gradient is not finite);
    - NaN anywhere in a row: that row's loss is NaN. ``class_mask`` equals slicing the classes off.

    Never an exception for these. Half-precision inputs are computed in float32; rows are processed in
    chunks under :func:`pcdistill.losses.set_memory_budget`.
    """
    check_logits(student_logits, teacher_logits)
    spec = rkl_row_spec(temperature=temperature, standardize=standardize)
    return spec_loss(spec, student_logits, teacher_logits, reduction=reduction, valid=valid, class_mask=class_mask)


class RKLLoss(LossModule):
    """Module form of :func:`rkl_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, temperature: float = 1.0, standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_positive_finite("temperature", temperature)
        check_bool("standardize", standardize)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(temperature=temperature, standardize=standardize, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None, class_mask=None):
        return rkl_loss(student_logits, teacher_logits, valid=valid, class_mask=class_mask, **self.kwargs)
