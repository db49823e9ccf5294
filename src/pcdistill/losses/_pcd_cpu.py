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
   Every per-atom maximum or sum is then a reduction over the last axis of a ``(rows, tiles, width)`` array,
   and every per-atom value broadcasts along it: no per-class scatter or gather. The products the sums need
   (``u^2``, ``e_t u``, ...) come from one batched matrix product, and so does the gradient; one scatter
   puts the gradient back in class order.

It runs as the custom op ``pcdistill::pcd_rows``: inside, shapes depend on the data (the atoms' lengths),
which ``torch.compile`` cannot trace, so a compiled graph holds the op as one node (its fake implementation
gives the output shapes). ``pcd.py`` uses it on the CPU; CUDA keeps the traceable ``_pcd_rows``.
"""
from __future__ import annotations

import numpy as np
import torch

from ._pcd_rows import atom_cuts, atom_layout, combine_atoms, finish_loss, priority_key, sortable

WORK_ARRAYS = 16  # (rows, C)-sized arrays alive at once, in units of the compute dtype (int64 counts twice)


def _centred_abs_diff(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``|(t - mean t) - (s - mean s)|`` for rows without infinities, rounded as ``priority_key`` rounds it."""
    n = s.shape[-1]
    return (t - t.sum(-1, keepdim=True) / n).sub_(s - s.sum(-1, keepdim=True) / n).abs_()


def _partition(keys: np.ndarray, cuts: np.ndarray) -> None:
    """Partition the rows of ``keys`` in place so that positions ``[c_i, c_{i+1})`` hold the keys of those ranks."""
    start = 0
    for cut in sorted(set(cuts.tolist())):
        if start < cut < keys.shape[1]:
            keys[:, start:].partition(cut - start, axis=-1)
            start = cut


def class_order(key: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """``(rows, C)`` int64: the classes of each row with atom ``k`` at rank positions ``[cuts[k-1], cuts[k])``
    (ranked by ``key`` descending, ties to the lower class index; any order inside an atom)."""
    rows, num_classes = key.shape
    if key.dtype != torch.int32:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices
    # (~key) * 2**32 + class index: all distinct; ascending = key descending, then lower index first
    index = torch.arange(num_classes, dtype=torch.int64) - 2**32
    packed = torch.add(index, key, alpha=-(2**32))
    keys, row_cuts = packed.numpy(), cuts.numpy()
    if (row_cuts == row_cuts[:1]).all():
        _partition(keys, row_cuts[0])
    else:
        unique, which = np.unique(row_cuts, axis=0, return_inverse=True)
        for i, c in enumerate(unique):
            same = np.flatnonzero(which.reshape(-1) == i)
            part = keys[same]
            _partition(part, c)
            keys[same] = part
    return packed.bitwise_and_(2**32 - 1)


def tile_layout(cuts: torch.Tensor, num_classes: int):
    """Tiles of equal width, each inside one atom. Returns the rank position each tile column reads
    ``(rows or 1, tiles * width)``, the padding mask ``(rows or 1, tiles, width)`` and each tile's atom ``(tiles,)``.
    Rows with equal cuts (no masks, or the same ones) share one layout."""
    atoms = cuts.shape[1]
    if bool((cuts == cuts[:1]).all()):
        cuts = cuts[:1]
    starts = torch.cat([torch.zeros_like(cuts[:, :1]), cuts[:, :-1]], 1)
    lengths = cuts - starts
    width = max(8, -(-num_classes // (8 * atoms)))  # padding at most 1/8 of C + 8 per atom
    tiles = (-(-lengths // width)).amax(0)
    tile_atom = torch.repeat_interleave(torch.arange(atoms), tiles)
    first = tiles.cumsum(0) - tiles
    offset = (torch.arange(len(tile_atom)) - first[tile_atom]).unsqueeze(-1) * width + torch.arange(width)
    pad = offset >= lengths[:, tile_atom, None]
    position = (starts[:, tile_atom, None] + offset).clamp_max(num_classes - 1).flatten(1)
    return position, pad, tile_atom


def _row_state(s: torch.Tensor, t: torch.Tensor, rank_by: str):
    """Live-class counts, the NaN and +inf row flags (None when every value is finite) and the integer key."""
    rows, num_classes = s.shape
    if bool(torch.isfinite(s.sum(-1) + t.sum(-1)).all()):  # no inf, no NaN: every class live
        n = torch.full((rows,), num_classes, dtype=torch.int64)
        if rank_by == "abs_diff":
            key = _centred_abs_diff(s, t)
            return n, None, None, key.view(torch.int32) if key.dtype == torch.float32 else sortable(key)
        key = t if rank_by == "teacher" else -torch.arange(num_classes, dtype=s.dtype).expand_as(s)
        return n, None, None, sortable(key)
    s_inf, t_inf = torch.isneginf(s), torch.isneginf(t)
    live = ~(s_inf & t_inf)
    inf_row = (live & s_inf & ~t_inf).any(-1)  # the student rules out a class the teacher keeps: loss +inf
    nan_row = (torch.isnan(s) | torch.isposinf(s) | torch.isnan(t) | torch.isposinf(t)).any(-1)
    return live.sum(-1), nan_row, inf_row, sortable(priority_key(s, t, live, rank_by))


def _to_tiles(z: torch.Tensor, index: torch.Tensor, pad: torch.Tensor, temperature: float) -> torch.Tensor:
    rows, (_, tiles, width) = z.shape[0], pad.shape
    return z.gather(1, index).view(rows, tiles, width).masked_fill_(pad, float("-inf")).div_(temperature)


def _atom_max(z: torch.Tensor, tile_atom: torch.Tensor, atoms: int) -> torch.Tensor:
    """``(rows, atoms)`` maxima of ``z`` (rows, tiles, width); 0 for an atom with no finite value."""
    top = z.amax(-1)
    m = top.new_full((z.shape[0], atoms), float("-inf")).scatter_reduce_(1, tile_atom.expand_as(top), top, "amax")
    return torch.where(torch.isneginf(m), 0.0, m)


def pcd_rows_cpu(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                 adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos"):
    """``_pcd_rows.pcd_rows``'s loss and gradient, by selection and tiles (CPU tensors)."""
    rows, num_classes = s.shape
    if rows == 0:
        return s.new_zeros(0), s.new_zeros(0, num_classes) if want_grad else None
    n, nan_row, inf_row, key = _row_state(s, t, rank_by)
    cuts = atom_cuts(n, stage_groups)
    atoms = cuts.shape[1]
    position, pad, tile_atom = tile_layout(cuts, num_classes)
    index = class_order(key, cuts).gather(1, position.expand(rows, -1))
    del key
    a = _to_tiles(s, index, pad, temperature)  # s/T in tiles, -inf in the padding
    b = _to_tiles(t, index, pad, temperature)
    m_s, m_t = _atom_max(a, tile_atom, atoms), _atom_max(b, tile_atom, atoms)

    # per tile: e_s = exp(a - m_s), u = a - m_s, e_t = exp(b - m_t), b - a; 0 for padding and teacher -inf
    prob_cos = adaptive and weight == "prob_cos"
    parts = torch.empty(rows, len(tile_atom), 4, pad.shape[-1], dtype=s.dtype)
    e_s, u, e_t, diff = parts.unbind(2)
    torch.sub(a, m_s[:, tile_atom, None], out=u)
    torch.exp(u, out=e_s)
    u.nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, a, out=diff).nan_to_num_(0.0, 0.0, 0.0)
    torch.sub(b, m_t[:, tile_atom, None], out=e_t).exp_()
    del b
    # products from one batched matmul: rows (e_s,) u, e_t against columns e_s, u, e_t, b - a
    gram = torch.matmul(parts[:, :, 0 if prob_cos else 1:3], parts.transpose(-1, -2))
    plain = parts.sum(-1)
    sums = [plain[..., 0], plain[..., 1], gram[..., -2, 1], plain[..., 2], gram[..., -1, 3], gram[..., -1, 1],
            gram[..., -1, 2]]
    if prob_cos:
        sums += [gram[..., 0, 0], gram[..., 0, 2]]
    tile_sums = torch.stack(sums, 1)  # (rows, sums, tiles)
    atom_sums = tile_sums.new_zeros(rows, len(sums), atoms).index_add_(2, tile_atom, tile_sums)
    loss, coef = combine_atoms(m_s, m_t, atom_sums, atom_layout(cuts, n, stage_groups), stage_groups, temperature,
                               adaptive, weight, want_grad)
    if nan_row is not None:
        loss = finish_loss(loss, nan_row, inf_row, factor, s.dtype)
    else:
        loss = (factor * loss).to(s.dtype)
    if not want_grad:
        return loss, None

    c = (coef * (factor / temperature))[:, :, tile_atom, None]  # (4, rows, tiles, 1)
    g = a  # reuse
    if prob_cos:  # e_s (c0 + c2 e_s + c3 e_t) + c1 e_t
        torch.addcmul(c[0], e_s, c[2], out=g).addcmul_(e_t, c[3]).mul_(e_s).addcmul_(e_t, c[1])
    else:  # c0 e_s + c1 e_t + c2 u + c3, the first three as one batched matmul over (e_s, u, e_t, b - a)
        weights = torch.stack([c[0], c[2], c[1], torch.zeros_like(c[0])], -1)  # (rows, tiles, 1, 4)
        torch.matmul(weights, parts, out=g.unsqueeze(2))
        g.add_(c[3])
    g.masked_fill_(pad, 0.0)
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
