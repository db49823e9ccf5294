"""What the teacher cache's storage dtype does to the teacher's log-probabilities, and what it costs a token.

The teacher (default: the fetched SmolLM2-135M, ``pcdistill fetch smollm2-135m``) runs in float32 over
blocks of standard-library source; its last hidden states are rounded to each storage dtype, the logits
recomputed from them with its float32 output layer (as the fused loss does from a cache), and their
log-softmax compared with the float32 one over every (token, vocabulary entry): max and mean absolute
difference, KL(p_float32 || p_stored) per token, and how often the top-1 token changes. Bytes per token
are the stored hidden states beside DistillKit's offline top-k log-probabilities and full bf16 logits.

    python bench/teacher_cache_dtype.py                       # 4 blocks of 128 tokens of json/decoder.py, ...
    python bench/teacher_cache_dtype.py --teacher file.gguf --blocks 8
"""
from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FILES = ("json/decoder.py", "argparse.py", "collections/__init__.py", "functools.py", "typing.py")
DISTILLKIT_BYTES = 300  # DistillKit's offline top-k log-probabilities, about (its README)


def stdlib_blocks(tokenizer, blocks: int, length: int) -> torch.Tensor:
    """``blocks`` consecutive blocks of ``length`` tokens from the standard library's source (first files first)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in FILES:
        path = root / name
        if path.is_file():
            ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        if len(ids) >= blocks * length:
            break
    if len(ids) < blocks * length:
        raise SystemExit(f"the standard library files {FILES} give only {len(ids)} tokens")
    return torch.tensor(ids[: blocks * length]).view(blocks, length)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _same_as_transformers(path: str, ids: torch.Tensor, logits: torch.Tensor) -> str | None:
    """The logits through teacher.path against AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)'s."""
    import transformers

    from pcdistill.lm.fetch import resolve
    from pcdistill.lm.gguf import gguf_file
    file = gguf_file(resolve(path))
    if file is None:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    return (f"teacher.path {path} vs AutoModelForCausalLM.from_pretrained(dir, gguf_file={file.name!r}): logits "
            f"max abs difference {(logits - expected).abs().max().item():.3g}")


def _float32_cache(teacher, ids: torch.Tensor, logits: torch.Tensor) -> str:
    """The logits recomputed from a float32 teacher cache of these blocks against the live forward's."""
    import tempfile

    from pcdistill.lm.models import full_logits
    from pcdistill.lm.teacher_cache import CachedTeacher, TeacherCache, write_teacher_cache
    with tempfile.TemporaryDirectory() as folder:
        write_teacher_cache(teacher, {"train": ids}, folder, identity={}, dtype="float32", progress=False)
        with torch.no_grad():
            cached = full_logits(CachedTeacher(TeacherCache(folder)), ids).float()
    return (f"logits from a float32 teacher cache vs the live forward: max relative difference "
            f"{_relative(cached, logits):.2g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m", help="teacher.path: a fetch name, .gguf or folder")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    from pcdistill.lm.models import create_causal_lm, last_hidden_states, output_layer
    from pcdistill.tasks.causal_lm import tokenizer_at

    start = time.perf_counter()
    teacher = create_causal_lm({"path": args.teacher}).eval()
    tokenizer = tokenizer_at("teacher", args.teacher)[0]
    ids = stdlib_blocks(tokenizer, args.blocks, args.block_size)
    weight, bias = output_layer(teacher)
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden, logits = out.hidden_states[-1].float(), out.logits.float()
        reference = F.log_softmax(F.linear(hidden, weight.float(), bias), dim=-1)
    checks = [_same_as_transformers(args.teacher, ids, logits), _float32_cache(teacher, ids, logits)]
    vocab, size = weight.shape
    print(f"# teacher_cache_dtype: {args.teacher}, {args.blocks} x {args.block_size} tokens of the standard library "
          f"({', '.join(FILES[:2])}, ...), vocabulary {vocab}, hidden {size}, torch {torch.__version__}; "
          f"{time.perf_counter() - start:.0f} s; largest |hidden state| {hidden.abs().max().item():.1f} "
          f"(float16 holds up to 65504)\n")
    for line in filter(None, checks):
        print(f"- {line}")
    print()
    print("| storage | bytes / token | max abs diff of log p | mean abs diff of log p | KL(p_fp32 || p) / token "
          "| top-1 changed |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            stored = F.log_softmax(F.linear(hidden.to(dtype).float(), weight.float(), bias), dim=-1)
        diff = (stored - reference).abs()
        kl = F.kl_div(stored, reference, log_target=True, reduction="sum").item() / ids.numel()
        changed = (stored.argmax(-1) != reference.argmax(-1)).float().mean().item()
        name = str(dtype).removeprefix("torch.")
        print(f"| hidden states, {name} | {size * dtype.itemsize:,} | {diff.max().item():.2e} | "
              f"{diff.mean().item():.2e} | {kl:.2e} | {100 * changed:.2f}% |")
    print(f"| DistillKit top-k log-probabilities (lossy) | ~{DISTILLKIT_BYTES} | | | | |")
    print(f"| full logits, bfloat16 | {vocab * 2:,} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
