"""Two CPU processes (gloo): identical parameters on every rank, and the same update as one process on the
same global batch; a non-finite loss on one rank stops both, under torchrun or in a process group of their own."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pcdistill import models
from pcdistill.config import from_dict
from pcdistill.engine.checkpoint import export_weights, load_checkpoint
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train
from tests.helpers import digits_config, run_torchrun, run_two_processes


def test_two_process_ddp_matches_one_process(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(1)
    export_weights(models.create("cnn_small", num_classes=10), teacher, {"model": "cnn_small", "num_classes": 10})
    per_rank_batch = 32
    # no BatchNorm in the student (per-process batch statistics) and no augmentation (per-rank draws)
    config = digits_config(model={"name": "cnn_tiny", "options": {"batch_norm": False}}, data={"augment": False},
                           teacher={"name": "cnn_small", "weights": str(teacher)},
                           distill={"method": "pcd", "loss": {"stages": 3}},
                           trainer={"iterations": 3, "batch_size": per_rank_batch})
    out = tmp_path / "ddp"
    run_two_processes("ddp_worker.py", json.dumps(config), str(out))
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["step"] == 3

    single = config | {"trainer": config["trainer"] | {"batch_size": 2 * per_rank_batch}}
    summary = train(from_dict(single), tmp_path / "single")
    for key, value in summary.student.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("launcher", ["torchrun", "own process group"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, launcher):
    # rank 1's batch of step 5 (of 10) is NaN (tests/nonfinite_worker.py); losses are checked every 5 steps and
    # before the checkpoints of steps 2 and 4, so rank 0 has seen only finite losses when the check stops both.
    # Without the cross-rank check a rank would wait alone in a collective: the worker's 30 s collective timeout
    # turns that into an error, the launch timeout (minutes, for a loaded machine) is only a backstop.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(digits_config(trainer={"epochs": 1, "batch_size": 64, "log_every": 5,
                                                            "checkpoint_every": 2})))
    run = tmp_path / "run"
    args = ("train", str(config), "--out", str(run))
    if launcher == "torchrun":
        code, report, stderr = run_torchrun("nonfinite_worker.py", *args, log_dir=tmp_path / "logs")
        # torchrun exits 1 with its own summary; it stops the other worker at the first exit (maybe by SIGTERM)
        assert code == 1 and "exitcode  : 2" in report.split("Root Cause")[-1].split("---")[0], report
    else:
        done = run_two_processes("nonfinite_worker.py", *args, check=False)
        code, report, stderr = done.returncodes, done.report(), done.stderr
        assert code == [2, 2], report
    assert not any("Traceback" in err for err in stderr), report
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for err in stderr]
    assert len(errors[0]) == 1 and not errors[1], report  # one message, from rank 0
    for words in ("non-finite loss at epoch 1, step 5 of 10 (global step 5) on rank 1 of 2: ce=nan",
                  f"{run / 'checkpoints' / 'last.pt'} holds the state after step 4 (in epoch 1)",
                  f"pcdistill train --resume {run} optim.lr=0.005"):
        assert words in errors[0][0], errors[0][0]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
