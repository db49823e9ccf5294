"""`pcdistill tune`: one run per weight of the grid, the choice by validation accuracy only."""
from __future__ import annotations

import csv
import math

import pytest
import yaml

from pcdistill.config import ConfigError, from_dict
from pcdistill.engine.trainer import train
from pcdistill.engine.records import read_metrics
from pcdistill.evidence.tune import tune
from tests.helpers import digits_config, run_cli


def kd_config(**trainer):
    return digits_config(model={"name": "cnn_tiny"}, teacher={"name": "cnn_tiny", "weights": None},
                         distill={"method": "kd", "alpha": 2.0, "loss": {"temperature": 4.0}},
                         trainer={"epochs": 1} | trainer)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    train(from_dict(digits_config(trainer={"epochs": 1})), tmp / "teacher")
    return tmp


def test_tune_runs_every_weight_and_chooses_by_validation(teacher, tmp_path):
    config = kd_config()
    config["teacher"]["weights"] = str(teacher / "teacher")
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("tune", str(path), "trainer.seed=1", "trainer.epochs=1", "--grid", "0.5", "1", "3",
                   "--out", str(tmp_path / "t"))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "t" / "tune.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in rows] == [1.0, 2.0, 6.0]
    val = {}
    for row in rows:  # each run trained with its own weight, and its final-epoch val accuracy is the one recorded
        saved = yaml.safe_load(open(f"{row['run_dir']}/config.yaml"))
        assert saved["distill"]["alpha"] == float(row["alpha"]) and saved["trainer"]["seed"] == 1
        val[float(row["alpha"])] = read_metrics(row["run_dir"])[-1]["val_acc"]
        assert float(row["val_acc"]) == pytest.approx(val[float(row["alpha"])])
    best = max(val.values())
    closest_to_published = min((a for a, v in val.items() if v == best), key=lambda a: abs(math.log(a / 2.0)))
    assert [float(r["alpha"]) for r in rows if r["chosen"] == "True"] == [closest_to_published]
    assert "test_acc" not in done.stdout
    assert f"(train with: pcdistill train {path} trainer.seed=1 distill.alpha={closest_to_published:g} --out DIR; " \
           f"at the config's length: the tuning runs' trainer.epochs=1 left out)" in done.stdout, done.stdout


def test_tune_refuses_a_vanilla_config(tmp_path):
    with pytest.raises(ConfigError, match="vanilla"):
        tune(digits_config(), tmp_path)
