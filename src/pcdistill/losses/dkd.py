"""Decoupled knowledge distillation."""
from __future__ import annotations

import torch

from ._common import (REDUCTIONS, LossModule, check_bool, check_choice, check_class_mask, check_logits,
                      check_positive_finite, check_real, check_valid, compute_dtype, device_checks_enabled, flat_rows,
                      log_softmax_rows, reduce_rows, xlogy_diff)
from ._rows import RowSpec, row_losses


def _check_target(target, leading_shape, num_classes: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer torch.Tensor of shape {tuple(leading_shape)}; got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype (class indices); got {target.dtype}")
    if tuple(target.shape) != tuple(leading_shape):
        raise ValueError(f"target must have the logits' leading shape {tuple(leading_shape)}; got {tuple(target.shape)}")
    flat = target.reshape(-1).to(device=device, dtype=torch.long)
    if mask is not None:
        flat = torch.where(mask, flat, 0)  # ignored rows may hold any label, e.g. -100
    if flat.numel() and device_checks_enabled(flat) and not torch.compiler.is_compiling():
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"target must hold class indices in [0, {num_classes}); found {bad}")
    return flat


def dkd_rows(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temperature: float,
             want_grad: bool):
    """Per-row ``T^2 (alpha TCKD + beta NCKD)`` and its closed-form gradient w.r.t. the student logits."""
    is_target = torch.nn.functional.one_hot(y, s.shape[-1]).bool()

    def split(z):
        """log [p_y, 1 - p_y] (binary) and the log-softmax over the non-target classes (target entry -inf)."""
        rest = z.masked_fill(is_target, float("-inf"))
        z_y = z.gather(-1, y.unsqueeze(-1))
        binary = log_softmax_rows(torch.cat([z_y, torch.logsumexp(rest, -1, keepdim=True)], -1))
        return binary, log_softmax_rows(rest)

    a, b = s / temperature, t / temperature
    s_bin, s_rest = split(a)
    t_bin, t_rest = split(b)
    q_t = t_rest.exp()
    tckd = xlogy_diff(t_bin.exp(), t_bin, s_bin).sum(-1)
    nckd = xlogy_diff(q_t, t_rest, s_rest).sum(-1)
    loss = (alpha * tckd + beta * nckd) * temperature**2
    if not want_grad:
        return loss, None
    p_s, q_s = log_softmax_rows(a).exp(), s_rest.exp()
    t_y, t_not_y = t_bin.exp().unbind(-1)
    # d TCKD / d a_c = -P_t,y (delta_cy - p_c) - P_t,rest ([c != y] q_s,c - p_c); d NCKD / d a_c = q_s,c Q_t - q_t,c
    d_tckd = (t_y + t_not_y).unsqueeze(-1) * p_s - t_y.unsqueeze(-1) * is_target - t_not_y.unsqueeze(-1) * q_s
    d_nckd = q_s * q_t.sum(-1, keepdim=True) - q_t
    return loss, (alpha * d_tckd + beta * d_nckd) * temperature


def dkd_row_spec(*, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 standardize: bool = False) -> RowSpec:
    """:func:`dkd_loss` as rows (options checked); the rows' targets go in ``extra``."""
    alpha = check_real("alpha", alpha)
    beta = check_real("beta", beta)
    temperature = check_positive_finite("temperature", temperature)
    check_bool("standardize", standardize)

    def rows(s, t, extra, want_grad):
        return dkd_rows(s, t, extra[0], alpha, beta, temperature, want_grad)

    return RowSpec(rows, work_arrays=14, standardize=standardize)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, standardize: bool = False,
             reduction: str = "mean", valid: torch.Tensor | None = None,
             class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` per row.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. With ``p = softmax(z / T)``
    and ``y`` the target class:

    - ``TCKD = T^2 * KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y])`` (binary target-vs-rest),
    - ``NCKD = T^2 * KL(q_t || q_s)`` with ``q = softmax`` over the non-target classes only
      (the target is excluded exactly, not with a large negative offset).

    ``target`` has the logits' leading shape. Its range is checked on the CPU, and on CUDA only when
    :func:`pcdistill.losses.set_device_checks` is on (the check would force a device sync).
    ``valid``, ``class_mask``, masked classes and chunking as in :func:`pcdistill.losses.kd_loss`.
    """
    num_classes = check_logits(student_logits, teacher_logits)
    spec = dkd_row_spec(alpha=alpha, beta=beta, temperature=temperature, standardize=standardize)
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    classes = check_class_mask(class_mask, num_classes, student_logits.device)
    y = _check_target(target, leading, num_classes, mask, student_logits.device)
    s, t = flat_rows(student_logits, teacher_logits)

    row = row_losses(s, t, spec, dtype=compute_dtype(s, t), valid=mask, class_mask=classes, extra=(y,))
    return reduce_rows(row, mask, reduction, leading)


class DKDLoss(LossModule):
    """Module form of :func:`dkd_loss`; constructor takes its keyword arguments."""

    needs_target = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_real("alpha", alpha)
        check_real("beta", beta)
        check_positive_finite("temperature", temperature)
        check_bool("standardize", standardize)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(alpha=alpha, beta=beta, temperature=temperature, standardize=standardize,
                           reduction=reduction)

    def forward(self, student_logits, teacher_logits, target, *, valid=None, class_mask=None):
        return dkd_loss(student_logits, teacher_logits, target, valid=valid, class_mask=class_mask, **self.kwargs)
