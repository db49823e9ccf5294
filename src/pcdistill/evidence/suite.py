"""The accuracy suite: does PCD beat KD and DKD on real data, and by how much?

For each dataset one teacher is trained, then every student variant with the same recipe (model,
optimizer, schedule, epochs, warmup) for several seeds. Each variant keeps its published loss
settings; the one knob that depends on the data, the weight ``alpha`` of its distillation term, is
chosen per dataset from ``alpha_grid`` x the published weight, by the **validation** accuracy of a
short tuning run (seed 0, ``tune_epochs`` epochs, the same recipe compressed). The test split is
only read for the report. Results go to ``results/``:

    runs.csv        every run: dataset, variant, alpha, seed, phase (tune | final), val/test accuracy, seconds
    accuracy.md     mean +- std of final-epoch test accuracy per variant, and PCD - KD (and - DKD, - vanilla)
                    with 95% t-intervals over seeds (paired: the same seed gives the same data order and init)
    ablation.md     PCD's stages, ranking, adaptive weight and schedule on fashion_mnist_pairs (``ablation_seeds``)
    environment.json  versions, hardware, date, wall time

Resumable: a finished run (its ``model.safetensors`` exists) is not redone, a killed one is resumed
from its checkpoint.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcdistill import __version__
from pcdistill.config import ConfigError, flat_config, from_dict, read_yaml, resolve_paths
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Variant:
    """A student variant: the method, its published loss settings and its published weights."""

    name: str
    method: str
    loss: dict = field(default_factory=dict)
    alpha: float = 1.0  # published weight of the distillation term
    ce_weight: float = 1.0
    description: str = ""

    def distill(self, alpha_scale: float, warmup_epochs: float) -> dict:
        if self.method == "vanilla":
            return {"method": "vanilla"}
        return {"method": self.method, "ce_weight": self.ce_weight, "alpha": self.alpha * alpha_scale,
                "warmup_epochs": warmup_epochs, "loss": dict(self.loss)}


VARIANTS = [
    Variant("vanilla", "vanilla", description="labels only"),
    Variant("kd", "kd", {"temperature": 4.0}, alpha=0.9, ce_weight=0.1, description="Hinton et al.; CE 0.1 + KD 0.9, T=4"),
    Variant("dkd", "dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, description="Zhao et al.; alpha 1, beta 8, T=4"),
    Variant("dist", "dist", {"beta": 2.0, "gamma": 2.0, "temperature": 4.0}, description="Huang et al.; beta=gamma=2, T=4"),
    Variant("kd+ls", "kd", {"temperature": 2.0, "standardize": True}, alpha=8.1, ce_weight=0.1,
            description="KD with logit standardisation (Sun et al.): weight x9, T=2"),
    Variant("pcd", "pcd", {"temperature": 4.0, "stages": 3}, description="PCD, paper variant, joint schedule, K=3, T=4"),
    Variant("pcd-curriculum", "pcd", {"temperature": 4.0, "stages": 3, "schedule": "curriculum"},
            description="PCD, stages as phases of training"),
    Variant("pcd-released", "pcd", {"temperature": 4.0, "stages": 3, "variant": "released"},
            description="the authors' released computation"),
    Variant("pcd+ls", "pcd", {"temperature": 2.0, "stages": 3, "standardize": True}, alpha=9.0,
            description="PCD with logit standardisation: weight x9, T=2"),
]

ABLATIONS = [  # on fashion_mnist_pairs, against "pcd" (K=3, abs_diff, adaptive, joint)
    Variant("pcd K=1", "pcd", {"temperature": 4.0, "stages": 1}),
    Variant("pcd K=2", "pcd", {"temperature": 4.0, "stages": 2}),
    Variant("pcd K=4", "pcd", {"temperature": 4.0, "stages": 4}),
    Variant("pcd K=5", "pcd", {"temperature": 4.0, "stages": 5}),
    Variant("pcd rank=teacher", "pcd", {"temperature": 4.0, "stages": 3, "rank_by": "teacher"}),
    Variant("pcd rank=none", "pcd", {"temperature": 4.0, "stages": 3, "rank_by": "none"}),
    Variant("pcd not adaptive", "pcd", {"temperature": 4.0, "stages": 3, "adaptive": False}),
    Variant("pcd prob_cos", "pcd", {"temperature": 4.0, "stages": 3, "weight": "prob_cos"}),
]


@dataclass(frozen=True)
class Recipe:
    """One dataset's shared recipe: everything but the distillation term."""

    dataset: str
    teacher: str
    student: str
    epochs: int
    lr: float
    batch_size: int = 128
    train_samples: int | None = None
    tune_epochs: int | None = None  # epochs of the tuning runs (default: all)
    teacher_epochs: int | None = None  # epochs of the teacher (default: epochs)
    options: dict = field(default_factory=dict)

    def base(self, model: str, seed: int, epochs: int | None = None) -> dict:
        return {
            "data": {"name": self.dataset, "val_fraction": 0.1, "train_samples": self.train_samples,
                     "options": dict(self.options)},
            "model": {"name": model},
            "optim": {"name": "sgd", "lr": self.lr, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "trainer": {"epochs": epochs or self.epochs, "batch_size": self.batch_size, "seed": seed,
                        "device": "cpu", "log_every": 1000, "eval_every": epochs or self.epochs},
        }

    def warmup_epochs(self, epochs: int | None = None) -> float:
        return (epochs or self.epochs) / 12  # the paper's 20 of 240 epochs


FULL = {
    "digits": Recipe("digits", "cnn_large", "cnn_tiny", epochs=40, lr=0.05, batch_size=64, tune_epochs=10),
    "fashion_mnist": Recipe("fashion_mnist", "cnn_small", "cnn_tiny", epochs=6, lr=0.05, train_samples=8000,
                            tune_epochs=3, teacher_epochs=10),
    "fashion_mnist_pairs": Recipe("fashion_mnist_pairs", "cnn_small", "cnn_tiny", epochs=6, lr=0.05,
                                  tune_epochs=3, teacher_epochs=10, options={"train_pairs": 10000, "test_pairs": 5000}),
}
QUICK = {"digits": Recipe("digits", "cnn_small", "cnn_tiny", epochs=2, lr=0.05, batch_size=128, tune_epochs=1)}


def student_config(recipe: Recipe, variant: Variant, teacher_weights: str, seed: int = 0, scale: float = 1.0,
                   epochs: int | None = None) -> dict:
    """The config dict of one student run of the suite (``configs/<dataset>/*.yaml`` are these, at scale 1)."""
    teacher = {"name": recipe.teacher, "weights": teacher_weights} if variant.method != "vanilla" else {}
    return recipe.base(recipe.student, seed, epochs) | {
        "teacher": teacher, "distill": variant.distill(scale, recipe.warmup_epochs(epochs)),
        "description": f"{recipe.dataset} student {recipe.student}: {variant.name} ({variant.description})"}


def teacher_config(recipe: Recipe) -> dict:
    return recipe.base(recipe.teacher, 0, recipe.teacher_epochs) | {"description": f"{recipe.dataset} teacher {recipe.teacher}"}


@dataclass
class Plan:
    recipes: dict[str, Recipe]
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))
    ablations: list[Variant] = field(default_factory=lambda: list(ABLATIONS))
    ablation_dataset: str = "fashion_mnist_pairs"
    ablation_seeds: tuple[int, ...] = (0, 1)  # the first seeds of ``seeds``: paired with the main runs


