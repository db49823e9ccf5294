"""A run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted run (CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from pcdistill.config import from_dict
from pcdistill.data import make_loader
from pcdistill.data import build as build_data
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train
from tests.helpers import REPO, digits_config, run_cli

EPOCHS = 12


def resume_config(tmp_path):
    # a distilled student (teacher forward, PCD, warmup) with mid-epoch checkpoints every 3 steps; the teacher is
    # trained in this process (a subprocess costs seconds of start-up), the runs compared in fresh ones
    teacher = tmp_path / "teacher"
    train(from_dict(digits_config(trainer={"epochs": 1})), teacher)
    return write(tmp_path / "s.yaml", digits_config(
        teacher={"name": "cnn_tiny", "weights": str(teacher)},
        distill={"method": "pcd", "warmup_epochs": 3, "loss": {"stages": 3}},
        trainer={"epochs": EPOCHS, "checkpoint_every": 3}))


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    config = resume_config(tmp_path)
    reference = run_cli("train", str(config), "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "killed"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pcdistill", "train", str(config), "--out", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(read_metrics(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(read_metrics(run))
    assert 2 <= done < EPOCHS, "the run must be killed part-way"
    assert not (run / "model.safetensors").exists()

    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "reference" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = read_metrics(tmp_path / "reference"), read_metrics(run)
    assert [r["epoch"] for r in rows_b] == list(range(1, EPOCHS + 1))
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def test_loader_started_mid_epoch_yields_the_rest_of_a_full_pass():
    splits = build_data("digits", val_fraction=0.1, seed=0)
    loader = make_loader(splits.train, batch_size=100, train=True, seed=3)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_batch=5)
    rest = list(loader)
    assert len(rest) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
