"""Every loss, every option, compiles into one graph (fullgraph=True) and matches eager; so does Distiller.

On CUDA (where present) a call also runs with sync debug mode "error": no host-device sync per call.
"""
from __future__ import annotations

import pytest
import torch

from pcdistill import models
from pcdistill.distiller import Distiller
from pcdistill.losses import DKDLoss, PCDLoss, dist_loss, dkd_loss, jsd_loss, kd_loss, pcd_loss, rkl_loss, tvd_loss

pytestmark = pytest.mark.slow

ROWS, C = 12, 30
CLASS_MASK = torch.ones(C, dtype=torch.bool)
CLASS_MASK[[2, 17]] = False
VALID = torch.ones(ROWS, dtype=torch.bool)
VALID[3] = False
TARGET = torch.arange(ROWS) % 10 + 5

CASES = {
    "kd": lambda s, t: kd_loss(s, t, temperature=2.0, standardize=True, class_mask=CLASS_MASK, valid=VALID),
    "kd_none": lambda s, t: kd_loss(s, t, reduction="none").sum(),
    "dkd": lambda s, t: dkd_loss(s, t, TARGET, class_mask=CLASS_MASK, valid=VALID, standardize=True),
    "dist": lambda s, t: dist_loss(s, t, class_mask=CLASS_MASK, valid=VALID, reduction="sum"),
    "pcd": lambda s, t: pcd_loss(s, t, stages=3, class_mask=CLASS_MASK, valid=VALID),
    "pcd_k7_teacher_fixed": lambda s, t: pcd_loss(s, t, stages=7, rank_by="teacher", adaptive=False,
                                                  standardize=True, reduction="sum"),
    "pcd_curriculum_none": lambda s, t: pcd_loss(s, t, schedule="curriculum", progress=0.6, rank_by="none",
                                                 reduction="none").sum(),
    "released": lambda s, t: pcd_loss(s, t, variant="released", class_mask=CLASS_MASK, valid=VALID,
                                      standardize=True),
    # one graph for the three (each compile costs seconds); rkl without row 1, whose teacher-only -inf makes it +inf
    "rkl_jsd_tvd": lambda s, t: (rkl_loss(s[2:], t[2:], temperature=2.0, class_mask=CLASS_MASK, valid=VALID[2:])
                                 + jsd_loss(s, t, beta=0.3, standardize=True, reduction="none").sum()
                                 + tvd_loss(s, t, valid=VALID, reduction="sum")),
}


def logits(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ROWS, C, generator=g) * 3
    t = torch.randn(ROWS, C, generator=g) * 3
    s[0, 4] = t[0, 4] = float("-inf")  # an absent class in one row
    t[1, 6] = float("-inf")  # teacher-only -inf
    return s, t


def value_and_grad(fn, s, t):
    s = s.clone().requires_grad_(True)
    out = fn(s, t)
    out.backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    s, t = logits(0)
    want, g_want = value_and_grad(CASES[name], s, t)
    got, g_got = value_and_grad(torch.compile(CASES[name], fullgraph=True), s, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", [PCDLoss(stages=3), DKDLoss()])
def test_distiller_forward_compiles_in_one_graph(loss):
    torch._dynamo.reset()
    torch.manual_seed(0)
    student, teacher = models.create("cnn_tiny", num_classes=10), models.create("cnn_tiny", num_classes=10)
    distiller = Distiller(student, teacher, loss, ce_weight=1.0, alpha=0.5)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)

    def step(x, y):
        _, parts = distiller(x, y, epoch=1.0)
        return sum(parts.values())

    def grads(fn):
        student.zero_grad()
        value = fn(images, labels)
        value.backward()
        return value.detach(), [p.grad.clone() for p in student.parameters()]

    want, g_want = grads(step)
    got, g_got = grads(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_no_host_device_sync_on_cuda(name):
    s, t = (x.cuda() for x in logits(1))
    fn = CASES[name]
    global CLASS_MASK, VALID, TARGET
    saved = CLASS_MASK, VALID, TARGET
    CLASS_MASK, VALID, TARGET = (x.cuda() for x in saved)
    try:
        s.requires_grad_(True)
        fn(s, t).backward()  # warm-up: lazy initialisation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(s, t).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        CLASS_MASK, VALID, TARGET = saved
