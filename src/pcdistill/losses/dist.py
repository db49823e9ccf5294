"""DIST: distillation from a stronger teacher by correlation of predictions."""
from __future__ import annotations

import torch

from ._common import (REDUCTIONS, LossModule, check_choice, check_class_mask, check_logits, check_positive_finite,
                      check_real, check_valid, compute_dtype, flat_rows, log_softmax_rows, reduce_rows)
from ._rows import prepared_chunks

PEARSON_EPS = 1e-8
WORK_ARRAYS = 12


def _row_pearson(a: torch.Tensor, b: torch.Tensor, live: torch.Tensor):
    """Pearson correlation over each row's live classes, with what its gradient w.r.t. ``a`` needs."""
    n = live.sum(-1, keepdim=True).clamp_min(1)
    ca = torch.where(live, a - a.sum(-1, keepdim=True) / n, 0.0)
    cb = torch.where(live, b - b.sum(-1, keepdim=True) / n, 0.0)
    na, nb = ca.norm(dim=-1, keepdim=True), cb.norm(dim=-1, keepdim=True)
    denom = na * nb + PEARSON_EPS
    cov = (ca * cb).sum(-1, keepdim=True)
    return (cov / denom).squeeze(-1), ca, cb, na, nb, denom, cov


def _softmax_backward(p: torch.Tensor, grad_p: torch.Tensor) -> torch.Tensor:
    return p * (grad_p - (grad_p * p).sum(-1, keepdim=True))


class _DIST(torch.autograd.Function):
    """Per-row inter-class terms and the batch's intra-class term, in two chunked passes.

    Forward: pass over the rows accumulating per-class sums (for the column correlations) and each
    row's correlation. Backward recomputes each chunk's softmax and writes its gradient, so no
    ``(N, C)`` array besides the returned gradient is ever kept.
    """

    @staticmethod
    def forward(ctx, student, teacher, valid, class_mask, temperature, beta, gamma, dtype):
        rows, num_classes = student.shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        sums = torch.zeros(6, num_classes, dtype=acc, device=student.device)  # m, S_s, S_t, S_ss, S_tt, S_st
        inter = torch.empty(rows, dtype=dtype, device=student.device)
        for start, stop, p_s, p_t, live, keep in _chunks(student, teacher, valid, class_mask, temperature, dtype):
            inter[start:stop] = _row_pearson(p_s, p_t, live)[0]
            w = (live & keep.unsqueeze(-1)).to(acc)
            ps, pt = p_s.to(acc) * w, p_t.to(acc) * w
            sums += torch.stack([w.sum(0), ps.sum(0), pt.sum(0), (ps * ps).sum(0), (pt * pt).sum(0),
                                 (ps * pt).sum(0)])
        col = _column_stats(sums)
        ctx.save_for_backward(student, teacher, valid, class_mask, *col)
        ctx.options = (temperature, beta, gamma, dtype)
        row_term = beta * (1 - inter)
        intra = gamma * col[-1]  # mean over live columns of (1 - rho_c)
        return (row_term + intra.to(dtype)) * temperature**2

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, valid, class_mask, mu_s, mu_t, a_coef, b_coef, _ = ctx.saved_tensors
        temperature, beta, gamma, dtype = ctx.options
        total = grad_rows.sum()
        grad = torch.empty_like(student)
        for start, stop, p_s, p_t, live, keep in _chunks(student, teacher, valid, class_mask, temperature, dtype):
            _, ca, cb, na, nb, denom, cov = _row_pearson(p_s, p_t, live)
            d_row = cb / denom - cov * nb * ca / (na.clamp_min(torch.finfo(na.dtype).tiny) * denom**2)
            d_col = a_coef.to(dtype) * (p_t - mu_t.to(dtype)) - b_coef.to(dtype) * (p_s - mu_s.to(dtype))
            col_live = (live & keep.unsqueeze(-1))
            grad_p = (-beta * grad_rows[start:stop].unsqueeze(-1) * torch.where(live, d_row, 0.0)
                      - gamma * total * torch.where(col_live, d_col, 0.0))
            g = _softmax_backward(p_s, grad_p) * temperature
            grad[start:stop] = torch.where(keep.unsqueeze(-1), g, 0.0)
        return grad, None, None, None, None, None, None, None