def quick_plan() -> Plan:
    return Plan(QUICK, seeds=(0, 1), alpha_grid=(1.0,), ablations=list(ABLATIONS[:1]), ablation_dataset="digits",
                ablation_seeds=(0,))


def full_plan() -> Plan:
    return Plan(dict(FULL))


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-+." else "_" for c in text)


def run_once(config: dict, out_dir: str | Path) -> dict:
    """Train ``config`` into ``out_dir`` unless it already finished there; resume it if it was killed."""
    out_dir = Path(out_dir)
    _check_same_run(config, out_dir)
    if not (out_dir / "model.safetensors").exists():
        resume = (out_dir / "checkpoints" / "last.pt").exists()
        start = time.perf_counter()
        train(None if resume else from_dict(config), out_dir, resume=resume)
        (out_dir / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    rows = read_metrics(out_dir)
    seconds_file = out_dir / "seconds.txt"
    seconds = float(seconds_file.read_text()) if seconds_file.exists() else sum(r["seconds"] for r in rows)
    last = rows[-1]
    metrics = {k: v for k, v in last.items() if k.startswith(("val_", "test_"))}
    return {"val_acc": None, "test_acc": None} | metrics | {"epochs": last["epoch"], "seconds": round(seconds, 1),
                                                            "run_dir": str(out_dir)}


# how a run is executed, not what it is: these may differ between a suite's config and a run it reuses
_HOW = ("trainer.threads", "trainer.num_workers", "trainer.device", "trainer.log_every", "trainer.eval_batch_size")


def _check_same_run(config: dict, out_dir: Path) -> None:
    """Refuse to reuse or resume ``out_dir`` when the run there was started from a different experiment."""
    saved_file = out_dir / "config.yaml"
    if not saved_file.exists():
        return
    saved = flat_config(from_dict(read_yaml(saved_file)))
    wanted = flat_config(resolve_paths(from_dict(config))[0])
    changed = sorted(k for k in wanted if k not in _HOW and saved.get(k) != wanted[k])
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in changed)
        raise ConfigError(f"{out_dir} holds a run of a different config ({diff}); move that folder away "
                          f"(or delete it) to run this recipe there")


