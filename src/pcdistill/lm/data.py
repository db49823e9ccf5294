"""Token ids of a corpus, fixed-length blocks of them, and a deterministic, DDP-aware block loader.

    ids = encode_documents(splits.train, tokenizer, cache_dir="runs/tok")   # cached next to the tokenizer
    loader = TokenBlockLoader(token_blocks(ids, 256), batch_size=16, train=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for input_ids, labels in loader: ...

`labels == input_ids`: the model shifts them (position i predicts labels[i + 1]), as Hugging Face
causal LMs do with `labels=`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from pcdistill.data.loaders import ShardedLoader
from pcdistill.data.text import Document


def _texts(docs: Sequence[Document | str]) -> list[str]:
    return [d.text if isinstance(d, Document) else d for d in docs]


def _cache_key(docs: Sequence[Document | str], tokenizer) -> str:
    """sha256 of the tokenizer's definition and every document's id and text."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.eos_token_id).encode())
    for doc in docs:
        name, text = (doc.path, doc.text) if isinstance(doc, Document) else ("", doc)
        digest.update(hashlib.sha256(name.encode()).digest() + hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def encode_documents(docs: Sequence[Document | str], tokenizer, cache_dir: str | Path | None = None) -> torch.Tensor:
    """The ids (int64, 1-D) of the documents in order, the eos token between consecutive ones.

    With `cache_dir` (e.g. the tokenizer's folder) the ids are stored there as
    `ids-<key>.safetensors`, the key a sha256 of the tokenizer and of every document's id and text,
    and read back on the next call with the same tokenizer and documents instead of encoding again.
    """
    from safetensors.torch import load_file, save_file

    if not docs:
        raise ValueError("encode_documents needs at least one document, got none")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token to separate documents")
    cache = None
    if cache_dir is not None:
        key = _cache_key(docs, tokenizer)
        cache = Path(cache_dir) / f"ids-{key[:32]}.safetensors"
        if cache.is_file():
            stored = load_file(str(cache))
            return stored["ids"].to(torch.int64)
    encoded = tokenizer(_texts(docs), add_special_tokens=False)["input_ids"]
    flat: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            flat.append(eos)
        flat.extend(ids)
    result = torch.tensor(flat, dtype=torch.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        # int32 halves the file; ids of any real vocabulary fit.
        save_file({"ids": result.to(torch.int32)}, str(tmp), metadata={"documents": str(len(docs))})
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the whole file or none
    return result


def token_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Consecutive non-overlapping blocks (n, block_size) of the 1-D `ids`, n = len(ids) // block_size;
    the last len(ids) % block_size ids (an incomplete block) are dropped."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"{ids.numel()} ids make no full block of {block_size}; use more text or a smaller block_size")
    return ids[: n * block_size].view(n, block_size)


class TokenBlockLoader(ShardedLoader):
    """Batches `(input_ids (B, L), labels (B, L))` int64 on `device` from blocks (N, L); labels == input_ids.

    train: the blocks shuffled by `DistributedSampler(shuffle=True, drop_last=True)` seeded by
    (seed, epoch), ranks reading disjoint shards, the incomplete last batch dropped; eval: rank r
    reads blocks range(r, N, world_size) in order, nothing dropped. `set_epoch(epoch, start_batch)`
    and `len()` (batches per epoch) as the other loaders.
    """

    def __init__(self, blocks: torch.Tensor, *, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu"):
        if blocks.dim() != 2 or blocks.dtype != torch.int64:
            raise ValueError(f"blocks must be int64 (N, block_size), got {blocks.dtype} {tuple(blocks.shape)}")
        super().__init__(blocks.contiguous(), batch_size=batch_size, train=train, seed=seed, rank=rank,
                         world_size=world_size, device=device, augment=False)

    def __iter__(self):
        order = self._indices()
        blocks = self.dataset
        for batch, start in enumerate(range(0, self.num_samples, self.batch_size)):
            if batch < self.start_batch:
                continue
            index = order[start : start + self.batch_size]
            out = torch.empty((len(index), blocks.shape[1]), dtype=torch.int64, pin_memory=self._pin)
            torch.index_select(blocks, 0, index, out=out)
            input_ids = out.to(self.device, non_blocking=self._pin)
            yield input_ids, input_ids.clone()  # a copy, so masking labels in place leaves the inputs intact
