"""Causal language models for the trainer (``task: causal_lm``): a Hugging Face student, an optional frozen
teacher, :class:`~pcdistill.lm.distill.CausalLMDistiller` and perplexity / agreement / KL.

    task: causal_lm
    data: {name: python_stdlib, options: {block_size: 128, vocab_size: 8192, max_files: 400}}
    model: {name: llama, options: {hidden_size: 128, num_hidden_layers: 2, ...}}   # random init
    teacher: {name: llama, path: runs/lm/teacher}                                  # a teacher run folder

``data.name`` is a corpus of :mod:`pcdistill.data.text` (``data.val_fraction`` and ``data.root`` go to it;
``data.options`` holds ``block_size``, ``vocab_size``, ``tokenizer`` and the corpus's own options).
``model.name`` is a config type (``llama``, ``gpt2``, ``qwen2``; ``model.options`` are its keys) or ``hf``
with ``model.weights`` a ``save_pretrained`` folder or a causal_lm run folder. ``teacher.path`` is a
causal_lm run folder (its ``hf/`` and ``tokenizer/``), a ``save_pretrained`` folder, a ``.gguf`` file
(model and tokenizer from it) or a ``pcdistill fetch`` name (``smollm2-135m``); ``teacher.name`` is ``hf``
or the type the folder must hold. ``teacher.cache``: a folder of the teacher's last hidden states
(:mod:`pcdistill.lm.teacher_cache`, written by ``pcdistill cache-teacher`` or here when missing), read
instead of running the teacher; one built for another teacher, tokenizer, corpus or block size is refused.

Tokenizer: ``data.options.tokenizer`` (a tokenizer folder, a run folder or a GGUF file), else the teacher's, else a
byte-level BPE of ``vocab_size`` trained on the train split. Trained tokenizers and encoded ids are
cached under ``$PCDISTILL_CACHE`` (default ``~/.cache/pcdistill``), keyed by a hash of the train split
and the vocabulary size, written by rank 0 before any model is built; every run copies its tokenizer
into its run folder (``tokenizer/``, and ``hf/`` with the student's ``save_pretrained``).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pcdistill.config import Config, ConfigError
from pcdistill.data.base import DatasetError
from pcdistill.data.text import build_corpus, corpus_options
from pcdistill.lm.data import TokenBlockLoader, encode_documents, token_blocks
from pcdistill.lm.distill import CausalLMDistiller
from pcdistill.lm.fetch import TEACHERS, cache_root, resolve
from pcdistill.lm.gguf import gguf_file, load_gguf_tokenizer
from pcdistill.lm.models import CONFIGS, create_causal_lm, full_logits, keep_layers, save_tied_once
from pcdistill.lm.teacher_cache import (DEFAULT_DTYPE, MANIFEST, CachedTeacher, CacheMismatch, TeacherCache,
                                        model_sha256, tokenizer_sha256, write_teacher_cache)
from pcdistill.lm.tokenizer import load_tokenizer, tokenizer_difference, train_tokenizer
from pcdistill.registry import closest
from pcdistill.tasks.base import Task, check_loss_fits

DATA_OPTIONS = {"block_size": 128, "vocab_size": 8192, "tokenizer": None}  # ours; the rest go to the corpus


def _positive_int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.options.{key} must be an integer >= {minimum}; got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Folders: a run folder of this task holds hf/ (the model) and tokenizer/
# ----------------------------------------------------------------------------------------------
def model_folder(path: str | Path) -> Path:
    path = Path(path)
    return path / "hf" if (path / "hf" / "config.json").is_file() else path


def tokenizer_folder(path: str | Path) -> Path | None:
    """The tokenizer of a run folder (``tokenizer/``) or of a save_pretrained folder; None when it holds none."""
    path = Path(path)
    for folder in (path / "tokenizer", path / "hf", path):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def must_exist(key: str, path) -> None:
    """A ConfigError naming ``key`` when its path is missing (rather than "holds no tokenizer"); a ``pcdistill
    fetch`` name not fetched yet says how to fetch it."""
    try:
        resolved = resolve(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from None
    if not resolved.exists():
        raise ConfigError(f"{key} {str(path)!r} does not exist; expected a causal_lm run folder (pcdistill train "
                          f"<config> --out DIR writes DIR/hf and DIR/tokenizer), a save_pretrained folder, a .gguf "
                          f"file or a name of `pcdistill fetch` ({', '.join(TEACHERS)})")


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" bars of transformers between the trainer's own lines."""
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_tokenizer(key: str, folder: Path):
    try:
        return load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def trained_tokenizer(docs, vocab_size: int, ctx) -> Path:
    """The folder of the byte-level BPE trained on ``docs`` (the train split), from the cache or trained now
    by rank 0 (the others wait at a barrier)."""
    digest = hashlib.sha256(f"bpe:{vocab_size}".encode())
    for doc in docs:
        digest.update(hashlib.sha256(doc.path.encode()).digest() + hashlib.sha256(doc.text.encode()).digest())
    folder = cache_root() / "tokenizers" / digest.hexdigest()[:32]
    if ctx.is_main and not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            train_tokenizer((d.text for d in docs), vocab_size, tmp)
        except ValueError as err:
            raise ConfigError(f"data.options.vocab_size: {err}") from None
        try:
            os.replace(tmp, folder)  # atomic; another run that got there first leaves an identical folder
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    return folder


