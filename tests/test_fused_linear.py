"""The fused output-layer loss against the unfused loss on materialized logits, in float64.

Reference: ``s = h_s @ W_s.T + b_s``, ``t = h_t @ W_t.T + b_t`` built in full, the public loss of the
method (``kd_loss``, ``dkd_loss``, ``pcd_loss``, ``rkl_loss``, ... from the method table) on
``[..., :min(V_s, V_t)]`` with the counted rows as ``valid``, plus
``ce_weight * F.cross_entropy(s, target, ignore_index)``; gradients by autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcdistill.losses import (fused_linear_distill_loss, fused_methods, get_method, kd_loss, memory_budget,
                              memory_budget_mib)
from pcdistill.losses import fused_linear as fused_module

IGNORE = -100
CASES = [
    ("kd", {}),
    ("kd", {"temperature": 2.0, "standardize": True}),
    ("dkd", {}),
    ("dkd", {"alpha": 0.5, "beta": 2.0, "temperature": 3.0}),
    ("pcd", {}),
    ("pcd", {"schedule": "curriculum", "progress": 0.6}),
    ("pcd", {"standardize": True, "stages": 4}),
    ("pcd", {"rank_by": "teacher", "stages": 5}),
    ("pcd", {"rank_by": "none", "adaptive": False}),
    ("pcd", {"variant": "released"}),
    ("pcd", {"variant": "released", "standardize": True, "temperature": 2.0}),
    ("rkl", {"temperature": 2.0}),
    ("jsd", {"beta": 0.3, "standardize": True}),
    ("tvd", {}),
    ("vanilla", {}),
]
IDS = [m + "".join(f"-{k}={v}" for k, v in kw.items()) for m, kw in CASES]


def layers(leading=(2, 5), h_s=6, h_t=4, v_s=37, v_t=41, bias=True, seed=0, dtype=torch.float64):
    """Hidden states and output layers of student and teacher; the student's require grad."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = {"student_hidden": rand(*leading, h_s).requires_grad_(True),
         "student_weight": rand(v_s, h_s, scale=1.5).requires_grad_(True),
         "student_bias": rand(v_s).requires_grad_(True) if bias else None,
         "teacher_hidden": rand(*leading, h_t), "teacher_weight": rand(v_t, h_t, scale=2.0),
         "teacher_bias": rand(v_t) if bias else None}
    target = torch.randint(0, min(v_s, v_t), leading, generator=g)
    return x, target


def student_params(x):
    return [x[k] for k in ("student_hidden", "student_weight", "student_bias")
            if x[k] is not None and x[k].requires_grad]


def reference(x, method, kw, target=None, ce_weight=0.0, valid=None, class_mask=None, reduction="mean"):
    """The unfused loss on the materialized logits, and its gradients w.r.t. the student's tensors."""
    s = x["student_hidden"] @ x["student_weight"].T
    t = x["teacher_hidden"] @ x["teacher_weight"].T
    if x["student_bias"] is not None:
        s, t = s + x["student_bias"], t + x["teacher_bias"]
    common = min(s.shape[-1], t.shape[-1])
    counted = torch.ones(s.shape[:-1], dtype=torch.bool)
    if target is not None:
        counted &= target != IGNORE
    if valid is not None:
        counted &= valid
    total = s.new_zeros(())
    if method != "vanilla":
        entry = get_method(method)
        args = (target,) if entry.needs_target else ()
        total = total + entry.loss(s[..., :common], t[..., :common], *args, valid=counted, class_mask=class_mask,
                                   reduction=reduction, **kw)
    if ce_weight:
        y = torch.where(counted, target, IGNORE).reshape(-1)
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y, ignore_index=IGNORE, reduction=reduction)
        total = total + ce_weight * (ce if counted.any() else 0.0)  # torch's mean over no row is NaN
    return total, torch.autograd.grad(total, student_params(x), allow_unused=True)


def fused(x, method, kw, combine=lambda total, parts: total, **options):
    """The fused loss and the gradients of ``combine(total, parts)`` (parts: with ``return_parts=True``)."""
    loss = fused_linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], method=method, student_bias=x["student_bias"],
                                     teacher_bias=x["teacher_bias"], **options, **kw)
    value = combine(*loss) if isinstance(loss, tuple) else loss
    return loss, torch.autograd.grad(value, student_params(x))


def assert_same(got, want, rtol=1e-10, atol=1e-10):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=rtol, atol=atol)


