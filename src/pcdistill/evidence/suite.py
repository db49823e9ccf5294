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

The suite is a :class:`~pcdistill.evidence.pipeline.Suite` (:class:`Plan`): one group per dataset,
vanilla students tuned at their one weight like the others, the ablations as extra finals at PCD's
chosen weight. Resumable: a finished run (its ``model.safetensors`` exists) is not redone, a killed one
is resumed from its checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pcdistill.evidence.pipeline import Suite, Variant
from pcdistill.evidence.tables import Metric, by_seed, difference_row, variant_table

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
class Plan(Suite):
    """The accuracy suite: one group per dataset, and PCD's ablations on ``ablation_dataset``."""

    recipes: dict[str, Recipe]
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))
    ablations: list[Variant] = field(default_factory=lambda: list(ABLATIONS))
    ablation_dataset: str = "fashion_mnist_pairs"
    ablation_seeds: tuple[int, ...] = (0, 1)  # the first seeds of ``seeds``: paired with the main runs

    csv_file, env_file, report_file = "runs.csv", "environment.json", "accuracy.md"
    csv_fields = ["dataset", "variant", "alpha", "seed", "phase", "val_acc", "test_acc", "epochs", "seconds", "run_dir"]
    choose_by, test = Metric("val_acc", "val acc"), Metric("test_acc", "test acc")
    group_column = "dataset"
    vanilla_beside_teacher = False

    def groups(self) -> list[str]:
        return list(self.recipes)

    def teacher_config(self, group: str, folder: Path) -> dict:
        return teacher_config(self.recipes[group])

    def student_config(self, group, folder, variant, seed, scale, tune) -> dict:
        recipe = self.recipes[group]
        return student_config(recipe, variant, str(folder / "teacher" / "model.safetensors"), seed, scale,
                              recipe.tune_epochs if tune else None)

    def extra_finals(self, chosen):  # the ablations, at PCD's chosen weight
        if self.ablation_dataset not in self.recipes:
            return []
        return [(self.ablation_dataset, v, chosen[self.ablation_dataset, "pcd"], s)
                for v in self.ablations for s in self.ablation_seeds]

    def markdown(self, rows: list[dict], env: dict) -> str:
        header = (f"Final-epoch accuracy (%), {len(self.seeds)} seeds; alpha chosen per dataset and variant from "
                  f"{list(self.alpha_grid)} x its published weight by the validation accuracy of a short seed-"
                  f"{self.seeds[0]} run (tune_epochs). "
                  f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores).")
        return "\n".join(["# Accuracy suite", "", header, "", accuracy_table(self, rows, [v.name for v in self.variants]),
                          "", "## PCD against the baselines", "",
                          "Paired by seed; a difference wins or loses only when its 95% t-interval excludes 0.", "",
                          differences(self, rows, "pcd", ["kd", "dkd", "vanilla", "pcd-released"]), ""])

    def analyse(self, rows: list[dict], results: Path, runner) -> None:
        if not self.ablations or self.ablation_dataset not in self.recipes:
            return
        names = ["pcd", "pcd-curriculum"] + [v.name for v in self.ablations]
        sub = Plan({self.ablation_dataset: self.recipes[self.ablation_dataset]}, self.ablation_seeds, self.alpha_grid)
        (results / "ablation.md").write_text("\n".join([
            f"# PCD ablations on {self.ablation_dataset}", "",
            "Default: K=3 stages, rank_by=abs_diff, adaptive weight, joint schedule; each row changes one thing.",
            "", accuracy_table(sub, rows, names), "", differences(sub, rows, "pcd", names[1:]), ""]))


def quick_plan() -> Plan:
    return Plan(QUICK, seeds=(0, 1), alpha_grid=(1.0,), ablations=list(ABLATIONS[:1]), ablation_dataset="digits",
                ablation_seeds=(0,))


def full_plan() -> Plan:
    return Plan(dict(FULL))


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def accuracy_table(plan: Plan, rows: list[dict], names: list[str]) -> str:
    lines = []
    for dataset, recipe in plan.recipes.items():
        teacher = next(r for r in rows if r["dataset"] == dataset and r["phase"] == "teacher")
        lines += [f"### {dataset}", "",
                  f"teacher {recipe.teacher} ({recipe.teacher_epochs or recipe.epochs} epochs): test {teacher['test_acc']:.2f}; "
                  f"students {recipe.student}, "
                  f"{recipe.epochs} epochs" + (f" on {recipe.train_samples} training images"
                                               if recipe.train_samples else "") + f", seeds {list(plan.seeds)}",
                  "", *variant_table([r for r in rows if r["dataset"] == dataset], names, plan.choose_by, plan.test), ""]
    return "\n".join(lines)


def differences(plan: Plan, rows: list[dict], a: str, others: list[str]) -> str:
    lines = [f"| dataset | {a} - other | mean difference (test acc points) | 95% interval | verdict |",
             "|---|---|---:|---|---|"]
    for dataset in plan.recipes:
        mine = [r for r in rows if r["dataset"] == dataset]
        for other in others:
            diff = difference_row(by_seed(mine, a), by_seed(mine, other), "test_acc")
            if diff is not None:
                mean, low, high, verdict = diff
                lines.append(f"| {dataset} | {a} - {other} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |")
    return "\n".join(lines)
