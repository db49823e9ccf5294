"""A new user's first hour (issue 11): every mistake gets a one-paragraph error, nothing goes wrong silently.

CLI cases run ``pcdistill.cli.main`` in-process: a traceback would surface as an exception and fail the
test; user errors must return 2 with an ``error:`` paragraph naming the problem.
"""
from __future__ import annotations

import os
import stat

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pcdistill import load_model, models
from pcdistill.cli import main
from pcdistill.config import ConfigError, from_dict, load_config, parse_yaml
from pcdistill.distiller import Distiller
from pcdistill.models.weights import load_weights
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import NonFiniteLossError, train
from pcdistill.losses import KDLoss
from tests.data_fixtures import write_mnist_folder
from tests.helpers import REPO, digits_config, run_cli


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse's own exits (--help, --version, usage errors)
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_clean_error(result, *words):
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # progress bars of a started run may come before it
    assert message.startswith("error: "), err
    for word in words:
        assert word in message, (word, message)
    return message


def write(path, data: dict | str):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_hour") / "teacher"
    train(from_dict(digits_config(trainer={"epochs": 1})), out)
    return out


def student_config(teacher_dir, **sections) -> dict:
    return digits_config(teacher={"name": "cnn_tiny", "weights": str(teacher_dir)},
                         distill={"method": "pcd", "warmup_epochs": 1, "loss": {"stages": 3}}, **sections)


# ---------------------------------------------------------------------------------------------- 1
def test_warmup_without_epoch_is_refused_not_silently_zero():
    torch.manual_seed(0)
    student, teacher = models.create("cnn_tiny", num_classes=10), models.create("cnn_tiny", num_classes=10)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    distiller = Distiller(student, teacher, KDLoss(), warmup_epochs=20)
    with pytest.raises(ValueError, match=r"warmup_epochs=20 .* pass epoch="):
        distiller(x, y)
    _, losses = distiller(x, y, epoch=10)
    assert losses["distill"] > 0
    _, plain = Distiller(student, teacher, KDLoss())(x, y)  # no warm-up: epoch is not needed
    assert plain["distill"] > 0
    logits, _ = distiller(x)  # inference needs no epoch either
    assert logits.shape == (4, 10)


def test_detection_warmup_without_epoch_is_refused():
    from pcdistill.detection.distill import RoIDistiller
    from tests.test_detection import batch, tiny_detector
    distiller = RoIDistiller(tiny_detector(0), tiny_detector(1), KDLoss(), warmup_epochs=2.0).train()
    with pytest.raises(ValueError, match=r"warmup_epochs=2 .* pass epoch="):
        distiller(*batch())


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("override,key", [
    ("distill.loss.adaptive=maybe", "distill.loss.adaptive"),
    ("distill.loss.standardize=null", "distill.loss.standardize"),
    ("distill.loss.adaptive=no", "distill.loss.adaptive"),  # YAML 1.1 would read `no` as False
    ("trainer.compile=yes", "trainer.compile"),
])
def test_booleans_must_be_true_or_false(capsys, tmp_path, teacher_dir, override, key):
    config = write(tmp_path / "s.yaml", student_config(teacher_dir))
    result = cli(capsys, "train", str(config), override, "--out", str(tmp_path / "run"))
    assert_clean_error(result, key, "true or false")
    assert not (tmp_path / "run").exists()


