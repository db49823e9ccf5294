"""``pcdistill bench report``: the README's "Results" section, generated from ``results/``.

Everything between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in the README is replaced
by the suite's tables (accuracy.md, ablation.md, buckets_*.md, the bucket plots) and the hand-written
discussion in ``results/discussion.md``; the rest of the README is left as it is.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _demote(markdown: str, levels: int = 2) -> str:
    """Push every heading down ``levels`` levels, so the files nest under the README's section."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def results_section(results: Path, readme_dir: Path) -> str:
    parts = []
    discussion = results / "discussion.md"
    if discussion.exists():
        parts.append(_demote(discussion.read_text().strip()))
    for name in ("accuracy.md", "ablation.md"):
        if (results / name).exists():
            parts.append(_demote((results / name).read_text().strip()))
    for table in sorted(results.glob("buckets_*.md")):
        parts.append(_demote(table.read_text().strip()))
        plot = table.with_suffix(".png")
        if plot.exists():
            rel = plot.resolve().relative_to(readme_dir.resolve()) if plot.resolve().is_relative_to(
                readme_dir.resolve()) else plot
            parts.append(f"![{plot.stem}]({rel.as_posix()})")
    env = results / "environment.json"
    if env.exists():
        e = json.loads(env.read_text())
        parts.append(f"Measured {e['date']} with pcdistill {e['pcdistill']}, torch {e['torch']}, Python {e['python']} "
                     f"on {e['cpu']} ({e['cores']} cores); full data in `{results.as_posix()}/runs.csv`.")
    return "\n\n".join(parts)


def update_readme(readme: Path, results: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{results_section(results, readme.parent)}\n{END}{tail}")
