"""The evidence suite: quick mode end to end, resumability, statistics, bucket analysis."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pcdistill.evidence.analysis import analyse, bucket_gaps
from pcdistill.evidence.pipeline import run_suite
from pcdistill.evidence.suite import quick_plan
from pcdistill.evidence.tables import T_975, paired_interval


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    run_suite(quick_plan(), out, jobs=2, log=lambda *_: None)
    return out


def test_quick_suite_writes_every_run_and_the_tables(quick):
    plan = quick_plan()
    with open(quick / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    finals = [r for r in rows if r["phase"] == "final"]
    assert len([r for r in rows if r["phase"] == "teacher"]) == 1
    assert len(finals) == len(plan.variants) * len(plan.seeds) + len(plan.ablations) * len(plan.ablation_seeds)
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    table = (quick / "accuracy.md").read_text()
    for name in ("vanilla", "kd", "dkd", "dist", "kd+ls", "pcd", "pcd-curriculum", "pcd-released", "pcd+ls"):
        assert f"| {name} |" in table
    assert "pcd - kd" in table and "95%" in table
    assert (quick / "ablation.md").exists() and (quick / "environment.json").exists()


def test_a_finished_suite_is_not_redone(quick):
    stamps = {p: p.stat().st_mtime_ns for p in (quick / "runs").rglob("model.safetensors")}
    run_suite(quick_plan(), quick, jobs=2, log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in (quick / "runs").rglob("model.safetensors")} == stamps


def test_a_run_of_another_config_is_refused_not_reused(quick):
    import yaml
    from pcdistill.config import ConfigError
    from pcdistill.evidence.pipeline import run_once
    run_dir = next(p.parent for p in (quick / "runs").rglob("model.safetensors") if "final" in p.parts)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_once(config, run_dir)  # the same experiment (paths as saved): read back
    config["trainer"]["epochs"] += 1
    config["trainer"]["threads"] = 2  # how it runs: never a reason to refuse
    with pytest.raises(ConfigError, match=r"trainer\.epochs: \d+ there, \d+ now") as error:
        run_once(config, run_dir)
    assert str(run_dir) in str(error.value) and "threads" not in str(error.value)


def test_bucket_analysis_writes_table_and_plot(quick):
    table = analyse(quick, "digits")
    assert "gap, rank 1" in table and "gap, rank 2-5" in table
    assert (quick / "buckets_digits.png").stat().st_size > 1000


def test_paired_interval_is_the_t_interval():
    a, b = [70.1, 71.3, 69.8, 70.9], [69.0, 70.2, 69.9, 69.5]
    diffs = np.subtract(a, b)
    mean, low, high = paired_interval(a, b)
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert mean == pytest.approx(diffs.mean())
    assert (low, high) == (pytest.approx(diffs.mean() - half, abs=1e-3), pytest.approx(diffs.mean() + half, abs=1e-3))
    for dof, value in T_975.items():
        assert value == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-3)


def test_bucket_gaps_with_fewer_classes_than_the_buckets_reach():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    got = bucket_gaps(student, teacher)  # buckets 1, 2-5, 6-20, 21+: the third is cut at 8, the last is empty
    assert set(got) == {"1", "2-5", "6-20"}
    log_t, log_s = torch.log_softmax(teacher.double(), 1), torch.log_softmax(student.double(), 1)
    order = log_t.argsort(1, descending=True)[:, 5:]
    want = (log_t.gather(1, order) - log_s.gather(1, order)).abs().mean().item()
    assert got["6-20"][0] == pytest.approx(want, rel=1e-12)


def test_bucket_gaps_against_a_per_sample_loop():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 30), torch.randn(5, 30) * 2
    got = bucket_gaps(student, teacher)
    log_t, log_s = torch.log_softmax(teacher.double(), 1), torch.log_softmax(student.double(), 1)
    for label, (low, high) in {"1": (1, 1), "2-5": (2, 5), "6-20": (6, 20), "21+": (21, 30)}.items():
        gaps, kls = [], []
        for i in range(5):
            ranked = sorted(range(30), key=lambda c: -log_t[i, c].item())[low - 1:high]
            gaps += [abs(log_t[i, c] - log_s[i, c]).item() for c in ranked]
            qt = torch.softmax(log_t[i, ranked], 0)
            qs = torch.softmax(log_s[i, ranked], 0)
            kls.append((qt * (qt.log() - qs.log())).sum().item())
        assert got[label][0] == pytest.approx(np.mean(gaps))
        assert got[label][1] == pytest.approx(np.mean(kls), abs=1e-12)


def test_report_replaces_only_the_marked_section(quick, tmp_path):
    from pcdistill.evidence.report import BEGIN, END, update_readme
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nkept\n\n{BEGIN}\nold\n{END}\n\nalso kept\n")
    (quick / "discussion.md").write_text("## What we found\n\nPCD did X.\n")
    update_readme(readme, quick)
    text = readme.read_text()
    assert text.startswith("# title\n\nkept") and text.endswith("also kept\n") and "old" not in text
    assert "#### What we found" in text and "| pcd |" in text and "Measured" in text