def test_yaml_booleans_are_true_false_only(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {name: digits, augment: off}\n")
    with pytest.raises(ConfigError, match=r"data.augment must be true or false; got 'off'"):
        load_config(path)
    assert load_config(write(tmp_path / "d.yaml", "data: {augment: false}\n")).data.augment is False


# ---------------------------------------------------------------------------------------------- 3
def test_demo_refuses_to_delete_existing_runs(capsys, tmp_path):
    keep = tmp_path / "teacher" / "model.safetensors"
    keep.parent.mkdir()
    keep.write_bytes(b"a user's weights")
    assert_clean_error(cli(capsys, "demo", "--out", str(tmp_path), "--epochs", "1"), "teacher/", "--force")
    assert keep.read_bytes() == b"a user's weights"


# ---------------------------------------------------------------------------------------------- 4
def test_duplicate_yaml_key_names_key_and_both_lines(capsys, tmp_path):
    config = write(tmp_path / "dup.yaml", "data: {name: digits}\ntrainer:\n  epochs: 1\nmodel: {name: cnn_tiny}\n"
                                          "trainer:\n  batch_size: 32\n")
    message = assert_clean_error(cli(capsys, "train", str(config), "--out", str(tmp_path / "r")),
                                 "dup.yaml", "'trainer'", "lines 2 and 5")
    assert "twice" in message
    with pytest.raises(ConfigError, match="'epochs' appears twice.*lines 1 and 1"):
        load_config(write(tmp_path / "flow.yaml", "trainer: {epochs: 1, epochs: 2}\n"))


# ---------------------------------------------------------------------------------------------- 5, 10
def test_resume_extends_a_finished_run_like_an_uninterrupted_one(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config(trainer={"epochs": 1}))
    assert cli(capsys, "train", str(config), "--out", str(tmp_path / "short"))[0] == 0
    rc, out, _ = cli(capsys, "train", "--resume", str(tmp_path / "short"))
    assert rc == 0 and "trainer.epochs=N" in out  # a finished run says how to extend it
    rc, out, err = cli(capsys, "train", "--resume", str(tmp_path / "short"), "trainer.epochs=2")
    assert rc == 0, err
    assert "config stored in" in out and "checkpoints/last.pt" in out and "trainer.epochs 1 -> 2" in out
    assert cli(capsys, "train", str(config), "trainer.epochs=2", "--out", str(tmp_path / "long"))[0] == 0
    a, b = load_file(tmp_path / "short" / "model.safetensors"), load_file(tmp_path / "long" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(tmp_path / "short")) == drop(read_metrics(tmp_path / "long"))
    assert load_config(tmp_path / "short" / "config.yaml").trainer.epochs == 2


def test_resume_with_more_iterations_goes_on_inside_the_cut_short_epoch(capsys, tmp_path):
    # digits at batch 128: 13 steps an epoch, so 5 iterations stop inside the first epoch
    config = write(tmp_path / "c.yaml", digits_config(trainer={"iterations": 5}))
    short = tmp_path / "short"
    assert cli(capsys, "train", str(config), "--out", str(short))[0] == 0
    rc, out, _ = cli(capsys, "train", "--resume", str(short))
    assert rc == 0 and "trainer.iterations=N` (N > 5)" in out
    for iterations, epochs in ((10, 1), (30, 3)):
        rc, _, err = cli(capsys, "train", "--resume", str(short), f"trainer.iterations={iterations}")
        assert rc == 0, err
        rows = read_metrics(short)
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)) and rows[-1]["step"] == iterations
    assert cli(capsys, "train", str(config), "trainer.iterations=30", "--out", str(tmp_path / "long"))[0] == 0
    a, b = load_file(short / "model.safetensors"), load_file(tmp_path / "long" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(short)) == drop(read_metrics(tmp_path / "long"))


def test_resume_refuses_keys_that_change_the_experiment(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config(trainer={"epochs": 1}))
    assert cli(capsys, "train", str(config), "--out", str(tmp_path / "run"))[0] == 0
    message = assert_clean_error(cli(capsys, "train", "--resume", str(tmp_path / "run"), "model.name=cnn_small",
                                     "trainer.epochs=2"), "cannot change model.name", "trainer.epochs", "optim.lr")
    assert "trainer.epochs," not in message.split("Keys that may")[0]  # only the refused key is named as refused
    assert_clean_error(cli(capsys, "train", str(config), "--resume", str(tmp_path / "run")), "no config file")


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    cfg = digits_config(optim={"name": "sgd", "lr": 1e30}, trainer={"epochs": 1})
    with pytest.raises(NonFiniteLossError) as err:
        train(from_dict(cfg), tmp_path / "run")
    assert "No checkpoint was written yet" in str(err.value) and "optim.lr=1e+29" in str(err.value)
    assert "--resume" not in str(err.value) and not (tmp_path / "run" / "checkpoints").exists()
    cfg["optim"]["lr"] = 0.05  # the advice: the same command, same --out, a lower lr
    assert train(from_dict(cfg), tmp_path / "run").epochs == 1


