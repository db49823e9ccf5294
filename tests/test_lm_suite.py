"""The language-model suite: `pcdistill bench lm --quick` end to end, its files against their sources
(metrics.jsonl, a naive bucket loop, scipy's t-interval), resumability, and the shipped recipe files."""
from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from scipy import stats

from pcdistill.engine.records import read_metrics
from pcdistill.evidence.lm import CSV_FIELDS, FULL, QUICK, quick_plan
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_suite")
    env = {"PCDISTILL_CACHE": str(tmp / "cache")}
    started = time.perf_counter()
    done = run_cli("bench", "lm", "--quick", "--out", str(tmp / "results"), timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "results", time.perf_counter() - started, env


def rows_of(results: Path) -> list[dict]:
    with open(results / "lm.csv") as f:
        return list(csv.DictReader(f))


def test_quick_suite_writes_every_run_with_sane_values(quick):
    results, seconds, _ = quick
    plan = quick_plan()
    rows = rows_of(results)
    assert list(rows[0]) == CSV_FIELDS
    phases = [r["phase"] for r in rows]
    distilled = [v for v in plan.variants if v.method != "vanilla"]
    assert phases.count("teacher") == 1
    assert phases.count("tune") == len(distilled) * len(plan.alpha_grid)
    assert phases.count("final") == len(plan.variants) * len(plan.seeds)
    for r in rows:
        assert float(r["test_ppl"]) > 1 and float(r["val_ppl"]) > 1 and float(r["seconds"]) > 0
        if r["phase"] == "final":
            assert 0 <= float(r["test_agree"]) <= 100 and float(r["test_kl"]) >= 0
    print(f"quick lm suite: {seconds:.0f} s")


def test_final_rows_match_their_metrics_and_test_pass(quick):
    results, _, _ = quick
    for r in rows_of(results):
        last = read_metrics(r["run_dir"])[-1]
        for key in ("test_ppl", "val_ppl", "test_agree", "test_kl"):
            if key in last:  # runs with a teacher evaluate agreement and KL themselves
                assert float(r[key]) == pytest.approx(last[key], rel=1e-9), (r["run_dir"], key)
        if r["phase"] == "final":
            measured = json.loads((Path(r["run_dir"]) / "lm_test.json").read_text())
            assert float(r["test_agree"]) == pytest.approx(measured["agree"], rel=1e-9)
            if "test_agree" in last:  # the test pass recomputes what the run measured, from hf/
                assert measured["agree"] == pytest.approx(last["test_agree"], abs=1e-6)
                assert measured["kl"] == pytest.approx(last["test_kl"], rel=1e-4)


def test_weight_chosen_by_lowest_val_perplexity(quick):
    results, _, _ = quick
    rows = rows_of(results)
    for variant in {r["variant"] for r in rows if r["phase"] == "tune"}:
        tuned = [r for r in rows if r["variant"] == variant and r["phase"] == "tune"]
        best = min(tuned, key=lambda r: float(r["val_ppl"]))["alpha"]
        assert {r["alpha"] for r in rows if r["variant"] == variant and r["phase"] == "final"} == {best}


def test_report_intervals_against_scipy(quick):
    results, _, _ = quick
    rows = [r for r in rows_of(results) if r["phase"] == "final"]
    text = (results / "lm.md").read_text()
    for other in ("kd", "vanilla"):
        for metric, label in (("test_ppl", "test ppl"), ("test_agree", "agreement %")):
            by = {v: {int(r["seed"]): float(r[metric]) for r in rows if r["variant"] == v} for v in ("pcd", other)}
            diffs = [by["pcd"][s] - by[other][s] for s in sorted(by["pcd"])]
            mean = sum(diffs) / len(diffs)
            half = stats.t.ppf(0.975, len(diffs) - 1) * stats.tstd(diffs) / math.sqrt(len(diffs))
            line = f"| pcd - {other} | {label} | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}] |"
            assert line in text, (line, text)
    row = next(line for line in text.splitlines() if line.startswith("| pcd - kd | test ppl"))
    low, high = map(float, re.search(r"\[([-+.\d]+), ([-+.\d]+)\]", row).groups())
    verdict = "loses" if low > 0 else "wins" if high < 0 else "tie"
    assert verdict in row  # lower perplexity wins


@torch.no_grad()
def test_buckets_against_a_naive_loop(quick):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pcdistill.data.text import build_corpus
    results, _, _ = quick
    table = (results / "lm_buckets.md").read_text()
    for bucket in ("1", "2-10", "11-100", "101+"):
        assert f"gap, rank {bucket}" in table
    assert (results / "lm_buckets.png").stat().st_size > 1000
    run = Path(next(r["run_dir"] for r in rows_of(results) if r["variant"] == "pcd" and r["phase"] == "final"))
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    options = {k: v for k, v in QUICK.data_options.items() if k not in ("block_size", "vocab_size")}
    docs = build_corpus("python_stdlib", val_fraction=QUICK.val_fraction, **options).test
    ids = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    size = QUICK.data_options["block_size"]
    blocks = torch.tensor(ids[:len(ids) // size * size]).view(-1, size)
    s = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    t = AutoModelForCausalLM.from_pretrained(results / "runs" / "lm" / "teacher" / "hf").eval()
    top, tail, count = 0.0, 0.0, 0
    for block in blocks:
        ls = torch.log_softmax(s(block[None]).logits[0, :-1].double(), -1)
        lt = torch.log_softmax(t(block[None]).logits[0, :-1].double(), -1)
        for lt_i, ls_i in zip(lt.tolist(), ls.tolist()):  # one row per position: it predicts the next token
            order = sorted(range(len(lt_i)), key=lambda c: -lt_i[c])
            top += abs(lt_i[order[0]] - ls_i[order[0]])
            tail += sum(abs(lt_i[c] - ls_i[c]) for c in order[100:]) / (len(order) - 100)
            count += 1
    measured = json.loads((run / "lm_test.json").read_text())
    assert measured["tokens"] == count
    assert measured["buckets"]["1"][0] == pytest.approx(top / count, rel=1e-4)
    assert measured["buckets"]["101+"][0] == pytest.approx(tail / count, rel=1e-4)


def test_vanilla_students_share_the_teachers_tokenizer(quick):
    from pcdistill.lm.tokenizer import load_tokenizer, tokenizer_difference
    results, _, _ = quick
    teacher = load_tokenizer(results / "runs" / "lm" / "teacher" / "tokenizer")
    for r in rows_of(results):
        if r["variant"] == "vanilla":
            assert tokenizer_difference(teacher, load_tokenizer(Path(r["run_dir"]) / "tokenizer")) is None


def test_second_invocation_reads_finished_runs_back(quick):
    results, _, env = quick
    before = (results / "lm.csv").read_text()
    mtimes = {p: p.stat().st_mtime for p in (results / "runs").rglob("model.safetensors")}
    done = run_cli("bench", "lm", "--quick", "--out", str(results), timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (results / "lm.csv").read_text() == before
    assert all(p.stat().st_mtime == m for p, m in mtimes.items())


def test_full_recipe_is_the_issues_size():  # configs/lm/stdlib are checked in test_config
    assert FULL.data_options["vocab_size"] >= 8192 and FULL.data_options["block_size"] == 128
    assert FULL.teacher["hidden_size"] > FULL.student["hidden_size"]