def tokenizer_at(key: str, path: str):
    """(tokenizer, its source) of a GGUF file (or a folder holding one, or a ``pcdistill fetch`` name), a
    tokenizer folder, a run folder or a save_pretrained folder; None when ``path`` holds no tokenizer."""
    try:
        resolved = resolve(path)
        file = gguf_file(resolved)
        if file is not None:
            return load_gguf_tokenizer(file), file
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    folder = tokenizer_folder(resolved)
    return None if folder is None else (_load_tokenizer(key, folder), folder)


def resolve_tokenizer(cfg: Config, ctx, train_docs, vocab_size: int):
    """(tokenizer, where it came from): data.options.tokenizer, the teacher's, or one trained on ``train_docs``;
    a teacher whose tokenizer differs from the one used is refused."""
    given = cfg.data.options.get("tokenizer")
    teacher_tok = None
    if given:
        must_exist("data.options.tokenizer", given)
    if cfg.teacher.name:
        must_exist("teacher.path", cfg.teacher.path)
        teacher_tok = tokenizer_at("teacher.path", cfg.teacher.path)
        if teacher_tok is None and not given:
            raise ConfigError(f"teacher.path {cfg.teacher.path!r} holds no tokenizer (expected tokenizer/ in a "
                              f"causal_lm run folder, tokenizer.json in a save_pretrained folder, or a .gguf file); "
                              f"set data.options.tokenizer to the tokenizer folder the teacher was trained with")
    if given:
        found = tokenizer_at("data.options.tokenizer", given)
        if found is None:
            raise ConfigError(f"data.options.tokenizer {given!r} holds no tokenizer: expected a folder with "
                              f"tokenizer.json and tokenizer_config.json (save_pretrained), a causal_lm run "
                              f"folder holding tokenizer/, or a .gguf file")
        tokenizer, source = found
        if teacher_tok is not None:
            difference = tokenizer_difference(teacher_tok[0], tokenizer)
            if difference is not None:
                raise ConfigError(f"the teacher's tokenizer ({teacher_tok[1]}) and data.options.tokenizer "
                                  f"({source}) differ: {difference} (teacher vs student); distillation compares "
                                  f"the two models token id by token id, so they must share one tokenizer")
        return tokenizer, source
    if teacher_tok is not None:
        return teacher_tok
    folder = trained_tokenizer(train_docs, vocab_size, ctx)
    return _load_tokenizer("tokenizer", folder), folder


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def pretrained(section: str, name: str, path: str, tokens: int, key: str | None = None) -> nn.Module:
    """The model of a save_pretrained (or run) folder, checked against ``name`` and the tokenizer's size."""
    key = key or ("teacher.path" if section == "teacher" else "model.weights")
    must_exist(key, path)
    folder = model_folder(path)
    try:
        with quiet_transformers():
            model = create_causal_lm({"path": str(folder)})
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError(f"{key}: {err}") from None
    kind = getattr(model.config, "model_type", None)
    if name != "hf" and kind != name:
        raise ConfigError(f"{key} {str(folder)!r} holds a {kind!r} model, but {section}.name is {name!r}; set "
                          f"{section}.name: {kind} (or hf, which takes any causal LM folder)")
    if _vocab_size(model) < tokens:
        raise ConfigError(f"{key} {str(folder)!r}: its vocabulary has {_vocab_size(model)} entries, fewer than the "
                          f"{tokens} tokens of the tokenizer; the model and the tokenizer must belong together")
    return model


