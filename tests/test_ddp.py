"""Two CPU processes under torchrun (gloo): identical parameters on every rank, and the same update as
one process on the same global batch."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pcdistill import models
from pcdistill.config import from_dict
from pcdistill.engine.checkpoint import export_weights
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train
from tests.helpers import digits_config, run_two_processes


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
