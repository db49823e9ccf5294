"""The method table: every distillation method of this package, declared once, by name.

A :class:`Method` is a loss function, its module, the builder of its row function (how the fused
output-layer loss and the chunked driver run it), and the checks its options need against the class
count. What a method *needs* is declared on its module, ``needs_target`` (DKD: the ground-truth class) and
``needs_progress`` (PCD's curriculum); :func:`call_loss` passes them to a loss as it declares.
The config's choices, ``pcdistill list``, ``fused_linear_distill_loss``, the causal-LM distiller, the
tasks' checks and the tests' parametrizations all read this table.

Adding a method: one file (its row function, row-spec builder, loss function and module; see
``rkl.py``) and one :func:`register` call below.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch

from pcdistill.registry import Registry

from ._rows import RowSpec
from .dist import DISTLoss, dist_loss
from .dkd import DKDLoss, dkd_loss, dkd_row_spec
from .jsd import JSDLoss, jsd_loss, jsd_row_spec
from .kd import KDLoss, kd_loss, kd_row_spec
from .pcd import PCDLoss, _check_stages, pcd_loss, pcd_row_spec
from .rkl import RKLLoss, rkl_loss, rkl_row_spec
from .tvd import TVDLoss, tvd_loss, tvd_row_spec

# arguments the callers set (per call), not options of a method (``pcdistill train``'s distill.loss, loss_kwargs)
PER_CALL = ("reduction", "valid", "class_mask")

RowSpecBuilder = Callable[..., RowSpec]  # (num_classes, device, **options) -> RowSpec


@dataclasses.dataclass(frozen=True)
class Method:
    """One distillation method.

    ``loss``: the pure function ``(student_logits, teacher_logits[, target], *, **options)`` (None: vanilla,
    the student on labels alone). ``module``: its ``nn.Module`` form. ``row_spec``: builds the row function
    from ``(num_classes, device, **options)``, checking them, so the loss runs fused with the output layer;
    None when rows are coupled through batch statistics (``unfused_because`` says why). ``fits``:
    ``(num_classes, **options)`` raising ``ValueError`` for options the class count rules out (PCD's stages).
    """

    name: str
    summary: str
    loss: Callable | None = None
    module: type[torch.nn.Module] | None = None
    row_spec: RowSpecBuilder | None = None
    unfused_because: str = ""
    fits: Callable[..., object] | None = None

    @property
    def needs_target(self) -> bool:
        return bool(getattr(self.module, "needs_target", False))

    @property
    def needs_progress(self) -> bool:
        return bool(getattr(self.module, "needs_progress", False))

    @property
    def fusable(self) -> bool:
        """Whether ``fused_linear_distill_loss`` (and so ``task: causal_lm``) runs it."""
        return self.loss is None or self.row_spec is not None

    def options(self) -> dict[str, object]:
        """The keyword options of the loss function with their defaults (``progress`` included; the per-call
        ``reduction``, ``valid`` and ``class_mask`` left out)."""
        if self.loss is None:
            return {}
        return {p.name: p.default for p in inspect.signature(self.loss).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in PER_CALL}

    def check_fits(self, num_classes: int, options: dict) -> None:
        """``ValueError`` when ``options`` (defaults filled in) do not fit ``num_classes`` classes."""
        if self.fits is not None:
            self.fits(num_classes, **(self.options() | options))


METHODS: Registry[Method] = Registry("distillation method")


def register(method: Method) -> Method:
    return METHODS.register(method.name)(method)


def any_classes(builder: Callable[..., RowSpec]) -> RowSpecBuilder:
    """A row-spec builder that does not depend on the class count or device, in the table's signature."""
    def build(num_classes: int, device, **options) -> RowSpec:
        return builder(**options)
    return build


def _pcd_paper_rows(num_classes: int, device, *, variant: str = "paper", **options) -> RowSpec:
    """PCD's paper variant as rows; the released variant couples rows through its batch-mean weight, so the
    fused loss runs it in two passes of its own (``fused_linear``) instead."""
    return pcd_row_spec(num_classes, device, **options)


def _pcd_fits(num_classes: int, *, stages, **_) -> None:
    _check_stages(stages, num_classes)


register(Method("vanilla", "no teacher: the student on its labels alone"))
register(Method("kd", "knowledge distillation, T^2 KL(p_t || p_s) (Hinton et al. 2015)",
                kd_loss, KDLoss, any_classes(kd_row_spec)))
register(Method("dkd", "decoupled KD, alpha TCKD + beta NCKD; needs the target (Zhao et al. 2022)",
                dkd_loss, DKDLoss, any_classes(dkd_row_spec)))
register(Method("dist", "DIST, Pearson correlation of predictions within rows and classes (Huang et al. 2022)",
                dist_loss, DISTLoss,
                unfused_because="its intra-class term correlates each class over all rows at once"))
register(Method("pcd", "Progressive Class-level Distillation (Li et al. 2025)",
                pcd_loss, PCDLoss, _pcd_paper_rows, fits=_pcd_fits))
register(Method("rkl", "reverse KL, T^2 KL(p_s || p_t) (MiniLLM, Gu et al. 2024)",
                rkl_loss, RKLLoss, any_classes(rkl_row_spec)))
register(Method("jsd", "generalized JSD with teacher weight beta (GKD, Agarwal et al. 2024)",
                jsd_loss, JSDLoss, any_classes(jsd_row_spec)))
register(Method("tvd", "total variation distance, T^2 0.5 sum |p_t - p_s| (DistillKit, Liger-Kernel)",
                tvd_loss, TVDLoss, any_classes(tvd_row_spec)))


def call_loss(loss: Callable, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              target: torch.Tensor | None = None, *, progress: float | None = None, declared_by=None, **kwargs):
    """``loss(student_logits, teacher_logits[, target][, progress=progress], **kwargs)``: the target and the
    training progress go only to a loss that declares it needs them, ``needs_target`` (DKD) and
    ``needs_progress`` (PCD) on ``declared_by`` (a :class:`Method`; default ``loss`` itself, a loss module)."""
    owner = loss if declared_by is None else declared_by
    args = ()
    if getattr(owner, "needs_target", False):
        if target is None:
            raise ValueError(f"{getattr(owner, 'name', type(owner).__name__)} needs the target (ground-truth classes)")
        args = (target,)
    if getattr(owner, "needs_progress", False):
        kwargs["progress"] = progress
    return loss(student_logits, teacher_logits, *args, **kwargs)


def list_methods() -> list[str]:
    """Names of the distillation methods; ``"vanilla"`` trains the student on labels alone."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name`` (a ``ValueError`` suggesting the closest name otherwise)."""
    return METHODS.get(name)


def fused_methods() -> list[str]:
    """The methods ``fused_linear_distill_loss`` runs (every one but those coupling rows, e.g. DIST)."""
    return [name for name in METHODS.names() if METHODS.get(name).fusable]
