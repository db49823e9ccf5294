"""Logit-distillation losses: pure functions plus thin ``nn.Module`` wrappers, discoverable by name.

    from pcdistill.losses import pcd_loss, build_loss, list_methods
    loss = pcd_loss(student_logits, teacher_logits, temperature=4.0, stages=3)
    module = build_loss("pcd", temperature=4.0)     # PCDLoss(temperature=4.0)
    list_methods()                                  # the method table's names (``methods.py``)

Logits have shape ``(..., C)``; leading dimensions are rows.
"""
from __future__ import annotations

import inspect

from torch import nn

from pcdistill.registry import closest

from ._common import set_device_checks, standardize_logits
from ._rows import memory_budget, memory_budget_mib, set_memory_budget
from .dist import DISTLoss, dist_loss
from .dkd import DKDLoss, dkd_loss
from .fused_linear import fused_linear_distill_loss
from .jsd import JSDLoss, jsd_loss
from .kd import KDLoss, kd_loss
from .methods import METHODS, Method, call_loss, fused_methods, get_method, list_methods
from .pcd import PCDLoss, pcd_loss, set_pcd_backend
from .rkl import RKLLoss, rkl_loss
from .tvd import TVDLoss, tvd_loss


def loss_arguments(method: str) -> dict[str, object]:
    """The keyword arguments (with defaults) that ``build_loss(method, ...)`` accepts."""
    cls = get_method(method).module
    if cls is None:
        return {}
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is p.KEYWORD_ONLY}


def build_loss(method: str, **kwargs) -> nn.Module | None:
    """The loss module of ``method`` built with ``kwargs`` (None for ``"vanilla"``)."""
    allowed = loss_arguments(method)
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{method} loss has no argument {key!r}{closest(key, allowed)}; "
                             f"it accepts: {', '.join(allowed) or 'nothing'}")
    cls = get_method(method).module
    return None if cls is None else cls(**kwargs)


__all__ = ["DISTLoss", "DKDLoss", "JSDLoss", "KDLoss", "METHODS", "Method", "PCDLoss", "RKLLoss", "TVDLoss",
           "build_loss", "call_loss", "dist_loss", "dkd_loss", "fused_linear_distill_loss", "fused_methods",
           "get_method", "jsd_loss", "kd_loss", "list_methods", "loss_arguments", "memory_budget", "memory_budget_mib",
           "pcd_loss", "rkl_loss", "set_device_checks", "set_memory_budget", "set_pcd_backend", "standardize_logits",
           "tvd_loss"]