def check_model_name(name: str) -> None:
    if name != "hf" and name not in CONFIGS:
        raise ConfigError(f"model.name {name!r} is not a causal LM{closest(str(name), [*CONFIGS, 'hf'])}: use a "
                          f"config type ({', '.join(CONFIGS)}) with model.options for a random init, or hf with "
                          f"model.weights: FOLDER")


def layers_init(name: str, init: dict, tokens: int) -> nn.Module:
    """``model.init``: a student with the embeddings, final norm, output layer and ``init["layers"]`` of the
    model at ``init["from"]`` (prune-then-distill)."""
    source = pretrained("model", name, init["from"], tokens, key="model.init.from")
    try:
        return keep_layers(source, init["layers"])
    except ValueError as err:
        raise ConfigError(f"model.init.layers: {err}") from None


def random_init(name: str, options: dict, tokenizer) -> nn.Module:
    check_model_name(name)
    tokens = len(tokenizer)
    options = dict(options)
    vocab = options.pop("vocab_size", tokens)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < tokens:
        raise ConfigError(f"model.options.vocab_size={vocab!r} is smaller than the tokenizer's {tokens} tokens; "
                          f"remove it (the size comes from the tokenizer) or set a larger one (a padded vocabulary)")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    try:
        return create_causal_lm({"config": name} | ids | options | {"vocab_size": vocab})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options: {err}") from None


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def _blocks(split: str, docs, tokenizer, block_size: int, ctx) -> torch.Tensor:
    if not docs:
        raise ConfigError(f"the {split} split of the corpus has no documents; use more files or a larger fraction")
    cache = cache_root() / "ids"
    if ctx.is_main:  # rank 0 encodes and caches; the others read the cache after the barrier
        ids = encode_documents(docs, tokenizer, cache_dir=cache)
    ctx.barrier()
    if not ctx.is_main:
        ids = encode_documents(docs, tokenizer, cache_dir=cache)
    try:
        return token_blocks(ids, block_size)
    except ValueError as err:
        raise ConfigError(f"the {split} split ({len(docs)} documents): {err}") from None


def require_lm_extra() -> None:
    """A ConfigError naming the ``lm`` extra when transformers or tokenizers is missing (a base install)."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"task: causal_lm needs the language-model extra ({err}): pip install 'pcdistill[lm]' "
                          f"(in a clone: pip install -e '.[lm]')") from None


@dataclass
class TextData:
    """A config's tokenizer and the token blocks of its splits, as every causal_lm run and cache sees them."""
    tokenizer: object
    tokenizer_source: Path
    block_size: int
    blocks: dict[str, torch.Tensor]  # train, and val / test when the corpus has them
    corpus: dict  # name and options, for messages


