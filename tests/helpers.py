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