@dataclass
class Job:
    key: tuple  # (dataset, variant, scale, seed, phase)
    config: dict
    out_dir: Path


class Runner:
    """Runs jobs on ``jobs`` single-threaded worker processes (two 1-thread processes train small CPU
    models faster than one 2-thread process), with a progress bar; finished runs are only read back.
    The workers are started once and kept for every ``run`` until ``close()`` (or the end of a
    ``with`` block): starting a process and importing torch costs seconds."""

    def __init__(self, jobs: int, log, metric: str = "test_acc"):
        self.jobs = max(1, jobs)
        self.log = log
        self.metric = metric  # the one the log line shows
        self._pool = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def run(self, batch: list[Job], label: str) -> dict[tuple, dict]:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        import multiprocessing
        from tqdm import tqdm
        for job in batch:
            job.config["trainer"] = job.config["trainer"] | {"threads": 1}
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        pool = self._pool
        results = {}
        with tqdm(total=len(batch), desc=label, unit="run", dynamic_ncols=True) as bar:
            futures = {pool.submit(_quiet_run, job.config, str(job.out_dir)): job for job in batch}
            for future in as_completed(futures):
                job = futures[future]
                results[job.key] = future.result()
                bar.update(1)
                value = results[job.key].get(self.metric)
                self.log(f"{job.out_dir}: {self.metric} {_fmt(value)}, {results[job.key]['seconds']:.0f} s")
        return results


def _fmt(value) -> str:
    return "nan" if value is None else f"{value:.2f}"


def choose_scale(val_metric, grid: tuple[float, ...]) -> float:
    """The scale of the grid whose tuning run has the best validation metric ``val_metric(scale)``
    (None counts as 0); ties go to the scale closest to 1, the published weight."""
    return max(grid, key=lambda a: (val_metric(a) or 0.0, -abs(math.log(a))))


def _quiet_run(config: dict, out_dir: str) -> dict:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_once(config, out_dir)


def run_plan(plan: Plan, results: Path, jobs: int = 2, log=print) -> list[dict]:
    """Every run of ``plan`` (skipping finished ones); writes and returns the rows of ``runs.csv``.

    Teachers first, then short seed-0 runs of every variant at every weight of the grid (tuning), then
    every seed at the weight chosen on validation, and the ablations at PCD's chosen weight.
    """
    results.mkdir(parents=True, exist_ok=True)
    with Runner(jobs, log) as runner:
        return _run_plan(plan, results, runner)


