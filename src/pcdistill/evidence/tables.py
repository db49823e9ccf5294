"""The statistics and markdown tables every suite's report shares: mean +- std over seeds, paired 95%
t-intervals, the per-variant table, the paired-difference table and the tuning table."""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Metric:
    """A number of a suite's rows as its report shows it: the row key, a label, digits and direction."""

    key: str
    label: str
    digits: int = 2
    lower_is_better: bool = False


def mean_std_cell(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} +- {sd:.{digits}f}"


def by_seed(rows: list[dict], variant: str, phase: str = "final") -> dict[int, dict]:
    """``{seed: row}`` of one variant's runs in one phase of a suite's rows."""
    return {r["seed"]: r for r in rows if r["variant"] == variant and r["phase"] == phase}


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its 95% t-interval (nan half-width for one pair)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


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


def variant_table(rows: list[dict], names: list[str], val: Metric, test: Metric,
                  columns: tuple[Metric, ...] = ()) -> list[str]:
    """Per variant of ``names`` with final runs: the chosen alpha, mean ``val``, ``test`` and ``columns`` as
    mean +- std over seeds, and ``test`` per seed."""
    lines = ["| variant | alpha (chosen on val) | " + " | ".join(
        [val.label, f"{test.label} (mean +- std)", *(c.label for c in columns), f"{test.label} per seed"]) + " |",
        "|---|---:|" + "---:|" * (2 + len(columns)) + "---|"]
    for name in names:
        final = by_seed(rows, name)
        if not final:
            continue
        seeds = sorted(final)
        alpha = final[seeds[0]]["alpha"]
        cells = [f"{statistics.fmean(final[s][val.key] for s in seeds):.{val.digits}f}",
                 *(mean_std_cell([final[s][m.key] for s in seeds], m.digits) for m in (test, *columns)),
                 ", ".join(f"{final[s][test.key]:.{test.digits}f}" for s in seeds)]
        lines.append(f"| {name} | {'-' if alpha is None else f'{alpha:g}'} | " + " | ".join(cells) + " |")
    return lines


def difference_table(rows: list[dict], a: str, others: tuple[str, ...], metrics: tuple[Metric, ...],
                     unit: str = "") -> list[str]:
    """``a`` - each of ``others`` in each of ``metrics``, paired by seed; for a lower-is-better metric a
    negative difference wins."""
    lines = [f"| {a} - other | metric | mean difference{unit} | 95% interval | verdict |", "|---|---|---:|---|---|"]
    mine = by_seed(rows, a)
    for other in others:
        for metric in metrics:
            diff = difference_row(mine, by_seed(rows, other), metric.key)
            if diff is None:
                continue
            mean, low, high, verdict = diff
            if metric.lower_is_better:
                verdict = {"wins": "loses", "loses": "wins"}.get(verdict, verdict)
            lines.append(f"| {a} - {other} | {metric.label} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |")
    return lines


def tuning_lines(variants, alpha_grid, rows: list[dict], metric: str, label: str) -> list[str]:
    """The report's table of tuning runs: ``metric`` per variant and weight (the grid and any scale it was
    extended by), and the alpha its finals used."""
    grid = sorted(set(alpha_grid) | {r["scale"] for r in rows if r["phase"] == "tune"})
    lines = ["", f"## Tuning (seed 0, {label})", "",
             "| variant | " + " | ".join(f"alpha x{a:g}" for a in grid) + " | chosen alpha |",
             "|---|" + "---:|" * (len(grid) + 1)]
    for variant in variants:
        tuned = {r["alpha"]: r[metric] for r in rows if r["variant"] == variant.name and r["phase"] == "tune"}
        if not tuned:
            continue
        final = by_seed(rows, variant.name)
        cells = [tuned.get(variant.alpha * a) for a in grid]
        chosen = final[min(final)]["alpha"] if final else None
        lines.append(f"| {variant.name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    return lines


def write_rows(rows: list[dict], path: Path, fields: list[str]) -> None:
    """A suite's csv: one row per run, the columns ``fields`` (missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in fields} for r in rows)