def test_every_fused_method_has_cases():
    assert {m for m, _ in CASES} == set(fused_methods())
    assert "dist" not in fused_methods()


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("method, kw", CASES, ids=IDS)
def test_equals_unfused_loss_teacher_vocab_larger(method, kw, chunk_rows):
    """V_t > V_s (a teacher with a padded vocabulary), ignored targets, a valid mask, a class mask, CE."""
    x, target = layers()
    target[0, 1] = target[1, 4] = IGNORE
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 0] = False
    class_mask = None
    if method != "vanilla":
        class_mask = torch.ones(37, dtype=torch.bool)
        class_mask[[3, 30]] = False
    want = reference(x, method, kw, target, 0.5, valid, class_mask)
    got = fused(x, method, kw, target=target, ce_weight=0.5, valid=valid, class_mask=class_mask,
                chunk_rows=chunk_rows)
    assert_same(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method, kw", [c for c in CASES if c[0] != "vanilla"], ids=IDS[:-1])
def test_equals_unfused_loss_student_vocab_larger(method, kw, reduction):
    """V_t < V_s: the student's extra classes are out of the distillation term but in its cross-entropy."""
    x, target = layers(leading=(7,), v_s=45, v_t=30, bias=False, seed=1)
    target[2] = IGNORE
    want = reference(x, method, kw, target, 0.25, reduction=reduction)
    got = fused(x, method, kw, target=target, ce_weight=0.25, reduction=reduction, chunk_rows=2)
    assert_same(got, want)


@pytest.mark.parametrize("method, kw", [c for c in CASES if c[0] in ("kd", "pcd", "jsd")],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] in ("kd", "pcd", "jsd")])
def test_without_target_or_cross_entropy(method, kw):
    x, _ = layers(leading=(6,), seed=2)
    assert_same(fused(x, method, kw, chunk_rows=4), reference(x, method, kw))


def test_sum_is_mean_times_counted_rows():
    x, target = layers(seed=3)
    target[0, :3] = IGNORE
    (mean, parts_mean), _ = fused(x, "pcd", {}, target=target, ce_weight=1.0, return_parts=True)
    (total, parts_sum), _ = fused(x, "pcd", {}, target=target, ce_weight=1.0, reduction="sum", return_parts=True)
    torch.testing.assert_close(total, mean * 7, rtol=1e-12, atol=0)
    for key in ("distill", "ce"):
        torch.testing.assert_close(parts_sum[key], parts_mean[key] * 7, rtol=1e-12, atol=0)


PARTS = [("kd", {}), ("dkd", {}), ("pcd", {}), ("pcd", {"variant": "released"})]


@pytest.mark.parametrize("v_s, v_t", [(37, 41), (45, 30)], ids=["teacher-vocab-larger", "student-vocab-larger"])
@pytest.mark.parametrize("method, kw", PARTS, ids=["kd", "dkd", "pcd", "pcd-released"])
def test_parts_each_carry_their_own_gradient(method, kw, v_s, v_t):
    """Weighting the parts weights their gradients: against the distillation loss and the cross-entropy
    materialized and differentiated separately (float64)."""
    x, target = layers(leading=(7,), v_s=v_s, v_t=v_t, seed=4)
    target[2] = IGNORE
    distill, distill_grads = reference(x, method, kw, target)  # the distillation term alone
    ce, ce_grads = reference(x, "vanilla", {}, target, ce_weight=1.0)  # the cross-entropy alone
    for combination, (w_distill, w_ce) in [(lambda total, p: 2 * p["ce"] + 3 * p["distill"], (3, 2)),
                                           (lambda total, p: sum(p.values()), (1, 1)),
                                           (lambda total, p: total - 0.5 * p["distill"], (0.5, 0.3)),
                                           (lambda total, p: p["ce"], (0, 1))]:
        (total, parts), grads = fused(x, method, kw, target=target, ce_weight=0.3, chunk_rows=3, return_parts=True,
                                      combine=combination)
        torch.testing.assert_close(parts["distill"], distill.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parts["ce"], ce.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total, distill.detach() + 0.3 * ce.detach(), rtol=1e-10, atol=1e-12)
        for g, d, c in zip(grads, distill_grads, ce_grads, strict=True):
            torch.testing.assert_close(g, w_distill * d + w_ce * c, rtol=1e-10, atol=1e-10)


