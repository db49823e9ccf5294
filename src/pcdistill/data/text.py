"""Text corpora for language-model distillation: lists of documents, split into train/val/test by file.

    splits = build_corpus("python_stdlib", max_files=200)
    print(splits.describe())
    splits.train[0].path, splits.train[0].text

Registered corpora:

* `python_stdlib`: the `.py` files of the running interpreter's standard library, nothing to download.
* `text`: a user's `.txt` files (one document each) and `.jsonl` files (one document per line).

A document's split is a pure function of its id (`Document.path`): the first 8 bytes of
sha256(id as UTF-8), read big-endian, divided by 2**64 give u in [0, 1); u < test_fraction is test,
u < test_fraction + val_fraction is val, the rest train. So the partition is the same on every run,
rank and machine holding the same files, and adding a file never moves another one.
This module imports neither tokenizers nor transformers (the vision path imports pcdistill.data).
"""
from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pcdistill.data.base import DatasetError
from pcdistill.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Document:
    """One document: `path`, its id (a relative path, `file.jsonl:LINE` for a jsonl record), and `text`."""

    path: str
    text: str


@dataclass
class TextSplits:
    """The train/val/test documents of a corpus, and what was skipped while reading it (id lists)."""

    name: str
    train: list[Document]
    val: list[Document]
    test: list[Document]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs: files and characters per split, and the skipped counts."""
        parts = []
        for split in SPLITS:
            docs = getattr(self, split)
            parts.append(f"{split} {len(docs)} docs {sum(len(d.text) for d in docs):,} chars")
        skipped = ", ".join(f"{len(ids)} {why}" for why, ids in self.skipped.items() if ids)
        return f"{self.name}: " + "; ".join(parts) + (f"; skipped {skipped}" if skipped else "")


def split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' for a document id (see the module docstring for the rule)."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


CORPORA: Registry[Callable[..., TextSplits]] = Registry("corpus")


def register_corpus(name: str) -> Callable[[Callable[..., TextSplits]], Callable[..., TextSplits]]:
    """Decorator registering a corpus builder under `name`; its keyword-only parameters are its options."""
    return CORPORA.register(name)


def list_corpora() -> list[str]:
    """Names of the registered corpora, sorted."""
    return CORPORA.names()


def corpus_options(name: str) -> list[str]:
    """The options of corpus `name` (its builder's parameters); an unknown corpus is a `DatasetError`."""
    try:
        return list(inspect.signature(CORPORA.get(name)).parameters)
    except ValueError as err:
        raise DatasetError(str(err)) from None


def build_corpus(name: str, **options) -> TextSplits:
    """The train/val/test documents of corpus `name`; an unknown option is a `DatasetError`."""
    known = corpus_options(name)
    builder = CORPORA.get(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for corpus {name!r}; its options are: {', '.join(known)}"
        )
    return builder(**options)


def _check_fractions(name: str, val_fraction: float, test_fraction: float) -> None:
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise DatasetError(f"{key} must lie in [0, 1) for corpus {name!r}, got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must be < 1 for corpus {name!r} (train needs files), "
            f"got {val_fraction} + {test_fraction}"
        )


def _check_positive(name: str, key: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DatasetError(f"{key} must be a positive integer or None for corpus {name!r}, got {value!r}")


def _split(name: str, docs: list[Document], val_fraction: float, test_fraction: float,
           skipped: dict[str, list[str]], unit: str) -> TextSplits:
    """Documents (sorted by id) dealt into splits by `split_of`; a split with a positive fraction may not be empty."""
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in sorted(docs, key=lambda d: d.path):
        out[split_of(doc.path, val_fraction, test_fraction)].append(doc)
    fractions = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    empty = [split for split in SPLITS if fractions[split] > 0 and not out[split]]
    if empty:
        counts = ", ".join(f"{split} {len(out[split])}" for split in SPLITS)
        raise DatasetError(
            f"corpus {name!r}: the {' and '.join(empty)} split(s) got no {unit} of {len(docs)} ({counts}; "
            f"val_fraction {val_fraction}, test_fraction {test_fraction}); use more {unit}s, a larger "
            f"fraction, or fraction 0 for a split you do not need"
        )
    return TextSplits(name, out["train"], out["val"], out["test"], skipped)


# ----------------------------------------------------------------------------------------------
# python_stdlib

# Test suites are excluded: their files repeat fixtures and generated cases (near-duplicates that
# would leak across splits), and lib2to3/tests/data holds deliberately broken or non-UTF-8 sources.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Relative posix paths of the stdlib `.py` files, sorted, without the `STDLIB_EXCLUDED_DIRS` folders."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        found.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(found)


@register_corpus("python_stdlib")
def python_stdlib(*, val_fraction: float = 0.05, test_fraction: float = 0.05, max_files: int | None = None,
                  max_chars: int | None = None, seed: int = 0) -> TextSplits:
    """The `.py` files of `sysconfig.get_paths()["stdlib"]` (one document each, id its relative path).

    Excluded folders (at any depth): site-packages and dist-packages (not the stdlib), test, tests and
    idle_test (test suites: the regression suite `test/`, `unittest/test`, `ctypes/test`,
    `tkinter/test`, `distutils/tests`, `lib2to3/tests` with its test data, `idlelib/idle_test`)
    because test files repeat fixtures; idlelib and lib2to3 themselves are kept. Files that are not
    UTF-8 and empty files are skipped and counted in `skipped`. `max_files` keeps a stable subset
    for quick runs: the files with the smallest sha256(f"{seed}:{path}") (a larger `max_files`
    keeps a superset); `max_chars` truncates each file to its first `max_chars` characters.
    """
    name = "python_stdlib"
    _check_fractions(name, val_fraction, test_fraction)
    _check_positive(name, "max_files", max_files)
    _check_positive(name, "max_chars", max_chars)
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = stdlib_files(root)
    if not paths:
        raise DatasetError(f"corpus {name!r}: no .py files under the standard library folder {root}")
    if max_files is not None:
        paths = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())[:max_files]
    docs, skipped = [], {"not UTF-8": [], "empty": []}
    for rel in paths:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["not UTF-8"].append(rel)
            continue
        if not text.strip():
            skipped["empty"].append(rel)
            continue
        docs.append(Document(rel, text[:max_chars] if max_chars else text))
    return _split(name, docs, val_fraction, test_fraction, skipped, "file")


# ----------------------------------------------------------------------------------------------
# text: the user's .txt / .jsonl files

TEXT_EXTENSIONS = (".txt", ".jsonl")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path} is not UTF-8: invalid byte 0x{data[err.start]:02x} at byte offset {err.start} "
            f"({err.reason}); re-encode it as UTF-8 (e.g. iconv -t UTF-8)"
        ) from None


