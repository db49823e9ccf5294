"""The suite pipeline's decisions, on a stub runner whose validation loss is a known function of the weight:
the phases and their runs, the weight chosen on validation (lower is better here), the grid extended once
past an edge, the rows' order and the files. Real runs, resuming and refusing are in test_suite.py."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import pytest

from pcdistill.evidence import pipeline
from pcdistill.evidence.pipeline import Suite, Variant, beyond_edge, choose_scale, run_suite
from pcdistill.evidence.tables import Metric

BEST = {"far": 40.0, "mid": 2.0, "low": 0.01}  # the weight with the lowest validation loss, per variant


@dataclass
class Toy(Suite):
    seeds: tuple[int, ...] = (0, 1)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: [
        Variant("vanilla", "vanilla"), Variant("far", "kd"), Variant("mid", "kd", alpha=2.0), Variant("low", "pcd")])
    prepared: list = field(default_factory=list)

    title = "Toy suite"
    csv_file, env_file, report_file = "toy.csv", "toy_environment.json", "toy.md"
    csv_fields = ["variant", "seed", "alpha", "phase", "val_loss", "test_loss"]
    choose_by = Metric("val_loss", "val loss", lower_is_better=True)
    test = Metric("test_loss", "test loss", lower_is_better=True)
    compare = ("low", ("far", "vanilla"))
    compare_by = (test,)

    def groups(self):
        return ["toy"]

    def prepare(self, group, folder):
        self.prepared.append(folder)

    def teacher_config(self, group, folder):
        return {"trainer": {}, "variant": "teacher"}

    def student_config(self, group, folder, variant, seed, scale, tune):
        assert (folder / "teacher").parent == folder
        return {"trainer": {}, "variant": variant.name, "alpha": variant.alpha * scale, "seed": seed, "tune": tune}


@pytest.fixture
def batches(monkeypatch):
    """Replaces the runner: records (label, [(variant, alpha, seed, tune, folder)]) per batch; val loss
    |log(alpha / BEST)|, test loss that + seed / 10."""
    seen = []

    def run(self, batch, label):
        seen.append((label, [(j.config["variant"], j.config.get("alpha"), j.config.get("seed"), j.config.get("tune"),
                              j.out_dir) for j in batch]))
        out = {}
        for job in batch:
            c = job.config
            loss = abs(math.log(c["alpha"] / BEST[c["variant"]])) if c["variant"] in BEST else 3.0
            out[job.key] = {"val_loss": loss, "test_loss": loss + c.get("seed", 0) / 10, "seconds": 1.0,
                            "run_dir": str(job.out_dir)}
        return out

    monkeypatch.setattr(pipeline.Runner, "run", run)
    return seen


def test_phases_and_the_weight_chosen_on_validation(batches, tmp_path):
    plan = Toy()
    rows = run_suite(plan, tmp_path, log=lambda *_: None)
    assert plan.prepared == [tmp_path / "runs" / "toy"]
    labels = [label for label, _ in batches]
    assert labels == ["teachers and vanilla students", "tuning (seed 0)", "final seeds"]
    first, tuning, finals = (runs for _, runs in batches)
    assert [r[0] for r in first] == ["teacher", "vanilla", "vanilla"]
    assert sorted((v, a) for v, a, seed, tune, _ in tuning if seed == 0 and tune) == sorted(
        (v.name, v.alpha * s) for v in plan.variants[1:] for s in plan.alpha_grid)
    assert len(tuning) == 9
    # lowest val loss: far at the grid's top (4), mid at its published weight (x1), low at the bottom (0.25)
    assert sorted((v, a, seed) for v, a, seed, tune, _ in finals) == sorted(
        (v, a, s) for v, a in (("far", 4.0), ("mid", 2.0), ("low", 0.25)) for s in (0, 1))
    assert tmp_path / "runs" / "toy" / "tune" / "far_4" / "seed0" in [r[4] for r in tuning]  # far@4
    assert tmp_path / "runs" / "toy" / "final" / "vanilla" / "seed1" in [r[4] for r in first]
    with open(tmp_path / "toy.csv") as f:
        written = list(csv.DictReader(f))
    assert [(r["phase"], r["variant"]) for r in written] == [(r["phase"], r["variant"]) for r in rows]
    order = ["teacher", "vanilla", "far", "mid", "low"]
    keys = [(("teacher", "tune", "final").index(r["phase"]), order.index(r["variant"]), float(r["alpha"] or 0),
             int(r["seed"])) for r in written]
    assert keys == sorted(keys)
    text = (tmp_path / "toy.md").read_text()
    assert "| low - far | test loss |" in text and "| low - vanilla | test loss |" in text
    assert "alpha x16" not in text and (tmp_path / "toy_environment.json").exists()


def test_a_choice_at_an_edge_extends_the_grid_once(batches, tmp_path):
    plan = Toy()
    plan.extend_grid = True
    run_suite(plan, tmp_path, log=lambda *_: None)
    labels = [label for label, _ in batches]
    assert labels == ["teachers and vanilla students", "tuning (seed 0)", "tuning beyond the grid", "final seeds"]
    beyond = sorted((v, a) for v, a, *_ in batches[2][1])
    assert beyond == [("far", 16.0), ("low", 0.0625)]  # mid chose x1, inside the grid: not extended
    finals = {(v, a) for v, a, *_ in batches[3][1]}
    # far is better at 16 than at 4, low at 0.0625 than at 0.25; low's new edge is not extended again
    assert finals == {("far", 16.0), ("mid", 2.0), ("low", 0.0625)}
    text = (tmp_path / "toy.md").read_text()
    assert "alpha x0.0625 | alpha x0.25 | alpha x1 | alpha x4 | alpha x16 |" in text


def test_a_recipe_without_a_teacher_to_train(batches, tmp_path):
    plan = Toy(variants=[Variant("vanilla", "vanilla"), Variant("mid", "kd", alpha=2.0)])
    plan.teacher_config = lambda group, folder: None  # e.g. a pretrained teacher, fetched in prepare
    plan.compare = ("mid", ("vanilla",))
    rows = run_suite(plan, tmp_path, log=lambda *_: None)
    # no teacher phase: the vanilla students (finals, the longer runs, first) run beside the tuning runs
    assert [label for label, _ in batches] == ["vanilla students and tuning (seed 0)", "final seeds"]
    assert [(r[0], r[3]) for r in batches[0][1]] == [("vanilla", False)] * 2 + [("mid", True)] * 3
    assert "teacher" not in {r["phase"] for r in rows}


def test_choose_scale_ties_and_missing_values():
    assert choose_scale(lambda a: 1.0, (0.25, 1.0, 4.0)) == 1.0  # a tie: the published weight
    assert choose_scale(lambda a: 2.0 if a != 1.0 else 1.0, (0.25, 1.0, 4.0)) in (0.25, 4.0)  # as close to 1
    assert choose_scale({0.25: None, 1.0: float("nan"), 4.0: -5.0}.get, (0.25, 1.0, 4.0)) == 4.0


def test_beyond_edge():
    assert beyond_edge((0.25, 1.0, 4.0), 4.0) == 16.0 and beyond_edge((0.25, 1.0, 4.0), 0.25) == 0.0625
    assert beyond_edge((0.5, 1.0), 1.0) == 2.0 and beyond_edge((0.5, 1.0), 0.5) == 0.25
    assert beyond_edge((0.25, 1.0, 4.0), 1.0) is None and beyond_edge((1.0,), 1.0) is None
