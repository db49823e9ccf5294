"""Tests of the text path: corpora split by file (pcdistill.data.text), the byte-level BPE tokenizer
(pcdistill.lm.tokenizer), token blocks and their loader (pcdistill.lm.data).

References are independent: the split rule recomputed with hashlib, files walked with pathlib,
documents compared with the bytes the test wrote, loader orders with DistributedSampler's formula.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from pcdistill.data import DatasetError
from pcdistill.data.text import Document, build_corpus, list_corpora
from pcdistill.lm.data import TokenBlockLoader, encode_documents, token_blocks
from pcdistill.lm.tokenizer import check_same_tokenizer, load_tokenizer, same_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def reference_split(doc_id: str, val: float, test: float) -> str:
    u = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:16], 16) / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def by_id(splits) -> dict[str, tuple[str, str]]:
    """id -> (split, text), asserting no id is in two splits."""
    out = {}
    for split in ("train", "val", "test"):
        for doc in getattr(splits, split):
            assert doc.path not in out, f"{doc.path} in two splits"
            out[doc.path] = (split, doc.text)
    return out


# ----------------------------------------------------------------------------------------------
# python_stdlib


@pytest.fixture(scope="module")
def stdlib():
    return build_corpus("python_stdlib")


def test_registered_corpora():
    assert set(list_corpora()) >= {"python_stdlib", "text"}


def test_stdlib_finds_the_real_files(stdlib):
    docs = by_id(stdlib)
    assert "os.py" in docs and "json/decoder.py" in docs
    assert docs["os.py"][1] == (STDLIB / "os.py").read_text(encoding="utf-8")
    assert not any(part in EXCLUDED for doc_id in docs for part in Path(doc_id).parts)
    # Independent walk: every .py outside the excluded folders is read or counted as skipped.
    expected = {
        p.relative_to(STDLIB).as_posix() for p in STDLIB.rglob("*.py")
        if not EXCLUDED & set(p.relative_to(STDLIB).parts[:-1])
    }
    skipped = [i for ids in stdlib.skipped.values() for i in ids]
    assert set(docs) | set(skipped) == expected and len(docs) + len(skipped) == len(expected)
    for doc_id in stdlib.skipped["empty"]:
        assert not (STDLIB / doc_id).read_text(encoding="utf-8").strip()


def test_stdlib_split_is_stable_by_file_and_a_function_of_the_path(stdlib):
    docs = by_id(stdlib)
    assert by_id(build_corpus("python_stdlib")) == docs
    for doc_id, (split, _) in docs.items():
        assert split == reference_split(doc_id, 0.05, 0.05), doc_id
    n = len(docs)
    for split in ("val", "test"):
        share = sum(s == split for s, _ in docs.values()) / n
        assert 0.02 < share < 0.09, (split, share, n)  # 0.05 +- about 3 standard deviations at n ~ 700
    assert stdlib.train == sorted(stdlib.train, key=lambda d: d.path)
    assert "python_stdlib: train" in stdlib.describe() and "chars" in stdlib.describe()


def test_stdlib_fractions_are_options():
    splits = build_corpus("python_stdlib", val_fraction=0.2, test_fraction=0.1, max_files=60)
    for doc_id, (split, _) in by_id(splits).items():
        assert split == reference_split(doc_id, 0.2, 0.1)


def test_stdlib_max_files_is_a_stable_seeded_subset_and_max_chars_truncates():
    def ids(**kw):
        return set(by_id(build_corpus("python_stdlib", val_fraction=0.2, test_fraction=0.2, **kw)))

    small, again, large = ids(max_files=30), ids(max_files=30), ids(max_files=60)
    assert small == again and small < large and len(large) <= 60 and len(small) >= 27  # a few may be empty
    assert ids(max_files=30, seed=1) != small
    cut = build_corpus("python_stdlib", val_fraction=0.2, test_fraction=0.2, max_files=30, max_chars=100)
    for doc in cut.train + cut.val + cut.test:
        assert doc.text == (STDLIB / doc.path).read_text(encoding="utf-8")[:100]


@pytest.mark.parametrize("options, words", [
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"max_files": 0}, "max_files"),
    ({"max_chars": 1.5}, "max_chars"),
    ({"max_file": 3}, "unknown option"),
    ({"max_files": 2}, "split(s) got no file of"),
])
def test_stdlib_bad_options(options, words):
    with pytest.raises(DatasetError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        build_corpus("python_stdlib", **options)


def test_unknown_corpus():
    with pytest.raises(DatasetError, match="did you mean 'text'"):
        build_corpus("texts", files=["x.txt"])


# ----------------------------------------------------------------------------------------------
# text: .txt and .jsonl files


def write_corpus(folder: Path) -> dict[str, str]:
    """Twelve .txt files and a 30-line .jsonl; returns id -> the text written."""
    written = {}
    (folder / "books" / "deep").mkdir(parents=True)
    for i in range(12):
        rel = f"books/{'deep/' if i % 3 == 0 else ''}b{i}.txt"
        text = f"Book {i}: héllo wörld\r\n日本語 🎉 line two\n" * (i + 1)
        (folder / rel).write_bytes(text.encode("utf-8"))
        written[rel] = text
    lines = []
    for i in range(30):
        text = f"record {i}\nwith a newline, a tab\t and U+2028 \u2028 inside"
        lines.append(json.dumps({"id": i, "text": text}, ensure_ascii=False))
        written[f"notes.jsonl:{i + 1}"] = text
    (folder / "notes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def test_text_documents_read_back_exactly(tmp_path):
    written = write_corpus(tmp_path)
    splits = build_corpus("text", files=[str(tmp_path / "books/**/*.txt"), str(tmp_path / "notes.jsonl")],
                          val_fraction=0.25, test_fraction=0.25)
    docs = by_id(splits)
    assert {i: t for i, (_, t) in docs.items()} == written
    for doc_id, (split, _) in docs.items():
        assert split == reference_split(doc_id, 0.25, 0.25)
    assert all(splits.val) and all(splits.test)
    # The same corpus moved elsewhere (or given relative to root) keeps its ids, hence its split.
    moved = tmp_path / "elsewhere"
    write_corpus(moved)
    assert by_id(build_corpus("text", files=["books/**/*.txt", "notes.jsonl"], root=str(moved),
                              val_fraction=0.25, test_fraction=0.25)) == docs


def test_text_field_option_and_duplicate_globs(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)), encoding="utf-8")
    splits = build_corpus("text", files=[str(path), str(tmp_path / "*.jsonl")], text_field="body",
                          val_fraction=0.0, test_fraction=0.0)
    assert [d.text for d in splits.train] == ["doc 0", "doc 1", "doc 2"]
    assert [d.path for d in splits.train] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"]


def bad(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, data, words", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\t\n", "is empty"),
    ("empty.jsonl", b"\n\n", "is empty"),
    ("latin1.txt", "abc café".encode("latin-1"), "not UTF-8: invalid byte 0xe9 at byte offset 7"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "not UTF-8: invalid byte 0xe9 at byte offset 28"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2: not JSON"),
    ("nofield.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', r"line 3: expected a JSON object with a string field 'text'"),
    ("list.jsonl", b'["text"]\n', "line 1: expected a JSON object"),
    ("number.jsonl", b'{"text": 5}\n', "line 1: field 'text' must be a string, got int"),
    ("notes.md", b"# title\n", r"unsupported file .*notes\.md \(extension '\.md'\)"),
])
def test_text_bad_files_name_the_file(tmp_path, name, data, words):
    path = bad(tmp_path, name, data)
    with pytest.raises(DatasetError, match=words) as err:
        build_corpus("text", files=[str(path)], val_fraction=0.0, test_fraction=0.0)
    assert str(path) in str(err.value)


def test_text_bad_globs_and_options(tmp_path):
    with pytest.raises(DatasetError, match=r"the glob '.*\*\.txt' matches no files"):
        build_corpus("text", files=[str(tmp_path / "*.txt")])
    with pytest.raises(DatasetError, match=r"file .*missing\.txt not found"):
        build_corpus("text", files=[str(tmp_path / "missing.txt")])
    with pytest.raises(DatasetError, match="non-empty list of globs"):
        build_corpus("text", files=str(tmp_path / "a.txt"))
    with pytest.raises(DatasetError, match="non-empty list of globs"):
        build_corpus("text", files=[3])
    inside = tmp_path / "root"
    inside.mkdir()
    outside = bad(tmp_path, "out.txt", b"text")
    with pytest.raises(DatasetError, match="lies outside root"):
        build_corpus("text", files=[str(outside)], root=str(inside))
    bad(tmp_path, "one.txt", b"just one file")
    with pytest.raises(DatasetError, match=r"val split\(s\) got no file of 2 \(train 2, val 0, test 0"):
        build_corpus("text", files=[str(tmp_path / "*.txt")], val_fraction=0.1, test_fraction=0.0)


# ----------------------------------------------------------------------------------------------
# tokenizer

UNSEEN = "Ünïcödé ∀x∈ℝ: 日本語のテキスト, emoji 🎉🧪, tabs\tand  double  spaces .\r\nZ̤͔ͧ̑̓ äöü ß\u2028end <|endoftext|> x"


@pytest.fixture(scope="module")
def corpus():
    splits = build_corpus("python_stdlib", val_fraction=0.2, test_fraction=0.2, max_files=12, max_chars=20_000)
    return splits


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    pytest.importorskip("transformers")  # the lm extra; the corpus and loader tests need neither
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer((d.text for d in corpus.train), 400, path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_tokenizer_layout_and_round_trip(tok, tok_dir):
    from transformers import AutoTokenizer

    assert len(tok) == 400
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    ids = tok(UNSEEN, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == UNSEEN
    assert tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"] == tok.encode(
        "def f(x):\n    return x", add_special_tokens=False)
    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert auto(UNSEEN, add_special_tokens=False)["input_ids"] == ids
    code = "import os\nprint(os.path.join('a', 'b'))\n"
    assert len(tok(code)["input_ids"]) < len(code.encode())  # merges were learned: fewer ids than bytes


def test_tokenizer_is_deterministic_and_reloads_identically(corpus, tok, tok_dir, tmp_path):
    again = train_tokenizer((d.text for d in corpus.train), 400, tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    text = corpus.val[0].text
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert same_tokenizer(again, tok)
    check_same_tokenizer(str(tok_dir), again)


def test_different_tokenizers_are_told_apart(corpus, tok, tok_dir, tmp_path):
    small = train_tokenizer((d.text for d in corpus.train), 300, tmp_path / "small")
    assert not same_tokenizer(tok, small)
    with pytest.raises(ValueError, match=rf"teacher's tokenizer \('{tok_dir}'\).*vocabulary size 400 vs 300"):
        check_same_tokenizer(tok_dir, small)
    other = train_tokenizer((d.text[::-1] for d in corpus.train), 400, tmp_path / "other")
    assert not same_tokenizer(tok, other)
    with pytest.raises(ValueError, match=r"first differing token: id \d+ is '.*' vs id \d+ is '.*'"):
        check_same_tokenizer(tok, other)


def test_tokenizer_errors(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 259"):
        train_tokenizer(["abc"], 258, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nope not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load the tokenizer in .*broken"):
        load_tokenizer(broken)


# ----------------------------------------------------------------------------------------------
# ids, blocks, loader


def test_encode_documents_joins_with_eos_and_caches(corpus, tok, tmp_path, monkeypatch):
    docs = corpus.val
    ids = encode_documents(docs, tok, cache_dir=tmp_path)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert tok.decode(ids.tolist()) == "<|endoftext|>".join(d.text for d in docs)
    assert int((ids == tok.eos_token_id).sum()) == len(docs) - 1
    assert len(list(tmp_path.glob("ids-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(type(tok), "__call__", refuse)
        assert torch.equal(encode_documents(docs, tok, cache_dir=tmp_path), ids)
    changed = [Document(docs[0].path, docs[0].text + "#"), *docs[1:]]
    assert not torch.equal(encode_documents(changed, tok, cache_dir=tmp_path), ids)
    assert len(list(tmp_path.glob("ids-*.safetensors"))) == 2


def test_token_blocks():
    ids = torch.arange(103)
    blocks = token_blocks(ids, 10)
    assert blocks.shape == (10, 10) and torch.equal(blocks.flatten(), ids[:100])
    with pytest.raises(ValueError, match="9 ids make no full block of 10"):
        token_blocks(torch.arange(9), 10)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        token_blocks(ids, 0)


def blocks_of(n: int, length: int = 5) -> torch.Tensor:
    """Block i holds i * length ... i * length + length - 1, so row[0] // length names the block."""
    return torch.arange(n * length).view(n, length)


