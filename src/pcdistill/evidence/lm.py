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

``--recipe smollm2`` (:class:`SmolLM2Plan`): a pretrained teacher, SmolLM2-135M-Instruct from its GGUF file
(``pcdistill fetch smollm2-135m``), run once in ``prepare`` into a teacher cache that every student reads
(``results/runs/lm_smollm2/teacher-cache``; its own val / test perplexity from it, ``teacher.json``); no
teacher training. Students of its layers 0, 10, 20, 29: vanilla, KD, reverse KL, JSD and PCD at T=1, each
weight chosen on val perplexity from {0.25, 1, 4} (a choice at an edge extends the grid once), 3 seeds.
Files ``lm_smollm2.csv``, ``lm_smollm2.md``, ``lm_smollm2_buckets.md/.png`` (ranks 1, 2-10, 11-100, 101-1000,
1001+, against the cache) and ``lm_smollm2_environment.json``; ``configs/lm/smollm2/*.yaml`` are
:func:`pretrained_student_config` at the chosen weights.
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


# ----------------------------------------------------------------------------------------------
# A pretrained teacher: SmolLM2-135M from its GGUF file (``--recipe smollm2``)
# ----------------------------------------------------------------------------------------------
SMOLLM2_GROUP = "lm_smollm2"  # results/runs/lm_smollm2/: teacher-cache/, teacher.json, tune/, final/
SMOLLM2_CACHE = "runs/lm/smollm2/teacher-cache"  # where configs/lm/smollm2/*.yaml keep the teacher's cache
SMOLLM2_BUCKETS = ((1, 1), (2, 10), (11, 100), (101, 1000), (1001, None))
# T=1 for every method: the teacher's own next-token distribution is what a student of an LM should match
# (MiniLLM, GKD and DistillKit distill at T=1), and over 49,152 tokens a T>1 moves most of the target's
# mass into the tail; one T for all, so the methods differ only in their loss. JSD at TRL's default beta 0.5.
SMOLLM2_VARIANTS = [
    Variant("vanilla", "vanilla", description="cross-entropy on the next token only"),
    Variant("kd", "kd", {"temperature": 1.0}, description="KD, forward KL, T=1"),
    Variant("rkl", "rkl", {"temperature": 1.0}, description="reverse KL (MiniLLM's divergence), T=1"),
    Variant("jsd", "jsd", {"beta": 0.5, "temperature": 1.0},
            description="generalized JSD (GKD), beta 0.5 (TRL's default), T=1"),
    Variant("pcd", "pcd", {"temperature": 1.0, "stages": 3}, description="PCD, paper variant, joint schedule, K=3, T=1"),
]
SMOLLM2_COST = {"vanilla": 1, "kd": 2, "rkl": 3, "jsd": 4, "pcd": 5}  # measured step-time order (bench/lm_steps.py)


@dataclass(frozen=True)
class PretrainedRecipe:
    """A suite's students of a pretrained teacher: the teacher (a ``pcdistill fetch`` name or a .gguf file),
    the teacher layers each student keeps (``model.init``), the corpus and the training lengths."""

    teacher: str  # teacher.path, model.init.from and data.options.tokenizer
    teacher_name: str  # for the report
    layers: tuple[int, ...]
    epochs: int
    tune_iterations: int  # optimizer steps of a tuning run (shorter than the students' epochs)
    data_options: dict = field(default_factory=dict)
    val_fraction: float = 0.1
    lr: float = 1e-3
    batch_size: int = 8
    log_every: int = 10
    checkpoint_every: int = 20


def pretrained_student_config(recipe: PretrainedRecipe, variant: Variant, cache: str, seed: int = 0,
                              scale: float = 1.0, tune: bool = False) -> dict:
    """The config dict of one student run reading the teacher's cache folder ``cache`` (``configs/lm/smollm2/*.yaml``
    are these at the chosen scale, seed 0). Vanilla students keep the teacher for their agreement and KL only."""
    layers = ", ".join(map(str, recipe.layers))
    return {
        "task": "causal_lm",
        "data": {"name": DATASET, "val_fraction": recipe.val_fraction,
                 "options": {"block_size": 128, "tokenizer": recipe.teacher} | dict(recipe.data_options)},
        "model": {"name": "llama", "init": {"from": recipe.teacher, "layers": list(recipe.layers)}},
        "optim": {"name": "adamw", "lr": recipe.lr, "weight_decay": 0.01, "clip_grad_norm": 1.0},
        "schedule": {"name": "cosine", "warmup": 0.1, "unit": "epoch"},
        "trainer": {"epochs": recipe.epochs, "iterations": recipe.tune_iterations if tune else None,
                    "batch_size": recipe.batch_size, "seed": seed, "device": "cpu", "log_every": recipe.log_every,
                    "eval_every": recipe.epochs, "checkpoint_every": recipe.checkpoint_every},
        "teacher": {"name": "llama", "path": recipe.teacher, "cache": cache},
        "distill": variant.distill(scale, recipe.epochs / 10),
        "description": f"{recipe.teacher_name} teacher, student of its layers {layers}: {variant.name} "
                       f"({variant.description})",
    }


@torch.no_grad()
def teacher_perplexity(teacher, blocks: dict[str, torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """``{"<split>_ppl": perplexity}`` of ``teacher`` (a causal LM or a ``CachedTeacher``) on each split's token
    blocks, every position predicting the next token, as the students' evaluation counts it."""
    import math

    import torch.nn.functional as F

    from pcdistill.lm.data import TokenBlockLoader
    from pcdistill.lm.models import full_logits
    out = {}
    for split, split_blocks in blocks.items():
        nll = tokens = 0.0
        for input_ids, labels in TokenBlockLoader(split_blocks, batch_size=batch_size, train=False):
            logits = full_logits(teacher, input_ids)[:, :-1].float()
            nll += F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum").item()
            tokens += labels[:, 1:].numel()
        out[f"{split}_ppl"] = math.exp(nll / tokens)
    return out


@dataclass
class SmolLM2Plan(Suite):
    """Students of a pretrained teacher that runs once, into a cache every student reads (``prepare``);
    no teacher training; its own val / test perplexity (from the cache) in the report and the csv."""

    recipe: PretrainedRecipe
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(SMOLLM2_VARIANTS))
    buckets: tuple = SMOLLM2_BUCKETS

    title = "Language-model suite: students of SmolLM2-135M (python_stdlib)"
    csv_file, env_file, report_file = "lm_smollm2.csv", "lm_smollm2_environment.json", "lm_smollm2.md"
    buckets_stem = "lm_smollm2_buckets"
    csv_fields = LMPlan.csv_fields
    choose_by = LMPlan.choose_by
    test = LMPlan.test
    columns = LMPlan.columns
    compare = ("pcd", ("vanilla", "kd", "rkl", "jsd"))
    compare_by = LMPlan.compare_by
    verdict_note = LMPlan.verdict_note
    extend_grid = True
    cost = SMOLLM2_COST

    def groups(self) -> list[str]:
        return [SMOLLM2_GROUP]

    def teacher_config(self, group: str, folder: Path) -> None:
        return None  # pretrained: nothing to train

    def student_config(self, group, folder, variant, seed, scale, tune) -> dict:
        return pretrained_student_config(self.recipe, variant, str(folder / "teacher-cache"), seed, scale, tune)

    def prepare(self, group: str, folder: Path) -> None:
        """The teacher's only forward: its cache under ``folder/teacher-cache`` (built once, else checked against
        the recipe), then its val / test perplexity from it into ``folder/teacher.json`` (once per cache)."""
        from pcdistill.config import ConfigError, from_dict
        from pcdistill.engine.distributed import Context
        from pcdistill.lm.fetch import resolve
        from pcdistill.tasks.causal_lm import cached_teacher, text_data
        try:
            resolve(self.recipe.teacher)
        except FileNotFoundError as err:
            raise ConfigError(f"the suite needs its teacher first: {err}") from None
        cfg = from_dict(self.student_config(group, folder, self.variants[0], self.seeds[0], 1.0, False))
        ctx = Context(0, 1, 0, torch.device("cpu"))
        data = text_data(cfg, ctx)
        teacher = cached_teacher(cfg, ctx, data)  # builds the cache when the folder holds none, else checks it
        manifest = teacher.cache.manifest
        path = folder / "teacher.json"
        if path.is_file() and json.loads(path.read_text()).get("cache_key") == manifest["key"]:
            return
        import time
        start = time.perf_counter()
        numbers = teacher_perplexity(teacher, {split: b for split, b in data.blocks.items() if split != "train"})
        path.write_text(json.dumps(numbers | {
            "seconds": round(time.perf_counter() - start, 1), "cache_key": manifest["key"],
            "vocab_size": manifest["vocab_size"], "blocks": {split: len(b) for split, b in data.blocks.items()},
            "source": "recomputed from the cache's hidden states and output layer"}, indent=1) + "\n")

    def analyse(self, rows: list[dict], results: Path, runner) -> None:
        from pcdistill.evidence.analysis import bucket_label, write_bucket_report
        folder = results / "runs" / SMOLLM2_GROUP
        self.teacher_numbers = json.loads((folder / "teacher.json").read_text())
        rows.insert(0, {"variant": "teacher", "alpha": None, "seed": None, "phase": "teacher", "scale": None,
                        "test_ppl": self.teacher_numbers["test_ppl"], "val_ppl": self.teacher_numbers["val_ppl"],
                        "seconds": self.teacher_numbers["seconds"], "run_dir": str(folder / "teacher-cache")})
        runner.log("bucket analysis on the test tokens")
        stats = bucket_stats(rows, folder / "teacher-cache", runner, self.buckets)
        ranks = ", ".join(bucket_label(b) for b in self.buckets)
        write_bucket_report(stats, [v.name for v in self.variants], results / self.buckets_stem,
                            f"{self.recipe.teacher_name} next-token logits (test split)",
                            f"Per test token, the teacher's vocabulary ranked by its probability (buckets {ranks})")

    def intro(self, rows: list[dict], env: dict) -> list[str]:
        r, t = self.recipe, self.teacher_numbers
        data, blocks = r.data_options, t["blocks"]
        size = data.get("block_size", 128)
        steps = blocks["train"] // r.batch_size
        return [f"Final test perplexity (lower is better) of students of {r.teacher_name} (`teacher.path: "
                f"{r.teacher}`) on the test files of the Python standard library ({data.get('max_files', 'all')} "
                f"files of at most {data.get('max_chars')} characters, split by file; the teacher's tokenizer, "
                f"{t['vocab_size']} tokens; {blocks['train']} / {blocks.get('val', 0)} / {blocks.get('test', 0)} "
                f"train / val / test blocks of {size} tokens), {len(self.seeds)} seed(s). The teacher ran once, into "
                f"a cache of its last hidden states that every student reads. Students: the teacher's embeddings, "
                f"final norm, output layer and layers {list(r.layers)} (`model.init`), {r.epochs} epoch(s) of {steps} "
                f"steps of {r.batch_size} blocks, AdamW lr {r.lr:g}, cosine. Each method's weight was chosen from "
                f"{list(self.alpha_grid)} x its published weight by the val perplexity of a seed-{self.seeds[0]} run "
                f"of {r.tune_iterations} steps (a choice at an edge of the grid tunes one weight beyond it, once); T=1 "
                f"for every method. {env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores); "
                f"{env['suite_wall_seconds_this_invocation'] / 60:.0f} min of wall time for this invocation.",
                "",
                f"Teacher {r.teacher_name}: test ppl {t['test_ppl']:.2f}, val ppl {t['val_ppl']:.2f} (its logits "
                "recomputed from the cache, as the students' evaluation sees them). Agreement: % of test tokens where "
                "student and teacher have the same top-1 token; KL: mean KL(p_t || p_s) per token at T=1 (the "
                "vanilla students', who train without the teacher's loss, too)."]


SMOLLM2 = PretrainedRecipe(
    teacher="smollm2-135m", teacher_name="SmolLM2-135M-Instruct", layers=(0, 10, 20, 29), epochs=1,
    tune_iterations=32, data_options={"block_size": 128, "max_files": 60, "max_chars": 12000, "test_fraction": 0.1})
SMOLLM2_QUICK = PretrainedRecipe(
    teacher="smollm2-135m", teacher_name="SmolLM2-135M-Instruct", layers=(0, 29), epochs=1, tune_iterations=3,
    val_fraction=0.15, checkpoint_every=0,
    data_options={"block_size": 64, "max_files": 10, "max_chars": 1500, "test_fraction": 0.15})


def smollm2_plan(quick: bool = False) -> SmolLM2Plan:
    if not quick:
        return SmolLM2Plan(SMOLLM2)
    return SmolLM2Plan(SMOLLM2_QUICK, seeds=(0,), alpha_grid=(1.0,),
                          variants=[v for v in SMOLLM2_VARIANTS if v.name in ("vanilla", "kd", "pcd")])


# ``pcdistill bench lm --recipe NAME``: NAME -> the suite (its --quick plan when ``quick``)
RECIPES = {"stdlib": lambda quick: quick_plan() if quick else full_plan(),
           "smollm2": smollm2_plan}
CSV_FIELDS = LMPlan.csv_fields


# ----------------------------------------------------------------------------------------------
# Test tokens: bucket gaps, and agreement / KL for students trained without a teacher
# ----------------------------------------------------------------------------------------------
def test_teacher(teacher: Path):
    """The teacher of the test pass: a teacher cache folder (its logits recomputed from the cached hidden
    states and output layer, no forward) or a causal_lm run folder (its exported ``hf/``)."""
    from pcdistill.lm.models import create_causal_lm
    from pcdistill.lm.teacher_cache import MANIFEST, CachedTeacher, TeacherCache
    if (teacher / MANIFEST).is_file():
        return CachedTeacher(TeacherCache(teacher))
    return create_causal_lm({"path": str(teacher / "hf")}).eval()


@torch.no_grad()
def test_token_stats(run_dir: Path, teacher: Path, buckets=BUCKETS, batch_size: int = 8) -> dict:
    """``bucket_gaps`` (teacher ranks ``buckets``) of the run's student against the teacher (:func:`test_teacher`)
    over every test token (batch by batch, weighted by tokens), and the top-1 agreement (%) and KL(p_t || p_s)
    on them; the student from the run's exported ``hf/``."""
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
    teacher_model = test_teacher(teacher)
    sums: dict[str, list[float]] = {}
    agree = kl = count = 0.0
    for input_ids, _ in TokenBlockLoader(blocks, batch_size=batch_size, train=False):
        s = full_logits(student, input_ids)[:, :-1].flatten(0, 1).float()
        t = full_logits(teacher_model, input_ids)[:, :-1].flatten(0, 1).float()
        common = min(s.shape[-1], t.shape[-1])
        rows = s.shape[0]
        for bucket, values in bucket_gaps(s[:, :common], t[:, :common], buckets).items():
            acc = sums.setdefault(bucket, [0.0, 0.0])
            acc[0] += values[0] * rows
            acc[1] += values[1] * rows
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        kl += F.kl_div(s[:, :common].log_softmax(-1), t[:, :common].log_softmax(-1), log_target=True,
                       reduction="sum").item()
        count += rows
    return {"buckets": {b: (g / count, k / count) for b, (g, k) in sums.items()},
            "agree": 100.0 * agree / count, "kl": kl / count, "tokens": int(count)}


def cached_test_stats(run_dir: str, teacher: str, buckets=BUCKETS) -> dict:
    """:func:`test_token_stats` of a run, computed once (single-threaded) and kept in its ``lm_test.json``."""
    cache = Path(run_dir) / "lm_test.json"
    if not cache.exists():
        torch.set_num_threads(1)
        cache.write_text(json.dumps(test_token_stats(Path(run_dir), Path(teacher), buckets)))
    return json.loads(cache.read_text())


def bucket_stats(rows: list[dict], teacher: Path, runner=None, buckets=BUCKETS) -> dict:
    """{variant: {bucket: [(gap, kl) per final seed]}} from :func:`cached_test_stats` (``teacher``: a teacher
    run folder or a teacher cache); the runs not measured yet on ``runner``'s workers (which have torch and
    transformers loaded) or in this process. Final rows without agreement (vanilla students trained without
    a teacher) get it from this pass."""
    from pcdistill.evidence.analysis import add_gaps
    finals = [row for row in rows if row["phase"] == "final"]
    todo = [r["run_dir"] for r in finals if not (Path(r["run_dir"]) / "lm_test.json").exists()]
    if todo:
        list((runner.pool().map if runner is not None else map)(
            cached_test_stats, todo, [str(teacher)] * len(todo), [buckets] * len(todo)))
    stats: dict = {}
    for row in finals:
        numbers = cached_test_stats(row["run_dir"], str(teacher), buckets)
        add_gaps(stats, row["variant"], numbers["buckets"])
        if row.get("test_agree") is None:
            row["test_agree"], row["test_kl"] = numbers["agree"], numbers["kl"]
    return stats
