"""The language-model suite: does PCD on next-token logits beat KD and a vanilla student on real text?

Data: the Python standard library's source (``python_stdlib``, nothing to download), split by file.
One teacher is trained (the vanilla students beside it: they train the same tokenizer from the same
train split), then KD, DKD, PCD, PCD with logit standardisation and PCD with K=5 students, all with the
students' recipe. As in the other suites (:mod:`pcdistill.evidence.suite`), each variant keeps its loss
settings and only the weight of its distillation term is chosen, from ``alpha_grid`` x its published
weight, by the **validation perplexity** (lower is better) of a short seed-0 run; the finals run every
seed at that weight, and the test split is read only for the report. Results go to ``results/``:

    lm.csv              one row per run: variant, seed, alpha, test_ppl, val_ppl, test_agree, test_kl, seconds,
                        phase, run_dir
    lm.md               mean +- std per variant; PCD - KD and PCD - vanilla (and - DKD) paired by seed with 95%
                        t-intervals on test perplexity and agreement; the tuning runs
    lm_buckets.md/.png  teacher-student gap on the test tokens by the teacher's rank (1, 2-10, 11-100, 101+)
    lm_environment.json versions, hardware, date, wall time

Resumable: finished runs are read back, killed ones resumed. The recipe files ``configs/lm/stdlib/*.yaml``
are :func:`teacher_config` and :func:`student_config` at the chosen weights (``pcdistill bench configs``
writes them from ``results/lm.csv``; a test checks they match).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcdistill.evidence.suite import (Job, Runner, Variant, _slug, choose_scale, difference_row, environment,
                                      by_seed, mean_std_cell, tuning_lines, write_rows)

BUCKETS = ((1, 1), (2, 10), (11, 100), (101, None))
DATASET = "python_stdlib"
# T=1 (the next-token distribution itself) for every method but the standardised one, which follows the
# accuracy suite's pcd+ls (T=2, weight x9); DKD keeps its published alpha 1, beta 8
VARIANTS = [
    Variant("vanilla", "vanilla", description="cross-entropy on the next token only"),
    Variant("kd", "kd", {"temperature": 1.0}, description="KD, T=1"),
    Variant("dkd", "dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 1.0}, description="DKD, alpha 1, beta 8, T=1"),
    Variant("pcd", "pcd", {"temperature": 1.0, "stages": 3}, description="PCD, paper variant, joint schedule, K=3, T=1"),
    Variant("pcd_ls", "pcd", {"temperature": 2.0, "stages": 3, "standardize": True}, alpha=9.0,
            description="PCD with logit standardisation: weight x9, T=2"),
    Variant("pcd_k5", "pcd", {"temperature": 1.0, "stages": 5}, description="PCD, K=5 stages, T=1"),
]
TEACHER_RUN = "runs/lm/stdlib/teacher"  # where configs/lm/stdlib/*.yaml expect the teacher
COST = {"vanilla": 1, "kd": 2, "dkd": 3, "pcd": 4, "pcd_k5": 5, "pcd_ls": 6}  # measured step-time order


def _llama(hidden: int, layers: int, heads: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads}


@dataclass(frozen=True)
class LMRecipe:
    """Everything but the distillation term: corpus, tokenizer, both models and their training lengths."""

    teacher: dict
    student: dict
    teacher_epochs: int
    epochs: int
    tune_iterations: int  # optimizer steps of a tuning run (shorter than the students' epochs)
    data_options: dict = field(default_factory=dict)
    val_fraction: float = 0.1
    model: str = "llama"
    lr: float = 3e-3
    batch_size: int = 16

    def base(self, options: dict, seed: int, epochs: int, iterations: int | None = None) -> dict:
        return {
            "task": "causal_lm",
            "data": {"name": DATASET, "val_fraction": self.val_fraction, "options": dict(self.data_options)},
            "model": {"name": self.model, "options": dict(options)},
            "optim": {"name": "adamw", "lr": self.lr, "weight_decay": 0.01, "clip_grad_norm": 1.0},
            "schedule": {"name": "cosine", "warmup": 0.1, "unit": "epoch"},
            "trainer": {"epochs": epochs, "iterations": iterations, "batch_size": self.batch_size, "seed": seed,
                        "device": "cpu", "log_every": 20, "eval_every": epochs, "checkpoint_every": 50},
        }


FULL = LMRecipe(
    teacher=_llama(256, 4, 4), student=_llama(128, 2, 4), teacher_epochs=3, epochs=1, tune_iterations=50,
    data_options={"block_size": 128, "vocab_size": 8192, "max_files": 100, "max_chars": 16000,
                  "test_fraction": 0.1})
QUICK = LMRecipe(
    teacher=_llama(64, 2, 2), student=_llama(32, 1, 2), teacher_epochs=1, epochs=1, tune_iterations=10,
    val_fraction=0.15, batch_size=8,
    data_options={"block_size": 64, "vocab_size": 512, "max_files": 24, "max_chars": 2000, "test_fraction": 0.15})


def teacher_config(recipe: LMRecipe) -> dict:
    return recipe.base(recipe.teacher, 0, recipe.teacher_epochs) | {
        "description": f"{DATASET} teacher {recipe.model} {recipe.teacher['hidden_size']}x"
                       f"{recipe.teacher['num_hidden_layers']}"}


def student_config(recipe: LMRecipe, variant: Variant, teacher_dir: str, seed: int = 0, scale: float = 1.0,
                   tune: bool = False) -> dict:
    """The config dict of one student run (``configs/lm/stdlib/*.yaml`` are these at scale 1, seed 0)."""
    teacher = {"name": recipe.model, "path": teacher_dir} if variant.method != "vanilla" else {}
    config = recipe.base(recipe.student, seed, recipe.epochs, recipe.tune_iterations if tune else None)
    return config | {"teacher": teacher, "distill": variant.distill(scale, recipe.epochs / 12),
                     "description": f"{DATASET} student {recipe.model} {recipe.student['hidden_size']}x"
                                    f"{recipe.student['num_hidden_layers']}: {variant.name} ({variant.description})"}


@dataclass
class LMPlan:
    recipe: LMRecipe
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))


def full_plan() -> LMPlan:
    return LMPlan(FULL)


def quick_plan() -> LMPlan:
    return LMPlan(QUICK, seeds=(0, 1), alpha_grid=(0.5, 1.0))


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run_lm_suite(plan: LMPlan, results: Path, jobs: int = 2, log=print) -> list[dict]:
    """Teacher (vanilla students beside it), tuning (seed 0, every weight of the grid), finals (every seed at
    the weight chosen on val ppl) and the bucket analysis; skips finished runs; returns the rows of lm.csv."""
    results.mkdir(parents=True, exist_ok=True)
    with Runner(jobs, log, metric="test_ppl") as runner:
        return _run(plan, results, runner, log)


def _run(plan: LMPlan, results: Path, runner: Runner, log) -> list[dict]:
    runs_dir = results / "runs" / "lm"
    recipe = plan.recipe
    started = time.perf_counter()
    teacher_dir = runs_dir / "teacher"

    def job(variant: Variant, scale: float, seed: int, phase: str) -> Job:
        name = variant.name if variant.method == "vanilla" else f"{variant.name}@{scale:g}"
        config = student_config(recipe, variant, str(teacher_dir), seed, scale, tune=phase == "tune")
        return Job((variant.name, scale, seed, phase), config, runs_dir / phase / _slug(name) / f"seed{seed}")

    # the longest runs first, so that two workers finish each phase close together
    by_cost = sorted(plan.variants, key=lambda v: -COST.get(v.name, 0))
    distilled = [v for v in by_cost if v.method != "vanilla"]
    first = runner.run([Job(("teacher", None, 0, "teacher"), teacher_config(recipe), teacher_dir)]
                       + [job(v, 1.0, s, "final") for v in plan.variants if v.method == "vanilla" for s in plan.seeds],
                       "teacher and vanilla students")
    teachers = {k: v for k, v in first.items() if k[3] == "teacher"}
    tuning = runner.run([job(v, a, plan.seeds[0], "tune") for v in distilled for a in plan.alpha_grid],
                        "tuning (seed 0)")
    # lowest val perplexity; 1/ppl keeps choose_scale's "higher is better, missing is worst"
    chosen = {v.name: choose_scale(lambda a: 1.0 / tuning[v.name, a, plan.seeds[0], "tune"]["val_ppl"],
                                   plan.alpha_grid) for v in distilled}
    final = {k: v for k, v in first.items() if k[3] == "final"} | runner.run(
        [job(v, chosen[v.name], s, "final") for v in distilled for s in plan.seeds], "final seeds")

    rows = []
    order = {"teacher": -1} | {v.name: i for i, v in enumerate(plan.variants)}
    done = sorted(list(teachers.items()) + list(tuning.items()) + list(final.items()),  # not in completion order
                  key=lambda item: (("teacher", "tune", "final").index(item[0][3]), order[item[0][0]],
                                    item[0][1] or 0.0, item[0][2]))
    for (name, scale, seed, phase), result in done:
        variant = next((v for v in plan.variants if v.name == name), None)
        alpha = None if variant is None or variant.method == "vanilla" else variant.alpha * scale
        rows.append({"variant": name, "seed": seed, "alpha": alpha, "phase": phase}
                    | {k: result.get(k) for k in ("test_ppl", "val_ppl", "test_agree", "test_kl", "seconds",
                                                  "run_dir")})
    log("bucket analysis on the test tokens")
    stats = bucket_stats(rows, teacher_dir, runner._pool)  # the workers the runs used, already warm
    write_rows(rows, results / "lm.csv", CSV_FIELDS)
    from pcdistill.evidence.analysis import write_bucket_report
    write_bucket_report(stats, [v.name for v in plan.variants], results / "lm_buckets",
                        f"{DATASET} next-token logits (test split)",
                        "Per test token, the vocabulary ranked by the teacher's probability (buckets 1, 2-10, "
                        "11-100, 101+)")
    env = environment(time.perf_counter() - started)
    (results / "lm_environment.json").write_text(json.dumps(env, indent=2) + "\n")
    (results / "lm.md").write_text(report(plan, rows, env))
    return rows


CSV_FIELDS = ["variant", "seed", "alpha", "test_ppl", "val_ppl", "test_agree", "test_kl", "seconds", "phase",
              "run_dir"]


# ----------------------------------------------------------------------------------------------
# Test tokens: bucket gaps, and agreement / KL for students trained without a teacher
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_token_stats(run_dir: Path, teacher_dir: Path, batch_size: int = 8) -> dict:
    """``bucket_gaps`` of the run's student against the teacher over every test token (batch by batch, weighted
    by tokens), and the top-1 agreement (%) and KL(p_t || p_s) on them, from the exported ``hf/`` models."""
    import torch.nn.functional as F

    from pcdistill.config import load_config
    from pcdistill.data.text import build_corpus
    from pcdistill.evidence.analysis import bucket_gaps
    from pcdistill.lm.data import TokenBlockLoader, encode_documents, token_blocks
    from pcdistill.lm.models import create_causal_lm, full_logits
    from pcdistill.lm.tokenizer import load_tokenizer
    from pcdistill.tasks.causal_lm import DATA_OPTIONS

    cfg = load_config(run_dir / "config.yaml")
    options = {k: v for k, v in cfg.data.options.items() if k not in DATA_OPTIONS}
    docs = build_corpus(cfg.data.name, val_fraction=cfg.data.val_fraction, **options).test
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    blocks = token_blocks(encode_documents(docs, tokenizer), cfg.data.options.get("block_size",
                                                                                  DATA_OPTIONS["block_size"]))
    student = create_causal_lm({"path": str(run_dir / "hf")}).eval()
    teacher = create_causal_lm({"path": str(teacher_dir / "hf")}).eval()
    sums: dict[str, list[float]] = {}
    agree = kl = count = 0.0
    for input_ids, _ in TokenBlockLoader(blocks, batch_size=batch_size, train=False):
        s = full_logits(student, input_ids)[:, :-1].flatten(0, 1).float()
        t = full_logits(teacher, input_ids)[:, :-1].flatten(0, 1).float()
        common = min(s.shape[-1], t.shape[-1])
        rows = s.shape[0]
        for bucket, values in bucket_gaps(s[:, :common], t[:, :common], BUCKETS).items():
            acc = sums.setdefault(bucket, [0.0, 0.0])
            acc[0] += values[0] * rows
            acc[1] += values[1] * rows
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        kl += F.kl_div(s[:, :common].log_softmax(-1), t[:, :common].log_softmax(-1), log_target=True,
                       reduction="sum").item()
        count += rows
    return {"buckets": {b: (g / count, k / count) for b, (g, k) in sums.items()},
            "agree": 100.0 * agree / count, "kl": kl / count, "tokens": int(count)}


def cached_test_stats(run_dir: str, teacher_dir: str) -> dict:
    """:func:`test_token_stats` of a run, computed once (single-threaded) and kept in its ``lm_test.json``."""
    cache = Path(run_dir) / "lm_test.json"
    if not cache.exists():
        torch.set_num_threads(1)
        cache.write_text(json.dumps(test_token_stats(Path(run_dir), Path(teacher_dir))))
    return json.loads(cache.read_text())


def bucket_stats(rows: list[dict], teacher_dir: Path, pool=None) -> dict:
    """{variant: {bucket: [(gap, kl) per final seed]}} from :func:`cached_test_stats`, on ``pool`` (an executor,
    e.g. the runner's workers, which have torch and transformers loaded) or in this process.
    Final rows without agreement (vanilla students train without a teacher) get it from this pass."""
    from pcdistill.evidence.analysis import add_gaps
    finals = [row for row in rows if row["phase"] == "final"]
    args = ([r["run_dir"] for r in finals], [str(teacher_dir)] * len(finals))
    measured = list(pool.map(cached_test_stats, *args) if pool is not None else map(cached_test_stats, *args))
    stats: dict = {}
    for row, numbers in zip(finals, measured):
        add_gaps(stats, row["variant"], numbers["buckets"])
        if row.get("test_agree") is None:
            row["test_agree"], row["test_kl"] = numbers["agree"], numbers["kl"]
    return stats


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def report(plan: LMPlan, rows: list[dict], env: dict) -> str:
    recipe = plan.recipe
    teacher = next(r for r in rows if r["phase"] == "teacher")
    data = recipe.data_options
    lines = ["# Language-model suite: python_stdlib", "",
             f"Final test perplexity (lower is better) of causal LMs on the test files of the Python standard library "
             f"({data.get('max_files', 'all')} files, at most {data.get('max_chars')} characters each, split by file; "
             f"byte-level BPE of {data['vocab_size']} tokens trained on the train files; blocks of "
             f"{data['block_size']} tokens), {len(plan.seeds)} seeds; alpha chosen per variant from "
             f"{list(plan.alpha_grid)} x its published weight by the val perplexity of a seed-{plan.seeds[0]} run of "
             f"{recipe.tune_iterations} steps. {env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} "
             f"cores); {env['suite_wall_seconds_this_invocation'] / 60:.0f} min of wall time for this invocation.", "",
             f"Teacher {recipe.model} hidden {recipe.teacher['hidden_size']} x {recipe.teacher['num_hidden_layers']} "
             f"layers ({recipe.teacher_epochs} epochs): test ppl {teacher['test_ppl']:.2f}, val ppl "
             f"{teacher['val_ppl']:.2f}. Students {recipe.model} hidden {recipe.student['hidden_size']} x "
             f"{recipe.student['num_hidden_layers']} layers, {recipe.epochs} epoch(s), seeds {list(plan.seeds)}. "
             "Agreement: % of test tokens where student and teacher have the same top-1 token; KL: mean KL(p_t || p_s) "
             "per token at T=1 (the vanilla students', who train without the teacher, measured after training the "
             "same way).", "",
             "| variant | alpha (chosen on val) | val ppl | test ppl (mean +- std) | test agreement % | test KL | "
             "test ppl per seed |", "|---|---:|---:|---:|---:|---:|---|"]
    for variant in plan.variants:
        final = by_seed(rows, variant.name)
        if not final:
            continue
        seeds = sorted(final)
        alpha = final[seeds[0]]["alpha"]
        lines.append(f"| {variant.name} | {'-' if alpha is None else f'{alpha:g}'} | "
                     f"{statistics.fmean(final[s]['val_ppl'] for s in seeds):.2f} | "
                     f"{mean_std_cell([final[s]['test_ppl'] for s in seeds])} | "
                     f"{mean_std_cell([final[s]['test_agree'] for s in seeds])} | "
                     f"{mean_std_cell([final[s]['test_kl'] for s in seeds], 3)} | "
                     + ", ".join(f"{final[s]['test_ppl']:.2f}" for s in seeds) + " |")
    lines += ["", "## PCD against the baselines", "",
              "Paired by seed; a difference wins or loses only when its 95% t-interval excludes 0 (lower perplexity, "
              "higher agreement win).", "",
              "| pcd - other | metric | mean difference | 95% interval | verdict |", "|---|---|---:|---|---|"]
    pcd = by_seed(rows, "pcd")
    for other in ("kd", "vanilla", "dkd"):
        for metric, label, lower_is_better in (("test_ppl", "test ppl", True), ("test_agree", "agreement %", False)):
            diff = difference_row(pcd, by_seed(rows, other), metric)
            if diff is not None:
                mean, low, high, verdict = diff
                if lower_is_better:
                    verdict = {"wins": "loses", "loses": "wins"}.get(verdict, verdict)
                lines.append(f"| pcd - {other} | {label} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |")
    lines += tuning_lines(plan.variants, plan.alpha_grid, rows, "val_ppl", "val ppl")
    return "\n".join(lines) + "\n"
