"""Progressive Class-level Distillation (PCD), as specified in the project's METHOD.md.

Li, Li, Zhang, Xu, "Progressive Class-level Distillation", arXiv 2505.24310 (2025).
The maths is in :func:`pcd_loss`'s docstring; the fast computation lives in ``_pcd_kernel``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import _pcd_kernel as kernel
from ._common import (REDUCTIONS, as_rows, check_choice, check_logits, check_positive_finite, check_valid,
                      mask_rows, reduce_rows, standardize_logits)
from ._pcd_kernel import COS_EPS, group_sizes, layout_for, priority_key

SCHEDULES = ("joint", "curriculum")
RANK_BY = ("abs_diff", "teacher", "none")
VARIANTS = ("paper", "released")


def stage_sequence(stages: int, schedule: str, progress: float | None) -> tuple[list[int], float]:
    """The group counts of the stages used in one step, and the factor on their summed loss.

    joint: every step sums fine-to-coarse ``K..1`` and coarse-to-fine ``1..K``, i.e. ``2 * sum_g L_g``.
    curriculum: phases ``[K, ..., 1, 1, ..., K]`` of equal length; phase ``p = min(floor(progress*2K), 2K-1)``
    gives ``2K * L_{g_p}``.
    """
    if schedule == "joint":
        return list(range(1, stages + 1)), 2.0
    phases = list(range(stages, 0, -1)) + list(range(1, stages + 1))
    phase = min(int(math.floor(progress * 2 * stages)), 2 * stages - 1)
    return [phases[phase]], 2.0 * stages


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(COS_EPS) * b.norm(dim=-1).clamp_min(COS_EPS))


def _released_loss(s, t, temperature, stages, mask, reduction, leading):
    """The authors' released computation: ``2 K T^2 KL_batchmean(full) * mean_b(1 - cos(p_t, log p_s))``."""
    log_p_s = torch.log_softmax(s / temperature, dim=-1)
    log_p_t = torch.log_softmax(t / temperature, dim=-1)
    p_t = log_p_t.exp()
    kl = (p_t * (log_p_t - log_p_s)).sum(-1) * temperature**2
    weight = 1 - _cosine(p_t, log_p_s)
    mean_weight = reduce_rows(weight, mask, "mean", leading)
    # per row: 2K * KL_i * mean(w), so that the mean over rows is the released loss
    return reduce_rows(2 * stages * kl * mean_weight, mask, reduction, leading)


def _check_stages(stages, num_classes: int) -> int:
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)):
        raise TypeError(f"stages must be an int in [1, C]; got {type(stages).__name__} {stages!r}")
    if not 1 <= stages <= num_classes:
        raise ValueError(f"stages must be an int in [1, C={num_classes}]; got {stages}")
    return int(stages)


def _check_options(temperature, schedule, progress, rank_by, variant, reduction):
    temperature = check_positive_finite("temperature", temperature)
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("rank_by", rank_by, RANK_BY)
    check_choice("variant", variant, VARIANTS)
    check_choice("reduction", reduction, REDUCTIONS)
    if progress is not None:
        if isinstance(progress, torch.Tensor) and progress.numel() == 1:
            progress = progress.item()
        if isinstance(progress, bool) or not isinstance(progress, (int, float, np.floating, np.integer)):
            raise TypeError(f"progress must be a number in [0, 1]; got {type(progress).__name__}")
        progress = float(progress)
        if not 0.0 <= progress <= 1.0:  # also rejects NaN
            raise ValueError(f"progress must be in [0, 1] (the fraction of the distillation schedule done); got {progress}")
    if schedule == "curriculum" and variant == "paper" and progress is None:
        raise ValueError('schedule="curriculum" needs progress, the fraction of training done, in [0, 1]')
    return temperature, progress


