"""Progressive Class-level Distillation (PCD), as specified in the project's METHOD.md.

Li, Li, Zhang, Xu, "Progressive Class-level Distillation", arXiv 2505.24310 (2025).
The maths is in :func:`pcd_loss`'s docstring; the per-row computation lives in ``_pcd_native`` (the CPU's
default: a C++ loop per row) and ``_pcd_rows`` (plain torch: one sort, scatters; elsewhere), and in the Triton
kernel of ``_pcd_triton`` (used when asked for), which shares ``_pcd_rows``' combination of the groups.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ._common import (REDUCTIONS, LossModule, check_bool, check_choice, check_class_mask, check_logits,
                      check_positive_finite, check_valid, compute_dtype, flat_rows, log_softmax_rows,
                      masked_standardize, reduce_rows, xlogy_diff)
from ._pcd_rows import COS_EPS, WEIGHTS, WORK_ARRAYS, pcd_rows
from ._rows import SPEED_CHUNK, RowSpec, prepared_chunks, reduced_row_losses, standardize_backward

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


RELEASED_WORK_ARRAYS = 16


def released_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, want_grad: bool):
    """Per row: ``T^2 KL(p_t || p_s)``, ``w = 1 - cos(p_t, log p_s)`` over the live classes, and their gradients."""
    live = ~(torch.isneginf(s) & torch.isneginf(t))
    log_p_s, log_p_t = log_softmax_rows(s / temperature), log_softmax_rows(t / temperature)
    p_t = log_p_t.exp()
    kl = xlogy_diff(p_t, log_p_t, log_p_s).sum(-1) * temperature**2
    lq = torch.where(live, log_p_s.clamp_min(-1e15), 0.0)  # a student -inf: the cosine's limit, not NaN
    dot = (p_t * lq).sum(-1, keepdim=True)
    norm_t, norm_s = p_t.norm(dim=-1, keepdim=True), lq.norm(dim=-1, keepdim=True)
    nt, ns = norm_t.clamp_min(COS_EPS), norm_s.clamp_min(COS_EPS)
    cos = dot / (nt * ns)
    weight = (1 - cos).squeeze(-1)
    if not want_grad:
        return kl, weight, None, None
    p_s = torch.where(live, log_p_s.exp(), 0.0)
    mass_t = p_t.sum(-1, keepdim=True)
    d_dot = p_t - mass_t * p_s
    d_norm_s = torch.where(norm_s > COS_EPS, (lq - p_s * lq.sum(-1, keepdim=True)) / ns, 0.0)
    d_weight = -(d_dot / (nt * ns) - cos * d_norm_s / ns) / temperature
    return kl, weight, (p_s * mass_t - p_t) * temperature, d_weight


def released_values(student, teacher, valid, class_mask, standardize: bool, temperature: float, dtype):
    """``(N,)`` row KLs and row weights of the released variant, chunked (no gradient)."""
    rows = student.shape[0]
    kl = torch.empty(rows, dtype=dtype, device=student.device)
    weight = torch.empty_like(kl)
    for start, stop, s, t in prepared_chunks(student, teacher, valid, class_mask, dtype, RELEASED_WORK_ARRAYS):
        if standardize:
            s, t = masked_standardize(s), masked_standardize(t)
        kl[start:stop], weight[start:stop], _, _ = released_rows(s, t, temperature, False)
    return kl, weight


def released_grads(student, teacher, valid, class_mask, standardize: bool, temperature: float, dtype,
                   grad_kl: torch.Tensor, grad_weight: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the student logits of ``sum_i grad_kl_i KL_i + grad_weight_i w_i`` (``(N,)`` each)."""
    grad = torch.empty_like(student)
    for start, stop, s, t in prepared_chunks(student, teacher, valid, class_mask, dtype, RELEASED_WORK_ARRAYS):
        z_s, z_t = (masked_standardize(s), masked_standardize(t)) if standardize else (s, t)
        _, _, d_kl, d_weight = released_rows(z_s, z_t, temperature, True)
        g = grad_kl[start:stop, None] * d_kl + grad_weight[start:stop, None] * d_weight
        if standardize:
            g = standardize_backward(s, g)
        grad[start:stop] = torch.where(valid[start:stop, None], g, 0.0)
    return grad


