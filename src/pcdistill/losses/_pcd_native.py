"""PCD's rows on the CPU as one native loop per row (``_pcd_native.cpp``): the CPU's default.

The C++ file computes what ``_pcd_rows`` computes (read its docstring: atoms, per-atom sums, every group from
its atoms' sums in float64, the closed-form gradient), a row at a time, rows split over threads. Two things
differ from the torch rows: the classes are ranked by a selection (a quickselect at every atom boundary at
once, on integer keys that fold in the class index, so the order is the stable sort's), and every step is a
loop over the row instead of a tensor operation. Eager torch costs microseconds per operation and PCD's rows
take about a hundred (4-5x KD at 64 x 100); the loops cost what their arithmetic costs at every shape.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``: the one
``torch.compile`` needs on the CPU too) into ``$PCDISTILL_CACHE/kernels`` (default ``~/.cache/pcdistill``),
keyed by a hash of the source and the flags, and loaded with ``ctypes`` (about a second once; no torch
headers). Where it cannot be built, :func:`library` warns once and PCD runs the torch rows.
A compiled graph (``torch.compile``) holds the kernel as one node, the custom op ``pcdistill::pcd_rows``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from pcdistill.cache import cache_root

from ._pcd_rows import pcd_rows

SOURCE = Path(__file__).with_suffix(".cpp")
# no fused multiply-adds (-ffp-contract=off): the priority keys round, and tie, as torch computes them;
# -fno-trapping-math lets selects compute both sides, so that the exp loop vectorises (no FP exception is read)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c++20", "-shared", "-fPIC", "-fopenmp")
RANK_BY = {"abs_diff": 0, "teacher": 1, "none": 2}
LOGITS_PER_THREAD = 2**14  # below, waking a thread costs more than its share of the rows
WORK_ARRAYS = 3  # (rows, C)-sized arrays per chunk: the prepared inputs and the gradient (the kernel's are per row)
CHUNK_LOGITS = 2**31  # chunks as large as the budget allows: each writes its gradient straight into the kept one


def _compile(compiler: str, path: Path) -> None:
    """Build ``path`` atomically: a killed or concurrent build never leaves a half-written library there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built (a warning says why)."""
    compiler = os.environ.get("CXX", "c++")
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, platform.machine())).encode())
    path = cache_root() / "kernels" / f"pcd_native-{tag.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"pcdistill: PCD's native CPU rows could not be built with {compiler!r} into {path.parent} "
                      f"({detail}); using the torch rows", RuntimeWarning, stacklevel=3)
        return None
    for fn in (lib.pcd_rows_f32, lib.pcd_rows_f64):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                       ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def available() -> bool:
    """Whether the kernel is built (building it on first use)."""
    return library() is not None


def pcd_rows_native(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                    adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos",
                    out: torch.Tensor | None = None):
    """``_pcd_rows.pcd_rows``'s loss and gradient by the native kernel (float32 or float64 CPU tensors;
    :func:`library` must not be None); the gradient is written into ``out`` if given (contiguous, ``s``'s
    shape and dtype)."""
    lib = library()
    fn = lib.pcd_rows_f64 if s.dtype == torch.float64 else lib.pcd_rows_f32
    s, t = s.contiguous(), t.contiguous()
    rows, num_classes = s.shape
    loss = s.new_empty(rows)
    grad = None if not want_grad else s.new_empty(rows, num_classes) if out is None else out
    if want_grad and not (grad.is_contiguous() and grad.shape == s.shape and grad.dtype == s.dtype):
        raise ValueError(f"out must be a contiguous {s.dtype} tensor of shape {tuple(s.shape)}")
    groups = (ctypes.c_int64 * len(stage_groups))(*stage_groups)
    threads = min(torch.get_num_threads(), max(1, rows * num_classes // LOGITS_PER_THREAD))
    fn(s.data_ptr(), t.data_ptr(), rows, num_classes, groups, len(stage_groups), factor, temperature,
       adaptive, weight == "prob_cos", RANK_BY[rank_by], want_grad, loss.data_ptr(),
       grad.data_ptr() if want_grad else None, threads)
    return loss, grad


@torch.library.custom_op("pcdistill::pcd_rows", mutates_args=(), device_types="cpu")
def pcd_rows_op(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                adaptive: bool, rank_by: str, want_grad: bool, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pcd_rows_native` (the torch rows where it cannot be built) as one graph node; without ``want_grad``
    the gradient is an empty tensor."""
    rows_fn = pcd_rows_native if available() else pcd_rows
    loss, grad = rows_fn(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight)
    return loss, grad if grad is not None else s.new_empty(0)


@pcd_rows_op.register_fake
def _(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight):
    return s.new_empty(s.shape[0]), s.new_empty(s.shape if want_grad else (0,))


def cpu_rows(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
             adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos",
             out: torch.Tensor | None = None):
    """The row function ``pcd.py`` runs on the CPU: the kernel, through the custom op inside a compiled graph."""
    if not torch.compiler.is_compiling():  # the op is for the graph; eager skips its dispatch
        return pcd_rows_native(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight, out)
    loss, grad = pcd_rows_op(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight)
    if out is not None:
        grad = out.copy_(grad)
    return loss, grad if want_grad else None
