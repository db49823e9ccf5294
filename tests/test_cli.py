"""The command line: user errors end with one paragraph and exit status 2, never a traceback."""
from __future__ import annotations

import gzip
import struct

import pytest
import yaml

from tests.helpers import digits_config, run_cli


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
    methods = next(line for line in listing.splitlines() if line.startswith("methods: "))
    assert set(methods.removeprefix("methods: ").split(", ")) >= {"vanilla", "kd", "dkd", "dist", "pcd", "rkl", "jsd",
                                                                  "tvd"}