class _ReleasedRows(torch.autograd.Function):
    """Row KL and weight of the released variant; backward recomputes each chunk (the variant couples rows
    through its batch-mean weight, so no per-row gradient can be formed in the forward)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, class_mask, standardize, temperature, dtype):
        ctx.save_for_backward(student, teacher, valid, class_mask)
        ctx.options = (standardize, temperature, dtype)
        return released_values(student, teacher, valid, class_mask, standardize, temperature, dtype)

    @staticmethod
    def backward(ctx, grad_kl, grad_weight):
        student, teacher, valid, class_mask = ctx.saved_tensors
        grad = released_grads(student, teacher, valid, class_mask, *ctx.options, grad_kl, grad_weight)
        return grad, None, None, None, None, None, None


def _released_loss(s, t, valid, class_mask, standardize, temperature, stages, mask, reduction, leading):
    """The authors' released computation: ``2 K T^2 KL_batchmean(full) * mean_b(1 - cos(p_t, log p_s))``."""
    kl, weight = _ReleasedRows.apply(s, t, valid, class_mask, standardize, temperature, compute_dtype(s, t))
    mean_weight = reduce_rows(weight, mask, "mean", leading)
    # per row: 2K * KL_i * mean(w), so that the mean over rows is the released loss
    return reduce_rows(2 * stages * kl * mean_weight, mask, reduction, leading)


BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("PCDISTILL_PCD_BACKEND", "auto")


def set_pcd_backend(name: str) -> None:
    """PCD's per-row computation.

    ``"auto"`` (default): on the CPU the native rows of ``_pcd_native`` (C++ compiled on first use; where no
    compiler can build it, the torch rows), elsewhere the plain-torch rows of ``_pcd_rows`` (one stable sort;
    traceable, no host sync). ``"torch"``: the plain-torch rows everywhere. ``"triton"``: the Triton kernel of
    ``_pcd_triton`` (tested under ``TRITON_INTERPRET=1`` only, not yet on a GPU: ``bench/gpu.sh`` runs that
    check); for ``weight="prob_cos"`` and for ``K`` near ``C`` it runs the plain-torch rows. Also set by
    ``PCDISTILL_PCD_BACKEND``.
    """
    global _backend
    check_choice("backend", name, BACKENDS)
    _backend = name


def _row_spec(device: torch.device, num_classes: int, stage_groups: list[int], adaptive: bool, weight: str):
    """The row function for the current backend, its work arrays, its largest chunk and whether it writes the
    gradient where told (``out=``; see :func:`set_pcd_backend`)."""
    if _backend == "triton":
        few_atoms = sum(g - 1 for g in set(stage_groups)) < num_classes  # else rank positions as atoms
        if few_atoms and not (adaptive and weight == "prob_cos"):
            from ._pcd_triton import pcd_rows_triton
            return pcd_rows_triton, WORK_ARRAYS, SPEED_CHUNK, False
    elif _backend == "auto" and device.type == "cpu":
        from . import _pcd_native
        # a graph being compiled holds the op, which builds the kernel when it first runs (tracing the build
        # would fail, and torch.compiler.assume_constant_result imports dynamo for every eager user: 1 s, 150 MiB)
        if torch.compiler.is_compiling() or _pcd_native.available():
            return _pcd_native.cpu_rows, _pcd_native.WORK_ARRAYS, _pcd_native.CHUNK_LOGITS, True
    return pcd_rows, WORK_ARRAYS, SPEED_CHUNK, False


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


def _check_all(num_classes, temperature, stages, schedule, progress, rank_by, adaptive, standardize, variant,
               weight="log_prob_cos"):
    """(stages, temperature, progress) checked, for ``num_classes`` classes."""
    stages = _check_stages(stages, num_classes)
    temperature, progress = _check_options(temperature, schedule, progress, rank_by, variant, "mean")
    check_bool("adaptive", adaptive)
    check_bool("standardize", standardize)
    check_choice("weight", weight, WEIGHTS)
    return stages, temperature, progress


def pcd_row_spec(num_classes: int, device: torch.device, *, temperature: float = 4.0, stages: int = 3,
                 schedule: str = "joint", progress: float | None = None, rank_by: str = "abs_diff",
                 adaptive: bool = True, weight: str = "log_prob_cos", standardize: bool = False) -> RowSpec:
    """:func:`pcd_loss` (the paper variant) as rows over ``num_classes`` classes on ``device`` (options checked)."""
    stages, temperature, progress = _check_all(num_classes, temperature, stages, schedule, progress, rank_by,
                                               adaptive, standardize, "paper", weight)
    stage_groups, factor = stage_sequence(stages, schedule, progress)
    fn, work_arrays, chunk_logits, grad_into = _row_spec(torch.device(device), num_classes, stage_groups, adaptive,
                                                         weight)

    def rows(s, t, extra, want_grad, **out):  # out=: the native rows write the gradient where told
        return fn(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight, **out)

    return RowSpec(rows, work_arrays=work_arrays, standardize=standardize, chunk_logits=chunk_logits,
                   grad_into=grad_into)


