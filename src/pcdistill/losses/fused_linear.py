"""The distillation loss fused with the output layer, for language models with large vocabularies.

The ``(tokens, vocabulary)`` logits of student and teacher are never built for all tokens at once: rows
are processed in chunks that fit the workspace budget, and each chunk's gradients w.r.t. the student's
hidden states, weight and bias are computed inside the forward pass (the approach of Liger-Kernel's
fused linear JSD / cross-entropy), so backward only scales them by the incoming gradient (those of the
distillation term and the cross-entropy kept apart when the two are returned as parts). The gradient
w.r.t. a chunk's logits is closed-form: the distillation term's from the row functions every loss of
this package runs on (:class:`RowSpec`), the cross-entropy's ``softmax - onehot``; so no autograd runs
inside and ``torch.compile(fullgraph=True)`` traces the whole call.
"""
from __future__ import annotations

import dataclasses
from numbers import Integral

import torch

from pcdistill.registry import closest

from ._common import (check_bool, check_class_mask, check_real, check_valid, compute_dtype, device_checks_enabled,
                      reduce_rows)
from ._rows import RowSpec, memory_budget, memory_budget_mib, rows_and_grads
from .methods import METHODS, Method, fused_methods
from .pcd import _check_options, _check_stages, released_grads, released_values

# (rows, V)-sized arrays of a chunk in the compute dtype: student logits (overwritten by their gradient),
# teacher logits and the distillation term's gradient; half-precision weights add their own logits and casts
FUSED_ARRAYS = 3
# share of the memory budget for the chunk's logits; the loss's own workspace gets the rest. Chunks of few rows
# re-read the whole output weights per chunk (at 128k classes 7 rows cost 2-3x the unfused time, 48 rows 1.1x)
LOGITS_SHARE = 0.75


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The Python-side settings of one call (everything but tensors)."""
    method: Method
    released: bool  # PCD's released variant: two passes (its batch-mean weight couples the rows)
    options: dict
    common: int  # V = min(V_s, V_t): the classes the distillation term compares
    ce_weight: float
    ignore_index: int
    with_ce: bool  # compute the cross-entropy (for the total, or only to report it)
    grads: tuple[str, ...]  # the gradient sets kept until backward: ("total",), or the parts' ("distill", "ce")
    reduction: str
    step: int  # rows per chunk
    dtype: torch.dtype  # compute dtype of the losses
    spec: RowSpec | None  # the distillation term as rows (None: vanilla, or PCD's released variant)


def _loss_options(method: Method, loss_kwargs: dict) -> dict:
    """``loss_kwargs`` checked against the keyword options of ``method``'s public loss."""
    allowed = list(method.options())
    for key in loss_kwargs:
        if key not in allowed:
            raise ValueError(f"method {method.name!r} has no option {key!r}{closest(key, allowed)}; "
                             f"it accepts: {', '.join(allowed) or 'no options'}")
    options = dict(loss_kwargs)
    if isinstance(options.get("progress"), torch.Tensor) and options["progress"].numel() == 1:
        options["progress"] = options["progress"].item()  # once, not once per chunk (a device sync on CUDA)
    return options


