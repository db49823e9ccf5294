"""Tiny GGUF files the tests write themselves with the gguf package (no download): a random llama and its
byte-level BPE, in llama.cpp's layout (tensor names from gguf's own map, q/k rows permuted as llama.cpp's
convert_hf_to_gguf.py does), so transformers reads them back exactly as it reads a real GGUF teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
        "import os\nprint(os.path.join('a', 'b'))\n", "for i in range(10):\n    if i % 2:\n        continue\n"] * 8


def tiny_tokenizer(folder: Path, vocab_size: int = 300):
    """A byte-level BPE (ids 0, 1: <|endoftext|>, <|pad|>) trained on a few lines of Python."""
    from pcdistill.lm.tokenizer import train_tokenizer
    return train_tokenizer(TEXT, vocab_size, folder)


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=256,
                                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm tensors shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_llama_gguf(path: Path, model, tokenizer, *, architecture: str = "llama", tensor_type=None) -> Path:
    """Write ``model`` (a tied LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as a GGUF file at ``path``.

    ``tensor_type``: a ``gguf.GGMLQuantizationType`` for the 2-D weights (default F32, exact)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                              else cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and len(tokens) == cfg.vocab_size
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: the file holds token_embd only, as llama.cpp writes a tied model
        base, suffix = name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if base.endswith("self_attn.q_proj"):
            array = _permute(array, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            array = _permute(array, cfg.num_key_value_heads)
        out = f"{names.get_name(base)}.{suffix}"
        if tensor_type is not None and array.ndim == 2:
            writer.add_tensor(out, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
        else:
            writer.add_tensor(out, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(folder: Path, **kwargs) -> tuple[Path, object, object]:
    """(file, source model, source tokenizer): a tiny llama and its tokenizer written to folder/tiny.gguf."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    model = tiny_llama(len(tokenizer))
    return write_llama_gguf(folder / "tiny.gguf", model, tokenizer, **kwargs), model, tokenizer
