"""The SmolLM2 suite (``pcdistill bench lm --recipe smollm2``) on a tiny GGUF teacher written here (no network):
one quick run shared by every test, its files against independent references (the source model's own
perplexity and logits in float64, a naive bucket loop, scipy's t-interval), the teacher cached once,
resumability, and the error without a fetched teacher."""
from __future__ import annotations

import copy
import csv
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scipy import stats

from pcdistill.config import ConfigError, load_config
from pcdistill.evidence.lm import (CSV_FIELDS, SMOLLM2, SMOLLM2_GROUP, SMOLLM2_QUICK, SMOLLM2_VARIANTS,
                                   SmolLM2Plan, smollm2_plan)
from pcdistill.evidence.pipeline import run_suite
from tests.gguf_fixtures import tiny_gguf

pytestmark = pytest.mark.slow

DATA = {"block_size": 32, "max_files": 8, "max_chars": 500, "test_fraction": 0.25}


def tiny_plan(file: Path) -> SmolLM2Plan:
    """The quick recipe with the tiny teacher (2 layers, vocabulary 300): every method, two seeds."""
    recipe = replace(SMOLLM2_QUICK, teacher=str(file), teacher_name="a tiny llama", layers=(1,), data_options=DATA,
                     val_fraction=0.25, batch_size=4, tune_iterations=2)
    return SmolLM2Plan(recipe, seeds=(0, 1), alpha_grid=(1.0,), variants=list(SMOLLM2_VARIANTS))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2_suite")
    file, model, tokenizer = tiny_gguf(tmp / "teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCDISTILL_CACHE", str(tmp / "cache"))
        started = time.perf_counter()
        run_suite(tiny_plan(file), tmp / "results", jobs=1, log=lambda *args: None)
        print(f"tiny smollm2 suite: {time.perf_counter() - started:.0f} s")
        yield tmp / "results", file, model


def rows_of(results: Path) -> list[dict]:
    with open(results / "lm_smollm2.csv") as f:
        return list(csv.DictReader(f))


