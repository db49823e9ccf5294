"""Config loading: YAML safety, overrides, validation messages, and every shipped config."""
from __future__ import annotations

import csv

import pytest
import yaml

from pcdistill.config import CHOICES, ConfigError, apply_overrides, from_dict, load_config, to_dict
from pcdistill.demo import recipe
from tests.helpers import REPO

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_round_trip():
    cfg = from_dict({})
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, ["trainer.epochs=3", "schedule.milestones=[2, 5]", "teacher.weights=null",
                                "trainer.compile=true", "data.root=/tmp/x=y", "distill.loss.stages=4"])
    assert data == {"trainer": {"epochs": 3, "compile": True}, "schedule": {"milestones": [2, 5]},
                    "teacher": {"weights": None}, "data": {"root": "/tmp/x=y"}, "distill": {"loss": {"stages": 4}}}


def test_override_sets_a_loss_argument():
    cfg = load_config(None, ["distill.method=pcd", "teacher.name=cnn_large", "distill.loss.stages=5",
                             "distill.loss.schedule=curriculum"])
    assert cfg.distill.loss == {"stages": 5, "schedule": "curriculum"}


def test_method_choices_are_the_method_table():
    from pcdistill.losses import fused_methods, list_methods
    assert list(CHOICES["distill.method"]) == list_methods()
    for method in list_methods():
        overrides = [f"distill.method={method}"] + (["teacher.name=cnn_large"] if method != "vanilla" else [])
        cfg = load_config(None, overrides)
        assert cfg.distill.method == method
        lm = ["task=causal_lm", "model.name=llama", "data.name=python_stdlib"]
        if method in fused_methods():
            continue
        with pytest.raises(ConfigError, match=f"distill.method {method!r} is not available for task: causal_lm.*"
                                              f"choose one of {', '.join(fused_methods())}"):
            load_config(None, overrides + lm)


def test_loss_options_must_fit_the_class_count():
    from pcdistill.tasks.base import check_loss_fits
    cfg = load_config(None, ["distill.method=pcd", "teacher.name=cnn_large", "distill.loss.stages=11"])
    with pytest.raises(ConfigError, match=r"does not fit the 10 classes .*stages must be an int in \[1, C=10\]"):
        check_loss_fits(cfg, 10)
    check_loss_fits(cfg, 11)
    with pytest.raises(ConfigError, match=r"C=2\]; got 3"):  # PCD's default stages
        check_loss_fits(load_config(None, ["distill.method=pcd", "teacher.name=cnn_large"]), 2)
    check_loss_fits(load_config(None, ["distill.method=jsd", "teacher.name=cnn_large"]), 2)


def test_jsd_options_are_checked():
    base = ["distill.method=jsd", "teacher.name=cnn_large"]
    assert load_config(None, base + ["distill.loss.beta=0.3"]).distill.loss == {"beta": 0.3}
    with pytest.raises(ConfigError, match=r"distill.loss: beta must lie in \[0, 1\]"):
        load_config(None, base + ["distill.loss.beta=1.5"])
    with pytest.raises(ConfigError, match="distill.loss.standardize must be true or false"):
        load_config(None, base + ["distill.loss.standardize=1"])


@pytest.mark.parametrize("overrides,words", [
    (["trainer.epoch=3"], ["trainer.epoch", "did you mean 'trainer.epochs'"]),
    (["trainer.epochs=three"], ["trainer.epochs", "integer"]),
    (["optim.lr=fast"], ["optim.lr", "number"]),
    (["trainer.compile=1"], ["trainer.compile", "true or false"]),
    (["model=resnet8"], ["model", "mapping"]),
    (["distill.method=pdc"], ["distill.method", "did you mean 'pcd'"]),
    (["distill.method=pcd", "teacher.name=cnn_large", "distill.loss.stagess=2"],
     ["distill.loss", "did you mean 'stages'"]),
    (["distill.method=kd"], ["teacher.name"]),
    (["distill.method=kd", "teacher.name=cnn_large", "distill.loss.stages=3"],  # pcd.yaml with distill.method=kd
     ["distill.loss.stages is not an option of kd (it is pcd's", "distill.loss={}", "kd takes temperature"]),
    (["distill.loss.temperature=2"], ["distill.loss", "vanilla"]),
    (["data.val_fraction=1.0"], ["data.val_fraction"]),
    (["schedule.milestones=[5, 2]"], ["schedule.milestones", "increasing"]),
    (["trainer.batch_size=0"], ["trainer.batch_size", "> 0"]),
    (["distill.box_reg_weight=1.0"], ["box_reg_weight", "detection"]),
    (["trainer.amp=fp8"], ["trainer.amp"]),
    (["epochs"], ["section.key=value"]),
])
def test_errors_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_yaml_never_executes_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    if cfg.distill.method != "vanilla":
        assert cfg.teacher.name and (cfg.teacher.path if cfg.task == "causal_lm" else cfg.teacher.weights)