def _run_plan(plan: Plan, results: Path, runner: Runner) -> list[dict]:
    runs_dir = results / "runs"
    started = time.perf_counter()

    def teacher_dir(dataset: str) -> Path:
        return runs_dir / dataset / "teacher"

    teachers = runner.run([Job((d, "teacher", None, 0, "teacher"), teacher_config(r), teacher_dir(d))
                           for d, r in plan.recipes.items()], "teachers")

    def job(dataset: str, variant: Variant, scale: float, seed: int, phase: str) -> Job:
        recipe = plan.recipes[dataset]
        epochs = recipe.tune_epochs if phase == "tune" else None
        name = variant.name if variant.method == "vanilla" else f"{variant.name}@{scale:g}"
        config = student_config(recipe, variant, str(teacher_dir(dataset) / "model.safetensors"), seed, scale, epochs)
        folder = runs_dir / dataset / ("tune" if phase == "tune" else "final") / _slug(name) / f"seed{seed}"
        return Job((dataset, variant.name, scale, seed, phase), config, folder)

    def scales(variant: Variant) -> tuple[float, ...]:
        return (1.0,) if variant.method == "vanilla" else plan.alpha_grid

    tuning = runner.run([job(d, v, a, plan.seeds[0], "tune") for d in plan.recipes for v in plan.variants
                         for a in scales(v)], "tuning (seed 0)")
    chosen = {}
    for dataset in plan.recipes:
        for variant in plan.variants:
            chosen[dataset, variant.name] = choose_scale(
                lambda a: tuning[dataset, variant.name, a, plan.seeds[0], "tune"]["val_acc"], scales(variant))
    finals = [job(d, v, chosen[d, v.name], s, "final") for d in plan.recipes for v in plan.variants
              for s in plan.seeds]
    if plan.ablation_dataset in plan.recipes:
        finals += [job(plan.ablation_dataset, v, chosen[plan.ablation_dataset, "pcd"], s, "final")
                   for v in plan.ablations for s in plan.ablation_seeds]
    final = runner.run(finals, "final seeds and ablations")

    rows = []
    for (dataset, name, scale, seed, phase), result in list(teachers.items()) + list(tuning.items()) + list(final.items()):
        variant = next((v for v in plan.variants + plan.ablations if v.name == name), None)
        alpha = None if variant is None or variant.method == "vanilla" else variant.alpha * scale
        rows.append({"dataset": dataset, "variant": name, "alpha": alpha, "seed": seed, "phase": phase} | result)
    write_outputs(plan, rows, results, time.perf_counter() - started)
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_seed(rows: list[dict], variant: str, phase: str = "final") -> dict[int, dict]:
    """``{seed: row}`` of one variant's runs in one phase of a suite's rows."""
    return {r["seed"]: r for r in rows if r["variant"] == variant and r["phase"] == phase}


def mean_std_cell(values: list[float], digits: int = 2) -> str:
    m, sd = mean_std(values)
    return f"{m:.{digits}f} +- {sd:.{digits}f}"


