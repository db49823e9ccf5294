"""``pcdistill demo``: the digits recipe end to end on the CPU, in a few minutes.

Trains a ``cnn_large`` teacher on scikit-learn's digits (embedded, nothing to download), then four
``cnn_tiny`` students with the same recipe: vanilla (labels only), KD, DKD and PCD, and prints the
final-epoch test accuracy of each. The same runs are ``configs/digits/*.yaml``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pcdistill.config import ConfigError, from_dict
from pcdistill.engine.trainer import train

RECIPE = {
    "data": {"name": "digits", "val_fraction": 0.1},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "multistep", "milestones": [24, 32], "gamma": 0.1},
    # one thread: for nets this small a second one gains little and collapses on a busy machine
    "trainer": {"epochs": 40, "batch_size": 64, "seed": 0, "device": "cpu", "threads": 1},
}
TEACHER = {"model": {"name": "cnn_large"}}
STUDENTS = {
    "vanilla": {"distill": {"method": "vanilla"}},
    "kd": {"distill": {"method": "kd", "warmup_epochs": 4, "loss": {"temperature": 4.0}}},
    "dkd": {"distill": {"method": "dkd", "warmup_epochs": 4, "loss": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}}},
    "pcd": {"distill": {"method": "pcd", "warmup_epochs": 4, "loss": {"temperature": 4.0, "stages": 3}}},
}


def recipe(name: str, teacher_weights: str | None = None) -> dict:
    """The config dict of one demo run: ``"teacher"`` or a student method."""
    cfg = {k: dict(v) for k, v in RECIPE.items()}
    if name == "teacher":
        return cfg | TEACHER | {"description": "digits teacher: cnn_large, cross-entropy"}
    cfg |= {"model": {"name": "cnn_tiny"}, "teacher": {"name": "cnn_large", "weights": teacher_weights}}
    return cfg | STUDENTS[name] | {"description": f"digits student: cnn_tiny, {name}"}


def run_demo(out_dir: Path = Path("runs/demo"), epochs: int | None = None, force: bool = False) -> list[dict]:
    """Train the demo runs into ``out_dir/<run>``; runs already there are replaced only with ``force``."""
    out_dir = Path(out_dir)
    names = ["teacher", *STUDENTS]
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; the demo needs a folder to write its runs into")
    existing = [f"{name}/" for name in names if (out_dir / name).exists()]
    if existing and not force:
        raise ConfigError(f"{str(out_dir)!r} already holds demo runs ({', '.join(existing)}); pass --force to "
                          f"replace them, or choose another --out")
    rows = []
    for name in names:
        run_dir = out_dir / name
        shutil.rmtree(run_dir, ignore_errors=True)  # only reached with force, or when absent
        data = recipe(name, str(out_dir / "teacher" / "model.safetensors"))
        if epochs is not None:
            data["trainer"] = data["trainer"] | {"epochs": epochs}
        start = time.perf_counter()
        summary = train(from_dict(data), run_dir)
        rows.append({"run": name, "model": data["model"]["name"], "test_acc": summary.final.get("test_acc"),
                     "seconds": time.perf_counter() - start})
    print("\ndigits (scikit-learn), final-epoch test accuracy (%)")
    print("| run | model | test acc | seconds |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['model']} | {r['test_acc']:.2f} | {r['seconds']:.1f} |")
    print(f"\nrun folders: {out_dir}/<run> (config.yaml, metrics.jsonl, model.safetensors, tensorboard/)")
    return rows
