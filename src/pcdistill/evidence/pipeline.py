"""One pipeline for every evidence suite: prepare -> teachers -> tuning -> chosen weights -> finals -> rows -> files.

A suite is a :class:`Suite` dataclass (its ``variants``, ``seeds`` and ``alpha_grid``) that declares what
differs between suites: its teacher and student configs, the validation metric choosing each weight and
its direction, its csv and report columns, ``prepare`` and ``analyse`` steps. :func:`run_suite` runs any
suite, per group (a teacher and its students, in ``results/runs/<group>/``):

1. ``prepare``: what the runs need first (data to write, a teacher to fetch or cache); idempotent;
2. the teachers (none where ``teacher_config`` is None), and the vanilla students beside them when
   ``vanilla_beside_teacher`` (else they are tuned, at their one weight, like the others); with no teacher
   to train, those vanilla students run beside the tuning runs instead;
3. tuning: seed ``seeds[0]`` of every variant at every scale of ``alpha_grid`` x its published weight,
   shorter runs (``student_config(..., tune=True)``);
4. per variant, the scale with the best validation ``choose_by`` (ties: the scale closest to 1); with
   ``extend_grid``, a choice at an edge of the grid tunes one more scale past that edge (at the grid's
   ratio there) and chooses again, once;
5. the finals: every seed at the chosen weight, and ``extra_finals`` (ablations);
6. one row per run (by phase, group, variant, scale, seed), ``analyse`` (which may fill in columns),
   then ``csv_file``, ``env_file`` and ``report_file`` under ``results/``.

Every run goes through :func:`run_once`: a finished run is read back, a killed one resumed from its
checkpoint, a folder holding a run of another config refused, naming the keys that differ. Runs still
to train go to ``jobs`` single-threaded worker processes.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pcdistill import __version__
from pcdistill.config import ConfigError, flat_config, from_dict, read_yaml, resolve_paths
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train
from pcdistill.evidence.tables import (Metric, difference_table, tuning_lines, variant_table, write_rows)

PHASES = ("teacher", "tune", "final")


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


class Suite:
    """What a suite declares (see the module docstring). A suite is a dataclass subclass with the fields
    ``seeds``, ``alpha_grid`` and ``variants``; the attributes below are class attributes it sets."""

    seeds: tuple[int, ...]
    alpha_grid: tuple[float, ...]
    variants: list[Variant]

    title: str  # the report's heading
    csv_file: str  # results/<csv_file>: one row per run, columns ``csv_fields``
    csv_fields: list[str]
    env_file: str  # versions, hardware, date, wall time
    report_file: str  # :meth:`markdown`
    choose_by: Metric  # the validation metric that chooses each weight
    test: Metric  # the report's main test metric (and the one the log shows)
    columns: tuple[Metric, ...] = ()  # more test metrics in the report's table
    compare: tuple[str, tuple[str, ...]] = ("pcd", ())  # the report pairs this variant with each of those ...
    compare_by: tuple[Metric, ...] = ()  # ... in these metrics
    difference_unit = ""  # e.g. " (AP points)", after "mean difference"
    verdict_note = ""  # e.g. " (lower perplexity wins)", after the rule for wins and losses
    renames: dict[str, str] = {}  # row key: the key of the run's metrics it holds (e.g. test_ap: test_AP)
    group_column: str | None = None  # the row key naming the group (suites of several groups)
    vanilla_beside_teacher = True  # else vanilla students go through tuning (at its one scale) and finals
    extend_grid = False  # a weight chosen at an edge of the grid tunes one more beyond it, once
    cost: dict[str, int] = {}  # variant: relative step cost; the costliest start first in each batch

    def groups(self) -> list[str]:
        raise NotImplementedError

    def prepare(self, group: str, folder: Path) -> None:
        """Before any run of ``group`` (its runs go under ``folder``); must do nothing when already done."""

    def teacher_config(self, group: str, folder: Path) -> dict | None:
        raise NotImplementedError

    def student_config(self, group: str, folder: Path, variant: Variant, seed: int, scale: float,
                       tune: bool) -> dict:
        """The config of a student run; its teacher's run folder is ``folder / "teacher"``."""
        raise NotImplementedError

    def extra_finals(self, chosen: dict[tuple[str, str], float]) -> list[tuple[str, Variant, float, int]]:
        """(group, variant, scale, seed) of further final runs, given ``chosen[group, variant name]``."""
        return []

    def analyse(self, rows: list[dict], results: Path, runner: "Runner") -> None:
        """After every run: further analysis and files (it may fill in the rows' columns)."""

    def intro(self, rows: list[dict], env: dict) -> list[str]:
        """The report's paragraphs between its heading and its table."""
        return []

    def markdown(self, rows: list[dict], env: dict) -> str:
        """The report: the variants' table, the paired differences and the tuning runs."""
        names = [v.name for v in self.variants]
        winner, others = self.compare
        return "\n".join([
            f"# {self.title}", "", *self.intro(rows, env), "",
            *variant_table(rows, names, self.choose_by, self.test, self.columns),
            "", "## PCD against the baselines", "",
            f"Paired by seed; a difference wins or loses only when its 95% t-interval excludes 0{self.verdict_note}.",
            "", *difference_table(rows, winner, others, self.compare_by, self.difference_unit),
            *tuning_lines(self.variants, self.alpha_grid, rows, self.choose_by.key, self.choose_by.label)]) + "\n"