def read(loader, epoch: int, start_batch: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch, start_batch)
    batches = []
    for input_ids, labels in loader:
        assert torch.equal(input_ids, labels) and input_ids.data_ptr() != labels.data_ptr()
        assert input_ids.dtype == torch.int64 and input_ids.shape[1] == 5
        batches.append((input_ids[:, 0] // 5).tolist())
    return batches


def test_train_loader_epochs_are_seeded_permutations():
    loader = TokenBlockLoader(blocks_of(24), batch_size=4, train=True, seed=7)
    assert len(loader) == 6
    for epoch in (0, 1):
        order = [i for batch in read(loader, epoch) for i in batch]
        # DistributedSampler's shuffle: randperm(N) with a generator seeded by seed + epoch.
        expected = torch.randperm(24, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert order == expected and sorted(order) == list(range(24))
    assert read(loader, 0) == read(TokenBlockLoader(blocks_of(24), batch_size=4, train=True, seed=7), 0)
    assert read(loader, 0) != read(loader, 1)
    assert read(loader, 0) != read(TokenBlockLoader(blocks_of(24), batch_size=4, train=True, seed=8), 0)


def test_train_shards_are_disjoint_and_drop_the_last_batch():
    shards = [read(TokenBlockLoader(blocks_of(25), batch_size=3, train=True, seed=0, rank=r, world_size=2), 3)
              for r in range(2)]
    seen = [[i for batch in shard for i in batch] for shard in shards]
    assert all(len(shard) == 4 and all(len(b) == 3 for b in shard) for shard in shards)  # 12 per rank, 12 // 3
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == 12


def test_eval_loader_covers_every_block_once_in_order():
    shards = [read(TokenBlockLoader(blocks_of(25), batch_size=4, train=False, rank=r, world_size=2), 0)
              for r in range(2)]
    for r, shard in enumerate(shards):
        assert [i for batch in shard for i in batch] == list(range(r, 25, 2))
    assert len(TokenBlockLoader(blocks_of(25), batch_size=4, train=False, rank=0, world_size=2)) == 4  # 13 blocks
    assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(25))


@pytest.mark.parametrize("train", [True, False])
def test_start_batch_skips_exactly(train):
    loader = TokenBlockLoader(blocks_of(30), batch_size=4, train=train, seed=3)
    assert read(loader, 2, start_batch=3) == read(loader, 2)[3:]


def test_loader_rejects_bad_blocks():
    with pytest.raises(ValueError, match="blocks must be int64"):
        TokenBlockLoader(torch.zeros(4, 5, dtype=torch.int32), batch_size=2, train=True)


def test_text_modules_do_not_import_transformers():
    code = ("import sys, pcdistill.data, pcdistill.data.text, pcdistill.lm.data, pcdistill.lm.tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "[]"
