"""task: causal_lm end to end through `pcdistill train`: a teacher run, then a PCD student; metrics against a
recomputation from the exported hf/ folders, tokenizer reuse and mismatch, resume, eval, refused configs."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from pcdistill.cli import main
from pcdistill.config import ConfigError, from_dict
from pcdistill.engine.records import read_metrics
from pcdistill.engine.trainer import train

DATA = {"name": "python_stdlib", "val_fraction": 0.15,
        "options": {"block_size": 32, "vocab_size": 300, "max_files": 24, "max_chars": 1500, "test_fraction": 0.15}}
TEACHER = {
    "task": "causal_lm", "data": DATA,
    "model": {"name": "llama", "options": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "num_key_value_heads": 2}},
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
    "schedule": {"name": "constant"},
    "trainer": {"epochs": 2, "batch_size": 8, "device": "cpu", "threads": 1, "log_every": 20},
}


def student(teacher_dir, **sections) -> dict:
    """A GPT-2 student (tied input/output embeddings) distilled with PCD from the run in ``teacher_dir``."""
    cfg = TEACHER | {"model": {"name": "gpt2", "options": {"n_embd": 16, "n_layer": 1, "n_head": 2}},
                     "teacher": {"name": "llama", "path": str(teacher_dir)},
                     "distill": {"method": "pcd", "loss": {"temperature": 1.0, "stages": 3}},
                     "trainer": TEACHER["trainer"] | {"epochs": 1}}
    return cfg | sections


def write(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal_lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PCDISTILL_CACHE", str(tmp / "cache"))
        teacher = cli("train", write(tmp / "teacher.yaml", TEACHER), "--out", str(tmp / "teacher"))
        assert teacher[0] == 0, teacher[2][-2000:]
        pcd = cli("train", write(tmp / "pcd.yaml", student(tmp / "teacher")), "--out", str(tmp / "pcd"))
        assert pcd[0] == 0, pcd[2][-2000:]
        yield {"tmp": tmp, "teacher": teacher, "pcd": pcd, "mp": mp}


def test_train_prints_progress_and_final_test_perplexity(runs):
    rc, out, err = runs["pcd"]
    assert "epoch 1/1" in err  # the tqdm bar
    assert "Loading weights" not in err and "Writing model shards" not in err  # transformers' bars are hidden
    tokenizer = json.loads((runs["tmp"] / "teacher" / "tokenizer" / "tokenizer.json").read_text())
    tokens = len(tokenizer["model"]["vocab"])  # the specials are in it too
    header = f"causal_lm: tokenizer {runs['tmp'] / 'teacher' / 'tokenizer'} (the teacher's; {tokens} tokens); " \
             f"vocabulary: student {tokens}, teacher {tokens}; train "
    assert header in err, err[:2000]
    steps = int(err.split(header)[1].split(" steps per epoch")[0].rsplit(" ", 1)[1])
    assert steps == read_metrics(runs["tmp"] / "pcd")[-1]["step"]  # one epoch
    last = read_metrics(runs["tmp"] / "pcd")[-1]
    assert f"final-epoch test_ppl: {last['test_ppl']:.2f}" in out
    assert out.strip().splitlines()[-1].startswith("best test_ppl")
    folder = runs["tmp"] / "pcd"
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "checkpoints/last.pt", "hf/config.json",
                 "hf/model.safetensors", "hf/tokenizer.json", "tokenizer/tokenizer.json"):
        assert (folder / name).is_file(), name
    assert any((folder / "tensorboard").iterdir())


def test_teacher_reports_perplexity_only_and_students_agreement_and_kl(runs):
    teacher = read_metrics(runs["tmp"] / "teacher")[-1]
    assert {k for k in teacher if k.startswith("test_")} == {"test_ppl"}
    pcd = read_metrics(runs["tmp"] / "pcd")[-1]
    assert {k for k in pcd if k.startswith("test_")} == {"test_ppl", "test_agree", "test_kl"}
    assert set(pcd) >= {"train_ce", "train_pcd"}
    assert pcd["test_ppl"] > 1 and 0 <= pcd["test_agree"] <= 100 and pcd["test_kl"] > 0


def _test_blocks(tokenizer, block_size: int) -> torch.Tensor:
    """The test split's blocks, from the corpus and the tokenizer directly: documents joined by eos."""
    from pcdistill.data.text import build_corpus
    options = {k: v for k, v in DATA["options"].items() if k not in ("block_size", "vocab_size")}
    docs = build_corpus("python_stdlib", val_fraction=DATA["val_fraction"], **options).test
    ids = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    return torch.tensor(ids[:n * block_size]).view(n, block_size)