def run_suite(plan: Suite, results: str | Path, jobs: int = 2, log=print) -> list[dict]:
    """Every run of ``plan`` (finished ones read back), then its files; returns the rows of its csv."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folders = {group: results / "runs" / group for group in plan.groups()}
    for group, folder in folders.items():
        plan.prepare(group, folder)
    variants = {v.name: v for v in plan.variants}
    by_cost = sorted(plan.variants, key=lambda v: -plan.cost.get(v.name, 0))  # two workers finish close together
    tuned = [v for v in by_cost if not (plan.vanilla_beside_teacher and v.method == "vanilla")]
    seed0 = plan.seeds[0]

    def job(group: str, variant: Variant, scale: float, seed: int, phase: str) -> Job:
        name = variant.name if variant.method == "vanilla" else f"{variant.name}@{scale:g}"
        config = plan.student_config(group, folders[group], variant, seed, scale, tune=phase == "tune")
        return Job((group, variant.name, scale, seed, phase), config, folders[group] / phase / _slug(name) / f"seed{seed}")

    def grid(variant: Variant) -> tuple[float, ...]:
        return (1.0,) if variant.method == "vanilla" else plan.alpha_grid

    rows: dict[tuple, dict] = {}

    def run(batch: list[Job], label: str) -> None:
        for key, result in runner.run(batch, label).items():
            group, name, scale, seed, phase = key
            variant = variants.get(name)
            alpha = None if variant is None or variant.method == "vanilla" else variant.alpha * scale
            rows[key] = ({plan.group_column: group} if plan.group_column else {}) | {
                "variant": name, "alpha": alpha, "seed": seed, "phase": phase, "scale": scale} | result | {
                ours: result.get(theirs) for ours, theirs in plan.renames.items()}

    def choose(group: str, variant: Variant, scales: tuple[float, ...]) -> float:
        def score(scale: float) -> float | None:
            value = rows[group, variant.name, scale, seed0, "tune"].get(plan.choose_by.key)
            return value if value is None or not plan.choose_by.lower_is_better else -value
        return choose_scale(score, scales)

    with Runner(jobs, log, metric=plan.renames.get(plan.test.key, plan.test.key)) as runner:
        teachers = [Job((g, "teacher", None, 0, "teacher"), config, folder / "teacher")
                    for g, folder in folders.items() if (config := plan.teacher_config(g, folder)) is not None]
        beside = [job(g, v, 1.0, s, "final") for g in folders for v in by_cost if v not in tuned for s in plan.seeds]
        if teachers:
            run(teachers + beside, "teachers" + (" and vanilla students" if beside else ""))
            beside = []
        # with no teacher to train (a pretrained one), the vanilla students run beside the tuning runs
        run(beside + [job(g, v, a, seed0, "tune") for g in folders for v in tuned for a in grid(v)],
            ("vanilla students and " if beside else "") + f"tuning (seed {seed0})")
        chosen = {(g, v.name): choose(g, v, grid(v)) for g in folders for v in tuned}
        if plan.extend_grid:
            beyond = {(g, v.name): a for g in folders for v in tuned
                      if (a := beyond_edge(grid(v), chosen[g, v.name])) is not None}
            run([job(g, variants[name], a, seed0, "tune") for (g, name), a in beyond.items()], "tuning beyond the grid")
            chosen |= {(g, name): choose(g, variants[name], grid(variants[name]) + (a,))
                       for (g, name), a in beyond.items()}
        extra = plan.extra_finals(chosen)
        variants |= {v.name: v for _, v, _, _ in extra}
        run([job(g, v, chosen[g, v.name], s, "final") for g in folders for v in tuned for s in plan.seeds]
            + [job(g, v, a, s, "final") for g, v, a, s in extra], "final seeds")
        order = {"teacher": -1} | {name: i for i, name in enumerate(variants)}
        groups = list(folders)
        done = [rows[k] for k in sorted(rows, key=lambda k: (PHASES.index(k[4]), groups.index(k[0]), order[k[1]],
                                                              k[2] or 0.0, k[3]))]
        plan.analyse(done, results, runner)
    write_rows(done, results / plan.csv_file, plan.csv_fields)
    env = environment(time.perf_counter() - started)
    (results / plan.env_file).write_text(json.dumps(env, indent=2) + "\n")
    (results / plan.report_file).write_text(plan.markdown(done, env))
    return done


def choose_scale(val_metric, grid: tuple[float, ...]) -> float:
    """The scale of the grid whose tuning run has the best validation metric ``val_metric(scale)`` (higher
    is better; None and nan are worst); ties go to the scale closest to 1, the published weight."""
    def score(scale: float) -> float:
        value = val_metric(scale)
        return -math.inf if value is None or math.isnan(value) else value
    return max(grid, key=lambda a: (score(a), -abs(math.log(a))))


def beyond_edge(grid: tuple[float, ...], chosen: float) -> float | None:
    """The next scale past the edge of ``grid`` that ``chosen`` sits on, at the grid's ratio there
    (e.g. 16 for 4 in 0.25, 1, 4); None inside the grid or for a grid of one scale."""
    scales = sorted(grid)
    if len(scales) < 2:
        return None
    if chosen == scales[-1]:
        return chosen * scales[-1] / scales[-2]
    if chosen == scales[0]:
        return chosen * scales[0] / scales[1]
    return None


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-+." else "_" for c in text)


def run_once(config: dict, out_dir: str | Path) -> dict:
    """Train ``config`` into ``out_dir`` unless it already finished there; resume it if it was killed."""
    out_dir = Path(out_dir)
    _check_same_run(config, out_dir)
    if not _finished(out_dir):
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


def _finished(out_dir: Path) -> bool:
    return (out_dir / "model.safetensors").exists()


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
    key: tuple  # (group, variant, scale, seed, phase) in a suite
    config: dict
    out_dir: Path


class Runner:
    """Runs jobs on ``jobs`` single-threaded worker processes (two 1-thread processes train small CPU
    models faster than one 2-thread process), with a progress bar; finished runs are only read back, in
    this process. The workers are started when first needed and kept for every ``run`` until ``close()``
    (or the end of a ``with`` block): starting a process and importing torch costs seconds."""

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

    def pool(self):
        """The worker processes (started on first use)."""
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            import multiprocessing
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def run(self, batch: list[Job], label: str) -> dict[tuple, dict]:
        from concurrent.futures import as_completed
        from tqdm import tqdm
        results: dict[tuple, dict] = {}
        if not batch:
            return results
        for job in batch:
            job.config["trainer"] = job.config["trainer"] | {"threads": 1}
        with tqdm(total=len(batch), desc=label, unit="run", dynamic_ncols=True) as bar:
            def done(job: Job, result: dict) -> None:
                results[job.key] = result
                bar.update(1)
                self.log(f"{job.out_dir}: {self.metric} {_fmt(result.get(self.metric))}, {result['seconds']:.0f} s")

            for job in batch:
                if _finished(job.out_dir):
                    done(job, run_once(job.config, job.out_dir))
            futures = {self.pool().submit(_quiet_run, job.config, str(job.out_dir)): job
                       for job in batch if job.key not in results}
            for future in as_completed(futures):
                done(futures[future], future.result())
        return results


def _fmt(value) -> str:
    return "nan" if value is None else f"{value:.2f}"


def _quiet_run(config: dict, out_dir: str) -> dict:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_once(config, out_dir)


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