def _matched_files(files: list[str], root: Path) -> list[Path]:
    """The files the globs match (recursive `**`), in glob order, duplicates dropped."""
    if isinstance(files, str) or not files or not all(isinstance(f, str) for f in files):
        raise DatasetError(f"corpus 'text' needs files: a non-empty list of globs of .txt/.jsonl files, got {files!r}")
    seen: dict[Path, None] = {}
    for pattern in files:
        full = pattern if os.path.isabs(pattern) else str(root / pattern)
        if not glob.has_magic(pattern):
            if not os.path.isfile(full):
                raise DatasetError(f"corpus 'text': file {full} not found (from files entry {pattern!r})")
            seen.setdefault(Path(full).resolve())
            continue
        matches = sorted(m for m in glob.glob(full, recursive=True) if os.path.isfile(m))
        if not matches:
            raise DatasetError(f"corpus 'text': the glob {pattern!r} matches no files (searched {full})")
        for m in matches:
            seen.setdefault(Path(m).resolve())
    return list(seen)


def _read_jsonl(path: Path, doc_id: str, text_field: str) -> list[Document]:
    docs = []
    # "\n" only: str.splitlines also splits at U+2028 and others, which JSON strings may hold raw.
    for number, line in enumerate(_decode(path, path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) hold no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetError(
                f"{path}, line {number}: expected a JSON object with a string field {text_field!r} "
                f"(option text_field), got {keys}"
            )
        if not isinstance(record[text_field], str):
            raise DatasetError(
                f"{path}, line {number}: field {text_field!r} must be a string, got {type(record[text_field]).__name__}"
            )
        docs.append(Document(f"{doc_id}:{number}", record[text_field]))
    return docs


@register_corpus("text")
def text(*, files: list[str], root: str | None = None, text_field: str = "text", val_fraction: float = 0.05,
         test_fraction: float = 0.05, max_chars: int | None = None) -> TextSplits:
    """The user's `.txt` files (each one document) and `.jsonl` files (each non-blank line a JSON object
    whose `text_field` is one document, id `file.jsonl:LINE`, LINE counted from 1).

    `files` are globs (`**` recursive), relative to `root` when given. Ids are paths relative to
    `root` when given (every file must lie inside it), else to the deepest folder holding all the
    files, so moving a corpus folder keeps its split. A glob matching nothing, a missing file, an
    empty file, an unsupported extension, text that is not UTF-8 (with the byte offset) and a jsonl
    line that is not JSON or lacks the field (file and line) are `DatasetError`s.
    """
    name = "text"
    _check_fractions(name, val_fraction, test_fraction)
    _check_positive(name, "max_chars", max_chars)
    base = Path(root).resolve() if root is not None else Path.cwd()
    paths = _matched_files(files, base)
    for path in paths:
        if path.suffix not in TEXT_EXTENSIONS:
            raise DatasetError(
                f"corpus 'text': unsupported file {path} (extension {path.suffix or '(none)'!r}); "
                f"supported: .txt (one document per file), .jsonl (one JSON object per line, field {text_field!r})"
            )
        if root is not None and not path.is_relative_to(base):
            raise DatasetError(f"corpus 'text': file {path} lies outside root {base}")
    anchor = base if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    docs = []
    for path in paths:
        doc_id = path.relative_to(anchor).as_posix()
        if path.suffix == ".txt":
            found = [Document(doc_id, _decode(path, path.read_bytes()))]
        else:
            found = _read_jsonl(path, doc_id, text_field)
        if not any(d.text.strip() for d in found):
            raise DatasetError(f"corpus 'text': {path} is empty (no text" + (" in any line)" if path.suffix == ".jsonl" else ")"))
        docs.extend(Document(d.path, d.text[:max_chars]) if max_chars else d for d in found)
    unit = "document" if any(p.suffix == ".jsonl" for p in paths) else "file"
    return _split(name, docs, val_fraction, test_fraction, {}, unit)