def text_data(cfg: Config, ctx) -> TextData:
    options = dict(cfg.data.options)
    ours = {key: options.pop(key, default) for key, default in DATA_OPTIONS.items()}
    try:
        corpus_own = [k for k in corpus_options(cfg.data.name) if k not in ("val_fraction", "root")]
    except DatasetError as err:
        raise DatasetError(f"data: {err}") from None
    unknown = sorted(set(options) - set(corpus_own))
    if unknown:
        raise ConfigError(f"data.options: unknown option(s) {', '.join(map(repr, unknown))}"
                          f"{closest(unknown[0], [*DATA_OPTIONS, *corpus_own])}; data.options takes "
                          f"{', '.join(DATA_OPTIONS)} (the tokenizer and the blocks) and the options of corpus "
                          f"{cfg.data.name!r}: {', '.join(corpus_own)}")
    block_size = _positive_int("block_size", ours["block_size"], 2)
    vocab_size = _positive_int("vocab_size", ours["vocab_size"], 1)
    corpus_args = options | {"val_fraction": cfg.data.val_fraction}
    if cfg.data.root:
        corpus_args["root"] = cfg.data.root
    try:
        splits = build_corpus(cfg.data.name, **corpus_args)
    except DatasetError as err:
        raise DatasetError(f"data: {err}") from None
    tokenizer, tokenizer_source = resolve_tokenizer(cfg, ctx, splits.train, vocab_size)
    blocks = {split: _blocks(split, docs, tokenizer, block_size, ctx)
              for split, docs in (("train", splits.train), ("val", splits.val), ("test", splits.test))
              if docs or split == "train"}
    return TextData(tokenizer, tokenizer_source, block_size, blocks, {"name": cfg.data.name} | corpus_args)


def _cache_identity(cfg: Config, data: TextData) -> dict:
    """What a teacher cache must have been built for to serve this config."""
    try:
        teacher = {"path": cfg.teacher.path, "sha256": model_sha256(cfg.teacher.path)}
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"teacher.path: {err}") from None
    return {"teacher": teacher, "tokenizer": {"sha256": tokenizer_sha256(data.tokenizer), "size": len(data.tokenizer)},
            "block_size": data.block_size, "corpus": data.corpus}


def cache_teacher(cfg: Config, ctx, out: str | Path, *, dtype: str = DEFAULT_DTYPE, batch_size: int = 8,
                  data: TextData | None = None) -> Path:
    """Run the config's teacher once over its train / val / test blocks and store its last hidden states in
    ``out`` (:func:`pcdistill.lm.teacher_cache.write_teacher_cache`); rank 0 writes, the others wait."""
    if not cfg.teacher.name:
        raise ConfigError("cache-teacher needs a teacher: set teacher.name and teacher.path")
    data = data or text_data(cfg, ctx)
    identity = _cache_identity(cfg, data)
    if ctx.is_main:
        teacher = pretrained("teacher", cfg.teacher.name, cfg.teacher.path, len(data.tokenizer)).to(ctx.device)
        try:
            write_teacher_cache(teacher, data.blocks, out, identity=identity, dtype=dtype, batch_size=batch_size)
        except CacheMismatch as err:
            raise ConfigError(f"teacher cache: {err}") from None
    ctx.barrier()
    return Path(out)


def cached_teacher(cfg: Config, ctx, data: TextData) -> CachedTeacher:
    """The teacher of ``teacher.cache``, checked against the config (built first when the folder has none)."""
    folder = Path(cfg.teacher.cache)
    if not (folder / MANIFEST).is_file():
        if ctx.is_main:
            print(f"teacher.cache {folder} holds no cache yet: running the teacher once over the "
                  f"{sum(len(b) for b in data.blocks.values())} blocks of {', '.join(data.blocks)} "
                  f"(`pcdistill cache-teacher` does this ahead of training)", file=sys.stderr)
        cache_teacher(cfg, ctx, folder, data=data)
    try:
        cache = TeacherCache(folder)
        cache.check(_cache_identity(cfg, data), data.blocks,
                    describe={"teacher": "teacher.path", "tokenizer": "data.options.tokenizer or the teacher's",
                              "block_size": "data.options.block_size"})
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"teacher.cache: {err}") from None
    return CachedTeacher(cache)