@torch.no_grad()
def test_metrics_equal_a_recomputation_from_the_saved_hf_models(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = runs["tmp"]
    tokenizer = AutoTokenizer.from_pretrained(tmp / "pcd" / "tokenizer")
    s = AutoModelForCausalLM.from_pretrained(tmp / "pcd" / "hf").eval()
    t = AutoModelForCausalLM.from_pretrained(tmp / "teacher" / "hf").eval()
    assert s.lm_head.weight is s.transformer.wte.weight  # GPT-2's tie survived the export
    ce = kl = agree = count = 0.0
    for block in _test_blocks(tokenizer, DATA["options"]["block_size"]):
        ls = torch.log_softmax(s(block[None]).logits[0, :-1].double(), -1)
        lt = torch.log_softmax(t(block[None]).logits[0, :-1].double(), -1)
        for i in range(len(block) - 1):  # position i predicts token i + 1
            ce -= ls[i, block[i + 1]].item()
            kl += (lt[i].exp() * (lt[i] - ls[i])).sum().item()
            agree += float(ls[i].argmax() == lt[i].argmax())
            count += 1
    last = read_metrics(tmp / "pcd")[-1]
    assert last["test_ppl"] == pytest.approx(math.exp(ce / count), rel=1e-4)
    assert last["test_kl"] == pytest.approx(kl / count, rel=1e-4)
    assert last["test_agree"] == pytest.approx(100 * agree / count, abs=1e-9)


def test_student_reuses_the_teachers_tokenizer(runs):
    from pcdistill.lm.tokenizer import load_tokenizer, tokenizer_difference
    tmp = runs["tmp"]
    teacher, pcd = load_tokenizer(tmp / "teacher" / "tokenizer"), load_tokenizer(tmp / "pcd" / "tokenizer")
    assert tokenizer_difference(teacher, pcd) is None
    assert len(list((tmp / "cache" / "tokenizers").iterdir())) == 1  # trained once, by the teacher run
    assert json.loads((tmp / "pcd" / "hf" / "config.json").read_text())["vocab_size"] == len(teacher)


def test_a_teacher_with_another_tokenizer_is_refused(runs):
    from pcdistill.lm.tokenizer import train_tokenizer
    tmp = runs["tmp"]
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 280, tmp / "other_tok")
    cfg = student(tmp / "teacher")
    cfg["data"] = DATA | {"options": DATA["options"] | {"tokenizer": str(tmp / "other_tok")}}
    rc, _, err = cli("train", write(tmp / "mismatch.yaml", cfg), "--out", str(tmp / "mismatch"))
    assert rc == 2 and "tokenizer" in err and "differ" in err and "teacher vs student" in err
    assert not (tmp / "mismatch" / "checkpoints").exists()


