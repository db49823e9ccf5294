"""The command line: user errors end with one paragraph and exit status 2, never a traceback."""
from __future__ import annotations

import gzip
import struct

import pytest
import yaml

from tests.helpers import REPO, digits_config, run_cli


def assert_clean_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(digits_config(trainer={"epochs": 1})))
    return path


def test_unknown_key(config_file, tmp_path):
    proc = run_cli("train", str(config_file), "trainer.epoch=2", "--out", str(tmp_path / "r"))
    assert_clean_error(proc, "trainer.epoch", "did you mean 'trainer.epochs'")


def test_wrong_type(config_file, tmp_path):
    proc = run_cli("train", str(config_file), "optim.lr=fast", "--out", str(tmp_path / "r"))
    assert_clean_error(proc, "optim.lr", "number")


def test_missing_dataset_folder(config_file, tmp_path):
    missing = tmp_path / "no-such-folder"
    proc = run_cli("train", str(config_file), "data.name=fashion_mnist", f"data.root={missing}",
                   "--out", str(tmp_path / "r"))
    assert_clean_error(proc, str(missing), "train-images-idx3-ubyte", "dataset-fashion-mnist")


def test_truncated_idx_file(config_file, tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    n = 20
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:  # header says 20 images, 5 are there
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + bytes(5 * 28 * 28))
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + bytes(n))
    for split in ("t10k",):
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + bytes(n * 28 * 28))
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + bytes(n))
    proc = run_cli("train", str(config_file), "data.name=fashion_mnist", f"data.root={root}",
                   "--out", str(tmp_path / "r"))
    assert_clean_error(proc, "train-images-idx3-ubyte", str(20 * 28 * 28), str(5 * 28 * 28))


def test_missing_config_and_out(tmp_path, config_file):
    assert_clean_error(run_cli("train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")), "nope.yaml")
    assert_clean_error(run_cli("train", str(config_file)), "--out")
    assert_clean_error(run_cli("train", "--resume", str(tmp_path / "empty")), "last.pt")


def test_train_eval_and_list(config_file, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", str(config_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "final-epoch test_acc" in proc.stdout and "best test_acc over epochs" in proc.stdout
    proc = run_cli("eval", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("val: acc") and "test: acc" in proc.stdout
    listing = run_cli("list").stdout
    for word in ("resnet8x4", "wrn_40_2", "tv_resnet18", "digits", "fashion_mnist_pairs"):
        assert word in listing
    methods = next(line for line in listing.splitlines() if line.startswith("methods ("))
    assert set(methods.split(": ", 1)[1].split(", ")) >= {"vanilla", "kd", "dkd", "dist", "pcd", "rkl", "jsd", "tvd"}


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``pcdistill ARGS`` in this process (cheaper than run_cli): exit status, stdout, stderr."""
    from pcdistill.cli import main
    try:
        rc = main(list(args))
    except SystemExit as stop:  # argparse: --help, usage errors
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_missing_teacher_names_the_command_that_trains_it(capsys, tmp_path):
    weights = tmp_path / "runs" / "teacher" / "model.safetensors"
    rc, _, err = run_main(capsys, "train", str(REPO / "configs" / "digits" / "pcd.yaml"), f"teacher.weights={weights}",
                          "--out", str(tmp_path / "pcd"))
    assert rc == 2 and "Traceback" not in err
    assert f"teacher.weights {str(weights)!r} does not exist" in err
    assert f"pcdistill train {REPO / 'configs' / 'digits' / 'teacher.yaml'} --out {weights.parent}" in err
    assert not (tmp_path / "pcd").exists()


def test_bench_help_describes_every_suite(capsys):
    rc, out, _ = run_main(capsys, "bench", "--help")
    text = " ".join(out.split())
    assert rc == 0
    for words in ("accuracy: classification on digits", "detection: fashion_scenes", "lm: python_stdlib",
                  "analysis", "configs", "report"):
        assert words in text, words


def test_list_is_readable_and_names_the_language_model_parts(capsys):
    rc, out, _ = run_main(capsys, "list")
    assert rc == 0 and len(out) < 4000 and max(map(len, out.splitlines())) <= 100
    flat = " ".join(out.split())
    assert "pcdistill list timm --match" in flat and "timm/resnet18" in flat and "timm/aimv2" not in flat
    assert "lm_corpora (2; data.name for task: causal_lm): python_stdlib, text" in flat
    assert "llama, gpt2, qwen2, hf" in flat and "save_pretrained" in flat
    rc, out, _ = run_main(capsys, "list", "timm", "--match", "deit_tiny*")
    assert rc == 0 and "timm/deit_tiny_patch16_224" in out and "resnet" not in out


def test_summary_says_epoch_once_and_gives_units():
    from pcdistill.engine.trainer import Summary, format_summary
    from pcdistill.tasks import format_metric
    text = format_summary(Summary(REPO / "r", "AP", {"test_AP": 0.0, "val_AP": 1.5}, {"test_AP": 0.25}, 1, 2.0))
    assert "(1 epoch, 2.0 s)" in text and "final-epoch test_AP: 0.00%" in text and "final-epoch val_AP: 1.50%" in text
    assert "over epochs (for reference only; not used for any choice): 0.25%" in text
    assert "(3 epochs, " in format_summary(Summary(REPO / "r", "ppl", {"test_ppl": 9.0}, {}, 3, 1.0))
    assert [format_metric(k, 12.345) for k in ("val_acc", "top5", "test_agree", "APl", "ppl", "test_kl")] == \
        ["12.35%", "12.35%", "12.35%", "12.35%", "12.35", "12.35"]
