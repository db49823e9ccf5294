"""PCD's per-row computation on the CPU: a selection instead of a sort, and atoms laid out as tiles.

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
   Tiles refine the atoms, so they serve as the atoms of ``combine_atoms``: every per-tile maximum or sum is
   a reduction over the last axis of a ``(rows, tiles, width)`` array and every per-tile value broadcasts
   along it, with no per-class scatter or gather. The products the sums need (``u^2``, ``e_t u``, ...) come
   from one batched matrix product, and so does the gradient; one scatter puts it back in class order.

The layout depends only on the rows' live-class counts, so for rows without masks it is computed once per
shape and kept (:func:`_shared_plan`). The whole computation is the custom op ``pcdistill::pcd_rows``:
inside, shapes depend on the data, which ``torch.compile`` cannot trace, so a compiled graph holds the op as
one node (its fake implementation gives the output shapes). ``pcd.py`` uses it on the CPU; CUDA keeps the
traceable ``_pcd_rows``.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from ._pcd_rows import Atoms, atom_cuts, atom_layout, combine_atoms, finish_loss, priority_key, sortable

WORK_ARRAYS = 16  # (rows, C)-sized arrays alive at once, in units of the compute dtype (int64 counts twice)
# combine_atoms's sums (e_s, u, u^2, e_t, e_t (b - a), e_t u, e_t^2 [, e_s^2, e_s e_t]) as columns of the tile
# sums of (e_s, u, e_t, b - a) followed by the Gram matrix rows (e_s,) u, e_t (by prob_cos)
SUM_COLUMNS = {False: [0, 1, 5, 2, 11, 9, 10], True: [0, 1, 9, 2, 15, 13, 14, 4, 6]}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each row's atoms end (``cuts``), and the tiles: the rank position each tile column reads,
    the padding, and the tiles as :class:`Atoms` (one shared row when all rows have the same counts)."""

    cuts: torch.Tensor
    position: torch.Tensor  # (rows or 1, tiles * width)
    pad: torch.Tensor  # (rows or 1, tiles, width)
    tiles: Atoms


def _plan(n: torch.Tensor, num_classes: int, stage_groups: tuple[int, ...]) -> Plan:
    cuts = atom_cuts(n, list(stage_groups))
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
    return Plan(cuts, position.clamp_max(num_classes - 1).flatten(1), pad, atom_layout(last, n, list(stage_groups)))


@functools.lru_cache(maxsize=32)
def _shared_plan(n: int, num_classes: int, stage_groups: tuple[int, ...]) -> Plan:
    """The plan of rows that all have ``n`` live classes (no masks): the same every step of a training run."""
    return _plan(torch.tensor([n]), num_classes, stage_groups)


def _partition(keys: np.ndarray, cuts: np.ndarray) -> None:
    """Partition the rows of ``keys`` in place so that positions ``[c_i, c_{i+1})`` hold the keys of those ranks."""
    start = 0
    for cut in sorted(set(cuts.tolist())):
        if start < cut < keys.shape[1]:
            keys[:, start:].partition(cut - start, axis=-1)
            start = cut