def test_non_finite_loss_advice_to_resume_with_a_lower_lr_works(capsys, tmp_path):
    # from epoch 2 the schedule multiplies the lr by 1e12: the step diverges; 1e-12 of the lr makes it 0.05 again
    config = write(tmp_path / "c.yaml", digits_config(schedule={"name": "multistep", "milestones": [1],
                                                                "gamma": 1e12}, trainer={"epochs": 2}))
    run = tmp_path / "run"
    message = assert_clean_error(cli(capsys, "train", str(config), "--out", str(run)), "epoch 2",
                                 "holds the state after epoch 1", f"pcdistill train --resume {run} optim.lr=0.005")
    assert "still holds the last good state" not in message
    rc, _, err = cli(capsys, "train", "--resume", str(run), "optim.lr=5e-14")
    assert rc == 0, err
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["lr"] == pytest.approx(5e-14 * 1e12)  # the lowered base lr times the schedule's factor
    assert all(torch.isfinite(v).all() for v in load_file(run / "model.safetensors").values())


# ---------------------------------------------------------------------------------------------- 6
def test_overrides_and_positionals_anywhere(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config(trainer={"epochs": 3}))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", str(config), "--out", str(run), "trainer.epochs=1", "trainer.log_every=7")
    assert rc == 0, err
    saved = load_config(run / "config.yaml")
    assert (saved.trainer.epochs, saved.trainer.log_every) == (1, 7)
    rc, out, err = cli(capsys, "eval", "--split", "test", str(run))
    assert rc == 0, err
    assert out.startswith("test: acc") and "val:" not in out
    rc, _, err = cli(capsys, "train", str(config), "--out", str(tmp_path / "x"), "--bogus")
    assert rc == 2 and "unrecognized arguments: --bogus" in err and "pcdistill train" in err


def test_through_the_entry_point_an_override_after_the_options(tmp_path):
    config = write(tmp_path / "c.yaml", digits_config())
    proc = run_cli("train", str(config), "--out", str(tmp_path / "r"), "trainer.device=gpu")
    assert_clean_error((proc.returncode, proc.stdout, proc.stderr), "trainer.device", "'gpu'")
    assert "usage:" not in proc.stderr


# ---------------------------------------------------------------------------------------------- 7
LITERALS = ["1e-2", "5e-4", "5E-4", "1E5", "-2.5e+3", "+.5", "1.", ".5e1", "1_000.25", "3.14_15", "0e0"]


@pytest.mark.parametrize("text", LITERALS)
def test_every_python_float_literal_is_a_float(text):
    assert parse_yaml(text) == float(text) and isinstance(parse_yaml(text), float)


@pytest.mark.parametrize("text", ["1e", "e5", "1__0.0", "1_.5", "yes", "1e-2x"])
def test_non_literals_stay_strings(text):
    assert parse_yaml(text) == text