def test_parts_without_a_second_term():
    """CE only reported (ce_weight=0) has no gradient; the distillation term alone, or CE alone (vanilla),
    carries that of the total."""
    x, target = layers(seed=12)
    (_, parts), grads = fused(x, "kd", {}, target=target, ce_weight=0.0, return_parts=True,
                              combine=lambda total, p: 2 * p["distill"])
    assert not parts["ce"].requires_grad
    torch.testing.assert_close(parts["ce"], reference(x, "vanilla", {}, target, ce_weight=1.0)[0].detach(),
                               rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, reference(x, "kd", {}, target)[1], strict=True):
        torch.testing.assert_close(g, 2 * r, rtol=1e-10, atol=1e-10)
    (_, parts), grads = fused(x, "vanilla", {}, target=target, ce_weight=0.5, return_parts=True,
                              combine=lambda total, p: 3 * p["ce"])
    assert not parts["distill"].requires_grad and float(parts["distill"]) == 0
    for g, r in zip(grads, reference(x, "vanilla", {}, target, ce_weight=3.0)[1], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method, kw", CASES, ids=IDS)
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(method, kw, reduction):
    x, target = layers(leading=(5,), seed=5)
    target[:] = IGNORE
    (loss, grads) = fused(x, method, kw, target=target, ce_weight=1.0, reduction=reduction, chunk_rows=2)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_rows_at_all():
    x, _ = layers(leading=(0,), seed=6)
    loss, grads = fused(x, "pcd", {})
    assert loss.item() == 0.0 and grads[0].shape == (0, 6)


def test_bf16_inputs_match_float64_reference_loosely():
    x64, target = layers(leading=(3, 4), v_s=64, v_t=64, seed=7)
    x16 = {k: None if v is None else v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad)
           for k, v in x64.items()}
    x_ref = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in x16.items()}
    for method, kw in [("kd", {}), ("pcd", {}), ("pcd", {"variant": "released"}), ("dkd", {}), ("jsd", {})]:
        (loss, grads) = fused(x16, method, kw, target=target, ce_weight=0.5, chunk_rows=5)
        ref_loss, ref_grads = reference(x_ref, method, kw, target, 0.5)
        assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=3e-2, atol=3e-2)
        for g, r in zip(grads, ref_grads):
            assert (g.double() - r).norm() <= 0.05 * r.norm()


def test_teacher_receives_no_gradient():
    x, target = layers(seed=8)
    for key in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        x[key].requires_grad_(True)
    loss = fused_linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], student_bias=x["student_bias"],
                                     teacher_bias=x["teacher_bias"], target=target, ce_weight=1.0)
    loss.backward()
    assert all(x[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert all(x[k].grad is not None for k in ("student_hidden", "student_weight", "student_bias"))


def test_frozen_output_layer_and_no_grad():
    x, target = layers(seed=9)
    x["student_weight"].requires_grad_(False)
    x["student_bias"].requires_grad_(False)
    loss = fused_linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], student_bias=x["student_bias"],
                                     teacher_bias=x["teacher_bias"], method="kd")
    (g,) = torch.autograd.grad(loss, x["student_hidden"])
    ref_loss, (ref_g,) = reference(x, "kd", {})
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        value = fused_linear_distill_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                          x["teacher_weight"], student_bias=x["student_bias"],
                                          teacher_bias=x["teacher_bias"], method="kd")
    torch.testing.assert_close(value, ref_loss.detach(), rtol=1e-10, atol=1e-12)


def test_default_chunks_fit_the_memory_budget(monkeypatch):
    """With a tiny budget the default chunking splits the rows: each chunk's three logits-sized arrays fit
    3/4 of the budget, and the loss's rows inside run with the last quarter as their workspace."""
    calls, budgets = [], []
    rows_and_grads = fused_module.rows_and_grads

    def spy(s, *a, **k):
        calls.append(s.shape[0])
        budgets.append(memory_budget_mib())
        return rows_and_grads(s, *a, **k)

    monkeypatch.setattr(fused_module, "rows_and_grads", spy)
    x, _ = layers(leading=(40,), v_s=50, v_t=50, seed=10)
    budget_mib = 0.04  # 40 rows x 50 classes x 8 bytes x 3 arrays would need 1.4x that
    with memory_budget(budget_mib):
        got = fused(x, "kd", {})
    assert memory_budget_mib() != budget_mib / 4  # restored after the call
    assert len(calls) > 1 and sum(calls) == 40
    assert max(calls) * 50 * 8 * 3 <= 0.75 * budget_mib * 2**20  # float64 logits, 3 arrays
    assert budgets == [pytest.approx(budget_mib / 4, rel=1e-3)] * len(calls)
    assert_same(got, reference(x, "kd", {}))


