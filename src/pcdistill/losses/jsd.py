"""Generalized Jensen-Shannon divergence between teacher and student (GKD, TRL's ``generalized_jsd_loss``)."""
from __future__ import annotations

import math

import torch

from ._common import (REDUCTIONS, LossModule, check_bool, check_choice, check_logits, check_positive_finite, check_real,
                      log_softmax_rows, xlogy_diff)
from ._rows import RowSpec, spec_loss
from .kd import kd_rows
from .rkl import rkl_rows


def log_mixture(log_p_t: torch.Tensor, log_p_s: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta p_t + (1 - beta) p_s)`` for ``0 < beta < 1``, stably; ``-inf`` where both are ``-inf``, not NaN."""
    a, b = log_p_t + math.log(beta), log_p_s + math.log1p(-beta)
    top = torch.maximum(a, b)
    top = torch.where(torch.isneginf(top), 0.0, top)
    return top + torch.log(torch.exp(a - top) + torch.exp(b - top))


def jsd_rows(s: torch.Tensor, t: torch.Tensor, beta: float, temperature: float, want_grad: bool):
    """Per-row ``T^2 (beta KL(p_t || m) + (1 - beta) KL(p_s || m))`` and its gradient w.r.t. the student logits:
    ``T (1 - beta) p_s,c (r_c - KL(p_s || m))`` with ``r = log p_s - log m``. ``beta`` 0 and 1 are KD and reverse KL."""
    if beta == 0.0:
        return kd_rows(s, t, temperature, want_grad)
    if beta == 1.0:
        return rkl_rows(s, t, temperature, want_grad)
    log_p_s, log_p_t = log_softmax_rows(s / temperature), log_softmax_rows(t / temperature)
    log_m = log_mixture(log_p_t, log_p_s, beta)
    p_s = log_p_s.exp()
    terms_s = xlogy_diff(p_s, log_p_s, log_m)  # p_s r, 0 where p_s is 0
    kl_s = terms_s.sum(-1)
    kl_t = xlogy_diff(log_p_t.exp(), log_p_t, log_m).sum(-1)
    loss = (beta * kl_t + (1 - beta) * kl_s) * temperature**2
    # d loss / d p_s,c = T^2 (1 - beta) r_c: the -beta p_t / m - (1 - beta) p_s / m terms sum to -1 and cancel
    grad = (1 - beta) * (terms_s - p_s * kl_s.unsqueeze(-1)) * temperature if want_grad else None
    return loss, grad


def check_beta(beta) -> float:
    beta = check_real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0: forward KL, 1: reverse KL); got {beta}")
    return beta


def jsd_row_spec(*, beta: float = 0.5, temperature: float = 1.0, standardize: bool = False) -> RowSpec:
    """:func:`jsd_loss` as rows (options checked)."""
    beta = check_beta(beta)
    temperature = check_positive_finite("temperature", temperature)
    check_bool("standardize", standardize)

    def rows(s, t, extra, want_grad):
        return jsd_rows(s, t, beta, temperature, want_grad)

    return RowSpec(rows, work_arrays=12, standardize=standardize)


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
             temperature: float = 1.0, standardize: bool = False, reduction: str = "mean",
             valid: torch.Tensor | None = None, class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per row, with ``p = softmax(z / T)``:

        m = beta * p_t + (1 - beta) * p_s
        loss = T^2 * (beta * KL(p_t || m) + (1 - beta) * KL(p_s || m))

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), ICLR 2024, eq. 1, with the conventions of TRL's ``GKDTrainer.generalized_jsd_loss``: ``beta``
    weighs the teacher in the mixture; ``beta = 0`` is *defined* as forward KL ``KL(p_t || p_s)`` (KD) and
    ``beta = 1`` as reverse KL ``KL(p_s || p_t)`` (:func:`rkl_loss`); the formula itself tends to 0 at
    both ends. ``beta = 0.5`` is the symmetric JSD, bounded by ``T^2 log 2``. ``temperature`` defaults to 1
    (TRL's); the ``T^2`` factor is KD's.

    Gradient (closed form, w.r.t. the student logits): ``T (1 - beta) p_s,c (r_c - KL(p_s || m))`` with
    ``r = log p_s - log m``. The teacher gets no gradient.

    Args as :func:`pcdistill.losses.kd_loss`, plus ``beta`` in ``[0, 1]``.

    Masked classes and non-finite values (docs/method.md):

    - ``-inf`` in both inputs: the class is absent (the row's loss is that of the row without it);
    - ``-inf`` in one input only: with ``0 < beta < 1`` the mixture keeps the class, so the loss stays
      finite (``0 log 0 = 0`` for the side whose probability is 0); with ``beta = 0`` a student-only
      ``-inf`` gives ``+inf`` (forward KL), with ``beta = 1`` a teacher-only one does (reverse KL);
    - NaN anywhere in a row: that row's loss is NaN. ``class_mask`` equals slicing the classes off.

    Never an exception for these. Half-precision inputs are computed in float32; rows are processed in
    chunks under :func:`pcdistill.losses.set_memory_budget`.
    """
    check_logits(student_logits, teacher_logits)
    spec = jsd_row_spec(beta=beta, temperature=temperature, standardize=standardize)
    return spec_loss(spec, student_logits, teacher_logits, reduction=reduction, valid=valid, class_mask=class_mask)


class JSDLoss(LossModule):
    """Module form of :func:`jsd_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, standardize: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        check_beta(beta)
        check_positive_finite("temperature", temperature)
        check_bool("standardize", standardize)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(beta=beta, temperature=temperature, standardize=standardize, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None, class_mask=None):
        return jsd_loss(student_logits, teacher_logits, valid=valid, class_mask=class_mask, **self.kwargs)
