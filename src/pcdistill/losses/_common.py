"""Argument checks, row handling and reductions shared by every loss in this package.

Conventions: logits have shape ``(..., C)``; every leading index is a *row* (a sample, a proposal,
a token). Half-precision inputs are computed in float32; float64 stays float64.
"""
from __future__ import annotations

import functools
import inspect
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


class LossModule(torch.nn.Module):
    """Base of the loss modules: unknown constructor arguments are named with the closest valid one."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__init__
        allowed = [p for p in inspect.signature(init).parameters if p != "self"]

        @functools.wraps(init)
        def checked(self, *args, **kw):
            for key in kw:
                if key not in allowed:
                    raise TypeError(f"{cls.__name__} has no argument {key!r}{closest(key, allowed)}; "
                                    f"it accepts: {', '.join(allowed)}")
            init(self, *args, **kw)

        cls.__init__ = checked

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def flat_rows(student: torch.Tensor, teacher: torch.Tensor):
    """(N, C) views of the logits (no copy for contiguous inputs); the teacher is detached."""
    if teacher.requires_grad:
        teacher = teacher.detach()
    if student.dim() == 2:  # already rows: no view op (a few microseconds a call at vision shapes)
        return student, teacher
    num_classes = student.shape[-1]
    return student.reshape(-1, num_classes), teacher.reshape(-1, num_classes)


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


def check_class_mask(class_mask, num_classes: int, device) -> torch.Tensor | None:
    """Validate ``class_mask``: bool ``(C,)``, True for the classes that take part."""
    if class_mask is None:
        return None
    if not isinstance(class_mask, torch.Tensor) or class_mask.dtype != torch.bool:
        raise TypeError(f"class_mask must be a boolean torch.Tensor of shape ({num_classes},); got "
                        f"{getattr(class_mask, 'dtype', type(class_mask).__name__)}")
    if tuple(class_mask.shape) != (num_classes,):
        raise ValueError(f"class_mask must have shape (C,) = ({num_classes},); got {tuple(class_mask.shape)}")
    return class_mask.to(device)


def masked_standardize(z: torch.Tensor) -> torch.Tensor:
    """Row z-score over the finite entries only (unbiased std, ``+1e-7``); ``-inf`` stays ``-inf``."""
    finite = torch.isfinite(z)
    count = finite.sum(-1, keepdim=True).to(z.dtype)
    mean = torch.where(finite, z, 0.0).sum(-1, keepdim=True) / count.clamp_min(1)
    var = torch.where(finite, (z - mean) ** 2, 0.0).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    return (z - mean) / (var.sqrt() + STD_EPS)


def prepare_rows(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None, class_mask: torch.Tensor | None,
                 dtype: torch.dtype):
    """A chunk of rows in the compute dtype: invalid rows zeroed (padding, even NaN, cannot leak) and
    classes outside ``class_mask`` set to ``-inf`` in both (absent)."""
    if s.dtype != dtype or t.dtype != dtype:
        s, t = s.to(dtype), t.to(dtype)
    if valid is not None:
        keep = valid.unsqueeze(-1)
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    if class_mask is not None:
        s, t = s.masked_fill(~class_mask, float("-inf")), t.masked_fill(~class_mask, float("-inf"))
    return s, t


def cheap_to_look(z: torch.Tensor) -> bool:
    """On the CPU outside a compiled graph a value read back costs no device sync and breaks no graph, so a
    row function may take an unguarded pass and guard only where the result shows it is needed."""
    return z.device.type == "cpu" and not torch.compiler.is_compiling()


def log_softmax_rows(z: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dim; a row of only ``-inf`` gives ``-inf`` (probability 0), not NaN.

    A fresh tensor (written in place here), for the closed-form row functions: not for autograd."""
    out = torch.log_softmax(z, -1)
    # such a row comes out NaN: where a look is cheap, only then is every row's maximum read
    if cheap_to_look(z) and not torch.isnan(out[..., :1]).any():
        return out
    return out.masked_fill_(torch.isneginf(z.amax(-1, keepdim=True)), float("-inf"))


def xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log p - log q)`` with ``0 log 0 = 0`` (as ``F.kl_div``): zero where ``p`` is 0; NaN stays NaN."""
    return torch.where(p == 0, 0.0, p * (log_p - log_q))


def reduce_rows(row_loss: torch.Tensor, valid: torch.Tensor | None, reduction: str, leading_shape):
    """Reduce per-row losses: mean over valid rows (0 when none is valid), sum, or per-row values."""
    if valid is not None:
        row_loss = torch.where(valid, row_loss, 0.0)
    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if valid is None:
        return total / max(row_loss.numel(), 1)  # a python divisor: no host-to-device copy
    return total / valid.sum().to(row_loss.dtype).clamp_min(1)


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
