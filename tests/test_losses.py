"""Losses against independent references: a plain per-row, per-group loop written from METHOD.md,
textbook formulas for KD/DKD/DIST/RKL/JSD/TVD, and properties the definitions imply. Tests that apply to
every method are parametrized over the method table (``pcdistill.losses.methods``)."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcdistill import losses
from pcdistill.losses import (DISTLoss, DKDLoss, JSDLoss, KDLoss, PCDLoss, RKLLoss, TVDLoss, call_loss, dist_loss,
                              dkd_loss, get_method, jsd_loss, kd_loss, list_methods, pcd_loss, rkl_loss,
                              standardize_logits, tvd_loss)
from pcdistill.losses import _pcd_native as pcd_native
from pcdistill.losses import _pcd_rows as kernel
from pcdistill.losses import _rows as rows_module
from pcdistill.losses import pcd as pcd_module
from tests.helpers import special_rows


# ----------------------------------------------------------------------------------------------
# The reference: METHOD.md read literally, one row and one group at a time, float64
# ----------------------------------------------------------------------------------------------
def ref_zscore(z):
    return (z - z.mean()) / (z.std(unbiased=True) + 1e-7)


def ref_order(s, t, rank_by):
    num_classes = s.numel()
    if rank_by == "abs_diff":
        d = ((t - t.mean()) - (s - s.mean())).abs().tolist()
        return sorted(range(num_classes), key=lambda c: (-d[c], c))
    if rank_by == "teacher":
        tv = t.tolist()
        return sorted(range(num_classes), key=lambda c: (-tv[c], c))
    return list(range(num_classes))


def ref_chunks(order, groups):
    num_classes = len(order)
    out, start = [], 0
    for j in range(groups):
        size = num_classes // groups + (1 if j < num_classes % groups else 0)
        out.append(order[start:start + size])
        start += size
    return out


def ref_weight(q_t, log_q_s, weight):
    """1 - cos(q_t, log q_s) or, for "prob_cos", 1 - cos(q_t, q_s); each norm clamped at 1e-8."""
    v = log_q_s if weight == "log_prob_cos" else log_q_s.exp()
    norm_t = torch.sqrt((q_t * q_t).sum()).clamp_min(1e-8)
    norm_s = torch.sqrt((v * v).sum() + 1e-300).clamp_min(1e-8)
    return 1 - (q_t * v).sum() / (norm_t * norm_s)


def ref_stage(s, t, order, groups, temperature, adaptive, weight="log_prob_cos"):
    total = s.new_zeros(())
    for group in ref_chunks(order, groups):
        q_t = torch.softmax(t[group] / temperature, 0)
        log_q_t = torch.log_softmax(t[group] / temperature, 0)
        log_q_s = torch.log_softmax(s[group] / temperature, 0)
        kl = temperature**2 * (q_t * (log_q_t - log_q_s)).sum()
        total = total + (ref_weight(q_t, log_q_s, weight) if adaptive else 1.0) * kl
    return total


def ref_pcd(s, t, *, temperature=4.0, stages=3, schedule="joint", progress=None, rank_by="abs_diff",
            adaptive=True, weight="log_prob_cos", standardize=False, reduction="mean", valid=None):
    num_classes = s.shape[-1]
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, num_classes), t.reshape(-1, num_classes)
    mask = [True] * s2.shape[0] if valid is None else valid.reshape(-1).tolist()
    rows = []
    for i in range(s2.shape[0]):
        if not mask[i]:
            rows.append(s2.new_zeros(()))
            continue
        si, ti = s2[i], t2[i]
        if standardize:
            si, ti = ref_zscore(si), ref_zscore(ti)
        order = ref_order(si, ti, rank_by)
        if schedule == "joint":
            fine_to_coarse = sum(ref_stage(si, ti, order, g, temperature, adaptive, weight)
                                 for g in range(stages, 0, -1))
            coarse_to_fine = sum(ref_stage(si, ti, order, g, temperature, adaptive, weight)
                                 for g in range(1, stages + 1))
            rows.append(fine_to_coarse + coarse_to_fine)
        else:
            phases = list(range(stages, 0, -1)) + list(range(1, stages + 1))
            p = min(math.floor(progress * 2 * stages), 2 * stages - 1)
            rows.append(2 * stages * ref_stage(si, ti, order, phases[p], temperature, adaptive, weight))
    row = torch.stack(rows)
    if reduction == "none":
        return row.reshape(lead)
    if reduction == "sum":
        return row.sum()
    return row.sum() / max(sum(mask), 1)


def pair(shape, seed, scale=3.0, dtype=torch.float64, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: many exact ties in the priority and the teacher logits
        s = torch.randint(-2, 3, shape, generator=g).to(dtype)
        t = torch.randint(-2, 3, shape, generator=g).to(dtype)
    else:
        s = torch.randn(shape, generator=g, dtype=dtype) * scale
        t = torch.randn(shape, generator=g, dtype=dtype) * scale
    return s, t


def value_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, t, **kw)
    (out.sum()).backward()
    return out.detach(), s.grad


# every method of the table with a loss, and options that differ from its defaults (a new method gets an entry here,
# so that every test parametrized over the table runs it)
DISTILLING = [m for m in list_methods() if get_method(m).loss is not None]
ROW_METHODS = [m for m in DISTILLING if get_method(m).row_spec is not None]  # those that run as rows
OPTIONS = {"kd": dict(temperature=2.0), "dkd": dict(beta=2.0), "dist": dict(gamma=3.0),
           "pcd": dict(temperature=2.0, stages=2, schedule="curriculum", progress=0.7, rank_by="teacher"),
           "rkl": dict(temperature=2.0), "jsd": dict(beta=0.3, temperature=2.0), "tvd": dict(temperature=3.0)}


def call(method, s, t, target=None, **kw):
    """The loss of ``method`` from the table on ``(..., C)`` logits; a method that needs the target gets one."""
    entry = get_method(method)
    if entry.needs_target and target is None:
        target = torch.arange(s.shape[:-1].numel()).reshape(s.shape[:-1]) % s.shape[-1]
    return entry.loss(s, t, *((target,) if entry.needs_target else ()), **kw)


def test_every_method_of_the_table_has_test_options():
    assert set(OPTIONS) == set(DISTILLING)
    assert {"kd", "dkd", "dist", "pcd", "rkl", "jsd", "tvd"} <= set(DISTILLING)


@pytest.fixture(params=["auto", "torch"])
def backend(request):
    """PCD's rows as the CPU runs them by default (the native loops), and the plain-torch rows (one sort)."""
    losses.set_pcd_backend(request.param)
    yield request.param
    losses.set_pcd_backend("auto")


@pytest.fixture(params=["one_chunk", "row_by_row"])
def chunking(request, monkeypatch):
    """Run a test with all rows in one chunk, and with a budget so small that every row is its own chunk."""
    if request.param == "row_by_row":
        monkeypatch.setattr(rows_module, "_budget_bytes", 1)
    return request.param


# ----------------------------------------------------------------------------------------------
# PCD (paper variant) against the reference
# ----------------------------------------------------------------------------------------------
CASES = [  # (leading shape, C, K)
    ((4,), 10, 3), ((3,), 7, 5), ((5,), 13, 4), ((2,), 2, 2), ((3,), 5, 1), ((2, 3), 11, 7),
    ((6,), 100, 3), ((2,), 31, 6), ((3,), 9, 9),
]


