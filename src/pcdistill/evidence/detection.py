"""The detection suite: does PCD on RoI logits beat KD and a vanilla student, with a teacher that is
clearly the stronger network?

Data: `fashion_scenes` (Fashion-MNIST items on textured canvases; test scenes hold only test items).
One teacher is trained (the vanilla students beside it), then KD, DKD, PCD and PCD-released
students with the students' recipe.
As in the accuracy suite (`pcdistill.evidence.suite`), each variant keeps its published loss
settings and only the weight of its distillation term is chosen, from ``alpha_grid`` x the published
weight, by the **validation** AP of a short seed-0 run; the finals run every seed at that weight and
the test split is read only for the report. Results go to ``results/``:

    detection.csv             one row per run: variant, seed, alpha, test_ap, test_ap50, test_ap75, val_ap,
                              seconds (then phase, epochs, run_dir)
    detection.md              mean +- std per variant; PCD - KD, PCD - vanilla (and - DKD, - PCD-released)
                              paired by seed with 95% t-intervals; the tuning runs
    detection_buckets.md/.png teacher-student gap on RoI logits by the teacher's class rank (test split)
    detection_environment.json versions, hardware, date, wall time

The suite is a :class:`~pcdistill.evidence.pipeline.Suite` (:class:`DetectionPlan`); its ``prepare`` writes
the scenes once, before the parallel runs read them. Resumable like the accuracy suite: finished runs are
read back, killed ones resumed.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pcdistill.evidence.pipeline import Suite, Variant
from pcdistill.evidence.tables import Metric, by_seed

VARIANTS = [
    Variant("vanilla", "vanilla", description="detector losses only"),
    Variant("kd", "kd", {"temperature": 1.0}, description="KD on RoI logits, T=1"),
    Variant("dkd", "dkd", {"alpha": 1.0, "beta": 0.25, "temperature": 1.0},
            description="DKD's detection setting: alpha 1, beta 0.25, T=1"),
    Variant("pcd", "pcd", {"temperature": 1.0, "stages": 3}, description="PCD, paper variant, joint schedule, K=3, T=1"),
    Variant("pcd-released", "pcd", {"temperature": 1.0, "stages": 3, "variant": "released"},
            description="the authors' released computation, K=3, T=1"),
]
DATASET = "fashion_scenes"


@dataclass(frozen=True)
class DetectionRecipe:
    """Everything but the distillation term: data, both detectors and their training lengths."""

    teacher: str
    teacher_options: dict
    teacher_epochs: int
    student: str
    student_options: dict
    epochs: int
    tune_epochs: int | None = None  # epochs of the tuning runs (default: all)
    data_options: dict = field(default_factory=dict)
    lr: float = 0.02
    batch_size: int = 8

    def base(self, model: str, options: dict, seed: int, epochs: int, data_root: str) -> dict:
        milestones = sorted({max(1, round(2 * epochs / 3)), round(11 * epochs / 12)} & set(range(1, epochs)))
        return {
            "task": "detection",
            "data": {"name": DATASET, "root": data_root, "options": dict(self.data_options)},
            "model": {"name": model, "options": dict(options)},
            "optim": {"name": "sgd", "lr": self.lr, "momentum": 0.9, "weight_decay": 1e-4, "clip_grad_norm": 10.0},
            "schedule": {"name": "multistep", "milestones": milestones, "gamma": 0.1, "warmup": min(1.0, epochs / 6)},
            "trainer": {"epochs": epochs, "batch_size": self.batch_size, "seed": seed, "device": "cpu",
                        "log_every": 1000, "eval_every": epochs},
        }


def _options(fpn: int, head: int, size: int = 128, **extra) -> dict:
    return {"min_size": size, "max_size": size, "anchor_sizes": [size // 16 * 2**k for k in range(5)],
            "rpn_post_nms_top_n_test": 300, "fpn_channels": fpn, "box_head_size": head,
            "box_batch_size_per_image": 128} | extra


FULL = DetectionRecipe(
    teacher="fasterrcnn_resnet18_fpn", teacher_options=_options(64, 256), teacher_epochs=8,
    student="fasterrcnn_resnet18_fpn", student_options=_options(32, 128), epochs=6, tune_epochs=2,
    data_options={"train_images": 768, "val_images": 128, "test_images": 256})
_TINY = {"rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32}
QUICK = DetectionRecipe(
    teacher="fasterrcnn_resnet18_fpn", teacher_options=_options(16, 32, 64, **_TINY), teacher_epochs=1,
    student="fasterrcnn_resnet18_fpn", student_options=_options(8, 16, 64, **_TINY), epochs=1, batch_size=4,
    data_options={"train_images": 8, "val_images": 4, "test_images": 4, "image_size": 64, "max_objects": 3,
                  "min_scale": 12, "max_scale": 32})


def teacher_config(recipe: DetectionRecipe, data_root: str = "data/fashion_scenes") -> dict:
    return recipe.base(recipe.teacher, recipe.teacher_options, 0, recipe.teacher_epochs, data_root) | {
        "description": f"{DATASET} teacher {recipe.teacher}"}


def student_config(recipe: DetectionRecipe, variant: Variant, teacher_weights: str, seed: int = 0,
                   scale: float = 1.0, epochs: int | None = None, data_root: str = "data/fashion_scenes") -> dict:
    """The config dict of one student run (``configs/fashion_scenes/*.yaml`` are these, at the chosen scale)."""
    epochs = epochs or recipe.epochs
    teacher = ({"name": recipe.teacher, "weights": teacher_weights, "options": dict(recipe.teacher_options)}
               if variant.method != "vanilla" else {})
    return recipe.base(recipe.student, recipe.student_options, seed, epochs, data_root) | {
        "teacher": teacher, "distill": variant.distill(scale, epochs / 12),
        "description": f"{DATASET} student {recipe.student}: {variant.name} ({variant.description})"}


@dataclass
class DetectionPlan(Suite):
    recipe: DetectionRecipe
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha_grid: tuple[float, ...] = (0.25, 1.0, 4.0)
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))

    title = f"Detection suite: {DATASET}"
    csv_file, env_file, report_file = "detection.csv", "detection_environment.json", "detection.md"
    csv_fields = ["variant", "seed", "alpha", "test_ap", "test_ap50", "test_ap75", "val_ap", "seconds", "phase",
                  "epochs", "run_dir"]
    renames = {"test_ap": "test_AP", "test_ap50": "test_AP50", "test_ap75": "test_AP75", "val_ap": "val_AP"}
    choose_by, test = Metric("val_ap", "val AP"), Metric("test_ap", "test AP")
    columns = (Metric("test_ap50", "AP50"), Metric("test_ap75", "AP75"))
    compare = ("pcd", ("kd", "vanilla", "dkd", "pcd-released"))
    compare_by = (Metric("test_ap", "AP"), Metric("test_ap50", "AP50"))
    difference_unit = " (AP points)"

    def groups(self) -> list[str]:
        return [DATASET]

    def prepare(self, group: str, folder: Path) -> None:
        write_scenes(self.teacher_config(group, folder))  # here, once: the parallel runs then only read them

    def teacher_config(self, group: str, folder: Path) -> dict:
        return teacher_config(self.recipe, str(folder / "data"))

    def student_config(self, group, folder, variant, seed, scale, tune) -> dict:
        return student_config(self.recipe, variant, str(folder / "teacher" / "model.safetensors"), seed, scale,
                              self.recipe.tune_epochs if tune else None, str(folder / "data"))

    def analyse(self, rows: list[dict], results: Path, runner) -> None:
        from pcdistill.evidence.analysis import write_bucket_report
        runner.log("bucket analysis on RoI logits")
        teacher = next(r for r in rows if r["phase"] == "teacher")
        write_bucket_report(bucket_stats(rows, Path(teacher["run_dir"])), [v.name for v in self.variants],
                            results / "detection_buckets", f"{DATASET} RoI logits (test split)",
                            "Per sampled RoI of the test scenes (the student's proposals, 25% positive, scored by both "
                            "networks), classes (background included) ranked by the teacher's probability")

    def intro(self, rows: list[dict], env: dict) -> list[str]:
        recipe = self.recipe
        teacher = next(r for r in rows if r["phase"] == "teacher")
        vanilla = by_seed(rows, "vanilla")
        lines = [f"Final-epoch COCO AP (%) of Faster R-CNN on the test scenes (items from Fashion-MNIST's test images "
                 f"only), {len(self.seeds)} seeds; alpha chosen per variant from {list(self.alpha_grid)} x its "
                 f"published weight by the val AP of a seed-{self.seeds[0]} run of {recipe.tune_epochs or recipe.epochs} "
                 f"epochs. {env['date']}, torch {env['torch']}, {env['cpu']} ({env['cores']} cores); "
                 f"{env['suite_wall_seconds_this_invocation'] / 60:.0f} min of wall time for this invocation.", "",
                 f"Teacher {recipe.teacher} (FPN {recipe.teacher_options.get('fpn_channels')}, box head "
                 f"{recipe.teacher_options.get('box_head_size')}, {recipe.teacher_epochs} epochs): test AP "
                 f"{teacher['test_ap']:.2f} (AP50 {teacher['test_ap50']:.2f}, AP75 {teacher['test_ap75']:.2f}), val AP "
                 f"{teacher['val_ap']:.2f}. Students {recipe.student} (FPN {recipe.student_options.get('fpn_channels')}, "
                 f"box head {recipe.student_options.get('box_head_size')}), {recipe.epochs} epochs, seeds "
                 f"{list(self.seeds)}."]
        if vanilla:
            gap = teacher["test_ap"] - statistics.fmean(r["test_ap"] for r in vanilla.values())
            lines.append(f"Teacher - vanilla student (mean): {gap:+.2f} AP.")
        return lines


def _reading(recipe: DetectionRecipe, fashion_root: str | None) -> DetectionRecipe:
    """``recipe`` reading Fashion-MNIST's IDX files from ``fashion_root`` (None: the dataset's default folder)."""
    return replace(recipe, data_options=recipe.data_options | {"fashion_root": fashion_root}) if fashion_root else recipe


def full_plan(fashion_root: str | None = None) -> DetectionPlan:
    return DetectionPlan(_reading(FULL, fashion_root))


def quick_plan(fashion_root: str | None = None) -> DetectionPlan:
    return DetectionPlan(_reading(QUICK, fashion_root), seeds=(0, 1), alpha_grid=(0.5, 1.0))


def write_scenes(config: dict) -> None:
    """Write the scenes a run of ``config`` reads (nothing when they are already there)."""
    from pcdistill.config import from_dict
    from pcdistill.detection import build_detection_dataset
    data = from_dict(config).data
    build_detection_dataset(data.name, root=data.root, split="train", val_fraction=data.val_fraction,
                            seed=data.split_seed, **data.options)


# ----------------------------------------------------------------------------------------------
# RoI-logit bucket analysis
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def paired_test_roi_logits(run_dir: Path, teacher_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher class logits (N, C + 1) on the RoIs the student samples from the test scenes
    (its RPN proposals and the ground truth, 25% positive), row i of both describing the same box."""
    from pcdistill.config import load_config
    from pcdistill.detection import DetectionLoader, RoIDistiller, build_detection_dataset, create_detector
    from pcdistill.models.weights import load_weights

    cfg, teacher_cfg = load_config(run_dir / "config.yaml"), load_config(teacher_dir / "config.yaml")
    test = build_detection_dataset(cfg.data.name, root=cfg.data.root, split="test", val_fraction=cfg.data.val_fraction,
                                   seed=cfg.data.split_seed, **cfg.data.options)
    classes = test.num_classes + 1
    student = create_detector(cfg.model.name, classes, **cfg.model.options)
    teacher = create_detector(teacher_cfg.model.name, classes, **teacher_cfg.model.options)
    load_weights(student, run_dir / "model.safetensors")
    load_weights(teacher, teacher_dir / "model.safetensors")
    distiller = RoIDistiller(student, teacher).eval()
    torch.manual_seed(0)  # the RoI sampler draws from the global RNG: the same boxes on every call
    student_logits, teacher_logits = [], []
    for images, targets in DetectionLoader(test, batch_size=8, train=False):
        s, t, _, _ = distiller.roi_logits(images, targets)
        student_logits.append(s)
        teacher_logits.append(t)
    return torch.cat(student_logits), torch.cat(teacher_logits)


def bucket_stats(rows: list[dict], teacher_dir: Path) -> dict:
    """{variant: {bucket: [(gap, kl) per final seed]}}; each run's gaps are cached in its ``roi_buckets.json``."""
    from pcdistill.evidence.analysis import add_gaps, bucket_gaps
    stats: dict = {}
    for row in rows:
        if row["phase"] != "final":
            continue
        cache = Path(row["run_dir"]) / "roi_buckets.json"
        if not cache.exists():
            cache.write_text(json.dumps(bucket_gaps(*paired_test_roi_logits(Path(row["run_dir"]), teacher_dir))))
        add_gaps(stats, row["variant"], json.loads(cache.read_text()))
    return stats
