"""PCD's two readings of the adaptive weight side by side: ``weight="prob_cos"`` (1 - cos(q_t, q_s)) against the
default ``log_prob_cos`` (1 - cos(q_t, log q_s)), as the accuracy suite's fashion_mnist_pairs ablation runs them
(its recipe and teacher, PCD's chosen weight 0.25, seeds 0 and 1), both trained by this one invocation.

    python bench/ablation_prob_cos.py --out results/runs/prob_cos     # about 15 min on one core

Writes ``results/ablation_prob_cos.csv`` and prints the paired difference with its 95% t-interval.
Finished runs are read back when rerun.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from pcdistill.evidence import suite
from pcdistill.evidence.pipeline import run_once
from pcdistill.evidence.tables import difference_row

ALPHA = 0.25  # PCD's weight chosen on validation by the full suite on fashion_mnist_pairs (results/runs.csv)
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/runs/prob_cos"))
    parser.add_argument("--csv", type=Path, default=Path("results/ablation_prob_cos.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = suite.FULL["fashion_mnist_pairs"]
    teacher = suite.teacher_config(recipe)
    teacher["trainer"]["threads"] = 1
    print("teacher test_acc", run_once(teacher, args.out / "teacher")["test_acc"], flush=True)
    variants = {v.name: v for v in suite.VARIANTS + suite.ABLATIONS}
    rows = []
    for name in ("pcd", "pcd prob_cos"):
        for seed in SEEDS:
            cfg = suite.student_config(recipe, variants[name], str(args.out / "teacher" / "model.safetensors"), seed, ALPHA)
            cfg["trainer"]["threads"] = 1
            result = run_once(cfg, args.out / name.replace(" ", "_") / f"seed{seed}")
            rows.append({"dataset": recipe.dataset, "variant": name, "alpha": ALPHA, "seed": seed, "phase": "final",
                         "val_acc": result["val_acc"], "test_acc": result["test_acc"], "epochs": result["epochs"],
                         "seconds": result["seconds"]})
            print(name, seed, f"val_acc {result['val_acc']:.2f} test_acc {result['test_acc']:.2f}", flush=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_seed = {name: {r["seed"]: r for r in rows if r["variant"] == name} for name in ("pcd", "pcd prob_cos")}
    mean, low, high, verdict = difference_row(by_seed["pcd"], by_seed["pcd prob_cos"], "test_acc")
    print(f"pcd - pcd prob_cos: {mean:+.2f} test acc points [{low:+.2f}, {high:+.2f}] ({verdict}); wrote {args.csv}")


if __name__ == "__main__":
    main()
