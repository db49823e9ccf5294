"""Argument checks, row handling and reductions shared by every loss in this package.

Conventions: logits have shape ``(..., C)``; every leading index is a *row* (a sample, a proposal,
a token). Half-precision inputs are computed in float32; float64 stays float64.
"""
from __future__ import annotations

import math
import os
from numbers import Real

import torch

from pcdistill.registry import closest

REDUCTIONS = ("mean", "sum", "none")
STD_EPS = 1e-7

_device_checks = os.environ.get("PCDISTILL_DEVICE_CHECKS", "0") not in ("", "0", "false", "False")


def set_device_checks(enabled: bool) -> None:
    """Turn on checks that need a host-device sync on CUDA (DKD target range), or off again.

    On the CPU these checks always run. On CUDA they are off by default because reading a value
    back stalls the GPU pipeline; turn them on while debugging with ``set_device_checks(True)`` or
    by setting the environment variable ``PCDISTILL_DEVICE_CHECKS=1`` before importing pcdistill.
    """
    global _device_checks
    _device_checks = bool(enabled)


def device_checks_enabled(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" or _device_checks


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}{closest(value, choices)}"
        )


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    return value


def check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return value


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> int:
    """Validate a (student, teacher) pair of logits and return the number of classes C."""
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape (..., C); got a scalar")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape; "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device; got {student.device} and {teacher.device}"
        )
    num_classes = student.shape[-1]
    if num_classes < 2:
        raise ValueError(f"logits need at least 2 classes in their last dimension; got C={num_classes}")
    return num_classes


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def as_rows(student: torch.Tensor, teacher: torch.Tensor):
    """(N, C) views in the compute dtype; the teacher is detached (it is a target, never trained here)."""
    dtype = compute_dtype(student, teacher)
    num_classes = student.shape[-1]
    return student.reshape(-1, num_classes).to(dtype), teacher.detach().reshape(-1, num_classes).to(dtype)


def check_valid(valid, leading_shape, device) -> torch.Tensor | None:
    """Validate a boolean row mask of the logits' leading shape; returns it flattened to (N,)."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a boolean torch.Tensor of shape {tuple(leading_shape)}; got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must have dtype torch.bool; got {valid.dtype}")
    if tuple(valid.shape) != tuple(leading_shape):
        raise ValueError(
            f"valid must have the logits' leading shape {tuple(leading_shape)}; got {tuple(valid.shape)}"
        )
    return valid.reshape(-1).to(device)


def mask_rows(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None):
    """Zero the logits of invalid rows, so padding (even NaN or inf) cannot leak into values or gradients."""
    if valid is None:
        return s, t
    keep = valid.unsqueeze(-1)
    return torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)


def reduce_rows(row_loss: torch.Tensor, valid: torch.Tensor | None, reduction: str, leading_shape):
    """Reduce per-row losses: mean over valid rows (0 when none is valid), sum, or per-row values."""
    if valid is not None:
        row_loss = torch.where(valid, row_loss, 0.0)
    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    count = row_loss.new_tensor(row_loss.numel()) if valid is None else valid.sum().to(row_loss.dtype)
    return total / count.clamp_min(1)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row over classes: ``(z - mean(z)) / (std(z) + 1e-7)``, unbiased std.

    Logit standardisation, Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.
    Half-precision inputs are computed and returned in float32.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor; got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype; got {logits.dtype}")
    if logits.dim() == 0 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., C) with C >= 2; got {tuple(logits.shape)}")
    z = logits.to(compute_dtype(logits))
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + STD_EPS)