BAD = [
    (dict(method="pdc"), ValueError, "did you mean 'pcd'"),
    (dict(method="dist"), ValueError, "cannot be fused"),
    (dict(temprature=2.0), ValueError, "did you mean 'temperature'"),
    (dict(method="kd", stages=3), ValueError, "has no option 'stages'"),
    (dict(method="jsd", betta=0.3), ValueError, "did you mean 'beta'"),
    (dict(method="jsd", beta=2.0), ValueError, r"beta must lie in \[0, 1\]"),
    (dict(method="dkd"), ValueError, "method 'dkd' needs target"),
    (dict(ce_weight=1.0), ValueError, "ce_weight=1.0 needs target"),
    (dict(method="vanilla", target="ok"), ValueError, "ce_weight > 0"),
    (dict(reduction="none"), ValueError, "reduction must be 'mean' or 'sum'"),
    (dict(chunk_rows=0), ValueError, "chunk_rows must be"),
    (dict(ce_weight=-1.0, target="ok"), ValueError, "ce_weight must be >= 0"),
    (dict(target="out of range"), ValueError, r"target must hold token ids in \[0, V_s=37\)"),
    (dict(method="dkd", target="beyond common"), ValueError, r"share, \[0, 30\)"),
    (dict(class_mask=torch.ones(36, dtype=torch.bool)), ValueError, r"class_mask must have shape \(C,\) = \(37,\)"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), ValueError, "valid must have"),
    (dict(stages=99), ValueError, "stages must be an int in"),
    (dict(variant="released", stages=0), ValueError, "stages must be an int in"),
    (dict(return_parts=1), TypeError, "return_parts must be True or False"),
]


@pytest.mark.parametrize("options, error, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_options_name_the_problem(options, error, message):
    x, target = layers(leading=(4,))
    if options.get("target") == "ok":
        options["target"] = target
    elif options.get("target") == "out of range":
        options["target"] = torch.tensor([0, 37, 1, IGNORE])
    elif options.get("target") == "beyond common":
        x, _ = layers(leading=(4,), v_t=30)
        options["target"] = torch.tensor([0, 33, 1, 2])
    method = options.pop("method", "pcd")
    with pytest.raises(error, match=message):
        fused(x, method, {}, **options)


def call(**x):
    return fused_linear_distill_loss(**x)


BAD_SHAPES = [
    (dict(student_hidden=torch.randn(4, 5)), ValueError, r"last dimension H=5 does not match student_weight"),
    (dict(student_weight=torch.randn(37 * 6)), ValueError, r"student_weight must have shape \(V, H\)"),
    (dict(teacher_hidden=torch.randn(3, 4, dtype=torch.float64)), ValueError, "same leading shape"),
    (dict(student_bias=torch.randn(36, dtype=torch.float64)), ValueError, r"student_bias must have shape \(V,\)"),
    (dict(student_hidden=torch.randn(4, 6)), TypeError, "must have the same dtype"),
    (dict(teacher_weight=None), ValueError, "needs teacher_hidden and teacher_weight"),
    (dict(student_hidden=torch.arange(24).reshape(4, 6)), TypeError, "floating dtype"),
    (dict(teacher_weight=torch.randn(1, 4, dtype=torch.float64), teacher_bias=None), ValueError, "share 1 class"),
]


@pytest.mark.parametrize("change, error, message", BAD_SHAPES, ids=[b[2][:30] for b in BAD_SHAPES])
def test_bad_shapes_name_the_problem(change, error, message):
    x, _ = layers(leading=(4,))
    with pytest.raises(error, match=message):
        call(**(x | change))


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("pcd", {"stages": 2}), ("pcd", {"variant": "released", "stages": 2}),
                                            ("dkd", {"return_parts": True})], ids=["pcd", "pcd-released", "dkd-parts"])
def test_compiles_into_one_graph(method, options):
    """fullgraph=True: every gradient is formed in closed form, nothing breaks the graph (no autograd.grad);
    with return_parts, the parts weighted apart."""
    x, target = layers(leading=(2, 3), seed=11)
    target = target.clone()
    target[0, 1] = -100  # an ignored row

    def loss_fn(h, w):
        loss = fused_linear_distill_loss(h, w, x["teacher_hidden"], x["teacher_weight"], target=target,
                                         method=method, ce_weight=0.5, chunk_rows=2, **options)
        return 2 * loss[1]["ce"] + 3 * loss[1]["distill"] if isinstance(loss, tuple) else loss

    torch._dynamo.reset()
    h, w = x["student_hidden"], x["student_weight"]
    want = loss_fn(h, w)
    want_grads = torch.autograd.grad(want, (h, w))
    got = torch.compile(loss_fn, fullgraph=True)(h, w)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