# The 14 CIFAR-100 pairs of the authors' repository; cross-architecture ones also ship K=5.
SAME_FAMILY_PAIRS = {"resnet56_resnet20", "resnet110_resnet32", "resnet110_resnet20", "resnet32x4_resnet8x4",
                     "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "vgg13_vgg8"}
CROSS_PAIRS = {"resnet32x4_ShuffleV2", "vgg13_MobileNetV2", "ResNet50_MobileNetV2", "resnet32x4_wrn_16_2",
               "resnet32x4_wrn_40_2", "wrn_40_2_MobileNetV2", "wrn_40_2_resnet8x4"}


def test_shipped_configs_cover_the_papers_pairs():
    pairs = {p.parent.name for p in (REPO / "configs" / "cifar100").rglob("teacher.yaml")}
    assert pairs == SAME_FAMILY_PAIRS | CROSS_PAIRS
    for pair in pairs:
        names = {p.stem for p in (REPO / "configs" / "cifar100" / pair).glob("*.yaml")}
        assert names == {"teacher", "vanilla", "kd", "dkd", "pcd"} | ({"pcd_k5"} if pair in CROSS_PAIRS else set())


@pytest.mark.parametrize("pair", sorted(SAME_FAMILY_PAIRS | CROSS_PAIRS))
def test_cifar_configs_share_the_fixed_recipe(pair):
    """The paper's fixed hyper-parameters, all 50,000 training images, names matching the folder."""
    folder = REPO / "configs" / "cifar100" / pair
    configs = {p.stem: load_config(p) for p in folder.glob("*.yaml")}
    teacher, student = configs["teacher"].model.name, configs["pcd"].model.name
    assert pair == f"{teacher}_{student}"
    lr = 0.01 if student in ("MobileNetV2", "ShuffleV2") else 0.05
    for name, cfg in configs.items():
        assert cfg.data.name == "cifar100" and cfg.data.val_fraction == 0, name
        assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.optim.momentum, cfg.optim.weight_decay) == \
            (240, 64, 0.9, 5e-4)
        assert cfg.schedule.milestones == [150, 180, 210] and cfg.schedule.gamma == 0.1
        assert cfg.optim.lr == (0.05 if name == "teacher" else lr), name
        if name != "teacher" and name != "vanilla":
            assert cfg.model.name == student and cfg.teacher.name == teacher, name
            assert cfg.teacher.weights == f"runs/cifar100/{teacher}/model.safetensors"
    assert configs["pcd"].distill.loss == {"temperature": 4.0, "stages": 3}
    if "pcd_k5" in configs:
        k5 = to_dict(configs["pcd_k5"])
        assert k5["distill"]["loss"] == {"temperature": 4.0, "stages": 5}
        k5["distill"]["loss"]["stages"] = 3
        assert k5 | {"description": ""} == to_dict(configs["pcd"]) | {"description": ""}  # only K differs


def test_cifar_pcd_config_follows_the_papers_recipe():
    cfg = load_config(REPO / "configs/cifar100/resnet32x4_resnet8x4/pcd.yaml")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.optim.lr, cfg.optim.momentum,
            cfg.optim.weight_decay) == (240, 64, 0.05, 0.9, 5e-4)
    assert cfg.schedule.milestones == [150, 180, 210] and cfg.schedule.gamma == 0.1
    assert cfg.distill.warmup_epochs == 20 and cfg.distill.alpha == 1.0
    assert cfg.distill.loss == {"temperature": 4.0, "stages": 3}
    shuffle = load_config(REPO / "configs/cifar100/resnet32x4_ShuffleV2/pcd.yaml")
    assert shuffle.optim.lr == 0.01


@pytest.mark.parametrize("name", ["teacher", "vanilla", "kd", "dkd", "pcd"])
def test_digits_configs_are_the_demo_recipe(name):
    shipped = yaml.safe_load((REPO / "configs" / "digits" / f"{name}.yaml").read_text())
    assert from_dict(shipped) == from_dict(recipe(name, "runs/digits/teacher/model.safetensors"))


def final_alphas(csv_path, dataset=None) -> dict[str, set[float]]:
    """{variant: the alphas of its final runs} read straight from a suite's csv."""
    if not csv_path.exists():
        return {}
    found = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row["phase"] == "final" and row["alpha"] and (dataset is None or row["dataset"] == dataset):
                found.setdefault(row["variant"], set()).add(float(row["alpha"]))
    return found


