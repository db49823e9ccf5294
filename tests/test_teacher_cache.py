"""The exact teacher cache: hidden states stored once, the teacher's logits recomputed from them inside the fused
loss; checked against the live teacher, the dtype's rounding, resume, refusals, and end to end through the CLI
with a tiny GGUF teacher whose forward must never run."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml

from pcdistill.cli import main
from pcdistill.engine.records import read_metrics
from pcdistill.lm import teacher_cache
from pcdistill.lm.distill import CausalLMDistiller
from pcdistill.lm.models import full_logits, last_hidden_states
from pcdistill.lm.teacher_cache import (CachedTeacher, CacheMismatch, TeacherCache, UncachedBlockError,
                                        write_teacher_cache)
from tests.gguf_fixtures import tiny_gguf, tiny_llama

V, L = 300, 16
IDENTITY = {"teacher": {"path": "t", "sha256": "a" * 64}, "tokenizer": {"sha256": "b" * 64, "size": V},
            "block_size": L, "corpus": {"name": "random"}}


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(V, hidden=32, layers=2, seed=3)


def blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def splits():
    return {"train": blocks(10, 0), "val": blocks(3, 1)}


def _build(teacher, splits, folder, dtype="float32", **kwargs):
    return write_teacher_cache(teacher, splits, folder, identity=IDENTITY, dtype=dtype, batch_size=4,
                               progress=False, **kwargs)


def test_float32_cache_gives_the_teachers_logits_and_the_same_fused_loss(teacher, splits, tmp_path):
    cached = CachedTeacher(TeacherCache(_build(teacher, splits, tmp_path / "c")))
    ids = splits["train"][[7, 2, 7, 0]]  # shuffled, with a repeat
    with torch.no_grad():
        torch.testing.assert_close(full_logits(cached, ids), full_logits(teacher, ids), rtol=1e-5, atol=1e-6)
    student = tiny_llama(V, hidden=16, layers=1, seed=4)
    for method, options in (("kd", {"temperature": 2.0}), ("pcd", {"stages": 3})):
        results = []
        for source in (teacher, cached):
            student.zero_grad()
            parts = CausalLMDistiller(student, source, loss=method, loss_options=options, fused="always")(
                ids, ids.clone(), epoch=1.0, progress=0.3)[1]
            sum(parts.values()).backward()
            results.append((parts[method].detach(), [p.grad.clone() for p in student.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        for got, expected in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_cache_holds_the_hidden_states_rounded_to_its_dtype(teacher, splits, tmp_path, dtype):
    cache = TeacherCache(_build(teacher, splits, tmp_path / "c", dtype=dtype))
    cached = CachedTeacher(cache)
    ids = splits["val"]
    with torch.no_grad():
        expected = last_hidden_states(teacher, ids).to(getattr(torch, dtype)).float()
    assert torch.equal(cached.hidden_states(ids), expected)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["dtype"] == dtype and manifest["bytes_per_token"] == 32 * 2
    assert manifest["splits"]["train"]["blocks"] == 10 and manifest["identity"] == IDENTITY


def test_hidden_states_beyond_float16_are_refused(teacher, splits, tmp_path):
    with pytest.raises(ValueError, match="reach 1e\\+05, beyond float16's range"):
        _build(teacher, splits, tmp_path / "c", dtype="float16",
               hidden=lambda model, ids: torch.full((len(ids), L, 32), 1e5))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_block_the_cache_does_not_hold_is_an_error(teacher, splits, tmp_path):
    cached = CachedTeacher(TeacherCache(_build(teacher, splits, tmp_path / "c")))
    other = splits["train"][:2].clone()
    other[1, 5] = (other[1, 5] + 1) % V
    with pytest.raises(UncachedBlockError, match="row 1 of this batch is not a token block"):
        cached.hidden_states(other)
    with pytest.raises(UncachedBlockError, match="blocks of 16 tokens"):
        cached.hidden_states(splits["train"][:2, :8])


def test_an_interrupted_build_resumes_at_the_first_missing_shard(teacher, splits, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 4 * L * 32 * 4)  # 4 blocks a shard: train 3 shards, val 1
    calls = []

    def hidden(model, ids):
        calls.append(len(ids))
        return last_hidden_states(model, ids)
    folder = _build(teacher, splits, tmp_path / "c", hidden=hidden)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "output.safetensors", "train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors",
        "val-00000.safetensors"]
    (folder / "manifest.json").unlink()
    (folder / "train-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        TeacherCache(folder)
    calls.clear()
    _build(teacher, splits, folder, hidden=hidden)
    assert calls == [4]  # only the missing shard's 4 blocks ran again
    cached = CachedTeacher(TeacherCache(folder))
    with torch.no_grad():
        torch.testing.assert_close(cached.hidden_states(splits["train"]), last_hidden_states(teacher, splits["train"]))


def test_a_cache_for_something_else_is_refused_by_name(teacher, splits, tmp_path):
    cache = TeacherCache(_build(teacher, splits, tmp_path / "c"))
    cache.check(IDENTITY | {"teacher": {"path": "elsewhere", "sha256": "a" * 64}}, splits)  # same file, moved
    for key, value in (("teacher", {"path": "t", "sha256": "c" * 64}), ("tokenizer", {"sha256": "d" * 64, "size": V}),
                       ("block_size", 32)):
        with pytest.raises(CacheMismatch, match=f"built for another {key}"):
            cache.check(IDENTITY | {key: value}, splits)
    with pytest.raises(CacheMismatch, match="the val split's token blocks differ"):
        cache.check(IDENTITY, {"val": blocks(3, 9)})
    with pytest.raises(CacheMismatch, match="holds no 'test' split"):
        cache.check(IDENTITY, {"test": blocks(3, 1)})
    with pytest.raises(CacheMismatch, match="already holds a teacher cache built for something else"):
        write_teacher_cache(teacher, splits, tmp_path / "c", identity=IDENTITY | {"block_size": 8}, progress=False)


# ----------------------------------------------------------------------------------------------
# End to end: pcdistill cache-teacher, then train with teacher.cache (a tiny GGUF teacher)
# ----------------------------------------------------------------------------------------------
def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def config(gguf, **teacher) -> dict:
    return {
        "task": "causal_lm",
        "data": {"name": "python_stdlib", "val_fraction": 0.2,
                 "options": {"block_size": 16, "max_files": 8, "max_chars": 600, "test_fraction": 0.2}},
        # no dropout: the live run draws from the global generator when it loads its teacher, so masks would differ
        "model": {"name": "gpt2", "options": {"n_embd": 16, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.0,
                                             "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "teacher": {"name": "llama", "path": str(gguf)} | teacher,
        "distill": {"method": "kd", "loss": {"temperature": 2.0}},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "trainer": {"epochs": 1, "iterations": 6, "batch_size": 4, "device": "cpu", "threads": 1, "log_every": 3},
    }


def test_cached_training_equals_live_training_and_never_runs_the_teacher(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path / "home"))
    gguf = tiny_gguf(tmp_path / "teacher")[0]
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config(gguf)))
    rc, out, err = cli("cache-teacher", str(path), "--out", str(tmp_path / "cache"), "--dtype", "float32")
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "cache") and "teacher cache" in err  # the progress bar
    rc, _, err = cli("train", str(path), "--out", str(tmp_path / "live"))
    assert rc == 0, err

    def never(*args, **kwargs):
        raise AssertionError("the teacher's forward ran")
    with monkeypatch.context() as patch:
        patch.setattr(transformers.LlamaForCausalLM, "forward", never)
        rc, _, err = cli("train", str(path), f"teacher.cache={tmp_path / 'cache'}", "--out", str(tmp_path / "cached"))
    assert rc == 0, err
    live, cached = read_metrics(tmp_path / "live")[-1], read_metrics(tmp_path / "cached")[-1]
    for key in ("train_loss", "val_ppl", "test_ppl", "val_kl", "test_agree"):
        assert cached[key] == pytest.approx(live[key], rel=1e-6), key

    bigger = yaml.safe_load(path.read_text())
    bigger["data"]["options"]["block_size"] = 8
    path.write_text(yaml.safe_dump(bigger))
    rc, _, err = cli("train", str(path), f"teacher.cache={tmp_path / 'cache'}", "--out", str(tmp_path / "refused"))
    assert rc == 2 and "was built for another block_size" in err and "data.options.block_size" in err


def test_a_run_whose_teacher_cache_is_missing_builds_it_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path / "home"))
    gguf = tiny_gguf(tmp_path / "teacher")[0]
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config(gguf, cache=str(tmp_path / "new-cache"))))
    rc, _, err = cli("train", str(path), "trainer.iterations=2", "--out", str(tmp_path / "run"))
    assert rc == 0, err
    assert "holds no cache yet: running the teacher once" in err and "teacher cache" in err
    manifest = json.loads((tmp_path / "new-cache" / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and sorted(manifest["splits"]) == ["test", "train", "val"]