def _check_linear(who: str, hidden, weight, bias, device=None) -> int:
    """Check one output layer (hidden ``(..., H)``, weight ``(V, H)``, bias ``(V,)``, all on ``device``,
    default the hidden's); returns V."""
    for name, x in ((f"{who}_hidden", hidden), (f"{who}_weight", weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    if hidden.dim() == 0:
        raise ValueError(f"{who}_hidden must have shape (..., H); got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{who}_weight must have shape (V, H) (an nn.Linear's weight); got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{who}_hidden's last dimension H={hidden.shape[-1]} does not match {who}_weight "
                         f"of shape (V, H) = {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{who}_hidden and {who}_weight must have the same dtype; got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != weight.dtype:
            raise TypeError(f"{who}_bias must be a torch.Tensor of {who}_weight's dtype {weight.dtype}; got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}_bias must have shape (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    device = hidden.device if device is None else device
    for name, x in ((f"{who}_hidden", hidden), (f"{who}_weight", weight), (f"{who}_bias", bias)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device}, student_hidden on {device}: all tensors must be on one device")
    return weight.shape[0]


def _check_target(target, leading, device) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer torch.Tensor of shape {tuple(leading)}; got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype (token ids); got {target.dtype}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(f"target must have the hidden states' leading shape {tuple(leading)}; got {tuple(target.shape)}")
    return target.reshape(-1).to(device=device, dtype=torch.long)


def _check_target_range(y, counted, vocab: int, common: int, method: Method) -> None:
    """Targets of counted rows in ``[0, V_s)`` (and in the common classes for a method that reads them, DKD);
    reads the values back."""
    if not y.numel() or not device_checks_enabled(y) or torch.compiler.is_compiling():
        return
    y = y if counted is None else torch.where(counted, y, 0)
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"target must hold token ids in [0, V_s={vocab}) on a counted row; found "
                         f"{low if low < 0 else high}")
    if method.needs_target and high >= common:
        raise ValueError(f"{method.name} needs targets inside the classes both vocabularies share, [0, {common}); "
                         f"found {high}")


def _linear(hidden, weight, bias):
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def _chunks(rows: int, step: int):
    """``(start, stop)`` of each chunk; one empty chunk for zero rows, so the loss still checks its options."""
    for start in range(0, max(rows, 1), step):
        yield start, min(start + step, rows)


class _FusedLinearDistill(torch.autograd.Function):
    """Value and, chunk by chunk inside forward, the gradients w.r.t. the student's hidden, weight and bias.
    Every gradient is in closed form (the losses' row functions, softmax minus one-hot for the
    cross-entropy), so the whole call traces into one ``torch.compile`` graph.

    ``plan.grads`` names the gradient sets kept until backward: ``("total",)``, that of ``distill + ce_weight
    * CE``; or, for parts that each carry their own gradient, ``"distill"`` and/or ``"ce"`` (CE unweighted).
    Backward scales each set by the incoming gradient of everything it feeds and adds them up."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, y, counted, class_mask, plan: _Plan):
        want = ctx.needs_input_grad[:3]
        want_grad = any(want)
        rows, device = h_s.shape[0], h_s.device
        acc = torch.float32 if w_s.dtype in (torch.float16, torch.bfloat16) else w_s.dtype  # weight-grad accumulator
        sets = {name: _zero_grads(h_s, w_s, want, acc) for name in plan.grads} if want_grad else {}
        combined = plan.grads == ("total",)
        ce_scale = plan.ce_weight if combined else float("ce" in plan.grads)  # CE's share of its gradient set
        distill = torch.zeros((), dtype=plan.dtype, device=device)
        ce = torch.zeros_like(distill)
        keep_all = counted if counted is not None else torch.ones(rows, dtype=torch.bool, device=device)
        released = None
        if plan.released:  # batch sums first, then gradients
            released = _released_sums(h_s, w_s, b_s, h_t, w_t, b_t, keep_all, class_mask, plan)
            distill = released[0]
        labelled = None
        if plan.with_ce:
            labelled = y != plan.ignore_index if counted is None else counted
        busy = want_grad or labelled is not None or plan.spec is not None
        for start, stop in _chunks(rows, plan.step) if busy else ():
            z = _linear(h_s[start:stop], w_s, b_s).to(plan.dtype)  # the loss computes in this dtype anyway
            g_distill = g_ce = None
            if plan.method.loss is not None and (want_grad or released is None):
                part, g_distill = _distill_chunk(z, h_t[start:stop], w_t, b_t, y, counted, keep_all, class_mask,
                                                 plan, released, start, stop, want_grad)
                distill = distill + part
            if labelled is not None:
                ce_grad = want_grad and ce_scale != 0
                part, z = _cross_entropy_chunk(z, y[start:stop], labelled[start:stop], ce_grad, ce_scale)
                ce = ce + part
                g_ce = z if ce_grad else None
            if not want_grad:
                continue
            if combined:
                g = g_distill if g_ce is None else g_ce if g_distill is None else _add_columns(g_ce, g_distill)
                chunk_grads = {"total": g}
            else:
                chunk_grads = {"distill": g_distill, "ce": g_ce}
            for name, grads in sets.items():
                _accumulate(grads, chunk_grads[name], h_s[start:stop], w_s, start, stop)
            # this chunk's gradients, freed before the next chunk's logits exist (else one more logits-sized array)
            chunk_grads = g = g_distill = g_ce = z = None
        scale = _mean_scale(counted, rows, plan, device)
        distill, ce = distill * scale, ce * scale
        total = distill + plan.ce_weight * ce
        saved = []
        for name in plan.grads:  # in place and one at a time: no second weight-sized copy
            saved += [None if g is None else g.mul_(scale.to(g.dtype)).to(dtype)
                      for g, dtype in zip(sets.pop(name, (None,) * 3), (h_s.dtype, w_s.dtype, w_s.dtype))]
        ctx.save_for_backward(*saved)
        ctx.grads, ctx.ce_weight = plan.grads, plan.ce_weight
        ctx.mark_non_differentiable(*[x for name, x in (("distill", distill), ("ce", ce)) if name not in plan.grads])
        return total, distill, ce

    @staticmethod
    def backward(ctx, grad_total, grad_distill, grad_ce):
        saved, out = ctx.saved_tensors, [None] * 3
        for i, name in enumerate(ctx.grads):
            # the incoming gradient of everything the set feeds: total = distill + ce_weight * ce
            c = (grad_total if name == "total" else grad_total + grad_distill if name == "distill"
                 else ctx.ce_weight * grad_total + grad_ce)
            for j, g in enumerate(saved[3 * i:3 * i + 3]):
                if g is not None:
                    # in place, as a weight-sized copy would raise the peak; a second backward then fails
                    # autograd's version check
                    g = g.mul_(c.to(g.dtype))
                    out[j] = g if out[j] is None else out[j].add_(g)
        return tuple(out) + (None,) * 7


def _zero_grads(h_s, w_s, want, acc) -> list[torch.Tensor | None]:
    """Zeroed gradients w.r.t. the student's hidden states, weight and bias (those ``want`` asks for); the weight's
    and bias's in the accumulator dtype ``acc``."""
    want_h, want_w, want_b = want
    return [torch.zeros_like(h_s) if want_h else None,
            torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if want_w else None,
            torch.zeros(w_s.shape[0], dtype=acc, device=w_s.device) if want_b else None]


def _accumulate(grads, g, h, w_s, start: int, stop: int) -> None:
    """Add a chunk's gradient ``g`` w.r.t. its logits (the first ``g.shape[1]`` classes) to ``grads``, those
    w.r.t. the student's hidden states (rows ``start:stop``), weight and bias."""
    if g is None:
        return
    grad_h, grad_w, grad_b = grads
    classes = g.shape[1]
    if grad_h is not None:
        grad_h[start:stop] = g.to(w_s.dtype) @ w_s[:classes]
    if grad_w is not None:
        grad_w[:classes].addmm_(g.T.to(grad_w.dtype), h.to(grad_w.dtype))
    if grad_b is not None:
        grad_b[:classes] += g.sum(0).to(grad_b.dtype)


def _add_columns(into: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``into`` with ``g`` added to its first ``g.shape[1]`` columns, in place."""
    into[:, :g.shape[1]] += g
    return into


def _distill_chunk(z, h_t, w_t, b_t, y, counted, keep_all, class_mask, plan: _Plan, released, start, stop,
                   want_grad):
    """One chunk's distillation term (summed over its counted rows) and its gradient w.r.t. ``z[:, :V]``."""
    common = plan.common
    z_common = z if common == z.shape[1] else z[:, :common]
    z_t = _linear(h_t, w_t[:common], None if b_t is None else b_t[:common])
    if released is not None:
        # d(2K A B / N) with the batch sums A (of KL) and B (of weights) fixed by the first pass
        _, kl_sum, weight_sum, count = released
        coef = 2 * plan.options["stages"] / count
        rows = stop - start
        g = released_grads(z_common, z_t, keep_all[start:stop], class_mask, plan.options.get("standardize", False),
                           plan.options["temperature"], plan.dtype, (coef * weight_sum).expand(rows),
                           (coef * kl_sum).expand(rows))
        return torch.zeros((), dtype=plan.dtype, device=z.device), g
    keep = None if counted is None else counted[start:stop]
    extra = (torch.where(keep_all[start:stop], y[start:stop], 0),) if plan.method.needs_target else ()
    loss, g = rows_and_grads(z_common, z_t, plan.spec, plan.dtype, keep, class_mask, extra, want_grad)
    return reduce_rows(loss, keep, "sum", loss.shape), g


def _cross_entropy_chunk(z, y, labelled, want_grad: bool, weight: float):
    """The chunk's summed cross-entropy over its labelled rows and, with ``want_grad``, ``z`` overwritten by
    ``weight`` x its gradient ``softmax(z) - onehot(y)`` (zero on unlabelled rows)."""
    y = torch.where(labelled, y, 0).unsqueeze(-1)
    lse = torch.logsumexp(z, -1, keepdim=True)
    part = torch.where(labelled, (lse - z.gather(-1, y)).squeeze(-1), 0.0).sum()
    if want_grad:
        z = z.sub_(lse).exp_()
        z.scatter_add_(-1, y, torch.full_like(y, -1, dtype=z.dtype))
        z.mul_((labelled.to(z.dtype) * weight).unsqueeze(-1))  # weight in z's dtype (a float32 where would round it)
    return part, z


def _released_sums(h_s, w_s, b_s, h_t, w_t, b_t, keep, class_mask, plan: _Plan):
    """First pass of the released variant: ``(2K A B / N, A, B, N)`` with the batch sums ``A`` of its row KLs
    and ``B`` of its row weights over the ``N`` counted rows (no gradient)."""
    kl_sum = torch.zeros((), dtype=plan.dtype, device=h_s.device)
    weight_sum = torch.zeros_like(kl_sum)
    common = plan.common
    for start, stop in _chunks(h_s.shape[0], plan.step):
        z = _linear(h_s[start:stop], w_s[:common], None if b_s is None else b_s[:common])
        z_t = _linear(h_t[start:stop], w_t[:common], None if b_t is None else b_t[:common])
        kl, weight = released_values(z, z_t, keep[start:stop], class_mask, plan.options.get("standardize", False),
                                     plan.options["temperature"], plan.dtype)
        kl_sum = kl_sum + reduce_rows(kl, keep[start:stop], "sum", kl.shape)
        weight_sum = weight_sum + reduce_rows(weight, keep[start:stop], "sum", weight.shape)
    count = keep.sum().to(plan.dtype).clamp_min(1)
    return 2 * plan.options["stages"] * kl_sum * weight_sum / count, kl_sum, weight_sum, count


def _mean_scale(counted, rows: int, plan: _Plan, device) -> torch.Tensor:
    """1 for ``"sum"``; 1 / counted rows for ``"mean"`` (1 when there are none: the loss is then 0)."""
    one = torch.ones((), dtype=plan.dtype, device=device)
    if plan.reduction == "sum":
        return one
    if counted is None:
        return one / max(rows, 1)
    return one / counted.sum().to(plan.dtype).clamp_min(1)


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                              *, method: str = "pcd", student_bias: torch.Tensor | None = None,
                              teacher_bias: torch.Tensor | None = None, target: torch.Tensor | None = None,
                              ignore_index: int = -100, ce_weight: float = 0.0, class_mask: torch.Tensor | None = None,
                              valid: torch.Tensor | None = None, chunk_rows: int | None = None,
                              reduction: str = "mean", return_parts: bool = False, part_gradients: bool = True,
                              **loss_kwargs):
    """Distillation loss (plus optional cross-entropy) of two output layers, without materializing the logits.

    With ``s = h_s W_s^T + b_s`` (``(N, V_s)``), ``t = h_t W_t^T + b_t`` (``(N, V_t)``) and
    ``V = min(V_s, V_t)``::

        loss = sum_i D(s_i[:V], t_i[:V]) / n + ce_weight * sum_i CE(s_i, y_i) / n

    over the counted rows ``i`` (``target != ignore_index`` and ``valid``), with ``n`` their number
    (``reduction="mean"``; 0 rows give 0) or ``n = 1`` (``"sum"``, e.g. for Hugging Face's
    ``num_items_in_batch`` scaling). ``D`` is the unfused loss of ``method`` with ``loss_kwargs``, any
    method of the table (:mod:`pcdistill.losses.methods`) with a row form (:func:`fused_methods`):
    ``"kd"`` (:func:`kd_loss`), ``"dkd"`` (:func:`dkd_loss`, needs ``target``), ``"pcd"``
    (:func:`pcd_loss`: Progressive Class-level Distillation, Li et al., arXiv 2505.24310, every option,
    ``variant="released"`` included, whose batch-mean weight is handled by a first pass over the rows),
    ``"rkl"`` (:func:`rkl_loss`), ``"jsd"`` (:func:`jsd_loss`, e.g. ``beta=0.5``), ``"tvd"``
    (:func:`tvd_loss`), or ``"vanilla"`` (no ``D``, teacher arguments unused: a fused linear
    cross-entropy). DIST is not fused: its intra-class term couples all rows. ``CE`` is over
    the student's full vocabulary, the model's own LM loss. Value, masking and NaN rules are exactly
    those of the unfused loss on the materialized logits (``class_mask``, of length ``V``, included).

    Vocabularies: the first ``V`` classes of both must be the same tokens (a vocabulary padded to a
    multiple of 64, say); tokenizers that differ otherwise are out of scope.

    Shapes: hidden states ``(..., H_s)`` and ``(..., H_t)`` with the same leading shape, already aligned
    with ``target`` (no shifting here); weights ``(V, H)`` as ``nn.Linear`` stores them; biases ``(V,)``.

    How (Liger-Kernel's fused linear JSD): rows go in chunks of ``chunk_rows`` (default: as many as fit
    3/4 of :func:`pcdistill.losses.memory_budget_mib`, the loss's workspace getting the last quarter);
    per chunk both logits are formed, the unfused loss's row function gives d loss / d logits in closed
    form, and the gradients w.r.t. ``student_hidden``,
    ``student_weight`` and ``student_bias`` are accumulated in the forward pass (in float32 for a half
    precision weight); backward only scales them. The teacher gets no gradient. Memory: the gradients
    themselves plus the budget, whatever the number of tokens and classes (twice the gradients for parts
    that carry their own, below).

    Returns the scalar loss, or ``(loss, {"distill": ..., "ce": ...})`` with ``return_parts=True``: the
    two terms (CE unweighted), each carrying its own gradient, so ``2 * parts["ce"] + 3 * parts["distill"]``
    has the gradient of that weighted sum and ``parts["distill"] + ce_weight * parts["ce"]`` that of
    ``loss`` (with ``ce_weight=0`` CE is only reported, without gradient). The cost, when both terms are
    there: their gradients are accumulated apart in the forward and combined in backward with the
    incoming gradients (no host-device sync, traceable by ``torch.compile``), so a call holds a second
    set of student gradients, one more weight-sized buffer (``V_s x H`` in float32 during the forward for
    a half-precision weight, in the weight's dtype until backward), and runs two more ``(rows, V, H)``
    matrix products per chunk, six instead of four (``bench/lm_loss.py``'s "fused + CE, parts apart" against
    "fused + CE" at 1024x512x32000 on the CPU: +70 MiB, the weight being 62.5 MiB; about 1.3x the time).
    Without ``return_parts``, or with ``part_gradients=False`` (parts only to report: detached values, for a
    caller that only sums them, such as a trainer), one set of gradients is kept, that of ``loss``.

    A target outside ``[0, V_s)`` on a counted row is a ``ValueError`` (checked on the CPU, on CUDA only
    under :func:`pcdistill.losses.set_device_checks`).
    """
    fusable = fused_methods()
    if isinstance(method, str) and method in METHODS and method not in fusable:
        raise ValueError(f"method {method!r} cannot be fused: {METHODS.get(method).unfused_because}; use one of "
                         f"{', '.join(map(repr, fusable))}")
    if not isinstance(method, str) or method not in fusable:
        raise ValueError(f"method must be one of {', '.join(map(repr, fusable))}; got {method!r}"
                         f"{closest(method, fusable)}")
    entry = METHODS.get(method)
    options = _loss_options(entry, loss_kwargs)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (the fused loss returns a scalar); got {reduction!r}"
                         f"{closest(reduction, ('mean', 'sum'))}")
    ce_weight = check_real("ce_weight", ce_weight)
    if ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0; got {ce_weight}")
    check_bool("return_parts", return_parts)
    check_bool("part_gradients", part_gradients)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__} {ignore_index!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None (from the memory budget) or an int >= 1; got {chunk_rows!r}")

    vocab = _check_linear("student", student_hidden, student_weight, student_bias)
    device, leading = student_hidden.device, student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    if entry.loss is None:
        if ce_weight == 0:
            raise ValueError("method 'vanilla' has no distillation term: give ce_weight > 0 (e.g. 1.0) and target")
        if class_mask is not None:
            raise ValueError("class_mask applies to the distillation term, which method 'vanilla' does not have")
        common, h_t, w_t, b_t = vocab, None, None, None
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"method {method!r} needs teacher_hidden and teacher_weight")
        common = min(vocab, _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, device))
        if teacher_hidden.shape[:-1] != leading:
            raise ValueError(f"student_hidden and teacher_hidden must have the same leading shape (one row per "
                             f"token); got {tuple(leading)} and {tuple(teacher_hidden.shape[:-1])}")
        if common < 2:
            raise ValueError(f"the vocabularies share {common} class(es); distillation needs at least 2")
        h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        w_t, b_t = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    classes = check_class_mask(class_mask, common, device)
    counted = check_valid(valid, leading, device)
    y = None
    if target is not None:
        y = _check_target(target, leading, device)
        labelled = y != ignore_index
        counted = labelled if counted is None else counted & labelled
        _check_target_range(y, counted, vocab, common, entry)
    elif entry.needs_target or entry.loss is None or ce_weight != 0:
        needs = f"method {method!r}" if entry.needs_target or entry.loss is None else f"ce_weight={ce_weight}"
        raise ValueError(f"{needs} needs target (token ids of the hidden states' leading shape)")

    options = entry.options() | options  # every option named, defaults filled in
    released = method == "pcd" and options["variant"] == "released"
    if released:  # bypasses pcd_loss's row form, so its checks run here
        options["stages"] = _check_stages(options["stages"], common)
        options["temperature"], _ = _check_options(options["temperature"], options["schedule"], options["progress"],
                                                   options["rank_by"], "released", reduction)
        check_bool("standardize", options["standardize"])
        check_bool("adaptive", options["adaptive"])
    dtype = compute_dtype(student_weight, student_weight if w_t is None else w_t)
    budget = memory_budget_mib() * 2**20
    arrays = FUSED_ARRAYS + (student_weight.dtype != dtype)
    row_bytes = max(vocab, common) * torch.finfo(dtype).bits // 8 * arrays
    step = chunk_rows or min(h_s.shape[0], int(budget * LOGITS_SHARE) // row_bytes)
    spec = None if released or entry.loss is None else entry.row_spec(common, device, **options)
    grads = ("total",)
    if return_parts and part_gradients:  # each part its own gradient; CE has none when it is only reported (ce_weight=0)
        grads = tuple(name for name, term in (("distill", entry.loss is not None),
                                              ("ce", y is not None and ce_weight != 0)) if term)
    plan = _Plan(entry, released, options, common, ce_weight, ignore_index,
                 y is not None and (ce_weight != 0 or return_parts), grads, reduction, max(1, step), dtype, spec)
    with memory_budget(memory_budget_mib() * (1 - LOGITS_SHARE)):  # the loss's workspace inside each chunk
        total, distill, ce = _FusedLinearDistill.apply(h_s, student_weight, student_bias, h_t, w_t, b_t, y, counted,
                                                       classes, plan)
    return (total, {"distill": distill, "ce": ce}) if return_parts else total