def class_order(key: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """``(rows, C)`` int64: the classes of each row with atom ``k`` at rank positions ``[cuts[k-1], cuts[k])``
    (ranked by the integer ``key`` descending, ties to the lower class index; any order inside an atom).
    ``cuts`` has one row when all rows share it."""
    num_classes = key.shape[1]
    if key.dtype != torch.int32:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices
    # (~key) * 2**32 + class index: all distinct; ascending = key descending, then lower index first
    packed = torch.add(_low_index(num_classes), key, alpha=-(2**32))
    keys, row_cuts = packed.numpy(), cuts.numpy()
    if len(row_cuts) == 1 or (row_cuts == row_cuts[:1]).all():
        _partition(keys, row_cuts[0])
    else:
        unique, which = np.unique(row_cuts, axis=0, return_inverse=True)
        for i, c in enumerate(unique):
            same = np.flatnonzero(which.reshape(-1) == i)
            part = keys[same]
            _partition(part, c)
            keys[same] = part
    return packed.bitwise_and_(2**32 - 1)


@functools.lru_cache(maxsize=8)
def _low_index(num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes, dtype=torch.int64) - 2**32


def _row_state(s: torch.Tensor, t: torch.Tensor, rank_by: str):
    """Live-class counts, the NaN and +inf row flags (None when every value is finite) and the integer key."""
    rows, num_classes = s.shape
    if bool(torch.isfinite(s.sum() + t.sum())):  # no inf, no NaN: every class is live
        n = torch.full((rows,), num_classes, dtype=torch.int64)
        if rank_by == "abs_diff":  # as priority_key rounds it; >= 0, so its float bits are in order already
            key = (t - t.sum(-1, keepdim=True) / num_classes).sub_(s - s.sum(-1, keepdim=True) / num_classes).abs_()
            return n, None, None, key.view(torch.int32) if key.dtype == torch.float32 else sortable(key)
        key = t if rank_by == "teacher" else -torch.arange(num_classes, dtype=s.dtype).expand_as(s)
        return n, None, None, sortable(key)
    s_inf, t_inf = torch.isneginf(s), torch.isneginf(t)
    live = ~(s_inf & t_inf)
    inf_row = (live & s_inf & ~t_inf).any(-1)  # the student rules out a class the teacher keeps: loss +inf
    nan_row = (torch.isnan(s) | torch.isposinf(s) | torch.isnan(t) | torch.isposinf(t)).any(-1)
    return live.sum(-1), nan_row, inf_row, sortable(priority_key(s, t, live, rank_by))


def _to_tiles(z: torch.Tensor, index: torch.Tensor, pad: torch.Tensor, temperature: float) -> torch.Tensor:
    return z.gather(1, index).view(z.shape[0], *pad.shape[1:]).masked_fill_(pad, float("-inf")).div_(temperature)


def pcd_rows_cpu(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                 adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos"):
    """``_pcd_rows.pcd_rows``'s loss and gradient, by selection and tiles (CPU tensors)."""
    rows, num_classes = s.shape
    if rows == 0:
        return s.new_zeros(0), s.new_zeros(0, num_classes) if want_grad else None
    n, nan_row, inf_row, key = _row_state(s, t, rank_by)
    shared = nan_row is None or bool((n == n[0]).all())
    plan = (_shared_plan(int(n[0]), num_classes, tuple(stage_groups)) if shared
            else _plan(n, num_classes, tuple(stage_groups)))
    index = class_order(key, plan.cuts).gather(1, plan.position.expand(rows, -1))
    del key
    a = _to_tiles(s, index, plan.pad, temperature)  # s/T in tiles, -inf in the padding
    b = _to_tiles(t, index, plan.pad, temperature)
    m_s = a.amax(-1).nan_to_num_(neginf=0.0)  # 0 for a tile of padding
    m_t = b.amax(-1).nan_to_num_(neginf=0.0)

    # per tile: e_s = exp(a - m_s), u = a - m_s, e_t = exp(b - m_t), b - a; all 0 in the padding (u, b - a:
    # also where the teacher is -inf, and in rows flagged NaN or +inf, whose results are replaced)
    parts = torch.empty(rows, plan.pad.shape[1], 4, plan.pad.shape[2], dtype=s.dtype)
    e_s, u, e_t, diff = parts.unbind(2)
    torch.sub(a, m_s.unsqueeze(-1), out=u)
    torch.exp(u, out=e_s)
    u.nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, a, out=diff).nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, m_t.unsqueeze(-1), out=e_t).exp_()
    del b
    prob_cos = adaptive and weight == "prob_cos"
    first = 0 if prob_cos else 1  # Gram matrix rows (e_s,) u, e_t against columns e_s, u, e_t, b - a
    gram = torch.matmul(parts[:, :, first:3], parts.transpose(-1, -2)).flatten(-2)
    sums = torch.cat([parts.sum(-1), gram], -1)[..., SUM_COLUMNS[prob_cos]].permute(2, 0, 1)
    loss, coef = combine_atoms(m_s, m_t, sums, plan.tiles, stage_groups, temperature, adaptive, weight, want_grad)
    loss = (factor * loss).to(s.dtype) if nan_row is None else finish_loss(loss, nan_row, inf_row, factor, s.dtype)
    if not want_grad:
        return loss, None

    c = (coef * (factor / temperature)).unsqueeze(-1)  # (4, rows, tiles, 1) on e_s, e_t, and u, 1 or e_s^2, e_s e_t
    g = a  # reused
    if prob_cos:  # e_s (c0 + c2 e_s + c3 e_t) + c1 e_t
        torch.addcmul(c[0], e_s, c[2], out=g).addcmul_(e_t, c[3]).mul_(e_s).addcmul_(e_t, c[1])
    else:  # c0 e_s + c2 u + c1 e_t, as one batched matmul over (e_s, u, e_t), then + c3
        torch.matmul(c[[0, 2, 1]].permute(1, 2, 3, 0), parts[:, :, :3], out=g.unsqueeze(2))
        g.add_(c[3])
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
