"""An exact teacher cache: the teacher's last hidden states of every token block, stored once, read by every student.

    write_teacher_cache(teacher, {"train": blocks, "val": val_blocks}, "runs/cache", identity=identity)
    teacher = CachedTeacher(TeacherCache("runs/cache"))     # a drop-in teacher module that never runs a forward
    CausalLMDistiller(student, teacher, loss="pcd")          # fused: teacher logits = W_t h chunk by chunk

A causal LM's logits are its output layer applied to its last hidden states (after the final norm).
Storing those (``H`` numbers a token, 576 for SmolLM2-135M) and the output layer once gives the teacher's
whole distribution over the vocabulary exactly: the fused loss (:func:`pcdistill.losses.fused_linear_distill_loss`)
computes the teacher's logits from them chunk of rows by chunk of rows, as it does with hidden states
from a live forward, so a cached step costs the output-layer matmul, not the teacher's forward.

Layout of the folder (safetensors, memory-mapped when read):

- ``manifest.json``: format, the identity the cache was built for (teacher file sha256, tokenizer, corpus,
  block size), storage dtype, hidden and vocabulary sizes, and per split its block count, the sha256 of
  its token ids and its shards;
- ``<split>-<k>.safetensors``: ``hidden`` ``(n, block_size, H)`` in the storage dtype and ``ids``
  ``(n, block_size)`` int32, the blocks ``first .. first + n - 1`` of the split;
- ``output.safetensors``: the teacher's output layer, ``weight`` ``(V, H)`` (and ``bias``) in its own dtype.

A block is found by its token ids (``CachedTeacher`` keeps a dict from the ids of every cached block to
its place), so any loader, shuffling, resume or DDP sharding reads the right hidden states, and a block
that was not cached is an error, never a silent mismatch. Shards are written one by one (temporary
name, then an atomic rename) and the manifest last: an interrupted build resumes at its first missing
shard, and a folder without a manifest is never read as a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "pcdistill-teacher-cache/1"
MANIFEST = "manifest.json"
OUTPUT = "output.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# float16 keeps 10 mantissa bits to bfloat16's 7, at the same 2 bytes: 9x smaller log-probability errors on
# SmolLM2 (README, bench/teacher_cache_dtype.py); final-norm hidden states lie far inside its range (checked)
DEFAULT_DTYPE = "float16"
SHARD_BYTES = 256 << 20  # hidden states per shard file, about


class CacheMismatch(ValueError):
    """The cache was built for another teacher, tokenizer, corpus or block size than the config's."""


