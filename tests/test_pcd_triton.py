"""The Triton PCD row kernels against the plain-torch ``pcd_rows`` (itself tested against a per-group
float64 reference in test_losses.py), run by Triton's CPU interpreter.

The interpreter is chosen when a kernel is decorated, so the kernels run in a child process with
``TRITON_INTERPRET=1``; this process (and any other test sharing its worker) never imports them.
Each child runs a batch of cases on 8-row inputs whose rows cover the special cases at once.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcdistill
from pcdistill.losses._pcd_rows import pcd_rows
from tests.helpers import special_rows

pytest.importorskip("triton")

CHILD = """
import sys, torch
from pcdistill.losses._pcd_triton import pcd_rows_triton
cases = torch.load(sys.argv[1], weights_only=True)
torch.save([pcd_rows_triton(c["s"], c["t"], **c["options"]) for c in cases], sys.argv[2])
"""

JOINT3 = [3, 2, 1, 1, 2, 3]  # schedule="joint", stages=3
JOINT5 = [5, 4, 3, 2, 1, 1, 2, 3, 4, 5]


def case(C, stage_groups, rank_by, adaptive, dtype=torch.float64, block=None, want_grad=True, seed=0,
         temperature=4.0, factor=1.0):
    s, t = special_rows(C, seed)
    options = dict(stage_groups=stage_groups, factor=factor, temperature=temperature, adaptive=adaptive,
                   rank_by=rank_by, want_grad=want_grad, block=block)
    return dict(s=s.to(dtype), t=t.to(dtype), options=options)


FAST = [
    case(37, JOINT3, "abs_diff", True, block=16),  # three blocks, the last partial
    case(37, JOINT3, "teacher", True, torch.float32, seed=1),
    case(20, [4], "none", False, temperature=1.5, factor=8.0, seed=2),
    case(64, [2, 1, 1, 2], "abs_diff", False, torch.float32, block=16, want_grad=False, seed=3),
    case(64, JOINT5, "teacher", True, seed=4),
    case(9, [1], "abs_diff", True, torch.float32, seed=5),
]
SLOW = [case(24, JOINT3, rank_by, adaptive, dtype, block=16, seed=10 + i)
        for i, (dtype, rank_by, adaptive) in enumerate(
            (d, r, a) for d in (torch.float64, torch.float32) for r in ("abs_diff", "teacher", "none")
            for a in (True, False))]


def run_child(cases, tmp_path: Path):
    src = str(Path(pcdistill.__file__).parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    return run_child(FAST, tmp_path_factory.mktemp("fast"))


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory):
    return run_child(SLOW, tmp_path_factory.mktemp("slow"))


def check(c, got):
    loss, grad = got
    want_loss, want_grad = pcd_rows(c["s"], c["t"], **{k: v for k, v in c["options"].items() if k != "block"})
    tol = dict(rtol=1e-11, atol=1e-12) if c["s"].dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    assert loss.dtype == c["s"].dtype and loss.shape == (8,)
    torch.testing.assert_close(loss, want_loss, equal_nan=True, **tol)
    # the non-finite rules, stated directly: +inf for a student-only -inf, NaN for NaN or +inf inputs
    assert torch.isposinf(loss[5]) and loss[6].isnan() and loss[7].isnan() and loss[:5].isfinite().all()
    if not c["options"]["want_grad"]:
        assert grad is None and want_grad is None
        return
    torch.testing.assert_close(grad, want_grad, equal_nan=True, **tol)
    assert grad[5:].isnan().all() and grad[:5].isfinite().all()


@pytest.mark.parametrize("index", range(len(FAST)))
def test_matches_pcd_rows(index, fast_results):
    check(FAST[index], fast_results[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SLOW)))
def test_matches_pcd_rows_every_option(index, slow_results):
    check(SLOW[index], slow_results[index])


def test_cases_have_ties_and_masks():
    """The inputs really hold what the cases rely on (a check on the fixtures, not on the kernels)."""
    s, t = special_rows(37, 0)
    assert (t[1] == 0).any() and torch.signbit(t[1][t[1] == 0]).any() and not torch.signbit(t[1][t[1] == 0]).all()
    assert len(set(t[1].tolist())) < 10 and torch.isneginf(s[2] + t[2]).sum() > 0
    assert (torch.isneginf(t[3]) & ~torch.isneginf(s[3])).any()
    assert (~(torch.isneginf(s[4]) & torch.isneginf(t[4]))).sum() == 3
