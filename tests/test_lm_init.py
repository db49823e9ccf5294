"""Students of a teacher's vocabulary: `model.init: {from, layers}` copies the embeddings, final norm, output layer
and the chosen layers (prune-then-distill), checked against the source model with those layers cut out by hand."""
from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import yaml

from pcdistill import load_model
from pcdistill.cli import main
from pcdistill.config import ConfigError, from_dict
from pcdistill.lm.models import keep_layers
from tests.gguf_fixtures import tiny_gguf, tiny_llama


def test_keep_layers_equals_the_source_with_the_other_layers_removed():
    source = tiny_llama(300, hidden=32, layers=4, seed=5)
    pruned = keep_layers(source, [0, 3])
    reference = copy.deepcopy(source)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (0, 3)])
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert pruned.config.num_hidden_layers == 2 and source.config.num_hidden_layers == 4
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied, and a copy of the source's
    assert pruned.lm_head.weight.data_ptr() != source.lm_head.weight.data_ptr()
    for layers in ([], [3, 0], [0, 4], [1, 1]):
        with pytest.raises(ValueError, match="layers must be"):
            keep_layers(source, layers)


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_a_student_initialised_from_a_gguf_teachers_layers_trains_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path / "home"))
    gguf, source, _ = tiny_gguf(tmp_path / "teacher")
    cfg = {"task": "causal_lm",
           "data": {"name": "python_stdlib", "val_fraction": 0.2,
                    "options": {"block_size": 16, "max_files": 6, "max_chars": 500, "test_fraction": 0.2,
                                "tokenizer": str(gguf)}},
           "model": {"name": "llama", "init": {"from": str(gguf), "layers": [1]}},
           "distill": {"method": "vanilla"}, "optim": {"name": "adamw", "lr": 1e-12, "weight_decay": 0.0},
           "trainer": {"epochs": 1, "iterations": 2, "batch_size": 4, "device": "cpu", "threads": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = _cli("train", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run"))
    assert rc == 0, err
    student = load_model(tmp_path / "run")
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():  # lr 1e-12: the student is still the source's layer 1 between its embeddings and norm
        assert torch.allclose(student(ids).logits, keep_layers(source, [1])(ids).logits, atol=1e-6)
    assert student.config.num_hidden_layers == 1 and not hasattr(student.config, "quantization_config")
    rc, _, err = _cli("train", str(tmp_path / "s.yaml"), "model.init.layers=[2]", "--out", str(tmp_path / "bad"))
    assert rc == 2 and "model.init.layers: layers must be increasing indices in [0, 2)" in err


@pytest.mark.parametrize("model, message", [
    ({"name": "hf", "weights": "x", "init": {"from": "x", "layers": [0]}}, "use one or the other"),
    ({"name": "llama", "init": {"from": "x"}}, "takes 'from' .* and 'layers'"),
    ({"name": "llama", "init": {"from": "x", "layers": 2}}, "must be a non-empty list"),
    ({"name": "llama", "init": {"from": "x", "layers": [0]}, "options": {"hidden_size": 8}}, "remove model.options"),
])
def test_bad_init_settings_are_named(model, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"task": "causal_lm", "data": {"name": "python_stdlib"}, "model": model})