@pytest.mark.parametrize("dataset", ["fashion_mnist", "fashion_mnist_pairs", "fashion_scenes", "lm/stdlib"])
def test_suite_configs_are_the_recipes_at_the_weights_chosen_on_validation(dataset):
    from pcdistill.evidence import detection, lm, suite
    teacher = f"runs/{dataset}/teacher/model.safetensors"
    if dataset == "lm/stdlib":
        recipe, variants, chosen = lm.FULL, lm.VARIANTS, final_alphas(REPO / "results/lm.csv")
        make_teacher, make_student, teacher = lm.teacher_config, lm.student_config, "runs/lm/stdlib/teacher"
    elif dataset == "fashion_scenes":
        recipe, variants, chosen = detection.FULL, detection.VARIANTS, final_alphas(REPO / "results/detection.csv")
        make_teacher, make_student = detection.teacher_config, detection.student_config
    else:
        recipe, variants = suite.FULL[dataset], suite.VARIANTS
        chosen = final_alphas(REPO / "results/runs.csv", dataset)
        make_teacher, make_student = suite.teacher_config, suite.student_config
    folder = REPO / "configs" / dataset
    assert from_dict(yaml.safe_load((folder / "teacher.yaml").read_text())) == from_dict(make_teacher(recipe))
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(
        ["teacher"] + [v.name.replace('+', '_').replace('-', '_') for v in variants])
    for variant in variants:
        path = folder / f"{variant.name.replace('+', '_').replace('-', '_')}.yaml"
        text = path.read_text()
        shipped = from_dict(yaml.safe_load(text))
        if variant.method == "vanilla":
            assert shipped == from_dict(make_student(recipe, variant, teacher))
            continue
        alphas = chosen.get(variant.name)
        if alphas is None:  # that suite has not run: the published weight, said to be untuned
            assert shipped.distill.alpha == variant.alpha and "not yet tuned" in text
        else:
            (alpha,) = alphas  # every final seed of a variant used the one chosen weight
            assert shipped.distill.alpha == pytest.approx(alpha)
            assert f"distill.alpha {alpha:g} " in text and "chosen on the validation split" in text
        want = make_student(recipe, variant, teacher, scale=shipped.distill.alpha / variant.alpha)
        assert shipped == from_dict(want)


def test_smollm2_configs_are_the_recipe_at_the_weights_chosen_on_validation():
    from pcdistill.evidence import lm
    folder = REPO / "configs" / "lm" / "smollm2"
    chosen = final_alphas(REPO / "results/lm_smollm2.csv")
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(v.name for v in lm.SMOLLM2_VARIANTS)
    for variant in lm.SMOLLM2_VARIANTS:
        text = (folder / f"{variant.name}.yaml").read_text()
        shipped = from_dict(yaml.safe_load(text))
        assert shipped.teacher.path == "smollm2-135m" and shipped.teacher.cache == lm.SMOLLM2_CACHE
        alphas = chosen.get(variant.name)
        if variant.method == "vanilla":
            assert shipped.distill.method == "vanilla"
        elif alphas is None:  # the suite has not run: the published weight, said to be untuned
            assert shipped.distill.alpha == variant.alpha and "not yet tuned" in text
        else:
            (alpha,) = alphas
            assert shipped.distill.alpha == pytest.approx(alpha) and "chosen on the validation split" in text
        want = lm.pretrained_student_config(lm.SMOLLM2, variant, lm.SMOLLM2_CACHE,
                                            scale=shipped.distill.alpha / variant.alpha if alphas else 1.0)
        assert shipped == from_dict(want)
    assert {v.name: v.loss for v in lm.SMOLLM2_VARIANTS if v.name in ("rkl", "jsd")} == {
        "rkl": {"temperature": 1.0}, "jsd": {"beta": 0.5, "temperature": 1.0}}


def test_suite_configs_are_what_the_generator_writes():
    from pcdistill.evidence.configs import suite_configs
    for relative, text in suite_configs(REPO / "results").items():
        assert (REPO / "configs" / relative).read_text() == text, f"configs/{relative}: run `pcdistill bench configs`"


def test_the_papers_configs_keep_the_papers_weight():
    for path in list((REPO / "configs" / "cifar100").rglob("*.yaml")) + list((REPO / "configs" / "imagenet").rglob("*.yaml")):
        cfg = load_config(path)
        if cfg.distill.method == "pcd":
            assert cfg.distill.alpha == 1.0, path


def test_shipped_and_saved_configs_hold_no_yaml_anchors(tmp_path):
    from pcdistill.config import save_config
    for path in SHIPPED:  # `&id001` / `*id001`: valid YAML, but a reader must decode them
        assert not [e for e in yaml.parse(path.read_text()) if getattr(e, "anchor", None)], path
    cfg = from_dict({"model": {"name": "cnn_tiny", "options": {"width": 8}}, "teacher": {"name": "cnn_tiny"}})
    cfg.teacher.options = cfg.model.options  # one dict in two places, as yaml.safe_load gives for an alias
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "&" not in text and "*" not in text and text.count("width: 8") == 2
