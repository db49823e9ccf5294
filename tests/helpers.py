"""Shared test helpers: small configs and subprocess runners."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def digits_config(**sections) -> dict:
    """A digits run that takes a second or two on the CPU; ``sections`` update the defaults."""
    cfg = {
        "data": {"name": "digits", "val_fraction": 0.1},
        "model": {"name": "cnn_tiny"},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "multistep", "milestones": [1]},
        "trainer": {"epochs": 2, "batch_size": 128, "seed": 0, "device": "cpu", "threads": 1, "log_every": 5},
    }
    for key, value in sections.items():
        cfg[key] = cfg.get(key, {}) | value if isinstance(value, dict) else value
    return cfg


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """``python -m pcdistill ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    full_env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "pcdistill", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_two_processes(worker: str, *args: str, env: dict | None = None, timeout: float = 300):
    """``torchrun --nproc_per_node 2 tests/WORKER ARGS`` (one thread each); asserts it succeeded, returns it."""
    full_env = os.environ | {"OMP_NUM_THREADS": "1",
                             "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / worker), *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def special_rows(C: int, seed: int):
    """8 float64 rows of PCD's special cases: random, small-integer ties (with -0.0), masked classes,
    teacher-only -inf, fewer live classes than groups, student-only -inf (+inf row), NaN, +inf."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(8, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(8, C, generator=g, dtype=torch.float64) * 3
    ints = torch.randint(-2, 3, (2, 2, C), generator=g).double()
    s[1:3], t[1:3] = ints[0], ints[1]
    t[1, ::3] = -t[1, ::3]  # zeros become -0.0, which ties with 0.0
    masked = torch.rand(C, generator=g) < 0.3
    s[2, masked], t[2, masked] = float("-inf"), float("-inf")
    t[3, 1::4] = float("-inf")
    s[3, ::7], t[3, ::7] = float("-inf"), float("-inf")
    s[4, 3:], t[4, 3:] = float("-inf"), float("-inf")  # 3 live classes
    s[5, C // 2] = float("-inf")
    t[6, C - 1] = float("nan")
    s[7, 0] = float("inf")
    return s, t
