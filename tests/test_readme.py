"""Every Python snippet of the README runs as written.

The fenced ``python`` blocks are executed one by one in a fresh namespace. Names a snippet says are
the user's own (``student``, ``teacher``, ``images``, ``labels``) get tiny stand-ins; a snippet that
defines them itself uses its own. The working directory holds what the README says the user has:
``runs/digits/teacher``, a run folder written by the trainer, and a CIFAR teacher file in the CRD layout.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pcdistill import models
from pcdistill.config import from_dict
from pcdistill.engine.trainer import train
from pcdistill.models.crd_names import crd_key_map
from tests.helpers import REPO, digits_config

BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


def stand_ins() -> dict:
    torch.manual_seed(0)
    return {"student": nn.Linear(16, 10), "teacher": nn.Linear(16, 10),
            "images": torch.randn(8, 16), "labels": torch.randint(0, 10, (8,))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    train(from_dict(digits_config(trainer={"epochs": 1})), root / "runs" / "digits" / "teacher")
    net = models.create("resnet32x4", num_classes=100)
    theirs = {name: net.state_dict()[ours] for name, ours in crd_key_map(net).items()}
    teacher_file = root / "cifar_teachers" / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    teacher_file.parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": theirs, "accuracy": 79.42}, teacher_file)
    return root


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 2
    assert any("pcd_loss(" in b for b in BLOCKS) and any("Distiller(" in b and "load_model(" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs_as_written(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    torch.set_num_threads(1)
    namespace = stand_ins()
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    losses = [v for k, v in namespace.items() if k in ("loss", "losses")]
    if "teacher =" in BLOCKS[index] and not losses:  # a snippet that only loads a teacher
        assert isinstance(namespace["teacher"], nn.Module)
        return
    assert losses, "each snippet computes a loss"
    for value in losses:
        values = value.values() if isinstance(value, dict) else [value]
        assert all(torch.isfinite(v) for v in values)


def test_adding_a_method_shows_the_real_registration():
    section = (REPO / "README.md").read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    listing = re.search(r"^```\n(.*?)^```", section, re.S | re.M).group(1)
    assert listing.strip() in (REPO / "src" / "pcdistill" / "losses" / "methods.py").read_text()
