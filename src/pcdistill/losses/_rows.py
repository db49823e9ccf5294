"""Row-chunked losses with bounded memory: the one mechanism every loss of this package runs on.

A loss is written as a *row function*: given a chunk of rows of student and teacher logits (in the
compute dtype, masked classes already set to ``-inf`` in both), it returns each row's loss and, when
asked, the gradient of each row's loss w.r.t. that row of student logits, in closed form.
:func:`rows_and_grads` calls it chunk by chunk (:class:`RowLoss` for autograd; the fused output-layer loss
directly), so only one chunk's work arrays exist at a time, and keeps
the gradient (in the student's dtype) for the backward pass, which multiplies it by the incoming
per-row weights (a row function that can, PCD's native rows, writes each chunk's gradient straight into
that kept one). Peak extra memory is therefore one logits-sized gradient, the returned gradient in
backward, and one chunk's workspace (:func:`set_memory_budget`). Everything is plain torch with no
data-dependent Python control flow, so the whole call traces into one ``torch.compile`` graph and
forces no host-device sync.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable

import torch

from ._common import (REDUCTIONS, STD_EPS, check_choice, check_class_mask, check_valid, compute_dtype, flat_rows,
                      masked_standardize, prepare_rows)

DEFAULT_BUDGET_MIB = int(os.environ.get("PCDISTILL_MEMORY_BUDGET_MIB", "128"))
_budget_bytes = DEFAULT_BUDGET_MIB * 2**20


def set_memory_budget(mib: float) -> None:
    """Workspace budget per loss call, in MiB (default 128, or ``PCDISTILL_MEMORY_BUDGET_MIB``).

    Rows are processed in chunks whose temporary arrays fit this budget; on top of it a call keeps one
    gradient the size of the student logits (in their dtype) until backward. The default suits a 24 GiB
    machine and an 80 GiB GPU; raise it for speed on small class counts, lower it on a tight device.
    """
    global _budget_bytes
    if isinstance(mib, bool) or not isinstance(mib, (int, float)) or not mib > 0:
        raise ValueError(f"memory budget must be a number of MiB > 0; got {mib!r}")
    _budget_bytes = int(mib * 2**20)


def memory_budget_mib() -> float:
    return _budget_bytes / 2**20


@contextlib.contextmanager
def memory_budget(mib: float):
    """``with memory_budget(512): ...`` runs the block with another workspace budget."""
    previous = _budget_bytes / 2**20
    set_memory_budget(mib)
    try:
        yield
    finally:
        set_memory_budget(previous)


SPEED_CHUNK = 2**19  # logits per chunk at most, whatever the budget: larger chunks only add page faults


def chunk_rows(rows: int, num_classes: int, dtype: torch.dtype, work_arrays: int, most: int = SPEED_CHUNK) -> int:
    """Rows per chunk so that ``work_arrays`` row-sized arrays of ``dtype`` fit the budget (at least 1), and
    a chunk holds at most ``most`` logits (freed and reallocated work arrays of a few MiB stay with the
    process's allocator; arrays of hundreds of MiB go back to the OS and come back as page faults)."""
    per_row = num_classes * dtype.itemsize * work_arrays
    return max(1, min(rows, _budget_bytes // max(per_row, 1), most // max(num_classes, 1)))


# A row function: (s, t, extra, want_grad) -> (row_loss (R,), d row_loss / d s (R, C) or None),
# on prepared rows in the compute dtype (see ``prepare_rows``).
RowFn = Callable[[torch.Tensor, torch.Tensor, tuple, bool], tuple[torch.Tensor, torch.Tensor | None]]


def standardize_backward(x: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """Gradient through :func:`masked_standardize` (closed form, finite entries only)."""
    finite = torch.isfinite(x)
    n = finite.sum(-1, keepdim=True).to(x.dtype)
    centred = torch.where(finite, x - torch.where(finite, x, 0.0).sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
    g = torch.where(finite, grad_z, 0.0)
    g_mean = g.sum(-1, keepdim=True) / n.clamp_min(1)
    scale = std + STD_EPS
    dot = (g * centred).sum(-1, keepdim=True)
    out = (g - g_mean) / scale - centred * dot / ((n - 1).clamp_min(1) * std.clamp_min(torch.finfo(x.dtype).tiny) * scale**2)
    return torch.where(finite, out, 0.0)


def prepared_chunks(student, teacher, valid, class_mask, dtype: torch.dtype, work_arrays: int):
    """``(start, stop, s, t)`` for each chunk of rows that fits the budget, prepared by :func:`prepare_rows`."""
    rows, num_classes = student.shape
    step = chunk_rows(rows, num_classes, dtype, work_arrays)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        keep = None if valid is None else valid[start:stop]
        s, t = prepare_rows(student[start:stop], teacher[start:stop], keep, class_mask, dtype)
        yield start, stop, s, t


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """A loss as rows: its row function, the row-sized work arrays it needs per row, and whether both
    logits are standardised first. Each loss builds one from its checked options (e.g. ``kd_row_spec``)."""

    fn: RowFn
    work_arrays: int
    standardize: bool = False
    chunk_logits: int = SPEED_CHUNK  # at most, per chunk: more for a row function whose calls cost more than its passes
    grad_into: bool = False  # fn also takes out=: it writes a chunk's gradient into the kept one, with no copy


def _chunk(spec: RowSpec, student, teacher, valid, class_mask, dtype, extra, want_grad):
    """Row losses and gradients of one chunk of rows (``valid``: the chunk's rows, or None)."""
    s, t = prepare_rows(student, teacher, valid, class_mask, dtype)
    z_s, z_t = (masked_standardize(s), masked_standardize(t)) if spec.standardize else (s, t)
    loss, g = spec.fn(z_s, z_t, extra, want_grad)
    if want_grad:
        if spec.standardize:
            g = standardize_backward(s, g)
        if valid is not None:
            g = torch.where(valid[:, None], g, 0.0)
    return loss, g


def rows_and_grads(student, teacher, spec: RowSpec, dtype: torch.dtype, valid=None, class_mask=None, extra=(),
                   want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N,)`` row losses of ``spec`` on ``(N, C)`` logits and, with ``want_grad``, each row loss's gradient
    w.r.t. its student row (``(N, C)``, in the student's dtype; zero on invalid rows), chunk by chunk."""
    rows, num_classes = student.shape
    step = chunk_rows(rows, num_classes, dtype, spec.work_arrays, spec.chunk_logits)
    if 0 < rows <= step:  # one chunk: its results are the outputs
        loss, g = _chunk(spec, student, teacher, valid, class_mask, dtype, extra, want_grad)
        if want_grad and g.dtype != student.dtype:
            g = g.to(student.dtype)
        return loss if loss.dtype == dtype else loss.to(dtype), g
    out = torch.empty(rows, dtype=dtype, device=student.device)
    grad = torch.empty_like(student) if want_grad else None
    direct = want_grad and spec.grad_into and not spec.standardize and valid is None and student.dtype == dtype
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        if direct:
            s, t = prepare_rows(student[start:stop], teacher[start:stop], None, class_mask, dtype)
            out[start:stop] = spec.fn(s, t, tuple(x[start:stop] for x in extra), True, out=grad[start:stop])[0]
            continue
        keep = None if valid is None else valid[start:stop]
        out[start:stop], g = _chunk(spec, student[start:stop], teacher[start:stop], keep, class_mask, dtype,
                                    tuple(x[start:stop] for x in extra), want_grad)
        if want_grad:
            grad[start:stop] = g
    return out, grad


class RowLoss(torch.autograd.Function):
    """Losses of a :class:`RowSpec` over ``(N, C)`` logits (:func:`rows_and_grads`), per row (``"none"``) or
    reduced (``"sum"``, ``"mean"`` over the valid rows); gradients to the student only, formed in the forward
    pass and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, student, teacher, spec: RowSpec, dtype, valid, class_mask, reduction, *extra):
        want_grad = ctx.needs_input_grad[0]
        out, grad = rows_and_grads(student, teacher, spec, dtype, valid, class_mask, extra, want_grad)
        if valid is not None:
            out = torch.where(valid, out, 0.0)
        ctx.reduction, ctx.count = reduction, 1
        if reduction == "sum" or (reduction == "mean" and valid is None and out.numel() == 0):
            out = out.sum()
        elif reduction == "mean":  # a python divisor where it can be: no host-to-device copy
            ctx.count = out.numel() if valid is None else valid.sum().to(dtype).clamp_min(1)
            out = out.mean() if valid is None else out.sum() / ctx.count
        if want_grad:
            ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scale = grad_out.unsqueeze(-1) if ctx.reduction == "none" else grad_out / ctx.count
        if scale.dtype != grad.dtype:
            scale = scale.to(grad.dtype)
        return (grad * scale,) + (None,) * (len(ctx.needs_input_grad) - 1)


def row_losses(student: torch.Tensor, teacher: torch.Tensor, spec: RowSpec, *, dtype: torch.dtype, valid=None,
               class_mask=None, extra: tuple = ()) -> torch.Tensor:
    """``(N,)`` row losses of ``spec`` on ``(N, C)`` logits; the teacher is detached (a target, never trained)."""
    return RowLoss.apply(student, teacher.detach(), spec, dtype, valid, class_mask, "none", *extra)


def reduced_row_losses(student: torch.Tensor, teacher: torch.Tensor, spec: RowSpec, *, dtype: torch.dtype,
                       reduction: str, leading: torch.Size, valid=None, class_mask=None, extra: tuple = ()):
    """The loss of ``spec`` on ``(N, C)`` logits reduced as ``reduce_rows`` does (``"none"``: the leading shape)."""
    out = RowLoss.apply(student, teacher, spec, dtype, valid, class_mask, reduction, *extra)  # teacher: flat_rows detached it
    return out.reshape(leading) if reduction == "none" else out


def spec_loss(spec: RowSpec, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, reduction: str,
              valid=None, class_mask=None) -> torch.Tensor:
    """The public loss of ``spec`` on ``(..., C)`` logits that passed ``check_logits``: ``reduction``, ``valid``
    and ``class_mask`` checked, the rows flattened, chunked and reduced (:func:`reduced_row_losses`)."""
    check_choice("reduction", reduction, REDUCTIONS)
    leading = student_logits.shape[:-1]
    mask = check_valid(valid, leading, student_logits.device)
    classes = check_class_mask(class_mask, student_logits.shape[-1], student_logits.device)
    s, t = flat_rows(student_logits, teacher_logits)
    return reduced_row_losses(s, t, spec, dtype=compute_dtype(s, t), reduction=reduction, leading=leading, valid=mask,
                              class_mask=classes)
