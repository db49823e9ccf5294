"""The detection suite: `pcdistill bench detection --quick` end to end on tiny Fashion-MNIST files,
resumability, the weight chosen on validation, and the report's statistics."""
from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from scipy import stats

from pcdistill.evidence.analysis import bucket_gaps
from pcdistill.evidence.detection import VARIANTS, DetectionPlan, QUICK, quick_plan, paired_test_roi_logits
from pcdistill.evidence.pipeline import run_suite
from tests.helpers import run_cli
from tests.test_fashion_scenes import fashion_folder

COLUMNS = ["variant", "seed", "alpha", "test_ap", "test_ap50", "test_ap75", "val_ap", "seconds"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detection_suite")
    fashion_folder(tmp / "fmnist")
    started = time.perf_counter()
    done = run_cli("bench", "detection", "--quick", "--out", str(tmp / "results"), "--fashion-root",
                   str(tmp / "fmnist"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "results", time.perf_counter() - started, str(tmp / "fmnist")


def rows_of(results):
    with open(results / "detection.csv") as f:
        return list(csv.DictReader(f))


def test_quick_suite_writes_every_run_and_the_report(quick):
    results, seconds, _ = quick
    plan = quick_plan()
    rows = rows_of(results)
    assert list(rows[0])[:len(COLUMNS)] == COLUMNS
    phases = [r["phase"] for r in rows]
    distilled = [v for v in plan.variants if v.method != "vanilla"]
    assert phases.count("teacher") == 1
    assert phases.count("tune") == len(distilled) * len(plan.alpha_grid)
    assert phases.count("final") == len(plan.variants) * len(plan.seeds)
    for r in rows:
        for key in ("test_ap", "test_ap50", "test_ap75", "val_ap"):
            assert 0.0 <= float(r[key]) <= 100.0
        assert float(r["seconds"]) > 0
    text = (results / "detection.md").read_text()
    for name in ("vanilla", "kd", "dkd", "pcd", "pcd-released"):
        assert f"| {name} |" in text
    assert "| pcd - kd | AP |" in text and "| pcd - vanilla | AP |" in text and "95%" in text
    assert (results / "detection_buckets.png").stat().st_size > 1000
    assert "gap, rank 1" in (results / "detection_buckets.md").read_text()
    print(f"quick detection suite: {seconds:.0f} s")


def test_finals_use_the_weight_with_the_best_validation_ap(quick):
    results, _, _ = quick
    plan = quick_plan()
    rows = rows_of(results)
    for variant in (v for v in plan.variants if v.method != "vanilla"):
        tuned = [(float(r["val_ap"]), -abs(math.log(float(r["alpha"]) / variant.alpha)), float(r["alpha"]))
                 for r in rows if r["variant"] == variant.name and r["phase"] == "tune"]
        best = max(tuned)[2]
        finals = {float(r["alpha"]) for r in rows if r["variant"] == variant.name and r["phase"] == "final"}
        assert finals == {best}
    assert {r["alpha"] for r in rows if r["variant"] == "vanilla"} == {""}


def test_a_finished_suite_is_not_redone(quick):
    results, _, fashion_root = quick
    stamps = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("model.safetensors")}
    run_suite(quick_plan(fashion_root), results, jobs=1, log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("model.safetensors")} == stamps


def test_roi_bucket_cache_holds_the_gaps_of_aligned_logits(quick):
    results, _, _ = quick
    runs = results / "runs" / "fashion_scenes"
    run_dir = runs / "final" / "pcd_1" / "seed0"
    student, teacher = paired_test_roi_logits(run_dir, runs / "teacher")
    assert student.shape == teacher.shape and student.shape[1] == 11  # 10 classes + background
    assert student.shape[0] > 0 and not torch.equal(student, teacher)
    cached = json.loads((run_dir / "roi_buckets.json").read_text())
    want = bucket_gaps(student, teacher)
    assert set(cached) == set(want) == {"1", "2-5", "6-20"}
    for bucket, values in want.items():
        assert cached[bucket] == pytest.approx(list(values))


def test_report_statistics_against_scipy():
    plan = DetectionPlan(QUICK, seeds=(0, 1, 2), alpha_grid=(1.0,))
    ap = {"vanilla": [20.0, 19.2, 19.6], "kd": [22.0, 22.5, 21.0], "dkd": [21.0, 21.0, 21.0],
          "pcd": [23.0, 22.0, 22.5], "pcd-released": [20.0, 20.5, 21.5]}
    rows = [{"variant": "teacher", "seed": 0, "alpha": None, "phase": "teacher", "test_ap": 30.0, "test_ap50": 50.0,
             "test_ap75": 30.0, "val_ap": 31.0}]
    for v in VARIANTS:
        alpha = None if v.method == "vanilla" else v.alpha
        rows += [{"variant": v.name, "seed": s, "alpha": alpha, "phase": "final", "test_ap": a, "test_ap50": 2 * a,
                  "test_ap75": a - 1, "val_ap": a + 1} for s, a in enumerate(ap[v.name])]
    text = plan.markdown(rows, {"date": "d", "torch": "t", "cpu": "c", "cores": 2,
                               "suite_wall_seconds_this_invocation": 60.0})
    mean, sd = sum(ap["pcd"]) / 3, stats.tstd(ap["pcd"])
    assert f"| pcd | 1 | {mean + 1:.2f} | {mean:.2f} +- {sd:.2f} |" in text
    assert f"Teacher - vanilla student (mean): {30.0 - sum(ap['vanilla']) / 3:+.2f} AP." in text
    diffs = [p - k for p, k in zip(ap["pcd"], ap["kd"])]
    d_mean = sum(diffs) / 3
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / math.sqrt(3)
    assert f"| pcd - kd | AP | {d_mean:+.2f} | [{d_mean - half:+.2f}, {d_mean + half:+.2f}] | tie" in text
    v_diffs = [p - v for p, v in zip(ap["pcd"], ap["vanilla"])]
    v_mean = sum(v_diffs) / 3
    v_half = stats.t.ppf(0.975, 2) * stats.tstd(v_diffs) / math.sqrt(3)
    assert f"| pcd - vanilla | AP | {v_mean:+.2f} | [{v_mean - v_half:+.2f}, {v_mean + v_half:+.2f}] | wins" in text
