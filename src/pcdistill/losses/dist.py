"""DIST: distillation from a stronger teacher by correlation of predictions."""
from __future__ import annotations

import torch
from torch import nn

from ._common import as_rows, check_logits, check_positive_finite, check_real

PEARSON_EPS = 1e-8


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching rows: centred cosine, ``eps`` added to the norm product."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + PEARSON_EPS)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """DIST: ``beta * T^2 * (1 - mean_rows pearson) + gamma * T^2 * (1 - mean_classes pearson)``.

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    Predictions are ``softmax(z / T)``. The inter-class term correlates each row's prediction of
    student and teacher; the intra-class term correlates each class's column over the rows.
    All leading dimensions are flattened into rows; the result is a scalar.
    """
    check_logits(student_logits, teacher_logits)
    beta = check_real("beta", beta)
    gamma = check_real("gamma", gamma)
    temperature = check_positive_finite("temperature", temperature)
    s, t = as_rows(student_logits, teacher_logits)
    p_s = torch.softmax(s / temperature, dim=-1)
    p_t = torch.softmax(t / temperature, dim=-1)
    inter = 1 - _pearson(p_s, p_t).mean()
    intra = 1 - _pearson(p_s.transpose(0, 1), p_t.transpose(0, 1)).mean()
    return (beta * inter + gamma * intra) * temperature**2


class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss`; constructor takes its keyword arguments."""

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        check_real("beta", beta)
        check_real("gamma", gamma)
        check_positive_finite("temperature", temperature)
        self.kwargs = dict(beta=beta, gamma=gamma, temperature=temperature)

    def forward(self, student_logits, teacher_logits):
        return dist_loss(student_logits, teacher_logits, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
