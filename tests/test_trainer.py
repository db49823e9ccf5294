"""The trainer, the run folder it leaves, and the Distiller API."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pcdistill import models
from pcdistill.config import ConfigError, from_dict
from pcdistill.distiller import Distiller
from pcdistill.engine import trainer
from pcdistill.engine.checkpoint import export_weights, load_checkpoint
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import NonFiniteLossError, evaluate_weights, lr_factor, train
from pcdistill.losses import DKDLoss, KDLoss, PCDLoss, kd_loss
from tests.helpers import digits_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    summary = train(from_dict(digits_config(model={"name": "cnn_small"}, trainer={"epochs": 3})), out)
    return out, summary


def test_run_folder_has_everything(teacher_run):
    out, summary = teacher_run
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("epoch", "train_loss", "val_acc", "test_acc", "lr", "seconds", "world_size"):
        assert all(key in r for r in rows), key
    assert rows[-1]["world_size"] == 1
    assert summary.final["test_acc"] == rows[-1]["test_acc"]
    assert summary.best["test_acc"] == max(r["test_acc"] for r in rows)
    assert rows[-1]["test_acc"] > 60  # a real, if short, training run


def test_checkpoint_loads_weights_only(teacher_run):
    out, _ = teacher_run
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["batch"] == 0
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in state["student"].items())


def test_eval_reproduces_the_final_metrics(teacher_run):
    out, summary = teacher_run
    cfg = from_dict(digits_config(model={"name": "cnn_small"}))
    results = evaluate_weights(cfg, out / "model.safetensors")
    assert results["test"]["acc"] == pytest.approx(summary.final["test_acc"])
    assert results["val"]["acc"] == pytest.approx(summary.final["val_acc"])


@pytest.mark.parametrize("method,loss", [("pcd", {"stages": 3}), ("dkd", {"beta": 2.0}), ("dist", {})])
def test_students_distill_from_a_trained_teacher(teacher_run, tmp_path, method, loss):
    out, _ = teacher_run
    cfg = digits_config(teacher={"name": "cnn_small", "weights": str(out)},
                        distill={"method": method, "warmup_epochs": 1, "loss": loss}, trainer={"epochs": 1})
    summary = train(from_dict(cfg), tmp_path / method)
    row = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_distill"] > 0 and row["train_ce"] > 0
    assert math.isclose(row["train_loss"], row["train_distill"] + row["train_ce"], rel_tol=1e-6)
    assert summary.final["test_acc"] > 0


def test_a_teacher_for_other_classes_is_refused(tmp_path):
    weights = tmp_path / "five.safetensors"
    export_weights(models.create("cnn_small", num_classes=5), weights, {"model": "cnn_small", "num_classes": 5})
    cfg = digits_config(teacher={"name": "cnn_small", "weights": str(weights)}, distill={"method": "kd"})
    with pytest.raises(ConfigError, match="5 classes.*10"):
        train(from_dict(cfg), tmp_path / "run")


def test_a_started_run_is_not_overwritten(teacher_run):
    out, _ = teacher_run
    with pytest.raises(ConfigError, match="--resume"):
        train(from_dict(digits_config()), out)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 trains normally; from epoch 2 the learning rate is multiplied by 1e12
    cfg = digits_config(schedule={"name": "multistep", "milestones": [1], "gamma": 1e12}, trainer={"epochs": 3})
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step \d+") as err:
        train(from_dict(cfg), tmp_path / "run")
    assert "holds the state after epoch 1" in str(err.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path):
    # on CUDA a read (.item(), .tolist(), bool(tensor)) waits for the GPU's queue to drain: the loop may read at
    # its checks (every log_every steps, epoch ends), never once per step
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__format__"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer.__file__:
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts, steps = [], []
    for batch_size in (128, 64):
        reads.clear()
        cfg = digits_config(trainer={"epochs": 1, "batch_size": batch_size, "log_every": 1000})
        steps.append(read_metrics(train(from_dict(cfg), tmp_path / str(batch_size)).out_dir)[-1]["step"])
        counts.append(len(reads))
    assert steps[1] >= 2 * steps[0] - 1 and counts[0] == counts[1] > 0, (steps, counts)


def test_learning_rate_schedule_formulas():
    cfg = from_dict({"optim": {"lr": 0.1}, "schedule": {"name": "multistep", "milestones": [2, 4], "gamma": 0.1,
                                                         "warmup": 1}})
    factors = [lr_factor(cfg, step, steps_per_epoch=10, total_steps=60) for step in (0, 4, 9, 10, 19, 20, 39, 40)]
    assert factors == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])
    cos = from_dict({"optim": {"lr": 0.1}, "schedule": {"name": "cosine", "min_lr": 0.01}})
    assert lr_factor(cos, 0, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 100, 10, 100) == pytest.approx(0.1)
    iters = from_dict({"schedule": {"name": "multistep", "milestones": [15], "unit": "iteration", "warmup": 4}})
    assert [lr_factor(iters, s, 10, 30) for s in (0, 3, 14, 15)] == pytest.approx([0.25, 1.0, 1.0, 0.1])


# ----------------------------------------------------------------------------------------------
# Distiller: the Python API for your own training loop
# ----------------------------------------------------------------------------------------------
def small_pair():
    torch.manual_seed(0)
    student, teacher = models.create("cnn_tiny", num_classes=10), models.create("cnn_small", num_classes=10)
    return student, teacher, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))


def test_distiller_losses_follow_the_recipe():
    student, teacher, x, y = small_pair()
    distiller = Distiller(student, teacher, KDLoss(temperature=4.0), ce_weight=0.5, alpha=2.0, warmup_epochs=4)
    distiller.train()
    logits, losses = distiller(x, y, epoch=1)
    assert set(losses) == {"ce", "distill"}
    torch.testing.assert_close(losses["ce"], 0.5 * F.cross_entropy(logits, y))
    with torch.no_grad():
        t_logits = teacher(x)
    torch.testing.assert_close(losses["distill"], 1 / 4 * 2.0 * kd_loss(logits, t_logits, temperature=4.0))
    _, later = distiller(x, y, epoch=10)
    assert later["distill"].item() == pytest.approx(4 * losses["distill"].item(), rel=1e-5)


def test_distiller_keeps_the_teacher_frozen():
    student, teacher, x, y = small_pair()
    distiller = Distiller(student, teacher, PCDLoss())
    distiller.train()
    assert not teacher.training and student.training
    _, losses = distiller(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def _classifier(teacher, **kw):
    return Distiller(models.create("cnn_tiny", num_classes=10), teacher, KDLoss(), **kw)


def _detector(teacher, **kw):
    from pcdistill.detection.distill import RoIDistiller
    from tests.test_detection import tiny_detector
    return RoIDistiller(tiny_detector(0), teacher, KDLoss(), **kw)


def _causal_lm(teacher, **kw):
    from pcdistill.lm.distill import CausalLMDistiller
    from tests.test_lm_distill import tiny_lm
    return CausalLMDistiller(tiny_lm(vocab=teacher.config.vocab_size), teacher, loss="kd", **kw)


def _teacher(kind):
    if kind == "classifier":
        return models.create("cnn_small", num_classes=10)
    if kind == "detector":
        from tests.test_detection import tiny_detector
        return tiny_detector(1)
    from tests.test_lm_distill import tiny_lm
    return tiny_lm(seed=1)


@pytest.mark.parametrize("kind", ["classifier", "detector", "causal_lm"])
def test_every_distiller_freezes_its_teacher_and_checks_its_warmup(kind):
    """The three distillers share DistillerBase: the teacher frozen in eval mode, the ramp and its checks."""
    build = {"classifier": _classifier, "detector": _detector, "causal_lm": _causal_lm}[kind]
    teacher = _teacher(kind).train()
    distiller = build(teacher, alpha=1.0, warmup_epochs=4)
    distiller.train()
    assert distiller.student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert [distiller.warmup(e) for e in (0.0, 1.0, 6.0)] == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match=r"warmup_epochs=4 .* pass epoch="):
        distiller.warmup(None)
    assert build(teacher, warmup_epochs=0).warmup(None) == 1.0
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="warmup_epochs must be a finite number >= 0"):
            build(teacher, warmup_epochs=bad)


def test_distiller_passes_targets_and_progress():
    student, teacher, x, y = small_pair()
    _, losses = Distiller(student, teacher, DKDLoss())(x, y)
    assert losses["distill"] > 0
    curriculum = Distiller(student, teacher, PCDLoss(schedule="curriculum"))
    with pytest.raises(ValueError, match="progress"):
        curriculum(x, y)
    _, losses = curriculum(x, y, progress=0.5)
    assert torch.isfinite(losses["distill"])


def test_vanilla_distiller_is_cross_entropy():
    student, _, x, y = small_pair()
    logits, losses = Distiller(student, None, None)(x, y)
    assert set(losses) == {"ce"}
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, KDLoss())