def naive_test_blocks(file: Path) -> torch.Tensor:
    """The test split's blocks, built here from the corpus and the source tokenizer (documents joined by EOS)."""
    from transformers import AutoTokenizer

    from pcdistill.data.text import build_corpus
    tokenizer = AutoTokenizer.from_pretrained(file.parent / "tokenizer")
    options = {k: v for k, v in DATA.items() if k != "block_size"}
    docs = build_corpus("python_stdlib", val_fraction=0.25, **options).test
    ids = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    size = DATA["block_size"]
    return torch.tensor(ids[:len(ids) // size * size]).view(-1, size)


def test_every_run_once_and_the_teacher_cached_once(suite):
    results, _, _ = suite
    plan = tiny_plan(Path("x.gguf"))
    rows = rows_of(results)
    assert list(rows[0]) == CSV_FIELDS
    phases = [r["phase"] for r in rows]
    assert phases.count("teacher") == 1  # no teacher run: its perplexity from the cache
    assert phases.count("tune") == len(plan.variants) - 1  # one scale each, vanilla not tuned
    assert phases.count("final") == len(plan.variants) * len(plan.seeds)
    cache = results / "runs" / SMOLLM2_GROUP / "teacher-cache"
    assert [p.parent for p in results.rglob("manifest.json")] == [cache]
    for r in rows:
        if r["phase"] == "teacher":
            continue
        cfg = load_config(Path(r["run_dir"]) / "config.yaml")
        assert Path(cfg.teacher.cache) == cache and cfg.model.init["layers"] == [1]
        assert float(r["test_ppl"]) > 1 and 0 <= float(r["test_agree"]) <= 100 and float(r["test_kl"]) >= 0
    assert {r["variant"] for r in rows} == {"teacher", "vanilla", "kd", "rkl", "jsd", "pcd"}
    jsd = load_config(next(Path(r["run_dir"]) for r in rows if r["variant"] == "jsd") / "config.yaml")
    assert jsd.distill.loss == {"beta": 0.5, "temperature": 1.0}


@torch.no_grad()
def test_teacher_perplexity_is_the_source_models(suite):
    results, file, model = suite
    teacher = next(r for r in rows_of(results) if r["phase"] == "teacher")
    blocks = naive_test_blocks(file)
    logits = copy.deepcopy(model).double()(blocks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert float(teacher["test_ppl"]) == pytest.approx(math.exp(nll.item()), rel=1e-4)  # float16 cache
    text = (results / "lm_smollm2.md").read_text()
    assert f"test ppl {float(teacher['test_ppl']):.2f}" in text


@torch.no_grad()
def test_buckets_against_a_naive_loop(suite):
    from transformers import AutoModelForCausalLM
    results, file, model = suite
    table = (results / "lm_smollm2_buckets.md").read_text()
    for bucket in ("1", "2-10", "11-100", "101-1000"):  # a vocabulary of 300: no rank 1001+
        assert f"gap, rank {bucket} " in table
    assert "gap, rank 1001+" not in table
    assert (results / "lm_smollm2_buckets.png").stat().st_size > 1000
    run = Path(next(r["run_dir"] for r in rows_of(results) if r["variant"] == "pcd" and r["phase"] == "final"))
    student = AutoModelForCausalLM.from_pretrained(run / "hf").eval().double()
    teacher = copy.deepcopy(model).double()
    top = tail = count = 0.0
    for block in naive_test_blocks(file):
        ls = torch.log_softmax(student(block[None]).logits[0, :-1], -1)
        lt = torch.log_softmax(teacher(block[None]).logits[0, :-1], -1)
        for lt_i, ls_i in zip(lt.tolist(), ls.tolist()):  # one row per position: it predicts the next token
            order = sorted(range(len(lt_i)), key=lambda c: -lt_i[c])
            top += abs(lt_i[order[0]] - ls_i[order[0]])
            tail += sum(abs(lt_i[c] - ls_i[c]) for c in order[100:]) / (len(order) - 100)
            count += 1
    measured = json.loads((run / "lm_test.json").read_text())
    assert measured["tokens"] == count
    assert measured["buckets"]["1"][0] == pytest.approx(top / count, rel=1e-4)  # float16 cache
    assert measured["buckets"]["101-1000"][0] == pytest.approx(tail / count, rel=1e-4)


def test_report_pairs_pcd_with_every_method_against_scipy(suite):
    results, _, _ = suite
    rows = [r for r in rows_of(results) if r["phase"] == "final"]
    text = (results / "lm_smollm2.md").read_text()
    for other in ("vanilla", "kd", "rkl", "jsd"):
        by = {v: {int(r["seed"]): float(r["test_ppl"]) for r in rows if r["variant"] == v} for v in ("pcd", other)}
        diffs = [by["pcd"][s] - by[other][s] for s in sorted(by["pcd"])]
        mean = sum(diffs) / len(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * stats.tstd(diffs) / math.sqrt(len(diffs))
        line = next(x for x in text.splitlines() if x.startswith(f"| pcd - {other} | test ppl |"))
        shown = [float(v) for v in re.search(r"\| ([-+.\d]+) \| \[([-+.\d]+), ([-+.\d]+)\]", line).groups()]
        assert shown == pytest.approx([mean, mean - half, mean + half], abs=0.011)  # t table to 3 decimals
        verdict = "loses" if mean - half > 0 else "wins" if mean + half < 0 else "tie"
        assert verdict in line  # lower perplexity wins


def test_second_invocation_reads_everything_back(suite):
    results, file, _ = suite
    before = (results / "lm_smollm2.csv").read_text()
    kept = [*results.rglob("model.safetensors"), *results.rglob("teacher.json"), *results.rglob("*.safetensors")]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    run_suite(tiny_plan(file), results, jobs=1, log=lambda *args: None)
    assert (results / "lm_smollm2.csv").read_text() == before
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())


def test_without_the_fetched_teacher_it_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path / "empty"))
    plan = smollm2_plan(quick=True)
    with pytest.raises(ConfigError, match="pcdistill fetch smollm2-135m"):
        plan.prepare(SMOLLM2_GROUP, tmp_path / "runs" / SMOLLM2_GROUP)
    assert not (tmp_path / "runs").exists()


def test_full_recipe_is_the_issues_suite():
    plan = smollm2_plan()
    assert plan.recipe is SMOLLM2 and plan.seeds == (0, 1, 2) and plan.extend_grid
    assert [v.name for v in plan.variants] == ["vanilla", "kd", "rkl", "jsd", "pcd"]
    assert plan.compare == ("pcd", ("vanilla", "kd", "rkl", "jsd"))
    assert {v.name: v.loss.get("temperature") for v in plan.variants if v.loss} == {
        "kd": 1.0, "rkl": 1.0, "jsd": 1.0, "pcd": 1.0}
