"""Detection through the trainer: a tiny shapes teacher, then a PCD student distilled from it."""
from __future__ import annotations

import math

import pytest
import torch

from pcdistill.config import ConfigError, from_dict
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import evaluate_weights, train

OPTIONS = {"min_size": 64, "max_size": 64, "anchor_sizes": [4, 8, 16, 32, 64], "rpn_post_nms_top_n_test": 50,
           "rpn_post_nms_top_n_train": 100, "fpn_channels": 16, "box_head_size": 32, "box_batch_size_per_image": 32}


def tiny(tmp_path, **sections):
    cfg = {"task": "detection",
           "data": {"name": "shapes", "root": str(tmp_path / "shapes"),
                    "options": {"train_images": 8, "val_images": 4, "test_images": 4, "image_size": 64}},
           "model": {"name": "fasterrcnn_resnet18_fpn", "options": OPTIONS},
           "optim": {"lr": 0.01, "clip_grad_norm": 10.0},
           "trainer": {"epochs": 1, "batch_size": 4, "device": "cpu", "threads": 1, "log_every": 1}}
    return from_dict(cfg | sections)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    summary = train(tiny(tmp), tmp / "teacher")
    return tmp, summary


def test_teacher_run_records_coco_metrics(teacher):
    tmp, summary = teacher
    rows = read_metrics(tmp / "teacher")
    assert len(rows) == 1 and rows[0]["world_size"] == 1
    for split in ("val", "test"):
        for metric in ("AP", "AP50", "AP75"):
            value = rows[0][f"{split}_{metric}"]
            assert value is None or (0.0 <= value <= 100.0)
    assert {"train_loss_classifier", "train_loss_box_reg", "train_loss_objectness"} <= set(rows[0])
    assert (tmp / "teacher" / "model.safetensors").is_file()
    results = evaluate_weights(tiny(tmp), tmp / "teacher" / "model.safetensors", splits=["test"])
    assert results["test"]["AP"] == pytest.approx(summary.final["test_AP"], nan_ok=True)


def test_pcd_student_distils_roi_logits(teacher):
    tmp, _ = teacher
    cfg = tiny(tmp, teacher={"name": "fasterrcnn_resnet18_fpn", "weights": str(tmp / "teacher"), "options": OPTIONS},
               distill={"method": "pcd", "loss": {"temperature": 1.0, "stages": 3}})
    train(cfg, tmp / "pcd")
    row = read_metrics(tmp / "pcd")[-1]
    assert row["train_distill"] > 0 and math.isfinite(row["train_loss"])


def test_detection_config_errors(teacher):
    tmp, _ = teacher
    with pytest.raises(ConfigError, match="model: unknown option"):
        train(tiny(tmp, model={"name": "fasterrcnn_resnet18_fpn", "options": {"fpn_chanels": 8}}), tmp / "bad")
    with pytest.raises(ConfigError, match="ce_weight"):
        tiny(tmp, distill={"ce_weight": 0.5})