def pcd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
             stages: int = 3, schedule: str = "joint", progress: float | None = None, rank_by: str = "abs_diff",
             adaptive: bool = True, weight: str = "log_prob_cos", standardize: bool = False, variant: str = "paper",
             reduction: str = "mean", valid: torch.Tensor | None = None,
             class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Progressive Class-level Distillation loss.

    Li, Li, Zhang, Xu, "Progressive Class-level Distillation", arXiv 2505.24310 (2025), as defined by
    this project's METHOD.md (``docs/method.md``). Per row, with ``K = stages``:

    0. ``standardize=True``: z-score ``s`` and ``t`` over classes (unbiased std, ``+1e-7``).
    1. Priority ``d_c = |(t_c - mean t) - (s_c - mean s)|`` (``rank_by="abs_diff"``), or the teacher
       logit (``"teacher"``), or class index order (``"none"``); descending, ties by lower class index.
    2. A stage with ``g`` groups splits the ordered classes into ``g`` contiguous chunks of the sizes of
       ``torch.tensor_split(range(C), g)``.
    3. ``KL_G = T^2 * sum_{c in G} q_t,c (log q_t,c - log q_s,c)`` with ``q = softmax(z_G / T)`` within the group.
    4. ``adaptive=True``: ``w_G = 1 - cos(q_t, log q_s)`` (``weight="log_prob_cos"``, the released code's) or
       ``1 - cos(q_t, q_s)`` (``weight="prob_cos"``, the two probability vectors); eps 1e-8 clamps each norm;
       not detached. ``adaptive=False``: ``w_G = 1``.
    5. ``L_g = sum_G w_G KL_G``.
    6. ``schedule="joint"``: ``L = 2 * sum_{g=1..K} L_g`` (fine-to-coarse plus coarse-to-fine every step).
       ``schedule="curriculum"``: phases ``[K, ..., 1, 1, ..., K]`` of equal length over ``progress`` in
       [0, 1]; ``L = 2K * L_{g_p}`` with ``p = min(floor(progress * 2K), 2K - 1)``.
    7. ``reduction``: ``"mean"`` over valid rows, ``"sum"``, or ``"none"`` (leading shape). Rows where
       ``valid`` is False count for nothing; with no valid row the loss is 0 (and differentiable).

    ``variant="released"`` reproduces the authors' public code instead:
    ``2 K T^2 KL_batchmean(softmax over all classes) * mean_rows(1 - cos(p_t, log p_s))``; ``rank_by``,
    ``adaptive``, ``weight`` and ``schedule`` do not apply. With ``reduction="none"`` it returns
    ``2 K T^2 KL_i * mean(1 - cos)`` per row, whose mean is the released loss.

    Gradients flow to ``student_logits`` only. Half-precision inputs are computed in float32.
    """
    num_classes = check_logits(student_logits, teacher_logits)
    check_choice("variant", variant, VARIANTS)
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    classes = check_class_mask(class_mask, num_classes, student_logits.device)
    s, t = flat_rows(student_logits, teacher_logits)
    if variant == "released":  # the paper path's options are checked by pcd_row_spec
        stages, temperature, _ = _check_all(num_classes, temperature, stages, schedule, progress, rank_by, adaptive,
                                            standardize, variant, weight)
        keep = mask if mask is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        return _released_loss(s, t, keep, classes, standardize, temperature, stages, mask, reduction, leading)
    spec = pcd_row_spec(num_classes, s.device, temperature=temperature, stages=stages, schedule=schedule,
                        progress=progress, rank_by=rank_by, adaptive=adaptive, weight=weight, standardize=standardize)
    return reduced_row_losses(s, t, spec, dtype=compute_dtype(s, t), reduction=reduction, leading=leading, valid=mask,
                              class_mask=classes)


class PCDLoss(LossModule):
    """Module form of :func:`pcd_loss`; the constructor takes its keyword arguments.

    ``forward(student_logits, teacher_logits, *, progress=None, valid=None)``: ``progress`` (fraction of
    the distillation schedule done) is needed by ``schedule="curriculum"`` and ignored otherwise.
    """

    needs_progress = True

    def __init__(self, *, temperature: float = 4.0, stages: int = 3, schedule: str = "joint",
                 rank_by: str = "abs_diff", adaptive: bool = True, weight: str = "log_prob_cos",
                 standardize: bool = False, variant: str = "paper", reduction: str = "mean"):
        super().__init__()
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an int >= 1; got {stages!r}")
        _check_options(temperature, schedule, 0.0, rank_by, variant, reduction)
        check_bool("adaptive", adaptive)
        check_choice("weight", weight, WEIGHTS)
        check_bool("standardize", standardize)
        self.kwargs = dict(temperature=temperature, stages=stages, schedule=schedule, rank_by=rank_by,
                           adaptive=adaptive, weight=weight, standardize=standardize, variant=variant,
                           reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, progress=None, valid=None, class_mask=None):
        return pcd_loss(student_logits, teacher_logits, progress=progress, valid=valid, class_mask=class_mask,
                        **self.kwargs)