def test_resume_after_epoch_one_equals_the_uninterrupted_run(runs):
    tmp = runs["tmp"]
    short = TEACHER | {"trainer": TEACHER["trainer"] | {"epochs": 1}}
    assert cli("train", write(tmp / "short.yaml", short), "--out", str(tmp / "short"))[0] == 0
    rc, out, err = cli("train", "--resume", str(tmp / "short"), "trainer.epochs=2")
    assert rc == 0, err[-2000:]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(tmp / "short")) == drop(read_metrics(tmp / "teacher"))
    from safetensors.torch import load_file
    a, b = load_file(tmp / "short" / "hf" / "model.safetensors"), load_file(tmp / "teacher" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_of_a_run_folder_gives_its_final_perplexity(runs):
    rc, out, err = cli("eval", str(runs["tmp"] / "teacher"))
    assert rc == 0, err[-2000:]
    last = read_metrics(runs["tmp"] / "teacher")[-1]
    assert f"test: ppl {last['test_ppl']:.2f}" in out and f"val: ppl {last['val_ppl']:.2f}" in out


def test_eval_of_a_distillation_config_evaluates_its_teacher(runs):
    rc, out, err = cli("eval", str(runs["tmp"] / "pcd.yaml"))
    assert rc == 0, err[-2000:]
    last = read_metrics(runs["tmp"] / "teacher")[-1]  # the teacher run's own final evaluation
    assert f"test: ppl {last['test_ppl']:.2f}" in out and f"val: ppl {last['val_ppl']:.2f}" in out
    assert out.splitlines()[0] == f"the teacher of {runs['tmp'] / 'pcd.yaml'}: {runs['tmp'] / 'teacher'} (teacher.path)"


def test_eval_of_a_run_uses_the_tokenizer_it_was_trained_with(runs, tmp_path):
    from pcdistill.lm.tokenizer import train_tokenizer
    run = tmp_path / "pcd"  # the student's tokenizer is its teacher's; its data section would train another
    for name in ("config.yaml", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes((runs["tmp"] / "pcd" / name).read_bytes())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["options"]["vocab_size"] = 280
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = cli("eval", str(run))
    assert rc == 0, err[-2000:]
    last = read_metrics(runs["tmp"] / "pcd")[-1]
    assert f"test: ppl {last['test_ppl']:.2f}" in out and f"val: ppl {last['val_ppl']:.2f}" in out
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 280, tmp_path / "other_tok")
    rc, _, err = cli("eval", str(run), f"data.options.tokenizer={tmp_path / 'other_tok'}")
    assert rc == 2 and "shape mismatch" in err and "the tokenizer it was trained with" in err, err[-2000:]


def test_a_missing_teacher_folder_is_said_not_to_exist(runs, tmp_path):
    nope = tmp_path / "nope"
    config = write(tmp_path / "pcd.yaml", student(nope))
    for command in (("train", config, "--out", str(tmp_path / "s")), ("eval", config)):
        rc, out, err = cli(*command)
        assert rc == 2 and f"teacher.path {str(nope)!r} does not exist" in err and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="teacher.path '.*nope' does not exist"):  # the Python API too
        train(from_dict(student(nope)), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_base_install_is_told_to_install_the_lm_extra(tmp_path, monkeypatch):
    for module in ("transformers", "tokenizers"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    rc, out, err = cli("train", write(tmp_path / "t.yaml", TEACHER), "--out", str(tmp_path / "t"))
    assert rc == 2 and "Traceback" not in err and "pip install 'pcdistill[lm]'" in err, err[-2000:]
    assert "No module named" in err or "import of" in err  # which package is missing
    assert not (tmp_path / "t").exists()


def test_load_model_rebuilds_a_run_from_its_weights_file(runs):
    from pcdistill import load_model
    from pcdistill.lm.models import create_causal_lm
    run = runs["tmp"] / "pcd"
    rebuilt, exported = load_model(run / "model.safetensors"), create_causal_lm({"path": str(run / "hf")}).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, exported(ids).logits, rtol=0, atol=0)


def test_bad_configs_are_refused_with_the_reason(runs, tmp_path):
    teacher_dir = runs["tmp"] / "teacher"
    with pytest.raises(ConfigError, match="'dist'.*no form fused"):
        from_dict(student(teacher_dir, distill={"method": "dist"}))
    with pytest.raises(ConfigError, match="teacher.path is not set"):
        from_dict(student(teacher_dir, teacher={"name": "llama"}))
    with pytest.raises(ConfigError, match="teacher.weights is for vision"):
        from_dict(student(teacher_dir, teacher={"name": "llama", "path": "x", "weights": "y"}))
    with pytest.raises(ConfigError, match="teacher.path is for task: causal_lm"):
        from_dict({"teacher": {"name": "cnn_tiny", "path": "x", "weights": "y"}})
    small = TEACHER["model"] | {"options": TEACHER["model"]["options"] | {"vocab_size": 100}}
    rc, _, err = cli("train", write(tmp_path / "small.yaml", TEACHER | {"model": small}), "--out", str(tmp_path / "s"))
    assert rc == 2 and "vocab_size=100 is smaller than the tokenizer's" in err
    rc, _, err = cli("train", write(tmp_path / "kind.yaml", student(teacher_dir, teacher={"name": "qwen2", "path": str(
        teacher_dir)})), "--out", str(tmp_path / "k"))
    assert rc == 2 and "holds a 'llama' model" in err
    for override, words in (("model.name=lama", "model.name 'lama' is not a causal LM (did you mean 'llama'?)"),
                            ("data.options.blocksize=8", "(did you mean 'block_size'?); data.options takes block_size, "
                             "vocab_size, tokenizer (the tokenizer and the blocks) and the options of corpus "
                             "'python_stdlib': test_fraction, max_files")):
        rc, _, err = cli("train", write(tmp_path / "t.yaml", TEACHER), override, "--out", str(tmp_path / "t"))
        assert rc == 2 and words in err, err
    (tmp_path / "bare").mkdir()
    rc, _, err = cli("train", write(tmp_path / "bare.yaml", student(tmp_path / "bare")), "--out", str(tmp_path / "b"))
    assert rc == 2 and "holds no tokenizer" in err


def test_the_vision_path_imports_no_language_model_library():
    code = ("import sys, pcdistill.tasks, pcdistill.tasks.classification, pcdistill.cli; "
            "bad = [m for m in ('transformers', 'tokenizers') if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_two_process_ddp_matches_one_process(runs):
    from safetensors.torch import load_file

    from tests.helpers import run_two_processes
    tmp = runs["tmp"]
    per_rank = 4
    no_dropout = {"n_embd": 16, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = student(tmp / "teacher", model={"name": "gpt2", "options": no_dropout},  # dropout draws differ per rank
                     trainer=TEACHER["trainer"] | {"iterations": 3, "batch_size": per_rank})
    run_two_processes("ddp_worker.py", json.dumps(config), str(tmp / "ddp"),
                      env={"PCDISTILL_CACHE": str(tmp / "ddp_cache")})  # ids encoded by rank 0
    rank0, rank1 = load_file(tmp / "ddp" / "rank0.safetensors"), load_file(tmp / "ddp" / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = config | {"trainer": config["trainer"] | {"batch_size": 2 * per_rank}}
    summary = train(from_dict(single), tmp / "single")
    for key, value in summary.student.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)
    ddp, one = read_metrics(tmp / "ddp")[-1], read_metrics(tmp / "single")[-1]
    assert ddp["world_size"] == 2
    for key in ("val_ppl", "test_ppl", "test_kl"):  # eval shards summed over ranks
        assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
    assert ddp["test_agree"] == pytest.approx(one["test_agree"], abs=0.1)  # a near-tied top-1 may flip


def test_tune_chooses_the_lowest_validation_perplexity(runs, tmp_path):
    from pcdistill.evidence.tune import tune
    tmp = runs["tmp"]
    runs["mp"].setenv("PCDISTILL_CACHE", str(tmp / "cache"))
    alpha, rows = tune(student(tmp / "teacher"), tmp_path / "tune", grid=(0.25, 4.0), log=lambda *a: None)
    ppl = {row["scale"]: row["val_ppl"] for row in rows}
    assert all(v > 1 for v in ppl.values())
    assert alpha == min(ppl, key=ppl.get)  # lower perplexity wins, not the higher
    for row in rows:  # each value is its run's final-epoch val_ppl
        assert row["val_ppl"] == read_metrics(row["run_dir"])[-1]["val_ppl"]


def test_resume_with_more_iterations_goes_on_inside_the_cut_short_epoch(runs):
    tmp = runs["tmp"]
    steps = read_metrics(tmp / "teacher")[-1]["step"]  # of the uninterrupted two-epoch run
    cut = TEACHER | {"trainer": TEACHER["trainer"] | {"iterations": 2}}
    assert cli("train", write(tmp / "cut.yaml", cut), "--out", str(tmp / "cut"))[0] == 0
    rc, _, err = cli("train", "--resume", str(tmp / "cut"), f"trainer.iterations={steps}")
    assert rc == 0, err[-2000:]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(tmp / "cut")) == drop(read_metrics(tmp / "teacher"))
    from safetensors.torch import load_file
    a, b = load_file(tmp / "cut" / "hf" / "model.safetensors"), load_file(tmp / "teacher" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