def pcd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
             stages: int = 3, schedule: str = "joint", progress: float | None = None, rank_by: str = "abs_diff",
             adaptive: bool = True, standardize: bool = False, variant: str = "paper", reduction: str = "mean",
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Progressive Class-level Distillation loss.

    Li, Li, Zhang, Xu, "Progressive Class-level Distillation", arXiv 2505.24310 (2025), as defined by
    this project's METHOD.md (``docs/method.md``). Per row, with ``K = stages``:

    0. ``standardize=True``: z-score ``s`` and ``t`` over classes (unbiased std, ``+1e-7``).
    1. Priority ``d_c = |(t_c - mean t) - (s_c - mean s)|`` (``rank_by="abs_diff"``), or the teacher
       logit (``"teacher"``), or class index order (``"none"``); descending, ties by lower class index.
    2. A stage with ``g`` groups splits the ordered classes into ``g`` contiguous chunks of the sizes of
       ``torch.tensor_split(range(C), g)``.
    3. ``KL_G = T^2 * sum_{c in G} q_t,c (log q_t,c - log q_s,c)`` with ``q = softmax(z_G / T)`` within the group.
    4. ``w_G = 1 - cos(q_t, log q_s)`` (``adaptive=True``; eps 1e-8 clamps each norm; not detached), else 1.
    5. ``L_g = sum_G w_G KL_G``.
    6. ``schedule="joint"``: ``L = 2 * sum_{g=1..K} L_g`` (fine-to-coarse plus coarse-to-fine every step).
       ``schedule="curriculum"``: phases ``[K, ..., 1, 1, ..., K]`` of equal length over ``progress`` in
       [0, 1]; ``L = 2K * L_{g_p}`` with ``p = min(floor(progress * 2K), 2K - 1)``.
    7. ``reduction``: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (leading shape). Rows where
       ``valid`` is False count for nothing; with no valid row the loss is 0 (and differentiable).

    ``variant="released"`` reproduces the authors' public code instead:
    ``2 K T^2 KL_batchmean(softmax over all classes) * mean_rows(1 - cos(p_t, log p_s))``; ``rank_by``,
    ``adaptive`` and ``schedule`` do not apply. With ``reduction="none"`` it returns
    ``2 K T^2 KL_i * mean(1 - cos)`` per row, whose mean is the released loss.

    Gradients flow to ``student_logits`` only. Half-precision inputs are computed in float32.
    """
    num_classes = check_logits(student_logits, teacher_logits)
    stages = _check_stages(stages, num_classes)
    temperature, progress = _check_options(temperature, schedule, progress, rank_by, variant, reduction)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    s, t = mask_rows(*as_rows(student_logits, teacher_logits), mask)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    if variant == "released":
        return _released_loss(s, t, temperature, stages, mask, reduction, leading)

    stage_groups, factor = stage_sequence(stages, schedule, progress)
    layout = layout_for(num_classes, tuple(stage_groups))
    slot = kernel.class_slots(s, t, rank_by, layout, reuse=True)  # consumed in PCDRows.forward
    row = kernel.PCDRows.apply(s, t, slot, layout, factor, temperature, bool(adaptive))
    return reduce_rows(row, mask, reduction, leading)


class PCDLoss(nn.Module):
    """Module form of :func:`pcd_loss`; the constructor takes its keyword arguments.

    ``forward(student_logits, teacher_logits, *, progress=None, valid=None)``: ``progress`` (fraction of
    the distillation schedule done) is needed by ``schedule="curriculum"`` and ignored otherwise.
    """

    needs_progress = True

    def __init__(self, *, temperature: float = 4.0, stages: int = 3, schedule: str = "joint",
                 rank_by: str = "abs_diff", adaptive: bool = True, standardize: bool = False,
                 variant: str = "paper", reduction: str = "mean"):
        super().__init__()
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an int >= 1; got {stages!r}")
        _check_options(temperature, schedule, 0.0, rank_by, variant, reduction)
        self.kwargs = dict(temperature=temperature, stages=stages, schedule=schedule, rank_by=rank_by,
                           adaptive=adaptive, standardize=standardize, variant=variant, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, progress=None, valid=None):
        return pcd_loss(student_logits, teacher_logits, progress=progress, valid=valid, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
