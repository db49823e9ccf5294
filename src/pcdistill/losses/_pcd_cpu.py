"""PCD's per-row computation on the CPU: a selection instead of a sort, and atoms laid out as tiles.

A chunk large enough for compiled passes to pay, with few cuts (K <= 5), goes to ``_pcd_select`` instead
(thresholds; compiled passes); these tiles take small chunks, K > 5, and any run where compiling fails.

The same atoms, sums and closed-form gradient as ``_pcd_rows`` (read its docstring first); two steps differ.

1. *Selection.* Only the atoms' boundaries are needed, not the order of every class. Each class gets one
   int64 key: the priority key's order-preserving integer image, negated, in the high 32 bits and the class
   index in the low 32, so all keys differ and their ascending order is the stable descending sort's order.
   numpy's ``partition`` at each boundary in turn (one kth per call, which takes its SIMD path; each call
   works on the part past the previous boundary) leaves every row's classes grouped by atom, the atoms in
   rank order. Rows with other live-class counts (masks) have other boundaries and are partitioned apart.
   float64 keys have no room for the index: a stable sort gives them the same grouping.
2. *Tiles.* The classes are gathered into tiles of ``width`` columns, each tile inside one atom (an atom
   gets as many tiles as its longest row needs; the rest is padding, ``-inf`` in both logits, i.e. absent).
   Every per-atom maximum or sum is then a reduction over the last axis of a ``(rows, tiles, width)`` array
   followed by one over the few tiles of each atom, and every per-atom value broadcasts along the tiles: no
   per-class scatter or gather, except the one that puts the gradient back in class order.

The layout depends only on the rows' live-class counts, so for rows without masks it is computed once per
shape and kept (:func:`_shared_plan`). Both ways are the custom op ``pcdistill::pcd_rows``:
inside, shapes depend on the data, which ``torch.compile`` cannot trace, so a compiled graph holds the op as
one node (its fake implementation gives the output shapes). ``pcd.py`` uses it on the CPU; CUDA keeps the
traceable ``_pcd_rows``.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings

import torch

from . import _pcd_select
from ._pcd_rows import Atoms, atom_cuts, atom_layout, combine_atoms, finish_loss
from ._pcd_select import partition_at, row_state, rows_by_cuts

WORK_ARRAYS = 20  # (rows, C)-sized arrays alive at once, in units of the compute dtype (int64 counts twice)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The atoms of each row and their tiles: the rank position each tile column reads, the padding and each
    tile's atom (one shared row when all rows have the same live-class count)."""

    atoms: Atoms
    position: torch.Tensor  # (rows or 1, tiles * width)
    pad: torch.Tensor  # (rows or 1, tiles, width)
    tile_atom: torch.Tensor  # (tiles,)
    shared_cuts: list[int] | None  # the interior atom ends of a shared layout, for the partition


