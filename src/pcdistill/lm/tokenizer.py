"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), saved as `transformers` tokenizer folders.

    tok = train_tokenizer((d.text for d in splits.train), vocab_size=8192, path="runs/tok")
    tok = load_tokenizer("runs/tok")            # or transformers.AutoTokenizer.from_pretrained("runs/tok")
    check_same_tokenizer("teacher_folder", tok)  # before distilling: teacher and student must share it

Byte-level: every string encodes (no unknown token) and `decode(encode(x)) == x` exactly. The special
tokens are `<|endoftext|>` (bos and eos, as GPT-2) and `<|pad|>`; encoding adds no special token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
MIN_VOCAB = 259  # 256 byte tokens, the 2 specials and at least one merge


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path):
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts` (the train split only) and
    save it with `save_pretrained(path)`; returns the `transformers.PreTrainedTokenizerFast`.

    Ids 0 and 1 are `<|endoftext|>` and `<|pad|>`, then the 256 bytes, then the merges. The same
    texts in the same order give the same tokenizer. A small corpus may stop with fewer merges
    than asked for: `len(tokenizer)` is then below `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens "
            f"+ at least one merge), got {vocab_size!r}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,  # the default cleanup rewrites " ." and would break round trips
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer saved in folder `path` (by `train_tokenizer` or any `save_pretrained`), from local files only."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} not found; expected a folder written by save_pretrained "
            f"(tokenizer.json, tokenizer_config.json), e.g. by pcdistill.lm.tokenizer.train_tokenizer"
        )
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: expected tokenizer.json and tokenizer_config.json "
            f"(found: {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many types (OSError, ValueError, JSON errors)
        raise ValueError(f"could not load the tokenizer in {folder}: {type(err).__name__}: {err}") from err


def _model_state(tokenizer) -> dict:
    """The parts of a fast tokenizer that decide its ids: normalizer, pre-tokenizer and model (merges)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = dict(state.get("model") or {})
    model.pop("vocab", None)  # compared token by token, for a readable message
    return {"normalizer": state.get("normalizer"), "pre_tokenizer": state.get("pre_tokenizer"), "model": model}


def tokenizer_difference(a, b) -> str | None:
    """None when `a` and `b` map every text to the same ids, else what differs first, in words."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"vocabulary size {len(vocab_a)} vs {len(vocab_b)}"
    tokens_a = sorted(vocab_a, key=vocab_a.get)
    tokens_b = sorted(vocab_b, key=vocab_b.get)
    for i, (ta, tb) in enumerate(zip(tokens_a, tokens_b)):
        if ta != tb or vocab_a[ta] != vocab_b[tb]:
            return f"first differing token: id {vocab_a[ta]} is {ta!r} vs id {vocab_b[tb]} is {tb!r} (token #{i})"
    for role in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, role) != getattr(b, role):
            return f"{role} {getattr(a, role)} vs {getattr(b, role)}"
    if hasattr(a, "backend_tokenizer") and hasattr(b, "backend_tokenizer"):
        state_a, state_b = _model_state(a), _model_state(b)
        for part in state_a:
            if state_a[part] != state_b[part]:
                return f"same vocabulary but a different {part} (e.g. BPE merges), so texts encode differently"
    return None


def same_tokenizer(a, b) -> bool:
    """True when the two tokenizers give every text the same ids (vocabulary, special ids, merges)."""
    return tokenizer_difference(a, b) is None


def _describe(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_same_tokenizer(teacher, student) -> None:
    """Raise `ValueError` unless `teacher` (a tokenizer or its folder) and `student` are the same tokenizer.

    Distillation compares the two models' distributions token id by token id, so they must share it.
    """
    teacher_tok = load_tokenizer(teacher) if isinstance(teacher, (str, Path)) else teacher
    difference = tokenizer_difference(teacher_tok, student)
    if difference is not None:
        raise ValueError(
            f"the teacher's tokenizer ({_describe(teacher_tok)}) and the student's ({_describe(student)}) differ: "
            f"{difference} (teacher vs student); distillation needs one tokenizer for both"
        )