def test_float_literals_in_files_and_on_the_command_line(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 1e-2\n  weight_decay: 5E-4\n")
    cfg = load_config(path, ["schedule.min_lr=1e-6"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.min_lr) == (0.01, 0.0005, 1e-6)


# ---------------------------------------------------------------------------------------------- 8
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config())
    assert_clean_error(cli(capsys, "train", str(config), "trainer.device=cuda", "--out", str(tmp_path / "r")),
                       "trainer.device", "CUDA is not available", "trainer.device=cpu")


def test_device_name_gpu(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config())
    assert_clean_error(cli(capsys, "train", str(config), "trainer.device=gpu", "--out", str(tmp_path / "r")),
                       "trainer.device", "'gpu'", "'cuda'")


def test_out_naming_a_file(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config())
    (tmp_path / "notes.txt").write_text("mine")
    assert_clean_error(cli(capsys, "train", str(config), "--out", str(tmp_path / "notes.txt")),
                       "notes.txt", "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_teacher_weights_that_are_a_checkpoint(capsys, tmp_path, teacher_dir):
    checkpoint = teacher_dir / "checkpoints" / "last.pt"
    config = write(tmp_path / "s.yaml", student_config(checkpoint))
    assert_clean_error(cli(capsys, "train", str(config), "--out", str(tmp_path / "r")),
                       "teacher.weights", "last.pt", "safetensors", "model.safetensors")


# ---------------------------------------------------------------------------------------------- 9
def test_stages_beyond_the_class_count_fail_before_the_run_folder(capsys, tmp_path, teacher_dir):
    config = write(tmp_path / "s.yaml", student_config(teacher_dir))
    run = tmp_path / "run"
    assert_clean_error(cli(capsys, "train", str(config), "distill.loss.stages=11", "--out", str(run)),
                       "distill.loss.stages=11", "10 classes", "[1, C=10]")
    assert not run.exists()


# ---------------------------------------------------------------------------------------------- 11
def test_relative_paths_are_stored_absolute(capsys, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_mnist_folder(work / "data" / "fm", n_train=100, n_test=30)
    monkeypatch.chdir(work)
    common = {"data": {"name": "fashion_mnist", "root": "data/fm", "val_fraction": 0.1},
              "trainer": {"epochs": 1, "batch_size": 30}}
    assert cli(capsys, "train", str(write(work / "t.yaml", digits_config(**common))), "--out", "runs/t")[0] == 0
    student = digits_config(**common, teacher={"name": "cnn_tiny", "weights": "runs/t"},
                            distill={"method": "kd", "loss": {"temperature": 4.0}})
    assert cli(capsys, "train", str(write(work / "s.yaml", student)), "--out", "runs/s")[0] == 0
    text = (work / "runs" / "s" / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["teacher"]["weights"] == str(work / "runs" / "t")
    assert saved["data"]["root"] == str(work / "data" / "fm")
    assert "# teacher.weights was given as 'runs/t'" in text and "# data.root was given as 'data/fm'" in text
    monkeypatch.chdir(elsewhere)
    rc, _, err = cli(capsys, "train", "--resume", str(work / "runs" / "s"), "trainer.epochs=2")
    assert rc == 0, err
    assert len(read_metrics(work / "runs" / "s")) == 2
    assert "# teacher.weights was given as 'runs/t'" in (work / "runs" / "s" / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------- 12
def test_class_count_in_model_options(capsys, tmp_path):
    config = write(tmp_path / "c.yaml", digits_config())
    assert_clean_error(cli(capsys, "train", str(config), "model.options.num_classes=5", "--out", str(tmp_path / "r")),
                       "model.options.num_classes", "comes from the dataset", "10")


def test_eval_messages_and_the_config_beside_a_weights_file(capsys, tmp_path, teacher_dir):
    assert_clean_error(cli(capsys, "eval", str(tmp_path / "nonexistent")), "nonexistent", "does not exist")
    rc_dir, by_dir, _ = cli(capsys, "eval", str(teacher_dir))
    rc_file, by_file, err = cli(capsys, "eval", str(teacher_dir / "model.safetensors"))
    assert rc_dir == rc_file == 0, err
    assert by_file == by_dir
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((teacher_dir / "model.safetensors").read_bytes())
    assert_clean_error(cli(capsys, "eval", str(loose)), "no config.yaml", "--config")


def test_small_messages(capsys, tmp_path):
    assert_clean_error(cli(capsys, "train", str(REPO / "configs" / "digits"), "--out", str(tmp_path / "r")),
                       "is a folder", "pcd.yaml")
    pcd = str(REPO / "configs" / "digits" / "pcd.yaml")
    assert_clean_error(cli(capsys, "train", pcd, "distill=pcd", "--out", str(tmp_path / "r")),
                       "distill is a section", "distill.method=pcd")
    assert_clean_error(cli(capsys, "list", "modles"), "did you mean 'models'")
    rc, out, _ = cli(capsys, "--version")
    from pcdistill import __version__
    assert rc == 0 and out.strip() == f"pcdistill {__version__}"


@pytest.mark.parametrize("command,option", [(["bench", "report"], "--readme"), (["bench", "analysis"], "--dataset")])
def test_every_bench_option_has_help(capsys, command, option):
    rc, out, _ = cli(capsys, *command, "--help")
    assert rc == 0
    line = next(line for line in out.splitlines() if line.strip().startswith(option))
    assert len(line.split(maxsplit=2)) == 3, f"{option} has no help text: {line!r}"


# ---------------------------------------------------------------------------------------------- 14
def test_load_model_rebuilds_a_cli_trained_network(teacher_dir):
    net = load_model(teacher_dir)
    reference = models.create("cnn_tiny", num_classes=10, in_channels=1)  # what digits_config trains
    load_weights(reference, teacher_dir / "model.safetensors")
    x = torch.randn(3, 1, 8, 8)
    assert not net.training
    torch.testing.assert_close(net(x), reference.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="last.pt.*training checkpoint"):
        load_model(teacher_dir / "checkpoints" / "last.pt")


# ---------------------------------------------------------------------------------------------- 16
def test_short_runs_log_train_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    train(from_dict(digits_config(trainer={"epochs": 2, "log_every": 100000})), run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [r["step"] for r in read_metrics(run)]  # one point per epoch end, at the step metrics.jsonl records


def test_weights_file_has_the_mode_of_every_other_file(teacher_dir):
    mode = stat.S_IMODE(os.stat(teacher_dir / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(teacher_dir / "config.yaml").st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

