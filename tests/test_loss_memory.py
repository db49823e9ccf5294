"""Memory as the process sees it: one forward+backward per loss in a fresh subprocess (peak RSS growth).

The contract (docs/method.md): peak extra memory <= 2 x one logits tensor of the input's dtype + 256 MiB,
and at most 64 MiB still held once the loss and the gradient are freed. The shapes are large enough
that a loss keeping a few logits-sized arrays more than that would fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "loss_speed.py"
MIB = 2**20

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method,shape", [
    ("KD", "1024x32000:fp32"), ("DKD", "1024x32000:fp32"), ("PCD K=3", "1024x32000:fp32"),
    ("PCD K=7", "1024x32000:fp32"), ("PCD released", "1024x32000:fp32"), ("DIST", "1024x32000:fp32"),
    ("PCD K=3", "1024x32000:bf16"), ("KD", "1024x32000:bf16"),
    ("JSD", "1024x32000:fp32"),  # the most workspace of RKL, JSD, TVD (same row mechanism; bench/loss_speed.py has all)
])
def test_peak_and_held_memory_within_the_bound(method, shape):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(BENCH), "--probe", method, shape, "cpu"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["peak"] <= 2 * mem["logits"] + 256 * MIB, (mem["peak"] / mem["logits"], mem)
    assert mem["held"] <= 64 * MIB, mem
    # a measurement that saw nothing would pass vacuously: the gradient alone is one logits tensor
    assert mem["peak"] >= 0.9 * mem["logits"], mem
