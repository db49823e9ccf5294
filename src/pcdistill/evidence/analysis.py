"""Why PCD works or not: where in the teacher's ranking do students match the teacher?

The paper's claim is that KD under-transfers the low-probability classes. For each test sample we
rank the classes by the teacher's probability and bucket the ranks (top-1, 2-5, 6-20, the rest);
then, per bucket, we measure how far the student's probabilities are from the teacher's:

* ``gap``: mean over the bucket's classes of ``|log p_t,c - log p_s,c|`` (``p = softmax(z)``, T=1);
* ``bucket_kl``: the KL between teacher and student renormalised over the bucket's classes (how
  well the student orders the bucket's classes among themselves; 0 for a one-class bucket).

Lower is closer to the teacher. Results are averaged over samples and reported as mean +- std over
the seeds of the suite's final runs.
"""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

import torch

from pcdistill import data as data_lib
from pcdistill import models
from pcdistill.config import load_config
from pcdistill.models.weights import load_weights

BUCKETS = ((1, 1), (2, 5), (6, 20), (21, None))


def bucket_label(bucket: tuple[int, int | None]) -> str:
    low, high = bucket
    return f"{low}" if low == high else f"{low}-{high}" if high else f"{low}+"


@torch.no_grad()
def test_logits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a run's network on its dataset's test split, and the labels."""
    cfg = load_config(run_dir / "config.yaml")
    splits = data_lib.build(cfg.data.name, root=cfg.data.root, val_fraction=cfg.data.val_fraction,
                            seed=cfg.data.split_seed, **cfg.data.options)
    net = models.create(cfg.model.name, num_classes=splits.info.num_classes, in_channels=splits.info.in_channels,
                        **cfg.model.options)
    load_weights(net, run_dir / "model.safetensors")
    net.eval()
    logits, labels = [], []
    for images, targets in data_lib.make_loader(splits.test, batch_size=512, train=False):
        logits.append(net(images))
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def bucket_gaps(student: torch.Tensor, teacher: torch.Tensor, buckets=BUCKETS) -> dict[str, tuple[float, float]]:
    """Per bucket of teacher rank (``buckets``: inclusive 1-based (low, high) ranks, high None for the rest):
    (mean |log p_t - log p_s|, mean within-bucket KL)."""
    log_t, log_s = torch.log_softmax(teacher.double(), -1), torch.log_softmax(student.double(), -1)
    rows, num_classes = log_t.shape
    # only the bounded buckets need the ranking: the teacher's top k, not a sort of every class (32k-150k for an LM)
    k = min(num_classes, max([high for _, high in buckets if high is not None] + [0]))
    top = torch.topk(log_t, k, dim=-1, sorted=True).indices
    rest = torch.ones_like(log_t, dtype=torch.bool).scatter_(-1, top, False)  # ranks k+1.. in class order
    out = {}
    for low, high in buckets:
        if low > num_classes:
            continue
        if high is not None or k == num_classes:  # within the ranked top k (all classes when few)
            picked = top[:, low - 1:high]
            t, s = log_t.gather(-1, picked), log_s.gather(-1, picked)
        elif low == k + 1:
            t, s = log_t[rest].view(rows, -1), log_s[rest].view(rows, -1)
        else:
            raise ValueError(f"buckets must be contiguous ranks from 1 with at most one open last bucket; got {buckets}")
        gap = (t - s).abs().mean().item()
        qt, qs = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        kl = (qt.exp() * (qt - qs)).sum(-1).mean().item()
        out[bucket_label((low, high))] = (gap, kl)
    return out


def final_runs(results: Path, dataset: str, variants: list[str]) -> dict[str, list[Path]]:
    with open(results / "runs.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == dataset and r["phase"] == "final"]
    return {v: [Path(r["run_dir"]) for r in rows if r["variant"] == v] for v in variants}


def analyse(results: Path, dataset: str, variants=("vanilla", "kd", "dkd", "pcd")) -> str:
    """Writes ``buckets_<dataset>.md`` and ``buckets_<dataset>.png`` under ``results``; returns the table."""
    teacher_logits, _ = test_logits(results / "runs" / dataset / "teacher")
    runs = final_runs(results, dataset, list(variants))
    stats: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for variant, dirs in runs.items():
        for run_dir in dirs:
            logits, _ = test_logits(run_dir)
            add_gaps(stats, variant, bucket_gaps(logits, teacher_logits))
    return write_bucket_report(stats, list(variants), results / f"buckets_{dataset}", f"{dataset} (test split)",
                               "Classes ranked by the teacher's probability")


def add_gaps(stats: dict, variant: str, gaps: dict[str, tuple[float, float]]) -> None:
    """Append one run's ``bucket_gaps`` to ``stats`` ({variant: {bucket: [(gap, kl) per run]}})."""
    for bucket, values in gaps.items():
        stats.setdefault(variant, {}).setdefault(bucket, []).append(tuple(values))


def write_bucket_report(stats: dict, variants: list[str], stem: Path, title: str, ranking: str) -> str:
    """``stem``.md (mean +- std over runs per bucket) and ``stem``.png from ``stats``; returns the table."""
    buckets = list(next(iter(stats.values())))
    lines = [f"# Teacher-student gap by teacher rank: {title}", "",
             f"{ranking}; per bucket, the mean |log p_t - log p_s| over its classes "
             "and the KL within the bucket (renormalised); mean +- std over seeds. Lower is closer to the teacher.", "",
             "| student | " + " | ".join(f"gap, rank {b}" for b in buckets) + " | "
             + " | ".join(f"bucket KL, rank {b}" for b in buckets if b != "1") + " |",
             "|---|" + "---:|" * (2 * len(buckets) - ("1" in buckets))]
    for variant in variants:
        if variant not in stats:
            continue
        cells = []
        for k in (0, 1):
            for bucket in buckets:
                if k == 1 and bucket == "1":
                    continue
                values = [v[k] for v in stats[variant][bucket]]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} +- {sd:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(table)
    _plot(stats, buckets, variants, stem.with_suffix(".png"), title)
    return table


def _plot(stats, buckets, variants, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(variants)
    for k, (ax, panel) in enumerate(zip(axes, ("mean |log p_t - log p_s|", "KL within the bucket"))):
        shown = [b for b in buckets if not (k == 1 and b == "1")]
        for i, variant in enumerate(v for v in variants if v in stats):
            means = [statistics.fmean(x[k] for x in stats[variant][b]) for b in shown]
            sds = [statistics.stdev([x[k] for x in stats[variant][b]]) if len(stats[variant][b]) > 1 else 0.0
                   for b in shown]
            ax.bar([j + i * width for j in range(len(shown))], means, width, yerr=sds, label=variant, capsize=2)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(shown))])
        ax.set_xticklabels([f"rank {b}" for b in shown])
        ax.set_title(panel)
        ax.set_ylabel("lower = closer to the teacher")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(variants))  # clear of the bars
    fig.suptitle(f"{title}: student vs teacher by the teacher's class rank")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