def ids_sha256(blocks: torch.Tensor) -> str:
    """sha256 of the token blocks as little-endian int32 (the order and content of every block)."""
    return hashlib.sha256(blocks.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its backend definition and special token ids."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return digest.hexdigest()


def model_sha256(path: str | Path) -> str:
    """sha256 naming a teacher's weights: of its GGUF file (a ``pcdistill fetch`` name: the fetched file), or
    over the config.json and weight files of a save_pretrained folder (a causal_lm run folder: its hf/)."""
    from .fetch import file_sha256, resolve
    from .gguf import gguf_file
    resolved = resolve(path)
    file = gguf_file(resolved)
    if file is not None:
        return file_sha256(file)
    folder = resolved / "hf" if (resolved / "hf" / "config.json").is_file() else resolved
    files = sorted(p for p in folder.glob("*") if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{resolved} holds no model (no .gguf file, config.json or weight files)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _key(identity: dict, dtype: str, splits: dict[str, str]) -> str:
    text = json.dumps({"identity": identity, "dtype": dtype, "splits": splits}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _shard_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a damaged or foreign file: rewrite it
        return {}


def write_teacher_cache(teacher: nn.Module, splits: dict[str, torch.Tensor], out: str | Path, *, identity: dict,
                        dtype: str = DEFAULT_DTYPE, batch_size: int = 8,
                        hidden: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                        progress: bool = True) -> Path:
    """Run ``teacher`` once over the token blocks of each split (``{name: (N, L) int64}``) and store its last
    hidden states in ``out``; returns ``out``. ``identity`` (JSON-able: teacher, tokenizer, corpus,
    block_size) goes into the manifest and is what :meth:`TeacherCache.check` compares.

    Shards already in ``out`` with this build's key are kept (a resumed build); a finished cache for
    another identity is refused, never overwritten. ``hidden(teacher, ids)`` gives ``(B, L, H)``
    (default: :func:`pcdistill.lm.models.last_hidden_states`).
    """
    from tqdm import tqdm

    from .models import last_hidden_states, output_layer
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    out = Path(out)
    hidden = hidden or last_hidden_states
    layer = output_layer(teacher)
    if layer is None:
        raise ValueError(f"the teacher {type(teacher).__name__} has no nn.Linear output layer "
                         f"(get_output_embeddings()), so its logits cannot be recomputed from hidden states")
    weight, bias = layer
    size = int(weight.shape[1])
    split_sha = {name: ids_sha256(blocks) for name, blocks in splits.items()}
    key = _key(identity, dtype, split_sha)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("key") == key:
            return out
        raise CacheMismatch(f"{out} already holds a teacher cache built for something else (another teacher, "
                            f"tokenizer, corpus, block size or dtype); choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    length = next(iter(splits.values())).shape[1]
    per_shard = max(1, SHARD_BYTES // (length * size * DTYPES[dtype].itemsize))
    plan = [(name, first, min(per_shard, len(blocks) - first))
            for name, blocks in splits.items() for first in range(0, len(blocks), per_shard)]
    device = weight.device
    teacher.eval()
    total = sum(count for _, _, count in plan) * length
    bar = tqdm(total=total, desc="teacher cache", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    manifest_splits: dict[str, dict] = {name: {"blocks": len(blocks), "ids_sha256": split_sha[name], "shards": []}
                                        for name, blocks in splits.items()}
    for index, (name, first, count) in enumerate(plan):
        path = out / f"{name}-{first // per_shard:05d}.safetensors"
        manifest_splits[name]["shards"].append({"file": path.name, "first": first, "count": count})
        if _shard_metadata(path).get("key") == key:
            bar.update(count * length)
            continue
        ids = splits[name][first:first + count]
        parts = []
        with torch.no_grad():
            for start in range(0, count, batch_size):
                batch = ids[start:start + batch_size].to(device)
                states = hidden(teacher, batch)
                stored = states.to("cpu", DTYPES[dtype])
                if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(states).all()):
                    bar.close()
                    raise ValueError(f"the teacher's hidden states reach {states.abs().max().item():.3g}, beyond "
                                     f"{dtype}'s range; build the cache with dtype bfloat16 or float32")
                parts.append(stored)
                bar.update(batch.numel())
        _write_atomic(path, {"hidden": torch.cat(parts), "ids": ids.to(torch.int32).contiguous()},
                      {"key": key, "split": name, "first": str(first), "count": str(count)})
    bar.close()
    tensors = {"weight": weight.detach().cpu().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous()
    _write_atomic(out / OUTPUT, tensors, {"key": key})
    manifest = {"format": FORMAT, "key": key, "identity": identity, "dtype": dtype, "hidden_size": size,
                "vocab_size": int(weight.shape[0]), "block_size": int(length),
                "bytes_per_token": size * DTYPES[dtype].itemsize, "splits": manifest_splits, "output": OUTPUT}
    tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out


class TeacherCache:
    """A teacher cache folder (read-only): its manifest, memory-mapped shards and output layer."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            hint = " (an interrupted build: run `pcdistill cache-teacher` again to finish it)" \
                if self.folder.is_dir() and any(self.folder.glob("*.safetensors")) else ""
            raise FileNotFoundError(f"{self.folder} is not a teacher cache: no {MANIFEST}{hint}; build one with "
                                    f"`pcdistill cache-teacher CONFIG --out {self.folder}`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} manifest (format {self.manifest.get('format')!r})")
        for split in self.manifest["splits"].values():
            for shard in split["shards"]:
                if not (self.folder / shard["file"]).is_file():
                    raise FileNotFoundError(f"teacher cache {self.folder}: shard {shard['file']} is missing")

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    def check(self, identity: dict, splits: dict[str, torch.Tensor], describe: dict[str, str] | None = None) -> None:
        """Raise :class:`CacheMismatch` naming what differs between this cache and ``identity`` / ``splits``.

        ``identity`` has the keys of the one the cache was built with; each differing key is named
        (``describe[key]`` says where the config sets it). Every split of ``splits`` must be cached with
        exactly these blocks (sha256 of their ids)."""
        describe = describe or {}
        built = self.identity
        rebuild = "rebuild it with `pcdistill cache-teacher CONFIG --out DIR`, or point teacher.cache elsewhere"
        for key in identity:
            if key == "corpus":  # described for messages; the blocks themselves are compared below
                continue
            mine, theirs = built.get(key), identity[key]
            if key == "teacher":  # the same file wherever it lies
                mine, theirs = (built.get(key) or {}).get("sha256"), theirs.get("sha256")
            if mine != theirs:
                where = describe.get(key, key)
                raise CacheMismatch(f"teacher.cache {self.folder} was built for another {key}: cache "
                                    f"{json.dumps(built.get(key))}, config ({where}) {json.dumps(identity[key])}; "
                                    f"{rebuild}")
        for name, blocks in splits.items():
            cached = self.manifest["splits"].get(name)
            if cached is None:
                raise CacheMismatch(f"teacher.cache {self.folder} holds no {name!r} split (it has "
                                    f"{', '.join(self.manifest['splits'])}); {rebuild}")
            if cached["ids_sha256"] != ids_sha256(blocks):
                raise CacheMismatch(f"teacher.cache {self.folder}: the {name} split's token blocks differ from the "
                                    f"cached ones ({len(blocks)} blocks here, {cached['blocks']} cached): another "
                                    f"corpus (cache {json.dumps(built.get('corpus'))}, config "
                                    f"{json.dumps(identity.get('corpus'))}); {rebuild}")

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        from safetensors.torch import load_file
        tensors = load_file(str(self.folder / self.manifest["output"]))
        return tensors["weight"], tensors.get("bias")

    def shards(self):
        """``(split, first, count, safe_open handle)`` of every shard, opened memory-mapped."""
        from safetensors import safe_open
        for name, split in self.manifest["splits"].items():
            for shard in split["shards"]:
                handle = safe_open(str(self.folder / shard["file"]), framework="pt")
                yield name, shard["first"], shard["count"], handle


class UncachedBlockError(ValueError):
    """A batch holds a token block the teacher cache has no hidden states for."""


class CachedTeacher(nn.Module):
    """A frozen teacher whose last hidden states come from a :class:`TeacherCache`, looked up by token ids.

    It answers the calls a Hugging Face causal LM answers for distillation: ``forward(input_ids,
    output_hidden_states=True, logits_to_keep=...)`` returns the cached hidden states (float, in the
    output layer's dtype), the logits (its output layer on them) and ``get_output_embeddings()`` the
    output layer. Every row of ``input_ids`` must be a cached block (the whole block, as cached).
    """

    logits_from_output_layer = True  # its logits are lm_head(hidden states), exactly: nothing to probe

    def __init__(self, cache: TeacherCache):
        super().__init__()
        self.cache = cache
        weight, bias = cache.output_layer()
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(weight)
            if bias is not None:
                self.lm_head.bias.copy_(bias)
        self.requires_grad_(False)
        self.eval()
        self.block_size = cache.manifest["block_size"]
        self._handles = []
        self._where: dict[bytes, tuple[int, int]] = {}  # ids of a block -> (handle, row in its shard)
        for _, _, count, handle in cache.shards():
            self._handles.append(handle)
            ids = handle.get_tensor("ids").numpy()
            for row in range(count):
                self._where.setdefault(ids[row].tobytes(), (len(self._handles) - 1, row))

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def extra_repr(self) -> str:
        return f"cache={str(self.cache.folder)!r}, blocks={len(self._where)}, dtype={self.cache.manifest['dtype']}"

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The cached last hidden states ``(B, L, H)`` of the blocks ``input_ids`` ``(B, L)``."""
        if input_ids.dim() != 2 or input_ids.shape[1] != self.block_size:
            raise UncachedBlockError(f"the teacher cache {self.cache.folder} holds blocks of {self.block_size} "
                                     f"tokens; got input_ids of shape {tuple(input_ids.shape)}")
        rows = input_ids.detach().to("cpu", torch.int32).numpy()
        parts = []
        for b, row in enumerate(rows):
            place = self._where.get(row.tobytes())
            if place is None:
                raise UncachedBlockError(f"row {b} of this batch is not a token block of the teacher cache "
                                         f"{self.cache.folder} (its first ids: {row[:8].tolist()}); the cache was "
                                         f"built for other data: rebuild it with `pcdistill cache-teacher`")
            handle, index = place
            parts.append(self._handles[handle].get_slice("hidden")[index:index + 1])
        weight = self.lm_head.weight
        return torch.cat(parts).to(weight.device, weight.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs):
        from transformers.modeling_outputs import CausalLMOutput
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a cached teacher holds the hidden states of whole blocks; a padded batch "
                             "(attention_mask with zeros) cannot be looked up")
        hidden = self.hidden_states(input_ids)
        kept = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
        return CausalLMOutput(logits=F.linear(kept, self.lm_head.weight, self.lm_head.bias),
                              hidden_states=(hidden,) if output_hidden_states else None)