def _plan(n: torch.Tensor, num_classes: int, stage_groups: tuple[int, ...]) -> Plan:
    cuts = atom_cuts(n, list(stage_groups), num_classes)
    atoms = cuts.shape[1]
    starts = torch.cat([torch.zeros_like(cuts[:, :1]), cuts[:, :-1]], 1)
    width = max(8, -(-num_classes // (8 * atoms)))  # padding at most C/8 + 8 per atom
    per_atom = (-(-(cuts - starts) // width)).amax(0)
    atom = torch.repeat_interleave(torch.arange(atoms), per_atom)
    nth = torch.arange(len(atom)) - (per_atom.cumsum(0) - per_atom)[atom]  # the tile's place in its atom
    end = cuts[:, atom]
    first = torch.minimum(starts[:, atom] + nth * width, end)
    last = torch.minimum(first + width, end)
    position = first.unsqueeze(-1) + torch.arange(width)
    pad = position >= last.unsqueeze(-1)
    position = position.clamp_max(num_classes - 1).flatten(1)
    shared = sorted({c for c in cuts[0].tolist() if 0 < c < num_classes}) if len(cuts) == 1 else None
    return Plan(atom_layout(cuts, n, list(stage_groups)), position, pad, atom, shared)


@functools.lru_cache(maxsize=8)
def _shared_plan(n: int, num_classes: int, stage_groups: tuple[int, ...]) -> Plan:
    """The plan of rows that all have ``n`` live classes (no masks): the same every step of a training run
    (kept: under 1.5 MiB each at 128k classes)."""
    return _plan(torch.tensor([n]), num_classes, stage_groups)


def class_order(key: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``(rows, C)`` int64: the classes of each row with atom ``k`` at rank positions ``[cuts[k-1], cuts[k])``
    (ranked by the integer ``key`` descending, ties to the lower class index; any order inside an atom)."""
    rows, num_classes = key.shape
    if key.dtype != torch.int32:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices
    # int64 keys (~key) * 2**32 + class index, written as their two int32 halves: all distinct, and ascending
    # order is key descending, then the lower class index first
    halves = torch.empty(rows, num_classes, 2, dtype=torch.int32)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves[..., low] = _class_index(num_classes)
    torch.bitwise_not(key, out=halves[..., high])
    packed = halves.view(torch.int64).squeeze(-1)
    keys = packed.numpy()
    if plan.shared_cuts is not None:
        partition_at(keys, plan.shared_cuts)
    else:  # rows with equal cuts together
        for same, cuts in rows_by_cuts(plan.atoms.cuts):
            part = keys[same]
            partition_at(part, cuts.tolist())
            keys[same] = part
    return packed.bitwise_and_(2**32 - 1)


@functools.lru_cache(maxsize=8)
def _class_index(num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes, dtype=torch.int32)


def _to_tiles(z: torch.Tensor, index: torch.Tensor, pad: torch.Tensor, temperature: float) -> torch.Tensor:
    return z.gather(1, index).view(z.shape[0], *pad.shape[1:]).masked_fill_(pad, float("-inf")).div_(temperature)


def pcd_rows_cpu(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                 adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos"):
    """``_pcd_rows.pcd_rows``'s loss and gradient: by thresholds and compiled passes (``_pcd_select``) for a large
    chunk, else by selection and tiles (CPU tensors)."""
    rows, num_classes = s.shape
    if rows == 0:
        return s.new_zeros(0), s.new_zeros(0, num_classes) if want_grad else None
    if _pcd_select.usable(rows, num_classes, stage_groups):
        try:
            return _pcd_select.pcd_rows_select(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad,
                                               weight)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler: the tiles from now on
            _pcd_select.COMPILED = False
            warnings.warn(f"pcdistill: PCD's compiled CPU passes are unavailable ({error}); using the tiles",
                          RuntimeWarning, stacklevel=2)
    n, nan_row, inf_row, key = row_state(s, t, rank_by)
    shared = n is None or bool((n == n[0]).all())
    plan = (_shared_plan(num_classes if n is None else int(n[0]), num_classes, tuple(stage_groups)) if shared
            else _plan(n, num_classes, tuple(stage_groups)))
    order = class_order(key, plan)
    index = order.index_select(1, plan.position[0]) if shared else order.gather(1, plan.position)
    del key
    a = _to_tiles(s, index, plan.pad, temperature)  # s/T in tiles, -inf in the padding
    b = _to_tiles(t, index, plan.pad, temperature)
    atoms, tile_atom = plan.atoms.cuts.shape[1], plan.tile_atom
    tops = torch.stack([a.amax(-1), b.amax(-1)])  # (2, rows, tiles): student and teacher maxima of each tile
    m = tops.new_full((2, rows, atoms), float("-inf")).scatter_reduce_(2, tile_atom.expand_as(tops), tops, "amax")
    m.nan_to_num_(neginf=0.0)  # 0 for an empty atom (and in rows flagged NaN, whose results are replaced)
    m_tile = m.index_select(2, tile_atom).unsqueeze(-1)

    # per tile, in the order combine_atoms reads their sums: e_s = exp(a - m_s), u = a - m_s, u^2, e_t = exp(b - m_t),
    # e_t (b - a), e_t u, e_t^2 [, e_s^2, e_s e_t]; u and b - a are 0 in the padding, where the teacher is -inf
    # and in rows flagged NaN or +inf (whose results are replaced)
    prob_cos = adaptive and weight == "prob_cos"
    parts = torch.empty((9 if prob_cos else 7,) + a.shape, dtype=s.dtype)
    e_s, u, _, e_t, e_t_diff = parts[:5]
    torch.sub(a, m_tile[0], out=u)
    torch.exp(u, out=e_s)
    u.nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, a, out=e_t_diff).nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, m_tile[1], out=e_t).exp_()
    e_t_diff.mul_(e_t)
    torch.mul(u, u, out=parts[2])
    torch.mul(e_t, u, out=parts[5])
    torch.mul(e_t, e_t, out=parts[6])
    if prob_cos:
        torch.mul(e_s, e_s, out=parts[7])
        torch.mul(e_s, e_t, out=parts[8])
    sums = a.new_zeros(len(parts), rows, atoms).index_add_(2, tile_atom, parts.sum(-1))
    loss, coef = combine_atoms(m, sums, plan.atoms, stage_groups, temperature, adaptive, weight, want_grad)
    loss = (factor * loss).to(s.dtype) if nan_row is None else finish_loss(loss, nan_row, inf_row, factor, s.dtype)
    if not want_grad:
        return loss, None

    c = (coef * (factor / temperature)).index_select(2, tile_atom).unsqueeze(-1)  # (4, rows, tiles, 1)
    if prob_cos:  # e_s (c0 + c2 e_s + c3 e_t) + c1 e_t
        g = torch.mul(e_s, c[2], out=a).add_(c[0]).addcmul_(e_t, c[3]).mul_(e_s).addcmul_(e_t, c[1])
    else:  # c0 e_s + c1 e_t + c2 u + c3
        g = torch.mul(e_s, c[0], out=a).addcmul_(e_t, c[1]).addcmul_(u, c[2]).add_(c[3])
    g.masked_fill_(plan.pad, 0.0)
    grad = s.new_zeros(rows, num_classes).scatter_add_(1, index, g.view(rows, -1))
    if nan_row is not None and bool((bad := nan_row | inf_row).any()):
        grad[bad] = float("nan")
    return loss, grad


@torch.library.custom_op("pcdistill::pcd_rows", mutates_args=(), device_types="cpu")
def pcd_rows_op(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                adaptive: bool, rank_by: str, want_grad: bool, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pcd_rows_cpu` as one graph node; without ``want_grad`` the gradient is an empty tensor."""
    loss, grad = pcd_rows_cpu(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight)
    return loss, grad if grad is not None else s.new_empty(0)


@pcd_rows_op.register_fake
def _(s, t, stage_groups, factor, temperature, adaptive, rank_by, want_grad, weight):
    return s.new_empty(s.shape[0]), s.new_empty(s.shape if want_grad else (0,))
