"""Causal LMs and tokenizers from GGUF files (llama.cpp's format), read by transformers, local files only.

    file = gguf_file("teachers/")                 # a .gguf file, or the one .gguf a folder holds; None otherwise
    model = load_gguf_model(file)                 # from_pretrained(dir, gguf_file=name), dequantized
    tokenizer = load_gguf_tokenizer(file)         # AutoTokenizer.from_pretrained(dir, gguf_file=name)

transformers dequantizes the weights into a plain float32 model (``nn.Linear`` layers, so the fused
output-layer loss applies) and rebuilds the tokenizer from the file's metadata. A file it cannot read
(an architecture it does not map, a tensor type the ``gguf`` package cannot dequantize) is refused with
a :class:`GGUFError` that names the architecture or the type and the file.
"""
from __future__ import annotations

import functools
from pathlib import Path

SUFFIX = ".gguf"
INSTALL = "pip install 'pcdistill[lm]' (the lm extra includes gguf)"


class GGUFError(ValueError):
    """A GGUF file that transformers cannot read, or a path that holds no single GGUF file."""


def gguf_file(path: str | Path) -> Path | None:
    """``path`` itself when it is a ``.gguf`` file; the one ``.gguf`` file of a folder without ``config.json``;
    None for anything else (a Hugging Face folder, a missing path). Several ``.gguf`` files in one folder
    are ambiguous and refused."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                        f"name the one to load: {path / found[0].name}")
    return found[0] if found else None


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError(f"reading a GGUF file needs the gguf package: {INSTALL}") from None


def _supported_architectures() -> set[str] | None:
    """The GGUF architectures this transformers maps to a model, or None when it does not say (older versions)."""
    found: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        found |= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    except ImportError:
        return None
    try:  # transformers >= 5.2 loads a few architectures through a second path
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
        found |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return found


def diagnose(file: Path) -> str | None:
    """What in ``file`` transformers cannot read (its architecture or a tensor type), in words; None if nothing."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(file))
    except Exception as err:  # not GGUF at all: bad magic, truncated
        return f"it is not a readable GGUF file ({type(err).__name__}: {err})"
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    supported = _supported_architectures()
    if arch is None:
        return "its metadata has no general.architecture"
    if supported is not None and arch not in supported:
        return (f"its architecture {arch!r} is not one transformers maps to a model "
                f"(supported: {', '.join(sorted(supported))})")
    smallest: dict = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind not in smallest or tensor.n_bytes < smallest[kind].n_bytes:
            smallest[kind] = tensor
    for kind, tensor in smallest.items():
        try:
            dequantize(np.asarray(tensor.data), kind)
        except NotImplementedError:
            counts = sum(t.tensor_type == kind for t in reader.tensors)
            return (f"{counts} of its tensors (e.g. {tensor.name}) are stored as {kind.name}, a quantization type "
                    f"the gguf package cannot dequantize; convert the file to another type (llama.cpp's "
                    f"llama-quantize, e.g. to Q8_0 or F16)")
    return None


def _refuse(file: Path, what: str, err: Exception | None = None) -> GGUFError:
    cause = f" ({type(err).__name__}: {err})" if err is not None else ""
    return GGUFError(f"cannot load the GGUF file {file}: {what}{cause}. transformers reads GGUF files of the "
                     f"architectures it maps (llama, mistral, qwen2, gemma, phi3, ...) and dequantizes them with "
                     f"the gguf package; use a Hugging Face save_pretrained folder for other models")


def load_gguf_model(file: str | Path):
    """The causal LM of ``file``: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, dequantized
    (float32 ``nn.Linear`` layers), local files only; a file transformers cannot read raises :class:`GGUFError`."""
    import transformers

    file = Path(file)
    _require_gguf()
    options = {"local_files_only": True}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.2 may keep blocks packed; distillation needs dense
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, **options)
    except Exception as err:  # transformers raises ValueError, NotImplementedError, KeyError, OSError, ...
        raise _refuse(file, diagnose(file) or "transformers could not build a model from it", err) from err


def load_gguf_tokenizer(file: str | Path):
    """The tokenizer that transformers rebuilds from ``file``'s metadata (``tokenizer.ggml.*``), local only.

    Rebuilding it parses the whole file (6 s for SmolLM2's 49,152 tokens and merges) and a run asks for it
    twice (``data.options.tokenizer`` and the teacher's), so a process keeps it per file, size and
    modification time and returns a copy (0.1 s)."""
    import copy

    file = Path(file).resolve()
    stat = file.stat()
    return copy.deepcopy(_gguf_tokenizer(str(file), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(file: str, size: int, mtime_ns: int):
    import transformers

    path = Path(file)
    _require_gguf()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          local_files_only=True)
    except Exception as err:
        raise _refuse(path, diagnose(path) or "transformers could not rebuild its tokenizer (tokenizer.ggml.* "
                      "metadata)", err) from err
