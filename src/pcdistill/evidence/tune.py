"""``pcdistill tune``: choose the weight of a config's distillation term on YOUR data, by validation.

    pcdistill tune configs/fashion_mnist/pcd.yaml data.root=/my/data trainer.epochs=3 --out runs/tune_pcd

trains the config once per scale of ``--grid`` (default 0.25, 1, 4) x its ``distill.alpha``, with
everything else unchanged, and picks the scale with the best final-epoch validation metric
(``val_acc``, ``val_AP`` for detection, the lowest ``val_ppl`` for causal_lm); ties go to the scale
closest to 1. This is the suite's
tuning step (``pcdistill bench accuracy | detection | lm``) applied to one config. The test split is
never read for the choice, and the table does not show it. Results: ``OUT/tune.csv`` and one run
folder per weight (``OUT/alpha_<value>``); finished runs are not redone.
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path

from pcdistill.config import ConfigError, apply_overrides, from_dict, read_yaml
from pcdistill.evidence.pipeline import Job, Runner, choose_scale

SHORT_RUN_KEYS = ("trainer.epochs", "trainer.iterations")  # tuning runs may be short; the final one is not


def tune(config: dict, out: Path, grid: tuple[float, ...] = (0.25, 1.0, 4.0), jobs: int = 1,
         log=print) -> tuple[float, list[dict]]:
    """(chosen alpha, rows of tune.csv) for the config dict ``config``; see the module docstring."""
    cfg = from_dict(config)
    if cfg.distill.method == "vanilla":
        raise ConfigError("pcdistill tune chooses distill.alpha, but this config's distill.method is 'vanilla': "
                          "it has no distillation term; pass a kd, dkd, dist or pcd config")
    if not grid or any(a <= 0 for a in grid):
        raise ConfigError(f"--grid needs positive scales of distill.alpha; got {list(grid)}")
    metric = {"detection": "val_AP", "causal_lm": "val_ppl"}.get(cfg.task, "val_acc")
    base = cfg.distill.alpha
    batch = []
    for scale in grid:
        run = copy.deepcopy(config)
        run.setdefault("distill", {})["alpha"] = base * scale
        batch.append(Job((scale,), run, out / f"alpha_{base * scale:g}"))
    out.mkdir(parents=True, exist_ok=True)
    with Runner(jobs, log, metric=metric) as runner:
        results = runner.run(batch, "tuning distill.alpha")
    def score(scale: float):  # higher is better; perplexity is lower-better
        value = results[(scale,)].get(metric)
        return value if value is None or metric != "val_ppl" else 1.0 / value

    chosen = choose_scale(score, grid)
    rows = [{"scale": a, "alpha": base * a, metric: results[(a,)].get(metric), "seconds": results[(a,)]["seconds"],
             "chosen": a == chosen, "run_dir": results[(a,)]["run_dir"]} for a in grid]
    with open(out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return base * chosen, rows


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="choose distill.alpha of a config on the validation split (a few short runs)")
    p.add_argument("config", help="YAML config of a distilled student")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/path trainer.epochs=3")
    p.add_argument("--out", required=True, help="folder for the runs and tune.csv")
    p.add_argument("--grid", type=float, nargs="+", default=[0.25, 1.0, 4.0],
                   help="scales of the config's distill.alpha to try (default 0.25 1 4)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (default 1)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    config = apply_overrides(read_yaml(args.config), list(args.overrides))
    alpha, rows = tune(config, Path(args.out), tuple(args.grid), jobs=args.jobs)
    metric = [k for k in rows[0] if k.startswith("val_")][0]
    print(f"| distill.alpha | {metric} (final epoch) |\n|---:|---:|")
    for row in rows:
        value = "nan" if row[metric] is None else f"{row[metric]:.2f}"
        print(f"| {row['alpha']:g}{' (chosen)' if row['chosen'] else ''} | {value} |")
    key = lambda override: override.split("=", 1)[0]  # noqa: E731
    kept = [o for o in args.overrides if key(o) not in SHORT_RUN_KEYS + ("distill.alpha",)]
    short = [o for o in args.overrides if key(o) in SHORT_RUN_KEYS]
    print(f"chosen on validation: distill.alpha={alpha:g}  (train with: pcdistill train "
          f"{' '.join([args.config, *kept, f'distill.alpha={alpha:g}'])} --out DIR"
          + (f"; at the config's length: the tuning runs' {' '.join(short)} left out)" if short else ")"))
    return 0