def _chunks(student, teacher, valid, class_mask, temperature, dtype):
    """Per chunk: its rows, both predictions ``softmax(z / T)``, the live classes and the valid rows."""
    for start, stop, s, t in prepared_chunks(student, teacher, valid, class_mask, dtype, WORK_ARRAYS):
        live = ~(torch.isneginf(s) & torch.isneginf(t))
        p_s, p_t = log_softmax_rows(s / temperature).exp(), log_softmax_rows(t / temperature).exp()
        yield start, stop, p_s, p_t, live, valid[start:stop]


def _column_stats(sums: torch.Tensor):
    """Column means, gradient coefficients and the mean of ``1 - rho_c`` over the live columns."""
    m, s_s, s_t, s_ss, s_tt, s_st = sums
    count = m.clamp_min(1)
    mu_s, mu_t = s_s / count, s_t / count
    var_s = (s_ss - s_s * mu_s).clamp_min(0)
    var_t = (s_tt - s_t * mu_t).clamp_min(0)
    cov = s_st - s_s * mu_t
    sd_s, sd_t = var_s.sqrt(), var_t.sqrt()
    denom = sd_s * sd_t + PEARSON_EPS
    rho = cov / denom
    live = m > 0
    n_live = live.sum().clamp_min(1)
    a_coef = torch.where(live, 1 / denom, 0.0) / n_live
    b_coef = torch.where(live, cov * sd_t / (sd_s.clamp_min(torch.finfo(sd_s.dtype).tiny) * denom**2), 0.0) / n_live
    intra = torch.where(live, 1 - rho, 0.0).sum() / n_live
    return mu_s, mu_t, a_coef, b_coef, intra


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0, reduction: str = "mean",
              valid: torch.Tensor | None = None, class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DIST: ``beta * T^2 * (1 - mean_rows pearson) + gamma * T^2 * (1 - mean_classes pearson)``.

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    Predictions are ``softmax(z / T)``. The inter-class term correlates each row's prediction of
    student and teacher over the row's live classes; the intra-class term correlates each class's
    column over the valid rows where that class is live, averaged over the classes live somewhere.

    The intra-class term is a property of the batch: ``reduction="none"`` gives each valid row its own
    inter-class term plus the batch's intra-class term, so that ``"mean"`` (over valid rows) is the loss
    above and ``"sum"`` is that times the number of valid rows. Rows where ``valid`` is False enter
    neither term. Masked classes as in :func:`pcdistill.losses.kd_loss`; NaN in a row gives NaN.
    """
    num_classes = check_logits(student_logits, teacher_logits)
    beta = check_real("beta", beta)
    gamma = check_real("gamma", gamma)
    temperature = check_positive_finite("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    classes = check_class_mask(class_mask, num_classes, student_logits.device)
    s, t = flat_rows(student_logits, teacher_logits)
    keep = mask if mask is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    row = _DIST.apply(s, t, keep, classes, temperature, beta, gamma, compute_dtype(s, t))
    return reduce_rows(row, mask, reduction, leading)


class DISTLoss(LossModule):
    """Module form of :func:`dist_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__()
        check_real("beta", beta)
        check_real("gamma", gamma)
        check_positive_finite("temperature", temperature)
        check_choice("reduction", reduction, REDUCTIONS)
        self.kwargs = dict(beta=beta, gamma=gamma, temperature=temperature, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, valid=None, class_mask=None):
        return dist_loss(student_logits, teacher_logits, valid=valid, class_mask=class_mask, **self.kwargs)
