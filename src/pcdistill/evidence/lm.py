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

The suite is a :class:`~pcdistill.evidence.pipeline.Suite` (:class:`LMPlan`), run by
:func:`~pcdistill.evidence.pipeline.run_suite`; ``pcdistill bench lm --recipe NAME`` picks a plan of
:data:`RECIPES`. Resumable: finished runs are read back, killed ones resumed. The recipe files ``configs/lm/stdlib/*.yaml``
are :func:`teacher_config` and :func:`student_config` at the chosen weights (``pcdistill bench configs``
writes them from ``results/lm.csv``; a test checks they match).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcdistill.evidence.pipeline import Suite, Variant
from pcdistill.evidence.tables import Metric

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
class LMPlan(Suite):
    recipe: LMRecipe
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))

    title = f"Language-model suite: {DATASET}"
    csv_file, env_file, report_file = "lm.csv", "lm_environment.json", "lm.md"
    csv_fields = ["variant", "seed", "alpha", "test_ppl", "val_ppl", "test_agree", "test_kl", "seconds", "phase",
                  "run_dir"]
    choose_by = Metric("val_ppl", "val ppl", lower_is_better=True)
    test = Metric("test_ppl", "test ppl", lower_is_better=True)
    columns = (Metric("test_agree", "test agreement %"), Metric("test_kl", "test KL", 3))
    compare = ("pcd", ("kd", "vanilla", "dkd"))
    compare_by = (test, Metric("test_agree", "agreement %"))
    verdict_note = " (lower perplexity, higher agreement win)"
    cost = COST

    def groups(self) -> list[str]:
        return ["lm"]

    def teacher_config(self, group: str, folder: Path) -> dict:
        return teacher_config(self.recipe)

    def student_config(self, group, folder, variant, seed, scale, tune) -> dict:
        return student_config(self.recipe, variant, str(folder / "teacher"), seed, scale, tune)

    def analyse(self, rows: list[dict], results: Path, runner) -> None:
        from pcdistill.evidence.analysis import write_bucket_report
        runner.log("bucket analysis on the test tokens")
        teacher = next(r for r in rows if r["phase"] == "teacher")
        stats = bucket_stats(rows, Path(teacher["run_dir"]), runner)
        write_bucket_report(stats, [v.name for v in self.variants], results / "lm_buckets",
                            f"{DATASET} next-token logits (test split)",
                            "Per test token, the vocabulary ranked by the teacher's probability (buckets 1, 2-10, "
                            "11-100, 101+)")

    def intro(self, rows: list[dict], env: dict) -> list[str]:
        recipe = self.recipe
        teacher = next(r for r in rows if r["phase"] == "teacher")
        data = recipe.data_options
        return [f"Final test perplexity (lower is better) of causal LMs on the test files of the Python standard "
                f"library ({data.get('max_files', 'all')} files, at most {data.get('max_chars')} characters each, split "
                f"by file; byte-level BPE of {data['vocab_size']} tokens trained on the train files; blocks of "
                f"{data['block_size']} tokens), {len(self.seeds)} seeds; alpha chosen per variant from "
                f"{list(self.alpha_grid)} x its published weight by the val perplexity of a seed-{self.seeds[0]} run "
                f"of {recipe.tune_iterations} steps. {env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} "
                f"cores); {env['suite_wall_seconds_this_invocation'] / 60:.0f} min of wall time for this invocation.",
                "",
                f"Teacher {recipe.model} hidden {recipe.teacher['hidden_size']} x {recipe.teacher['num_hidden_layers']} "
                f"layers ({recipe.teacher_epochs} epochs): test ppl {teacher['test_ppl']:.2f}, val ppl "
                f"{teacher['val_ppl']:.2f}. Students {recipe.model} hidden {recipe.student['hidden_size']} x "
                f"{recipe.student['num_hidden_layers']} layers, {recipe.epochs} epoch(s), seeds {list(self.seeds)}. "
                "Agreement: % of test tokens where student and teacher have the same top-1 token; KL: mean KL(p_t || "
                "p_s) per token at T=1 (the vanilla students', who train without the teacher, measured after training "
                "the same way)."]


def full_plan() -> LMPlan:
    return LMPlan(FULL)


def quick_plan() -> LMPlan:
    return LMPlan(QUICK, seeds=(0, 1), alpha_grid=(0.5, 1.0))


# ``pcdistill bench lm --recipe NAME``: NAME -> the suite (its --quick plan when ``quick``)
RECIPES = {"stdlib": lambda quick: quick_plan() if quick else full_plan()}
CSV_FIELDS = LMPlan.csv_fields


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


def bucket_stats(rows: list[dict], teacher_dir: Path, runner=None) -> dict:
    """{variant: {bucket: [(gap, kl) per final seed]}} from :func:`cached_test_stats`; the runs not measured yet
    on ``runner``'s workers (which have torch and transformers loaded) or in this process.
    Final rows without agreement (vanilla students train without a teacher) get it from this pass."""
    from pcdistill.evidence.analysis import add_gaps
    finals = [row for row in rows if row["phase"] == "final"]
    todo = [r["run_dir"] for r in finals if not (Path(r["run_dir"]) / "lm_test.json").exists()]
    if todo:
        list((runner.pool().map if runner is not None else map)(cached_test_stats, todo, [str(teacher_dir)] * len(todo)))
    stats: dict = {}
    for row in finals:
        numbers = cached_test_stats(row["run_dir"], str(teacher_dir))
        add_gaps(stats, row["variant"], numbers["buckets"])
        if row.get("test_agree") is None:
            row["test_agree"], row["test_kl"] = numbers["agree"], numbers["kl"]
    return stats
