"""Decoupled knowledge distillation."""
from __future__ import annotations

import torch
from torch import nn

from ._common import (REDUCTIONS, as_rows, check_choice, check_logits, check_positive_finite, check_real,
                      check_valid, device_checks_enabled, mask_rows, reduce_rows, standardize_logits)


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
    if flat.numel() and device_checks_enabled(flat):
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"target must hold class indices in [0, {num_classes}); found {bad}")
    return flat


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, standardize: bool = False,
             reduction: str = "mean", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` per row.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. With ``p = softmax(z / T)``
    and ``y`` the target class:

    - ``TCKD = T^2 * KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y])`` (binary target-vs-rest),
    - ``NCKD = T^2 * KL(q_t || q_s)`` with ``q = softmax`` over the non-target classes only
      (the target is excluded exactly, not with a large negative offset).

    ``target`` has the logits' leading shape. Its range is checked on the CPU, and on CUDA only when
    :func:`pcdistill.losses.set_device_checks` is on (the check would force a device sync).
    """
    num_classes = check_logits(student_logits, teacher_logits)
    alpha = check_real("alpha", alpha)
    beta = check_real("beta", beta)
    temperature = check_positive_finite("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    y = _check_target(target, leading, num_classes, mask, student_logits.device)
    s, t = mask_rows(*as_rows(student_logits, teacher_logits), mask)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    s, t = s / temperature, t / temperature
    is_target = torch.nn.functional.one_hot(y, num_classes).bool()

    def split(z):
        """log p_y, log(1 - p_y) and the log-softmax over non-target classes (target entry set to 0)."""
        lse_all = torch.logsumexp(z, dim=-1)
        z_rest = z.masked_fill(is_target, float("-inf"))
        lse_rest = torch.logsumexp(z_rest, dim=-1)
        log_p_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse_all
        log_rest = (z_rest - lse_rest.unsqueeze(-1)).masked_fill(is_target, 0.0)
        return log_p_y, lse_rest - lse_all, log_rest

    s_y, s_not_y, s_rest = split(s)
    t_y, t_not_y, t_rest = split(t)
    tckd = t_y.exp() * (t_y - s_y) + t_not_y.exp() * (t_not_y - s_not_y)
    nckd = (t_rest.exp().masked_fill(is_target, 0.0) * (t_rest - s_rest)).sum(dim=-1)
    row = (alpha * tckd + beta * nckd) * temperature**2
    return reduce_rows(row, mask, reduction, leading)


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss`; constructor takes its keyword arguments."""

    needs_target = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 standardize: bool = False, reduction: str = "mean"):
        super().__init__()
        check_real("alpha", alpha)
        check_real("beta", beta)
        check_positive_finite("temperature", temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(alpha=alpha, beta=beta, temperature=temperature, standardize=standardize,
                           reduction=reduction)

    def forward(self, student_logits, teacher_logits, target, *, valid=None):
        return dkd_loss(student_logits, teacher_logits, target, valid=valid, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