def tuning_lines(variants, alpha_grid, rows: list[dict], metric: str, label: str) -> list[str]:
    """The report's table of tuning runs: ``metric`` per variant and weight, and the alpha its finals used."""
    lines = ["", f"## Tuning (seed 0, {label})", "",
             "| variant | " + " | ".join(f"alpha x{a:g}" for a in alpha_grid) + " | chosen alpha |",
             "|---|" + "---:|" * (len(alpha_grid) + 1)]
    for variant in variants:
        tuned = {r["alpha"]: r[metric] for r in rows if r["variant"] == variant.name and r["phase"] == "tune"}
        if not tuned:
            continue
        final = by_seed(rows, variant.name)
        cells = [tuned.get(variant.alpha * a) for a in alpha_grid]
        chosen = final[min(final)]["alpha"] if final else None
        lines.append(f"| {variant.name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    return lines


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its 95% t-interval (nan half-width for one pair)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _final(rows: list[dict], dataset: str, variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if r["dataset"] == dataset and r["variant"] == variant and r["phase"] == "final"}


def accuracy_table(plan: Plan, rows: list[dict], names: list[str]) -> str:
    lines = []
    for dataset, recipe in plan.recipes.items():
        teacher = next(r for r in rows if r["dataset"] == dataset and r["phase"] == "teacher")
        lines += [f"### {dataset}", "",
                  f"teacher {recipe.teacher} ({recipe.teacher_epochs or recipe.epochs} epochs): test {teacher['test_acc']:.2f}; "
                  f"students {recipe.student}, "
                  f"{recipe.epochs} epochs" + (f" on {recipe.train_samples} training images"
                                               if recipe.train_samples else "") + f", seeds {list(plan.seeds)}",
                  "", "| variant | alpha (chosen on val) | val acc | test acc (mean +- std) | test acc per seed |",
                  "|---|---:|---:|---:|---|"]
        for name in names:
            final = _final(rows, dataset, name)
            if not final:
                continue
            tests = [final[s]["test_acc"] for s in sorted(final)]
            vals = [final[s]["val_acc"] for s in sorted(final)]
            alpha = final[min(final)]["alpha"]
            m, sd = mean_std(tests)
            lines.append(f"| {name} | {'-' if alpha is None else f'{alpha:g}'} | {statistics.fmean(vals):.2f} | "
                         f"{m:.2f} +- {sd:.2f} | {', '.join(f'{t:.2f}' for t in tests)} |")
        lines.append("")
    return "\n".join(lines)


def difference_row(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[float, float, float, str] | None:
    """Mean of ``a - b`` in ``metric`` over the seeds both hold ({seed: row}), its 95% interval and the
    verdict (wins / loses only when the interval excludes 0); None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    mean, low, high = paired_interval([a[s][metric] for s in seeds], [b[s][metric] for s in seeds])
    verdict = ("wins" if low > 0 else "loses" if high < 0 else "tie (interval covers 0)") \
        if not math.isnan(low) else "one seed: no interval"
    return mean, low, high, verdict


def differences(plan: Plan, rows: list[dict], a: str, others: list[str]) -> str:
    lines = [f"| dataset | {a} - other | mean difference (test acc points) | 95% interval | verdict |",
             "|---|---|---:|---|---|"]
    for dataset in plan.recipes:
        for other in others:
            diff = difference_row(_final(rows, dataset, a), _final(rows, dataset, other), "test_acc")
            if diff is not None:
                mean, low, high, verdict = diff
                lines.append(f"| {dataset} | {a} - {other} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |")
    return "\n".join(lines)


def environment(seconds: float) -> dict:
    import numpy
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"date": datetime.date.today().isoformat(), "pcdistill": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "suite_wall_seconds_this_invocation": round(seconds, 1)}


def write_rows(rows: list[dict], path: Path, fields: list[str]) -> None:
    """A suite's csv: one row per run, the columns ``fields`` (missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in fields} for r in rows)


def write_outputs(plan: Plan, rows: list[dict], results: Path, seconds: float) -> None:
    write_rows(rows, results / "runs.csv",
               ["dataset", "variant", "alpha", "seed", "phase", "val_acc", "test_acc", "epochs", "seconds", "run_dir"])
    env = environment(seconds)
    (results / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    header = (f"Final-epoch accuracy (%), {len(plan.seeds)} seeds; alpha chosen per dataset and variant from "
              f"{list(plan.alpha_grid)} x its published weight by the validation accuracy of a short seed-"
              f"{plan.seeds[0]} run (tune_epochs). "
              f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores).")
    main = [v.name for v in plan.variants]
    text = "\n".join(["# Accuracy suite", "", header, "", accuracy_table(plan, rows, main), "",
                      "## PCD against the baselines", "",
                      "Paired by seed; a difference wins or loses only when its 95% t-interval excludes 0.", "",
                      differences(plan, rows, "pcd", ["kd", "dkd", "vanilla", "pcd-released"]), ""])
    (results / "accuracy.md").write_text(text)
    if plan.ablations and plan.ablation_dataset in plan.recipes:
        names = ["pcd", "pcd-curriculum"] + [v.name for v in plan.ablations]
        sub = Plan({plan.ablation_dataset: plan.recipes[plan.ablation_dataset]}, plan.ablation_seeds, plan.alpha_grid)
        (results / "ablation.md").write_text("\n".join([
            f"# PCD ablations on {plan.ablation_dataset}", "",
            "Default: K=3 stages, rank_by=abs_diff, adaptive weight, joint schedule; each row changes one thing.",
            "", accuracy_table(sub, rows, names), "", differences(sub, rows, "pcd", names[1:]), ""]))

