"""Causal-LM distillation: student + frozen teacher + a logit loss on every next-token prediction.

    distiller = CausalLMDistiller(student, teacher, loss="pcd", loss_options={"temperature": 2.0},
                                  ce_weight=1.0, alpha=1.0)
    _, losses = distiller(input_ids, labels, attention_mask=mask)
    sum(losses.values()).backward()

Each position ``i < L - 1`` is a row predicting ``labels[:, i + 1]`` (labels equal input_ids, shifted
here, as Hugging Face causal LMs do with ``labels=``); a row counts for nothing when that label is
-100 or the attention mask is 0 at ``i`` or ``i + 1``. With the fused path the loss is computed from
the last hidden states and the output weights chunk by chunk
(:func:`pcdistill.losses.fused_linear_distill_loss`), so the ``(tokens, vocabulary)`` logits never
exist at once; the unfused path materializes them, with the same value.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pcdistill.distiller import DistillerBase
from pcdistill.losses import METHODS, build_loss, call_loss, fused_linear_distill_loss, fused_methods, get_method
from pcdistill.registry import closest

from .models import full_logits, fusable, last_hidden_states, output_layer, unwrap

FUSED = ("auto", "always", "never")
IGNORE = -100
# padding leaves vocabularies of one tokenizer a few hundred rows apart (Qwen2.5 151,936 vs 152,064, Pythia
# 50,304 vs 50,688: under 1%); beyond this share of the larger one they cannot share a tokenizer
VOCAB_TOLERANCE = 0.10
_WARNED: set[str] = set()


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the output layer (the config's ``vocab_size`` when it is no ``nn.Linear``), or None if unknown."""
    layer = output_layer(model)
    if layer is not None:
        return layer[0].shape[0]
    size = getattr(getattr(unwrap(model), "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_vocabularies(student: nn.Module, teacher: nn.Module) -> None:
    """ValueError when the two vocabularies differ by more than padding explains (:data:`VOCAB_TOLERANCE`)."""
    v_s, v_t = vocabulary_size(student), vocabulary_size(teacher)
    if v_s is None or v_t is None or abs(v_s - v_t) <= VOCAB_TOLERANCE * max(v_s, v_t):
        return
    raise ValueError(f"the teacher's vocabulary has {v_t} entries and the student's {v_s}: they differ by "
                     f"{abs(v_s - v_t)} rows, {100 * abs(v_s - v_t) / max(v_s, v_t):.0f}% of the larger, more than "
                     f"padding explains (accepted: up to {VOCAB_TOLERANCE:.0%}; a padded vocabulary adds a few "
                     f"hundred rows). The distillation term compares token ids 0..{min(v_s, v_t) - 1} of both "
                     f"models, so they must share one tokenizer")


def shifted_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``labels[:, 1:]`` with -100 wherever the attention mask is 0 at the predicting or the predicted position."""
    target = labels[:, 1:]
    if attention_mask is not None:
        keep = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        target = target.masked_fill(~keep, IGNORE)
    return target


def materialized_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor,
                              *, method: str, ce_weight: float, reduction: str = "mean", **options):
    """``fused_linear_distill_loss(..., return_parts=True)`` on logits already computed: same value, ``(total,
    {"distill": ..., "ce": ...})``, each part carrying its own gradient (CE computed when ``ce_weight`` is not 0)."""
    rows = student_logits.reshape(-1, student_logits.shape[-1])
    y = target.reshape(-1)
    keep = y != IGNORE
    distill = ce = rows.sum() * 0
    entry = get_method(method)
    if entry.loss is not None:
        t = teacher_logits.reshape(rows.shape[0], -1)
        common = min(rows.shape[-1], t.shape[-1])  # padded vocabularies: the shared first classes
        distill = call_loss(entry.loss, rows[:, :common], t[:, :common], y.masked_fill(~keep, 0), declared_by=entry,
                            valid=keep, reduction="sum", **options)
    if ce_weight:
        # half-precision logits in float32, float64 kept
        ce = F.cross_entropy(rows.to(torch.promote_types(rows.dtype, torch.float32)), y, ignore_index=IGNORE,
                             reduction="sum")
    if reduction == "mean":
        count = keep.sum().clamp(min=1)
        distill, ce = distill / count, ce / count
    return distill + ce_weight * ce, {"distill": distill, "ce": ce}


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)  # points at the caller of losses()


class CausalLMDistiller(DistillerBase):
    """``ce_weight * CE + warmup * alpha * <loss>(student, teacher)`` over every next-token prediction.

    ``loss``: a method that runs fused with the output layer (:func:`pcdistill.losses.fused_methods`):
    "vanilla" (CE only), "kd", "dkd" (its target is the next token), "pcd", "rkl", "jsd" or "tvd";
    ``loss_options`` go to that loss (``pcd_loss``: temperature, stages, schedule, ...; ``progress``
    comes from ``forward`` for a method that needs it, PCD). ``warmup = min(epoch / warmup_epochs, 1)`` as in
    :class:`pcdistill.distiller.Distiller`. The vocabularies may differ in size (a padded one) by up to
    10% of the larger (:data:`VOCAB_TOLERANCE`; more is refused, as no padding explains it): the
    distillation term uses the first ``min(V_s, V_t)`` classes, CE the student's whole vocabulary.
    ``fused``: "auto" uses the fused loss when both models allow it (:func:`pcdistill.lm.models.fusable`)
    and otherwise materializes the logits, warning once per process; "always" refuses to fall back,
    "never" always materializes. The teacher is frozen (:class:`pcdistill.distiller.DistillerBase`).
    ``part_gradients``: each returned entry carries its own gradient (True, default), so weighting the
    entries weights their gradients; on the fused path that keeps two sets of student gradients and runs
    two more ``(tokens, V, H)`` products per chunk. ``False``, for callers that only sum the entries (the
    trainers of this package): one set, the distillation entry carrying the whole gradient and ``ce``
    a detached value, so only their sum has the right gradient.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, loss: str = "pcd",
                 loss_options: dict | None = None, alpha: float = 1.0, ce_weight: float = 1.0,
                 warmup_epochs: float = 0.0, fused: str = "auto", part_gradients: bool = True):
        methods = fused_methods()
        if loss in METHODS and loss not in methods:
            raise ValueError(f"loss {loss!r} cannot distill a causal LM, which runs the loss fused with the output "
                             f"layer: {METHODS.get(loss).unfused_because}; use one of {', '.join(methods)}")
        if loss not in methods:
            raise ValueError(f"unknown loss {loss!r}{closest(str(loss), methods)}; "
                             f"a causal LM distills with one of {', '.join(methods)}")
        if fused not in FUSED:
            raise ValueError(f"fused must be one of {', '.join(FUSED)}; got {fused!r}")
        options = dict(loss_options or {})
        for key in ("reduction", "progress"):
            if key in options:
                raise ValueError(f"loss_options may not set {key!r}: the distiller sets it "
                                 f"(reduction over counted tokens; progress is forward's argument)")
        if loss != "vanilla":
            if teacher is None:
                raise ValueError(f"loss={loss!r} needs a teacher; pass teacher=... or loss='vanilla'")
            build_loss(loss, **options)  # names an unknown or invalid option now, not at the first step
            check_vocabularies(student, teacher)
        elif options:
            raise ValueError(f"loss='vanilla' takes no loss_options; got {sorted(options)}")
        super().__init__(student, teacher, alpha=alpha, warmup_epochs=warmup_epochs)
        self.loss = loss
        self.loss_options = options
        self.ce_weight = float(ce_weight)
        self.fused = fused
        self.part_gradients = bool(part_gradients)
        self._fusable: dict[tuple[int, type], tuple[bool, str]] = {}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                epoch: float | None = None, progress: float | None = None):
        """``(None, {"ce": ..., <loss>: ...})``: the weighted losses, each carrying its own gradient; their sum is
        the training loss."""
        return None, self.losses(self.student, input_ids, labels, attention_mask=attention_mask, epoch=epoch,
                                 progress=progress)

    def use_fused(self, student: nn.Module, with_teacher: bool, tokens: int) -> bool:
        """Whether this step takes the fused path; "auto" warns once per process when it cannot."""
        if self.fused == "never":
            return False
        models = [("student", student)] + ([("teacher", self.teacher)] if with_teacher else [])
        for role, model in models:
            key = (id(model), type(model))  # FSDP2's fully_shard changes the class in place
            if key not in self._fusable:  # fusable() runs the model on two tokens: once per model
                self._fusable[key] = fusable(model)
            ok, reason = self._fusable[key]
            if ok:
                continue
            name = type(model).__name__
            if self.fused == "always":
                raise ValueError(f"fused='always' but the {role} {name} cannot be fused: {reason}")
            vocab = getattr(getattr(unwrap(model), "config", None), "vocab_size", 0)
            _warn_once(f"{role}:{name}:{reason}",
                       f"pcdistill: the {role} {name} cannot use the fused output-layer loss ({reason}); "
                       f"CausalLMDistiller computes the full logits of both models instead: {tokens} tokens x "
                       f"{vocab} classes = {tokens * vocab * 4 / 2**20:.0f} MiB in float32 per model and batch, "
                       f"plus the student's gradient of that size (warned once per process)")
            return False
        return True

    def losses(self, student: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
               attention_mask: torch.Tensor | None = None, epoch: float | None = None,
               progress: float | None = None, num_items: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The weighted losses of one batch, ``student`` being this distiller's student or a wrapper of it (DDP).

        ``num_items``: sum over tokens divided by it (the counted tokens of the whole accumulated
        batch, Hugging Face's ``num_items_in_batch``) instead of the mean over this batch's tokens.
        """
        if input_ids.dim() != 2 or labels.shape != input_ids.shape or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids and labels must both be (batch, length >= 2); got "
                             f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
        weight = 0.0 if self.loss == "vanilla" else self.alpha * self.warmup(epoch)
        distilled = weight != 0  # at warm-up's start the teacher is not run
        method = self.loss if distilled else "vanilla"
        if not distilled and not self.ce_weight:  # neither CE nor (yet) a distillation term: nothing to compute
            return {self.loss: torch.zeros((), device=input_ids.device)}
        options = {}
        if distilled:
            options = dict(self.loss_options)
            if get_method(method).needs_progress:
                options["progress"] = progress
        target = shifted_targets(labels, attention_mask)
        reduction = "mean" if num_items is None else "sum"
        if self.use_fused(student, distilled, input_ids.numel()):
            h_s = last_hidden_states(student, input_ids, attention_mask)[:, :-1]
            w_s, b_s = output_layer(student)
            h_t = w_t = b_t = None
            if distilled:
                with torch.no_grad():
                    h_t = last_hidden_states(self.teacher, input_ids, attention_mask)[:, :-1]
                w_t, b_t = output_layer(self.teacher)
            summed_only = distilled and self.ce_weight and not self.part_gradients
            # with CE, the parts each keep their own gradient (the fused loss's return_parts), unless only their
            # sum is wanted: then one call computes weight * (distill + ce_weight / weight * CE), one gradient set
            out = fused_linear_distill_loss(
                h_s, w_s, h_t, w_t, method=method, student_bias=b_s, teacher_bias=b_t, target=target,
                ignore_index=IGNORE, ce_weight=self.ce_weight / weight if summed_only else self.ce_weight,
                reduction=reduction, return_parts=bool(self.ce_weight), part_gradients=not summed_only, **options)
            if summed_only:
                total, values = out
                # CE's value (detached, logged); the distillation entry carries the whole gradient
                parts = {"ce": values["ce"], "distill": total - self.ce_weight / weight * values["ce"]}
            else:
                parts = out[1] if self.ce_weight else {"distill": out}
        else:
            s = full_logits(student, input_ids, attention_mask)[:, :-1]
            t = None
            if distilled:
                with torch.no_grad():
                    t = full_logits(self.teacher, input_ids, attention_mask)[:, :-1]
            _, parts = materialized_distill_loss(s, t, target, method=method, ce_weight=self.ce_weight,
                                                 reduction=reduction, **options)
        if num_items is not None:
            # no counted token anywhere: 0, not 0 / 0
            count = num_items.clamp(min=1) if torch.is_tensor(num_items) else max(num_items, 1)
            parts = {k: v / count for k, v in parts.items()}
        # each entry carries its own gradient: weighting them weights their gradients
        losses: dict[str, torch.Tensor] = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * parts["ce"]
        if self.loss != "vanilla":
            losses[self.loss] = weight * parts["distill"]
        return losses