def build(cfg: Config, ctx) -> Task:
    require_lm_extra()
    check_model_name(cfg.model.name)  # before the corpus and the tokenizer are built
    data = text_data(cfg, ctx)
    tokenizer, tokenizer_source, block_size = data.tokenizer, data.tokenizer_source, data.block_size
    tokens = len(tokenizer)

    if cfg.model.name == "hf":
        student = pretrained("model", "hf", cfg.model.weights, tokens)
    elif cfg.model.init:
        student = layers_init(cfg.model.name, cfg.model.init, tokens)
    else:
        student = random_init(cfg.model.name, cfg.model.options, tokenizer)
    save_tied_once(student)
    teacher = None
    if cfg.teacher.name:
        teacher = cached_teacher(cfg, ctx, data) if cfg.teacher.cache else \
            pretrained("teacher", cfg.teacher.name, cfg.teacher.path, tokens)
    vocab = _vocab_size(student) if teacher is None else min(_vocab_size(student), _vocab_size(teacher))
    check_loss_fits(cfg, vocab)
    try:
        module = CausalLMDistiller(student, teacher, loss=cfg.distill.method, loss_options=cfg.distill.loss,
                                   alpha=cfg.distill.alpha, ce_weight=cfg.distill.ce_weight,
                                   warmup_epochs=cfg.distill.warmup_epochs,
                                   part_gradients=False)  # the trainer only sums the entries
    except ValueError as err:
        raise ConfigError(f"distill: {err}") from None

    common = dict(seed=cfg.trainer.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    eval_batch = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
    train_blocks = data.blocks["train"]
    train_loader = TokenBlockLoader(train_blocks, batch_size=cfg.trainer.batch_size, train=True, **common)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} leaves no full batch: the train split has "
                          f"{len(train_blocks)} blocks of {block_size} tokens over {ctx.world_size} process(es)")
    eval_loaders = {split: TokenBlockLoader(blocks, batch_size=eval_batch, train=False, **common)
                    for split, blocks in data.blocks.items() if split != "train"}

    def evaluate(net: nn.Module, loader) -> dict[str, float]:
        # CE sum, tokens, top-1 agreements, KL(p_t || p_s) sum: sums, so ranks and batches add up exactly
        sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)
        for input_ids, labels in loader:
            logits = full_logits(net, input_ids)[:, :-1].float()
            target = labels[:, 1:]
            sums[0] += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            sums[1] += target.numel()
            if teacher is not None:
                t = full_logits(teacher, input_ids)[:, :-1].float()
                sums[2] += (logits.argmax(-1) == t.argmax(-1)).sum()
                log_s = logits[..., :vocab].log_softmax(-1)
                log_t = t[..., :vocab].log_softmax(-1)
                sums[3] += F.kl_div(log_s, log_t, log_target=True, reduction="sum")
        sums = ctx.all_reduce_sum(sums)
        count = max(sums[1].item(), 1.0)
        out = {"ppl": math.exp(sums[0].item() / count)}
        if teacher is not None:
            out |= {"agree": 100.0 * sums[2].item() / count, "kl": sums[3].item() / count}
        return out

    def export(net: nn.Module, out_dir: Path) -> None:
        with quiet_transformers():
            net.save_pretrained(out_dir / "hf")
        tokenizer.save_pretrained(out_dir / "hf")
        tokenizer.save_pretrained(out_dir / "tokenizer")

    if ctx.is_main:
        given = cfg.data.options.get("tokenizer")
        origin = "data.options.tokenizer" if given else "the teacher's" if teacher is not None else \
            f"a byte-level BPE of vocab_size {cfg.data.options.get('vocab_size', DATA_OPTIONS['vocab_size'])} trained " \
            f"on the train split (cached)"
        sizes = f"student {_vocab_size(student)}" + (f", teacher {_vocab_size(teacher)}" if teacher else "")
        evals = ", ".join(f"{split} {len(loader.dataset)} blocks" for split, loader in eval_loaders.items())
        print(f"causal_lm: tokenizer {tokenizer_source} ({origin}; {tokens} tokens); vocabulary: {sizes}; train "
              f"{len(train_blocks)} blocks of {block_size} tokens = {len(train_loader)} steps per epoch of "
              f"{cfg.trainer.batch_size} blocks" + (f" x {ctx.world_size} processes" if ctx.world_size > 1 else "")
              + f"; {evals}", file=sys.stderr, flush=True)

    metadata = {"task": "causal_lm", "model": cfg.model.name, "model_options": cfg.model.options,
                "init": cfg.model.init, "vocab_size": _vocab_size(student), "dataset": cfg.data.name,
                "tokenizer": str(tokenizer_source)}
    return Task(module, student, train_loader, eval_loaders, evaluate, "ppl", metadata,
                lower_is_better=("ppl", "kl"), export=export)