@pytest.mark.parametrize("lead,C,K", CASES)
@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher", "none"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_pcd_matches_reference(lead, C, K, rank_by, adaptive, chunking):
    s, t = pair(lead + (C,), seed=C * 31 + K)
    kw = dict(stages=K, rank_by=rank_by, adaptive=adaptive)
    got, g_got = value_and_grad(pcd_loss, s, t, **kw)
    want, g_want = value_and_grad(ref_pcd, s, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lead,C,K", [((4,), 10, 3), ((2, 3), 11, 7), ((6,), 100, 3), ((3,), 9, 9)])
@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher"])
def test_pcd_prob_cos_weight_matches_reference(lead, C, K, rank_by, backend):
    s, t = pair(lead + (C,), seed=C * 7 + K)
    kw = dict(stages=K, rank_by=rank_by, weight="prob_cos")
    got, g_got = value_and_grad(pcd_loss, s, t, **kw)
    want, g_want = value_and_grad(ref_pcd, s, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    other = pcd_loss(s, t, stages=K, rank_by=rank_by)  # the default weight is another number
    assert abs(other.item() - got.item()) > 1e-6


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher"])
def test_pcd_ties_follow_lower_class_index(seed, rank_by, chunking):
    C, K = 12, 5
    s, t = pair((8, C), seed=seed, integer=True)
    for kw in (dict(stages=K), dict(stages=K, adaptive=False), dict(stages=4, standardize=True)):
        got, g_got = value_and_grad(pcd_loss, s, t, rank_by=rank_by, **kw)
        want, g_want = value_and_grad(ref_pcd, s, t, rank_by=rank_by, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher"])
def test_pcd_torch_rows_ties_follow_lower_class_index(seed, rank_by):
    losses.set_pcd_backend("torch")
    try:
        test_pcd_ties_follow_lower_class_index(seed, rank_by, "one_chunk")
    finally:
        losses.set_pcd_backend("auto")


def explicit_groups_loss(s, t, groups, temperature=4.0):
    """sum_G w_G KL_G for explicitly listed groups of one row (float64)."""
    total = 0.0
    for group in groups:
        q_t = torch.softmax(t[group] / temperature, 0)
        log_q_s = torch.log_softmax(s[group] / temperature, 0)
        kl = temperature**2 * (q_t * (q_t.log() - log_q_s)).sum()
        cos = (q_t * log_q_s).sum() / (q_t.norm().clamp_min(1e-8) * log_q_s.norm().clamp_min(1e-8))
        total = total + (1 - cos) * kl
    return total


def test_ties_are_broken_by_lower_class_index(chunking):
    """Teacher logits 1, 1 for classes 0 and 1: class 0 must join the top group, class 1 the bottom one."""
    s = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    s64, t64 = s[0].double(), t[0].double()
    all_classes = explicit_groups_loss(s64, t64, [[0, 1, 2, 3]])
    right = 2 * (all_classes + explicit_groups_loss(s64, t64, [[3, 0], [1, 2]]))
    wrong = 2 * (all_classes + explicit_groups_loss(s64, t64, [[3, 1], [0, 2]]))
    assert abs(right - wrong) > 1e-3  # the case really distinguishes the two tie rules
    got = pcd_loss(s, t, stages=2, rank_by="teacher")
    assert abs(got.item() - right.item()) < 1e-4


@pytest.mark.parametrize("progress", [0.0, 0.1, 1 / 6, 0.34, 0.5, 0.51, 0.83, 0.999, 1.0])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_curriculum_matches_reference(progress, K, chunking):
    s, t = pair((5, 17), seed=K)
    kw = dict(stages=K, schedule="curriculum", progress=progress)
    got, g_got = value_and_grad(pcd_loss, s, t, **kw)
    want, g_want = value_and_grad(ref_pcd, s, t, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_curriculum_phase_rule():
    """phase p = min(floor(progress * 2K), 2K - 1) over [K, ..., 1, 1, ..., K]."""
    seq = lambda p: pcd_module.stage_sequence(3, "curriculum", p)  # noqa: E731
    # 2K = 6 phases [3, 2, 1, 1, 2, 3]; e.g. 0.17 * 6 = 1.02 -> phase 1; progress 1.0 -> phase 5
    assert [seq(p)[0][0] for p in (0.0, 0.16, 0.17, 0.4, 0.5, 0.66, 0.7, 0.9, 1.0)] == [3, 3, 2, 1, 1, 1, 2, 3, 3]
    assert seq(0.3)[1] == 6.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("standardize", [False, True])
def test_reductions_valid_and_standardize(reduction, standardize, chunking):
    s, t = pair((3, 4, 9), seed=7)
    valid = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, True, False]])
    kw = dict(stages=3, reduction=reduction, standardize=standardize, valid=valid)
    got, g_got = value_and_grad(pcd_loss, s, t, **kw)
    want, g_want = value_and_grad(ref_pcd, s, t, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert torch.all(g_got[~valid] == 0)


def test_invalid_rows_may_hold_garbage():
    s, t = pair((4, 6), seed=3)
    valid = torch.tensor([True, False, True, False])
    s2, t2 = s.clone(), t.clone()
    s2[1], t2[3] = float("nan"), float("inf")
    for fn in (pcd_loss, kd_loss):
        a, ga = value_and_grad(fn, s, t, valid=valid)
        b, gb = value_and_grad(fn, s2, t2, valid=valid)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)
        assert torch.isfinite(gb).all()


@pytest.mark.parametrize("method", ROW_METHODS)
def test_no_valid_row_gives_differentiable_zero(method):
    s, t = pair((3, 5), seed=1)
    s.requires_grad_(True)
    out = call(method, s, t, valid=torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.all(s.grad == 0)


def test_dkd_no_valid_row_gives_differentiable_zero():
    s, t = pair((3, 5), seed=1)
    s.requires_grad_(True)
    out = dkd_loss(s, t, torch.tensor([0, -100, 9]), valid=torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.all(s.grad == 0)


@pytest.mark.parametrize("kw", [dict(stages=3), dict(stages=4, adaptive=False), dict(stages=2, rank_by="teacher"),
                                dict(stages=3, schedule="curriculum", progress=0.6), dict(stages=3, standardize=True),
                                dict(stages=3, weight="prob_cos")])
def test_pcd_gradcheck(kw, chunking):
    s, t = pair((3, 8), seed=11)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pcd_loss(x, t, **kw), (s,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Properties the definition implies
# ----------------------------------------------------------------------------------------------
def test_one_stage_without_weight_is_twice_kd():
    s, t = pair((16, 10), seed=2)
    for T in (1.0, 4.0):
        torch.testing.assert_close(pcd_loss(s, t, stages=1, adaptive=False, temperature=T),
                                   2 * kd_loss(s, t, temperature=T), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher", "none"])
def test_adding_a_constant_to_a_row_changes_nothing(rank_by):
    s, t = pair((6, 12), seed=5)
    shift_s = torch.arange(6, dtype=torch.float64).unsqueeze(-1) * 2.5
    shift_t = -torch.arange(6, dtype=torch.float64).unsqueeze(-1) * 0.75
    for kw in (dict(stages=4), dict(stages=3, standardize=True)):
        a = pcd_loss(s, t, rank_by=rank_by, **kw)
        b = pcd_loss(s + shift_s, t + shift_t, rank_by=rank_by, **kw)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher"])
def test_permuting_classes_changes_nothing(rank_by, chunking):
    s, t = pair((6, 15), seed=9)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    a = pcd_loss(s, t, stages=5, rank_by=rank_by)
    b = pcd_loss(s[:, perm], t[:, perm], stages=5, rank_by=rank_by)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_curriculum_averaged_over_its_phases_equals_joint(K):
    s, t = pair((4, 20), seed=K)
    phases = [(p + 0.5) / (2 * K) for p in range(2 * K)]
    avg = sum(pcd_loss(s, t, stages=K, schedule="curriculum", progress=p) for p in phases) / (2 * K)
    torch.testing.assert_close(avg, pcd_loss(s, t, stages=K), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K,T", [(1, 4.0), (3, 4.0), (5, 2.0)])
def test_released_variant_formula(K, T):
    s, t = pair((8, 10), seed=K)
    s.requires_grad_(True)
    got = pcd_loss(s, t, stages=K, temperature=T, variant="released")
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    cos = F.cosine_similarity(F.softmax(t / T, 1), F.log_softmax(s / T, 1), dim=1)
    want = 2 * K * T**2 * kl * (1 - cos).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    rows = pcd_loss(s, t, stages=K, temperature=T, variant="released", reduction="none")
    torch.testing.assert_close(rows.mean(), want)


def test_adaptive_weight_is_not_detached():
    """The weight's own gradient matters: the gradient differs from one with the weight held constant."""
    s, t = pair((1, 6), seed=4)
    s.requires_grad_(True)
    g_full, = torch.autograd.grad(pcd_loss(s, t, stages=1), s)
    log_q_s = torch.log_softmax(s / 4, 1)
    q_t = torch.softmax(t / 4, 1)
    w = (1 - F.cosine_similarity(q_t, log_q_s, dim=1)).detach()
    kl = 16 * (q_t * (torch.log(q_t) - log_q_s)).sum()
    g_detached, = torch.autograd.grad(2 * w.sum() * kl, s)
    assert not torch.allclose(g_full, g_detached)


def test_group_of_one_class_contributes_nothing():
    s, t = pair((3, 4), seed=8)
    # K = C: the finest stage has groups of one class each
    stage_c = pcd_module.stage_sequence(4, "curriculum", 0.0)
    assert stage_c == ([4], 8.0)
    assert pcd_loss(s, t, stages=4, schedule="curriculum", progress=0.0).item() == 0.0


def test_stage_bounds_follow_tensor_split():
    """Boundaries for any live-class count, fewer classes than groups included (empty trailing groups)."""
    counts = torch.arange(0, 40)
    for g in range(1, 10):
        got = kernel.stage_bounds(counts, g)
        for n in counts.tolist():
            sizes = [len(x) for x in torch.tensor_split(torch.arange(n), g)]
            assert got[n].tolist() == np.cumsum(sizes)[:-1].tolist(), (n, g)


# ----------------------------------------------------------------------------------------------
# The two row implementations: native loops (CPU default), one sort and scatters (plain torch)
# ----------------------------------------------------------------------------------------------
def test_native_rows_agree_with_the_sort_rows():
    """``_pcd_native.pcd_rows_native`` (selection, loops) against ``_pcd_rows.pcd_rows`` (sort, scatters): every
    option and rule, float64 and float32, ties across the cuts, atoms that underflow when shifted by the row's
    maximum, K near C (every rank position its own atom), rows long enough for two threads."""
    pcd_rows_native = pcd_native.pcd_rows_native
    cases = [("abs_diff", True, "log_prob_cos", torch.float64), ("teacher", True, "prob_cos", torch.float64),
             ("none", False, "log_prob_cos", torch.float64), ("abs_diff", True, "prob_cos", torch.float32),
             ("teacher", True, "log_prob_cos", torch.float32), ("abs_diff", False, "log_prob_cos", torch.float32)]
    for C, groups in ((37, [1, 2, 3]), (9, [5]), (64, [1, 2, 3, 4, 5, 6, 7]), (6, list(range(1, 7))),
                      (300, [1, 2, 3]), (5000, [1, 3])):
        s64, t64 = special_rows(C, C)
        s64[0, : C // 2] = t64[0, : C // 2] = 1.0  # one key for half the classes: ties across every cut
        s64[0, C // 2:] -= 6000.0  # atoms whose terms underflow when shifted by the row's maximum
        t64[0, C // 2:] -= 3000.0
        for rank_by, adaptive, weight, dtype in cases:
            s, t = s64.to(dtype), t64.to(dtype)
            for rows in (slice(None), slice(0, 2), slice(0, 1)):  # every rule; two rows; one row
                args = (groups, 2.0, 3.0, adaptive, rank_by, True, weight)
                got, g_got = pcd_rows_native(s[rows], t[rows], *args)
                assert got.dtype == g_got.dtype == dtype
                # the reference in float64 from the same inputs (the kernel sums in float64 whatever the input)
                want, g_want = kernel.pcd_rows(s[rows].double(), t[rows].double(), *args)
                tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
                if dtype == torch.float32 and rank_by == "abs_diff":  # rows 1-2's centred keys tie by float32
                    want32, g_want32 = kernel.pcd_rows(s[rows], t[rows], *args)  # rounding: the float32 rows
                    close = dict(equal_nan=True, rtol=1e-4, atol=1e-4)  # whose float32 sums keep ~4 digits
                    torch.testing.assert_close(got[1:3], want32[1:3], **close)
                    torch.testing.assert_close(g_got[1:3], g_want32[1:3], **close)
                    got[1:3], g_got[1:3] = want[1:3], g_want[1:3]
                torch.testing.assert_close(got[1:].double(), want[1:], equal_nan=True, **tol)
                torch.testing.assert_close(g_got[1:].double(), g_want[1:], equal_nan=True, **tol)
                # row 0's logits span 6000: in float32 (the compute dtype) s/T ~ -2000 rounds by 1e-4
                tol = tol if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
                torch.testing.assert_close(got[:1].double(), want[:1], equal_nan=True, **tol)
                torch.testing.assert_close(g_got[:1].double(), g_want[:1], equal_nan=True, **tol)
    big_s, big_t = (torch.randn(64, 2048, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    args = (big_s, big_t, [1, 2, 3], 2.0, 4.0, True, "abs_diff", True, "log_prob_cos")  # 2 threads, if allowed
    for got, want in zip(pcd_rows_native(*args), kernel.pcd_rows(*args)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    got = pcd_rows_native(s, t, [1, 2], 2.0, 3.0, True, "abs_diff", False)
    assert got[1] is None and got[0].isposinf()[5] and got[0][6:].isnan().all()


def test_rows_with_empty_atoms_in_groups_far_below_zero_match_the_reference(backend):
    """K = 7 over 64 classes repeats cuts (empty atoms, whose maximum is set to 0); in a group of logits near
    -1000 / T their exp(0 - top) overflowed and inf * 0 made the torch rows' loss NaN."""
    s, t = special_rows(64, 64)
    s[0, :32] = t[0, :32] = 1.0
    s[0, 32:] -= 6000.0
    t[0, 32:] -= 3000.0
    s, t = s[:1].requires_grad_(True), t[:1]
    for rank_by in ("teacher", "abs_diff"):
        want = ref_pcd(s, t, temperature=3.0, stages=7, rank_by=rank_by)
        got = pcd_loss(s, t, temperature=3.0, stages=7, rank_by=rank_by)
        (g_want,), (g_got,) = torch.autograd.grad(want, s), torch.autograd.grad(got, s)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9)


def test_an_atom_without_teacher_mass_beside_teacher_logits_far_below_zero_changes_nothing(backend):
    """Four teacher-only -inf classes rank first and fill an atom without teacher mass (its maximum set to 0);
    the rest of the teacher row sits near -3000 / T. Adding a constant to a row changes nothing (METHOD.md),
    so the rows must give what they give 3000 higher. The kernel summed that atom's 0 * exp(0 - top) = 0 * inf
    and returned a wrong loss (-24954 for one such row) until its group sums skipped atoms without mass."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 12, generator=g, dtype=torch.float64)
    t[:, :4] = float("-inf")
    want, g_want = value_and_grad(lambda s, t: pcd_loss(s, t, temperature=1.0, stages=3), s, t)
    got, g_got = value_and_grad(lambda s, t: pcd_loss(s, t, temperature=1.0, stages=3), s, t - 3000.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9)


def test_native_rows_group_classes_as_the_stable_sort():
    """The selection puts each class in the group the stable descending sort (ties to the lower class index)
    puts it in: keys with many ties, -0.0 and masked classes, checked through each row's loss and gradient,
    which change when a class changes group."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        t = torch.randint(-3, 4, (7, 50), generator=g).to(dtype)
        t[t == 0] = torch.where(torch.rand(int((t == 0).sum()), generator=g) < 0.5, -0.0, 0.0).to(dtype)
        s = torch.randn(7, 50, generator=g, dtype=dtype)
        t[1:4][torch.rand(3, 50, generator=g) < 0.4] = NEG
        s[t == NEG] = NEG  # masked classes: other live counts per row
        for groups in ([2, 3, 5], [1, 2, 3, 4, 5, 6, 7], [4]):
            for rank_by in ("teacher", "abs_diff"):
                args = (s, t, groups, 1.0, 2.0, True, rank_by, True, "prob_cos")
                want, g_want = kernel.pcd_rows(*args)
                got, g_got = pcd_native.pcd_rows_native(*args)
                torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
                torch.testing.assert_close(g_got, g_want, rtol=2e-5, atol=1e-6)


def test_without_a_compiler_pcd_runs_the_torch_rows(monkeypatch, tmp_path):
    """Where the kernel cannot be built: one warning that names the compiler and the folder, then the torch
    rows (same loss), and nothing half-built left; with the compiler back, it builds."""
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    pcd_native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler.*kernels.*torch rows"):
            fn = pcd_module._row_spec(torch.device("cpu"), 10, [1, 2, 3], True, "log_prob_cos")[0]
        assert fn is kernel.pcd_rows
        s, t = pair((4, 10), 0)
        losses.set_pcd_backend("torch")
        want = pcd_loss(s, t)
        losses.set_pcd_backend("auto")
        torch.testing.assert_close(pcd_loss(s, t), want, rtol=0, atol=0)
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    finally:
        monkeypatch.undo()
        pcd_native.library.cache_clear()
    assert pcd_native.library() is not None


def test_stages_combined_in_blocks_give_the_same_result(monkeypatch):
    s, t = special_rows(20, 1)
    args = (s, t, [1, 2, 3, 4, 5], 2.0, 4.0, True, "abs_diff", True)
    whole = kernel.pcd_rows(*args)
    monkeypatch.setattr(kernel, "COMBINE_CELLS", 40)  # one or two stages at a time
    blocks = kernel.pcd_rows(*args)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-13, atol=1e-13)


def test_backend_choice():
    """CPU: the native rows by default; the plain-torch rows when asked, and for the Triton backend's
    weight="prob_cos" (the kernel sums what the default weight needs only). Never Triton unless asked."""
    cpu = torch.device("cpu")
    fn, _, _, grad_into = pcd_module._row_spec(cpu, 10, [1, 2, 3], True, "log_prob_cos")
    assert fn is pcd_native.cpu_rows and grad_into  # it writes each chunk's gradient into the kept one
    try:
        losses.set_pcd_backend("torch")
        assert pcd_module._row_spec(cpu, 10, [1, 2, 3], True, "log_prob_cos")[::3] == (kernel.pcd_rows, False)
        losses.set_pcd_backend("triton")
        assert pcd_module._row_spec(cpu, 10, [1, 2, 3], True, "prob_cos")[0] is kernel.pcd_rows
        assert pcd_module._row_spec(cpu, 4, [1, 2, 3, 4], True, "log_prob_cos")[0] is kernel.pcd_rows
    finally:
        losses.set_pcd_backend("auto")
    with pytest.raises(ValueError, match="weight"):
        pcd_loss(*pair((2, 5), 0), weight="prob")


# ----------------------------------------------------------------------------------------------
# dtypes, devices, gradients to the student only, compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    s, t = pair((8, 20), seed=1, dtype=torch.float32)
    s_h, t_h = s.to(dtype).requires_grad_(True), t.to(dtype)
    for method in ROW_METHODS:
        out = call(method, s_h, t_h)
        assert out.dtype == torch.float32
        want = call(method, s_h.detach().float(), t_h.float())
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        out.backward()
        assert s_h.grad.dtype == dtype
        s_h.grad = None


def test_float64_stays_float64_and_float32_matches_float64():
    s, t = pair((32, 100), seed=3)
    assert pcd_loss(s, t).dtype == torch.float64
    a, ga = value_and_grad(pcd_loss, s.float(), t.float())
    b, gb = value_and_grad(pcd_loss, s, t)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", DISTILLING)
def test_gradients_flow_to_student_only(method):
    s, t = pair((6, 9), seed=2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    call(method, s, t).backward()
    assert s.grad is not None and torch.any(s.grad != 0)
    assert t.grad is None


def test_no_gradient_work_without_grad():
    s, t = pair((4, 9), seed=2)
    with torch.no_grad():
        a = pcd_loss(s.requires_grad_(True), t)
    b = pcd_loss(s.detach(), t)
    torch.testing.assert_close(a, b)
    assert not a.requires_grad


def test_extreme_logits_stay_finite():
    """Groups whose logits sit far below the row maximum must not underflow to NaN."""
    s, t = pair((4, 30), seed=6, dtype=torch.float32)
    s[:, 10:] -= 300.0
    t[:, :20] -= 500.0
    out, grad = value_and_grad(pcd_loss, s, t, temperature=1.0, stages=5)
    want, g_want = value_and_grad(ref_pcd, s.double(), t.double(), temperature=1.0, stages=5)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("K", [1, 3])
def test_empty_batch_gives_zero(K, chunking):
    s, t = pair((0, 10), seed=0)
    s.requires_grad_(True)
    out = pcd_loss(s, t, stages=K)
    out.backward()
    assert out.item() == 0.0 and s.grad.shape == (0, 10)


def test_interleaved_calls_keep_their_own_gradients(chunking):
    """Work buffers reused across calls (CPU) never leak into another call's value or saved gradient."""
    shapes = [(5, 40), (3, 17), (5, 40)]
    runs = []
    for i, shape in enumerate(shapes):
        s, t = pair(shape, seed=20 + i)
        s.requires_grad_(True)
        runs.append((s, t, pcd_loss(s, t, stages=3)))
    for s, t, out in reversed(runs):
        out.backward()
        want, g_want = value_and_grad(ref_pcd, s.detach(), t, stages=3)
        torch.testing.assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.grad, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    s, t = pair((16, 40), seed=0, dtype=torch.float32)
    kw = dict(stages=3)
    compiled = torch.compile(lambda a, b: pcd_loss(a, b, **kw), fullgraph=False)
    a, ga = value_and_grad(lambda x, y: compiled(x, y), s, t)
    b, gb = value_and_grad(pcd_loss, s, t, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Baselines against their textbook formulas
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_textbook(T, standardize):
    s, t = pair((12, 10), seed=1)
    s.requires_grad_(True)
    got = kd_loss(s, t, temperature=T, standardize=standardize)
    zs = torch.stack([ref_zscore(r) for r in s]) if standardize else s
    zt = torch.stack([ref_zscore(r) for r in t]) if standardize else t
    want = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="batchmean") * T * T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def ref_dkd_row(s, t, y, alpha, beta, T):
    p_s, p_t = torch.softmax(s / T, 0), torch.softmax(t / T, 0)
    b_s = torch.stack([p_s[y], 1 - p_s[y]])
    b_t = torch.stack([p_t[y], 1 - p_t[y]])
    tckd = (b_t * (b_t.log() - b_s.log())).sum()
    rest = [c for c in range(s.numel()) if c != y]
    q_s, q_t = torch.softmax(s[rest] / T, 0), torch.softmax(t[rest] / T, 0)
    nckd = (q_t * (q_t.log() - q_s.log())).sum()
    return (alpha * tckd + beta * nckd) * T * T


@pytest.mark.parametrize("C", [2, 3, 10])
@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_textbook(C, standardize):
    s, t = pair((9, C), seed=C)
    y = torch.randint(0, C, (9,), generator=torch.Generator().manual_seed(1))
    s.requires_grad_(True)
    got = dkd_loss(s, t, y, alpha=1.5, beta=6.0, temperature=3.0, standardize=standardize)
    zs = torch.stack([ref_zscore(r) for r in s]) if standardize else s
    zt = torch.stack([ref_zscore(r) for r in t]) if standardize else t
    want = torch.stack([ref_dkd_row(zs[i], zt[i], int(y[i]), 1.5, 6.0, 3.0) for i in range(9)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-8, atol=1e-12)


def test_dkd_ignores_targets_of_invalid_rows():
    s, t = pair((4, 6), seed=0)
    y = torch.tensor([1, -100, 5, 99])
    valid = torch.tensor([True, False, True, False])
    got = dkd_loss(s, t, y, valid=valid, reduction="none")
    assert got[1] == 0 and got[3] == 0
    torch.testing.assert_close(got[0], dkd_loss(s[:1], t[:1], y[:1], reduction="sum"))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_textbook(T):
    s, t = pair((16, 10), seed=2)
    got = dist_loss(s, t, beta=2.0, gamma=0.5, temperature=T)
    p_s = torch.softmax(s / T, 1).numpy()
    p_t = torch.softmax(t / T, 1).numpy()

    def pearson(a, b):  # DIST's definition: centred cosine with 1e-8 added to the norm product
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)

    inter = np.mean([pearson(p_s[i], p_t[i]) for i in range(16)])
    intra = np.mean([pearson(p_s[:, c], p_t[:, c]) for c in range(10)])
    want = (2.0 * (1 - inter) + 0.5 * (1 - intra)) * T * T
    assert abs(got.item() - want) < 1e-10 * want
    # and the correlation itself is Pearson's (numpy's corrcoef has no eps)
    assert abs(pearson(p_s[0], p_t[0]) - np.corrcoef(p_s[0], p_t[0])[0, 1]) < 1e-4


def test_standardize_logits_formula():
    z = torch.randn(5, 7, dtype=torch.float64) * 4 + 3
    want = np.stack([(r - r.mean()) / (r.std(ddof=1) + 1e-7) for r in z.numpy()])
    np.testing.assert_allclose(standardize_logits(z).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("method", DISTILLING)
def test_modules_of_the_table_equal_their_functions(method):
    s, t = pair((2, 3, 9), seed=4)
    entry, options = get_method(method), dict(OPTIONS[method])
    progress = options.pop("progress", None)
    module = entry.module(**options)
    target = torch.arange(6).reshape(2, 3)
    args = (target,) if entry.needs_target else ()
    extra = {"progress": progress} if entry.needs_progress else {}
    want = call(method, s, t, target, **options, **extra)
    torch.testing.assert_close(module(s, t, *args, **extra), want, rtol=0, atol=0)
    # call_loss passes the target and the progress as the module, or the table's entry, declares
    torch.testing.assert_close(call_loss(module, s, t, target, progress=progress), want, rtol=0, atol=0)
    torch.testing.assert_close(call_loss(entry.loss, s, t, target, progress=progress, declared_by=entry, **options),
                               want, rtol=0, atol=0)
    assert entry.needs_target == ("target" in inspect.signature(entry.loss).parameters)
    assert entry.needs_progress == ("progress" in inspect.signature(entry.loss).parameters)


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear error that names the argument
# ----------------------------------------------------------------------------------------------
S, T_ = torch.randn(4, 10), torch.randn(4, 10)
BAD = [
    (lambda: pcd_loss(S, torch.randn(4, 9)), ValueError, "same shape"),
    (lambda: pcd_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "scalar"),
    (lambda: pcd_loss(torch.randn(4, 1), torch.randn(4, 1)), ValueError, "2 classes"),
    (lambda: pcd_loss(S, T_, stages=0), ValueError, "stages"),
    (lambda: pcd_loss(S, T_, stages=11), ValueError, "stages"),
    (lambda: pcd_loss(S, T_, stages=2.0), TypeError, "stages"),
    (lambda: pcd_loss(S, T_, stages=True), TypeError, "stages"),
    (lambda: pcd_loss(S, T_, temperature=0), ValueError, "temperature"),
    (lambda: pcd_loss(S, T_, temperature=-1.0), ValueError, "temperature"),
    (lambda: pcd_loss(S, T_, temperature=float("nan")), ValueError, "temperature"),
    (lambda: pcd_loss(S, T_, temperature=float("inf")), ValueError, "temperature"),
    (lambda: pcd_loss(S, T_, temperature="4"), TypeError, "temperature"),
    (lambda: pcd_loss(S.long(), T_), TypeError, "student_logits"),
    (lambda: pcd_loss(S, T_.int()), TypeError, "teacher_logits"),
    (lambda: pcd_loss(S, T_, schedule="joined"), ValueError, "schedule"),
    (lambda: pcd_loss(S, T_, rank_by="abs"), ValueError, "rank_by"),
    (lambda: pcd_loss(S, T_, variant="official"), ValueError, "variant"),
    (lambda: pcd_loss(S, T_, reduction="avg"), ValueError, "reduction"),
    (lambda: pcd_loss(S, T_, schedule="curriculum"), ValueError, "progress"),
    (lambda: pcd_loss(S, T_, schedule="curriculum", progress=1.5), ValueError, "progress"),
    (lambda: pcd_loss(S, T_, schedule="curriculum", progress=-0.1), ValueError, "progress"),
    (lambda: pcd_loss(S, T_, schedule="curriculum", progress=float("nan")), ValueError, "progress"),
    (lambda: pcd_loss(S, T_, valid=torch.ones(5, dtype=torch.bool)), ValueError, "valid"),
    (lambda: pcd_loss(S, T_, valid=torch.ones(4)), TypeError, "valid"),
    (lambda: kd_loss(S, torch.randn(3, 10)), ValueError, "same shape"),
    (lambda: kd_loss(S, T_, temperature=0.0), ValueError, "temperature"),
    (lambda: kd_loss(S, T_, reduction="max"), ValueError, "reduction"),
    (lambda: kd_loss(S, T_, valid=torch.ones(4, 1, dtype=torch.bool)), ValueError, "valid"),
    (lambda: dkd_loss(S, T_, torch.arange(3)), ValueError, "target"),
    (lambda: dkd_loss(S, T_, torch.tensor([0, 1, 2, 10])), ValueError, "target"),
    (lambda: dkd_loss(S, T_, torch.tensor([0, 1, -1, 2])), ValueError, "target"),
    (lambda: dkd_loss(S, T_, torch.zeros(4)), TypeError, "target"),
    (lambda: dkd_loss(S, T_, torch.arange(4), temperature=-2), ValueError, "temperature"),
    (lambda: dkd_loss(S, T_, torch.arange(4), alpha=float("nan")), ValueError, "alpha"),
    (lambda: dist_loss(S, T_[:, :5]), ValueError, "same shape"),
    (lambda: dist_loss(S, T_, temperature=0), ValueError, "temperature"),
    (lambda: standardize_logits(torch.arange(4)), TypeError, "logits"),
    (lambda: PCDLoss(schedule="warm"), ValueError, "schedule"),
    (lambda: PCDLoss(stages=0), ValueError, "stages"),
    (lambda: KDLoss(temperature=-1), ValueError, "temperature"),
    (lambda: DKDLoss(reduction="x"), ValueError, "reduction"),
    (lambda: rkl_loss(S, T_, temperature=0.0), ValueError, "temperature"),
    (lambda: rkl_loss(S, T_[:2]), ValueError, "same shape"),
    (lambda: jsd_loss(S, T_, beta=1.5), ValueError, r"beta must lie in \[0, 1\]"),
    (lambda: jsd_loss(S, T_, beta=-0.1), ValueError, "beta"),
    (lambda: jsd_loss(S, T_, beta=float("nan")), ValueError, "beta"),
    (lambda: jsd_loss(S, T_, beta="0.5"), TypeError, "beta"),
    (lambda: jsd_loss(S, T_, valid=torch.ones(4)), TypeError, "valid"),
    (lambda: tvd_loss(S, T_, reduction="avg"), ValueError, "reduction"),
    (lambda: tvd_loss(S, T_, class_mask=torch.ones(9, dtype=torch.bool)), ValueError, "class_mask"),
    (lambda: RKLLoss(temperature=-1.0), ValueError, "temperature"),
    (lambda: JSDLoss(beta=2.0), ValueError, "beta"),
    (lambda: TVDLoss(reduction="max"), ValueError, "reduction"),
]


@pytest.mark.parametrize("call,exc,word", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_name_the_problem(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_unknown_choice_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'curriculum'"):
        pcd_loss(S, T_, schedule="curriculumm", progress=0.5)


def test_device_checks_toggle_exists_and_cpu_always_checks():
    losses.set_device_checks(False)
    try:
        with pytest.raises(ValueError, match="target"):
            dkd_loss(S, T_, torch.tensor([0, 1, 2, 10]))
    finally:
        losses.set_device_checks(False)


@pytest.mark.parametrize("shape", [(1, 2), (3, 2), (1, 1000), (2, 3, 4, 5), (7, 3)])
@pytest.mark.parametrize("K", [1, 2])
def test_valid_edge_shapes_do_not_crash(shape, K):
    s, t = pair(shape, seed=0, dtype=torch.float32)
    for kw in (dict(), dict(schedule="curriculum", progress=1.0), dict(variant="released"), dict(rank_by="none")):
        out = pcd_loss(s, t, stages=min(K, shape[-1]), **kw)
        assert torch.isfinite(out)
    assert torch.isfinite(pcd_loss(s, t, stages=shape[-1]))
    assert torch.isfinite(dist_loss(s, t)) and torch.isfinite(kd_loss(s, t))


# ----------------------------------------------------------------------------------------------
# Masked classes and non-finite values (docs/method.md): each rule against the reference on sliced rows
# ----------------------------------------------------------------------------------------------
NEG = float("-inf")


def ref_group_terms(s, t, temperature, weight="log_prob_cos"):
    """KL and adaptive weight of one group by the rules: teacher -inf is probability 0 (0 log 0 = 0)."""
    if torch.isneginf(t).all():  # no teacher mass in the group: every class contributes 0
        return s.new_zeros(()), s.new_ones(())
    q_t = torch.softmax(t / temperature, 0)
    log_q_t = torch.log_softmax(t / temperature, 0)
    log_q_s = torch.log_softmax(s / temperature, 0)
    kl = temperature**2 * torch.where(q_t > 0, q_t * (log_q_t - log_q_s), 0.0).sum()
    v = log_q_s if weight == "log_prob_cos" else log_q_s.exp()
    cos = (q_t * v).sum() / (q_t.norm().clamp_min(1e-8) * v.norm().clamp_min(1e-8))
    return kl, 1 - cos


def ref_masked_key(s, t, rank_by):
    both = torch.isfinite(s) & torch.isfinite(t)
    if rank_by == "abs_diff":
        d = ((t - t[both].mean()) - (s - s[both].mean())).abs()
        return [float(d[c].detach()) if both[c] else math.inf for c in range(s.numel())]
    if rank_by == "teacher":
        return t.detach().tolist()
    return [-c for c in range(s.numel())]


def ref_pcd_masked_row(s, t, stages, temperature=4.0, rank_by="abs_diff", adaptive=True, weight="log_prob_cos"):
    """One row by METHOD.md's masking rules, written literally: slice, rank, tensor_split, sum."""
    if torch.isnan(s).any() or torch.isnan(t).any():
        return s.new_tensor(math.nan)
    live = ~(torch.isneginf(s) & torch.isneginf(t))
    s, t = s[live], t[live]
    if (torch.isneginf(s) & ~torch.isneginf(t)).any():
        return s.new_tensor(math.inf)
    key = ref_masked_key(s, t, rank_by)
    order = sorted(range(s.numel()), key=lambda c: (-key[c], c))
    total = s.new_zeros(())
    for g in range(1, stages + 1):
        for group in torch.tensor_split(torch.tensor(order, dtype=torch.long), g):
            if group.numel() < 2:
                continue
            kl, w = ref_group_terms(s[group], t[group], temperature, weight)
            total = total + (w if adaptive else 1.0) * kl
    return 2 * total


def masked_pair(rows, C, seed, absent=0.3, teacher_only=0.1):
    s, t = pair((rows, C), seed)
    g = torch.Generator().manual_seed(seed + 1)
    both = torch.rand(rows, C, generator=g) < absent
    t_only = (torch.rand(rows, C, generator=g) < teacher_only) & ~both
    s[both] = NEG
    t[both | t_only] = NEG
    return s, t


def ref_rows_value_and_grad(ref_row, s, t):
    s = s.detach().clone().requires_grad_(True)
    rows = torch.stack([ref_row(s[i], t[i]) for i in range(s.shape[0])])
    rows[torch.isfinite(rows)].sum().backward()
    return rows.detach(), s.grad


@pytest.mark.parametrize("C,K", [(12, 3), (9, 5), (30, 7), (6, 6)])
@pytest.mark.parametrize("rank_by", ["abs_diff", "teacher", "none"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_pcd_masked_classes_equal_sliced_rows(C, K, rank_by, adaptive, chunking, backend):
    s, t = masked_pair(8, C, seed=C + K)
    s[0, :] = NEG  # a row with no live class
    t[0, :] = NEG
    s[1, : C - 2], t[1, : C - 2] = NEG, NEG  # fewer live classes than groups: empty groups count 0
    kw = dict(stages=K, rank_by=rank_by, adaptive=adaptive)
    got, g_got = value_and_grad(pcd_loss, s, t, reduction="none", **kw)
    want, g_want = ref_rows_value_and_grad(lambda a, b: ref_pcd_masked_row(a, b, **kw), s, t)
    assert got[0] == 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("C,K", [(12, 3), (30, 7)])
def test_pcd_prob_cos_masked_classes_equal_sliced_rows(C, K, backend):
    s, t = masked_pair(8, C, seed=C * K)
    s[1, : C - 2], t[1, : C - 2] = NEG, NEG
    kw = dict(stages=K, weight="prob_cos")
    got, g_got = value_and_grad(pcd_loss, s, t, reduction="none", **kw)
    want, g_want = ref_rows_value_and_grad(lambda a, b: ref_pcd_masked_row(a, b, **kw), s, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-10)


def test_student_only_minus_inf_gives_plus_inf_and_nan_gives_nan_for_that_row(chunking):
    s, t = pair((4, 10), seed=3)
    s[1, 2] = NEG  # the teacher keeps class 2: the true value is +inf
    s[2, 5] = math.nan
    t[3, 0] = math.nan
    for fn in (lambda a, b: pcd_loss(a, b, reduction="none"), lambda a, b: kd_loss(a, b, reduction="none"),
               lambda a, b: dkd_loss(a, b, torch.tensor([0, 1, 3, 4]), reduction="none"),
               lambda a, b: pcd_loss(a, b, reduction="none", stages=7, rank_by="teacher")):
        out = fn(s, t)
        assert out[0].isfinite() and out[1] == math.inf and out[2].isnan() and out[3].isnan()
    clean = pcd_loss(s[:1], t[:1], reduction="none")
    torch.testing.assert_close(pcd_loss(s, t, reduction="none")[:1], clean)
    assert dist_loss(s, t, reduction="none")[2:].isnan().all()


@pytest.mark.parametrize("fn", DISTILLING + ["pcd_k7_teacher", "released", "jsd_beta0"])
def test_class_mask_equals_slicing(fn, chunking):
    s, t = pair((6, 15), seed=11)
    keep = torch.ones(15, dtype=torch.bool)
    keep[[0, 4, 5, 14]] = False
    s[:, ~keep] = torch.randn(6, 4, dtype=s.dtype) * 50  # whatever sits there must not matter
    target = torch.tensor([1, 2, 3, 6, 7, 8])
    sliced_target = torch.tensor([0, 1, 2, 3, 4, 5])  # classes 1,2,3,6,7,8 are columns 0..5 after slicing
    calls = {
        "pcd_k7_teacher": lambda a, b, m, y: pcd_loss(a, b, class_mask=m, stages=7, rank_by="teacher"),
        "released": lambda a, b, m, y: pcd_loss(a, b, class_mask=m, variant="released"),
        "jsd_beta0": lambda a, b, m, y: jsd_loss(a, b, class_mask=m, beta=0.0),
    }.get(fn, lambda a, b, m, y: call(fn, a, b, y, class_mask=m))
    got, g_got = value_and_grad(lambda a, b: calls(a, b, keep, target), s, t)
    want, g_want = value_and_grad(lambda a, b: calls(a, b, None, sliced_target), s[:, keep], t[:, keep])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got[:, keep], g_want, rtol=1e-9, atol=1e-12)
    assert (g_got[:, ~keep] == 0).all()


@pytest.mark.parametrize("fn", ["kd", "dkd", "released"])
def test_minus_inf_in_both_equals_slicing_for_the_baselines(fn):
    s, t = masked_pair(5, 12, seed=4, teacher_only=0.0)
    target = torch.tensor([0, 1, 2, 3, 4])
    s[:, target.unique()] = s[:, target.unique()].nan_to_num(neginf=0.5)  # targets stay live
    t[:, target.unique()] = t[:, target.unique()].nan_to_num(neginf=-0.5)
    call = {"kd": lambda a, b, y: kd_loss(a, b, reduction="none"),
            "dkd": lambda a, b, y: dkd_loss(a, b, y, reduction="none"),
            "released": lambda a, b, y: pcd_loss(a, b, variant="released", reduction="none")}[fn]
    got, g_got = value_and_grad(lambda a, b: call(a, b, target), s, t)
    if fn == "released":  # rows are coupled by the batch-mean weight: compare with a literal reading
        live = ~(torch.isneginf(s) & torch.isneginf(t))
        kls, ws = [], []
        for i in range(5):
            a, b = s[i, live[i]], t[i, live[i]]
            kls.append(kd_loss(a[None], b[None]))
            lq = torch.log_softmax(a / 4, 0)
            q = torch.softmax(b / 4, 0)
            ws.append(1 - (q * lq).sum() / (q.norm() * lq.norm()))
        want = 2 * 3 * torch.stack(kls).squeeze(-1) * torch.stack(ws).mean()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        return
    for i in range(5):
        live = ~(torch.isneginf(s[i]) & torch.isneginf(t[i]))
        y = torch.tensor([int(live[: target[i]].sum())])
        want, g_want = value_and_grad(lambda a, b: call(a, b, y), s[i, live][None], t[i, live][None])
        torch.testing.assert_close(got[i], want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got[i, live], g_want[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dead_rows", [[], [0], [2, 3]])
def test_log_softmax_rows_gives_minus_inf_for_rows_of_only_minus_inf(dead_rows):
    from pcdistill.losses._common import log_softmax_rows
    z = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z[1, 2], z[4, 0] = NEG, float("nan")  # a masked class; a NaN row stays NaN
    z[dead_rows] = NEG
    got = log_softmax_rows(z.clone())
    for i, row in enumerate(z):
        if i in dead_rows:
            want = torch.full_like(row, NEG)
        elif torch.isnan(row).any():
            want = torch.full_like(row, float("nan"))
        else:  # log p_c = z_c - log sum_j exp z_j, one row at a time
            want = row - math.log(sum(math.exp(v) for v in row.tolist()))
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=0, equal_nan=True)


def test_teacher_only_minus_inf_contributes_zero_for_kd():
    s, t = pair((3, 8), seed=5)
    t[:, 3] = NEG
    got = kd_loss(s, t, reduction="none")
    p_t = torch.softmax(t / 4, -1)
    want = 16 * torch.where(p_t > 0, p_t * (torch.log_softmax(t / 4, -1) - torch.log_softmax(s / 4, -1)), 0.0).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()


def test_chunking_changes_nothing_at_any_budget():
    s, t = masked_pair(37, 50, seed=9)
    base, g_base = value_and_grad(pcd_loss, s, t, stages=4)
    for mib in (1e-4, 0.01, 0.05):
        with losses.memory_budget(mib):
            got, g_got = value_and_grad(pcd_loss, s, t, stages=4)
        torch.testing.assert_close(got, base, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda s, t: pcd_loss(s, t, adaptive="no"), lambda s, t: pcd_loss(s, t, standardize=None),
    lambda s, t: kd_loss(s, t, standardize=1), lambda s, t: dkd_loss(s, t, torch.arange(4), standardize="yes"),
    lambda s, t: PCDLoss(adaptive="no"), lambda s, t: KDLoss(standardize=0),
    lambda s, t: rkl_loss(s, t, standardize=1), lambda s, t: jsd_loss(s, t, standardize="no"),
    lambda s, t: TVDLoss(standardize=0),
])
def test_booleans_must_be_bools(call):
    s, t = pair((4, 6), seed=0)
    with pytest.raises(TypeError, match="must be True or False"):
        call(s, t)


@pytest.mark.parametrize("cls,typo,word", [(PCDLoss, "tempreature", "temperature"), (KDLoss, "temprature", "temperature"),
                                           (DKDLoss, "betta", "beta"), (DISTLoss, "gama", "gamma"),
                                           (JSDLoss, "betaa", "beta"), (RKLLoss, "temperture", "temperature"),
                                           (TVDLoss, "temprature", "temperature")])
def test_module_arguments_suggest_the_closest(cls, typo, word):
    with pytest.raises(TypeError, match=f"did you mean '{word}'"):
        cls(**{typo: 1.0})


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dist_invalid_rows_enter_neither_term(reduction):
    s, t = pair((7, 9), seed=12)
    valid = torch.tensor([True, False, True, True, False, True, True])
    s[~valid] = math.nan  # padding may hold anything
    got, g_got = value_and_grad(dist_loss, s, t, valid=valid, reduction=reduction)
    want, g_want = value_and_grad(dist_loss, s[valid], t[valid], reduction=reduction)
    if reduction == "none":
        torch.testing.assert_close(got[valid], want, rtol=1e-12, atol=1e-12)
        assert (got[~valid] == 0).all()
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got[valid], g_want, rtol=1e-10, atol=1e-12)
    assert (g_got[~valid] == 0).all()


def test_dist_reductions_follow_the_formula():
    """mean = beta T^2 (1 - mean_rows rho) + gamma T^2 (1 - mean_classes rho); none has that mean; sum = N x mean."""
    s, t = pair((6, 8), seed=13)
    p_s, p_t = torch.softmax(s / 2, -1), torch.softmax(t / 2, -1)

    def pearson(a, b):
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)

    inter, intra = 1 - pearson(p_s, p_t), 1 - pearson(p_s.T, p_t.T).mean()
    want_rows = (0.5 * inter + 2.0 * intra) * 4
    kw = dict(beta=0.5, gamma=2.0, temperature=2.0)
    torch.testing.assert_close(dist_loss(s, t, reduction="none", **kw), want_rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist_loss(s, t, **kw), want_rows.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist_loss(s, t, reduction="sum", **kw), want_rows.sum(), rtol=1e-12, atol=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dist_loss(x, t, reduction="none", **kw), (s,))


def test_minus_zero_ties_with_zero_in_the_ranking():
    """Teacher logits -0.0 and 0.0 are equal: the lower class index must rank first, as in a float sort."""
    s = torch.tensor([[0.3, -0.9, 0.8]], dtype=torch.float64)
    t = torch.tensor([[1.0, -0.0, 0.0]], dtype=torch.float64)
    got = pcd_loss(s, t, stages=2, rank_by="teacher")
    right = 2 * (explicit_groups_loss(s[0], t[0], [[0, 1, 2]]) + explicit_groups_loss(s[0], t[0], [[0, 1], [2]]))
    wrong = 2 * (explicit_groups_loss(s[0], t[0], [[0, 1, 2]]) + explicit_groups_loss(s[0], t[0], [[0, 2], [1]]))
    assert abs(right - wrong) > 1e-3  # the case distinguishes the two orders
    torch.testing.assert_close(got, right, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Reverse KL, generalized JSD, TVD: the formulas of METHOD.md, row by row, with every masking rule literally
# ----------------------------------------------------------------------------------------------
def ref_kl(p, q):
    """KL(p || q) over the classes where p > 0 (0 log 0 = 0); +inf where q is 0 there."""
    keep = p > 0
    return (p[keep] * (p[keep].log() - q[keep].log())).sum()


def ref_finite_zscore(z):
    """z-score over the finite entries of a row (unbiased std, +1e-7); -inf stays -inf."""
    finite = torch.isfinite(z)
    mean, std = z[finite].mean(), z[finite].std()
    return torch.where(finite, (z.masked_fill(~finite, 0.0) - mean) / (std + 1e-7), z)


def ref_divergence_row(method, s, t, temperature=1.0, beta=0.5, standardize=False):
    """One row: NaN gives NaN; classes -inf in both are sliced off; then the formula on p = softmax(z / T)."""
    if torch.isnan(s).any() or torch.isnan(t).any():
        return s.new_tensor(math.nan)
    live = ~(torch.isneginf(s) & torch.isneginf(t))
    if not live.any():
        return s.new_zeros(())
    s, t = s[live], t[live]
    if standardize:
        s, t = ref_finite_zscore(s), ref_finite_zscore(t)
    p_s, p_t = torch.softmax(s / temperature, 0), torch.softmax(t / temperature, 0)
    if method == "tvd":
        value = 0.5 * (p_t - p_s).abs().sum()
    elif method == "rkl" or beta == 1:
        value = ref_kl(p_s, p_t)
    elif beta == 0:
        value = ref_kl(p_t, p_s)
    else:
        m = beta * p_t + (1 - beta) * p_s
        value = beta * ref_kl(p_t, m) + (1 - beta) * ref_kl(p_s, m)
    return temperature**2 * value


DIVERGENCES = [("rkl", {}), ("rkl", {"temperature": 2.0, "standardize": True}), ("jsd", {}),
               ("jsd", {"beta": 0.1, "temperature": 4.0}), ("jsd", {"beta": 0.0}),
               ("jsd", {"beta": 1.0, "standardize": True}), ("tvd", {}),
               ("tvd", {"temperature": 3.0, "standardize": True})]


@pytest.mark.parametrize("method,kw", DIVERGENCES, ids=[m + "".join(f"-{k}={v}" for k, v in kw.items())
                                                         for m, kw in DIVERGENCES])
def test_divergences_match_the_formula_with_every_masking_rule(method, kw, chunking):
    s, t = masked_pair(9, 12, seed=31, teacher_only=0.0)  # rows 5-8: classes -inf in both (absent)
    s[0], t[0] = NEG, NEG  # no live class: 0
    s[1, 3], t[1, 3] = NEG, 1.0  # -inf in the student only
    s[2, 5] = math.nan
    t[3, 0] = math.nan
    s[4, 2], t[4, 2] = 0.5, NEG  # -inf in the teacher only
    got, g_got = value_and_grad(lambda a, b: call(method, a, b, reduction="none", **kw), s, t)
    want, g_want = ref_rows_value_and_grad(lambda a, b: ref_divergence_row(method, a, b, **kw), s, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)
    beta = kw.get("beta", 0.5)
    assert got[0] == 0 and got[2].isnan() and got[3].isnan() and torch.isfinite(got[5:]).all()
    assert torch.isinf(got[1]) == (method == "jsd" and beta == 0)  # forward KL: student-only -inf is +inf
    assert torch.isinf(got[4]) == (method == "rkl" or (method == "jsd" and beta == 1))  # reverse KL: teacher-only
    finite = torch.isfinite(want)
    torch.testing.assert_close(g_got[finite], g_want[finite], rtol=1e-9, atol=1e-12)
    assert (g_got[0] == 0).all()


@pytest.mark.parametrize("method,kw", [("rkl", {"temperature": 2.0}), ("jsd", {"beta": 0.3, "standardize": True}),
                                       ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("tvd", {"temperature": 2.0})])
def test_divergences_gradcheck(method, kw):
    s, t = pair((3, 8), seed=12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: call(method, x, t, **kw), (s,), eps=1e-6, atol=1e-7)


def test_jsd_ends_are_forward_and_reverse_kl():
    """TRL's convention: beta = 0 is KL(p_t || p_s) (KD), beta = 1 is KL(p_s || p_t), though the formula tends
    to 0 at both ends."""
    s, t = pair((7, 11), seed=13)
    for beta, other in ((0.0, kd_loss), (1.0, rkl_loss)):
        got, g_got = value_and_grad(jsd_loss, s, t, beta=beta, temperature=2.0)
        want, g_want = value_and_grad(other, s, t, temperature=2.0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    assert jsd_loss(s, t, beta=1e-9) < 1e-6 < jsd_loss(s, t, beta=0.0)


def test_jsd_follows_trl_generalized_jsd():
    """TRL's ``generalized_jsd_loss`` reading, in log space: the mixture's log is a logsumexp of
    ``log p_s + log(1 - beta)`` and ``log p_t + log beta``; ``beta`` weighs KL(p_t || m)."""
    s, t = pair((6, 9), seed=14)
    beta, T = 0.2, 2.0
    log_s, log_t = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), 0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(jsd_loss(s, t, beta=beta, temperature=T, reduction="none"),
                               T * T * (beta * kl_t + (1 - beta) * kl_s), rtol=1e-12, atol=1e-12)


def test_symmetric_jsd_and_tvd_are_bounded():
    s, t = pair((20, 30), seed=15, scale=20.0)  # nearly one-hot rows: near the bounds
    jsd = jsd_loss(s, t, temperature=2.0, reduction="none")
    torch.testing.assert_close(jsd, jsd_loss(t, s, temperature=2.0, reduction="none"), rtol=1e-12, atol=1e-12)
    assert (jsd >= 0).all() and (jsd <= 4 * math.log(2) + 1e-12).all() and jsd.max() > 0.9 * 4 * math.log(2)
    tvd = tvd_loss(s, t, temperature=2.0, reduction="none")
    assert (tvd >= 0).all() and (tvd <= 4 + 1e-12).all()


def test_tvd_gradient_is_the_zero_subgradient_where_the_probabilities_agree():
    s, t = pair((4, 6), seed=16)
    t[:2] = s[:2]  # rows 0, 1: p_s == p_t in every class
    got, grad = value_and_grad(tvd_loss, s, t, reduction="none")
    assert (got[:2] == 0).all() and (grad[:2] == 0).all() and (grad[2:] != 0).any()


@pytest.mark.parametrize("method", ROW_METHODS)
def test_invalid_rows_hold_anything_and_count_for_nothing(method):
    s, t = pair((2, 4, 7), seed=17)
    valid = torch.tensor([[True, False, True, True], [False, True, True, False]])
    s[~valid] = math.nan  # padding may hold anything
    target = torch.arange(8).reshape(2, 4) % 7
    for reduction in ("mean", "sum"):
        got, g_got = value_and_grad(lambda a, b: call(method, a, b, target, valid=valid, reduction=reduction), s, t)
        want, g_want = value_and_grad(lambda a, b: call(method, a, b, target[valid], reduction=reduction),
                                      s[valid], t[valid])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got[valid], g_want, rtol=1e-12, atol=1e-12)
        assert (g_got[~valid] == 0).all()
